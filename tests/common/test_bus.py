"""The bus on a real NATS JetStream: outbox publishing, the sweeper, pull consumers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence

import nats.js.errors
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ciretry.common.bus import (
    Bus,
    Consumer,
    ConsumerSettings,
    OutboxPublisher,
    PublishRefused,
    Recorder,
    metadata_from_context,
)
from ciretry.common.errors import PoisonMessage
from ciretry.common.events import (
    JobFinished,
    NewEvent,
    RecordedEvent,
    VerdictReached,
    from_wire,
    to_wire,
)
from ciretry.common.eventstore import EventStore, Tracking
from ciretry.common.telemetry import tracer

STREAM = "pipeline-gitlab-42-7"


def job(job_id: str = "1") -> JobFinished:
    return JobFinished(
        source="gitlab",
        project="42",
        pipeline_id="7",
        job_id=job_id,
        job_name="build",
        status="failed",
    )


def verdict_for(event: RecordedEvent) -> NewEvent:
    data = event.data
    assert isinstance(data, JobFinished)
    return NewEvent(
        stream=f"job-{data.job_id}",
        data=VerdictReached(
            source="gitlab",
            project="42",
            pipeline_id="7",
            job_id=data.job_id,
            job_name="build",
            category="unknown",
            retryable=False,
            budget="user",
            action="none",
            confidence=0.1,
            job_event_id=event.event_id,
        ),
        metadata=metadata_from_context(causation=event),
    )


async def stream_messages(bus: Bus, subject: str) -> list[str]:
    """Every message id in the JetStream stream for ``subject`` (an ephemeral read)."""
    sub = await bus.js.pull_subscribe(subject, stream=bus.stream)
    ids: list[str] = []
    try:
        while True:
            msgs = await sub.fetch(100, timeout=0.5)
            for m in msgs:
                ids.append((m.headers or {})["Nats-Msg-Id"])
                await m.ack()
    except (TimeoutError, nats.errors.TimeoutError):
        pass
    finally:
        await sub.unsubscribe()
    return ids


async def test_fast_path_publishes_with_msg_id_and_empties_outbox(
    store: EventStore, bus: Bus
) -> None:
    recorder = Recorder(store, OutboxPublisher(store, bus))
    recorded = await recorder.append([NewEvent(stream=STREAM, data=job(str(i))) for i in range(3)])
    await recorder.outbox.settle()  # rows of published events are deleted in the background
    assert await store.outbox_depth() == 0
    ids = await stream_messages(bus, bus.subject("job"))
    assert ids == [str(r.event_id) for r in recorded]


async def test_crash_between_commit_and_publish_is_healed_by_sweeper_exactly_once(
    store: EventStore, bus: Bus
) -> None:
    outbox = OutboxPublisher(store, bus, grace=0.0)
    # "Crash": committed (event + outbox row) but never published.
    results = await store.append_batch([NewEvent(stream=STREAM, data=job("1"))])
    event = results[0].event
    assert await store.outbox_depth() == 1
    # A publish that reached JetStream but whose outbox delete was lost: the sweeper will send
    # the same event again, and JetStream must drop it by Msg-Id.
    await bus.publish(event)
    assert await outbox.sweep_once() == 1
    assert await store.outbox_depth() == 0
    assert await outbox.sweep_once() == 0
    ids = await stream_messages(bus, bus.subject("job"))
    assert ids == [str(event.event_id)]


async def test_sweeper_leaves_fresh_rows_to_the_fast_path(store: EventStore, bus: Bus) -> None:
    outbox = OutboxPublisher(store, bus, grace=60.0)
    await store.append_batch([NewEvent(stream=STREAM, data=job("1"))])
    assert await outbox.sweep_once() == 0
    assert await store.outbox_depth() == 1


async def test_two_sweepers_do_not_both_claim_a_row(store: EventStore, bus: Bus) -> None:
    await store.append_batch([NewEvent(stream=STREAM, data=job(str(i))) for i in range(50)])
    a, b = OutboxPublisher(store, bus, grace=0.0), OutboxPublisher(store, bus, grace=0.0)
    sent = await asyncio.gather(a.sweep_once(limit=50), b.sweep_once(limit=50))
    assert sum(sent) == 50
    assert len(await stream_messages(bus, bus.subject("job"))) == 50


async def run_until(consumer: Consumer, predicate: Callable[[], bool], within: float = 20) -> None:
    """Run the consumer until ``predicate`` holds (checked as messages settle), then drain."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(consumer.wait_until(predicate), within)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_redelivered_message_produces_no_second_output(store: EventStore, bus: Bus) -> None:
    """Commit, then "crash" before the ack: the redelivery is a no-op thanks to tracking."""
    recorder = Recorder(store, OutboxPublisher(store, bus))
    calls: list[int] = []

    async def handler(event: RecordedEvent) -> None:
        calls.append(1)
        await recorder.append([verdict_for(event)], tracking=Tracking("classify", event.event_id))
        if len(calls) == 1:
            raise ConnectionError("crash after commit, before ack")

    consumer = Consumer(
        bus,
        store,
        name="classify",
        topic="job",
        handler=handler,
        settings=ConsumerSettings(backoff_base=0.05, fetch_timeout=0.2),
    )
    await consumer.setup()
    (job_event,) = await recorder.append([NewEvent(stream=STREAM, data=job("1"))])
    await run_until(consumer, lambda: consumer.processed == 1)
    assert len(calls) == 2
    verdicts = await store.read_stream("job-1")
    assert len(verdicts) == 1
    assert verdicts[0].metadata.causation_id == str(job_event.event_id)
    assert await bus.pending("classify") == 0


