"""Plans that outlive an empty log, on a real PostgreSQL.

PostgreSQL caches a plan per session for a prepared statement (asyncpg prepares every query) and
for each statement of a PL/pgSQL function (``append_events``): after five executions it keeps a
generic plan, costed on the table as it was then. Made while ``events`` is empty (a fresh
deployment, a fresh schema), that plan scans the table; it goes on scanning the whole, growing
log on every append and read until an ANALYZE replaces it. ``bench/e2e.py`` found every
service doing so. A service's sessions (``EventStore.connect(key_lookups=True)``) look rows up
by index whatever the log held when the plan was made.

The table's scan counter is the evidence: each backend counts into ``pg_stat_user_tables``, and
``pg_stat_force_next_flush()`` (PostgreSQL 15) makes the one connection of the pool publish its
counts before the server answers, so nothing is waited for.

Other sessions can replace cached plans too, and the demonstration below then finds nothing to
count: an autoanalyze landing mid-test (the 3,000 appends cross its threshold), so autovacuum is
off on the test's ``events`` table; and a reset of the session's caches, which PostgreSQL makes
when catalog changes (other tests' migrations, in CI's parallel workers) outrun the session's
reading of them, which no setting stops. The demonstration therefore makes a few attempts and
needs one; with ``key_lookups`` there must be none in any attempt, which no reset can excuse.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from ciretry.common.eventlog import TrackedAppend, Tracking
from ciretry.common.events import JobFinished, Metadata, NewEvent
from ciretry.common.eventstore import EventStore

GROWN = 3_000  # events appended after the plans were cached: ~100 pages
ATTEMPTS = 5


def failed(job: int, stream: str) -> NewEvent:
    data = JobFinished(
        source="gitlab",
        project="42",
        pipeline_id="7",
        job_id=str(job),
        job_name="build",
        status="failed",
    )
    return NewEvent(stream=stream, data=data, metadata=Metadata(idempotency_key=f"k:{job}"))


async def seq_scans_of_events(store: EventStore) -> int:
    async with store.connection() as conn:
        if conn.get_server_version().major < 15:
            pytest.skip("pg_stat_force_next_flush() needs PostgreSQL 15")
        await conn.execute("SELECT pg_stat_force_next_flush()")
        value = await conn.fetchval(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'events'::regclass"
        )
    return int(value)


async def scans_by_the_hot_path(pg_dsn: str, schema: str, *, key_lookups: bool) -> int:
    """Sequential scans of ``events`` by appends and reads, once the log has grown past the
    size it had when their plans were cached."""
    # One connection: every statement below runs in the session whose plans are cached.
    store = await EventStore.connect(pg_dsn, schema, max_size=1, key_lookups=key_lookups)
    try:
        await store.migrate()
        async with store.connection() as conn:
            await conn.execute("ALTER TABLE events SET (autovacuum_enabled = off)")
        job = 0

        async def exercise() -> None:
            nonlocal job
            job += 1
            await store.append(f"job-{job}", [failed(job, f"job-{job}")])
            job += 1
            await store.append_tracked(
                [TrackedAppend([failed(job, f"job-{job}")], Tracking("act", uuid.uuid4()))]
            )
            await store.read_streams([f"job-{job}", f"job-{job - 1}"])
            await store.read_streams_after({f"job-{job}": 0})

        for _ in range(8):  # past the five custom plans: the generic plan is cached now
            await exercise()
        for start in range(0, GROWN, 500):
            await store.append_batch(
                [failed(100_000 + n, f"pipeline-{n % 50}") for n in range(start, start + 500)]
            )
        before = await seq_scans_of_events(store)
        for _ in range(10):
            await exercise()
        return await seq_scans_of_events(store) - before
    finally:
        await store.close()


async def test_a_service_session_looks_the_log_up_by_index_however_empty_it_was(
    pg_dsn: str, schema: str
) -> None:
    assert await scans_by_the_hot_path(pg_dsn, schema, key_lookups=True) == 0


async def test_without_it_the_plans_cached_on_the_empty_log_scan_it(
    pg_dsn: str, schema: str
) -> None:
    """What the test above guards against, shown on the same path: if PostgreSQL ever stops
    caching such plans, this fails, and ``key_lookups`` can go. A cache reset by another
    session's migration can erase one attempt's plans (module docstring), not five in a row."""
    scans = []
    for _ in range(ATTEMPTS):
        scans.append(await scans_by_the_hot_path(pg_dsn, schema, key_lookups=False))
        if scans[-1] >= 10:
            break
        conn = await asyncpg.connect(pg_dsn)  # the next attempt starts on an empty log again
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()
    assert scans[-1] >= 10, f"scans of the grown log in each attempt: {scans}"
