"""NATS JetStream as the bus: stream setup, the outbox publisher and sweeper, pull consumers.

The event log is the source of truth; the bus only carries committed events onward. Every
message has ``Nats-Msg-Id`` = event id, so a republish (sweeper after a crash, or fast path and
sweeper racing) is dropped by JetStream inside its duplicate window.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from .errors import PoisonMessage, is_transient
from .events import (
    EventDecodeError,
    MessageRejected,
    Metadata,
    NewEvent,
    RecordedEvent,
    UnknownEventType,
    WireEvent,
    from_wire,
    subject_for,
    to_wire,
)
from .eventstore import OUTBOX_CLAIM, AlreadyProcessed, EventStore, row_to_event
from .metrics import instruments
from .startup import why_failed
from .telemetry import context_from_headers, inject_headers, trace_fields, tracer

log = logging.getLogger(__name__)

_wire_encoder = msgspec.json.Encoder()


class PublishRefused(Exception):
    """JetStream answered a publish with an error (or no stream took the subject)."""


#: JetStream API error codes ensure_stream acts on (nats-server's errors.json).
_STREAM_NAME_IN_USE = 10058  # exists with another configuration: read it, then update
_NO_CLUSTER = 10074  # replicas > 1 on a single server
#: Answers of a JetStream that is starting or electing a leader: ask again.
_NOT_READY_CODES = frozenset(
    {
        10005,  # no suitable peers for placement (peers not known yet)
        10008,  # JetStream system temporarily unavailable
        10009,  # cluster cannot handle the request (no leader)
        10023,  # insufficient resources (peers not known yet)
        10059,  # stream not found (created, not yet visible from this server)
    }
)


def _not_ready_yet(exc: BaseException) -> bool:
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return exc.err_code in _NOT_READY_CODES
    return isinstance(exc, nats.errors.TimeoutError | nats.errors.NoRespondersError)


class _ConnectionErrors:
    """nats-py's callbacks, said briefly: the first error of an outage, then one line per
    ``every`` seconds with how many there were (nats-py would log a traceback for each of its
    twice-a-second reconnect attempts); while connecting, only the last error is kept."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self.connected = False
        self.last: Exception | None = None
        self._said_at = -every
        self._unsaid = 0

    async def on_error(self, exc: Exception) -> None:
        self.last = exc
        if not self.connected:
            return
        now = asyncio.get_running_loop().time()
        if now - self._said_at < self.every:
            self._unsaid += 1
            return
        more = f" ({self._unsaid} more since the last report)" if self._unsaid else ""
        log.warning("NATS: %s%s", _describe(exc), more)
        self._said_at, self._unsaid = now, 0

    async def on_disconnected(self) -> None:
        if self.connected:
            log.warning("NATS connection lost; reconnecting")

    async def on_reconnected(self) -> None:
        log.info("NATS connection restored")
        self._said_at, self._unsaid = -self.every, 0


def _describe(exc: BaseException) -> str:
    return f"server {why_failed(exc)}"


@dataclass(slots=True)
class _PendingAcks:
    remaining: int
    done: asyncio.Future[None]


#: A subject prefix: dot-separated tokens without wildcards or whitespace.
_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def _wire(event: RecordedEvent, body: bytes | None) -> bytes:
    """``to_wire(event)``, reusing the body bytes when the append already encoded them."""
    if body is None:
        return to_wire(event)
    data = event.data
    return _wire_encoder.encode(
        WireEvent(
            event_id=event.event_id,
            stream=event.stream,
            stream_version=event.stream_version,
            position=event.position,
            recorded_at=event.recorded_at,
            type=data.type_name(),
            schema_version=data.schema_version,
            metadata=event.metadata,
            data=msgspec.Raw(body),
        )
    )