async def test_poison_message_is_terminated_and_recorded(store: EventStore, bus: Bus) -> None:

    async def handler(event: RecordedEvent) -> None:
        raise PoisonMessage("job name is empty")

    consumer = Consumer(
        bus,
        store,
        name="classify",
        topic="job",
        handler=handler,
        settings=ConsumerSettings(fetch_timeout=0.2),
    )
    await consumer.setup()
    recorder = Recorder(store, OutboxPublisher(store, bus))
    await recorder.append([NewEvent(stream=STREAM, data=job("1"))])
    # An undecodable message from a foreign publisher too.
    await bus.js.publish(
        bus.subject("job", "Garbage"), b"\x00not-json", headers={"Nats-Msg-Id": "g1"}
    )
    await run_until(consumer, lambda: consumer.rejected == 2)
    rejected = await store.read_stream("rejected-classify")
    reasons = sorted(r.data.reason for r in rejected)  # type: ignore[attr-defined]
    assert len(rejected) == 2
    assert reasons[0] == "job name is empty" and reasons[1].startswith("undecodable")
    assert await bus.pending("classify") == 0


async def test_unexpected_errors_retry_then_become_poison(store: EventStore, bus: Bus) -> None:
    attempts: list[int] = []

    async def handler(event: RecordedEvent) -> None:
        attempts.append(1)
        raise ValueError("bug")

    consumer = Consumer(
        bus,
        store,
        name="act",
        topic="job",
        handler=handler,
        settings=ConsumerSettings(max_deliver=3, backoff_base=0.01, fetch_timeout=0.2),
    )
    await consumer.setup()
    await Recorder(store, OutboxPublisher(store, bus)).append(
        [NewEvent(stream=STREAM, data=job("1"))]
    )

    await run_until(consumer, lambda: consumer.rejected == 1)
    assert len(attempts) == 3
    (rejected,) = await store.read_stream("rejected-act")
    assert "ValueError: bug" in rejected.data.reason  # type: ignore[attr-defined]


async def test_trace_context_crosses_the_bus(
    store: EventStore, bus: Bus, spans: InMemorySpanExporter
) -> None:

    async def handler(event: RecordedEvent) -> None:
        return None

    consumer = Consumer(
        bus,
        store,
        name="classify",
        topic="job",
        handler=handler,
        settings=ConsumerSettings(fetch_timeout=0.2),
    )
    await consumer.setup()
    recorder = Recorder(store, OutboxPublisher(store, bus))
    with tracer("test").start_as_current_span("webhook") as root:
        await recorder.append(
            [NewEvent(stream=STREAM, data=job("1"), metadata=metadata_from_context())]
        )
    await run_until(consumer, lambda: consumer.processed == 1)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    consume = by_name["consume JobFinished"]
    assert consume.context.trace_id == root.get_span_context().trace_id
    assert consume.parent is not None
    assert consume.parent.span_id == root.get_span_context().span_id
    assert consume.kind == trace.SpanKind.CONSUMER


