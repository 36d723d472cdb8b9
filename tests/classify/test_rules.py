from __future__ import annotations

from pathlib import Path

import pytest

from ciretry.classify import rules as R
from ciretry.classify.engine import Scanner
from ciretry.classify.patterns import PatternError, check_linear, prefilter

from .helpers import rule_toml, rules_from


def test_default_rules_load_with_examples(ruleset: R.RuleSet) -> None:
    assert len(ruleset) >= 60
    assert len(ruleset.log_rules) >= 40
    for rule in ruleset.rules:
        assert rule.examples_match and rule.examples_no_match, rule.id
        assert rule.description, rule.id
    categories = {r.category for r in ruleset.rules}
    assert {"oom", "preempted", "infra_network", "infra_disk", "runner_system", "timeout",
            "flaky_test", "deterministic", "cancelled"} <= categories  # fmt: skip


def test_every_canonical_failure_reason_named_in_the_brief_has_a_rule(ruleset: R.RuleSet) -> None:
    covered = set().union(*(r.failure_reasons for r in ruleset.rules))
    for reason in [
        "runner_system_failure", "stuck_or_timeout_failure", "job_execution_timeout",
        "runner_unsupported", "scheduler_failure", "data_integrity_failure", "api_failure",
        "archived_failure", "unmet_prerequisites", "missing_dependency_failure",
        "runner_interrupted", "runner_configuration_error", "runner_external_dependency_failure",
        "taskcluster:claim-expired", "taskcluster:worker-shutdown",
        "taskcluster:deadline-exceeded", "taskcluster:intermittent-task",
        "taskcluster:malformed-payload", "taskcluster:internal-error", "taskcluster:superseded",
        "taskcluster:canceled",
    ]:  # fmt: skip
        assert reason in covered, reason


def test_engine_agrees_with_every_example(ruleset: R.RuleSet) -> None:
    """The fast path (prefilter + Hyperscan + dirty lines) and the per-line check agree."""
    for backend in ("hyperscan", "re2"):
        scanner = Scanner(ruleset, backend=backend)
        for rule in ruleset.log_rules:
            for ex, expect in [(e, True) for e in rule.examples_match] + [
                (e, False) for e in rule.examples_no_match
            ]:
                if ex.log is None or ex.signals is not None and not rule.signals_match(ex.signals):
                    continue
                hit = rule.id in scanner.scan_bytes(ex.log.encode()).hits
                assert hit is expect, (backend, rule.id, ex.log)


def test_a_failing_example_refuses_the_file_naming_the_rule() -> None:
    text = rule_toml("net-flaky", "connection reset", match='["Connection reset by peer"]')
    with pytest.raises(R.RuleFileError) as err:
        rules_from(text, "team.toml")
    msg = str(err.value)
    assert "team.toml" in msg and "net-flaky" in msg and "does not match" in msg


def test_a_no_match_example_that_matches_refuses_the_file() -> None:
    text = rule_toml("too-broad", "oom", match='["oom-killer invoked"]', no_match='["zoom in"]')
    with pytest.raises(R.RuleFileError, match="too-broad.*no_match example matches.*zoom"):
        rules_from(text)


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        (r"(a)\\1", "backreference"),
        (r"foo(?=bar)", "lookahead"),
        (r"(?<!x)y", "lookbehind"),
        (r"(?P<w>a)(?P=w)", "named backreference"),
    ],
)
def test_backtracking_constructs_are_rejected_with_a_clear_message(
    pattern: str, words: str
) -> None:
    text = rule_toml("bad-re", pattern.replace("\\\\", "\\"))
    with pytest.raises(R.RuleFileError) as err:
        rules_from(text)
    assert "bad-re" in str(err.value) and words in str(err.value)
    assert "linear time" in str(err.value)


def test_check_linear_ignores_lookalikes_in_classes_and_escapes() -> None:
    check_linear(r"[\1]")  # inside a class: an octal/literal, not a backreference
    check_linear(r"\(?=x")  # an escaped paren is a literal
    with pytest.raises(PatternError):
        check_linear(r"(x)\2")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["hyperscan", "re2"])
