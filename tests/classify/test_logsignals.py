"""Typed signals read from the log: each runner's exit report, the stage, where the job died."""

from __future__ import annotations

import pytest

from ciretry.classify.engine import Scanner
from ciretry.classify.fold import fold_verdict
from ciretry.classify.logsignals import LogFacts, facts_of_lines
from ciretry.classify.logtext import iter_lines
from ciretry.classify.rules import RuleFileError, ruleset_from_texts

from .helpers import job


def facts(text: str) -> LogFacts:
    lines = iter_lines([text.encode()])
    return facts_of_lines((ln.number, ln.text, ln.sections) for ln in lines)[0]


@pytest.mark.parametrize(
    ("tail", "code"),
    [
        ("2024-01-01T00:00:00.0000000Z ##[error]Process completed with exit code 137.", 137),
        ("Error: Process completed with exit code 2.", 2),
        ("ERROR: Job failed: exit code 137", 137),
        ("ERROR: Job failed: command terminated with exit code 137", 137),
        ("Exited with code exit status 137\nCircleCI received exit code 137", 137),
        ('The command "mvn test -B" exited with 137.\n\nDone. Your build exited with 1.', 137),
        ('The command "npm install " failed and exited with 1 during .', 1),
        ("ERROR: script returned exit code 143\nFinished: FAILURE", 143),
        ("Exited with status -1 (agent lost)", -1),
        (
            "[taskcluster 2024-01-01T00:00:00.000Z] Unsuccessful task run with exit code: 3 completed in 9 seconds",
            3,
        ),  # noqa: E501
    ],
)
def test_exit_status_in_each_runners_words(tail: str, code: int) -> None:
    f = facts("building\n" + tail + "\n")
    assert f.exit_code == code and f.outcome == "failed" and f.failure_line == 2


def test_a_tool_code_beats_a_wrappers_1_and_killed_means_sigkill() -> None:
    f = facts("@pkg: Killed\n@pkg: error Command failed with exit code 137.\nExited with code 1\n")
    assert f.exit_code == 137 and f.signal == "KILL"
    f = facts('make: *** [test] Killed\n\nThe command "make test" exited with 2.\n')
    assert f.exit_code == 2 and f.signal == "KILL"
    # a kill notice far before the failure is a script killing its own children
    f = facts("Killed\n" + "x\n" * 100 + "ERROR: Job failed: exit code 1\n")
    assert f.signal is None


def test_a_passed_verdict_wins_and_opens_no_failure_window() -> None:
    f = facts(
        'Killed\nThe command "mvn" failed. Retrying, 2 of 3.\nDone. Your build exited with 0.\n'
    )
    assert f.outcome == "passed" and f.signal is None
    assert not f.in_failure_window(1, 100, 3)
    assert facts("x\nFinished: SUCCESS\n").outcome == "passed"
    assert facts("x\nJob succeeded\n").outcome == "passed"


def test_stage_from_headers_sections_and_commands() -> None:
    gitlab = (
        "Preparing environment\nGetting source from Git repository\n"
        "fatal: unable to access 'https://g/x.git/': Could not resolve host: g\n"
    )
    assert facts(gitlab).stage == "fetch"
    after_failure = (
        'Executing "step_script" stage of the job script\n$ make\nmake: *** [all] Error 2\n'
        "Running after_script\nUploading artifacts for failed job\n"
        "Cleaning up project directory and file based variables\nERROR: Job failed: exit code 1\n"
    )
    assert facts(after_failure).stage == "script"  # post-failure stages are not where it died
    marked = (
        "section_start:1:prepare_executor\r\x1b[0Kx\nsection_end:1:prepare_executor\r\x1b[0K\n"
        "section_start:2:get_sources\r\x1b[0Kfetching\nERROR: Job failed: exit code 128\n"
    )
    assert facts(marked).stage == "fetch"
    travis = (
        "travis_fold:start:git.checkout\r\x1b[0K$ git clone --depth=50 x\n"
        'travis_fold:end:git.checkout\r\x1b[0K\n$ mvn test\nThe command "mvn test" exited with 1.\n'
    )
    assert facts(travis).stage == "script"  # the clone's "$" line is inside the checkout fold
    gha = (
        "##[group]Run actions/checkout@v4\nfetching\n##[error]Process completed with exit code 1.\n"
    )
    assert facts(gha).stage == "fetch"
    jenkins = "Cloning the remote Git repository\n[Joda Time] $ /bin/sh -xe /tmp/j.sh\nFinished: FAILURE\n"
    assert facts(jenkins).stage == "script"


