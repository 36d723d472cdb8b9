"""The event log on a real PostgreSQL: append-only, ordered, idempotent, exactly-once tracking."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from ciretry.common.events import JobFinished, Metadata, NewEvent, PipelineFinished
from ciretry.common.eventstore import (
    AlreadyProcessed,
    EventStore,
    Tracking,
    WrongExpectedVersion,
    needs_reset,
)

STREAM = "pipeline-gitlab-42-7"


def job(job_id: str = "1", status: str = "failed") -> JobFinished:
    return JobFinished(
        source="gitlab",
        project="42",
        pipeline_id="7",
        job_id=job_id,
        job_name="build",
        status=status,
    )


def new(job_id: str = "1", key: str | None = None, stream: str = STREAM) -> NewEvent:
    return NewEvent(stream=stream, data=job(job_id), metadata=Metadata(idempotency_key=key))


async def test_append_and_read_stream_in_order(store: EventStore) -> None:
    recorded = await store.append(STREAM, [job("1"), job("2")], expected_version=0)
    assert [r.stream_version for r in recorded] == [1, 2]
    assert recorded[0].position < recorded[1].position
    more = await store.append(STREAM, [job("3")], expected_version=2)
    assert more[0].stream_version == 3
    read = await store.read_stream(STREAM)
    assert [r.data for r in read] == [job("1"), job("2"), job("3")]
    assert read[0].event_id == recorded[0].event_id
    assert await store.stream_version(STREAM) == 3


async def test_wrong_expected_version_is_typed(store: EventStore) -> None:
    await store.append(STREAM, [job("1")], expected_version=0)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append(STREAM, [job("2")], expected_version=0)
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert await store.stream_version(STREAM) == 1


async def test_concurrent_appends_at_same_expected_version_exactly_one_wins(
    store: EventStore,
) -> None:
    await store.append(STREAM, [job("0")], expected_version=0)

    async def attempt(i: int) -> str:
        try:
            await store.append(STREAM, [job(f"racer-{i}")], expected_version=1)
            return "won"
        except WrongExpectedVersion:
            return "lost"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert outcomes.count("won") == 1
    assert outcomes.count("lost") == 7
    assert await store.stream_version(STREAM) == 2


async def test_duplicate_idempotency_key_stores_one_event(store: EventStore) -> None:
    first = await store.append_idempotent(new("1", key="gitlab:uuid-1"))
    second = await store.append_idempotent(new("1", key="gitlab:uuid-1"))
    assert not first.duplicate and second.duplicate
    assert second.event.event_id == first.event.event_id
    assert len(await store.read_stream(STREAM)) == 1


async def test_batch_dedupes_within_itself_and_against_the_log(store: EventStore) -> None:
    await store.append_batch([new("1", key="k1")])
    results = await store.append_batch(
        [new("1", key="k1"), new("2", key="k2"), new("2", key="k2"), new("3", stream="other")]
    )
    assert [r.duplicate for r in results] == [True, False, True, False]
    assert results[1].event.event_id == results[2].event.event_id
    assert [e.stream_version for e in await store.read_stream(STREAM)] == [1, 2]
    assert len(await store.read_stream("other")) == 1


async def test_read_all_is_in_global_order_across_batches(store: EventStore) -> None:
    events = [new(str(i), stream=f"s-{i % 7}") for i in range(250)]
    await store.append_batch(events)
    seen = [e async for e in store.read_all(0, batch=40)]
    assert [e.event_id for e in seen] == [e.event_id for e in events]
    positions = [e.position for e in seen]
    assert positions == sorted(positions)
    tail = [e async for e in store.read_all(seen[199].position, batch=40)]
    assert len(tail) == 50
    only_pipelines = [e async for e in store.read_all(0, types=["PipelineFinished"])]
    assert only_pipelines == []


async def test_every_append_writes_an_outbox_row(store: EventStore) -> None:
    await store.append_batch([new(str(i)) for i in range(5)])
    assert await store.outbox_depth() == 5


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE events SET type = 'x'",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
)
async def test_database_refuses_to_change_the_log(store: EventStore, sql: str) -> None:
    await store.append(STREAM, [job("1")])
    async with store.pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(sql)
    assert len(await store.read_stream(STREAM)) == 1


async def test_a_role_granted_only_select_insert_cannot_update_or_delete(
    store: EventStore, unique: str
) -> None:
    """The privilege layer: even with the trigger gone, a service role could not change events."""
    await store.append(STREAM, [job("1")])
    role = f"ciretry_writer_{unique}"
    async with store.pool.acquire() as conn:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN")
        try:
            await conn.execute(f'GRANT USAGE ON SCHEMA "{store.schema}" TO {role}')
            await conn.execute(f"GRANT SELECT, INSERT ON events TO {role}")
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                assert await conn.fetchval("SELECT count(*) FROM events") == 1
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                    await conn.execute("DELETE FROM events")
        finally:
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")


async def test_tracking_makes_a_second_processing_a_noop(store: EventStore) -> None:
    cause = uuid.uuid4()
    tracking = Tracking("classify", cause)
    await store.append("job-x", [job("1")], tracking=tracking)
    with pytest.raises(AlreadyProcessed):
        await store.append("job-x", [job("1")], tracking=tracking)
    assert len(await store.read_stream("job-x")) == 1
    assert await store.is_processed("classify", cause)
    # Another consumer processing the same event is independent.
    await store.append("job-y", [job("1")], tracking=Tracking("act", cause))


async def test_failed_append_leaves_no_tracking_row(store: EventStore) -> None:
    await store.append(STREAM, [job("1")])
    cause = uuid.uuid4()
    with pytest.raises(WrongExpectedVersion):
        await store.append(STREAM, [job("2")], expected_version=0, tracking=Tracking("act", cause))
    assert not await store.is_processed("act", cause)


async def test_migrate_is_idempotent(store: EventStore) -> None:
    assert await store.migrate() == []


async def test_different_event_types_in_one_stream(store: EventStore) -> None:
    p = PipelineFinished(source="gitlab", project="42", pipeline_id="7", status="failed")
    await store.append(STREAM, [job("1"), p])
    assert [e.type for e in await store.read_stream(STREAM)] == ["JobFinished", "PipelineFinished"]


async def test_a_key_repeated_in_a_batch_after_a_stored_one_resolves_to_the_stored_event(
    store: EventStore,
) -> None:
    (first,) = await store.append_batch([new("1", key="k")])
    results = await store.append_batch([new("2", key="k"), new("3"), new("4", key="k")])
    assert [r.duplicate for r in results] == [True, False, True]
    assert results[0].event == first.event and results[2].event == first.event
    assert results[1].event.stream_version == 2


async def test_expected_versions_of_several_streams_are_checked_together(
    store: EventStore,
) -> None:
    await store.append("a", [job("1")])
    await store.append("b", [job("2"), job("3")])
    events = [NewEvent(stream="a", data=job("4")), NewEvent(stream="b", data=job("5"))]
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append_batch(events, expected={"a": 1, "b": 1})
    assert (info.value.stream, info.value.expected, info.value.actual) == ("b", 1, 2)
    results = await store.append_batch(events, expected={"a": 1, "b": 2})
    assert [r.event.stream_version for r in results] == [2, 3]


async def test_fresh_results_carry_the_stored_body(store: EventStore) -> None:
    from ciretry.common.events import encode

    results = await store.append_batch([new("1", key="k"), new("1", key="k")])
    assert results[0].body == encode(results[0].event.data)
    async with store.pool.acquire() as conn:
        stored = await conn.fetchval("SELECT body FROM events")
    assert stored == results[0].body
    assert results[1].duplicate and results[1].body is None


async def test_outbox_delete(store: EventStore) -> None:
    results = await store.append_batch([new("1"), new("2")])
    await store.outbox_delete([results[0].event.position])
    assert await store.outbox_depth() == 1


async def test_a_connection_released_inside_a_transaction_is_rolled_back(
    pg_dsn: str, schema: str
) -> None:
    """The pool's reset query is skipped (ciretry keeps no session state), but a connection
    given back with a transaction open (a handler that died half-way) is still rolled back:
    nothing it wrote is committed, and the next user does not inherit the transaction."""
    store = await EventStore.connect(pg_dsn, schema, max_size=1)
    try:
        await store.migrate()
        async with store.pool.acquire() as conn:
            await conn.execute("CREATE TABLE scratch (x int)")
        async with store.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()  # never committed
            await conn.execute("INSERT INTO scratch VALUES (1)")
        await store.append(STREAM, [job("1")])  # the same (only) connection, reused
        async with store.pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM scratch") == 0
        assert [e.stream_version for e in await store.read_stream(STREAM)] == [1]
    finally:
        await store.close()


async def test_only_connections_marked_as_needing_it_are_reset(pg_dsn: str, schema: str) -> None:
    store = await EventStore.connect(pg_dsn, schema, max_size=1)
    try:
        async with store.pool.acquire() as conn:
            default = await conn.fetchval("SHOW work_mem")
            await conn.execute("SELECT pg_advisory_lock(4242)")  # a session lock, left held
            needs_reset(conn)
        async with store.pool.acquire() as conn:  # the reset released it
            held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            assert await conn.fetchval(held) == 0
            await conn.execute("SET work_mem = '7MB'")  # not marked: kept (no round trip)
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SHOW work_mem") == "7MB" != default
    finally:
        await store.close()


async def test_large_batches_keep_the_same_guarantees(store: EventStore) -> None:
    """Above LARGE_BATCH events the append takes its multi-statement path: same semantics."""
    from ciretry.common.eventstore import LARGE_BATCH

    await store.append_batch([new("0", key="dup-0")])
    batch = [new(str(i), key=f"dup-{i % (LARGE_BATCH // 2)}") for i in range(LARGE_BATCH + 50)]
    results = await store.append_batch(batch)
    assert len(results) == len(batch)
    assert sum(not r.duplicate for r in results) == LARGE_BATCH // 2 - 1
    versions = [e.stream_version for e in await store.read_stream(STREAM)]
    assert versions == list(range(1, LARGE_BATCH // 2 + 1))
    with pytest.raises(WrongExpectedVersion):
        await store.append_batch(
            [new(f"x{i}") for i in range(LARGE_BATCH + 1)], expected={STREAM: 0}
        )
    cause = uuid.uuid4()
    await store.append_batch(
        [new(f"y{i}", stream="other") for i in range(LARGE_BATCH + 1)],
        tracking=Tracking("act", cause),
    )
    with pytest.raises(AlreadyProcessed):
        await store.append_batch(
            [new(f"z{i}", stream="other") for i in range(LARGE_BATCH + 1)],
            tracking=Tracking("act", cause),
        )
    assert len(await store.read_stream("other")) == LARGE_BATCH + 1
    assert await store.outbox_depth() == LARGE_BATCH // 2 + LARGE_BATCH + 1
