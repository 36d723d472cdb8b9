"""The event log on PostgreSQL: append-only, totally ordered, idempotent, with outbox and tracking.

Appends serialize on a transaction-scoped advisory lock (one per schema), as pyeventsourcing's
recorder does with its table lock: positions then commit in the order they were assigned, so a
follower reading ``read_all`` by position never skips an event that commits late. Batching keeps
the lock cheap: ingest appends many webhooks in one transaction.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from .events import (
    Event,
    NewEvent,
    RecordedEvent,
    decode_event,
    decode_metadata,
    encode,
)
from .telemetry import context_from_metadata, tracer

#: A connection or a pool's proxy for one (both speak the same query API).
Connection = asyncpg.Connection | PoolConnectionProxy

#: Batches larger than this are appended with a few statements in one transaction instead of
#: the one-round-trip ``append_events`` call (see ``_append_statements``; docs/benchmarks.md).
LARGE_BATCH = 200

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Every query that decodes events selects these columns in this order (see row_to_event):
#: event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata


class WrongExpectedVersion(Exception):
    """The stream moved on since the caller read it (optimistic concurrency)."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream!r}: expected version {expected}, found {actual}")
        self.stream = stream
        self.expected = expected
        self.actual = actual


class AlreadyProcessed(Exception):
    """The tracking row exists: this consumer already committed its outputs for the event."""

    def __init__(self, consumer: str, event_id: uuid.UUID) -> None:
        super().__init__(f"{consumer} already processed {event_id}")
        self.consumer = consumer
        self.event_id = event_id


@dataclass(frozen=True, slots=True)
class Tracking:
    """Commit "consumer processed event_id" together with the consumer's outputs."""

    consumer: str
    event_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class AppendResult:
    event: RecordedEvent
    duplicate: bool
    #: The event body as this append encoded and stored it (fresh events only), so that the
    #: outbox fast path (``OutboxPublisher.publish(..., bodies=...)``) does not encode it again.
    body: bytes | None = field(default=None, compare=False, repr=False)


class _Connection(asyncpg.Connection):
    """A pool connection released without the pool's reset query unless asked for it.

    On release asyncpg rolls back any open transaction (always, whatever this returns) and
    then runs a reset query that unlocks session-level advisory locks, closes cursors, stops
    listening and resets session settings: one more round trip per use of a connection, and
    round trips (a system call each way) are most of what a decision in act costs. ciretry's
    queries keep no session state (advisory locks are transaction-scoped, settings are
    ``SET LOCAL``, cursors live inside transactions, nothing LISTENs); code that does take
    session state (act's claim: a session advisory lock) calls ``needs_reset`` first."""

    _needs_reset = False

    def needs_reset(self, needed: bool = True) -> None:
        self._needs_reset = needed

    def get_reset_query(self) -> str:
        if self._needs_reset:
            self._needs_reset = False
            return str(super().get_reset_query())
        return ""


def needs_reset(conn: Connection, needed: bool = True) -> None:
    """Have the pool reset ``conn`` when it is released (see ``_Connection``): for code that
    leaves session state behind, such as a session advisory lock. ``needed=False`` once that
    state is cleaned up again."""
    mark = getattr(conn, "needs_reset", None)
    if mark is not None:
        mark(needed)


