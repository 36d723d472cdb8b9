"""The event log as a port: every operation the services need from it, in one Protocol.

Two adapters implement it and are held to one contract suite (``tests/common/test_eventlog_
contract.py``), as pyeventsourcing's recorders are: ``eventstore.EventStore`` on PostgreSQL (the
production log; all of its SQL is in that module) and ``memory.MemoryEventLog`` (a twin in the
process, for fast tests of service logic). Services are written against ``EventLog`` only.

What the port promises (the contract):

* **Append.** Events of any streams in one atomic batch, each at the end of its stream or at an
  expected version (``WrongExpectedVersion``); an idempotency key already stored (or repeated in
  the batch) is not stored again and its result is the stored event (``duplicate=True``); a
  tracking row commits with the events (``AlreadyProcessed`` when it exists); positions are a
  total order, committed in order (a follower reading by position skips nothing).
* **Group commit.** ``append_tracked``: the outputs of several consumed events, each with its own
  tracking row, in one transaction; a unit whose tracking row exists stores nothing and learns
  ``AlreadyProcessed`` without failing the others.
* **Read.** A stream by version, several streams after given versions, the whole log by position
  (optionally by type), one event by id, by idempotency key or by position.
* **Outbox.** Every appended event has an outbox row until it is published; a claim of the old
  rows is exclusive between concurrent claimers and deletes them when its block succeeds.
* **Followers.** Tracking rows; a follower's catch-up lease and low-water mark; a scan of its
  event types after a position with whether each is tracked.
* **act.** Open requests (``pending_requests``: a request leaves when its final outcome is
  appended); exclusive claims by key for the length of a provider call, which say whether they
  are still held (a claim dies with its holder's connection, and the holder learns it only by
  asking: ``Claim.held`` just before the call); a stream's bodies as
  JSON arrays for the budget fold's slim decoders, and every pipeline stream's, for replay.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from .events import Event, NewEvent, RecordedEvent, RetryRequested


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
class TrackedAppend:
    """One unit of a group commit (``EventLog.append_tracked``): the events a consumer emits for
    one event it processed, and the tracking row that says so. Atomic on its own: all of it or,
    when the tracking row exists, none of it."""

    events: Sequence[NewEvent]
    tracking: Tracking | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    event: RecordedEvent
    duplicate: bool
    #: The event body as this append encoded and stored it (fresh events only), so that the
    #: outbox fast path (``OutboxPublisher.publish(..., bodies=...)``) does not encode it again.
    body: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A stored event this code cannot decode (a newer writer's type, a broken body)."""

    position: int
    error: Exception


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """An open ``RetryRequested`` (no final outcome yet), with its transient failures so far."""

    position: int
    request: RetryRequested
    failures: int
    last_failure: dt.datetime | None


class Claim(Protocol):
    """What ``EventLog.exclusive`` yields: true when the key was taken for the block.

    A claim can be lost before its block ends: on PostgreSQL it is a session lock, gone with
    its connection (a database restart, a failover, a killed backend), and nothing tells the
    holder, who may be waiting on a provider meanwhile. Another replica may then take the key.
    ``held`` asks: false once the claim is gone (or when the log cannot say in time: fail
    closed), and, for a claim taken ``unless`` an event is recorded, once that event is (the
    work is done). A holder about to do what only one may do (a provider call) asks just
    before."""

    def __bool__(self) -> bool: ...

    async def held(self) -> bool: ...

    def done(self) -> None:
        """The work is done: its ``unless`` event is recorded. The adapter may then keep the key
        taken past the block (no claim can be taken for it any more) and release it later, at
        no cost. No effect on a claim taken without ``unless``."""
        ...


@dataclass(frozen=True, slots=True)
class ScannedEvent:
    """An event of a follower's types, and whether the follower has tracked it."""

    position: int
    event_id: uuid.UUID
    recorded_at: dt.datetime
    tracked: bool