def test_the_engine_reads_the_same_facts() -> None:
    log = (
        "section_start:1:get_sources\r\x1b[0K\nGetting source from Git repository\n"
        "fatal: unable to access 'https://g/x.git/': Could not resolve host: g\n"
        "section_end:1:get_sources\r\x1b[0K\nERROR: Job failed: exit code 128\n"
    )
    for chunk_size in (16, 1 << 20):
        rules = ruleset_from_texts([("t.toml", RULES)])
        scan = Scanner(rules, chunk_size=chunk_size).scan_bytes(log.encode())
        assert scan.facts == facts(log)
        assert scan.facts.stage == "fetch" and scan.facts.exit_code == 128


RULES = """
[[rule]]
id = "oom-in-script"
category = "oom"
action = "rerun_with_resources"
signals = { exit_code = [137], stage = "script" }
[rule.examples]
match = ["$ make\\nError: Process completed with exit code 137."]
no_match = ["Getting source from Git repository\\nERROR: Job failed: exit code 137", "$ make\\nERROR: Job failed: exit code 1"]

[[rule]]
id = "reset-where-it-died"
category = "infra_network"
log = "Connection reset"
scope = { failure = 3 }
[rule.examples]
match = ["Connection reset\\nERROR: Job failed: exit code 1"]
no_match = ["Connection reset\\nx\\nx\\nx\\nx\\nERROR: Job failed: exit code 1", "Connection reset\\nJob succeeded"]
"""


def test_rules_match_log_signals_and_the_failure_scope() -> None:
    rules = ruleset_from_texts([("t.toml", RULES)])
    scanner = Scanner(rules)

    def verdict(log: str, **kw: object) -> str:
        scan = scanner.scan_bytes(log.encode())
        v = fold_verdict(job(**kw), [], scan.matches(), rules, log_available=True,  # type: ignore[arg-type]
                         log_facts=scan.facts)  # fmt: skip
        return ",".join(v.rules)

    assert verdict("$ make\n##[error]Process completed with exit code 137.\n") == "oom-in-script"
    # the provider's exit code wins over the log's
    assert verdict("$ make\n##[error]Process completed with exit code 137.\n", exit_code=1) == ""
    assert verdict("Connection reset\nERROR: Job failed: exit code 1\n") == "reset-where-it-died"
    assert verdict("Connection reset\n" + "ok\n" * 10 + "ERROR: Job failed: exit code 1\n") == ""
    assert verdict("Connection reset\nJob succeeded\n") == ""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('signals = { stage = "build" }', "signals.stage must be among"),
        ('signals = { signal = "HUP" }', "signals.signal must be among"),
        ('signals = { exit_code = "137" }', "signals.exit_code must be an integer"),
        ('signals = { reason = "x" }', "signals must be a table with keys"),
        ('log = "x"\nscope = { failure = 0 }', "scope.failure must be a positive integer"),
    ],
)
def test_bad_signal_matchers_are_refused(body: str, message: str) -> None:
    text = f'[[rule]]\nid = "r"\ncategory = "oom"\n{body}\n[rule.examples]\nmatch = ["x"]\nno_match = ["y"]\n'
    with pytest.raises(RuleFileError, match=message):
        ruleset_from_texts([("t.toml", text)])
