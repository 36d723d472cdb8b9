"""Replay: budgets rebuilt from the log; over-budget decisions are found.

``replay`` (what ``ciretry replay`` runs) reads bodies per stream and checks in stream order;
``verify`` over the whole log in position order is the reference it must agree with, on both
event logs, for chains of one stream and of several."""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid

import asyncpg
import pytest

from ciretry.act import cli
from ciretry.act.budget import fold_budget
from ciretry.act.replay import ReplayReport, check_stream, replay, verify
from ciretry.act.slim import decode_bodies
from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    JobFinished,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    encode,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore

from .helpers import PIPELINE, PROJECT, job, verdict

STREAM = pipeline_stream("gitlab", PROJECT, PIPELINE)


def req(job_id: str, name: str, limit: int, job_limit: int = 3, **kw: object) -> RetryRequested:
    fields: dict[str, object] = {
        "source": "gitlab", "project": PROJECT, "pipeline_id": PIPELINE, "job_id": job_id,
        "job_name": name, "action": "retry_job",
        "idempotency_key": f"act:gitlab:{PROJECT}:{job_id}:retry_job",
        "category": "preempted", "budget": "system",
        "snapshot": BudgetSnapshot(pipeline_limit=limit, job_limit=job_limit),
    }  # fmt: skip
    fields.update(kw)
    return RetryRequested(**fields)  # type: ignore[arg-type]


async def test_replay_finds_over_budget_and_rebuilds_the_budget(log: EventLog) -> None:
    events = [job(1, "a"), job(2, "b"), job(3, "c"),
              req("1", "a", 2), req("2", "b", 2), req("3", "c", 2),  # third exceeds limit 2
              job(4, "a"), req("4", "a", 5, job_limit=1)]  # a's second retry, job limit 1
    recorded = await log.append(STREAM, events)
    report = await replay(log)
    assert report.requests == 4 and report.pipelines == 1 and report.multi_stream_chains == 0
    assert [v.key.split(":")[3] for v in report.violations] == ["3", "4"]
    assert [v.position for v in report.violations] == [recorded[5].position, recorded[7].position]
    assert all(v.stream == STREAM for v in report.violations)
    assert "limit 2" in report.violations[0].why and "job a" in report.violations[1].why
    slow = fold_budget(await log.read_stream(STREAM))
    fast = report.states[STREAM]
    assert fast.retries_requested == slow.retries_requested == 4
    assert fast.job_names == slow.job_names and set(fast.requests) == set(slow.requests)
    assert fast.events == slow.events == report.events == len(events)


async def test_replay_of_one_stream_checks_it_on_its_own(log: EventLog) -> None:
    other = pipeline_stream("gitlab", PROJECT, "901")
    await log.append(other, [job(7, "x", pipeline_id="901"), req("7", "x", 0, pipeline_id="901")])
    await log.append(STREAM, [job(1, "a"), req("1", "a", 1), job(2, "a"), req("2", "a", 1)])
    report = await replay(log, STREAM)
    assert report.pipelines == 1 and report.requests == 2
    assert [v.key.split(":")[3] for v in report.violations] == ["2"]
    everything = await replay(log)
    assert sorted(v.key.split(":")[3] for v in everything.violations) == ["2", "7"]


def test_check_stream_counts_a_repeated_request_once() -> None:
    """A request stored twice (the same key) is folded and checked once, as ``verify`` does."""
    events: list[Event] = [job(1, "a"), req("1", "a", 1), req("1", "a", 1), job(2, "a"),
                           req("2", "a", 5, job_limit=1)]  # fmt: skip
    views = decode_bodies([encode(e) for e in events])
    checked = check_stream(views)
    assert checked.requests == 2 and checked.state.retries_requested == 2
    assert [key.split(":")[3] for key, _ in checked.violations] == ["2"]


# --- the fast path against the reference, on logs with chains of several streams ---------------


def _pid(n: int) -> str:
    return str(1000 + n)


def random_log(seed: int) -> list[tuple[str, Event]]:
    """Pipelines of jobs, decisions (some over budget, some repeated) and outcomes, appended in
    an interleaving across streams; some chains grow reruns (new pipelines whose jobs the
    origin's later decisions name), and job streams hold verdicts the fold must ignore."""
    rng = random.Random(seed)
    out: list[tuple[str, Event]] = []
    chains: list[list[str]] = [[_pid(i)] for i in range(12)]
    next_pipeline = 100
    next_job = 1
    for _ in range(400):
        chain = rng.choice(chains)
        origin = chain[0]
        pipeline = rng.choice(chain)
        roll = rng.random()
        name = f"job-{rng.randrange(4)}"
        if roll < 0.45 or next_job < 5:
            jid = next_job
            next_job += 1
            status = "success" if rng.random() < 0.15 else "failed"
            out.append((pipeline, job(jid, name, pipeline_id=pipeline, status=status)))
            out.append(("job", verdict(jid, name, pipeline_id=pipeline)))
            continue
        jid = rng.randrange(1, next_job)
        key = f"act:gitlab:{PROJECT}:{jid}:retry_job"
        if roll < 0.75:
            request = req(
                str(jid), name, rng.randrange(1, 12), rng.randrange(1, 4),
                pipeline_id=pipeline, idempotency_key=key,
                origin_pipeline_id=None if pipeline == origin else origin,
            )  # fmt: skip
            out.append((origin, request))
        elif roll < 0.85:
            rerun = None
            if rng.random() < 0.3:
                rerun = _pid(next_pipeline)
                next_pipeline += 1
                chain.append(rerun)
            out.append((origin, RetryIssued(
                source="gitlab", project=PROJECT, pipeline_id=pipeline, job_id=str(jid),
                idempotency_key=key, new_pipeline_id=rerun,
            )))  # fmt: skip
        elif roll < 0.93:
            out.append((origin, RetrySkipped(
                source="gitlab", project=PROJECT, pipeline_id=pipeline, job_id=str(jid),
                job_name=name, reason="not_retryable", detail="deterministic",
                category="deterministic", snapshot=BudgetSnapshot(),
            )))  # fmt: skip
        else:
            out.append((origin, RetryFailed(
                source="gitlab", project=PROJECT, pipeline_id=pipeline, job_id=str(jid),
                idempotency_key=key, status=502, detail="boom", will_retry=rng.random() < 0.5,
            )))  # fmt: skip
    return out


