"""The projection rules as pure functions: what each event changes in the read models."""

from __future__ import annotations

import datetime as dt
import uuid

from hypothesis import example, given
from hypothesis import strategies as st

from ciretry.act.budget import attempt_order
from ciretry.audit.projections import (
    AllocationRow,
    AttemptFinished,
    ChainRow,
    FeedbackRow,
    JobRow,
    PipelineCount,
    PipelineRow,
    RetryRow,
    Stat,
    batch_of,
    bucket_of,
    changes_for,
    order_key,
    request_order_key,
)
from ciretry.audit.why import ChainAttempt, chain_summary
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    Evidence,
    JobFinished,
    Metadata,
    PipelineLinked,
    RecordedEvent,
    Resources,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    VerdictDisputed,
    VerdictReached,
)

AT = dt.datetime(2024, 5, 1, 12, 34, 56, tzinfo=dt.UTC)
HOUR = dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
SNAP = BudgetSnapshot(job_attempts=1, job_limit=2, pipeline_retries=2, pipeline_limit=3,
                      pipeline_jobs=40, deterministic_failures=1)  # fmt: skip


def rec(data: Event, position: int = 7, at: dt.datetime = AT) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(), stream="s", stream_version=1, position=position,
        recorded_at=at, data=data, metadata=Metadata(),
    )  # fmt: skip


def job(status: str = "failed", **kw: object) -> JobFinished:
    fields: dict[str, object] = {
        "source": "gitlab", "project": "380", "pipeline_id": "9001", "job_id": "1977",
        "job_name": "test", "runner": "k8s-runner-1", "ref": "main",
    }  # fmt: skip
    fields.update(kw)
    return JobFinished(status=status, **fields)  # type: ignore[arg-type]


def verdict(**kw: object) -> VerdictReached:
    fields: dict[str, object] = {
        "source": "gitlab", "project": "380", "pipeline_id": "9001", "job_id": "1977",
        "job_name": "test", "category": "oom", "retryable": True, "budget": "system",
        "action": "rerun_with_resources", "confidence": 0.9,
        "rules": ("k8s.oom_killed", "exit.137", "k8s.oom_killed"),
        "evidence": (Evidence(rule="k8s.oom_killed", signal="pod_reason=OOMKilled"),),
        "signals": {"status": "failed"},
    }  # fmt: skip
    fields.update(kw)
    return VerdictReached(**fields)  # type: ignore[arg-type]


def stats(changes: list[object]) -> dict[tuple[str, str], int]:
    return {(c.kind, c.key): c.n for c in changes if isinstance(c, Stat)}


def test_failed_job_counts_as_failure_by_runner_and_name() -> None:
    changes = changes_for(rec(job(exit_code=137, attempt=2)))
    (row,) = [c for c in changes if isinstance(c, JobRow)]
    assert row.key == ("gitlab", "380", "1977")
    assert row.fields["exit_code"] == 137 and row.fields["status"] == "failed"
    assert "stage" not in row.fields  # unknown: must not overwrite what another event said
    assert stats(changes) == {
        ("jobs", "failed"): 1, ("failures", ""): 1, ("runner", "k8s-runner-1"): 1,
        ("job_name", "test"): 1,
    }  # fmt: skip
    assert {c.column for c in changes if isinstance(c, PipelineCount)} == {
        "jobs_finished", "jobs_failed"
    }  # fmt: skip
    assert all(c.bucket == HOUR for c in changes if isinstance(c, Stat))
    (attempt,) = [c for c in changes if isinstance(c, AttemptFinished)]
    assert attempt.passed is False and attempt.order_key == order_key("1977", 2)


def test_successful_and_cancelled_jobs_are_not_failures() -> None:
    for status in ("success", "canceled"):
        changes = changes_for(rec(job(status)))
        assert stats(changes) == {("jobs", status): 1}
    (attempt,) = [c for c in changes_for(rec(job("success"))) if isinstance(c, AttemptFinished)]
    assert attempt.passed is True


def test_unknown_runner_is_named() -> None:
    assert ("runner", "(unknown)") in stats(changes_for(rec(job(runner=None))))


def test_verdict_counts_category_retryable_and_each_rule_once() -> None:
    changes = changes_for(rec(verdict()))
    assert stats(changes) == {
        ("category", "oom"): 1, ("retryable", "oom"): 1, ("rule", "k8s.oom_killed"): 1,
        ("rule", "exit.137"): 1,
    }  # fmt: skip
    (row,) = [c for c in changes if isinstance(c, JobRow)]
    assert row.fields["category"] == "oom"
    assert row.fields["rules"] == ["k8s.oom_killed", "exit.137", "k8s.oom_killed"]
    (alloc,) = [c for c in changes if isinstance(c, AllocationRow)]
    assert alloc.oom and alloc.memory_limit_mb is None


