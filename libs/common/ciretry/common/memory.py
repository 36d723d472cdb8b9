"""The event log in the process's memory: the ``EventLog`` port's twin for fast tests.

Held to the same contract suite as the PostgreSQL store (``tests/common/test_eventlog_
contract.py``): atomic batches, idempotency keys, expected versions, tracking, the outbox, the
followers' marks and leases, act's open requests and exclusive claims, the bodies the budget fold
decodes. It yields to the event loop at every operation, as a network round trip would, so that
tests of concurrent callers interleave as they would on the real log.

Not for production: nothing survives the process, and one process is all it serves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
)
from .events import Event, NewEvent, RecordedEvent, RetryRequested, VerdictReached, encode

#: Versions per group of ``body_groups`` (as the PostgreSQL store's).
BODY_GROUP = 200

_FAILED_KEY = re.compile(r"^(.*):failed:[0-9]+$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _MemoryClaim:
    """``MemoryEventLog.exclusive``'s claim: held while the log keeps its token for the key
    (``lose_claims`` drops them all, as a PostgreSQL restart drops session locks) and, with
    ``unless``, while no event is recorded under that key."""

    __slots__ = ("_by_key", "_claims", "_key", "_token", "_unless")

    def __init__(
        self,
        claims: dict[str, object],
        key: str,
        token: object | None,
        by_key: dict[str, RecordedEvent] | None = None,
        unless: str | None = None,
    ) -> None:
        self._claims = claims
        self._key = key
        self._token = token
        self._by_key = by_key
        self._unless = unless

    def __bool__(self) -> bool:
        return self._token is not None

    def done(self) -> None:
        """Released at the block's end all the same: nothing to save here."""

    async def held(self) -> bool:
        await asyncio.sleep(0)
        if self._unless is not None and self._by_key is not None and self._unless in self._by_key:
            return False
        return self._token is not None and self._claims.get(self._key) is self._token


@dataclass
class _Pending:
    position: int
    failures: int = 0
    last_failure: dt.datetime | None = None


@dataclass
class _Follower:
    position: int = 0
    lease_owner: uuid.UUID | None = None
    lease_until: dt.datetime | None = None


