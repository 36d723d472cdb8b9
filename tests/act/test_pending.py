"""act's open requests as a read model (``pending_requests``, migration 0004), on PostgreSQL.

The table is kept by a trigger in the transaction that appends the events, from the ``type`` and
``idempotency_key`` columns; it must always say what a scan of the whole log says (the query
``run_due`` used to run every 5 s), including for a log that existed before the migration.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from importlib import resources
from typing import Any

import asyncpg
import pytest

from ciretry.act.budget import outcome_key
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    Metadata,
    NewEvent,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore
from tests.support.pending import PENDING_FROM_THE_LOG

STREAM = pipeline_stream("gitlab", "42", "900")


_TABLE = (
    "SELECT request_key, position, failures, last_failure FROM pending_requests ORDER BY position"
)


def request(key: str, *, dry_run: bool = False) -> RetryRequested:
    return RetryRequested(
        source="gitlab",
        project="42",
        pipeline_id="900",
        job_id=key.rsplit(":", 2)[-2],
        job_name="build",
        action="retry_job",
        idempotency_key=key,
        category="preempted",
        budget="system",
        snapshot=BudgetSnapshot(job_limit=3, pipeline_limit=10),
        dry_run=dry_run,
    )


def failed(key: str, *, final: bool) -> RetryFailed:
    return RetryFailed(
        source="gitlab",
        project="42",
        pipeline_id="900",
        job_id="1",
        idempotency_key=key,
        status=503,
        detail="provider said 503",
        will_retry=not final,
    )


def issued(key: str) -> RetryIssued:
    return RetryIssued(
        source="gitlab", project="42", pipeline_id="900", job_id="1", idempotency_key=key
    )


def skipped_dry_run(key: str) -> RetrySkipped:
    return RetrySkipped(
        source="gitlab",
        project="42",
        pipeline_id="900",
        job_id="1",
        job_name="build",
        reason="dry_run",
        detail=f"{key} dry run",
        category="preempted",
        snapshot=BudgetSnapshot(),
    )


def keyed(data: Event, key: str) -> NewEvent:
    return NewEvent(stream=STREAM, data=data, metadata=Metadata(idempotency_key=key))


def random_history(rng: random.Random, requests: int) -> list[list[NewEvent]]:
    """Appends (batches) as act makes them: requests, transient failures numbered from 1, and at
    most one final outcome of any kind, interleaved across requests."""
    todo: list[tuple[str, list[NewEvent]]] = []
    for i in range(requests):
        key = f"act:gitlab:42:{1000 + i}:retry_job"
        steps = [keyed(request(key), key)]
        for n in range(1, rng.randint(0, 3) + 1):
            steps.append(keyed(failed(key, final=False), f"{key}:failed:{n}"))
        end = rng.choice(["open", "issued", "failed", "dry_run"])
        if end == "issued":
            steps.append(keyed(issued(key), outcome_key(key)))
        elif end == "failed":
            steps.append(keyed(failed(key, final=True), outcome_key(key)))
        elif end == "dry_run":
            steps.append(keyed(skipped_dry_run(key), outcome_key(key)))
        todo.append((key, steps))
    batches: list[list[NewEvent]] = []
    while todo:
        i = rng.randrange(len(todo))
        key, steps = todo[i]
        take = rng.randint(1, 2)
        batches.append(steps[:take])
        rest = steps[take:]
        if rest:
            todo[i] = (key, rest)
        else:
            todo.pop(i)
    return batches


async def rows(conn: Any, query: str) -> list[tuple[Any, ...]]:
    if query is _FROM_THE_LOG:  # what a scan of the whole log says, in the table's shape
        return [(r[1], r[0], r[5], r[6]) for r in await conn.fetch(query, 0, 2**62)]
    return [tuple(r) for r in await conn.fetch(query)]


#: The oracle: run_due's query before the read model.
_FROM_THE_LOG = PENDING_FROM_THE_LOG


async def test_the_table_is_what_a_scan_of_the_log_says(store: EventStore) -> None:
    rng = random.Random(13)
    history = random_history(rng, 60)
    async with store.connection() as conn:
        for n, batch in enumerate(history):
            await store.append_batch(batch)
            if n % 10 == 0:  # at every stage, not only at the end
                assert await rows(conn, _TABLE) == await rows(conn, _FROM_THE_LOG)
        table = await rows(conn, _TABLE)
        assert table == await rows(conn, _FROM_THE_LOG)
    assert 0 < len(table) < 60
    assert any(r[2] > 0 for r in table)  # failures were counted on some open request


async def test_a_request_opens_fails_and_closes(store: EventStore) -> None:
    key = "act:gitlab:42:7:retry_job"
    async with store.connection() as conn:
        (req,) = await store.append_batch([keyed(request(key), key)])
        assert await rows(conn, _TABLE) == [(key, req.event.position, 0, None)]
        (f1,) = await store.append_batch([keyed(failed(key, final=False), f"{key}:failed:1")])
        (f2,) = await store.append_batch([keyed(failed(key, final=False), f"{key}:failed:2")])
        assert await rows(conn, _TABLE) == [(key, req.event.position, 2, f2.event.recorded_at)]
        # A duplicate append (same key) is not stored again, and counts nothing.
        (dup,) = await store.append_batch([keyed(failed(key, final=False), f"{key}:failed:2")])
        assert dup.duplicate
        assert (await rows(conn, _TABLE))[0][2] == 2
        await store.append_batch([keyed(issued(key), outcome_key(key))])
        assert await rows(conn, _TABLE) == []
        # A request whose outcome is already in the log never opens (a hand-made log).
        other = "act:gitlab:42:8:retry_job"
        await store.append_batch([keyed(issued(other), outcome_key(other))])
        await store.append_batch([keyed(request(other), other)])
        assert await rows(conn, _TABLE) == []
    assert f1.event.recorded_at < f2.event.recorded_at


async def test_large_batches_keep_the_table_too(store: EventStore) -> None:
    """Batches above eventstore.LARGE_BATCH take the multi-statement path: same trigger."""
    keys = [f"act:gitlab:42:{i}:retry_job" for i in range(300)]
    await store.append_batch([keyed(request(k), k) for k in keys])
    await store.append_batch([keyed(issued(k), outcome_key(k)) for k in keys[:250]])
    async with store.connection() as conn:
        table = await rows(conn, _TABLE)
        assert [r[0] for r in table] == keys[250:]
        assert table == await rows(conn, _FROM_THE_LOG)


async def test_the_migration_fills_the_table_from_an_existing_log(pg_dsn: str, schema: str) -> None:
    """A log written before migration 0004 (no trigger yet): the migration's backfill must give
    the same table as the log says, and the trigger carries on from there."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(
            f'CREATE TABLE "{schema}".schema_migrations ('
            "name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(f'SET search_path TO "{schema}"')
        files = sorted(
            (f for f in resources.files("ciretry.common.migrations").iterdir()),
            key=lambda f: f.name,
        )
        for f in files:
            if f.name.endswith(".sql") and f.name < "0004":
                await conn.execute(f.read_text())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", f.name)
    finally:
        await conn.close()
    store = await EventStore.connect(pg_dsn, schema, max_size=2)
    try:
        history = random_history(random.Random(4), 80)
        for batch in history:
            await store.append_batch(batch)
        # A poison message rejected before the migration (classify's, for event E).
        rejected_event = uuid.uuid4()
        async with store.connection() as conn:
            await conn.execute(
                "INSERT INTO events (event_id, stream, stream_version, type, schema_version, "
                "body, metadata, idempotency_key) VALUES ($1, 'rejected-classify', 1, "
                "'MessageRejected', 1, '{}'::bytea, '{}'::bytea, $2)",
                uuid.uuid4(),
                f"rejected:classify:{rejected_event}",
            )
        applied = await store.migrate()
        assert applied[0] == "0004_followers_and_pending_requests.sql"
        assert all(name > applied[0] for name in applied[1:])  # later ones come after it
        async with store.connection() as conn:
            expected = await rows(conn, _FROM_THE_LOG)
            assert expected and await rows(conn, _TABLE) == expected
            # The poison counts as handled from now on.
            assert await store.is_processed("classify", rejected_event)
        # And the trigger takes over.
        key = "act:gitlab:42:99999:retry_job"
        await store.append_batch([keyed(request(key), key)])
        async with store.connection() as conn:
            assert await rows(conn, _TABLE) == await rows(conn, _FROM_THE_LOG)
            assert (await rows(conn, _TABLE))[-1][0] == key
    finally:
        await store.close()


