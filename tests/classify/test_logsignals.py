"""Typed signals read from the log: each runner's exit report, the stage, where the job died."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ciretry.classify.engine import MAX_DIRTY_LINES, Scanner
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


_COMMANDS = [
    "$ make test",  # Travis, a plain line
    "\x1b[32;1m$ make test\x1b[0;m",  # GitLab, in colour
    "$ make test\x1b[0;m",  # a dirty line a raw scan also sees as a command
    "2024-05-01T00:00:00.0000000Z $ npm ci",  # after a provider prefix
    "[task 2024-05-01T00:00:00.000Z] $ ./mach build",
]
_NOT_COMMANDS = [
    "echo $ HOME",
    "$  ",
    "travis_time:start:0a1\r\x1b[0K$ ant test",  # the timer tag stays: not at the line start
    "price: $ 5",
    "xZ $ y",
]
_STAGES = [
    "section_start:{i}:get_sources\r\x1b[0KGetting source from Git repository",
    "section_end:{i}:get_sources\r\x1b[0K",
    "section_start:{i}:step_script\r\x1b[0K",
    "section_end:{i}:step_script\r\x1b[0K",
    "section_start:{i}:after_script\r\x1b[0K$ echo after",
    "section_end:{i}:after_script\r\x1b[0K",
    "travis_fold:start:git.checkout\r\x1b[0K$ git clone --depth=50 x",
    "travis_fold:end:git.checkout\r\x1b[0K",
    "##[group]Run actions/checkout@v4",
    "##[group]Run make",
    "##[endgroup]",
    "Preparing environment",
    "Getting source from Git repository",
    "Getting source from Git repository",
    'Executing "step_script" stage of the job script',
    "Running after_script",
]
_VERDICTS = [
    "ERROR: Job failed: exit code 1",
    'The command "make" exited with 2.',
    "##[error]Process completed with exit code 137.",
    "Killed",
    "make: *** [all] Error 2",
    "Job succeeded",
]


def _random_log(rng: random.Random) -> str:
    """Runner headers, section markers, command lines (or look-alikes), verdicts and output in
    random order, sometimes dirty; the last line a failure report, so the stage where the job
    died hinges on whether a command came after the last stage header."""
    lines, commands, dirty = rng.choice([20, 200, 1000]), rng.choice([0.01, 0.15]), rng.random()
    out = []
    for i in range(lines):
        x = rng.random()
        if x < commands:
            out.append(rng.choice(_COMMANDS))
        elif x < commands + 0.03:
            out.append(rng.choice(_NOT_COMMANDS))
        elif x < commands + 0.06:
            out.append(rng.choice(_STAGES).format(i=i))
        elif x < commands + 0.07:
            out.append(rng.choice(_VERDICTS))
        else:
            out.append(f"output line {i}")
        if rng.random() < dirty * 0.5:
            out[-1] = f"\x1b[2m{out[-1]}\x1b[0m"
    out.append(rng.choice(_VERDICTS[:3]))
    return "\n".join(out) + "\n"


def test_the_engine_keeps_one_command_per_span_and_the_facts_of_all(tmp_path: Path) -> None:
    """The engine keeps one runner command line per span between other signal lines and
    section markers (a GitLab trace echoes one every fifty lines); the facts are those of
    reading every line (``facts_of_lines``), whatever the chunking, threads or backend."""
    rules = ruleset_from_texts([("t.toml", RULES)])
    scanners = [
        Scanner(rules, chunk_size=256, threads=1),
        Scanner(rules, chunk_size=4096, threads=1),
        Scanner(rules, chunk_size=4096, threads=3),
        Scanner(rules),
        Scanner(rules, backend="re2", chunk_size=4096),
    ]
    rng = random.Random(16)
    stages = set()
    for _ in range(100):
        log = _random_log(rng)
        expected = facts(log)
        stages.add(expected.stage)
        for scanner in scanners:
            assert scanner.scan_bytes(log.encode()).facts == expected, (scanner.backend, log)
    assert stages >= {"fetch", "script", "setup"}  # the logs do test something
    path = tmp_path / "x.log"
    path.write_text(log)
    assert scanners[2].scan_file(path).facts == expected


def test_commands_in_a_chunk_too_dirty_for_the_fast_path() -> None:
    """A chunk of more dirty lines than the survey takes is cleaned and scanned whole: every
    command line is then judged."""
    body = "\n".join(f"\x1b[1mline {i}\x1b[0m" for i in range(MAX_DIRTY_LINES + 10))
    fetch, cmd, failed = (
        "Getting source from Git repository",
        "$ make",
        "ERROR: Job failed: exit code 1",
    )
    rules = ruleset_from_texts([("t.toml", RULES)])
    scanner = Scanner(rules, backend="hyperscan", threads=1)
    for parts, stage in (
        ([fetch, body, cmd, failed], "script"),
        ([fetch, cmd, body, failed], "script"),
        ([cmd, body, fetch, failed], "fetch"),
        ([cmd, fetch, body, cmd, failed], "script"),
    ):
        got = scanner.scan_bytes(("\n".join(parts) + "\n").encode()).facts
        assert (got.stage, got.exit_code) == (stage, 1)
        assert got.failure_line == len(parts) + MAX_DIRTY_LINES + 9


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