async def test_ensure_stream_and_consumer_are_idempotent(bus: Bus) -> None:
    await bus.ensure_stream()
    await bus.ensure_consumer("x", bus.subject("job"))
    await bus.ensure_consumer("x", bus.subject("job"))
    with pytest.raises(nats.js.errors.NotFoundError):
        await bus.js.consumer_info(bus.stream, "nope")
    assert uuid.UUID  # keep import used


async def test_publish_many_fails_when_jetstream_does_not_store(
    store: EventStore, bus: Bus, nats_url: str
) -> None:
    """Every message's ack is counted: no stream for the subject is a failure, and the fast
    path then leaves the outbox rows to the sweeper."""
    results = await store.append_batch(
        [NewEvent(stream=STREAM, data=job(str(i))) for i in range(3)]
    )
    events = [r.event for r in results]
    orphan = await Bus.connect(nats_url, prefix=f"{bus.prefix}x", stream=f"{bus.stream}X")
    try:
        with pytest.raises(PublishRefused):
            await orphan.publish_many(events, timeout=5)
        assert not await OutboxPublisher(store, orphan).publish(events)
        assert await store.outbox_depth() == 3
    finally:
        await orphan.close()


async def test_publish_many_reuses_the_appended_body(store: EventStore, bus: Bus) -> None:
    results = await store.append_batch(
        [NewEvent(stream=STREAM, data=job(str(i))) for i in range(2)]
    )
    await bus.publish_many([r.event for r in results], bodies=[r.body for r in results])
    sub = await bus.js.pull_subscribe(bus.subject("job"), stream=bus.stream)
    try:
        msgs = await sub.fetch(2, timeout=2)
        assert [from_wire(m.data) for m in msgs] == [r.event for r in results]
        assert [m.data for m in msgs] == [to_wire(r.event) for r in results]
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize("prefix", ["", "a b", "ci.*", "ci.>", "ci..x", "ci\r\nPUB"])
def test_subject_prefix_is_checked_once_at_construction(prefix: str) -> None:
    # Publishing skips nats-py's per-message subject check, so the prefix is checked here.
    with pytest.raises(ValueError, match="prefix"):
        Bus(None, prefix=prefix, stream="S")  # type: ignore[arg-type]


async def test_concurrent_publishes_share_outbox_deletes(store: EventStore, bus: Bus) -> None:
    outbox = OutboxPublisher(store, bus, linger=0)
    recorder = Recorder(store, outbox)
    deletes: list[int] = []
    first_may_finish = asyncio.Event()
    delete = store.outbox_delete

    async def slow_first_delete(positions: Sequence[int]) -> None:
        deletes.append(len(positions))
        if len(deletes) == 1:
            await first_may_finish.wait()  # a slow database: publishes keep coming meanwhile
        await delete(positions)

    store.outbox_delete = slow_first_delete  # type: ignore[method-assign]
    await asyncio.gather(
        *(recorder.append([NewEvent(stream=f"{STREAM}-{i}", data=job(str(i)))]) for i in range(20))
    )
    # Every append returned (committed and published) while the first delete was stuck.
    first_may_finish.set()
    await outbox.settle()
    assert await store.outbox_depth() == 0
    assert sum(deletes) == 20 and len(deletes) == 2, deletes


async def test_publishes_of_the_linger_share_one_outbox_delete(store: EventStore, bus: Bus) -> None:
    # One append after another (each committed and published before the next starts), as a
    # service under steady load makes them: their rows go in one DELETE, not one each.
    outbox = OutboxPublisher(store, bus, linger=30)
    recorder = Recorder(store, outbox)
    deletes: list[int] = []
    delete = store.outbox_delete

    async def counted(positions: Sequence[int]) -> None:
        deletes.append(len(positions))
        await delete(positions)

    store.outbox_delete = counted  # type: ignore[method-assign]
    for i in range(5):
        await recorder.append([NewEvent(stream=f"{STREAM}-l{i}", data=job(str(i)))])
    assert deletes == [] and await store.outbox_depth() == 5  # still lingering
    await outbox.settle()  # cuts the linger short, as a service's shutdown does
    assert deletes == [5] and await store.outbox_depth() == 0
