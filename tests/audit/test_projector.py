"""The projector against the real database: exactly-once, resume, rebuild, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciretry.audit.projector import Projector, rebuild_projections
from ciretry.audit.store import READ_MODEL_TABLES, AuditStore, ProjectionTx
from ciretry.common.events import JobFinished, MessageRejected, pipeline_stream
from ciretry.common.eventstore import EventStore

from .helpers import seed


async def dump(store: EventStore) -> dict[str, list[tuple[Any, ...]]]:
    """Every read-model row, minus columns that depend on batch boundaries only."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with store.connection() as conn:
        for table in READ_MODEL_TABLES:
            rows = await conn.fetch(f"SELECT * FROM {table}")
            out[table] = sorted((tuple(r) for r in rows), key=repr)
    return out


async def test_small_batches_give_the_same_read_models_as_one_big_batch(
    store: EventStore,
) -> None:
    await seed(store)
    total = await store.last_position()
    n = await Projector(AuditStore(store), batch_size=3).catch_up()
    assert n == total
    small = await dump(store)
    assert small["audit_jobs"] and small["audit_stats"] and small["audit_retries"]
    assert await rebuild_projections(AuditStore(store)) == total
    assert await dump(store) == small


async def test_a_crash_mid_batch_applies_nothing_and_the_restart_resumes(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(store)
    p = Projector(AuditStore(store), batch_size=4)
    assert await p.step() == 4
    before = await dump(store)
    real = ProjectionTx.apply

    async def crash(tx: ProjectionTx, batch: Any) -> None:
        await real(tx, batch)  # the changes are written, then the connection "dies"
        raise ConnectionResetError("crash before commit")

    monkeypatch.setattr(ProjectionTx, "apply", crash)
    with pytest.raises(ConnectionResetError):
        await p.step()
    assert await p.position() == 4
    assert await dump(store) == before  # rolled back with the position
    monkeypatch.setattr(ProjectionTx, "apply", real)
    await Projector(AuditStore(store), batch_size=4).catch_up()  # a new process resumes at 4
    resumed = await dump(store)
    await rebuild_projections(AuditStore(store))
    assert await dump(store) == resumed


async def test_replaying_an_already_applied_range_is_a_no_op(store: EventStore) -> None:
    await seed(store)
    p = Projector(AuditStore(store))
    await p.catch_up()
    once = await dump(store)
    assert await p.catch_up() == 0
    assert await dump(store) == once


async def test_two_projectors_at_once_apply_each_event_once(store: EventStore) -> None:
    await seed(store)
    await asyncio.gather(
        Projector(AuditStore(store), batch_size=2).catch_up(), Projector(AuditStore(store), batch_size=3).catch_up()
    )
    both = await dump(store)
    await rebuild_projections(AuditStore(store))
    assert await dump(store) == both


async def test_run_follows_new_events_until_stopped(store: EventStore) -> None:
    stop = asyncio.Event()
    p = Projector(AuditStore(store), idle_interval=0.05)
    task = asyncio.create_task(p.run(stop))
    await seed(store)
    last = await store.last_position()
    # Wait on the projector's own progress (bounded), not on a fixed sleep.
    for _ in range(200):
        if await p.position() == last:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert await p.position() == last


async def test_rebuild_truncates_read_models_not_the_log(store: EventStore) -> None:
    await seed(store)
    await Projector(AuditStore(store)).catch_up()
    async with store.connection() as conn:
        await conn.execute("INSERT INTO audit_stats VALUES ('jobs', now(), 'x', 'x', 'x', 99)")
    events = await store.last_position()
    assert await rebuild_projections(AuditStore(store)) == events
    async with store.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_stats WHERE source = 'x'") == 0
        assert await conn.fetchval("SELECT count(*) FROM events") == events


async def test_retry_outcome_settles_whichever_comes_first(store: EventStore) -> None:
    """The next attempt's JobFinished projected before the request (same batch or earlier)
    and after it both settle the retry, and the outcome is counted once."""
    await seed(store)
    for batch in (1, 5000):
        await rebuild_projections(AuditStore(store))
        await Projector(AuditStore(store), batch_size=batch).catch_up()
        async with store.connection() as conn:
            rows = await conn.fetch(
                "SELECT job_id, outcome, outcome_job_id FROM audit_retries ORDER BY job_id"
            )
            counted = await conn.fetch(
                "SELECT key, sum(n) FROM audit_stats WHERE kind = 'retry_outcome' "
                "GROUP BY key ORDER BY key"
            )
        assert [tuple(r) for r in rows] == [
            ("1977", "failed", "1978"), ("289782451", "passed", "289782452")
        ]  # fmt: skip
        assert [tuple(r) for r in counted] == [("failed", 1), ("passed", 1)]


# --- one bad event never stalls the read models ----------------------------------------------


def _job(job_id: str, **text: Any) -> JobFinished:
    fields: dict[str, Any] = {"job_name": "build", "runner": "r1", "ref": "main"} | text
    return JobFinished(
        source="github", project="o/r", pipeline_id="7", job_id=job_id, status="failed", **fields
    )


async def _rejections(store: EventStore) -> list[MessageRejected]:
    events = await store.read_stream("rejected-projector-audit")
    return [e.data for e in events if isinstance(e.data, MessageRejected)]


async def test_a_poison_event_is_recorded_and_skipped_and_the_rest_goes_on(
    store: EventStore,
) -> None:
    """A workflow_job whose name, runner and branch hold U+0000, stored before ingest made text
    safe: PostgreSQL refuses it in every text column. The events before and after it, in the
    same batch, are projected; it is recorded as MessageRejected once, and skipped."""
    await seed(store)
    stream = pipeline_stream("github", "o/r", "7")
    [bad] = await store.append(
        stream, [_job("66", job_name="lint\x00", runner="run\x00ner", ref="ma\x00in")]
    )
    [after] = await store.append(stream, [_job("67", job_name="after the poison")])
    p = Projector(AuditStore(store))
    await p.catch_up()

    rejected = await _rejections(store)
    assert [(r.consumer, r.message_id) for r in rejected] == [
        ("projector-audit", str(bad.event_id))
    ]
    assert "CharacterNotInRepertoireError" in rejected[0].reason
    assert await p.position() >= after.position  # past the poison: not stuck on it
    async with store.connection() as conn:
        projected = {
            r[0]: r[1]
            for r in await conn.fetch(
                "SELECT job_id, job_name FROM audit_jobs WHERE project = 'o/r'"
            )
        }
        seeded_jobs = await conn.fetchval("SELECT count(*) FROM audit_jobs WHERE project <> 'o/r'")
    assert projected == {"67": "after the poison"}
    assert seeded_jobs > 0  # the events of the same batch before the poison

    # A later event keeps flowing, and a rebuild records the rejection once, not twice.
    await store.append(stream, [_job("68", job_name="later still")])
    await p.catch_up()
    once = await dump(store)
    assert ("github", "o/r", "68") in {(r[0], r[1], r[2]) for r in once["audit_jobs"]}
    await rebuild_projections(AuditStore(store))
    assert await dump(store) == once
    assert len(await _rejections(store)) == 1


async def test_a_bad_event_in_a_small_batch_and_in_a_big_one_gives_the_same_read_models(
    store: EventStore,
) -> None:
    await seed(store)
    stream = pipeline_stream("github", "o/r", "7")
    await store.append(stream, [_job("66", runner_tags=("x\x00",), runner="\x00")])
    await store.append(stream, [_job("67")])
    await Projector(AuditStore(store), batch_size=2).catch_up()
    small = await dump(store)
    await rebuild_projections(AuditStore(store))
    assert await dump(store) == small
    assert len(await _rejections(store)) == 1


async def test_a_transient_error_is_not_mistaken_for_a_poison_event(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that goes away mid-batch is waited out: nothing is rejected or skipped."""
    await seed(store)
    real = ProjectionTx.apply
    calls = 0

    async def flaky(tx: ProjectionTx, batch: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("database went away")
        await real(tx, batch)

    monkeypatch.setattr(ProjectionTx, "apply", flaky)
    p = Projector(AuditStore(store))
    with pytest.raises(ConnectionResetError):
        await p.step()
    assert await p.position() == 0
    await p.catch_up()
    assert await p.position() == await store.last_position()
    assert await _rejections(store) == []
