"""The projector against the real database: exactly-once, resume, rebuild, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciretry.audit import projector as projector_module
from ciretry.audit.projector import READ_MODEL_TABLES, Projector, rebuild_projections
from ciretry.common.eventstore import EventStore

from .helpers import seed


async def dump(store: EventStore) -> dict[str, list[tuple[Any, ...]]]:
    """Every read-model row, minus columns that depend on batch boundaries only."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with store.pool.acquire() as conn:
        for table in READ_MODEL_TABLES:
            rows = await conn.fetch(f"SELECT * FROM {table}")
            out[table] = sorted((tuple(r) for r in rows), key=repr)
    return out


async def test_small_batches_give_the_same_read_models_as_one_big_batch(
    store: EventStore,
) -> None:
    await seed(store)
    total = await store.last_position()
    n = await Projector(store, batch_size=3).catch_up()
    assert n == total
    small = await dump(store)
    assert small["audit_jobs"] and small["audit_stats"] and small["audit_retries"]
    assert await rebuild_projections(store) == total
    assert await dump(store) == small


async def test_a_crash_mid_batch_applies_nothing_and_the_restart_resumes(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(store)
    p = Projector(store, batch_size=4)
    assert await p.step() == 4
    before = await dump(store)
    real = projector_module.apply_batch

    async def crash(conn: Any, batch: Any) -> None:
        await real(conn, batch)  # the changes are written, then the process "dies"
        raise RuntimeError("crash before commit")

    monkeypatch.setattr(projector_module, "apply_batch", crash)
    with pytest.raises(RuntimeError):
        await p.step()
    assert await p.position() == 4
    assert await dump(store) == before  # rolled back with the position
    monkeypatch.setattr(projector_module, "apply_batch", real)
    await Projector(store, batch_size=4).catch_up()  # a new process resumes at 4
    resumed = await dump(store)
    await rebuild_projections(store)
    assert await dump(store) == resumed


async def test_replaying_an_already_applied_range_is_a_no_op(store: EventStore) -> None:
    await seed(store)
    p = Projector(store)
    await p.catch_up()
    once = await dump(store)
    assert await p.catch_up() == 0
    assert await dump(store) == once


async def test_two_projectors_at_once_apply_each_event_once(store: EventStore) -> None:
    await seed(store)
    await asyncio.gather(
        Projector(store, batch_size=2).catch_up(), Projector(store, batch_size=3).catch_up()
    )
    both = await dump(store)
    await rebuild_projections(store)
    assert await dump(store) == both


async def test_run_follows_new_events_until_stopped(store: EventStore) -> None:
    stop = asyncio.Event()
    p = Projector(store, idle_interval=0.05)
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
    await Projector(store).catch_up()
    async with store.pool.acquire() as conn:
        await conn.execute("INSERT INTO audit_stats VALUES ('jobs', now(), 'x', 'x', 'x', 99)")
    events = await store.last_position()
    assert await rebuild_projections(store) == events
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_stats WHERE source = 'x'") == 0
        assert await conn.fetchval("SELECT count(*) FROM events") == events


async def test_retry_outcome_settles_whichever_comes_first(store: EventStore) -> None:
    """The next attempt's JobFinished projected before the request (same batch or earlier)
    and after it both settle the retry, and the outcome is counted once."""
    await seed(store)
    for batch in (1, 5000):
        await rebuild_projections(store)
        await Projector(store, batch_size=batch).catch_up()
        async with store.pool.acquire() as conn:
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
