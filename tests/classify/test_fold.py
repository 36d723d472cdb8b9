from __future__ import annotations

import pytest

from ciretry.classify.engine import Scanner
from ciretry.classify.fold import fold_verdict
from ciretry.classify.rules import RuleSet
from ciretry.common.events import PodTerminated, Resources, VerdictReached

from .helpers import job, pod


def classify(
    ruleset: RuleSet,
    scanner: Scanner,
    log: str | None,
    *,
    status: str = "failed",
    exit_code: int | None = None,
    failure_reason: str | None = None,
    pods: list[PodTerminated] | None = None,
) -> VerdictReached:
    matches = scanner.scan_bytes(log.encode()).matches() if log is not None else []
    return fold_verdict(
        job(status=status, exit_code=exit_code, failure_reason=failure_reason),
        pods or [], matches, ruleset, log_available=log is not None,
    )  # fmt: skip


BUILD = "make[2]: Entering directory '/src'\n" * 30


def test_compile_error_that_also_prints_killed_is_not_oom(
    ruleset: RuleSet, scanner: Scanner
) -> None:
    log = (
        BUILD
        + "src/a.c:10:5: error: 'x' undeclared\n/bin/sh: line 1:  77 Killed    sleep 100\nKilled\n"
    )
    v = classify(ruleset, scanner, log, exit_code=137)
    assert v.category == "deterministic" and not v.retryable
    assert v.rules[0] == "compile-error" and "oom-killed-137" in v.rules


def test_oom_from_exit_137_and_kill_text(ruleset: RuleSet, scanner: Scanner) -> None:
    log = BUILD + "/usr/bin/bash: line 12:  4242 Killed                  make -j8\n"
    v = classify(ruleset, scanner, log, exit_code=137)
    assert (v.category, v.retryable, v.action, v.budget) == (
        "oom",
        True,
        "rerun_with_resources",
        # System budget: the fix is more memory, not a change by the user (DESIGN: OOM reruns).
        "system",
    )
    ev = v.evidence[0]
    assert ev.rule == "oom-killed-137" and ev.line == 31 and "Killed" in (ev.text or "")


def test_oom_from_pod_oomkilled_and_from_k8s_exec_text(ruleset: RuleSet, scanner: Scanner) -> None:
    v = classify(ruleset, scanner, BUILD, exit_code=137, pods=[pod(container_reason="OOMKilled")])
    assert v.category == "oom" and v.rules[0] == "k8s-oomkilled"
    assert v.evidence[0].signal == "pod_reason=OOMKilled"
    v = classify(
        ruleset, scanner, BUILD + "ERROR: Job failed: command terminated with exit code 137\n"
    )
    assert v.category == "oom" and v.action == "rerun_with_resources"
    v = classify(
        ruleset, scanner, BUILD + "c++: fatal error: Killed signal terminated program cc1plus\n"
    )
    assert v.category == "oom"


def test_137_alone_is_not_oom(ruleset: RuleSet, scanner: Scanner) -> None:
    v = classify(ruleset, scanner, BUILD, exit_code=137)
    assert v.category == "unknown" and not v.retryable and v.rules == ()
    # "Killed" far from the end is a script killing its own children, not the OOM killer
    v = classify(ruleset, scanner, "Killed\n" + BUILD * 3, exit_code=137)
    assert v.category == "unknown"


def test_137_after_cancel_or_node_shutdown_is_not_oom(ruleset: RuleSet, scanner: Scanner) -> None:
    killed = BUILD + "Killed\nERROR: Job failed: exit code 137\n"
    v = classify(ruleset, scanner, killed, status="canceled", exit_code=137,
                 pods=[pod(container_reason="OOMKilled")])  # fmt: skip
    assert v.category == "cancelled" and not v.retryable and v.action == "none"
    v = classify(
        ruleset, scanner, killed, exit_code=137, pods=[pod(disruption_reason="DisruptionTarget")]
    )
    assert (v.category, v.budget, v.retryable) == ("preempted", "system", True)
    v = classify(ruleset, scanner, killed + "Pod was terminated in response to imminent node shutdown.\n",
                 exit_code=137)  # fmt: skip
    assert v.category == "preempted"
    v = classify(
        ruleset, scanner, killed, exit_code=137, failure_reason="taskcluster:worker-shutdown"
    )
    assert v.category == "preempted"


