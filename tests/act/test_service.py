"""ActHandler against a real PostgreSQL event log and a fake GitLab."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest

from ciretry.act.budget import outcome_key
from ciretry.act.executors import Confirm, GitLabExecutor, HttpSettings, Outcome, unclaimed
from ciretry.act.policy import Policy, parse_policy
from ciretry.act.runner import RequestRunner
from ciretry.act.service import ActHandler, build
from ciretry.common.config import Config
from ciretry.common.errors import DependencyUnavailable
from ciretry.common.eventlog import (
    AlreadyProcessed,
    AppendResult,
    EventLog,
    TrackedAppend,
    Tracking,
)
from ciretry.common.events import (
    JobFinished,
    NewEvent,
    PipelineLinked,
    RecordedEvent,
    Resources,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
    job_stream,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore
from ciretry.common.groupcommit import AppendBatcher
from tests.support.claims import lose_claim
from tests.support.fakehttp import Sleeps
from tests.support.providers import FakeGitLab

from .helpers import NOW, PIPELINE, PROJECT, job, verdict

STREAM = pipeline_stream("gitlab", PROJECT, PIPELINE)
FAST = HttpSettings(timeout_s=2.0, max_attempts=2, backoff_base_s=0.01, backoff_cap_s=0.02)


def policy(default: str = "", resources: str = "", *, pipeline_floor: int = 2) -> Policy:
    return parse_policy(
        f"""
