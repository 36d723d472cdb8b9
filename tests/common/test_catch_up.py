"""Followers catch up from the log (issue 13): real PostgreSQL and JetStream.

The bus is the fast path; what it loses (a message never published, a stream purged, deliveries
spent) is found in the log by its missing tracking row and handed to the same handler, exactly
once; poison counts as handled; the low-water mark keeps a round's reads to what is new.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

from ciretry.common.bus import (
    Bus,
    Consumer,
    ConsumerSettings,
    OutboxPublisher,
    Recorder,
)
from ciretry.common.catchup import FollowerLog, topic_types
from ciretry.common.events import MessageRejected, NewEvent, RecordedEvent
from ciretry.common.eventstore import EventStore, Tracking
from ciretry.common.metrics import instruments
from ciretry.common.service import Infra, sample_once
from tests.common.test_bus import STREAM, job, run_until, verdict_for
from tests.common.test_metrics import scrape
from tests.support.metrics import sample

#: The gauge as Prometheus sees it.
GAUGE = "ciretry_follower_oldest_unprocessed_seconds"


async def unpublished(store: EventStore, n: int, first: int = 0) -> list[RecordedEvent]:
    """Jobs committed to the log whose bus messages are lost: appended, never published, and
    their outbox rows gone (as after a stream purge, or a NATS node lost with its disk)."""
    results = await store.append_batch(
        [NewEvent(stream=STREAM, data=job(str(first + i))) for i in range(n)]
    )
    await store.outbox_delete([r.event.position for r in results])
    return [r.event for r in results]


def committing(
    store: EventStore, calls: list[RecordedEvent], name: str = "classify"
) -> Callable[[RecordedEvent], Awaitable[None]]:
    """A handler that commits one verdict per job with its tracking row, as classify does."""

    async def handler(event: RecordedEvent) -> None:
        calls.append(event)
        await store.append_batch([verdict_for(event)], tracking=Tracking(name, event.event_id))

    return handler


def follower(
    bus: Bus,
    store: EventStore,
    handler: Callable[[RecordedEvent], Awaitable[None]],
    *,
    name: str = "classify",
    **settings: float,
) -> Consumer:
    """A follower of topic ``job`` catching up at once, rounds a tenth of a second apart
    (production: 60 s grace, 10 s rounds), with ``settings`` on top."""
    s = {"fetch_timeout": 0.2, "catch_up_grace": 0.0, "catch_up_interval": 0.1, **settings}
    return Consumer(
        bus,
        store,
        name=name,
        topic="job",
        handler=handler,
        settings=ConsumerSettings(**s),  # type: ignore[arg-type]
    )


async def published(store: EventStore, bus: Bus, n: int = 1) -> list[RecordedEvent]:
    """Jobs committed and published as ingest does."""
    return await Recorder(store, OutboxPublisher(store, bus)).append(
        [NewEvent(stream=STREAM, data=job(str(i))) for i in range(n)]
    )


async def verdicts_per_job(store: EventStore) -> dict[str, int]:
    counts: dict[str, int] = {}
    async for e in store.read_all(types=["VerdictReached"]):
        job_id = e.data.job_id  # type: ignore[attr-defined]
        counts[job_id] = counts.get(job_id, 0) + 1
    return counts


async def mark(store: EventStore, consumer: str) -> int:
    async with store.connection() as conn:
        value = await conn.fetchval(
            "SELECT position FROM follower_positions WHERE consumer = $1", consumer
        )
    return int(value or 0)


def test_a_topic_is_its_event_types() -> None:
    assert topic_types("job") == ("JobFinished",)
    assert topic_types("verdict") == ("VerdictReached",)
    assert topic_types("feedback") == ("VerdictConfirmed", "VerdictDisputed")


async def test_events_the_bus_never_carried_are_processed_from_the_log_once(
    store: EventStore, bus: Bus
) -> None:
    calls: list[RecordedEvent] = []
    consumer = follower(bus, store, committing(store, calls))
    await consumer.setup()
    lost = await unpublished(store, 5)
    await run_until(consumer, lambda: consumer.caught_up == 5)
    assert sorted(e.event_id for e in calls) == sorted(e.event_id for e in lost)
    assert await verdicts_per_job(store) == {str(i): 1 for i in range(5)}
    # The next round finds nothing more to do, and moves the mark past them.
    assert await consumer.catch_up_once() == 0
    assert len(calls) == 5
    assert await mark(store, "classify") == lost[-1].position


async def test_the_grace_period_leaves_fresh_events_to_the_bus(store: EventStore, bus: Bus) -> None:
    calls: list[RecordedEvent] = []
    consumer = follower(bus, store, committing(store, calls), catch_up_grace=3600.0)
    await unpublished(store, 2)
    assert await consumer.catch_up_once() == 0
    assert calls == []
    # What is waiting shows in the follower's oldest unprocessed age.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    age = await consumer.log.oldest_unprocessed_age(later)
    assert 3590 < age < 3700


async def test_while_the_bus_still_holds_undelivered_messages_the_log_waits(
    store: EventStore, bus: Bus
) -> None:
    """A follower that is behind gets its backlog from JetStream, not twice."""
    calls: list[RecordedEvent] = []
    consumer = follower(bus, store, committing(store, calls), catch_up_interval=0)
    await consumer.setup()
    await published(store, bus)
    assert await bus.undelivered("classify") == 1
    assert await consumer.catch_up_once() == 0
    assert calls == []
    await run_until(consumer, lambda: consumer.processed == 1)
    assert len(calls) == 1 and consumer.caught_up == 0


async def test_poison_in_the_log_is_rejected_once_and_then_counts_as_handled(
    store: EventStore, bus: Bus
) -> None:
    attempts: list[RecordedEvent] = []

    async def handler(event: RecordedEvent) -> None:
        attempts.append(event)
        raise ValueError("bug")

    consumer = follower(bus, store, handler, name="act", max_deliver=3)
    (event,) = await unpublished(store, 1)
    for _ in range(3):
        await consumer.catch_up_once()
    assert len(attempts) == 3 and consumer.rejected == 1
    (rejected,) = await store.read_stream("rejected-act")
    assert isinstance(rejected.data, MessageRejected)
    assert "ValueError: bug" in rejected.data.reason
    assert rejected.data.message_id == str(event.event_id)
    assert await store.is_processed("act", event.event_id)
    # Handled: later rounds leave it alone, and the mark has moved past it.
    for _ in range(3):
        await consumer.catch_up_once()
    assert len(attempts) == 3
    assert await mark(store, "act") == event.position
    assert await consumer.log.oldest_unprocessed_age(dt.datetime.now(dt.UTC)) == 0.0


async def test_poison_rejected_on_the_bus_counts_as_handled_by_the_log(
    store: EventStore, bus: Bus
) -> None:
    calls: list[RecordedEvent] = []

    async def handler(event: RecordedEvent) -> None:
        calls.append(event)
        raise ValueError("bug")

    consumer = follower(
        bus, store, handler, name="act", max_deliver=2, backoff_base=0.01, catch_up_interval=0
    )
    await consumer.setup()
    (event,) = await published(store, bus)
    await run_until(consumer, lambda: consumer.rejected == 1)
    assert len(calls) == 2
    assert await store.is_processed("act", event.event_id)
    log = FollowerLog(store, "act", ("JobFinished",))
    await log.refresh()
    assert log.open == {} and log.mark == event.position


async def test_a_handler_that_does_nothing_still_leaves_the_event_tracked(
    store: EventStore, bus: Bus
) -> None:
    seen: list[RecordedEvent] = []

    async def ignores(event: RecordedEvent) -> None:
        seen.append(event)

    consumer = follower(bus, store, ignores)
    (event,) = await unpublished(store, 1)
    assert await consumer.catch_up_once() == 1
    assert await store.is_processed("classify", event.event_id)
    assert await consumer.catch_up_once() == 0
    assert len(seen) == 1


async def test_two_replicas_catch_up_one_at_a_time_and_each_event_once(
    store: EventStore, bus: Bus
) -> None:
    calls: list[RecordedEvent] = []
    replicas = [follower(bus, store, committing(store, calls)) for _ in range(2)]
    await unpublished(store, 40)
    handled = await asyncio.gather(*(r.catch_up_once() for r in replicas))
    handled += await asyncio.gather(*(r.catch_up_once() for r in replicas))
    assert sum(handled) == 40 and 0 in handled[:2]
    assert await verdicts_per_job(store) == {str(i): 1 for i in range(40)}
    assert len(calls) == 40


async def test_a_round_reads_what_is_new_not_the_whole_log(store: EventStore) -> None:
    """The low-water mark: once 300 events are tracked, a round (or a replica starting fresh
    from the persisted mark) reads the 3 appended since, not 303."""
    events = await unpublished(store, 300)
    for e in events:
        await store.record_tracking(Tracking("classify", e.event_id))
    log = FollowerLog(store, "classify", ("JobFinished",), scan_batch=50)
    assert await log.refresh() == 300
    assert log.mark == events[-1].position and log.open == {}
    fresh = await unpublished(store, 3, first=300)
    assert await log.refresh() == 3
    assert sorted(log.open) == [e.position for e in fresh]
    assert log.mark == fresh[0].position - 1
    restarted = FollowerLog(store, "classify", ("JobFinished",))
    assert await restarted.refresh() == 3
    await store.record_tracking(Tracking("classify", fresh[0].event_id))
    assert await log.refresh() == 0  # re-checks its 3 open events, reads nothing else
    assert log.mark == fresh[0].position and len(log.open) == 2


async def test_followers_oldest_unprocessed_age_is_a_sampled_gauge(
    store: EventStore, bus: Bus
) -> None:
    consumer = follower(bus, store, committing(store, []))
    await consumer.setup()
    (event,) = await unpublished(store, 1)
    outbox = OutboxPublisher(store, bus)
    infra = Infra("classify", None, store, bus, outbox, Recorder(store, outbox))  # type: ignore[arg-type]
    infra.consumers.append(consumer)
    samples = instruments().samples
    await sample_once(infra, timeout=5)
    waiting = samples.oldest_unprocessed["classify"]
    assert waiting > 0.0
    assert waiting <= (dt.datetime.now(dt.UTC) - event.recorded_at).total_seconds()
    assert samples.consumer_lag["classify"] == 0
    exposed = sample(await scrape(), GAUGE, consumer="classify")
    assert exposed == waiting
    assert await consumer.catch_up_once() == 1
    await sample_once(infra, timeout=5)
    assert samples.oldest_unprocessed["classify"] == 0.0
    assert sample(await scrape(), GAUGE, consumer="classify") == 0.0


async def test_the_server_never_gives_up_on_a_message_by_itself(
    store: EventStore, bus: Bus
) -> None:
    consumer = follower(bus, store, committing(store, []))
    await consumer.setup()
    info = await bus.js.consumer_info(bus.stream, "classify")
    assert info.config.max_deliver == -1


async def test_a_replica_that_dies_in_a_round_holds_the_lease_no_longer_than_it_lasts(
    store: EventStore, bus: Bus
) -> None:
    calls: list[RecordedEvent] = []
    dead, alive = (follower(bus, store, committing(store, calls)) for _ in range(2))
    await unpublished(store, 3)
    assert await dead.log.claim(3600.0)  # took the lease, then died without releasing it
    assert await alive.catch_up_once() == 0
    assert await dead.log.claim(0.0)  # as if its hour had passed
    assert await alive.catch_up_once() == 3
    assert len(calls) == 3


async def test_after_a_long_outage_the_open_set_is_capped_and_everything_still_processed(
    store: EventStore, bus: Bus
) -> None:
    """However many events an outage left unprocessed, a replica holds at most ``max_open`` of
    them (memory, and the re-check each round); the scan goes on as they are processed."""
    calls: list[RecordedEvent] = []
    consumer = follower(bus, store, committing(store, calls), catch_up_batch=4)
    consumer.log.max_open = 5
    lost = await unpublished(store, 12)
    await consumer.log.refresh()
    assert sorted(consumer.log.open) == [e.position for e in lost[:5]]
    while await consumer.catch_up_once():
        assert len(consumer.log.open) <= 5
    assert sorted(e.event_id for e in calls) == sorted(e.event_id for e in lost)
    assert await verdicts_per_job(store) == {str(i): 1 for i in range(12)}
    assert await mark(store, "classify") == lost[-1].position