@pytest.mark.parametrize(
    ("reason", "category", "retryable", "action"),
    [
        ("runner_system_failure", "runner_system", True, "retry_job"),
        ("stuck_or_timeout_failure", "timeout", True, "retry_job"),
        ("job_execution_timeout", "timeout", False, "none"),
        ("missing_dependency_failure", "runner_system", True, "recreate_pipeline"),
        ("archived_failure", "deterministic", False, "none"),
        ("runner_configuration_error", "runner_system", False, "none"),
        ("taskcluster:claim-expired", "runner_system", True, "retry_job"),
        ("taskcluster:malformed-payload", "deterministic", False, "none"),
        ("taskcluster:superseded", "cancelled", False, "none"),
        ("script_failure", "unknown", False, "none"),
        ("some_new_reason", "unknown", False, "none"),
    ],
)
def test_failure_reasons(
    ruleset: RuleSet, scanner: Scanner, reason: str, category: str, retryable: bool, action: str
) -> None:
    v = classify(ruleset, scanner, None, failure_reason=reason)
    assert (v.category, v.retryable, v.action) == (category, retryable, action)
    assert v.signals["failure_reason"] == reason
    assert not v.log_available


def test_runner_system_failure_outranks_script_errors(ruleset: RuleSet, scanner: Scanner) -> None:
    log = BUILD + "FAILED tests/test_a.py::test_x - AssertionError\n"
    v = classify(ruleset, scanner, log, failure_reason="runner_system_failure")
    assert v.category == "runner_system" and v.retryable
    assert "pytest-failure" in v.rules  # overridden evidence is kept, not hidden


def test_network_failure_at_the_end_is_retryable_but_loses_to_test_failures(
    ruleset: RuleSet, scanner: Scanner
) -> None:
    net = "fatal: unable to access 'https://github.com/a/b.git/': Could not resolve host: github.com\n"
    v = classify(ruleset, scanner, BUILD + net, exit_code=128)
    assert (v.category, v.retryable, v.budget) == ("infra_network", True, "system")
    v = classify(ruleset, scanner, BUILD + net + "FAILED tests/test_a.py::test_x - boom\n")
    assert v.category == "deterministic"


def test_gha_timeout_beats_the_cancel_message(ruleset: RuleSet, scanner: Scanner) -> None:
    log = (
        "##[error]The job running on runner X has exceeded the maximum execution time of 60 minutes.\n"
        "##[error]The operation was canceled.\n"
    )
    assert classify(ruleset, scanner, log).category == "timeout"
    assert classify(ruleset, scanner, log.split("\n", 1)[1]).category == "cancelled"


def test_unknown_confidence_depends_on_log(ruleset: RuleSet, scanner: Scanner) -> None:
    with_log = classify(ruleset, scanner, "nothing\n")
    without = classify(ruleset, scanner, None)
    assert with_log.category == without.category == "unknown"
    assert without.confidence < with_log.confidence


def test_agreeing_rules_raise_confidence_and_fold_is_deterministic(
    ruleset: RuleSet, scanner: Scanner
) -> None:
    log = "curl: (6) Could not resolve host: x\n"
    one = classify(ruleset, scanner, log)
    both = classify(
        ruleset, scanner, log + "E: Failed to fetch http://m/x.deb  Hash Sum mismatch\n"
    )
    assert one.category == both.category == "infra_network"
    assert both.confidence > one.confidence
    assert classify(ruleset, scanner, log) == classify(ruleset, scanner, log)
    assert one.ruleset_version == ruleset.version


def test_verdict_round_trips_through_the_event_codec(ruleset: RuleSet, scanner: Scanner) -> None:
    from ciretry.common.events import decode_event, encode

    v = classify(ruleset, scanner, BUILD + "Killed\n", exit_code=137)
    assert decode_event("VerdictReached", 1, encode(v)) == v


def test_an_init_container_oom_is_an_oom_with_the_size_it_died_at(
    ruleset: RuleSet, scanner: Scanner
) -> None:
    """The pod's init container ran out of memory before the build started: the job failed with
    no useful log, and the pod says why (and how big the container was)."""
    init = PodTerminated(
        namespace="ci", pod="runner-abc", source="gitlab", project="p", job_id="20",
        container="init-permissions", container_init=True, container_reason="OOMKilled",
        exit_code=137, resources=Resources(memory_limit_mb=64),
    )  # fmt: skip
    v = classify(ruleset, scanner, "Preparing the job\n", pods=[init])
    assert (v.category, v.action) == ("oom", "rerun_with_resources")
    assert v.observed == Resources(memory_limit_mb=64)


def test_observed_size_is_the_largest_the_pod_events_report(
    ruleset: RuleSet, scanner: Scanner
) -> None:
    small = Resources(memory_request_mb=1024, memory_limit_mb=2048)
    big = Resources(memory_limit_mb=32768, cpu_limit_millis=4000)
    pods = [
        PodTerminated(namespace="ci", pod="a", source="gitlab", project="p", job_id="20",
                      container_reason="OOMKilled", resources=r)
        for r in (small, big, None)
    ]  # fmt: skip
    v = classify(ruleset, scanner, BUILD, pods=pods)
    assert v.observed == Resources(
        memory_request_mb=1024, memory_limit_mb=32768, cpu_limit_millis=4000
    )
    assert classify(ruleset, scanner, BUILD).observed is None