def test_not_retryable_verdict_is_not_spurious() -> None:
    s = stats(changes_for(rec(verdict(category="deterministic", retryable=False, action="none",
                                      rules=("log.compile_error",)))))  # fmt: skip
    assert s == {("category", "deterministic"): 1, ("rule", "log.compile_error"): 1}


def test_verdict_on_a_successful_job_counts_nothing() -> None:
    changes = changes_for(rec(verdict(category="unknown", retryable=False, action="none",
                                      rules=("status:success",),
                                      signals={"status": "success"})))  # fmt: skip
    assert stats(changes) == {}
    assert not [c for c in changes if isinstance(c, PipelineCount)]


def request(**kw: object) -> RetryRequested:
    fields: dict[str, object] = {
        "source": "gitlab", "project": "380", "pipeline_id": "9001", "job_id": "1977",
        "job_name": "test", "action": "rerun_with_resources",
        "idempotency_key": "act:gitlab:380:1977:rerun_with_resources", "category": "oom",
        "budget": "system", "snapshot": SNAP,
        "resources": Resources(memory_request_mb=8192, memory_limit_mb=8192),
    }  # fmt: skip
    fields.update(kw)
    return RetryRequested(**fields)  # type: ignore[arg-type]


def test_oom_rerun_records_the_bumped_size_and_the_retry() -> None:
    changes = changes_for(rec(request()))
    (alloc,) = [c for c in changes if isinstance(c, AllocationRow)]
    assert (alloc.memory_request_mb, alloc.memory_limit_mb, alloc.oom) == (8192, 8192, False)
    (retry,) = [c for c in changes if isinstance(c, RetryRow)]
    assert retry.action == "rerun_with_resources" and not retry.dry_run
    (pipe,) = [c for c in changes if isinstance(c, PipelineRow)]
    # The snapshot is from before the request: one more retry is spent now.
    assert pipe.fields["pipeline_retries"] == 3 and pipe.fields["pipeline_limit"] == 3
    assert stats(changes) == {("decision", "requested:rerun_with_resources"): 1}


def test_plain_retry_changes_no_allocation() -> None:
    changes = changes_for(rec(request(action="retry_job", resources=None,
                                      idempotency_key="act:gitlab:380:1977:retry_job")))  # fmt: skip
    assert not [c for c in changes if isinstance(c, AllocationRow)]


def skip(reason: str) -> RetrySkipped:
    return RetrySkipped(
        source="gitlab", project="380", pipeline_id="9001", job_id="1977", job_name="test",
        reason=reason, detail="d", category="oom", snapshot=SNAP,  # type: ignore[arg-type]
    )  # fmt: skip


def test_budget_skips_count_as_exhaustion_other_skips_do_not() -> None:
    for reason in ("job_budget_exhausted", "pipeline_budget_exhausted"):
        s = stats(changes_for(rec(skip(reason))))
        assert s == {("decision", f"skipped:{reason}"): 1, ("budget_exhausted", reason): 1}
    for reason in ("not_retryable", "pipeline_mostly_broken", "opted_out", "dry_run",
                   "resource_cap_reached"):  # fmt: skip
        assert stats(changes_for(rec(skip(reason)))) == {("decision", f"skipped:{reason}"): 1}


def test_failed_call_counts_only_when_final() -> None:
    f = RetryFailed(source="gitlab", project="380", pipeline_id="9001", job_id="1977",
                    idempotency_key="k", status=503, detail="x", will_retry=True)  # fmt: skip
    assert stats(changes_for(rec(f))) == {}
    final = RetryFailed(source="gitlab", project="380", pipeline_id="9001", job_id="1977",
                        idempotency_key="k", status=403, detail="x")  # fmt: skip
    assert stats(changes_for(rec(final))) == {("decision", "call_failed"): 1}


def test_dispute_becomes_feedback_row() -> None:
    vid = uuid.uuid4()
    (row,) = changes_for(rec(VerdictDisputed(verdict_event_id=vid, who="alice", why="no")))
    assert isinstance(row, FeedbackRow)
    assert (row.kind, row.verdict_event_id, row.who) == ("disputed", vid, "alice")