class Bus:
    """One NATS connection with JetStream, bound to a subject prefix and a stream."""

    def __init__(
        self,
        nc: NATS,
        *,
        prefix: str,
        stream: str,
        duplicate_window: float = 120.0,
    ) -> None:
        if not _SUBJECT_PREFIX.fullmatch(prefix):
            raise ValueError(f"NATS subject prefix {prefix!r}: letters, digits, _ and - tokens")
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.prefix = prefix
        self.stream = stream
        self.duplicate_window = duplicate_window
        self._ack_prefix: str | None = None
        self._pending_acks: dict[int, _PendingAcks] = {}
        self._batch_ids = itertools.count()
        self._ack_lock = asyncio.Lock()
        self._connection_errors: _ConnectionErrors | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "ciretry",
        stream: str = "CIRETRY",
        duplicate_window: float = 120.0,
        name: str = "ciretry",
    ) -> Bus:
        """Connect once (each server of a comma-separated ``url`` tried twice), raising the
        cause when no server answers: waiting for NATS to come up is the caller's choice
        (``startup.wait_for``). Once connected, the client reconnects forever, and says so in
        a few log lines rather than one traceback per attempt."""
        errors = _ConnectionErrors()
        nc = NATS()
        try:
            await nc.connect(
                [part.strip() for part in url.split(",") if part.strip()],
                name=name,
                # Bounded while connecting (nats-py's -1 would retry inside connect() forever,
                # logging a traceback each time); unbounded once connected, below.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds, a float is fine
                connect_timeout=3,
                drain_timeout=5,
                error_cb=errors.on_error,
                disconnected_cb=errors.on_disconnected,
                reconnected_cb=errors.on_reconnected,
                # Every subject is the checked prefix plus event topics and type names from the
                # code, replies come from the client's own inboxes: the per-publish check is
                # redundant, and it was a noticeable part of publishing every event.
                skip_subject_validation=True,
            )
        except nats.errors.NoServersError:
            if errors.last is not None:
                raise errors.last from None
            raise
        nc.options["max_reconnect_attempts"] = -1
        errors.connected = True
        bus = cls(nc, prefix=prefix, stream=stream, duplicate_window=duplicate_window)
        bus._connection_errors = errors
        return bus

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        if self._connection_errors is not None:
            self._connection_errors.connected = False  # our own close is no lost connection
        if not self.nc.is_closed:
            await self.nc.drain()

    async def ensure_stream(self, *, replicas: int = 1, within: float = 60.0) -> None:
        """Create the stream, or check it and update what differs. Every service calls this on
        start, possibly all at once, possibly while a NATS cluster is still electing its
        leader: each step reads what the server says and retries only answers that mean "not
        ready yet" (for up to ``within`` seconds), never taking an error for "it exists"."""
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            storage=StorageType.FILE,
            duplicate_window=self.duplicate_window,
            num_replicas=replicas,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.1
        while True:
            try:
                if await self._create_or_update(config):
                    return
                continue  # created by someone else between our two requests: read it again
            except Exception as exc:
                if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _NO_CLUSTER:
                    raise PublishRefused(
                        f"stream {self.stream} with {replicas} replicas needs a NATS cluster "
                        "(CIRETRY_NATS_STREAM_REPLICAS=1 for a single server)"
                    ) from exc
                if not _not_ready_yet(exc) or loop.time() + delay > deadline:
                    raise
                log.info("JetStream not ready for stream %s (%s); retrying", self.stream, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _create_or_update(self, config: StreamConfig) -> bool:
        """One round; False when the stream appeared between the lookup and the create."""
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
                return True
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code == _STREAM_NAME_IN_USE:
                    return False
                raise
        have = info.config
        if (
            list(have.subjects or []) != config.subjects
            or have.storage != config.storage
            or have.num_replicas != config.num_replicas
            or have.duplicate_window != config.duplicate_window
        ):
            await self.js.update_stream(config)
        return True

    async def delete_stream(self) -> None:
        try:
            await self.js.delete_stream(self.stream)
        except nats.js.errors.NotFoundError:
            pass

    def subject(self, topic: str, type_name: str = ">") -> str:
        return f"{self.prefix}.{topic}.{type_name}"

    @staticmethod
    def _headers(event: RecordedEvent) -> dict[str, str]:
        headers = {"Nats-Msg-Id": str(event.event_id), "Ciretry-Type": event.type}
        if event.metadata.traceparent:
            headers["traceparent"] = event.metadata.traceparent
            if event.metadata.tracestate:
                headers["tracestate"] = event.metadata.tracestate
        return headers

    async def publish(self, event: RecordedEvent) -> None:
        await self.js.publish(
            subject_for(self.prefix, event.data),
            to_wire(event),
            headers=self._headers(event),
            timeout=5,
        )

    async def publish_many(
        self,
        events: Sequence[RecordedEvent],
        timeout: float = 10.0,  # noqa: ASYNC109 - public signature, callers pass it
        *,
        bodies: Sequence[bytes | None] | None = None,
    ) -> None:
        """Publish to JetStream, one message per event, without waiting for each ack in turn:
        every message is sent, then all the acks are awaited together (one round trip for the
        batch). Raises if any message was refused or its ack did not come within ``timeout``.

        ``bodies`` (optional, aligned with ``events``): each event's body as already encoded
        by the append, so it is not encoded again.

        The acks come back on one wildcard inbox per connection and are only counted (an error
        reply fails the batch): nats-py's ``publish_async`` parses each ack into a ``PubAck`` and
        keeps a future per message, which cost more than all the rest of the publish."""
        if not events:
            return
        prefix = await self._ack_inbox()
        batch_id = next(self._batch_ids)
        pending = _PendingAcks(len(events), asyncio.get_running_loop().create_future())
        self._pending_acks[batch_id] = pending
        reply = f"{prefix}{batch_id}."
        publish = self.nc.publish
        prefix_subject = self.prefix
        try:
            for i, e in enumerate(events):
                body = bodies[i] if bodies is not None else None
                await publish(
                    f"{prefix_subject}.{e.data.topic}.{e.data.type_name()}",
                    _wire(e, body),
                    reply=f"{reply}{i}",
                    headers=self._headers(e),
                )
            await asyncio.wait_for(pending.done, timeout)
        finally:
            self._pending_acks.pop(batch_id, None)

    async def _ack_inbox(self) -> str:
        async with self._ack_lock:
            if self._ack_prefix is None:
                prefix = self.nc.new_inbox() + "."
                await self.nc.subscribe(prefix + ">", cb=self._on_ack)
                self._ack_prefix = prefix
            return self._ack_prefix

    async def _on_ack(self, msg: Msg) -> None:
        assert self._ack_prefix is not None
        batch, _, index = msg.subject[len(self._ack_prefix) :].partition(".")
        pending = self._pending_acks.get(int(batch)) if batch.isdigit() else None
        if pending is None or pending.done.done():
            return
        data = msg.data
        # A stored (or deduplicated) message is acked with {"stream":…,"seq":…}; anything else,
        # an {"error":…} reply or a 503 no-responders status with no body, fails the batch.
        if data.startswith(b'{"error"') or b'"seq":' not in data:
            status = (msg.headers or {}).get("Status", "")
            detail = bytes(data[:300]).decode("utf-8", "replace") or f"status {status}"
            pending.done.set_exception(PublishRefused(f"message {index} not stored: {detail}"))
            return
        pending.remaining -= 1
        if pending.remaining == 0:
            pending.done.set_result(None)

    async def ensure_consumer(
        self,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        max_deliver: int = 20,
        max_ack_pending: int = 1000,
    ) -> None:
        config = ConsumerConfig(
            durable_name=durable,
            name=durable,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
        )
        await self.js.add_consumer(self.stream, config=config)

    async def pending(self, durable: str) -> int:
        """Messages not yet delivered plus delivered but unacked (consumer lag)."""
        info = await self.js.consumer_info(self.stream, durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


class OutboxPublisher:
    """Moves committed events from the outbox to JetStream.

    ``publish`` is the fast path, called right after a commit with the events just appended.
    ``sweep_once`` republishes what a crash (or a NATS outage) left behind; rows are claimed with
    ``FOR UPDATE SKIP LOCKED`` so several replicas sweep without stepping on each other.
    """

    def __init__(self, store: EventStore, bus: Bus, *, grace: float = 5.0) -> None:
        self.store = store
        self.bus = bus
        self.grace = grace
        # Rows whose events reached JetStream, deleted in the background: concurrent publishes
        # share one DELETE instead of a round trip each. A delete lost to a crash only means
        # the sweeper republishes after ``grace``, and JetStream drops it by Msg-Id.
        self._published: list[int] = []
        self._deleting: asyncio.Task[None] | None = None

    async def publish(
        self, events: Sequence[RecordedEvent], *, bodies: Sequence[bytes | None] | None = None
    ) -> bool:
        """Best effort: on failure the rows stay and the sweeper retries. True if all went.
        ``bodies``: the encoded event bodies when the caller has them (``AppendResult.body``)."""
        if not events:
            return True
        with tracer().start_as_current_span(
            "outbox publish",
            kind=SpanKind.PRODUCER,
            attributes={"messaging.batch.message_count": len(events)},
        ):
            try:
                await self.bus.publish_many(events, bodies=bodies)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the rows to the sweeper
                log.warning("outbox fast path failed, sweeper will retry: %s", exc)
                return False
        self._published.extend(e.position for e in events)
        if self._deleting is None or self._deleting.done():
            self._deleting = asyncio.create_task(self._delete_published(), name="outbox-delete")
        return True

    async def _delete_published(self) -> None:
        while self._published:
            positions, self._published = self._published, []
            try:
                await self.store.outbox_delete(positions)
            except Exception as exc:  # noqa: BLE001
                log.warning("outbox delete failed, sweeper will republish (deduped): %s", exc)

    async def settle(self) -> None:
        """Wait until the rows of every event published so far are deleted (or given up on)."""
        while self._deleting is not None and not self._deleting.done():
            await asyncio.shield(self._deleting)

    async def sweep_once(self, *, limit: int = 500, grace: float | None = None) -> int:
        """Republish outbox rows older than ``grace`` seconds. Returns how many were sent."""
        wait = self.grace if grace is None else grace
        async with self.store.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(OUTBOX_CLAIM, wait, limit)
            if not rows:
                return 0
            events = [row_to_event(r) for r in rows]
            await self.bus.publish_many(events)
            await conn.execute(
                "DELETE FROM outbox WHERE position = ANY($1::bigint[])",
                [e.position for e in events],
            )
        log.info("outbox sweeper republished %d events", len(events))
        return len(events)

    async def run_sweeper(self, stop: asyncio.Event, *, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                sent = await self.sweep_once()
            except Exception as exc:  # noqa: BLE001 - keep sweeping through outages
                log.warning("outbox sweep failed: %s", exc)
                sent = 0
            if sent == 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=interval)
                except TimeoutError:
                    pass


class Recorder:
    """Append then publish: what every service uses to emit events."""

    def __init__(self, store: EventStore, outbox: OutboxPublisher) -> None:
        self.store = store
        self.outbox = outbox

    async def append(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Any = None,
    ) -> list[RecordedEvent]:
        results = await self.store.append_batch(events, expected=expected, tracking=tracking)
        fresh = [r for r in results if not r.duplicate]
        await self.outbox.publish([r.event for r in fresh], bodies=[r.body for r in fresh])
        return [r.event for r in results]


def metadata_from_context(
    *,
    causation: RecordedEvent | None = None,
    idempotency_key: str | None = None,
    source_delivery_id: str | None = None,
) -> Metadata:
    """Metadata for a new event: the current trace, and what caused it."""
    fields = trace_fields()
    return Metadata(
        idempotency_key=idempotency_key,
        causation_id=str(causation.event_id) if causation else None,
        correlation_id=(
            (causation.metadata.correlation_id or str(causation.event_id)) if causation else None
        ),
        source_delivery_id=source_delivery_id,
        traceparent=fields.get("traceparent"),
        tracestate=fields.get("tracestate"),
    )


Handler = Callable[[RecordedEvent], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    batch: int = 64
    fetch_timeout: float = 1.0
    #: Deliveries after which a message that keeps failing is terminated as poison.
    max_deliver: int = 10
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    #: Messages of one batch processed at once. Handlers are I/O-bound (log fetch, database);
    #: ordering between messages is not relied on (decisions use expected versions instead).
    concurrency: int = 16


class Consumer:
    """A durable pull consumer shared by all replicas of a service.

    For each message: decode, run the handler inside a span whose parent is the producer's trace
    context, then ack. The handler commits its outputs with a tracking row, so a redelivery after
    a crash between commit and ack is a no-op (``AlreadyProcessed`` is acked).
    Transient errors nak with backoff; undecodable messages and ``PoisonMessage`` are terminated
    and recorded as ``MessageRejected``; other errors nak until ``max_deliver``, then likewise.
    """

    def __init__(
        self,
        bus: Bus,
        store: EventStore,
        *,
        name: str,
        topic: str,
        handler: Handler,
        settings: ConsumerSettings = ConsumerSettings(),
    ) -> None:
        self.bus = bus
        self.store = store
        self.name = name
        self.filter_subject = bus.subject(topic)
        self.handler = handler
        self.settings = settings
        self.processed = 0
        self.rejected = 0
        self._sub: Any = None
        self._settled = asyncio.Condition()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked each time a message is settled."""
        async with self._settled:
            await self._settled.wait_for(predicate)

    async def setup(self) -> None:
        # The server's own max_deliver sits above ours so that we, not the server, decide when a
        # message is poison (and record it): the server would just stop delivering it silently.
        await self.bus.ensure_consumer(
            self.name,
            self.filter_subject,
            ack_wait=self.settings.ack_wait,
            max_deliver=self.settings.max_deliver + 5,
            max_ack_pending=self.settings.max_ack_pending,
        )
        self._sub = await self.bus.js.pull_subscribe_bind(durable=self.name, stream=self.bus.stream)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process until ``stop`` is set. On stop, messages already being processed
        finish (commit and ack) and the rest of the batch is nak'ed for other replicas, so
        SIGTERM loses and duplicates nothing and does not wait for a whole batch."""
        if self._sub is None:
            await self.setup()
        limit = asyncio.Semaphore(self.settings.concurrency)
        while not stop.is_set():
            try:
                msgs = await self._sub.fetch(
                    self.settings.batch, timeout=self.settings.fetch_timeout
                )
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - NATS reconnecting: wait and retry
                if stop.is_set():
                    break
                log.warning("%s: fetch failed: %s", self.name, exc)
                await asyncio.sleep(0.5)
                continue
            await asyncio.gather(*(self._process_one(msg, limit, stop) for msg in msgs))
        await self.close()

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - connection already gone
                log.debug("%s: unsubscribe: %s", self.name, exc)

    async def _process_one(self, msg: Msg, limit: asyncio.Semaphore, stop: asyncio.Event) -> None:
        async with limit:
            if stop.is_set():
                # Draining: finish what is in flight, hand the rest of the batch straight back
                # so another replica takes it now rather than after the ack wait.
                await self._settle(msg.nak())
            else:
                await self.process(msg)
        async with self._settled:
            self._settled.notify_all()

    async def process(self, msg: Msg) -> None:
        deliveries = msg.metadata.num_delivered or 1
        try:
            event = from_wire(msg.data)
        except (EventDecodeError, UnknownEventType) as exc:
            await self._reject(msg, f"undecodable: {exc}", deliveries)
            return
        parent = context_from_headers(msg.headers)
        span_name = f"consume {event.type}"
        with tracer().start_as_current_span(
            span_name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": self.name,
                "messaging.message.id": str(event.event_id),
                "ciretry.stream": event.stream,
            },
        ) as span:
            try:
                await self.handler(event)
            except AlreadyProcessed:
                span.set_attribute("ciretry.duplicate", True)
            except PoisonMessage as exc:
                await self._reject(msg, str(exc), deliveries, event)
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                if not is_transient(exc) and deliveries >= self.settings.max_deliver:
                    log.exception("%s: giving up on %s", self.name, event.event_id)
                    await self._reject(msg, f"{type(exc).__name__}: {exc}", deliveries, event)
                    return
                delay = self._backoff(deliveries)
                log.warning(
                    "%s: %s on %s (delivery %d), retry in %.1fs",
                    self.name,
                    type(exc).__name__,
                    event.event_id,
                    deliveries,
                    delay,
                )
                await self._settle(msg.nak(delay=delay))
                return
        await self._settle(msg.ack())
        self.processed += 1

    def _backoff(self, deliveries: int) -> float:
        s = self.settings
        return float(
            min(s.backoff_cap, s.backoff_base * 2 ** (deliveries - 1)) * random.uniform(0.5, 1.0)
        )

    async def _reject(
        self, msg: Msg, reason: str, deliveries: int, event: RecordedEvent | None = None
    ) -> None:
        """Record the poison message, then terminate it. If recording fails, nak: the message
        comes back and nothing is lost."""
        msg_id = (msg.headers or {}).get("Nats-Msg-Id") or (str(event.event_id) if event else None)
        rejected = MessageRejected(
            consumer=self.name,
            subject=msg.subject,
            reason=reason[:2000],
            message_id=msg_id,
            deliveries=deliveries,
            payload_excerpt=bytes(msg.data[:512]).decode("utf-8", "replace"),
        )
        key = f"rejected:{self.name}:{msg_id or msg.metadata.sequence.stream}"
        try:
            await self.store.append_batch(
                [
                    NewEvent(
                        stream=f"rejected-{self.name}",
                        data=rejected,
                        metadata=metadata_from_context(causation=event, idempotency_key=key),
                    )
                ]
            )
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: could not record rejection, will see it again: %s", self.name, exc)
            await self._settle(msg.nak(delay=self._backoff(deliveries)))
            return
        log.error("%s: rejected message %s: %s", self.name, msg_id, reason)
        instruments().messages_rejected.add(1, {"consumer": self.name})
        self.rejected += 1
        await self._settle(msg.term())

    async def _settle(self, action: Awaitable[None]) -> None:
        # An ack lost to a NATS hiccup means a redelivery, which tracking makes harmless.
        try:
            await action
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: ack/nak not sent: %s", self.name, exc)


__all__ = [
    "Bus",
    "PublishRefused",
    "Consumer",
    "ConsumerSettings",
    "OutboxPublisher",
    "Recorder",
    "inject_headers",
    "metadata_from_context",
]
