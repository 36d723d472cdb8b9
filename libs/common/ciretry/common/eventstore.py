"""The event log on PostgreSQL (the ``EventLog`` port's production adapter): append-only, totally
ordered, idempotent, with outbox, tracking, followers' marks and act's open requests.

Every SQL statement of the event log is in this module (the read models' are in
``ciretry.audit.store``); the connection pool is private. Appends serialize on a
transaction-scoped advisory lock (one per schema), as pyeventsourcing's recorder does with its
table lock: positions then commit in the order they were assigned, so a follower reading
``read_all`` by position never skips an event that commits late. Batching keeps the lock cheap:
ingest appends many webhooks in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from importlib import resources
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind

from .eventlog import (
    AlreadyProcessed,
    AppendResult,
    BodyGroup,
    Claim,
    PendingRequest,
    ScannedEvent,
    TrackedAppend,
    Tracking,
    Undecodable,
    WrongExpectedVersion,
    tracked_rounds,
)
from .events import (
    Event,
    EventDecodeError,
    NewEvent,
    RecordedEvent,
    RetryRequested,
    UnknownEventType,
    decode_event,
    decode_metadata,
    encode,
)
from .telemetry import context_from_metadata, current_span, spans_recorded

#: A connection or a pool's proxy for one (both speak the same query API).
Connection = asyncpg.Connection | PoolConnectionProxy

#: Batches larger than this are appended with a few statements in one transaction instead of
#: the one-round-trip ``append_events`` call (see ``_append_statements``; docs/benchmarks.md).
LARGE_BATCH = 200

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Every query that decodes events selects these columns in this order (see row_to_event):
#: event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata


class _Connection(asyncpg.Connection):
    """A pool connection released without the pool's reset query unless asked for it.

    On release asyncpg rolls back any open transaction (always, whatever this returns) and
    then runs a reset query that unlocks session-level advisory locks, closes cursors, stops
    listening and resets session settings: one more round trip per use of a connection, and
    round trips (a system call each way) are most of what a decision in act costs. ciretry's
    queries keep no session state (advisory locks are transaction-scoped, settings are
    ``SET LOCAL``, cursors live inside transactions, nothing LISTENs); code that does take
    session state (act's claim: a session advisory lock) calls ``needs_reset`` first. The one
    exception is a finished claim's lock (``exclusive``: on a key no one can take any more),
    released by the next claim on the connection."""

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


#: How long ``Claim.held`` waits for PostgreSQL before it answers "not held" (fail closed).
CLAIM_CHECK_TIMEOUT_S = 5.0

#: What a connection that is gone raises (a restart, a failover, a terminated backend); a lost
#: claim session's ``_SessionLost`` is an ``OSError`` too.
_CONNECTION_LOST = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def claim_lock(schema: str, key: str) -> int:
    """The session advisory lock ``EventStore.exclusive`` takes for ``key`` in ``schema``."""
    digest = hashlib.blake2b(f"{schema}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _ClaimSession:
    """One pooled connection whose session holds the advisory locks of every claim this store
    has open (``EventStore.exclusive``). A claim used to hold a pooled connection of its own
    for the length of its work, a provider call included: with a provider answering in 100 ms,
    act's pool (16) carried out at most ~60 requests a second, and its decisions and outcomes
    waited for connections meanwhile (docs/benchmarks.md, "Stop 28"). One session holds any
    number of locks; its statements are short and run one at a time (``_run``).

    A session lock is reentrant within its session: PostgreSQL would grant a second claim of
    the same key here. ``keys`` (every lock this session holds or is taking) refuses it first,
    as PostgreSQL refuses another session's. The locks of claims whose work is done
    (``leftover``) are released by the session's next statement, or by the pool's reset when
    the session closes (its last claim ended). A statement that fails or is interrupted loses
    the session (``lost``): its connection is terminated, every lock on it is gone, each of its
    claims answers ``held`` with False (fail closed), and the next claim opens a new session.

    Takes and checks are answered in rounds (``_ask``): everything asked while a statement runs
    goes into the next one, one round trip for a burst of claims where each used to wait for
    its own in turn (act makes two or three per retry: the take, a check before each call)."""

    __slots__ = ("conn", "keys", "leftover", "lost", "users", "statements", "_turn", "_asked",
                 "_answering")  # fmt: skip

    def __init__(self, conn: PoolConnectionProxy[Any]) -> None:
        self.conn = conn
        self.keys: set[int] = set()
        self.leftover: list[int] = []
        self.lost = False
        #: Claims using the session (taking, held or giving back); the last one closes it.
        self.users = 0
        #: Statements the session has run (for tests: a round answers many claims).
        self.statements = 0
        self._turn = asyncio.Lock()
        #: Takes (a lock) and checks (no lock) for the next round, each with its answer.
        self._asked: list[tuple[int | None, str | None, asyncio.Future[bool | None]]] = []
        self._answering: asyncio.Task[None] | None = None

    async def _run(self, query: str, *args: Any) -> Any:
        async with self._turn:
            if self.lost:
                raise _SessionLost("the claim session was lost")
            try:
                self.statements += 1
                return await self.conn.fetchval(query, *args)
            except BaseException:
                # Failed, timed out or cancelled half-way: the session's state is not known.
                self.lose()
                raise

    async def _ask(self, lock: int | None, unless: str | None) -> bool | None:
        """With ``lock``: take it unless ``unless`` is recorded (None: not taken, recorded).
        Without: whether ``unless`` is not recorded (True when None: the session answers). In
        the next round (class doc); a caller interrupted while waiting (its timeout) loses the
        session, as an interrupted statement did: its take may have been granted meanwhile."""
        if self.lost:
            raise _SessionLost("the claim session was lost")
        answer: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._asked.append((lock, unless, answer))
        if self._answering is None:
            self._answering = asyncio.create_task(self._answer_rounds())
        try:
            return await answer
        except asyncio.CancelledError:
            self.lose()
            raise

    async def _answer_rounds(self) -> None:
        asked: list[tuple[int | None, str | None, asyncio.Future[bool | None]]] = []
        try:
            while self._asked:
                async with self._turn:  # after an unlock under way (``give_back``)
                    asked, self._asked = self._asked, []
                    released, self.leftover = self.leftover, []
                    if self.lost:
                        raise _SessionLost("the claim session was lost")
                    self.statements += 1
                    answers = await self.conn.fetchval(
                        _CLAIM_ROUND,
                        released,
                        [lock for lock, _, _ in asked],
                        [unless for _, unless, _ in asked],
                    )
                    self.keys.difference_update(released)
                for (*_, answer), value in zip(asked, answers, strict=True):
                    if not answer.done():
                        answer.set_result(value)
        except BaseException as exc:
            # Failed, or cancelled half-way: the session's state is not known. Every claim
            # waiting for it learns so (the takes' ``exclusive`` opens another session).
            with contextlib.suppress(asyncpg.InterfaceError):  # released: nothing to end
                self.lose()
            failure = exc if isinstance(exc, Exception) else _SessionLost(type(exc).__name__)
            for *_, answer in (*asked, *self._asked):
                if not answer.done():
                    answer.set_exception(failure)
            self._asked = []
            if failure is not exc:
                raise
        finally:
            self._answering = None

    def lose(self) -> None:
        if not self.lost:
            self.close()
            self.conn.terminate()  # the backend ends, and its locks with it

    def close(self) -> None:
        """No more statements: the session is lost, or its connection went back to the pool
        (a claim asking after its block ended is told it holds nothing)."""
        self.lost = True
        self.keys.clear()
        self.leftover.clear()

    async def take(self, lock: int, unless: str | None) -> bool:
        if lock in self.keys:
            # Another claim of this process holds it (or held it, its work done), as long as
            # the session lives: a session found lost here is replaced (``exclusive``).
            await self._ask(None, None)
            return False
        self.keys.add(lock)
        got = await self._ask(lock, unless)
        if not got:
            self.keys.discard(lock)
        return bool(got)

    async def give_back(self, lock: int, *, done: bool) -> None:
        if self.lost:
            return  # a connection that is gone took its locks with it
        if done:
            # No one can take the key any more (its event is checked before the lock): the
            # unlock goes with the next statement, a round trip saved.
            self.leftover.append(lock)
            return
        released, self.leftover = [lock, *self.leftover], []
        with contextlib.suppress(*_CONNECTION_LOST):
            await self._run(_UNLOCK, released)
        self.keys.difference_update(released)

    async def held(self, lock: int, unless: str | None) -> bool:
        if self.lost or lock not in self.keys:
            return False
        try:
            async with asyncio.timeout(CLAIM_CHECK_TIMEOUT_S):
                # A statement after the lock: its snapshot sees an outcome recorded by a holder
                # that unlocked while the claiming statement ran (see ``exclusive``).
                return bool(await self._ask(None, unless)) and lock in self.keys
        except _CONNECTION_LOST:
            return False


class _SessionLost(ConnectionError):
    """The claim session was lost before this statement (``_ClaimSession.lose``)."""


class _SessionClaim:
    """``EventStore.exclusive``'s claim: a session advisory lock held by the store's claim
    session (``_ClaimSession``). The lock lives as long as the session (nothing but the block's
    own release ends it sooner), so the session still answering is the claim still held. With
    ``unless``, the same round trip asks whether the work's outcome has been recorded
    meanwhile (``held``)."""

    __slots__ = ("_session", "_lock", "_taken", "_unless", "is_done")

    def __init__(
        self, session: _ClaimSession, lock: int, taken: bool, unless: str | None = None
    ) -> None:
        self._session = session
        self._lock = lock
        self._taken = taken
        self._unless = unless
        self.is_done = False

    def __bool__(self) -> bool:
        return self._taken

    def done(self) -> None:
        self.is_done = self._taken and self._unless is not None

    async def held(self) -> bool:
        return self._taken and await self._session.held(self._lock, self._unless)


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


class MigrationsPending(RuntimeError):
    """Migrations are pending and this role may not apply them (a runtime role)."""


async def _applied(conn: Connection, schema: str) -> set[str] | None:
    """The migrations applied to ``schema``; None when it has none yet."""
    table = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".schema_migrations')
    if table is None:
        return None
    # Identifiers cannot be bind parameters; the schema name was validated by the caller.
    rows = await conn.fetch(f'SELECT name FROM "{schema}".schema_migrations')  # noqa: S608
    return {r[0] for r in rows}


def _migration_files() -> list[Any]:
    migrations = resources.files("ciretry.common.migrations").iterdir()
    return sorted((f for f in migrations if f.name.endswith(".sql")), key=lambda f: f.name)


async def migrate(conn: Connection, schema: str) -> list[str]:
    """Apply pending migrations to ``schema`` (created if missing). Returns the names applied.

    Concurrent callers (several replicas starting at once) serialize on an advisory lock. When
    nothing is pending, nothing needs privileges beyond reading ``schema_migrations``: a
    service running as the runtime role (0007) starts; with migrations pending it stops with
    ``MigrationsPending`` (the owner runs ``ciretry migrate`` first).
    """
    check_schema_name(schema)
    done = await _applied(conn, schema)
    if done is not None and all(f.name in done for f in _migration_files()):
        return []
    applied: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", _advisory_key("migrate:" + schema)
            )
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
                "name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await _applied(conn, schema) or set()
            await conn.execute(f'SET LOCAL search_path TO "{schema}"')
            for file in _migration_files():
                if file.name in done:
                    continue
                await conn.execute(file.read_text())
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_migrations (name) VALUES ($1)',  # noqa: S608
                    file.name,
                )
                applied.append(file.name)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise MigrationsPending(
            f"migrations are pending in schema {schema!r} and this database role may not apply "
            f"them ({exc}): run `ciretry migrate` with the owner's CIRETRY_DATABASE_URL first"
        ) from None
    return applied


async def grant_runtime(conn: Connection, schema: str, role: str, password: str = "") -> str:
    """Create the runtime ``role`` if missing (and may), give it ``password`` (LOGIN) when one
    is given, and grant it what the services need in ``schema`` (migration 0007). Returns
    'created', 'exists' or 'cannot_create' (then nothing was granted). Run as the owner, after
    ``migrate``."""
    check_schema_name(schema)
    async with conn.transaction():
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        outcome = str(await conn.fetchval("SELECT ciretry_ensure_role($1, $2)", role, password))
        if outcome != "cannot_create":
            await conn.execute("SELECT ciretry_grant_runtime($1)", role)
    return outcome


class EventStore:
    """The event log of one schema, over an asyncpg pool (private: every query is here)."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "public") -> None:
        self._pool = pool
        self.schema = check_schema_name(schema)
        self._lock_key = _advisory_key(schema)
        #: The session holding the advisory locks of the claims open now (``exclusive``).
        self._claim_session: _ClaimSession | None = None
        self._claim_opening = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.schema

    @property
    def pool_size(self) -> int:
        return int(self._pool.get_max_size())

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection, for the read-model stores that live beside the log in the same
        database (``ciretry.audit.store``); nothing else runs SQL (a test pins it)."""
        async with self._pool.acquire() as conn:
            yield conn

    @classmethod
    async def connect(
        cls,
        dsn: str,
        schema: str = "public",
        *,
        min_size: int = 1,
        max_size: int = 10,
        key_lookups: bool = False,
    ) -> EventStore:
        """``key_lookups``: the sessions of a service, whose every query finds its rows through
        an index; the planner is told so (``enable_seqscan = off``). A plan PostgreSQL caches
        (a prepared statement's, a PL/pgSQL function's) while the log is still small scans it,
        and keeps scanning it as it grows, until an ANALYZE replaces the plan: on a fresh
        deployment under load, that was every append reading the whole log (docs/architecture.md,
        "Plans that outlive an empty log")."""
        check_schema_name(schema)
        settings = {"search_path": f'"{schema}"'}
        if key_lookups:
            settings["enable_seqscan"] = "off"
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings=settings,
            connection_class=_Connection,
        )
        return cls(pool, schema)

    async def close(self) -> None:
        await self._pool.close()

    async def migrate(self) -> list[str]:
        async with self._pool.acquire() as conn:
            return await migrate(conn, self.schema)

    async def grant_runtime(self, role: str, password: str = "") -> str:
        """``grant_runtime`` on this schema (as the owner, after ``migrate``)."""
        async with self._pool.acquire() as conn:
            return await grant_runtime(conn, self.schema, role, password)

    async def ping(self) -> None:
        async with self._pool.acquire(timeout=2) as conn:
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
        with _append_span(events):
            async with self._pool.acquire() as conn:
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
        batch = _Encoded(events)
        try:
            rows = await conn.fetch(
                _APPEND,
                self._lock_key,
                *batch.columns(),
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
        batch.store(rows)
        return batch.results(range(len(events)))

    async def append_tracked(
        self, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        """Several units, each with its own tracking row, in one transaction per run of
        ``tracked_rounds`` (almost always one); see the port. Without tracking rows it is ``append_batch`` of all
        their events (as ingest's group commit has always appended)."""
        if not any(u.tracking is not None for u in units):
            flat = await self.append_batch([e for u in units for e in u.events])
            out: list[list[AppendResult] | AlreadyProcessed] = []
            start = 0
            for u in units:
                out.append(flat[start : start + len(u.events)])
                start += len(u.events)
            return out
        out = []
        for run in tracked_rounds(units):
            out.extend(await self._append_round(units[run.start : run.stop]))
        return out

    async def _append_round(
        self, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        """Units whose tracking rows differ, and whose idempotency keys repeat only after an
        untracked unit's (never skipped), in one transaction."""
        events = [e for u in units for e in u.events]
        with _append_span(
            events, {"ciretry.tracking.count": sum(u.tracking is not None for u in units)}
        ):
            async with self._pool.acquire() as conn:
                if len(events) > LARGE_BATCH:
                    async with conn.transaction():
                        return await self._append_round_statements(conn, units)
                return await self._append_round_in(conn, units, events)

    async def _append_round_in(
        self, conn: Connection, units: Sequence[TrackedAppend], events: Sequence[NewEvent]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        """One statement, one round trip: ``append_tracked_events`` (migration 0010)."""
        batch = _Encoded(events)
        spans: list[range] = []  # per unit: its inputs
        unit_of_input: list[int] = []  # per input: its unit, 1-based
        for n, u in enumerate(units, 1):
            spans.append(range(len(unit_of_input), len(unit_of_input) + len(u.events)))
            unit_of_input.extend([n] * len(u.events))
        unit_of = [unit_of_input[i] for i in batch.sent_inputs]
        try:
            rows = await conn.fetch(
                _APPEND_TRACKED,
                self._lock_key,
                *batch.columns(),
                unit_of,
                [u.tracking.consumer if u.tracking is not None else None for u in units],
                [u.tracking.event_id if u.tracking is not None else None for u in units],
            )
        except asyncpg.UniqueViolationError as exc:
            # Only reachable if someone appends without the lock (e.g. by hand).
            raise WrongExpectedVersion(str(exc.detail or ""), -1, -1) from exc
        skipped = {r[0] for r in rows if r[1] is None}
        batch.store([r for r in rows if r[1] is not None])
        out: list[list[AppendResult] | AlreadyProcessed] = []
        for n, (u, inputs) in enumerate(zip(units, spans, strict=True), 1):
            if n in skipped:
                assert u.tracking is not None
                out.append(AlreadyProcessed(u.tracking.consumer, u.tracking.event_id))
            else:
                out.append(batch.results(inputs))
        return out

    async def _append_round_statements(
        self, conn: Connection, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        """Large rounds: the tracking rows in one statement, then ``_append_statements`` with
        the events of the units not already processed, in the caller's transaction."""
        wanted = sorted(
            {(u.tracking.consumer, u.tracking.event_id) for u in units if u.tracking is not None}
        )
        rows = await conn.fetch(
            "INSERT INTO tracking (consumer, event_id) "
            "SELECT * FROM unnest($1::text[], $2::uuid[]) "
            "ON CONFLICT DO NOTHING RETURNING consumer, event_id",
            [c for c, _ in wanted],
            [e for _, e in wanted],
        )
        inserted = {(r[0], r[1]) for r in rows}
        fresh = [
            u.tracking is None or (u.tracking.consumer, u.tracking.event_id) in inserted
            for u in units
        ]
        kept = [e for u, ok in zip(units, fresh, strict=True) if ok for e in u.events]
        results = await self._append_statements(conn, kept, {}, None) if kept else []
        out: list[list[AppendResult] | AlreadyProcessed] = []
        start = 0
        for u, ok in zip(units, fresh, strict=True):
            if not ok:
                assert u.tracking is not None
                out.append(AlreadyProcessed(u.tracking.consumer, u.tracking.event_id))
                continue
            out.append(results[start : start + len(u.events)])
            start += len(u.events)
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
        async with self._pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "INSERT INTO tracking (consumer, event_id) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING RETURNING true",
                    tracking.consumer,
                    tracking.event_id,
                )
            )

    async def is_processed(self, consumer: str, event_id: uuid.UUID) -> bool:
        async with self._pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT true FROM tracking WHERE consumer = $1 AND event_id = $2",
                    consumer,
                    event_id,
                )
            )

    # --- reading ------------------------------------------------------------------------

    async def read_stream(self, stream: str, from_version: int = 1) -> list[RecordedEvent]:
        async with self._pool.acquire() as conn:
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
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE stream = ANY($1::text[]) "
                "ORDER BY stream, stream_version",
                names,
            )
        for r in rows:
            out[r[1]].append(row_to_event(r))
        return out

    async def read_streams_after(self, versions: dict[str, int]) -> list[RecordedEvent]:
        """What was appended to each stream after the given version, in one round trip: how a
        follower keeping a fold of several streams (act's attempt chains) catches up. Ordered
        by stream, then version."""
        if not versions:
            return []
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT e.event_id, e.stream, e.stream_version, e.position, e.recorded_at, e.type, "
                "e.schema_version, e.body, e.metadata FROM events e "
                "JOIN unnest($1::text[], $2::int4[]) AS s(stream, version) "
                "ON e.stream = s.stream AND e.stream_version > s.version "
                "ORDER BY e.stream, e.stream_version",
                list(versions),
                list(versions.values()),
            )
        return [row_to_event(r) for r in rows]

    async def read_streams_after_and_get(
        self, versions: dict[str, int], event_ids: Sequence[uuid.UUID]
    ) -> tuple[list[RecordedEvent], list[RecordedEvent]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                _AFTER_AND_GET, list(versions), list(versions.values()), list(event_ids)
            )
        after: list[RecordedEvent] = []
        got: list[RecordedEvent] = []
        for r in rows:
            (got if r[9] else after).append(row_to_event(r))
        return after, got

    async def stream_version(self, stream: str) -> int:
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT max(stream_version) FROM events WHERE stream = $1", stream
            )
        return int(value or 0)

    async def read_all(
        self, from_position: int = 0, batch: int = 1000, *, types: Sequence[str] | None = None
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Every event after ``from_position`` in global order, fetched ``batch`` at a time."""
        position = from_position
        while True:
            async with self._pool.acquire() as conn:
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
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE idempotency_key = $1",
                idempotency_key,
            )
        return row_to_event(row) if row else None

    async def get(self, event_id: uuid.UUID) -> RecordedEvent | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE event_id = $1",
                event_id,
            )
        return row_to_event(row) if row else None

    async def get_many(self, event_ids: Sequence[uuid.UUID]) -> list[RecordedEvent]:
        if not event_ids:
            return []
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body, metadata "
                "FROM events WHERE event_id = ANY($1::uuid[]) ORDER BY position",
                list(event_ids),
            )
        return [row_to_event(r) for r in rows]

    async def last_position(self) -> int:
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM events"))

    # --- outbox -------------------------------------------------------------------------

    async def outbox_depth(self) -> int:
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM outbox"))

    async def outbox_delete(self, positions: Sequence[int]) -> None:
        if not positions:
            return
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT outbox_delete($1::bigint[])", list(positions))

    async def read_positions(self, positions: Sequence[int]) -> list[RecordedEvent | Undecodable]:
        """The events at ``positions`` in position order; one this code cannot decode comes
        back as ``Undecodable`` (so that a follower can reject it rather than stop)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_READ_POSITIONS, list(positions))
        out: list[RecordedEvent | Undecodable] = []
        for row in rows:
            try:
                out.append(row_to_event(row))
            except (EventDecodeError, UnknownEventType) as exc:
                out.append(Undecodable(int(row[3]), exc))
        return out

    async def read_event(self, stream: str, version: int) -> RecordedEvent | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_READ_ONE, stream, version)
        return row_to_event(row) if row else None

    @asynccontextmanager
    async def outbox_claim(self, grace: float, limit: int) -> AsyncIterator[list[RecordedEvent]]:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_OUTBOX_CLAIM, grace, limit)
            events = [row_to_event(r) for r in rows]
            yield events
            if events:
                await conn.execute(
                    "DELETE FROM outbox WHERE position = ANY($1::bigint[])",
                    [e.position for e in events],
                )

    # --- followers ----------------------------------------------------------------------

    async def follower_claim(self, consumer: str, owner: uuid.UUID, lease: float) -> bool:
        async with self._pool.acquire() as conn:
            return await conn.fetchrow(_FOLLOWER_CLAIM, consumer, owner, lease) is not None

    async def follower_release(self, consumer: str, owner: uuid.UUID) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(_FOLLOWER_RELEASE, consumer, owner)

    async def follower_mark(self, consumer: str) -> int:
        async with self._pool.acquire() as conn:
            return int(await conn.fetchval(_FOLLOWER_MARK, consumer) or 0)

    async def follower_save_mark(self, consumer: str, position: int) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(_FOLLOWER_SAVE_MARK, consumer, position)

    async def follower_scan(
        self, consumer: str, types: Sequence[str], after: int, limit: int
    ) -> list[ScannedEvent]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_FOLLOWER_SCAN, consumer, list(types), after, limit)
        return [ScannedEvent(int(r[0]), r[1], r[2], bool(r[3])) for r in rows]

    async def follower_tracked(
        self, consumer: str, event_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        if not event_ids:
            return set()
        async with self._pool.acquire() as conn:
            return {r[0] for r in await conn.fetch(_FOLLOWER_TRACKED, consumer, list(event_ids))}

    async def follower_oldest(self, consumer: str, types: Sequence[str]) -> dt.datetime | None:
        async with self._pool.acquire() as conn:
            value: dt.datetime | None = await conn.fetchval(_FOLLOWER_OLDEST, consumer, list(types))
        return value

    # --- act ----------------------------------------------------------------------------

    async def verdict_signature_counts(
        self, signatures: Sequence[str], since: dt.datetime, *, other_than_pipeline: str
    ) -> dict[str, int]:
        if not signatures:
            return {}
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                _VERDICT_SIGNATURE_COUNTS, list(signatures), since, other_than_pipeline
            )
        return {row[0]: int(row[1]) for row in rows}

    async def pending_requests(self, after: int, limit: int) -> list[PendingRequest]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_PENDING, after, limit)
        out = []
        for row in rows:
            request = decode_event(row[1], row[2], row[3])
            assert isinstance(request, RetryRequested)
            out.append(PendingRequest(int(row[0]), request, int(row[4]), row[5]))
        return out

    @asynccontextmanager
    async def exclusive(self, key: str, *, unless: str | None = None) -> AsyncIterator[Claim]:
        """A session advisory lock on ``key`` for the block: a second holder skips it; a crash
        releases it with the connection, and so does a lost connection (``Claim.held``). With
        ``unless``, an event recorded under that idempotency key (the work's outcome) also
        skips it, checked in the claiming round trip. That statement's snapshot predates the
        lock: a holder that recorded the outcome and unlocked in between goes unseen there, so
        ``held`` asks again (a later statement, a later snapshot) in the round trip it makes
        anyway, just before the work that only one may do.

        Every claim of the store is on one session, on one pooled connection, whatever their
        number and however long their work (``_ClaimSession``). A claim whose work is ``done``
        (its ``unless`` event recorded) keeps its lock past the block: no one can take that key
        any more, so the unlock, a round trip, goes with the session's next statement, or with
        the pool's reset when the session closes."""
        lock = claim_lock(self.schema, key)
        session, got = await self._take_claim(lock, unless)
        try:
            claim = _SessionClaim(session, lock, got, unless)
            try:
                yield claim
            finally:
                if got:
                    await session.give_back(lock, done=claim.is_done)
        finally:
            await self._leave_claim_session(session)

    async def _take_claim(self, lock: int, unless: str | None) -> tuple[_ClaimSession, bool]:
        """Join the claim session and take ``lock`` on it; the caller leaves the session. A
        session found gone (a restart, a killed backend) is replaced once: its claims learn it
        from ``held``, this one takes its lock on the new session."""
        retried = False
        while True:
            session = await self._join_claim_session()
            try:
                return session, await session.take(lock, unless)
            except BaseException as exc:
                await self._leave_claim_session(session)
                if retried or not isinstance(exc, _CONNECTION_LOST):
                    raise
                retried = True

    async def _join_claim_session(self) -> _ClaimSession:
        async with self._claim_opening:
            session = self._claim_session
            if session is None or session.lost:
                session = self._claim_session = _ClaimSession(await self._pool.acquire())
            session.users += 1
            return session

    async def _leave_claim_session(self, session: _ClaimSession) -> None:
        session.users -= 1
        if session.users:
            return
        if self._claim_session is session:
            self._claim_session = None
        # The pool's reset releases the locks left over (work done), if any.
        needs_reset(session.conn, bool(session.keys) and not session.lost)
        session.close()
        await self._pool.release(session.conn)

    async def body_groups(
        self, stream: str, types: Sequence[str], schema_version: int
    ) -> AsyncGenerator[BodyGroup, None]:
        """Ranges of ``BODY_RANGE`` versions are read by up to ``BODY_CONNECTIONS`` connections
        at once: PostgreSQL produces the next ranges while the caller decodes and folds this
        one. Versions are contiguous and rows never change, so every range up to the version
        read first is the same whenever it is read: no shared snapshot is needed."""
        async with self._pool.acquire() as first:
            last = await first.fetchval(_LAST_VERSION, stream)
            if not last:
                return
            ranges = [
                (lo, min(lo + BODY_RANGE - 1, last)) for lo in range(1, last + 1, BODY_RANGE)
            ]
            loop = asyncio.get_running_loop()
            results: list[asyncio.Future[list[Any]]] = [loop.create_future() for _ in ranges]
            todo = iter(enumerate(ranges))
            kinds = list(types)

            async def read(conn: Any) -> None:
                for i, (lo, hi) in todo:
                    try:
                        rows = await conn.fetch(
                            _GROUPS, stream, lo, hi, kinds, BODY_GROUP, schema_version
                        )
                    except BaseException as exc:
                        results[i].set_exception(exc)
                        raise
                    results[i].set_result(rows)

            async def helper() -> None:
                async with self._pool.acquire() as conn:
                    await read(conn)

            helpers = min(len(ranges), max(1, min(BODY_CONNECTIONS, self.pool_size))) - 1
            tasks = [asyncio.ensure_future(read(first))]
            tasks += [asyncio.ensure_future(helper()) for _ in range(helpers)]
            try:
                for result in results:
                    for body, versions, other, upto in await result:
                        yield BodyGroup(body, list(versions or ()), bool(other), int(upto))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for result in results:  # retrieved, so an early exit leaves no warning behind
                    if result.done() and not result.cancelled():
                        result.exception()

    async def stream_bodies(
        self, prefix: str, types: Sequence[str], schema_version: int
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """Ranges of streams are read over several connections sharing one snapshot, so
        PostgreSQL aggregates the next ranges while the caller decodes and folds this one."""
        kinds = list(types)
        workers = max(1, min(BODIES_CONNECTIONS, self.pool_size))
        async with (
            self._pool.acquire() as first,
            first.transaction(isolation="repeatable_read", readonly=True),
        ):
            streams = [r[0] for r in await first.fetch(_STREAMS, prefix, prefix + "%")]
            if not streams:
                return
            snapshot = await first.fetchval("SELECT pg_export_snapshot()")
            ranges = [
                (streams[i], streams[min(i + BODIES_CHUNK, len(streams)) - 1])
                for i in range(0, len(streams), BODIES_CHUNK)
            ]
            queue: asyncio.Queue[list[Any] | BaseException | None] = asyncio.Queue(workers * 2)
            todo = iter(ranges)

            async def fold(conn: Any) -> None:
                try:
                    for lo, hi in todo:
                        await queue.put(
                            await conn.fetch(_BODIES, lo, hi, prefix + "%", kinds, schema_version)
                        )
                except BaseException as exc:  # handed to the consumer below
                    await queue.put(exc)
                    raise
                finally:
                    await queue.put(None)

            async def helper() -> None:
                async with (
                    self._pool.acquire() as conn,
                    conn.transaction(isolation="repeatable_read", readonly=True),
                ):
                    # The snapshot id comes from pg_export_snapshot(), never from input.
                    await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                    await fold(conn)

            tasks = [asyncio.ensure_future(fold(first))]
            tasks += [asyncio.ensure_future(helper()) for _ in range(workers - 1)]
            try:
                running = len(tasks)
                while running:
                    item = await queue.get()
                    if item is None:
                        running -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        for stream, body in item:
                            yield stream, body
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


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


class _Encoded:
    """A batch of events as ``append_events``' columns, and its rows back as results.

    Keys repeated inside the batch resolve to their first occurrence; only first occurrences
    are sent. ``plan[i]`` is the index (among those sent) input i resolves to."""

    __slots__ = ("bodies", "ids", "keys", "metas", "plan", "sent", "sent_inputs", "stored",
                 "streams", "types", "versions")

    def __init__(self, events: Sequence[NewEvent]) -> None:
        self.plan: list[int] = []
        self.sent: list[NewEvent] = []
        #: The input index of each sent event.
        self.sent_inputs: list[int] = []
        self.ids: list[uuid.UUID] = []
        self.streams: list[str] = []
        self.types: list[str] = []
        self.versions: list[int] = []
        self.bodies: list[bytes] = []
        self.metas: list[bytes] = []
        self.keys: list[str | None] = []
        self.stored: list[AppendResult | None] = []
        first: dict[str, int] = {}
        for i, e in enumerate(events):
            meta = e.metadata
            key = meta.idempotency_key
            if key:
                j = first.get(key)
                if j is not None:
                    self.plan.append(j)
                    continue
                first[key] = len(self.sent)
            self.plan.append(len(self.sent))
            self.sent.append(e)
            self.sent_inputs.append(i)
            data = e.data
            self.ids.append(e.event_id)
            self.streams.append(e.stream)
            self.types.append(data.type_name())
            self.versions.append(data.schema_version)
            self.bodies.append(encode(data))
            self.metas.append(encode(meta))
            self.keys.append(key or None)

    def columns(self) -> tuple[list[Any], ...]:
        return (self.ids, self.streams, self.types, self.versions, self.bodies, self.metas,
                self.keys)  # fmt: skip

    def store(self, rows: Sequence[asyncpg.Record]) -> None:
        """Take the function's rows: stored events (matched by id), duplicates (by ord)."""
        stored: list[AppendResult | None] = [None] * len(self.sent)
        index = {event_id: i for i, event_id in enumerate(self.ids)}
        for r in rows:
            if r[1]:
                # Key already in the log: the stored event, not ours.
                rec = row_to_event((r[5], r[6], r[4], r[2], r[3], r[7], r[8], r[9], r[10]))
                stored[r[0] - 1] = AppendResult(rec, True)
            else:
                i = index[r[5]]
                e = self.sent[i]
                rec = RecordedEvent(
                    event_id=e.event_id,
                    stream=e.stream,
                    stream_version=r[4],
                    position=r[2],
                    recorded_at=r[3],
                    data=e.data,
                    metadata=e.metadata,
                )
                stored[i] = AppendResult(rec, False, self.bodies[i])
        self.stored = stored

    def results(self, inputs: Iterable[int]) -> list[AppendResult]:
        """The results of ``inputs`` (input indexes, ascending), in order: a repeat of a key
        earlier in the batch is a duplicate of its first occurrence's event."""
        out: list[AppendResult] = []
        for i in inputs:
            j = self.plan[i]
            result = self.stored[j]
            assert result is not None
            if self.sent_inputs[j] == i:
                out.append(result)
            else:  # a repeat, inside this batch, of an earlier input's key
                out.append(AppendResult(result.event, True))
        return out


def _append_span(
    events: Sequence[NewEvent], extra: dict[str, int] | None = None
) -> AbstractContextManager[Span]:
    """The CLIENT span of one append transaction, linked to the traces its events came from."""
    return current_span(
        "event append",
        scope="ciretry.eventstore",
        kind=SpanKind.CLIENT,
        links=_links(events),
        attributes={
            "db.system": "postgresql",
            "db.operation.name": "INSERT",
            "db.collection.name": "events",
            "ciretry.events.count": len(events),
            **(extra or {}),
        },
    )


def _links(events: Sequence[NewEvent], limit: int = 32) -> list[Link]:
    """Links to the traces the events came from, when they are not the current one (a batch
    of webhooks committed together: one append, many causes)."""
    if not spans_recorded():
        return []  # only a recorded span keeps its links
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

_APPEND_TRACKED = (
    "SELECT ord, duplicate, position, recorded_at, stream_version, event_id, stream, type, "
    "schema_version, body, metadata FROM append_tracked_events($1, $2::uuid[], $3::text[], "
    "$4::text[], $5::int2[], $6::bytea[], $7::bytea[], $8::text[], $9::int4[], $10::text[], "
    "$11::uuid[])"
)

_UNLOCK = "SELECT count(pg_advisory_unlock(k)) FROM unnest($1::bigint[]) AS k"

# A claim session's round (``_ClaimSession._ask``), one answer per thing asked, in order. A take
# ($2 a lock) takes it only when its work has no outcome ($3) yet: NULL (not taken) when it has,
# evaluated lazily by CASE, so a finished request takes no lock to release. A check ($2 NULL):
# whether the outcome is still unrecorded. First (the materialized CTE is counted before any
# CASE is evaluated), the session's leftover locks of claims whose work was done ($1).
_CLAIM_ROUND = """
WITH leftover AS MATERIALIZED (SELECT pg_advisory_unlock(k) FROM unnest($1::bigint[]) AS k)
SELECT array_agg(
    CASE
        WHEN a.unless IS NOT NULL
             AND EXISTS (SELECT 1 FROM events WHERE idempotency_key = a.unless)
        THEN CASE WHEN a.lock IS NULL THEN false END
        WHEN a.lock IS NULL THEN true
        ELSE pg_try_advisory_lock(a.lock)
    END ORDER BY a.n)
FROM (SELECT count(*) FROM leftover) AS released,
     unnest($2::bigint[], $3::text[]) WITH ORDINALITY AS a(lock, unless, n)
"""

# Verdicts of the window by ``recorded_at`` (indexed), counted by their signature's id.
_VERDICT_SIGNATURE_COUNTS = """
SELECT j.b -> 'signature' ->> 'id' AS signature, count(*)
FROM events e, LATERAL (SELECT convert_from(e.body, 'UTF8')::jsonb AS b) j
WHERE e.recorded_at >= $2
  AND e.type = 'VerdictReached'
  AND j.b ->> 'pipeline_id' IS DISTINCT FROM $3
  AND j.b -> 'signature' ->> 'id' = ANY($1::text[])
GROUP BY 1
"""

_OUTBOX_CLAIM = """
SELECT e.event_id, e.stream, e.stream_version, e.position, e.recorded_at, e.type,
       e.schema_version, e.body, e.metadata
FROM outbox o JOIN events e ON e.position = o.position
WHERE o.created_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY o.position
LIMIT $2
FOR UPDATE OF o SKIP LOCKED
"""

_READ_POSITIONS = (
    "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, "
    "body, metadata FROM events WHERE position = ANY($1::bigint[]) ORDER BY position"
)

#: ``read_streams_after`` and ``get_many`` in one statement; the last column says which. The
#: order of the union is the outer ORDER BY's: by stream and version, then by position.
_AFTER_AND_GET = """
SELECT * FROM (
    SELECT e.event_id, e.stream, e.stream_version, e.position, e.recorded_at, e.type,
           e.schema_version, e.body, e.metadata, false AS got
    FROM events e
    JOIN unnest($1::text[], $2::int4[]) AS s(stream, version)
      ON e.stream = s.stream AND e.stream_version > s.version
    UNION ALL
    SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body,
           metadata, true
    FROM events WHERE event_id = ANY($3::uuid[])
) x
ORDER BY got, CASE WHEN got THEN '' ELSE stream END,
         CASE WHEN got THEN position ELSE stream_version END
"""

_READ_ONE = (
    "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, "
    "body, metadata FROM events WHERE stream = $1 AND stream_version = $2"
)

# --- followers (``catchup``) -----------------------------------------------------------------

#: Events of the follower's types after $3, oldest first, with whether $1 has tracked each.
#: One index range scan per type, one primary-key probe of ``tracking`` per event: the lateral
#: LIMIT keeps the probe a probe (as an EXISTS, the planner may hash every tracking row of the
#: consumer instead, a cost that grows with the history).
_FOLLOWER_SCAN = """
SELECT e.position, e.event_id, e.recorded_at, t.done IS NOT NULL
FROM unnest($2::text[]) AS k(type)
CROSS JOIN LATERAL (
    SELECT position, event_id, recorded_at FROM events
    WHERE type = k.type AND position > $3
    ORDER BY position LIMIT $4
) AS e
LEFT JOIN LATERAL (
    SELECT true AS done FROM tracking
    WHERE consumer = $1 AND event_id = e.event_id LIMIT 1
) AS t ON true
ORDER BY e.position
LIMIT $4
"""

#: Which of the events $2 $1 has tracked (a probe each, as in _FOLLOWER_SCAN).
_FOLLOWER_TRACKED = """
SELECT u.id FROM unnest($2::uuid[]) AS u(id)
CROSS JOIN LATERAL (
    SELECT 1 FROM tracking t WHERE t.consumer = $1 AND t.event_id = u.id LIMIT 1
) AS t
"""

_FOLLOWER_MARK = "SELECT position FROM follower_positions WHERE consumer = $1"

#: Take the follower's catch-up lease for $3 seconds unless another owner holds an unexpired
#: one; a row back means taken. No connection or transaction is held while it runs.
_FOLLOWER_CLAIM = """
INSERT INTO follower_positions AS f (consumer, lease_owner, lease_until)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (consumer) DO UPDATE
SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until
WHERE f.lease_until IS NULL OR f.lease_until < clock_timestamp()
   OR f.lease_owner = excluded.lease_owner
RETURNING f.position
"""

_FOLLOWER_RELEASE = (
    "UPDATE follower_positions SET lease_until = NULL WHERE consumer = $1 AND lease_owner = $2"
)

_FOLLOWER_SAVE_MARK = """
INSERT INTO follower_positions (consumer, position) VALUES ($1, $2)
ON CONFLICT (consumer) DO UPDATE
SET position = greatest(follower_positions.position, excluded.position), updated_at = now()
"""

#: The oldest event of the follower's types without a tracking row, from the persisted mark
#: (whichever replica runs the rounds keeps the mark just below it, so this reads a few rows).
_FOLLOWER_OLDEST = """
SELECT e.recorded_at
FROM unnest($2::text[]) AS k(type)
CROSS JOIN LATERAL (
    SELECT e.position, e.recorded_at
    FROM events e
    LEFT JOIN LATERAL (
        SELECT true AS done FROM tracking t
        WHERE t.consumer = $1 AND t.event_id = e.event_id LIMIT 1
    ) AS t ON true
    WHERE e.type = k.type AND t.done IS NULL
      AND e.position > coalesce((SELECT position FROM follower_positions WHERE consumer = $1), 0)
    ORDER BY e.position LIMIT 1
) AS e
ORDER BY e.position
LIMIT 1
"""

# --- act -------------------------------------------------------------------------------------

#: Open requests (no final outcome yet) after position $1, from the ``pending_requests`` read
#: model (migration 0004, kept in the appending transaction): cost follows the open requests,
#: not every request ever made. Failures and the last one's time come with the row.
_PENDING = """
SELECT p.position, r.type, r.schema_version, r.body, p.failures, p.last_failure
FROM pending_requests p JOIN events r ON r.position = p.position
WHERE p.position > $1
ORDER BY p.position
LIMIT $2
"""

_LAST_VERSION = "SELECT max(stream_version) FROM events WHERE stream = $1"

#: Versions $2..$3 of a stream, types $4 only, as one row per group of $5 versions: the group's
#: bodies as a JSON array, their versions, and whether any is of another schema version than
#: $6. Groups keep rows small (no per-event row to build on the client, no multi-megabyte value
#: to reassemble) and sort only $5 rows each; the lateral join emits them in version order.
_GROUPS = """
SELECT x.body, x.versions, x.other, least(g.lo + $5 - 1, $3)
FROM generate_series($2::int, $3::int, $5::int) AS g(lo),
LATERAL (
    SELECT '['::bytea || string_agg(body, ','::bytea ORDER BY stream_version) || ']'::bytea
               AS body,
           array_agg(stream_version ORDER BY stream_version) AS versions,
           bool_or(schema_version <> $6) AS other
    FROM events
    WHERE stream = $1 AND stream_version BETWEEN g.lo AND least(g.lo + $5 - 1, $3)
      AND type = ANY($4::text[])
) AS x
"""

#: Every stream name starting with $1 (pattern $2), in index order: a loose index scan of
#: (stream, stream_version), one index probe per stream.
_STREAMS = """
WITH RECURSIVE s(stream) AS (
    (SELECT stream FROM events WHERE stream >= $1 AND stream LIKE $2
     ORDER BY stream LIMIT 1)
    UNION ALL
    SELECT (SELECT e.stream FROM events e WHERE e.stream > s.stream AND e.stream LIKE $2
            ORDER BY e.stream LIMIT 1)
    FROM s WHERE s.stream IS NOT NULL
)
SELECT stream FROM s WHERE stream IS NOT NULL
"""

_BODIES = """
SELECT stream, '['::bytea || string_agg(body, ','::bytea ORDER BY stream_version) || ']'::bytea
FROM events
WHERE stream >= $1 AND stream <= $2 AND stream LIKE $3
  AND type = ANY($4::text[]) AND schema_version = $5
GROUP BY stream
"""

#: ``body_groups``: versions per range, connections reading ranges at once, versions per group.
BODY_RANGE = 2500
BODY_CONNECTIONS = 4
BODY_GROUP = 200
#: ``stream_bodies``: streams per query, connections reading at once (more would only compete
#: for the same cores).
BODIES_CHUNK = 25
BODIES_CONNECTIONS = 3

__all__ = [
    "AlreadyProcessed",
    "AppendResult",
    "EventStore",
    "Tracking",
    "claim_lock",
    "WrongExpectedVersion",
    "migrate",
    "needs_reset",
    "row_to_event",
]