version = 1
[default]
{default}
[default.attempts]
system = 3
[default.pipeline]
floor = {pipeline_floor}
percent = 5.0
[default.mostly_broken]
count = 1000
[default.backoff.infra_network]
base_s = 30.0
jitter = 0.0
[default.resources]
memory_factor = 2.0
memory_cap_mb = 8192
base_memory_mb = 2048
{resources}
"""
    )


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    """The fake GitLab, reached in-process (its real-HTTP path: tests/act/test_executors.py)."""
    fake = FakeGitLab()
    yield fake
    for ex in _executors:
        await ex.close()
    _executors.clear()
    await fake.close()


_executors: list[GitLabExecutor] = []


def handler(store: EventLog, fake: FakeGitLab, p: Policy | None = None, **kw: Any) -> ActHandler:
    """act as the service builds it (``service.build``), on the test's event log, its fake
    GitLab and a fixed clock."""
    ex = GitLabExecutor(
        fake.url, "tok", settings=FAST, sleep=_nosleep, transport=fake.transport()
    )
    _executors.append(ex)
    settings = {"act_max_failures": kw.pop("max_failures", 5),
                "act_failure_backoff": kw.pop("failure_backoff_s", 60.0)}  # fmt: skip
    assert not kw, kw
    return build(store, None, Config(**settings), policy=p or policy(),
                 executors={"gitlab": ex}, clock=lambda: NOW)  # fmt: skip


async def _nosleep(_: float) -> None:
    return None


async def seed(store: EventLog, fake: FakeGitLab, j: JobFinished, v: VerdictReached
               ) -> RecordedEvent:
    fake.add_job(int(j.job_id), j.job_name, int(j.pipeline_id))
    (jf,) = await store.append(STREAM, [j])
    v = msgspec_replace(v, job_event_id=jf.event_id)
    (rec,) = await store.append(job_stream("gitlab", PROJECT, v.job_id), [v])
    return rec


def msgspec_replace(v: VerdictReached, **kw: Any) -> VerdictReached:
    import msgspec

    return msgspec.structs.replace(v, **kw)


async def log_of(store: EventLog) -> list[Any]:
    return [e.data for e in await store.read_stream(STREAM)]


async def test_decides_appends_and_retries(log: EventLog, gitlab: FakeGitLab) -> None:
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    h = handler(log, gitlab)
    d = await h.handle_verdict(rec)
    assert isinstance(d, RetryRequested)
    events = await log_of(log)
    assert [type(e) for e in events] == [JobFinished, RetryRequested, RetryIssued]
    issued = events[2]
    assert issued.new_job_id == "100001" and issued.idempotency_key == d.idempotency_key
    assert len(gitlab.posts()) == 1
    # Redelivery: no second decision, no second call.
    again = await h.handle_verdict(rec)
    assert again == d
    assert len(await log_of(log)) == 3 and len(gitlab.posts()) == 1
    outcome = await log.get_by_key(outcome_key(d.idempotency_key))
    assert outcome is not None and isinstance(outcome.data, RetryIssued)
    assert (await log.get_by_key(d.idempotency_key)) is not None


async def test_skip_is_recorded_with_reason(log: EventLog, gitlab: FakeGitLab) -> None:
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "deterministic"))
    d = await handler(log, gitlab).handle_verdict(rec)
    assert isinstance(d, RetrySkipped) and d.reason == "not_retryable"
    assert gitlab.calls == []
    assert [type(e) for e in await log_of(log)] == [JobFinished, RetrySkipped]


async def preempted_jobs(
    log: EventLog, gitlab: FakeGitLab, n: int, *, first_id: int
) -> list[RecordedEvent]:
    """``n`` failed jobs of the pipeline, each with its (retryable) verdict recorded: the
    verdict events, as the bus would deliver them."""
    jobs = [job(first_id + i, f"job-{i}") for i in range(n)]
    for j in jobs:
        gitlab.add_job(int(j.job_id), j.job_name, int(PIPELINE))
    recorded = await log.append(STREAM, jobs)
    verdict_events = [
        NewEvent(
            stream=job_stream("gitlab", PROJECT, j.job_id),
            data=verdict(j.job_id, j.job_name, "preempted", job_event_id=r.event_id),
        )
        for j, r in zip(jobs, recorded, strict=True)
    ]
    return [r.event for r in await log.append_batch(verdict_events)]


async def test_four_replicas_1000_verdicts_budget_50(
    store: EventStore, gitlab: FakeGitLab, pg_dsn: str, schema: str
) -> None:
    n = 1000
    delivered = await preempted_jobs(store, gitlab, n, first_id=10_000)
    queue: asyncio.Queue[RecordedEvent] = asyncio.Queue()
    # Every verdict delivered twice (at-least-once bus), interleaved across replicas.
    for rec in delivered + delivered[::7]:
        queue.put_nowait(rec)
    replicas = [await EventStore.connect(pg_dsn, schema, max_size=4) for _ in range(4)]
    handlers = [handler(s, gitlab) for s in replicas]

    async def consume(h: ActHandler) -> None:
        while not queue.empty():
            await h.handle_verdict(queue.get_nowait())

    try:
        await asyncio.gather(*(consume(h) for h in handlers))
    finally:
        for s in replicas:
            await s.close()

    retry_posts = gitlab.posts("/retry")
    assert len(retry_posts) == 50
    assert len({c.path for c in retry_posts}) == 50
    events = await log_of(store)
    kinds = Counter(type(e).__name__ for e in events)
    assert kinds["RetryRequested"] == 50 and kinds["RetryIssued"] == 50
    skips = [e for e in events if isinstance(e, RetrySkipped)]
    assert len(skips) == 950
    assert {s.reason for s in skips} == {"pipeline_budget_exhausted"}
    assert all(s.snapshot.pipeline_retries == 50 and s.snapshot.pipeline_limit == 50
               for s in skips)
    # Each verdict decided exactly once; the requests' snapshots count 0..49.
    assert len({e.verdict_event_id for e in events
                if isinstance(e, RetryRequested | RetrySkipped)}) == n
    assert sorted(e.snapshot.pipeline_retries for e in events
                  if isinstance(e, RetryRequested)) == list(range(50))
    assert sum(h.conflicts for h in handlers) > 0  # the race really happened


async def test_a_burst_of_one_pipeline_is_decided_together_without_conflicts(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    """300 verdicts of one pipeline at once on one replica: one decider takes them in batches
    (each seeing the decisions before it), so nothing conflicts and the budget is exact."""
    n = 300
    delivered = await preempted_jobs(log, gitlab, n, first_id=20_000)
    h = handler(log, gitlab)
    # Every verdict twice (an at-least-once bus), the repeats inside the same burst.
    await asyncio.gather(*(h.handle_verdict(e) for e in delivered + delivered[::5]))
    # Outcomes land in the chain's stream too (each request's own task records its call), so
    # a batch read before one may conflict once; deciding each verdict alone at once made
    # thousands of conflicts here and gave up (TooMuchContention).
    assert h.conflicts < 10
    events = await log_of(log)
    requests = [e for e in events if isinstance(e, RetryRequested)]
    skips = [e for e in events if isinstance(e, RetrySkipped)]
    limit = 15  # 5% of 300 jobs (the default policy's share; its floor is 3)
    assert sorted(r.snapshot.pipeline_retries for r in requests) == list(range(limit))
    assert len(skips) == n - limit and {s.reason for s in skips} == {"pipeline_budget_exhausted"}
    assert len({e.verdict_event_id for e in requests + skips}) == n
    retry_posts = gitlab.posts("/retry")
    assert len(retry_posts) == len({c.path for c in retry_posts}) == limit
    # The check before each call lists the pipeline's jobs; requests carried out at once share
    # a listing (``executors.listings``), so there are fewer listings than requests.
    pages = gitlab.calls_of("GET", f"/pipelines/{PIPELINE}/jobs")
    listings = [c for c in pages if c.query["page"] == "1"]
    assert 1 <= len(listings) < limit


class Counting:
    """The event log, counting the group commits (``append_tracked``) and the lone tracking
    rows (``record_tracking``) asked of it."""

    def __init__(self, store: EventLog) -> None:
        self.store = store
        self.commits: list[list[TrackedAppend]] = []
        self.lone_trackings = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def append_tracked(
        self, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        self.commits.append(list(units))
        return await self.store.append_tracked(units)

    async def record_tracking(self, tracking: Tracking) -> bool:
        self.lone_trackings += 1
        return await self.store.record_tracking(tracking)


async def test_outcomes_of_requests_carried_out_at_once_share_a_commit(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    """Retries whose provider calls answer together: their outcomes are appended in fewer
    transactions than outcomes (the group commit), one RetryIssued each."""
    n = 6  # each held call holds its claim's connection: fewer than the test pool's claims
    delivered = await preempted_jobs(log, gitlab, n, first_id=21_000)
    counting = Counting(log)
    h = handler(cast(EventLog, counting), gitlab, policy(pipeline_floor=n))
    calls = [gitlab.hold("POST", "/retry") for _ in range(n)]
    deciding = asyncio.gather(*(h.handle_verdict(e) for e in delivered))
    for call in calls:
        await call.arrived.wait()
    for call in calls:
        call.release()
    await deciding
    issued = [e for e in await log_of(log) if isinstance(e, RetryIssued)]
    assert len(issued) == len({e.idempotency_key for e in issued}) == n
    outcome_commits = [c for c in counting.commits
                       if any(isinstance(e.data, RetryIssued) for u in c for e in u.events)]
    assert sum(len(c) for c in outcome_commits) == n
    assert len(outcome_commits) == h.outcomes.stats.batches < n
    await h.close()


async def test_a_batch_of_verdicts_records_its_tracking_rows_in_one_call(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    """Verdicts of one pipeline decided in one batch: their tracking rows follow the decisions
    in one call (not one round trip each); delivered again, the rows exist already and that
    is fine (nothing decided twice)."""
    n = 12
    delivered = await preempted_jobs(log, gitlab, n, first_id=22_000)
    counting = Counting(log)
    h = handler(cast(EventLog, counting), gitlab)
    await asyncio.gather(*(h.handle_verdict(e) for e in delivered))
    assert all([await log.is_processed("act", e.event_id) for e in delivered])
    tracked = [c for c in counting.commits if c and all(not u.events for u in c)]
    assert tracked and all(u.tracking is not None for c in tracked for u in c)
    assert max(len(c) for c in tracked) > 1 and counting.lone_trackings == 0
    before = await log_of(log)
    commits = len(counting.commits)
    # Redelivered (the consumer's ack lost): recognized as decided, tracked again in one call.
    await asyncio.gather(*(h.handle_verdict(e) for e in delivered))
    assert await log_of(log) == before
    again = counting.commits[commits:]
    assert [len(c) for c in again if all(not u.events for u in c)] != []
    assert counting.lone_trackings == 0
    await h.close()


class CrashAfterCall:
    """Wraps an executor: the provider call happens, then the process 'dies'."""

    source = "gitlab"

    def __init__(self, inner: GitLabExecutor) -> None:
        self.inner = inner

    async def execute(
        self, request: RetryRequested, job: JobFinished | None, *, confirm: Confirm = unclaimed
    ) -> Outcome:
        await self.inner.execute(request, job, confirm=confirm)
        raise asyncio.CancelledError("killed between the provider call and RetryIssued")

    async def close(self) -> None:
        await self.inner.close()


async def test_crash_between_call_and_issued_never_calls_twice(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    inner = GitLabExecutor(
        gitlab.url, "tok", settings=FAST, sleep=_nosleep, transport=gitlab.transport()
    )
    crashing = ActHandler(log, None, policy(), {"gitlab": CrashAfterCall(inner)}, "act",
                          clock=lambda: NOW)
    with pytest.raises(asyncio.CancelledError):
        await crashing.handle_verdict(rec)
    await inner.close()
    assert len(gitlab.posts()) == 1
    assert [type(e) for e in await log_of(log)] == [JobFinished, RetryRequested]

    # Restart: the bus redelivers the verdict to a fresh handler.
    fresh = handler(log, gitlab)
    await fresh.handle_verdict(rec)
    # And the scheduler of yet another replica looks for unfinished requests.
    assert await handler(log, gitlab).run_due(NOW) == 0
    assert len(gitlab.posts()) == 1
    events = await log_of(log)
    assert [type(e) for e in events] == [JobFinished, RetryRequested, RetryIssued]
    assert events[2].found_existing and events[2].new_job_id == "100001"


async def test_crash_recovery_by_run_due_alone(log: EventLog, gitlab: FakeGitLab) -> None:
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    inner = GitLabExecutor(
        gitlab.url, "tok", settings=FAST, sleep=_nosleep, transport=gitlab.transport()
    )
    crashing = ActHandler(log, None, policy(), {"gitlab": CrashAfterCall(inner)}, "act",
                          clock=lambda: NOW)
    with pytest.raises(asyncio.CancelledError):
        await crashing.handle_verdict(rec)
    await inner.close()
    assert await handler(log, gitlab).run_due(NOW) == 1
    assert len(gitlab.posts()) == 1
    issued = (await log_of(log))[-1]
    assert isinstance(issued, RetryIssued) and issued.found_existing


async def test_a_replica_whose_claim_was_lost_does_not_call_after_the_new_holder(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    """Replica A checks GitLab, whose answer ("not retried yet") is slow to come; meanwhile A's
    claim dies with its database connection, and replica B's scheduler takes the request over,
    checks and retries the job. A's answer then arrives, stale: A must not call as well."""
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    slow_check = gitlab.hold("GET", "/pipelines/900/jobs")
    a = asyncio.create_task(handler(log, gitlab).handle_verdict(rec))
    await slow_check.arrived.wait()
    request = next(e for e in await log_of(log) if isinstance(e, RetryRequested))
    await lose_claim(log, request.idempotency_key)
    assert await handler(log, gitlab).run_due(NOW) == 1  # replica B
    slow_check.release()
    assert isinstance(await a, RetryRequested)
    assert len(gitlab.posts("/retry")) == 1
    outcomes = [e for e in await log_of(log) if isinstance(e, RetryIssued | RetryFailed)]
    assert len(outcomes) == 1 and isinstance(outcomes[0], RetryIssued)
    assert not outcomes[0].found_existing  # B's own call; A recorded nothing


