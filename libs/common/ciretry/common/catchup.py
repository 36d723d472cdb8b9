"""Followers catch up from the log: JetStream is the fast path, the event log the guarantee.

A follower (classify on topic ``job``, act on ``verdict``) commits a tracking row with the
outputs of every event it processes, a bare one for an event it has nothing to do about, and one
with the ``MessageRejected`` of an event it gives up on as poison. "Processed" is therefore a
fact in the database, and an event of the follower's topic without a tracking row is work not
done, however the bus came to lose it: deliveries spent during a long outage, a stream purged or
lost with a NATS node, a consumer deleted. ``FollowerLog`` finds those events; the consumer
(``bus.Consumer``) hands the ones older than a grace period to the same handler the bus feeds,
and the tracking row keeps a race with a late delivery harmless (one of them commits, the other
gets ``AlreadyProcessed``).

The cost of a round does not grow with the log. Each follower has a low-water mark
(``follower_positions``): every event of its types at or below it is tracked. A round reads only
what was appended since its last round (the ``frontier``), re-checks the events it found
unprocessed before (the ``open`` set), and moves the mark up to just below the oldest still
open. The frontier and the open set live in the process: a replica that starts (or takes over
the rounds from another) scans once from the persisted mark, and from then on only new events.
That stays correct whatever happened in between, because events are only ever appended (in
position order: see eventstore) and tracking rows only ever added. The open set is capped
(``max_open``): after a long outage the scan stops there and goes on as those get processed,
so neither memory nor the re-check grows with the outage.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from functools import cache

from .eventlog import EventLog, Undecodable
from .events import RecordedEvent, registered_types


@cache
def topic_types(topic: str) -> tuple[str, ...]:
    """Names of the event types published under ``topic`` (what a consumer of it receives)."""
    return tuple(
        sorted({name for (name, _), cls in registered_types().items() if cls.topic == topic})
    )


@dataclass(slots=True)
class _Open:
    event_id: uuid.UUID
    recorded_at: dt.datetime


@dataclass
class FollowerLog:
    """The log as one follower sees it: its event types, its low-water mark, what it has not
    processed yet. Not shared between tasks: one round at a time, and one replica at a time
    (``claim``: a lease in the follower's row, so that replicas do not all take up the same
    events; a replica that dies holding it holds it no longer than the lease)."""

    store: EventLog
    consumer: str
    types: tuple[str, ...]
    #: Events read per round trip while scanning.
    scan_batch: int = 1000
    #: Unprocessed events held at most; the scan stops there until some are processed.
    max_open: int = 10_000
    #: Highest position scanned (None: not yet read from ``follower_positions``).
    frontier: int | None = None
    #: Unprocessed events at or below the frontier, by position.
    open: dict[int, _Open] = field(default_factory=dict)
    #: The low-water mark as last persisted.
    mark: int = 0
    #: Who holds the lease (this replica's follower, for the process's life).
    owner: uuid.UUID = field(default_factory=uuid.uuid4)

    async def claim(self, lease: float) -> bool:
        """Take the catch-up lease for ``lease`` seconds (or renew ours). False: another
        replica holds it."""
        return await self.store.follower_claim(self.consumer, self.owner, lease)

    async def release(self) -> None:
        await self.store.follower_release(self.consumer, self.owner)

    async def refresh(self) -> int:
        """Catch the view up with the log: drop what was tracked since, scan what was appended
        since, persist the new mark. Reads O(new events + open events), whatever the log's size.
        Returns how many events it scanned (the open ones re-checked aside)."""
        scanned = 0
        log = self.store
        # Another replica may have passed since: everything at or below its mark is done.
        self.mark = max(self.mark, await log.follower_mark(self.consumer))
        if self.frontier is None or self.frontier < self.mark:
            self.frontier = self.mark
            self.open = {p: o for p, o in self.open.items() if p > self.mark}
        if self.open:
            ids = [o.event_id for o in self.open.values()]
            done = await log.follower_tracked(self.consumer, ids)
            self.open = {p: o for p, o in self.open.items() if o.event_id not in done}
        while len(self.open) < self.max_open:
            limit = min(self.scan_batch, self.max_open - len(self.open))
            rows = await log.follower_scan(self.consumer, self.types, self.frontier, limit)
            scanned += len(rows)
            for row in rows:
                if not row.tracked:
                    self.open[row.position] = _Open(row.event_id, row.recorded_at)
            if rows:
                self.frontier = rows[-1].position
            if len(rows) < limit:
                break
        mark = (min(self.open) - 1) if self.open else self.frontier
        if mark > self.mark:
            await log.follower_save_mark(self.consumer, mark)
            self.mark = mark
        return scanned

    def due(self, now: dt.datetime, grace: float, limit: int) -> list[int]:
        """Positions of open events recorded more than ``grace`` seconds before ``now``, oldest
        first, at most ``limit``."""
        cutoff = now - dt.timedelta(seconds=grace)
        out: list[int] = []
        for position in sorted(self.open):
            if self.open[position].recorded_at < cutoff:
                out.append(position)
                if len(out) >= limit:
                    break
        return out

    async def read(self, positions: list[int]) -> list[RecordedEvent | Undecodable]:
        """The events at ``positions``, decoded; an event that does not decode comes back as
        ``Undecodable`` so that the caller can reject it."""
        return await self.store.read_positions(positions)

    def event_id(self, position: int) -> uuid.UUID | None:
        entry = self.open.get(position)
        return entry.event_id if entry else None

    async def oldest_unprocessed_age(self, now: dt.datetime) -> float:
        """Seconds since the oldest event of the follower's types without a tracking row was
        recorded (0 when there is none): what shows a follower that is stuck or behind. Any
        replica can ask; it reads from the persisted mark."""
        oldest = await self.store.follower_oldest(self.consumer, self.types)
        if oldest is None:
            return 0.0
        return max(0.0, float((now - oldest).total_seconds()))


__all__ = ["FollowerLog", "topic_types"]
