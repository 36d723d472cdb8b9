"""The retry-storm breaker in act, on each event log (PostgreSQL and in memory), with two act
replicas and a fake GitLab, driven by an injected clock: a storm across pipelines parks their
retries without spending budget and records one incident; once the signature has been quiet,
each parked job is retried exactly once, spread over the jitter; replay rebuilds it all."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections import Counter
from typing import Any

import msgspec
import pytest

from ciretry.act import cli as act_cli
from ciretry.act.executors import GitLabExecutor, HttpSettings
from ciretry.act.policy import Policy, PolicyError, parse_policy
from ciretry.act.replay import replay
from ciretry.act.service import ActHandler, build
from ciretry.act.storms import DETECT_TYPES, StormWatch, verify_storms
from ciretry.common.config import Config
from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    FailureSignature,
    NewEvent,
    RecordedEvent,
    RetryIssued,
    RetryParked,
    RetryRequested,
    StormEnded,
    StormStarted,
    job_stream,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore
from tests.support.providers import FakeGitLab

from .helpers import PROJECT, job, verdict

FAST = HttpSettings(timeout_s=2.0, max_attempts=2, backoff_base_s=0.01, backoff_cap_s=0.02)
QUIET, JITTER = 60.0, 30.0
SIGNATURE = FailureSignature(id="sig-v1:0123abcd", algorithm="sig-v1",
                             text="error pulling image: <n> service unavailable",
                             examples=("error pulling image: 503 service unavailable",))  # fmt: skip


def storm_policy(mode: str = "park") -> Policy:
    return parse_policy(
        f"""
version = 1
[default.attempts]
system = 3
[default.pipeline]
floor = 2
[storm]
mode = "{mode}"
pipelines = 3
window_s = 300
quiet_s = {QUIET}
jitter_s = {JITTER}
"""
    )


class Clock:
    """The replicas' clock, moved by the test (starts at the wall clock: the log stamps events
    with its own, and a storm's quiet is measured from them)."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
async def gitlab() -> Any:
    fake = FakeGitLab()
    yield fake
    await fake.close()


def replica(store: EventLog, fake: FakeGitLab, clock: Clock, policy: Policy) -> ActHandler:
    async def nosleep(_: float) -> None:
        return None

    ex = GitLabExecutor(fake.url, "tok", settings=FAST, sleep=nosleep, transport=fake.transport())
    return build(store, None, Config(), policy=policy, executors={"gitlab": ex}, clock=clock)


async def failure(store: EventLog, fake: FakeGitLab, pipeline: int) -> RecordedEvent:
    """One failed job in its own pipeline, with the storm's signature, and its verdict."""
    job_id = pipeline * 10
    fake.add_job(job_id, "build", pipeline)
    (jf,) = await store.append(pipeline_stream("gitlab", PROJECT, str(pipeline)),
                               [job(job_id, pipeline_id=str(pipeline))])  # fmt: skip
    v = verdict(job_id, "build", "preempted", pipeline_id=str(pipeline), signature=SIGNATURE,
                job_event_id=jf.event_id)  # fmt: skip
    (rec,) = await store.append(job_stream("gitlab", PROJECT, str(job_id)), [v])
    return rec


def retried_jobs(fake: FakeGitLab) -> Counter[str]:
    return Counter(
        m.group(1) for c in fake.posts() if (m := re.search(r"/jobs/(\d+)/retry$", c.path))
    )


async def of_type(store: EventLog, kind: type) -> list[Any]:
    return [e.data async for e in store.read_all(0, types=(kind.__name__,))]