def test_catastrophic_backtracking_shapes_run_in_linear_time(backend: str) -> None:
    """A backtracking engine would not finish these lines in a lifetime: the timeout is the
    hang guard (bench/hostile.py measures the time)."""
    text = rule_toml("nested", r"^(a+)+$", match='["aaaa"]', no_match='["aaaa!"]') + rule_toml(
        "alt", r"^(a|aa)+b", match='["aab"]', no_match='["aaaa"]'
    )
    scanner = Scanner(rules_from(text), backend=backend)
    assert scanner.backend == backend
    evil = b"a" * 200_000 + b"!\n"
    assert scanner.scan_bytes(evil * 3).hits == {}
    assert scanner.scan_bytes(evil + b"aaaab\n").rule_ids == ["alt"]


def test_regex_matching_the_empty_line_is_refused() -> None:
    with pytest.raises(R.RuleFileError, match="empty line"):
        rules_from(rule_toml("everything", "x*", match='["x"]', no_match='["y"]'))


def test_schema_errors_name_the_rule() -> None:
    with pytest.raises(R.RuleFileError, match="r1.*category"):
        rules_from(rule_toml(extra="").replace('"infra_network"', '"network"'))
    with pytest.raises(R.RuleFileError, match="r1.*unknown keys"):
        rules_from(rule_toml(extra="severity = 3"))
    with pytest.raises(R.RuleFileError, match="r1.*examples"):
        rules_from(rule_toml(no_match="[]"))
    with pytest.raises(R.RuleFileError, match="not retryable cannot recommend"):
        rules_from(rule_toml(extra='retryable = false\naction = "retry_job"'))
    with pytest.raises(R.RuleFileError, match="at least one matcher"):
        rules_from(rule_toml(log=None, match="[{exit_code = 1}]", no_match="[{exit_code = 2}]"))


def test_deployment_files_add_override_and_disable(tmp_path: Path) -> None:
    extra = tmp_path / "site.toml"
    extra.write_text(
        rule_toml(
            "site-mirror-down",
            r"mirror\.example\.com.*503",
            match='["GET mirror.example.com 503"]',
            no_match='["GET mirror.example.com 200"]',
        )  # fmt: skip
        + '\n[[rule]]\nid = "ghc-idle-cpu-flaky"\ndisabled = true\n'
    )
    base = R.load_ruleset()
    rs = R.load_ruleset([extra])
    ids = {r.id for r in rs.rules}
    assert "site-mirror-down" in ids and "ghc-idle-cpu-flaky" not in ids
    assert rs.version != base.version

    dup = tmp_path / "dup.toml"
    dup.write_text(rule_toml("compile-error", "x y z", match='["x y z"]', no_match='["x"]'))
    with pytest.raises(R.RuleFileError, match="duplicate id"):
        R.load_ruleset([dup])
    dup.write_text(rule_toml("compile-error", "x y z", match='["x y z"]', no_match='["x"]',
                             extra="override = true"))  # fmt: skip
    assert R.load_ruleset([dup])["compile-error"].log == "x y z"


def test_signal_examples_are_checked_too() -> None:
    text = (
        '[[rule]]\nid = "sig"\ncategory = "oom"\naction = "rerun_with_resources"\n'
        'exit_codes = [137]\nlog = "Killed"\n'
        '[rule.examples]\nmatch = [{exit_code = 1, log = "Killed"}]\nno_match = ["x"]\n'
    )
    with pytest.raises(R.RuleFileError, match="sig.*does not match.*exit_code=1"):
        rules_from(text)


def test_prefilter_only_widens() -> None:
    assert prefilter(r"^(?:\S+ +ERROR - +)?[^\s:]+:\d+: error: ") == r":\d+: error: "
    assert prefilter(r"(?i)^foo|^\s*bar") == r"(?i)(?:foo|bar)"
    assert prefilter(r"^\d+$") == r"^\d+$"  # nothing literal to start from: unchanged
    assert prefilter(r"^(?:FAILED|ERROR) x") == r"(?:FAILED|ERROR) x"
