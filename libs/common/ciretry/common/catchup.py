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

from .events import EventDecodeError, RecordedEvent, UnknownEventType, registered_types
from .eventstore import EventStore, row_to_event

#: Events of the follower's types after $3, oldest first, with whether $1 has tracked each.
#: One index range scan per type, one primary-key probe of ``tracking`` per event: the lateral
#: LIMIT keeps the probe a probe (as an EXISTS, the planner may hash every tracking row of the
#: consumer instead, a cost that grows with the history).
_SCAN = """
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

#: Which of the open events ($2) have been tracked since (a probe each, as in _SCAN).
_TRACKED = """
SELECT u.id FROM unnest($2::uuid[]) AS u(id)
CROSS JOIN LATERAL (
    SELECT 1 FROM tracking t WHERE t.consumer = $1 AND t.event_id = u.id LIMIT 1
) AS t
"""

_READ = (
    "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, "
    "body, metadata FROM events WHERE position = ANY($1::bigint[]) ORDER BY position"
)

_MARK = "SELECT position FROM follower_positions WHERE consumer = $1"

#: Take the follower's catch-up lease for $3 seconds unless another owner holds an unexpired
#: one; a row back means taken. No connection or transaction is held while it runs.
_CLAIM = """
INSERT INTO follower_positions AS f (consumer, lease_owner, lease_until)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (consumer) DO UPDATE
SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until
WHERE f.lease_until IS NULL OR f.lease_until < clock_timestamp()
   OR f.lease_owner = excluded.lease_owner
RETURNING f.position
"""

_RELEASE = (
    "UPDATE follower_positions SET lease_until = NULL WHERE consumer = $1 AND lease_owner = $2"
)

_SAVE_MARK = """
INSERT INTO follower_positions (consumer, position) VALUES ($1, $2)
ON CONFLICT (consumer) DO UPDATE
SET position = greatest(follower_positions.position, excluded.position), updated_at = now()
"""

#: The oldest event of the follower's types without a tracking row, from the persisted mark
#: (whichever replica runs the rounds keeps the mark just below it, so this reads a few rows).
_OLDEST = """
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

    store: EventStore
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
        async with self.store.pool.acquire() as conn:
            row = await conn.fetchrow(_CLAIM, self.consumer, self.owner, lease)
        return row is not None

    async def release(self) -> None:
        async with self.store.pool.acquire() as conn:
            await conn.execute(_RELEASE, self.consumer, self.owner)

    async def refresh(self) -> int:
        """Catch the view up with the log: drop what was tracked since, scan what was appended
        since, persist the new mark. Reads O(new events + open events), whatever the log's size.
        Returns how many events it scanned (the open ones re-checked aside)."""
        scanned = 0
        async with self.store.pool.acquire() as conn:
            # Another replica may have passed since: everything at or below its mark is done.
            self.mark = max(self.mark, int(await conn.fetchval(_MARK, self.consumer) or 0))
            if self.frontier is None or self.frontier < self.mark:
                self.frontier = self.mark
                self.open = {p: o for p, o in self.open.items() if p > self.mark}
            if self.open:
                ids = [o.event_id for o in self.open.values()]
                done = {r[0] for r in await conn.fetch(_TRACKED, self.consumer, ids)}
                self.open = {p: o for p, o in self.open.items() if o.event_id not in done}
            while len(self.open) < self.max_open:
                limit = min(self.scan_batch, self.max_open - len(self.open))
                rows = await conn.fetch(
                    _SCAN, self.consumer, list(self.types), self.frontier, limit
                )
                scanned += len(rows)
                for position, event_id, recorded_at, tracked in rows:
                    if not tracked:
                        self.open[position] = _Open(event_id, recorded_at)
                if rows:
                    self.frontier = int(rows[-1][0])
                if len(rows) < limit:
                    break
            mark = (min(self.open) - 1) if self.open else self.frontier
            if mark > self.mark:
                await conn.execute(_SAVE_MARK, self.consumer, mark)
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

    async def read(self, positions: list[int]) -> list[RecordedEvent | tuple[int, Exception]]:
        """The events at ``positions``, decoded; an event that does not decode comes back as
        (position, error) so that the caller can reject it."""
        async with self.store.pool.acquire() as conn:
            rows = await conn.fetch(_READ, positions)
        out: list[RecordedEvent | tuple[int, Exception]] = []
        for row in rows:
            try:
                out.append(row_to_event(row))
            except (EventDecodeError, UnknownEventType) as exc:
                out.append((int(row[3]), exc))
        return out

    def event_id(self, position: int) -> uuid.UUID | None:
        entry = self.open.get(position)
        return entry.event_id if entry else None

    async def oldest_unprocessed_age(self, now: dt.datetime) -> float:
        """Seconds since the oldest event of the follower's types without a tracking row was
        recorded (0 when there is none): what shows a follower that is stuck or behind. Any
        replica can ask; it reads from the persisted mark."""
        async with self.store.pool.acquire() as conn:
            oldest = await conn.fetchval(_OLDEST, self.consumer, list(self.types))
        if oldest is None:
            return 0.0
        return max(0.0, float((now - oldest).total_seconds()))


__all__ = ["FollowerLog", "topic_types"]