class MemoryEventLog:
    """The event log of one test, in memory."""

    def __init__(self, *, clock: Callable[[], dt.datetime] = _now, pool_size: int = 10) -> None:
        self._clock = clock
        self._events: list[RecordedEvent] = []
        self._bodies: list[bytes] = []
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._by_key: dict[str, RecordedEvent] = {}
        self._by_id: dict[uuid.UUID, RecordedEvent] = {}
        self._tracking: set[tuple[str, uuid.UUID]] = set()
        self._outbox: dict[int, dt.datetime] = {}
        self._claimed: set[int] = set()
        self._pending: dict[str, _Pending] = {}
        self._followers: dict[str, _Follower] = {}
        #: Claimed keys and the token of the claim holding each.
        self._exclusive: dict[str, object] = {}
        self._slots = asyncio.Semaphore(max(1, pool_size - 1))
        self.pool_size = pool_size
        self.closed = False

    @property
    def name(self) -> str:
        return "memory"

    async def migrate(self) -> list[str]:
        await asyncio.sleep(0)
        return []

    async def ping(self) -> None:
        await asyncio.sleep(0)
        if self.closed:
            raise ConnectionError("the in-memory event log is closed")

    async def close(self) -> None:
        self.closed = True

    # --- writing ----------------------------------------------------------------------------

    async def append_batch(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Tracking | None = None,
    ) -> list[AppendResult]:
        await asyncio.sleep(0)  # a round trip: other tasks run here, as they would
        if not events:
            return []
        return self._append_now(events, expected, tracking)

    async def append_tracked(
        self, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        await asyncio.sleep(0)  # one round trip for them all
        # One unit after the other, nothing awaited between: what the database's rounds of one
        # transaction each amount to (a later unit sees an earlier one's commit).
        out: list[list[AppendResult] | AlreadyProcessed] = []
        for unit in units:
            try:
                out.append(self._append_now(unit.events, None, unit.tracking))
            except AlreadyProcessed as exc:
                out.append(exc)
        return out

    def _append_now(
        self,
        events: Sequence[NewEvent],
        expected: dict[str, int] | None,
        tracking: Tracking | None,
    ) -> list[AppendResult]:
        if tracking is not None and (tracking.consumer, tracking.event_id) in self._tracking:
            raise AlreadyProcessed(tracking.consumer, tracking.event_id)
        for stream, want in (expected or {}).items():
            have = len(self._streams.get(stream, ()))
            if have != want:
                raise WrongExpectedVersion(stream, want, have)
        # Nothing below awaits: the batch is atomic, as the database's transaction is.
        if tracking is not None:
            self._tracking.add((tracking.consumer, tracking.event_id))
        out: list[AppendResult] = []
        fresh: dict[str, RecordedEvent] = {}
        now = self._clock()
        for e in events:
            key = e.metadata.idempotency_key
            if key and key in self._by_key:
                out.append(AppendResult(self._by_key[key], True))
                continue
            if key and key in fresh:
                out.append(AppendResult(fresh[key], True))
                continue
            body = encode(e.data)
            history = self._streams.setdefault(e.stream, [])
            rec = RecordedEvent(
                event_id=e.event_id,
                stream=e.stream,
                stream_version=len(history) + 1,
                position=len(self._events) + 1,
                recorded_at=now,
                data=e.data,
                metadata=e.metadata,
            )
            history.append(rec)
            self._events.append(rec)
            self._bodies.append(body)
            self._by_id[rec.event_id] = rec
            if key:
                fresh[key] = rec
                self._by_key[key] = rec
                self._follow_request(rec, key)
            self._outbox[rec.position] = now
            out.append(AppendResult(rec, False, body))
        return out

    def _follow_request(self, rec: RecordedEvent, key: str) -> None:
        """``pending_requests`` as the database's trigger keeps it (migration 0004)."""
        kind = rec.data.type_name()
        if kind == "RetryRequested":
            if key + ":outcome" not in self._by_key:
                self._pending.setdefault(key, _Pending(rec.position))
        elif key.endswith(":outcome") and kind in ("RetryIssued", "RetryFailed", "RetrySkipped"):
            self._pending.pop(key[: -len(":outcome")], None)
        elif kind == "RetryFailed":
            m = _FAILED_KEY.match(key)
            if m and m.group(1) in self._pending:
                p = self._pending[m.group(1)]
                p.failures += 1
                p.last_failure = max(filter(None, (p.last_failure, rec.recorded_at)))

    async def append(
        self,
        stream: str,
        events: Sequence[Event | NewEvent],
        expected_version: int | None = None,
        *,
        tracking: Tracking | None = None,
    ) -> list[RecordedEvent]:
        new = [e if isinstance(e, NewEvent) else NewEvent(stream=stream, data=e) for e in events]
        for e in new:
            if e.stream != stream:
                raise ValueError(f"event for {e.stream!r} appended to {stream!r}")
        expected = {stream: expected_version} if expected_version is not None else {}
        return [r.event for r in await self.append_batch(new, expected=expected, tracking=tracking)]

    async def record_tracking(self, tracking: Tracking) -> bool:
        await asyncio.sleep(0)
        key = (tracking.consumer, tracking.event_id)
        if key in self._tracking:
            return False
        self._tracking.add(key)
        return True

    async def is_processed(self, consumer: str, event_id: uuid.UUID) -> bool:
        await asyncio.sleep(0)
        return (consumer, event_id) in self._tracking

    # --- reading ----------------------------------------------------------------------------

    async def read_stream(self, stream: str, from_version: int = 1) -> list[RecordedEvent]:
        await asyncio.sleep(0)
        return list(self._streams.get(stream, [])[max(0, from_version - 1) :])

    async def read_streams(self, streams: Sequence[str]) -> dict[str, list[RecordedEvent]]:
        await asyncio.sleep(0)
        return {s: list(self._streams.get(s, [])) for s in streams}

    async def read_streams_after(self, versions: dict[str, int]) -> list[RecordedEvent]:
        await asyncio.sleep(0)
        return [e for s in sorted(versions) for e in self._streams.get(s, [])[versions[s] :]]

    async def read_streams_after_and_get(
        self, versions: dict[str, int], event_ids: Sequence[uuid.UUID]
    ) -> tuple[list[RecordedEvent], list[RecordedEvent]]:
        return await self.read_streams_after(versions), await self.get_many(event_ids)

    async def read_all(
        self, from_position: int = 0, batch: int = 1000, *, types: Sequence[str] | None = None
    ) -> AsyncGenerator[RecordedEvent, None]:
        wanted = set(types) if types else None
        position = from_position
        while True:
            await asyncio.sleep(0)
            chunk = [
                e
                for e in self._events[position:]
                if wanted is None or e.data.type_name() in wanted
            ][:batch]
            for e in chunk:
                yield e
            if len(chunk) < batch:
                return
            position = chunk[-1].position

    async def read_positions(
        self, positions: Sequence[int]
    ) -> list[RecordedEvent | Undecodable]:
        await asyncio.sleep(0)
        return [self._events[p - 1] for p in sorted(set(positions)) if 0 < p <= len(self._events)]

    async def read_event(self, stream: str, version: int) -> RecordedEvent | None:
        await asyncio.sleep(0)
        events = self._streams.get(stream, [])
        return events[version - 1] if 0 < version <= len(events) else None

    async def get(self, event_id: uuid.UUID) -> RecordedEvent | None:
        await asyncio.sleep(0)
        return self._by_id.get(event_id)

    async def get_many(self, event_ids: Sequence[uuid.UUID]) -> list[RecordedEvent]:
        await asyncio.sleep(0)
        found = (self._by_id.get(i) for i in set(event_ids))
        return sorted((e for e in found if e is not None), key=lambda e: e.position)

    async def get_by_key(self, idempotency_key: str) -> RecordedEvent | None:
        await asyncio.sleep(0)
        return self._by_key.get(idempotency_key)

    async def stream_version(self, stream: str) -> int:
        await asyncio.sleep(0)
        return len(self._streams.get(stream, ()))

    async def last_position(self) -> int:
        await asyncio.sleep(0)
        return len(self._events)

    # --- outbox -----------------------------------------------------------------------------

    async def outbox_depth(self) -> int:
        await asyncio.sleep(0)
        return len(self._outbox)

    async def outbox_delete(self, positions: Sequence[int]) -> None:
        await asyncio.sleep(0)
        for p in positions:
            self._outbox.pop(p, None)

    @asynccontextmanager
    async def outbox_claim(self, grace: float, limit: int) -> AsyncIterator[list[RecordedEvent]]:
        await asyncio.sleep(0)
        cutoff = self._clock() - dt.timedelta(seconds=grace)
        positions = sorted(
            p for p, at in self._outbox.items() if at < cutoff and p not in self._claimed
        )[:limit]
        self._claimed.update(positions)
        try:
            yield [self._events[p - 1] for p in positions]
            for p in positions:
                self._outbox.pop(p, None)
        finally:
            self._claimed.difference_update(positions)

    # --- followers --------------------------------------------------------------------------

    async def follower_claim(self, consumer: str, owner: uuid.UUID, lease: float) -> bool:
        await asyncio.sleep(0)
        f = self._followers.setdefault(consumer, _Follower())
        now = self._clock()
        if f.lease_until is not None and f.lease_until >= now and f.lease_owner != owner:
            return False
        f.lease_owner, f.lease_until = owner, now + dt.timedelta(seconds=lease)
        return True

    async def follower_release(self, consumer: str, owner: uuid.UUID) -> None:
        await asyncio.sleep(0)
        f = self._followers.get(consumer)
        if f is not None and f.lease_owner == owner:
            f.lease_until = None

    async def follower_mark(self, consumer: str) -> int:
        await asyncio.sleep(0)
        f = self._followers.get(consumer)
        return f.position if f else 0

    async def follower_save_mark(self, consumer: str, position: int) -> None:
        await asyncio.sleep(0)
        f = self._followers.setdefault(consumer, _Follower())
        f.position = max(f.position, position)

    async def follower_scan(
        self, consumer: str, types: Sequence[str], after: int, limit: int
    ) -> list[ScannedEvent]:
        await asyncio.sleep(0)
        wanted = set(types)
        out = []
        for e in self._events[after:]:
            if e.data.type_name() in wanted:
                out.append(
                    ScannedEvent(
                        e.position,
                        e.event_id,
                        e.recorded_at,
                        (consumer, e.event_id) in self._tracking,
                    )
                )
                if len(out) >= limit:
                    break
        return out

    async def follower_tracked(
        self, consumer: str, event_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        await asyncio.sleep(0)
        return {i for i in event_ids if (consumer, i) in self._tracking}

    async def follower_oldest(
        self, consumer: str, types: Sequence[str]
    ) -> dt.datetime | None:
        await asyncio.sleep(0)
        wanted = set(types)
        mark = self._followers[consumer].position if consumer in self._followers else 0
        for e in self._events[mark:]:
            if e.data.type_name() in wanted and (consumer, e.event_id) not in self._tracking:
                return e.recorded_at
        return None

    # --- act --------------------------------------------------------------------------------

    async def verdict_signature_counts(
        self, signatures: Sequence[str], since: dt.datetime, *, other_than_pipeline: str
    ) -> dict[str, int]:
        await asyncio.sleep(0)
        wanted = set(signatures)
        counts: dict[str, int] = {}
        for e in self._events:
            v = e.data
            if (
                isinstance(v, VerdictReached)
                and v.signature is not None
                and v.signature.id in wanted
                and e.recorded_at >= since
                and v.pipeline_id != other_than_pipeline
            ):
                counts[v.signature.id] = counts.get(v.signature.id, 0) + 1
        return counts

    async def pending_requests(self, after: int, limit: int) -> list[PendingRequest]:
        await asyncio.sleep(0)
        rows = sorted((p for p in self._pending.values() if p.position > after), key=_position)
        out = []
        for p in rows[:limit]:
            request = self._events[p.position - 1].data
            assert isinstance(request, RetryRequested)
            out.append(PendingRequest(p.position, request, p.failures, p.last_failure))
        return out

    @asynccontextmanager
    async def exclusive(self, key: str, *, unless: str | None = None) -> AsyncIterator[Claim]:
        async with self._slots:
            await asyncio.sleep(0)
            if key in self._exclusive or (unless is not None and unless in self._by_key):
                yield _MemoryClaim(self._exclusive, key, None)
                return
            token = object()
            self._exclusive[key] = token
            try:
                yield _MemoryClaim(self._exclusive, key, token, self._by_key, unless)
            finally:
                if self._exclusive.get(key) is token:
                    del self._exclusive[key]

    def lose_claims(self) -> None:
        """What a database restart does to PostgreSQL's claims (session locks): every claim is
        gone, its holder none the wiser until it asks (``Claim.held``), and the keys are free
        for others to take."""
        self._exclusive.clear()

    async def body_groups(
        self, stream: str, types: Sequence[str], schema_version: int
    ) -> AsyncGenerator[BodyGroup, None]:
        await asyncio.sleep(0)
        events = list(self._streams.get(stream, ()))
        wanted = set(types)
        for lo in range(0, len(events), BODY_GROUP):
            chunk = events[lo : lo + BODY_GROUP]
            mine = [e for e in chunk if e.data.type_name() in wanted]
            body = (
                b"[" + b",".join(self._bodies[e.position - 1] for e in mine) + b"]"
                if mine
                else None
            )
            yield BodyGroup(
                body,
                [e.stream_version for e in mine],
                any(e.data.schema_version != schema_version for e in mine),
                chunk[-1].stream_version,
            )
            await asyncio.sleep(0)

    async def stream_bodies(
        self, prefix: str, types: Sequence[str], schema_version: int
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        await asyncio.sleep(0)
        wanted = set(types)
        snapshot = {s: list(events) for s, events in self._streams.items() if s.startswith(prefix)}
        for stream in sorted(snapshot):
            mine = [
                self._bodies[e.position - 1]
                for e in snapshot[stream]
                if e.data.type_name() in wanted and e.data.schema_version == schema_version
            ]
            if mine:
                yield stream, b"[" + b",".join(mine) + b"]"
                await asyncio.sleep(0)


def _position(p: _Pending) -> int:
    return p.position


__all__ = ["MemoryEventLog"]


if TYPE_CHECKING:  # both adapters are held to the port by the type checker too
    from .eventlog import EventLog
    from .eventstore import EventStore

    def _conforms(memory: MemoryEventLog, store: EventStore) -> tuple[EventLog, EventLog]:
        return memory, store
