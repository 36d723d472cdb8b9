"""The event log on a real PostgreSQL: append-only, ordered, idempotent, exactly-once tracking."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from ciretry.common.events import JobFinished, Metadata, NewEvent
from ciretry.common.eventstore import (
    EventStore,
    claim_lock,
    needs_reset,
)
from tests.support.claims import lose_claim

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


_HOLDERS = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND classid = $1::oid AND objid = $2::oid
"""


async def holders(store: EventStore, key: str) -> list[int]:
    """The backends holding the claim lock of ``key``."""
    lock = claim_lock(store.schema, key) & 0xFFFFFFFFFFFFFFFF
    async with store.connection() as conn:
        return [r[0] for r in await conn.fetch(_HOLDERS, lock >> 32, lock & 0xFFFFFFFF)]


async def test_a_done_claim_keeps_its_lock_until_the_sessions_next_statement(
    pg_dsn: str, schema: str
) -> None:
    """A claim whose outcome is recorded skips its unlock (a round trip): no one can take the
    key any more. The lock stays with the claim session until its next statement, or until the
    session closes with its last claim (the pool's reset)."""
    store = await EventStore.connect(pg_dsn, schema, max_size=2)
    await store.migrate()
    other = await EventStore.connect(pg_dsn, schema, max_size=2)  # another replica's
    try:
        async with store.exclusive("act:keep") as keep:  # keeps the session open
            async with store.exclusive("act:a", unless="act:a:outcome") as got:
                assert keep and got
                await other.append(STREAM, [new("1", key="act:a:outcome")])
                got.done()
            session = await holders(store, "act:keep")
            assert len(session) == 1 and await holders(store, "act:a") == session  # kept
            async with store.exclusive("act:b") as next_claim:
                # Its statement released the leftover before it took its own lock.
                assert next_claim and await holders(store, "act:a") == []
                assert await holders(store, "act:b") == session
                async with other.exclusive("act:b") as elsewhere:
                    assert not elsewhere
                async with other.exclusive("act:a", unless="act:a:outcome") as again:
                    assert not again  # the outcome says so, whatever the lock
        assert await holders(store, "act:keep") == await holders(store, "act:b") == []
        async with store.exclusive("act:c", unless="act:c:outcome") as last:
            await other.append(STREAM, [new("2", key="act:c:outcome")])
            last.done()
        assert await holders(store, "act:c") == []  # the session closed: reset
        async with store.exclusive("act:a", unless="act:a:outcome") as got:
            got.done()  # not taken (the outcome): nothing kept
        async with store.exclusive("act:d") as plain:
            plain.done()  # no ``unless``: nothing says the key is done; unlocked as usual
            async with other.exclusive("act:d") as elsewhere:
                assert plain and not elsewhere
        assert await holders(store, "act:d") == []
    finally:
        await store.close()
        await other.close()


async def test_claims_share_one_session_whatever_their_number(pg_dsn: str, schema: str) -> None:
    """Twenty claims held at once by a store with a pool of three: one backend holds every lock
    (a connection per claim allowed two, the third connection kept for appends), the pool stays
    free for the holders' work, and a second claim of a key this process holds is refused
    although PostgreSQL would grant it to the same session again."""
    store = await EventStore.connect(pg_dsn, schema, max_size=3)
    await store.migrate()
    other = await EventStore.connect(pg_dsn, schema, max_size=2)
    keys = [f"act:{i}" for i in range(20)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            claims = [await stack.enter_async_context(store.exclusive(k)) for k in keys]
            assert all(claims) and all(await asyncio.gather(*(c.held() for c in claims)))
            pids = {pid for k in keys for pid in await holders(store, k)}
            assert len(pids) == 1
            await store.append(STREAM, [new("1")])  # the work's appends find connections
            async with store.exclusive("act:7") as again, other.exclusive("act:7") as elsewhere:
                assert not again and not elsewhere
            assert await holders(store, "act:7") == list(pids)  # the refusal released nothing
        assert not any([await holders(store, k) for k in keys])
        async with other.exclusive("act:7") as later:
            assert later
    finally:
        await store.close()
        await other.close()


async def test_a_burst_of_claims_is_answered_in_rounds_each_as_if_alone(
    pg_dsn: str, schema: str
) -> None:
    """Forty claims asked at once (a batch of act's decisions), every fourth one's work already
    recorded: each is taken or refused as it would be alone, in a round trip or two rather
    than forty; their checks too, one of them seeing the outcome recorded meanwhile."""
    store = await EventStore.connect(pg_dsn, schema, max_size=3)
    await store.migrate()
    other = await EventStore.connect(pg_dsn, schema, max_size=2)
    keys = [f"act:{i}" for i in range(40)]
    done = [new(str(i), key=f"act:{i}:outcome") for i in range(0, 40, 4)]
    try:
        await other.append(STREAM, done)
        async with store.exclusive("act:keep") as keep, contextlib.AsyncExitStack() as stack:
            session = store._claim_session
            assert keep and session is not None
            before = session.statements
            claims = await asyncio.gather(
                *(
                    stack.enter_async_context(store.exclusive(k, unless=f"{k}:outcome"))
                    for k in keys
                )
            )
            takes = session.statements - before
            assert [bool(c) for c in claims] == [i % 4 != 0 for i in range(40)]
            assert 1 <= takes <= 3, takes
            await other.append(STREAM, [new("x", key="act:1:outcome")])
            held = await asyncio.gather(*(c.held() for c in claims if c))
            assert held == [i != 1 for i in range(40) if i % 4 != 0]
            assert 1 <= session.statements - before - takes <= 3
            assert await holders(store, "act:2") == await holders(store, "act:keep") != []
            assert await holders(store, "act:4") == []  # refused: its outcome, no lock taken
            async with other.exclusive("act:2") as elsewhere:
                assert not elsewhere
    finally:
        await store.close()
        await other.close()


async def test_a_lost_session_loses_every_claim_on_it_and_the_next_claim_opens_another(
    pg_dsn: str, schema: str
) -> None:
    store = await EventStore.connect(pg_dsn, schema, max_size=3)
    await store.migrate()
    other = await EventStore.connect(pg_dsn, schema, max_size=2)
    try:
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(store.exclusive("act:a"))
            b = await stack.enter_async_context(store.exclusive("act:b", unless="act:b:out"))
            assert a and b and await a.held() and await b.held()
            await lose_claim(store, "act:a")  # ends the backend: both locks go with it
            assert not await b.held() and not await a.held()
            async with other.exclusive("act:a") as taken_over:
                assert taken_over  # another replica may take it: the holders must not call
            async with store.exclusive("act:c") as fresh:
                assert fresh and await fresh.held()
                assert await holders(store, "act:c") != []
        async with store.exclusive("act:b", unless="act:b:out") as again:
            assert again and await again.held()
    finally:
        await store.close()
        await other.close()