@pytest.mark.parametrize("dry_run", [False, True])
async def test_run_due_reads_open_requests_only(store: EventStore, dry_run: bool) -> None:
    """run_due over a log of closed requests and a few open ones: it sees the open ones (a dry
    run gets its closing skip), the rest is not even read."""
    from ciretry.act.policy import load_policy
    from ciretry.act.service import ActHandler

    closed = [f"act:gitlab:42:{i}:retry_job" for i in range(50)]
    await store.append_batch([keyed(request(k), k) for k in closed])
    await store.append_batch([keyed(issued(k), outcome_key(k)) for k in closed])
    later = dt.datetime(2999, 1, 1, tzinfo=dt.UTC)
    open_keys = [f"act:gitlab:42:{i}:retry_job" for i in range(100, 103)]
    requests = [msgspec_replace(request(k, dry_run=dry_run), not_before=later) for k in open_keys]
    await store.append_batch([keyed(r, r.idempotency_key) for r in requests])
    handler = ActHandler(store, None, load_policy(), {})
    # Not due yet (not_before in the future): nothing attempted; a dry run is closed at once.
    assert await handler.run_due(dt.datetime(2024, 1, 1, tzinfo=dt.UTC)) == 0
    async with store.connection() as conn:
        left = [r[0] for r in await rows(conn, _TABLE)]
    assert left == ([] if dry_run else open_keys)


def msgspec_replace(r: RetryRequested, **kw: Any) -> RetryRequested:
    import msgspec

    return msgspec.structs.replace(r, **kw)