class AwayThenBack:
    """The event log, except while the database is away: the first ``away`` group commits
    (``append_tracked``, what the outcomes' batcher calls) are refused as a stopped PostgreSQL
    refuses them."""

    def __init__(self, store: EventLog, away: int) -> None:
        self.store = store
        self.away = away

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def append_tracked(
        self, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        if self.away:
            self.away -= 1
            raise ConnectionRefusedError("[Errno 111] Connect call failed")
        return await self.store.append_tracked(units)


async def test_an_outcome_the_database_refused_is_recorded_once_it_is_back(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    """The call is made, then PostgreSQL restarts: the outcome only this process knows is
    appended again until it is taken. Dropped, the request stayed open and was given up while
    the provider was away for its checks: "failed", although the job had been retried."""
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "infra_network"))
    request = await handler(log, gitlab).handle_verdict(rec)  # scheduled: backoff 30 s
    assert isinstance(request, RetryRequested) and gitlab.posts() == []
    ex = GitLabExecutor(
        gitlab.url, "tok", settings=FAST, sleep=_nosleep, transport=gitlab.transport()
    )
    sleeps = Sleeps()
    outcomes = AppendBatcher(cast(EventLog, AwayThenBack(log, 2)))
    runner = RequestRunner(
        log, log.append_batch, {"gitlab": ex}, outcomes=outcomes, sleep=sleeps
    )
    out = await runner.execute(request, job(500))
    await ex.close()
    await outcomes.close()
    assert out is not None and out.issued and len(gitlab.posts()) == 1
    assert sleeps.delays == [0.5, 1.0]
    (issued,) = [e for e in await log_of(log) if isinstance(e, RetryIssued)]
    assert not issued.found_existing and await log.pending_requests(0, 10) == []