def check_schema_name(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits and _")
    return schema


def _advisory_key(schema: str) -> int:
    # Stable across processes (unlike hash()): 63-bit FNV-1a of the schema name.
    h = 0xCBF29CE484222325
    for byte in schema.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def row_to_event(row: asyncpg.Record | Sequence[Any]) -> RecordedEvent:
    """Decode a row of the event columns, in the order documented above."""
    return RecordedEvent(
        event_id=row[0],
        stream=row[1],
        stream_version=row[2],
        position=row[3],
        recorded_at=row[4],
        data=decode_event(row[5], row[6], row[7]),
        metadata=decode_metadata(row[8]),
    )


async def migrate(conn: Connection, schema: str) -> list[str]:
    """Apply pending migrations to ``schema`` (created if missing). Returns the names applied.

    Concurrent callers (several replicas starting at once) serialize on an advisory lock.
    """
    check_schema_name(schema)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _advisory_key("migrate:" + schema))
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
            "name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            # Identifiers cannot be bind parameters; the schema name was validated above.
            r[0]
            for r in await conn.fetch(f'SELECT name FROM "{schema}".schema_migrations')  # noqa: S608
        }
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        migrations = resources.files("ciretry.common.migrations").iterdir()
        files = sorted((f for f in migrations if f.name.endswith(".sql")), key=lambda f: f.name)
        for file in files:
            if file.name in done:
                continue
            await conn.execute(file.read_text())
            await conn.execute(
                f'INSERT INTO "{schema}".schema_migrations (name) VALUES ($1)',  # noqa: S608
                file.name,
            )
            applied.append(file.name)
    return applied