@dataclass(frozen=True, slots=True)
class BodyGroup:
    """Consecutive versions of one stream's events of some types, as one JSON array of their
    bodies (what the budget fold's slim decoders read in one call). ``body`` is None for a
    group with none of the types; ``foreign`` is True when one of them is stored under another
    schema version than asked (the caller then decodes in full)."""

    body: bytes | None
    versions: list[int]
    foreign: bool
    #: The highest version the group covers (of any type): the stream's version after the last.
    upto: int


def tracked_rounds(units: Sequence[TrackedAppend]) -> list[range]:
    """``units`` split, in order, into runs committed one transaction after the other: a unit
    sharing a tracking row with an earlier unit of its run, or an idempotency key with an
    earlier tracked one (which may turn out already processed, its events not stored), starts
    a new run, so that it meets the earlier unit's outcome in the log as a sequential caller
    would. Almost always one run."""
    rounds: list[range] = []
    start = 0
    trackings: set[Tracking] = set()
    keys: set[str] = set()  # keys of the run's tracked units
    for i, unit in enumerate(units):
        unit_keys = {k for e in unit.events if (k := e.metadata.idempotency_key)}
        if (unit.tracking is not None and unit.tracking in trackings) or not keys.isdisjoint(
            unit_keys
        ):
            rounds.append(range(start, i))
            start = i
            trackings.clear()
            keys.clear()
        if unit.tracking is not None:
            trackings.add(unit.tracking)
            keys |= unit_keys
    if start < len(units):
        rounds.append(range(start, len(units)))
    return rounds


