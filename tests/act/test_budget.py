"""The pure fold and decide: every skip reason, every action, and the counting rules."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from ciretry.act.budget import (
    BudgetState,
    decide,
    dry_run_outcome,
    fold_budget,
    idempotency_key,
    is_due,
    outcome_key,
)
from ciretry.act.policy import Policy, parse_policy
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    JobFinished,
    JobRef,
    MergeRequestUpdated,
    Metadata,
    PipelineFinished,
    RecordedEvent,
    Resources,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
)
from ciretry.common.ids import uuid7

from .helpers import NOW, PIPELINE, PROJECT, job, verdict


def policy(extra: str = "", default: str = "") -> Policy:
    return parse_policy(
        f"""
version = 1
name = "t"
[default]
ignored_users = ["renovate[bot]"]
{default}
[default.attempts]
system = 3
user = 1
[default.pipeline]
floor = 2
percent = 10.0
[default.mostly_broken]
count = 3
fraction = 0.5
[default.backoff.default]
base_s = 0.0
[default.backoff.infra_network]
base_s = 30.0
factor = 2.0
cap_s = 100.0
jitter = 0.2
[default.resources]
memory_factor = 2.0
memory_cap_mb = 8192
base_memory_mb = 2048
[default.opt_out]
users = ["carol"]
refs = ["wip/*"]
markers = ["[no-retry]"]
labels = ["no-retry"]
[default.opt_in]
markers = ["[retry]"]
labels = ["ci-retry"]
{extra}
"""
    )


P = policy()


def run(
    events: list[Event],
    v: VerdictReached,
    p: Policy = P,
    j: JobFinished | None = None,
) -> RetryRequested | RetrySkipped:
    state = fold_budget(events)
    if j is None:
        j = next(
            (e for e in events if isinstance(e, JobFinished) and e.job_id == v.job_id), None
        )
    return decide(state, v, p, j, NOW)


def apply(events: list[Event], v: VerdictReached, p: Policy = P) -> RetryRequested | RetrySkipped:
    """Decide and append the decision, as act does."""
    d = run(events, v, p)
    events.append(d)
    return d


def many_jobs(n: int, prefix: str = "j", start: int = 1) -> list[Event]:
    return [job(start + i, f"{prefix}{i}") for i in range(n)]


# --- actions -------------------------------------------------------------------------------


def test_preemption_is_retried_now_with_key_and_snapshot() -> None:
    events: list[Event] = [job(10, "build"), *many_jobs(9, start=100)]
    d = run(events, verdict(10, "build", "preempted"))
    assert isinstance(d, RetryRequested)
    assert d.action == "retry_job"
    assert d.idempotency_key == idempotency_key("gitlab", PROJECT, "10", None, "retry_job")
    assert d.not_before is None  # preemptions do not wait
    assert d.dry_run is False
    assert d.snapshot.job_attempts == 0 and d.snapshot.job_limit == 3
    assert d.snapshot.pipeline_jobs == 10 and d.snapshot.pipeline_limit == 2
    assert d.policy == "t@1:default"


def test_recreate_pipeline_action_is_kept() -> None:
    d = run([job(10)], verdict(10, "build", "runner_system", action="recreate_pipeline"))
    assert isinstance(d, RetryRequested) and d.action == "recreate_pipeline"
    assert d.idempotency_key.endswith(":10:recreate_pipeline")


def test_oom_reruns_with_memory_times_factor_from_base() -> None:
    d = run([job(10)], verdict(10, "build", "oom"))
    assert isinstance(d, RetryRequested) and d.action == "rerun_with_resources"
    assert d.resources == Resources(memory_request_mb=4096, memory_limit_mb=4096)


def test_next_oom_uses_bumped_value_then_cap_then_resource_cap_reached() -> None:
    events: list[Event] = [job(10), *many_jobs(30, start=100)]
    first = apply(events, verdict(10, "build", "oom"))
    assert isinstance(first, RetryRequested) and first.resources is not None
    assert first.resources.memory_limit_mb == 4096
    events.append(job(11))
    second = apply(events, verdict(11, "build", "oom"))
    assert isinstance(second, RetryRequested) and second.resources is not None
    assert second.resources.memory_limit_mb == 8192  # 4096 x 2, at the cap
    events.append(job(12))
    third = apply(events, verdict(12, "build", "oom"))
    assert isinstance(third, RetrySkipped)
    assert third.reason == "resource_cap_reached"
    assert "8192" in third.detail and third.would_action == "rerun_with_resources"


def test_bump_is_capped_not_overshot() -> None:
    p = policy()
    events: list[Event] = [job(10), *many_jobs(30, start=100)]
    events.append(
        RetryRequested(
            source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="9", job_name="build",
            action="rerun_with_resources", idempotency_key="act:gitlab:42:9:rerun_with_resources",
            category="oom", budget="system", snapshot=_snap(),
            resources=Resources(memory_limit_mb=6000, memory_request_mb=6000),
        )
    )
    d = run(events, verdict(10, "build", "oom"), p)
    assert isinstance(d, RetryRequested) and d.resources is not None
    assert d.resources.memory_limit_mb == 8192


def test_preemption_after_bump_keeps_the_bumped_size() -> None:
    events: list[Event] = [job(10), *many_jobs(30, start=100)]
    apply(events, verdict(10, "build", "oom"))
    events.append(job(11))
    d = apply(events, verdict(11, "build", "preempted"))
    assert isinstance(d, RetryRequested) and d.action == "retry_job"
    assert d.resources is not None and d.resources.memory_limit_mb == 4096
    events.append(job(12))
    # And the OOM after the preemption grows from the bumped size, not from the base.
    d2 = apply(events, verdict(12, "build", "oom"))
    assert isinstance(d2, RetryRequested) and d2.resources is not None
    assert d2.resources.memory_limit_mb == 8192


def test_cpu_scales_when_configured() -> None:
    p = parse_policy(
        'version = 1\n[default.resources]\ncpu_factor = 2.0\ncpu_cap_millis = 3000\n'
        "base_cpu_millis = 2000\n"
    )
    d = run([job(10)], verdict(10, "build", "oom"), p)
    assert isinstance(d, RetryRequested) and d.resources is not None
    assert d.resources.cpu_limit_millis == 3000  # 2000 x 2 capped at 3000


def test_network_failure_waits_with_deterministic_jitter() -> None:
    events: list[Event] = [job(10)]
    d = run(events, verdict(10, "build", "infra_network"))
    assert isinstance(d, RetryRequested) and d.not_before is not None
    delay = (d.not_before - NOW).total_seconds()
    assert 24.0 <= delay <= 36.0  # 30 s +- 20 %
    again = run(events, verdict(10, "build", "infra_network"))
    assert isinstance(again, RetryRequested) and again.not_before == d.not_before
    assert not is_due(d, NOW) and is_due(d, NOW + dt.timedelta(seconds=37))


def test_backoff_grows_with_attempts_and_is_capped() -> None:
    events: list[Event] = [job(10), *many_jobs(30, start=100)]
    delays = []
    for jid in (10, 11, 12):
        if jid != 10:
            events.append(job(jid))
        d = apply(events, verdict(jid, "build", "infra_network"))
        assert isinstance(d, RetryRequested) and d.not_before is not None
        delays.append((d.not_before - NOW).total_seconds())
    assert 48 <= delays[1] <= 72  # 60 s +- 20 %
    assert 80 <= delays[2] <= 120  # 120 capped at 100, +- 20 %


# --- skip reasons -----------------------------------------------------------------------------


def test_not_retryable_deterministic() -> None:
    d = run([job(10)], verdict(10, "build", "deterministic"))
    assert isinstance(d, RetrySkipped) and d.reason == "not_retryable"
    assert d.category == "deterministic"


def test_not_retryable_when_a_newer_attempt_exists_late_webhook() -> None:
    # Attempt 11 is already in the log when the verdict of 10 arrives (out of order).
    events: list[Event] = [job(11), job(10)]
    d = run(events, verdict(10, "build", "preempted"))
    assert isinstance(d, RetrySkipped) and d.reason == "not_retryable"
    assert "newer attempt" in d.detail


def test_job_budget_exhausted_system() -> None:
    events: list[Event] = [job(10), *many_jobs(50, start=100)]
    results = []
    for jid in (10, 11, 12, 13):
        if jid != 10:
            events.append(job(jid))
        results.append(apply(events, verdict(jid, "build", "preempted")))
    assert [type(r) for r in results[:3]] == [RetryRequested] * 3
    last = results[3]
    assert isinstance(last, RetrySkipped) and last.reason == "job_budget_exhausted"
    assert last.snapshot.job_attempts == 3 and last.snapshot.job_limit == 3


def test_user_budget_separate_from_system_budget() -> None:
    events: list[Event] = [job(10), *many_jobs(50, start=100)]
    assert isinstance(apply(events, verdict(10, "build", "flaky_test")), RetryRequested)
    events.append(job(11))
    # User budget (1) spent; a second flaky failure is refused...
    d = apply(events, verdict(11, "build", "flaky_test"))
    assert isinstance(d, RetrySkipped) and d.reason == "job_budget_exhausted"
    assert d.snapshot.job_limit == 1
    # ...but a preemption draws on the system budget, untouched by the user's retry.
    d2 = run(events, verdict(11, "build", "preempted"))
    assert isinstance(d2, RetryRequested) and d2.snapshot.job_attempts == 0


def test_user_zero_refuses_first_user_retry() -> None:
    p = parse_policy("version = 1\n[default.attempts]\nuser = 0\n")
    d = run([job(10)], verdict(10, "build", "flaky_test"), p)
    assert isinstance(d, RetrySkipped) and d.reason == "job_budget_exhausted"


def test_combined_limit_counts_both_classes() -> None:
    pol = parse_policy(
        "version = 1\n[default.attempts]\nsystem = 3\nuser = 3\ncombined = 2\n"
        "[default.pipeline]\nfloor = 50\n"
    )
    events: list[Event] = [job(10)]
    assert isinstance(apply(events, verdict(10, "build", "flaky_test"), pol), RetryRequested)
    events.append(job(11))
    assert isinstance(apply(events, verdict(11, "build", "preempted"), pol), RetryRequested)
    events.append(job(12))
    d = apply(events, verdict(12, "build", "preempted"), pol)
    assert isinstance(d, RetrySkipped) and d.reason == "job_budget_exhausted"
    assert d.snapshot.job_attempts == 2 and d.snapshot.job_limit == 2
    assert "all classes" in d.detail


def test_manual_retries_count_against_the_budget() -> None:
    # Attempts 10..12 exist with no act request: three manual retries before 13.
    events: list[Event] = [
        job(10), job(11, manual_retry=True), job(12, manual_retry=True), job(13, manual_retry=True)
    ]
    events += many_jobs(50, start=100)
    d = run(events, verdict(13, "build", "preempted"))
    assert isinstance(d, RetrySkipped) and d.reason == "job_budget_exhausted"
    assert d.snapshot.job_attempts == 3


def test_attempts_ordered_numerically_by_job_id() -> None:
    # "99" < "100" numerically though not as strings: 100 is the newer attempt.
    events: list[Event] = [job(100), job(99)]
    newer = run(events, verdict(99, "build", "preempted"))
    assert isinstance(newer, RetrySkipped) and "newer attempt" in newer.detail
    latest = run(events, verdict(100, "build", "preempted"))
    assert isinstance(latest, RetryRequested) and latest.snapshot.job_attempts == 1


def test_taskcluster_runs_of_one_task_are_attempts() -> None:
    tc = dict(source="taskcluster", project="gecko")
    events: list[Event] = [job("TaskA", attempt=0, **tc), job("TaskA", attempt=1, **tc)]
    v = verdict("TaskA", "build", "preempted", source="taskcluster", project="gecko")
    d = run(events, v, j=job("TaskA", attempt=1, **tc))
    assert isinstance(d, RetryRequested) and d.snapshot.job_attempts == 1
    assert d.idempotency_key == "act:taskcluster:gecko:TaskA#1:retry_job"
    old = run(events, v, j=job("TaskA", attempt=0, **tc))
    assert isinstance(old, RetrySkipped) and old.reason == "not_retryable"


def test_buildkite_retries_are_new_job_ids_ordered_by_their_time_ordered_uuids() -> None:
    # A Buildkite retry is a new job in the same build, its id time-prefixed as a UUIDv7's (a
    # retry's id sorts after the job it retries); the attempt is retries_count + 1.
    bk = dict(source="buildkite", project="my-org/my-pipeline")
    first, second = (str(uuid7()) for _ in range(2))
    assert first < second
    events: list[Event] = [job(first, attempt=1, **bk), job(second, attempt=2, **bk)]
    v = verdict(second, "build", "preempted", **bk)
    d = run(events, v)
    assert isinstance(d, RetryRequested) and d.snapshot.job_attempts == 1
    assert d.idempotency_key == f"act:buildkite:my-org/my-pipeline:{second}#2:retry_job"
    old = run(events, verdict(first, "build", "preempted", **bk))
    assert isinstance(old, RetrySkipped) and old.reason == "not_retryable"


def test_a_buildkite_resize_is_skipped_as_unsupported() -> None:
    bk = dict(source="buildkite", project="my-org/my-pipeline")
    job_id = str(uuid7())
    d = run([job(job_id, attempt=1, **bk)], verdict(job_id, "build", "oom", **bk))
    assert isinstance(d, RetrySkipped) and d.reason == "resize_unsupported"


def test_pipeline_budget_exhausted_at_max_floor_percent() -> None:
    # 30 jobs x 10 % = 3 > floor 2: the fourth distinct job is refused.
    events: list[Event] = many_jobs(30)
    out = [apply(events, verdict(i + 1, f"j{i}", "preempted")) for i in range(4)]
    assert [type(d) for d in out[:3]] == [RetryRequested] * 3
    assert isinstance(out[3], RetrySkipped) and out[3].reason == "pipeline_budget_exhausted"
    assert out[3].snapshot.pipeline_retries == 3 and out[3].snapshot.pipeline_limit == 3


def test_pipeline_floor_applies_to_small_pipelines() -> None:
    events: list[Event] = many_jobs(3)
    out = [apply(events, verdict(i + 1, f"j{i}", "preempted")) for i in range(3)]
    assert [type(d) for d in out] == [RetryRequested, RetryRequested, RetrySkipped]
    assert isinstance(out[2], RetrySkipped) and out[2].snapshot.pipeline_limit == 2


def test_pipeline_finished_job_list_counts_jobs_not_yet_finished() -> None:
    refs = tuple(JobRef(job_id=str(i), name=f"j{i}", status="failed") for i in range(40))
    events: list[Event] = [
        job(1, "j1"),
        PipelineFinished(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                         status="failed", jobs=refs),
    ]
    d = run(events, verdict(1, "j1", "preempted"))
    assert isinstance(d, RetryRequested) and d.snapshot.pipeline_jobs == 40
    assert d.snapshot.pipeline_limit == 4


def test_dry_run_requests_count_against_the_pipeline_budget() -> None:
    p = policy(default="dry_run = true")
    events: list[Event] = many_jobs(3)
    d1 = apply(events, verdict(1, "j0", "preempted"), p)
    assert isinstance(d1, RetryRequested) and d1.dry_run
    events.append(dry_run_outcome(d1))
    apply(events, verdict(2, "j1", "preempted"), p)
    d3 = apply(events, verdict(3, "j2", "preempted"), p)
    assert isinstance(d3, RetrySkipped) and d3.reason == "pipeline_budget_exhausted"


def test_dry_run_outcome_closes_the_request() -> None:
    p = policy(default="dry_run = true")
    d = run([job(10)], verdict(10, "build", "preempted"), p)
    assert isinstance(d, RetryRequested)
    skip = dry_run_outcome(d)
    assert skip.reason == "dry_run" and skip.would_action == "retry_job"
    assert fold_budget([job(10), d]).pending() == []  # dry-run never executes
    state = fold_budget([job(10), d, skip])
    assert d.idempotency_key in state.outcomes


def test_mostly_broken_by_count() -> None:
    events: list[Event] = many_jobs(100)
    for i in range(4):
        apply(events, verdict(i + 1, f"j{i}", "deterministic"))
    d = run(events, verdict(50, "j49", "preempted"))
    assert isinstance(d, RetrySkipped) and d.reason == "pipeline_mostly_broken"
    assert d.snapshot.deterministic_failures == 4


def test_mostly_broken_by_fraction() -> None:
    events: list[Event] = many_jobs(4)
    for i in range(3):
        apply(events, verdict(i + 1, f"j{i}", "deterministic"))  # 3 of 4 > 0.5, count 3 not > 3
    d = run(events, verdict(4, "j3", "preempted"))
    assert isinstance(d, RetrySkipped) and d.reason == "pipeline_mostly_broken"
    assert "3 of 4" in d.detail


def test_deterministic_skip_of_same_job_name_counts_once() -> None:
    events: list[Event] = many_jobs(100)
    for _ in range(5):
        apply(events, verdict(1, "j0", "deterministic"))
    assert len(fold_budget(events).deterministic) == 1


@pytest.mark.parametrize(
    ("job_kw", "needle"),
    [
        ({"user": "renovate[bot]"}, "ignored"),
        ({"user": "carol"}, "carol"),
        ({"ref": "wip/thing"}, "wip/thing"),
        ({"commit_message": "fix: thing [no-retry]"}, "[no-retry]"),
    ],
)
def test_opted_out(job_kw: dict[str, Any], needle: str) -> None:
    j = job(10, **job_kw)
    d = run([j], verdict(10, "build", "preempted"))
    assert isinstance(d, RetrySkipped) and d.reason == "opted_out"
    assert needle in d.detail and d.would_action == "retry_job"


def review(labels: tuple[str, ...], state: str = "opened", branch: str = "main", **kw: Any
           ) -> MergeRequestUpdated:
    fields: dict[str, Any] = {"source": "gitlab", "project": PROJECT, "number": "7"}
    fields.update(kw)
    return MergeRequestUpdated(source_branch=branch, state=state, labels=labels, **fields)


def test_merge_request_label_opts_out_its_branch() -> None:
    d = run([job(10), review(("bug", "no-retry"))], verdict(10, "build", "preempted"))
    assert isinstance(d, RetrySkipped) and d.reason == "opted_out"
    assert "merge request label 'no-retry'" in d.detail


@pytest.mark.parametrize(
    "events",
    [
        # Runner tags are where a job runs, not a request to leave it alone.
        [job(10, runner_tags=("no-retry",))],
        # Events stored before runner tags had their own field: ``labels`` held runner tags.
        [job(10, labels=("no-retry",))],
        # A label on another branch's merge request, or on a closed one, says nothing here.
        [job(10), review(("no-retry",), branch="feature")],
        [job(10), review(("no-retry",), state="closed")],
        # The latest update wins, by the provider's clock (hooks arrive out of order).
        [
            job(10),
            review((), updated_at=dt.datetime(2024, 5, 2, tzinfo=dt.UTC)),
            review(("no-retry",), updated_at=dt.datetime(2024, 5, 1, tzinfo=dt.UTC)),
        ],
    ],
)
def test_what_is_not_an_opt_out_label(events: list[Event]) -> None:
    assert isinstance(run(events, verdict(10, "build", "preempted")), RetryRequested)


def test_scope_disabled_needs_opt_in() -> None:
    p = policy(extra='[[scopes]]\nname = "off"\nprojects = ["4*"]\nenabled = false\n')
    off = run([job(10)], verdict(10, "build", "preempted"), p)
    assert isinstance(off, RetrySkipped) and off.reason == "opted_out"
    assert off.policy == "t@1:off"
    on = run([job(10, commit_message="x [retry]")], verdict(10, "build", "preempted"), p)
    assert isinstance(on, RetryRequested)
    label = run([job(10), review(("ci-retry",))], verdict(10, "build", "preempted"), p)
    assert isinstance(label, RetryRequested)


def test_second_verdict_for_same_attempt_returns_the_same_request() -> None:
    events: list[Event] = [job(10), *many_jobs(30, start=100)]
    first = apply(events, verdict(10, "build", "preempted"))
    again = run(events, verdict(10, "build", "preempted"))
    assert again == first  # stored once thanks to its idempotency key
    assert fold_budget(events + [again]).retries_requested == 1


# --- fold details -------------------------------------------------------------------------------


def _snap() -> BudgetSnapshot:
    return BudgetSnapshot()


def _req(job_id: str, key: str, **kw: Any) -> RetryRequested:
    return RetryRequested(
        source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id=job_id, job_name="build",
        action="retry_job", idempotency_key=key, category="preempted", budget="system",
        snapshot=_snap(), **kw,
    )


def test_pending_requests_and_outcomes() -> None:
    r1, r2, r3 = _req("1", "k1"), _req("2", "k2"), _req("3", "k3")
    issued = RetryIssued(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="1",
                         idempotency_key="k1", new_job_id="5")
    transient = RetryFailed(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="2",
                            idempotency_key="k2", status=503, detail="x", will_retry=True)
    final = RetryFailed(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="3",
                        idempotency_key="k3", status=403, detail="x", will_retry=False)
    state = fold_budget([r1, r2, r3, issued, transient, final])
    assert [r.idempotency_key for r in state.pending()] == ["k2"]
    assert state.retries_requested == 3
    assert outcome_key("k1") == "k1:outcome"


def test_fold_accepts_recorded_events_and_job_stream() -> None:
    rec = RecordedEvent(
        event_id=uuid.uuid4(), stream="s", stream_version=1, position=1, recorded_at=NOW,
        data=job(10), metadata=Metadata(),
    )
    state = fold_budget([rec], [job(11), verdict(11)])
    assert isinstance(state, BudgetState)
    assert set(state.jobs["build"].attempts) == {"10", "11"}
    assert state.jobs_by_event[rec.event_id].job_id == "10"
    assert state.events == 2


def test_decided_verdicts_are_remembered() -> None:
    vid = uuid.uuid4()
    d = decide(fold_budget([job(10)]), verdict(10), P, job(10), NOW, verdict_event_id=vid)
    assert d.verdict_event_id == vid
    assert vid in fold_budget([job(10), d]).decided_verdicts