class EventStore:
    """The event log of one schema, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "public") -> None:
        self.pool = pool
        self.schema = check_schema_name(schema)
        self._lock_key = _advisory_key(schema)

    @classmethod
    async def connect(
        cls, dsn: str, schema: str = "public", *, min_size: int = 1, max_size: int = 10
    ) -> EventStore:
        check_schema_name(schema)
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings={"search_path": f'"{schema}"'},
            connection_class=_Connection,
        )
        return cls(pool, schema)

    async def close(self) -> None:
        await self.pool.close()

    async def migrate(self) -> list[str]:
        async with self.pool.acquire() as conn:
            return await migrate(conn, self.schema)

    async def ping(self) -> None:
        async with self.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    # --- writing ------------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[Event | NewEvent],
        expected_version: int | None = None,
        *,
        tracking: Tracking | None = None,
    ) -> list[RecordedEvent]:
        """Append to one stream. ``expected_version``: None = any, 0 = stream must not exist,
        n = the stream's last version must be n, else ``WrongExpectedVersion``."""
        new = [e if isinstance(e, NewEvent) else NewEvent(stream=stream, data=e) for e in events]
        for e in new:
            if e.stream != stream:
                raise ValueError(f"event for {e.stream!r} appended to {stream!r}")
        expected = {stream: expected_version} if expected_version is not None else {}
        results = await self.append_batch(new, expected=expected, tracking=tracking)
        return [r.event for r in results]

    async def append_idempotent(
        self, event: NewEvent, *, tracking: Tracking | None = None
    ) -> AppendResult:
        """Append unless an event with the same ``metadata.idempotency_key`` exists; then return
        that one with ``duplicate=True``."""
        if not event.metadata.idempotency_key:
            raise ValueError("append_idempotent needs metadata.idempotency_key")
        (result,) = await self.append_batch([event], tracking=tracking)
        return result

    async def append_batch(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Tracking | None = None,
    ) -> list[AppendResult]:
        """Append events to any number of streams in one transaction, each at the end of its
        stream (or at ``expected[stream]``). Events whose idempotency key is already stored (or
        repeats earlier in the batch) are not stored again: their result is the stored event,
        ``duplicate=True``. Results are in input order."""
        if not events:
            return []
        with tracer("ciretry.eventstore").start_as_current_span(
            "event append",
            kind=SpanKind.CLIENT,
            links=_links(events),
            attributes={
                "db.system": "postgresql",
                "db.operation.name": "INSERT",
                "db.collection.name": "events",
                "ciretry.events.count": len(events),
            },
        ):
            async with self.pool.acquire() as conn:
                if len(events) > LARGE_BATCH:
                    async with conn.transaction():
                        return await self._append_statements(conn, events, expected or {}, tracking)
                results = await self._append_in(conn, events, expected or {}, tracking)
                return results

    async def _append_in(
        self,
        conn: Connection,
        events: Sequence[NewEvent],
        expected: dict[str, int],
        tracking: Tracking | None,
    ) -> list[AppendResult]:
        """One statement, one round trip: ``append_events`` (migration 0003) takes the tracking
        row, the lock, checks expected versions and idempotency keys, numbers and inserts the
        events and their outbox rows, as one transaction."""
        # Keys repeated inside the batch resolve here to their first occurrence; only first
        # occurrences are sent. ``plan[i]`` is the index (among those sent) input i resolves to.
        plan: list[int] = []
        first: dict[str, int] = {}
        sent: list[NewEvent] = []
        ids: list[uuid.UUID] = []
        streams: list[str] = []
        types: list[str] = []
        versions: list[int] = []
        bodies: list[bytes] = []
        metas: list[bytes] = []
        keys: list[str | None] = []
        for e in events:
            meta = e.metadata
            key = meta.idempotency_key
            if key:
                j = first.get(key)
                if j is not None:
                    plan.append(j)
                    continue
                first[key] = len(sent)
            plan.append(len(sent))
            sent.append(e)
            data = e.data
            ids.append(e.event_id)
            streams.append(e.stream)
            types.append(data.type_name())
            versions.append(data.schema_version)
            bodies.append(encode(data))
            metas.append(encode(meta))
            keys.append(key or None)
        try:
            rows = await conn.fetch(
                _APPEND,
                self._lock_key,
                ids,
                streams,
                types,
                versions,
                bodies,
                metas,
                keys,
                list(expected),
                list(expected.values()),
                tracking.consumer if tracking is not None else None,
                tracking.event_id if tracking is not None else None,
            )
        except asyncpg.UniqueViolationError as exc:
            # Only reachable if someone appends without the lock (e.g. by hand).
            raise WrongExpectedVersion(str(exc.detail or ""), -1, -1) from exc
        except asyncpg.PostgresError as exc:
            state = getattr(exc, "sqlstate", None)
            if state == "CR001":
                stream, want, have = json.loads(getattr(exc, "detail", None) or "[]")
                raise WrongExpectedVersion(stream, want, have) from None
            if state == "CR002" and tracking is not None:
                raise AlreadyProcessed(tracking.consumer, tracking.event_id) from None
            raise

        stored: list[AppendResult | None] = [None] * len(sent)
        index = {event_id: i for i, event_id in enumerate(ids)}
        for r in rows:
            if r[1]:
                # Key already in the log: the stored event, not ours.
                rec = row_to_event((r[5], r[6], r[4], r[2], r[3], r[7], r[8], r[9], r[10]))
                stored[r[0] - 1] = AppendResult(rec, True)
            else:
                i = index[r[5]]
                e = sent[i]
                rec = RecordedEvent(
                    event_id=e.event_id,
                    stream=e.stream,
                    stream_version=r[4],
                    position=r[2],
                    recorded_at=r[3],
                    data=e.data,
                    metadata=e.metadata,
                )
                stored[i] = AppendResult(rec, False, bodies[i])
        out: list[AppendResult] = []
        next_first = 0
        for j in plan:
            result = stored[j]
            assert result is not None
            if j == next_first:
                out.append(result)
                next_first += 1
            else:  # a repeat, inside this batch, of an earlier input's key
                out.append(AppendResult(result.event, True))
        return out

    async def _append_statements(
        self,
        conn: Connection,
        events: Sequence[NewEvent],
        expected: dict[str, int],
        tracking: Tracking | None,
    ) -> list[AppendResult]:
        """Large batches: a few statements in one transaction (lock, key lookup, version
        lookup, one multi-row insert with its outbox rows), versions numbered here. Per row this
        is cheaper than ``append_events``, whose extra joins cost more than its saved round
        trips once a batch has hundreds of events."""
        if tracking is not None:
            inserted = await conn.fetchval(
                "INSERT INTO tracking (consumer, event_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING RETURNING true",
                tracking.consumer,
                tracking.event_id,
            )
            if not inserted:
                raise AlreadyProcessed(tracking.consumer, tracking.event_id)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)

        keys = [e.metadata.idempotency_key for e in events if e.metadata.idempotency_key]
        existing: dict[str, RecordedEvent] = {}
        if keys:
            rows = await conn.fetch(
                "SELECT idempotency_key, event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata FROM events "
                "WHERE idempotency_key = ANY($1::text[])",
                keys,
            )
            existing = {r[0]: row_to_event(tuple(r)[1:]) for r in rows}

        streams = list({e.stream for e in events})
        rows = await conn.fetch(
            "SELECT stream, max(stream_version) FROM events "
            "WHERE stream = ANY($1::text[]) GROUP BY stream",
            streams,
        )
        versions = {r[0]: r[1] for r in rows}
        for stream, want in expected.items():
            have = versions.get(stream, 0)
            if have != want:
                raise WrongExpectedVersion(stream, want, have)

        # Plan: which input becomes a new row, which is a duplicate of what.
        plan: list[tuple[NewEvent, int] | str] = []  # (event, version) or duplicate key
        seen: dict[str, NewEvent] = {}
        cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
        for e in events:
            key = e.metadata.idempotency_key
            if key and (key in existing or key in seen):
                plan.append(key)
                continue
            if key:
                seen[key] = e
            version = versions.get(e.stream, 0) + 1
            versions[e.stream] = version
            plan.append((e, version))
            for col, value in zip(
                cols,
                (
                    e.event_id,
                    e.stream,
                    version,
                    e.data.type_name(),
                    e.data.schema_version,
                    encode(e.data),
                    encode(e.metadata),
                    key,
                ),
                strict=True,
            ):
                col.append(value)

        stored: dict[uuid.UUID, tuple[int, Any]] = {}
        if cols[0]:
            try:
                rows = await conn.fetch(_INSERT, *cols)
            except asyncpg.UniqueViolationError as exc:
                # Only reachable if someone appends without the lock (e.g. by hand).
                raise WrongExpectedVersion(str(exc.detail or ""), -1, -1) from exc
            stored = {r[0]: (r[1], r[2]) for r in rows}

        results: list[AppendResult] = []
        by_key: dict[str, RecordedEvent] = dict(existing)
        for item in plan:
            if isinstance(item, str):
                continue
            e, version = item
            position, recorded_at = stored[e.event_id]
            rec = RecordedEvent(
                event_id=e.event_id,
                stream=e.stream,
                stream_version=version,
                position=position,
                recorded_at=recorded_at,
                data=e.data,
                metadata=e.metadata,
            )
            if e.metadata.idempotency_key:
                by_key[e.metadata.idempotency_key] = rec
            results.append(AppendResult(rec, False))
        # Second pass keeps input order with duplicates resolved to the stored event.
        out: list[AppendResult] = []
        it = iter(results)
        for item in plan:
            if isinstance(item, str):
                out.append(AppendResult(by_key[item], True))
            else:
                out.append(next(it))
        return out

    async def record_tracking(self, tracking: Tracking) -> bool:
        """Mark an event processed with no outputs. False if it already was."""
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "INSERT INTO tracking (consumer, event_id) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING RETURNING true",
                    tracking.consumer,
                    tracking.event_id,
                )
            )

    async def is_processed(self, consumer: str, event_id: uuid.UUID) -> bool:
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT true FROM tracking WHERE consumer = $1 AND event_id = $2",
                    consumer,
                    event_id,
                )
            )

    # --- reading ------------------------------------------------------------------------

    async def read_stream(self, stream: str, from_version: int = 1) -> list[RecordedEvent]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE stream = $1 AND stream_version >= $2 "
                "ORDER BY stream_version",
                stream,
                from_version,
            )
        return [row_to_event(r) for r in rows]

    async def read_streams(self, streams: Iterable[str]) -> dict[str, list[RecordedEvent]]:
        """Several streams in one round trip (act folds a job's and its pipeline's)."""
        names = list(streams)
        out: dict[str, list[RecordedEvent]] = {s: [] for s in names}
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE stream = ANY($1::text[]) "
                "ORDER BY stream, stream_version",
                names,
            )
        for r in rows:
            out[r[1]].append(row_to_event(r))
        return out

    async def stream_version(self, stream: str) -> int:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT max(stream_version) FROM events WHERE stream = $1", stream
            )
        return int(value or 0)

    async def read_all(
        self, from_position: int = 0, batch: int = 1000, *, types: Sequence[str] | None = None
    ) -> AsyncIterator[RecordedEvent]:
        """Every event after ``from_position`` in global order, fetched ``batch`` at a time."""
        position = from_position
        while True:
            async with self.pool.acquire() as conn:
                if types:
                    rows = await conn.fetch(
                        "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                        "FROM events WHERE position > $1 "
                        "AND type = ANY($3::text[]) ORDER BY position LIMIT $2",
                        position,
                        batch,
                        list(types),
                    )
                else:
                    rows = await conn.fetch(
                        "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                        "FROM events WHERE position > $1 "
                        "ORDER BY position LIMIT $2",
                        position,
                        batch,
                    )
            for r in rows:
                yield row_to_event(r)
            if len(rows) < batch:
                return
            position = rows[-1][3]

    async def get_by_key(self, idempotency_key: str) -> RecordedEvent | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE idempotency_key = $1",
                idempotency_key,
            )
        return row_to_event(row) if row else None

    async def get(self, event_id: uuid.UUID) -> RecordedEvent | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE event_id = $1",
                event_id,
            )
        return row_to_event(row) if row else None

    async def last_position(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM events"))

    # --- outbox -------------------------------------------------------------------------

    async def outbox_depth(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM outbox"))

    async def outbox_delete(self, positions: Sequence[int]) -> None:
        if not positions:
            return
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT outbox_delete($1::bigint[])", list(positions))


_INSERT = """
WITH ins AS (
    INSERT INTO events (event_id, stream, stream_version, type, schema_version, body, metadata,
                        idempotency_key)
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::int2[],
                         $6::bytea[], $7::bytea[], $8::text[])
    RETURNING event_id, position, recorded_at
), ob AS (
    INSERT INTO outbox (position) SELECT position FROM ins
)
SELECT event_id, position, recorded_at FROM ins
"""


def _links(events: Sequence[NewEvent], limit: int = 32) -> list[Link]:
    """Links to the traces the events came from, when they are not the current one (a batch
    of webhooks committed together: one append, many causes)."""
    current = trace.get_current_span().get_span_context()
    links: list[Link] = []
    seen: set[str] = set()
    for e in events:
        parent = e.metadata.traceparent
        if not parent or parent in seen or len(links) >= limit:
            continue
        seen.add(parent)
        ctx = trace.get_current_span(context_from_metadata(e.metadata)).get_span_context()
        if ctx.is_valid and ctx.trace_id != current.trace_id:
            links.append(Link(ctx))
    return links


_APPEND = (
    "SELECT ord, duplicate, position, recorded_at, stream_version, event_id, stream, type, "
    "schema_version, body, metadata FROM append_events($1, $2::uuid[], $3::text[], $4::text[], "
    "$5::int2[], $6::bytea[], $7::bytea[], $8::text[], $9::text[], $10::int4[], $11, $12)"
)

OUTBOX_CLAIM = """
SELECT e.event_id, e.stream, e.stream_version, e.position, e.recorded_at, e.type,
       e.schema_version, e.body, e.metadata
FROM outbox o JOIN events e ON e.position = o.position
WHERE o.created_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY o.position
LIMIT $2
FOR UPDATE OF o SKIP LOCKED
"""

__all__ = [
    "AlreadyProcessed",
    "AppendResult",
    "EventStore",
    "Tracking",
    "WrongExpectedVersion",
    "migrate",
    "row_to_event",
    "OUTBOX_CLAIM",
]