class EventLog(Protocol):
    """The event log of one deployment (one PostgreSQL schema, or one process's memory)."""

    @property
    def name(self) -> str:
        """The deployment's name (the PostgreSQL schema): keys of locks and claims include it."""
        ...

    async def migrate(self) -> list[str]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    # --- writing ----------------------------------------------------------------------------

    async def append_batch(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Tracking | None = None,
    ) -> list[AppendResult]: ...

    async def append(
        self,
        stream: str,
        events: Sequence[Event | NewEvent],
        expected_version: int | None = None,
        *,
        tracking: Tracking | None = None,
    ) -> list[RecordedEvent]: ...

    async def append_tracked(
        self, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        """Append several units at once, in order (one transaction when their tracking rows and
        keys do not repeat among them; from a repeat on, a later transaction, so it sees the
        earlier unit's commit: ``tracked_rounds``). Per unit, in order: its results (as ``append_batch``'s, idempotency keys
        resolved against the log and the units before it), or ``AlreadyProcessed`` when its
        tracking row already existed (nothing of the unit is stored; the others are). When the
        call raises, any of the units may have committed: a caller retries them all, and the
        tracking rows and keys make that safe."""
        ...

    async def record_tracking(self, tracking: Tracking) -> bool: ...

    async def is_processed(self, consumer: str, event_id: uuid.UUID) -> bool: ...

    # --- reading ----------------------------------------------------------------------------

    async def read_stream(self, stream: str, from_version: int = 1) -> list[RecordedEvent]: ...

    async def read_streams(self, streams: Sequence[str]) -> dict[str, list[RecordedEvent]]: ...

    async def read_streams_after(self, versions: dict[str, int]) -> list[RecordedEvent]: ...

    async def read_streams_after_and_get(
        self, versions: dict[str, int], event_ids: Sequence[uuid.UUID]
    ) -> tuple[list[RecordedEvent], list[RecordedEvent]]:
        """``read_streams_after(versions)`` and ``get_many(event_ids)`` in one round trip (act
        catches a chain up and reads the jobs its verdicts name together)."""
        ...

    def read_all(
        self, from_position: int = 0, batch: int = 1000, *, types: Sequence[str] | None = None
    ) -> AsyncGenerator[RecordedEvent, None]: ...

    async def read_positions(
        self, positions: Sequence[int]
    ) -> list[RecordedEvent | Undecodable]: ...

    async def read_event(self, stream: str, version: int) -> RecordedEvent | None: ...

    async def get(self, event_id: uuid.UUID) -> RecordedEvent | None: ...

    async def get_many(self, event_ids: Sequence[uuid.UUID]) -> list[RecordedEvent]:
        """The events of ``event_ids`` that exist, in log order, in one round trip (act reads
        the jobs of a decision batch together)."""
        ...

    async def get_by_key(self, idempotency_key: str) -> RecordedEvent | None: ...

    async def stream_version(self, stream: str) -> int: ...

    async def last_position(self) -> int: ...

    # --- outbox -----------------------------------------------------------------------------

    async def outbox_depth(self) -> int: ...

    async def outbox_delete(self, positions: Sequence[int]) -> None: ...

    def outbox_claim(
        self, grace: float, limit: int
    ) -> AbstractAsyncContextManager[list[RecordedEvent]]:
        """Outbox rows older than ``grace`` seconds (at most ``limit``), held against other
        claimers for the block, deleted when it exits without an exception."""
        ...

    # --- followers --------------------------------------------------------------------------

    async def follower_claim(self, consumer: str, owner: uuid.UUID, lease: float) -> bool:
        """Take (or renew) a follower's catch-up lease for ``lease`` seconds; False when another
        owner holds an unexpired one."""
        ...

    async def follower_release(self, consumer: str, owner: uuid.UUID) -> None: ...

    async def follower_mark(self, consumer: str) -> int:
        """The follower's low-water mark: every event of its types at or below it is tracked."""
        ...

    async def follower_save_mark(self, consumer: str, position: int) -> None:
        """Raise the mark (never lowers it)."""
        ...

    async def follower_scan(
        self, consumer: str, types: Sequence[str], after: int, limit: int
    ) -> list[ScannedEvent]: ...

    async def follower_tracked(
        self, consumer: str, event_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]: ...

    async def follower_oldest(
        self, consumer: str, types: Sequence[str]
    ) -> dt.datetime | None:
        """When the oldest event of ``types`` above the mark without a tracking row was
        recorded."""
        ...

    # --- act --------------------------------------------------------------------------------

    async def pending_requests(self, after: int, limit: int) -> list[PendingRequest]: ...

    async def verdict_signature_counts(
        self, signatures: Sequence[str], since: dt.datetime, *, other_than_pipeline: str
    ) -> dict[str, int]:
        """How many verdicts recorded since ``since`` had each of ``signatures`` (failure
        signature ids), in pipelines other than ``other_than_pipeline`` (what an explanation
        calls "seen elsewhere")."""
        ...

    def exclusive(
        self, key: str, *, unless: str | None = None
    ) -> AbstractAsyncContextManager[Claim]:
        """Hold ``key`` for the block if no one else does (yields a false claim then). A holder
        that dies releases it; so does a holder whose connection is lost (``Claim.held`` says
        so). ``unless``: an idempotency key whose event, once recorded, means the work is done:
        a false claim then too; an event recorded after the claim was taken, including by a
        holder that released the key at the very moment it was taken, makes ``held`` false."""
        ...

    def body_groups(
        self, stream: str, types: Sequence[str], schema_version: int
    ) -> AsyncGenerator[BodyGroup, None]:
        """The stream's events of ``types`` in version order, in groups (see ``BodyGroup``),
        covering versions 1..the stream's version when the call began."""
        ...

    def stream_bodies(
        self, prefix: str, types: Sequence[str], schema_version: int
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """Every stream whose name starts with ``prefix``: its events of ``types`` (of
        ``schema_version``) as one JSON array, as of one snapshot of the log."""
        ...


__all__ = [
    "AlreadyProcessed",
    "AppendResult",
    "BodyGroup",
    "Claim",
    "EventLog",
    "PendingRequest",
    "ScannedEvent",
    "TrackedAppend",
    "Tracking",
    "Undecodable",
    "tracked_rounds",
    "WrongExpectedVersion",
]