async def test_a_storm_parks_without_budget_and_retries_each_parked_job_once_after_quiet(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    clock = Clock()
    policy = storm_policy()
    a, b = replica(log, gitlab, clock, policy), replica(log, gitlab, clock, policy)
    # Pipeline 1 fails first and is retried as usual: no storm yet.
    first = await failure(log, gitlab, 1)
    assert isinstance(await a.handle_verdict(first), RetryRequested)
    assert retried_jobs(gitlab) == {"10": 1}
    # The same failure in six more pipelines at once; both followers read the log.
    verdicts = [await failure(log, gitlab, p) for p in range(2, 8)]
    await asyncio.gather(a.storms.tick(), b.storms.tick())
    (started,) = await of_type(log, StormStarted)
    assert started.signature == SIGNATURE.id and started.threshold == 3
    assert started.pipeline_count == 3 and started.mode == "park"  # opened at the threshold
    # The two replicas decide the verdicts between them: every one parked, none spends budget.
    decided = await asyncio.gather(*(
        (a if i % 2 else b).handle_verdict(rec) for i, rec in enumerate(verdicts)
    ))  # fmt: skip
    assert all(isinstance(d, RetryParked) and d.storm_id == started.storm_id for d in decided)
    assert len(await of_type(log, RetryParked)) == 6
    assert len(await of_type(log, RetryRequested)) == 1 and retried_jobs(gitlab) == {"10": 1}
    chain = await a.chains.load("gitlab", PROJECT, "2")
    assert chain.state.retries_requested == 0 and chain.state.decided_verdicts == set()
    # Redelivered while the storm is on: parked it stays, nothing appended, nothing called.
    before = await log.last_position()
    assert isinstance(await b.handle_verdict(verdicts[0]), RetryParked)
    assert await log.last_position() == before
    # Not quiet long enough: the storm goes on.
    last_seen = max([r.recorded_at for r in [first, *verdicts]])
    clock.now = last_seen + dt.timedelta(seconds=QUIET - 1)
    await asyncio.gather(a.storms.tick(), b.storms.tick())
    assert await of_type(log, StormEnded) == [] and retried_jobs(gitlab) == {"10": 1}
    # Quiet: one end, and each parked job decided again once, jittered.
    clock.now = last_seen + dt.timedelta(seconds=QUIET + 1)
    ended_at = clock.now
    released = await asyncio.gather(a.storms.tick(), b.storms.tick())
    assert sum(released) == 6
    (ended,) = await of_type(log, StormEnded)
    assert ended.storm_id == started.storm_id and ended.reason == "quiet"
    assert ended.parked_count == 6 and ended.pipeline_count == 7
    requests = [r for r in await of_type(log, RetryRequested) if r.job_id != "10"]
    assert sorted(r.job_id for r in requests) == [str(p * 10) for p in range(2, 8)]
    waits = [r.not_before - ended_at for r in requests if r.not_before is not None]
    assert len(waits) == 6 and all(dt.timedelta(0) < w < dt.timedelta(seconds=JITTER) for w in waits)
    assert len(set(waits)) == 6  # spread, not all at once
    # Each budget is spent now, once: one retry of one job in each pipeline.
    assert all(r.snapshot.pipeline_retries == 0 for r in requests)
    # When the jitter has passed, both replicas run what is due: each parked job once.
    clock.now = ended_at + dt.timedelta(seconds=JITTER)
    await asyncio.gather(a.run_due(), b.run_due())
    assert retried_jobs(gitlab) == {str(p * 10): 1 for p in range(1, 8)}
    assert len(await of_type(log, RetryIssued)) == 7
    # Nothing more to do, on either replica, however often asked.
    assert await a.storms.tick() == 0 and await b.storms.tick() == 0
    await asyncio.gather(a.run_due(), b.run_due())
    for rec in verdicts:
        assert isinstance(await a.handle_verdict(rec), RetryRequested)
    assert retried_jobs(gitlab) == {str(p * 10): 1 for p in range(1, 8)}
    # Replay: budgets within limits; the storm record is what the fold says; a new replica's
    # fold of the log knows the storm ended and has nothing to release.
    report = await replay(log)
    assert report.violations == [] and report.requests == 7 and report.pending == 0
    events = [e async for e in log.read_all(0, types=DETECT_TYPES)]
    check = verify_storms(events, policy.storm)
    assert check.ok and (check.started, check.ended, check.parked) == (1, 1, 6)
    fresh = StormWatch(policy.storm)
    for e in events:
        fresh.fold(e)
    assert fresh.open == {} and fresh.releasable() == [] and fresh.has_ended(started.storm_id)
    for ex in (a.executors, b.executors):
        await ex.close()


async def test_watch_mode_records_the_storm_and_retries_as_usual(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    clock = Clock()
    a = replica(log, gitlab, clock, storm_policy("watch"))
    verdicts = [await failure(log, gitlab, p) for p in range(1, 5)]
    await a.storms.tick()
    (started,) = await of_type(log, StormStarted)
    assert started.mode == "watch"
    for rec in verdicts:
        assert isinstance(await a.handle_verdict(rec), RetryRequested)
    assert retried_jobs(gitlab) == {str(p * 10): 1 for p in range(1, 5)}
    assert await of_type(log, RetryParked) == []
    await a.executors.close()


async def test_switching_the_breaker_off_ends_open_storms_and_releases_their_jobs(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    clock = Clock()
    on = replica(log, gitlab, clock, storm_policy())
    verdicts = [await failure(log, gitlab, p) for p in range(1, 4)]
    await on.storms.tick()
    for rec in verdicts:
        assert isinstance(await on.handle_verdict(rec), RetryParked)
    # A restart with the breaker off: the storm ends at once and its jobs are decided again.
    off = replica(log, gitlab, clock, storm_policy("off"))
    assert await off.storms.tick() == 3
    (ended,) = await of_type(log, StormEnded)
    assert ended.reason == "breaker_off"
    clock.now += dt.timedelta(seconds=JITTER)
    await off.run_due()
    assert retried_jobs(gitlab) == {"10": 1, "20": 1, "30": 1}
    assert await off.storms.tick() == 0
    for ex in (on.executors, off.executors):
        await ex.close()


def test_storm_policy_is_validated() -> None:
    with pytest.raises(PolicyError, match="storm.pipelines"):
        parse_policy('version = 1\n[storm]\npipelines = 1\n')
    with pytest.raises(PolicyError, match="storm.mode"):
        parse_policy('version = 1\n[storm]\nmode = "loud"\n')
    with pytest.raises(PolicyError, match="storm.quiet_s"):
        parse_policy('version = 1\n[storm]\nquiet_s = -1\n')
    assert parse_policy("version = 1\n").storm.mode == "off"
    assert msgspec.structs.asdict(storm_policy().storm)["quiet_s"] == QUIET


async def test_ciretry_replay_prints_the_storms_and_verifies_them(
    store: EventStore, pg_dsn: str, gitlab: FakeGitLab, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Any,
) -> None:  # fmt: skip
    a = replica(store, gitlab, Clock(), storm_policy())
    for p in range(1, 4):
        assert isinstance(await a.handle_verdict(await failure(store, gitlab, p)), RetryRequested)
    await a.storms.tick()
    await a.executors.close()
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(f'version = 1\n[storm]\nmode = "park"\nquiet_s = {QUIET}\n')
    monkeypatch.setenv("CIRETRY_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CIRETRY_DATABASE_SCHEMA", store.schema)
    monkeypatch.setenv("CIRETRY_POLICY_PATH", str(policy_path))
    monkeypatch.setenv("COLUMNS", "200")
    # Opened at 3 pipelines; today's policy says 10: the storm stands on its own numbers.
    assert await asyncio.to_thread(act_cli.main, ["replay", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "retry storms (rebuilt from the log)" in out and "storms recorded" in out
    forged = StormStarted(storm_id="storm:sig-v1:made-up:1", signature="sig-v1:made-up",
                          category="infra_network", threshold=3, window_s=300.0)  # fmt: skip
    await store.append_batch([NewEvent(stream="storm-sig-v1:made-up", data=forged)])
    assert await asyncio.to_thread(act_cli.main, ["replay", "--verify"]) == 1
    assert "not backed" in capsys.readouterr().out