async def store_log(log: EventLog, events: list[tuple[str, Event]]) -> None:
    for pipeline, data in events:
        stream = "job-stream" if pipeline == "job" else pipeline_stream("gitlab", PROJECT, pipeline)
        await log.append(stream, [data])


async def reference(log: EventLog) -> ReplayReport:
    """What ``ciretry replay`` ran before: every event in position order through ``verify``."""
    return verify([e async for e in log.read_all(batch=97)])


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_replay_agrees_with_verify_in_log_order(log: EventLog, seed: int) -> None:
    await store_log(log, random_log(seed))
    fast, slow = await replay(log), await reference(log)
    assert fast.multi_stream_chains > 0  # the generated log does exercise both paths
    assert len(fast.states) > fast.multi_stream_chains
    assert slow.violations, "the generated log should hold requests over budget"
    assert [(v.stream, v.position, v.key, v.why) for v in fast.violations] == [
        (v.stream, v.position, v.key, v.why) for v in slow.violations
    ]
    for name in ("requests", "skips", "issued", "failed", "pipelines", "pending"):
        assert getattr(fast, name) == getattr(slow, name), name
    assert set(fast.states) == set(slow.states)
    for stream, state in slow.states.items():
        mine = fast.states[stream]
        assert mine.retries_requested == state.retries_requested, stream
        assert set(mine.requests) == set(state.requests), stream
        assert mine.job_names == state.job_names, stream
        assert mine.outcomes == state.outcomes and mine.failing == state.failing, stream
        assert {n: dict(h.attempts) for n, h in mine.jobs.items()} == {
            n: dict(h.attempts) for n, h in state.jobs.items()
        }, stream


async def test_a_rerun_is_checked_against_its_chain_in_log_order(log: EventLog) -> None:
    """The chain of tests/act/test_chains.py's replay test, stored: the request for the job in
    the third pipeline is the chain's third retry of ``build`` (limit two). Its stream alone
    cannot tell; the chain's streams read in position order can."""
    origin = "900"
    r1 = req("10", "build", 50, 2, pipeline_id=origin)
    r2 = req("20", "build", 50, 2, pipeline_id="1000", origin_pipeline_id=origin)
    r3 = req("30", "build", 50, 2, pipeline_id="1001", origin_pipeline_id=origin)
    await store_log(log, [
        (origin, job(10, pipeline_id=origin)),
        (origin, r1),
        (origin, RetryIssued(source="gitlab", project=PROJECT, pipeline_id=origin, job_id="10",
                             idempotency_key=r1.idempotency_key, new_pipeline_id="1000")),
        ("1000", job(20, pipeline_id="1000")),
        (origin, r2),
        ("1001", job(30, pipeline_id="1001")),
        (origin, r3),
        ("555", job(55, pipeline_id="555")),  # a chain of its own
    ])  # fmt: skip
    report = await replay(log)
    assert report.multi_stream_chains == 1 and report.pipelines == 4
    assert set(report.states) == {
        pipeline_stream("gitlab", PROJECT, p) for p in (origin, "555")
    }
    assert [v.key for v in report.violations] == [r3.idempotency_key]
    assert report.violations[0].stream == pipeline_stream("gitlab", PROJECT, origin)
    assert report.requests == 3 and report.issued == 1


# --- the command ------------------------------------------------------------------------------


def test_cli_registers_replay() -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["replay", "--stream", "s", "--verify"])
    assert args.stream == "s" and args.verify and args.func is cli.run


def test_ciretry_replay_verify_exits_1_on_a_violation(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = f"r_{uuid.uuid4().hex[:12]}"

    async def fill(events: list[JobFinished | RetryRequested]) -> None:
        store = await EventStore.connect(pg_dsn, schema, max_size=2)
        try:
            await store.migrate()
            await store.append(STREAM, events)
        finally:
            await store.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    monkeypatch.setenv("CIRETRY_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CIRETRY_DATABASE_SCHEMA", schema)
    try:
        asyncio.run(fill([job(1, "a"), req("1", "a", 1)]))
        assert cli.main(["replay", "--verify"]) == 0
        assert "over budget" in capsys.readouterr().out
        asyncio.run(fill([job(2, "a"), req("2", "a", 1)]))
        assert cli.main(["replay", "--verify"]) == 1
        out = capsys.readouterr().out
        assert "over budget" in out and "act:gitlab:42:2:retry_job" in out
        assert cli.main(["replay"]) == 0  # without --verify: a report, not a verdict
    finally:
        asyncio.run(drop())