def test_batch_merges_one_jobs_partial_rows_later_wins() -> None:
    b = batch_of([rec(job(stage="test"), 1), rec(verdict(), 2), rec(request(), 3),
                  rec(skip("dry_run"), 4)])  # fmt: skip
    row = b.jobs[("gitlab", "380", "1977")]
    assert row["stage"] == "test" and row["category"] == "oom"
    assert row["decision"] == "skipped" and row["decision_reason"] == "dry_run"
    assert b.job_positions[("gitlab", "380", "1977")] == (1, 4)
    assert b.stats[("decision", HOUR, "gitlab", "380", "requested:rerun_with_resources")] == 1
    assert b.last_position == 4 and b.events == 4


def test_bucket_is_the_utc_hour() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    assert bucket_of(dt.datetime(2024, 5, 1, 14, 59, tzinfo=tz)) == HOUR


ids = st.one_of(
    st.integers(min_value=0, max_value=10**12).map(str),
    st.text(alphabet="abcXYZ-_#!0123456789", min_size=1, max_size=6),
)


@given(st.lists(st.tuples(ids, st.one_of(st.none(), st.integers(0, 50))), min_size=2))
@example([("01", 5), ("1", 0)])  # equal values: act orders them by their text
def test_order_key_sorts_like_acts_attempt_order(
    attempts: list[tuple[str, int | None]],
) -> None:
    by_act = sorted(attempts, key=lambda a: attempt_order(*a))
    by_key = sorted(attempts, key=lambda a: order_key(*a).encode())
    assert [attempt_order(*a) for a in by_key] == [attempt_order(*a) for a in by_act]


def test_request_order_key_without_attempt_is_after_every_attempt_of_that_job() -> None:
    r = request_order_key("1977", "act:gitlab:380:1977:retry_job")
    assert order_key("1977", 5) < r < order_key("1978", None)
    assert request_order_key("t1", "act:taskcluster:p:t1#2:retry_job") == order_key("t1", 2)
    assert order_key("t1", 2) < order_key("t1", 3)


def test_chains_are_projected_from_decisions_outcomes_and_links() -> None:
    rerun = request(pipeline_id="9002", job_id="2000", origin_pipeline_id="9001",
                    idempotency_key="act:gitlab:380:2000:rerun_with_resources")  # fmt: skip
    issued = RetryIssued(source="gitlab", project="380", pipeline_id="9002", job_id="2000",
                         idempotency_key=rerun.idempotency_key, new_pipeline_id="9003",
                         origin_pipeline_id="9001")  # fmt: skip
    link = PipelineLinked(source="gitlab", project="380", pipeline_id="9003",
                          retry_of=rerun.idempotency_key,
                          resources=Resources(memory_limit_mb=16384))  # fmt: skip
    b = batch_of([rec(request()), rec(rerun), rec(issued), rec(link)])
    # The origin's own request makes no chain row; the rest say which chain each pipeline is in.
    assert b.chains[("gitlab", "380", "9002")] == ChainRow("gitlab", "380", "9002", "9001")
    assert b.chains[("gitlab", "380", "9003")] == ChainRow(
        "gitlab", "380", "9003", "9001", rerun.idempotency_key, 16384
    )
    (row,) = [r for r in b.retries if r.job_id == "2000"]
    assert row.origin_pipeline_id == "9001"
    requested = b.jobs[("gitlab", "380", "2000")]
    assert requested["requested_memory_mb"] == 8192
    observed = batch_of([rec(verdict(observed=Resources(memory_limit_mb=4096)))])
    assert observed.jobs[("gitlab", "380", "1977")]["observed_memory_mb"] == 4096


def test_chain_summary_names_every_attempt_origin_first() -> None:
    def attempt(job_id: str, pipeline: str, **kw: object) -> ChainAttempt:
        fields: dict[str, object] = {
            "status": "failed", "category": "oom", "decision": "requested",
            "action": "rerun_with_resources", "reason": None, "observed_memory_mb": None,
            "requested_memory_mb": None, "asked_memory_mb": None,
        }  # fmt: skip
        fields.update(kw)
        return ChainAttempt(job_id=job_id, pipeline_id=pipeline, **fields)  # type: ignore[arg-type]

    text = chain_summary(
        "9001",
        [
            attempt("1977", "9001", observed_memory_mb=2048, requested_memory_mb=4096),
            attempt("2000", "9002", asked_memory_mb=4096, requested_memory_mb=8192),
            attempt("2001", "9003", asked_memory_mb=8192, decision="skipped",
                    reason="resource_cap_reached"),
        ],
    )  # fmt: skip
    assert text.startswith("Attempt chain from pipeline 9001: 3 attempts.")
    assert "1. job 1977 in pipeline 9001 (2048 MB), failed as oom, act requested " \
        "rerun_with_resources with 4096 MB." in text
    assert "3. job 2001 in pipeline 9003 (8192 MB), failed as oom, act did not retry it " \
        "(resource_cap_reached)." in text