async def test_oom_bumps_then_bumped_again_then_cap(log: EventLog, gitlab: FakeGitLab) -> None:
    for i in range(60):  # 61 jobs x 5 % = 3 retries: the budget is not what stops it
        await log.append(STREAM, [job(1000 + i, f"other-{i}")])
    h = handler(log, gitlab)
    sizes = []
    for job_id in (500, 501, 502):
        rec = await seed(log, gitlab, job(job_id), verdict(job_id, "build", "oom"))
        d = await h.handle_verdict(rec)
        sizes.append(d)
    first, second, third = sizes
    assert isinstance(first, RetryRequested) and first.resources == Resources(
        memory_request_mb=4096, memory_limit_mb=4096
    )
    assert isinstance(second, RetryRequested) and second.resources is not None
    assert second.resources.memory_limit_mb == 8192
    assert isinstance(third, RetrySkipped) and third.reason == "resource_cap_reached"
    posts = gitlab.posts("/pipeline")
    assert len(posts) == 2
    mem = [{v["key"]: v["value"] for v in p.body["variables"]}["KUBERNETES_MEMORY_LIMIT"]
           for p in posts]
    assert mem == ["4096Mi", "8192Mi"]


async def test_scheduled_retry_survives_restart_and_runs_once_when_due(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "infra_network"))
    d = await handler(log, gitlab).handle_verdict(rec)
    assert isinstance(d, RetryRequested) and d.not_before == NOW + dt.timedelta(seconds=30)
    assert gitlab.posts() == []
    # A different replica, after a restart, before and after the due time.
    later = handler(log, gitlab)
    assert await later.run_due(NOW + dt.timedelta(seconds=10)) == 0
    assert gitlab.posts() == []
    due = NOW + dt.timedelta(seconds=31)
    results = await asyncio.gather(*(handler(log, gitlab).run_due(due) for _ in range(3)))
    assert len(gitlab.posts()) == 1 and sum(results) >= 1
    assert isinstance((await log_of(log))[-1], RetryIssued)
    assert await later.run_due(due) == 0


