"""The pulse consumer against the real RabbitMQ (``CIRETRY_AMQP_URL``, default loopback)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import textwrap
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from ciretry.common.events import JobFinished, MessageRejected
from ciretry.common.eventstore import EventStore
from ciretry.common.groupcommit import AppendBatcher
from ciretry.ingest.pulse import PulseConsumer, PulseSettings
from tests.support.chaos.netfault import TcpProxy

from .helpers import GROUP_ID, TASK_ID, task_message

AMQP = os.environ.get("CIRETRY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def _amqp_up() -> bool:
    try:
        conn = await aio_pika.connect(AMQP, timeout=3)
    except Exception:  # noqa: BLE001 - no broker is a skip, not a failure
        return False
    await conn.close()
    return True


@pytest.fixture
async def amqp(unique: str) -> AsyncIterator[tuple[PulseSettings, aio_pika.abc.AbstractExchange]]:
    if not await _amqp_up():
        # A configured broker that is down is a failure (CI configures one); with none
        # configured (a laptop without RabbitMQ) the pulse tests are reported as skipped.
        if os.environ.get("CIRETRY_AMQP_URL"):
            pytest.fail(f"CIRETRY_AMQP_URL is set but no RabbitMQ answers at {AMQP}")
        pytest.skip(f"no RabbitMQ at {AMQP} (set CIRETRY_AMQP_URL to run the pulse tests)")
    # Exchanges of our own (same last segment as Taskcluster's) keep tests isolated.
    exchange_name = f"exchange/test-{unique}/v1/task-exception"
    settings = PulseSettings(
        url=AMQP,
        queue=f"ciretry-test-{unique}",
        bindings=((exchange_name, "primary.#"),),
        declare_exchanges=True,
        prefetch=8,
        backoff_base=0.01,
    )
    conn = await aio_pika.connect(AMQP)
    channel = await conn.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    try:
        yield settings, exchange
    finally:
        await channel.queue_delete(settings.queue)
        await channel.exchange_delete(exchange_name)
        await conn.close()


async def publish(exchange: aio_pika.abc.AbstractExchange, body: bytes) -> None:
    await exchange.publish(
        aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        ),
        routing_key=f"primary.{TASK_ID}.0.us-east-1.i-0123456789.proj.linux.sched.group._",
    )


async def waiting_in_queue(settings: PulseSettings) -> int:
    """Messages RabbitMQ still holds for the consumer's queue (neither acked nor rejected)."""
    conn = await aio_pika.connect(settings.url)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(settings.queue, durable=True, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return int(count)
    finally:
        await conn.close()


def settled_queue() -> tuple[asyncio.Queue[tuple[str, bool]], Any]:
    q: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
    return q, lambda outcome, msg: q.put_nowait((outcome, msg.redelivered))


_CRASHING_CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from ciretry.ingest.pulse import PulseConsumer, PulseSettings

    async def never_commits(events):
        print("ENTERED", flush=True)
        await asyncio.Event().wait()

    async def main():
        settings = PulseSettings(url=sys.argv[1], queue=sys.argv[2],
                                 bindings=((sys.argv[3], "primary.#"),), declare_exchanges=True)
        consumer = PulseConsumer(settings, never_commits)
        await consumer.start()
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_killed_before_commit_the_message_is_redelivered(
    amqp: tuple[PulseSettings, Any], store: EventStore
) -> None:
    settings, exchange = amqp
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHING_CONSUMER,
        settings.url,
        settings.queue,
        settings.bindings[0][0],
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"READY\n"
        await publish(exchange, _body(task_message()))
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ENTERED\n"
        assert await store.last_position() == 0  # it had the message, but nothing committed
    finally:
        proc.kill()  # SIGKILL: no cleanup, no ack
        await proc.wait()

    batcher = AppendBatcher(store)
    q, on_settled = settled_queue()
    consumer = PulseConsumer(settings, batcher.append, on_settled=on_settled)
    await consumer.start()
    try:
        outcome, redelivered = await asyncio.wait_for(q.get(), 30)
    finally:
        await consumer.close()
        await batcher.close()
    assert (outcome, redelivered) == ("stored", True)
    (event,) = [e async for e in store.read_all()]
    assert isinstance(event.data, JobFinished)
    assert event.data.failure_reason == "taskcluster:worker-shutdown"


async def outcomes_one_by_one(
    amqp: tuple[PulseSettings, Any], store: EventStore, *bodies: bytes
) -> list[str]:
    """Publish ``bodies`` one at a time to a consumer storing through the batcher, so that the
    outcomes come back in a known order."""
    settings, exchange = amqp
    batcher = AppendBatcher(store)
    q, on_settled = settled_queue()
    consumer = PulseConsumer(settings, batcher.append, on_settled=on_settled)
    await consumer.start()
    outcomes = []
    try:
        for body in bodies:
            await publish(exchange, body)
            outcomes.append((await asyncio.wait_for(q.get(), 30))[0])
    finally:
        await consumer.close()
        await batcher.close()
    return outcomes


async def test_duplicates_ignored_and_poison(
    amqp: tuple[PulseSettings, Any], store: EventStore
) -> None:
    outcomes = await outcomes_one_by_one(
        amqp,
        store,
        _body(task_message()),
        _body(task_message()),  # the same message again
        b"{definitely not json",
        _body({"version": 1, "status": {"taskId": 7}}),  # wrong type: poison
        b'{"version": 1, "status": "\xff"}',  # invalid UTF-8 in a string: poison too
    )
    settings, _ = amqp
    assert outcomes == ["stored", "duplicate", "rejected", "rejected", "rejected"]
    events = [e async for e in store.read_all()]
    assert sum(isinstance(e.data, JobFinished) for e in events) == 1
    rejected = [e.data for e in events if isinstance(e.data, MessageRejected)]
    assert len(rejected) == 3
    assert rejected[1].reason == "status.taskId: expected a Taskcluster slugid, got '7'"
    # Everything was acked (or rejected): nothing waits in the queue once the consumer is gone.
    assert await waiting_in_queue(settings) == 0


async def test_a_message_the_log_keeps_refusing_is_rejected_and_the_next_one_stored(
    amqp: tuple[PulseSettings, Any], pg_store: EventStore
) -> None:
    store = pg_store
    """The database itself refuses one message's event (a trigger raising the error a NUL in
    text gives), as it would for a value the normalizer let through: the message is recorded as
    MessageRejected and dropped after a few tries, and the message after it is stored."""
    settings, _ = amqp
    async with store.connection() as conn:
        await conn.execute(
            """
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.stream LIKE '%poisonGrQxC%' THEN
                    RAISE EXCEPTION 'invalid byte sequence' USING ERRCODE = '22021';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON events
                FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """
        )
    poison = task_message()
    poison["status"]["taskGroupId"] = "poisonGrQxCaaaaaaaaaaA"  # a well-formed slugid
    outcomes = await outcomes_one_by_one(
        amqp, store, _body(poison), _body(task_message(state="failed", reason="failed"))
    )
    assert outcomes == ["rejected", "stored"]
    events = [e.data async for e in store.read_all()]
    [rejected] = [e for e in events if isinstance(e, MessageRejected)]
    assert "refused" in rejected.reason and "CharacterNotInRepertoire" in rejected.reason
    assert [e.pipeline_id for e in events if isinstance(e, JobFinished)] == [GROUP_ID]
    assert await waiting_in_queue(settings) == 0


async def test_transient_store_errors_are_retried_before_ack(
    amqp: tuple[PulseSettings, Any], store: EventStore
) -> None:
    settings, exchange = amqp
    failures = 2

    async def flaky(events: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionRefusedError("database restarting")
        return await store.append_batch(events)

    q, on_settled = settled_queue()
    consumer = PulseConsumer(settings, flaky, on_settled=on_settled)
    await consumer.start()
    try:
        await publish(exchange, _body(task_message()))
        outcome, _ = await asyncio.wait_for(q.get(), 30)
    finally:
        await consumer.close()
    assert outcome == "stored" and failures == 0
    assert len([e async for e in store.read_all()]) == 1


async def test_broker_outage_reconnects_and_loses_nothing(
    amqp: tuple[PulseSettings, Any], store: EventStore
) -> None:
    """The consumer reaches RabbitMQ through a proxy that the test cuts (every connection
    dropped, new ones refused) and restores, as a broker restart looks from the client. One
    message is cut off between its commit and its ack; more arrive during the outage. After
    the reconnect every message is stored exactly once and the queue is empty."""
    settings, exchange = amqp
    url = urllib.parse.urlsplit(settings.url)
    proxy = await TcpProxy(url.hostname or "127.0.0.1", url.port or 5672).start()
    via_proxy = dataclasses.replace(
        settings,
        url=url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{proxy.port}").geturl(),
        reconnect_interval=0.2,
    )
    batcher = AppendBatcher(store)
    committed = asyncio.Event()
    may_ack = asyncio.Event()

    async def append(events: Any) -> Any:
        results = await batcher.append(events)
        if not may_ack.is_set():  # the first message: committed, ack not sent before the cut
            committed.set()
            await may_ack.wait()
        return results

    q, on_settled = settled_queue()
    consumer = PulseConsumer(via_proxy, append, on_settled=on_settled)
    await consumer.start()
    try:
        await publish(exchange, _body(task_message(run_id=0)))
        await asyncio.wait_for(committed.wait(), 30)
        await proxy.cut()
        for run in range(1, 6):  # published while the consumer is cut off
            await publish(exchange, _body(task_message(run_id=run)))
        may_ack.set()  # its ack goes nowhere: the broker will redeliver the message
        await proxy.restore()
        # Runs 1-5 are stored; run 0, committed but cut off before its ack, comes back
        # redelivered and is recognised as a duplicate (its first handling may or may not
        # report: the channel it came on is gone).
        outcomes: list[tuple[str, bool]] = []
        while sum(o == "stored" for o, _ in outcomes) < 5 or ("duplicate", True) not in outcomes:
            outcomes.append(await asyncio.wait_for(q.get(), 60))
    finally:
        await consumer.close()
        await batcher.close()
        await proxy.close()
    assert proxy.connections >= 2  # it did reconnect
    events = [e.data async for e in store.read_all()]
    # attempt = runId + 1
    assert sorted(e.attempt for e in events if isinstance(e, JobFinished)) == list(range(1, 7))
    assert await waiting_in_queue(settings) == 0


def test_settings_from_env() -> None:
    s = PulseSettings.from_env(
        {
            "CIRETRY_AMQP_URL": "amqp://u:p@pulse/",
            "CIRETRY_PULSE_QUEUE": "queue/me/ciretry",
            "CIRETRY_PULSE_BINDINGS": "exchange/taskcluster-queue/v1/task-failed=primary.#.proj-x.#,"
            "exchange/taskcluster-queue/v1/task-exception",
        }
    )
    assert s.queue == "queue/me/ciretry"
    assert s.bindings == (
        ("exchange/taskcluster-queue/v1/task-failed", "primary.#.proj-x.#"),
        ("exchange/taskcluster-queue/v1/task-exception", "#"),
    )


def _body(message: Any) -> bytes:
    import msgspec

    return msgspec.json.encode(message)
