"""The event log on a real PostgreSQL: append-only, ordered, idempotent, exactly-once tracking."""

from __future__ import annotations

import asyncpg
import pytest

from ciretry.common.events import JobFinished, Metadata, NewEvent
from ciretry.common.eventstore import (
    EventStore,
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
    async with store.connection() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(sql)
    assert len(await store.read_stream(STREAM)) == 1


async def test_a_role_granted_only_select_insert_cannot_update_or_delete(
    store: EventStore, unique: str
) -> None:
    """The privilege layer: even with the trigger gone, a service role could not change events."""
    await store.append(STREAM, [job("1")])
    role = f"ciretry_writer_{unique}"
    async with store.connection() as conn:
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


async def test_migrate_is_idempotent(store: EventStore) -> None:
    assert await store.migrate() == []


async def test_fresh_results_carry_the_stored_body(store: EventStore) -> None:
    from ciretry.common.events import encode

    results = await store.append_batch([new("1", key="k"), new("1", key="k")])
    assert results[0].body == encode(results[0].event.data)
    async with store.connection() as conn:
        stored = await conn.fetchval("SELECT body FROM events")
    assert stored == results[0].body
    assert results[1].duplicate and results[1].body is None


async def test_a_connection_released_inside_a_transaction_is_rolled_back(
    pg_dsn: str, schema: str
) -> None:
    """The pool's reset query is skipped (ciretry keeps no session state), but a connection
    given back with a transaction open (a handler that died half-way) is still rolled back:
    nothing it wrote is committed, and the next user does not inherit the transaction."""
    store = await EventStore.connect(pg_dsn, schema, max_size=1)
    try:
        await store.migrate()
        async with store.connection() as conn:
            await conn.execute("CREATE TABLE scratch (x int)")
        async with store.connection() as conn:
            tx = conn.transaction()
            await tx.start()  # never committed
            await conn.execute("INSERT INTO scratch VALUES (1)")
        await store.append(STREAM, [job("1")])  # the same (only) connection, reused
        async with store.connection() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM scratch") == 0
        assert [e.stream_version for e in await store.read_stream(STREAM)] == [1]
    finally:
        await store.close()


async def test_only_connections_marked_as_needing_it_are_reset(pg_dsn: str, schema: str) -> None:
    store = await EventStore.connect(pg_dsn, schema, max_size=1)
    try:
        async with store.connection() as conn:
            default = await conn.fetchval("SHOW work_mem")
            await conn.execute("SELECT pg_advisory_lock(4242)")  # a session lock, left held
            needs_reset(conn)
        async with store.connection() as conn:  # the reset released it
            held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            assert await conn.fetchval(held) == 0
            await conn.execute("SET work_mem = '7MB'")  # not marked: kept (no round trip)
        async with store.connection() as conn:
            assert await conn.fetchval("SHOW work_mem") == "7MB" != default
    finally:
        await store.close()


async def test_a_done_claim_keeps_its_lock_until_the_next_claim_on_its_connection(
    pg_dsn: str, schema: str
) -> None:
    """A claim whose outcome is recorded skips its unlock (a round trip): no one can take the
    key any more. The lock stays with the pooled connection until the next claim on it."""
    store = await EventStore.connect(pg_dsn, schema, max_size=1)  # one connection: always it
    await store.migrate()
    other = await EventStore.connect(pg_dsn, schema, max_size=1)  # another replica's
    locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    try:
        async with store.exclusive("act:a", unless="act:a:outcome") as got:
            assert got
            await other.append(STREAM, [new("1", key="act:a:outcome")])
            got.done()
        async with store.connection() as conn:
            assert await conn.fetchval(locks) == 1  # kept, not reset
        async with store.exclusive("act:b") as next_claim:
            # Its statement released the leftover before it took its own lock, which it holds.
            async with other.exclusive("act:b") as elsewhere:
                assert next_claim and not elsewhere
            async with other.exclusive("act:a", unless="act:a:outcome") as again:
                assert not again  # the outcome says so, whatever the lock
        async with store.connection() as conn:
            assert await conn.fetchval(locks) == 0
        async with store.exclusive("act:a", unless="act:a:outcome") as got:
            got.done()  # not taken (the outcome): nothing kept
        async with store.exclusive("act:b") as plain:
            plain.done()  # no ``unless``: nothing says the key is done; unlocked as usual
        async with store.connection() as conn:
            assert await conn.fetchval(locks) == 0
    finally:
        await store.close()
        await other.close()