async def test_dry_run_records_decision_without_calling(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    d = await handler(log, gitlab, policy(default="dry_run = true")).handle_verdict(rec)
    assert isinstance(d, RetryRequested) and d.dry_run
    assert gitlab.calls == []
    events = await log_of(log)
    assert isinstance(events[-1], RetrySkipped) and events[-1].reason == "dry_run"
    assert await handler(log, gitlab).run_due(NOW) == 0 and gitlab.calls == []


async def test_transient_failure_is_retried_by_run_due_then_given_up(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [503] * 100
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    h = handler(log, gitlab, max_failures=2, failure_backoff_s=60)
    await h.handle_verdict(rec)
    failed = (await log_of(log))[-1]
    assert isinstance(failed, RetryFailed) and failed.will_retry and failed.status == 503
    # Backoff not elapsed (the failure is stamped with the real clock, far after NOW).
    assert await h.run_due(NOW) == 0
    future = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    assert await h.run_due(future) == 1
    last = (await log_of(log))[-1]
    assert isinstance(last, RetryFailed) and not last.will_retry
    assert await h.run_due(future + dt.timedelta(days=1)) == 0
    assert len(gitlab.posts()) == 2 * FAST.max_attempts


async def test_redelivered_verdict_after_a_failed_call_leaves_the_retry_to_run_due(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [503] * 100
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    h = handler(log, gitlab, max_failures=3, failure_backoff_s=60)
    await h.handle_verdict(rec)
    calls = len(gitlab.posts())
    # The verdict comes again (its ack was lost): the decision stands, and the provider is not
    # called again before the failure backoff is over.
    again = await handler(log, gitlab, max_failures=3, failure_backoff_s=60).handle_verdict(rec)
    assert isinstance(again, RetryRequested)
    assert len(gitlab.posts()) == calls
    failures = [e for e in await log_of(log) if isinstance(e, RetryFailed)]
    assert len(failures) == 1 and failures[0].will_retry


@pytest.mark.parametrize(("status", "again"), [(403, True), (400, True), (404, False)])
async def test_check_before_acting_fails_closed(
    log: EventLog, gitlab: FakeGitLab, status: int, again: bool
) -> None:
    """A listing that does not answer 200 means "not now" (or, for a 404, "never"): calling
    without knowing whether the job was already retried could retry it twice."""
    gitlab.fail[("GET", "/api/v4/projects/42/pipelines/900/jobs")] = [status]
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    await handler(log, gitlab).handle_verdict(rec)
    assert gitlab.posts() == []
    failed = (await log_of(log))[-1]
    assert isinstance(failed, RetryFailed) and failed.status == status
    assert failed.will_retry is again and "check before acting failed" in failed.detail


async def test_a_rerun_pipeline_whose_hooks_are_late_is_found_at_the_provider(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    """act created pipeline P2; its job fails before any of P2's hooks told ingest where P2 came
    from. act asks GitLab once, records the link, and spends the chain's budget, not a fresh
    one."""
    h = handler(log, gitlab)
    first = await h.handle_verdict(
        await seed(log, gitlab, job(500), verdict(500, "build", "oom"))
    )
    assert isinstance(first, RetryRequested) and first.resources is not None
    (created,) = [p for p in gitlab.pipelines.values() if p["source"] == "api"]
    p2 = str(created["id"])
    rerun = job(600, pipeline_id=p2)
    gitlab.add_job(600, "build", int(p2))
    (jf,) = await log.append(pipeline_stream("gitlab", PROJECT, p2), [rerun])
    v = verdict(600, "build", "oom", pipeline_id=p2, job_event_id=jf.event_id)
    (rec,) = await log.append(job_stream("gitlab", PROJECT, "600"), [v])

    second = await handler(log, gitlab).handle_verdict(rec)
    assert isinstance(second, RetryRequested)
    assert second.origin_pipeline_id == PIPELINE and second.snapshot.job_attempts == 1
    assert second.resources is not None and second.resources.memory_limit_mb == 8192
    lookups = [c for c in gitlab.calls if c.path.endswith(f"/pipelines/{p2}/variables")]
    assert len(lookups) == 1
    links = [e.data for e in await log.read_stream(pipeline_stream("gitlab", PROJECT, p2))
             if isinstance(e.data, PipelineLinked)]  # fmt: skip
    assert [link.retry_of for link in links] == [first.idempotency_key]
    # The decision is in the origin's stream, with the first one.
    requests = [e for e in await log_of(log) if isinstance(e, RetryRequested)]
    assert [r.job_id for r in requests] == ["500", "600"]


async def test_no_decision_while_the_provider_cannot_say_where_a_pipeline_came_from(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    gitlab.fail[("GET", "/api/v4/projects/42/pipelines/900/variables")] = [503] * 10
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    with pytest.raises(DependencyUnavailable):
        await handler(log, gitlab).handle_verdict(rec)
    assert gitlab.posts() == []
    assert [type(e) for e in await log_of(log)] == [JobFinished]
    # Once GitLab answers (pipeline 900 was pushed, not created by act), the decision is made.
    gitlab.fail.clear()
    d = await handler(log, gitlab).handle_verdict(rec)
    assert isinstance(d, RetryRequested) and d.origin_pipeline_id is None
    assert len(gitlab.posts("/retry")) == 1


async def test_no_new_pipeline_for_a_commit_the_branch_moved_past(
    log: EventLog, gitlab: FakeGitLab, caplog: pytest.LogCaptureFixture
) -> None:
    gitlab.heads["main"] = "fedcba987654"  # someone pushed since the job failed
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "oom"))
    with caplog.at_level("INFO", logger="ciretry.act.service"):
        d = await handler(log, gitlab).handle_verdict(rec)
    assert isinstance(d, RetrySkipped) and d.reason == "superseded"
    assert "main moved past the failed commit abc123" in d.detail
    assert gitlab.posts() == []
    (line,) = [r for r in caplog.records if "not retrying job 500" in r.getMessage()]
    assert line.fields["reason"] == "superseded" and line.fields["job_retries"] == "0/3"  # type: ignore[attr-defined]


async def test_every_decision_and_provider_call_is_one_log_line(
    log: EventLog, gitlab: FakeGitLab, caplog: pytest.LogCaptureFixture
) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [404]
    ok = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    gone = await seed(log, gitlab, job(501, "test"), verdict(501, "test", "preempted"))
    with caplog.at_level("INFO", logger="ciretry.act.service"):
        await handler(log, gitlab).handle_verdict(gone)
        await handler(log, gitlab).handle_verdict(ok)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "act: retry_job job 501 (test) of 42: preempted") in lines
    (failed,) = [m for lvl, m in lines if lvl == "WARNING" and "job 501 failed (HTTP 404)" in m]
    assert '"injected"' in failed  # the provider's own message
    issued = [m for lvl, m in lines if lvl == "INFO" and "retry_job for job 500 issued" in m]
    assert len(issued) == 1
    assert all("tok" not in m for _, m in lines)  # the provider token is never logged


async def test_a_provider_that_does_not_answer_is_not_asked_again_at_once(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    """While GitLab is away, verdicts waiting for a lookup come back again and again (the bus
    redelivers them): the breaker asks once per period, not once per delivery."""
    gitlab.fail[("GET", "/api/v4/projects/42/pipelines/900/variables")] = [503] * 100
    rec = await seed(log, gitlab, job(500), verdict(500, "build", "preempted"))
    h = handler(log, gitlab)
    for _ in range(5):
        with pytest.raises(DependencyUnavailable):
            await h.handle_verdict(rec)
    lookups = [c for c in gitlab.calls if c.path.endswith("/variables")]
    assert len(lookups) == 1
    assert gitlab.posts() == []
