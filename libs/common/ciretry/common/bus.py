"""NATS JetStream as the bus: stream setup, the outbox publisher and sweeper, pull consumers.

The event log is the source of truth; the bus only carries committed events onward. Every
message has ``Nats-Msg-Id`` = event id, so a republish (sweeper after a crash, or fast path and
sweeper racing) is dropped by JetStream inside its duplicate window.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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

from .catchup import FollowerLog, topic_types
from .errors import PoisonMessage, is_transient
from .eventlog import AlreadyProcessed, EventLog, Tracking, Undecodable
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
from .metrics import instruments
from .startup import why_failed
from .telemetry import (
    context_from_headers,
    context_from_metadata,
    current_span,
    inject_headers,
    trace_fields,
)

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

    async def undelivered(self, durable: str) -> int:
        """Messages the consumer has not delivered to anyone yet."""
        info = await self.js.consumer_info(self.stream, durable, timeout=2)
        return int(info.num_pending or 0)


#: How long published outbox rows wait to be deleted together (``OutboxPublisher``).
OUTBOX_DELETE_LINGER = 0.05


class OutboxPublisher:
    """Moves committed events from the outbox to JetStream.

    ``publish`` is the fast path, called right after a commit with the events just appended.
    ``sweep_once`` republishes what a crash (or a NATS outage) left behind; rows are claimed with
    ``FOR UPDATE SKIP LOCKED`` so several replicas sweep without stepping on each other.
    """

    def __init__(
        self, store: EventLog, bus: Bus, *, grace: float = 5.0, linger: float | None = None
    ) -> None:
        self.store = store
        self.bus = bus
        self.grace = grace
        # Rows whose events reached JetStream, deleted in the background: the publishes of
        # ``linger`` seconds share one DELETE instead of a round trip each (under load, a
        # service publishes hundreds of times a second). A delete lost to a crash only means
        # the sweeper republishes after ``grace``, and JetStream drops it by Msg-Id; the
        # linger stays well inside ``grace``, so the sweeper never sees a row only waiting.
        self.linger = min(OUTBOX_DELETE_LINGER, grace / 10) if linger is None else linger
        self._published: list[int] = []
        self._hurry = asyncio.Event()
        self._deleting: asyncio.Task[None] | None = None

    async def publish(
        self, events: Sequence[RecordedEvent], *, bodies: Sequence[bytes | None] | None = None
    ) -> bool:
        """Best effort: on failure the rows stay and the sweeper retries. True if all went.
        ``bodies``: the encoded event bodies when the caller has them (``AppendResult.body``)."""
        if not events:
            return True
        with current_span(
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
        if self.linger > 0 and not self._hurry.is_set():
            with contextlib.suppress(TimeoutError):  # the linger is up: delete what gathered
                await asyncio.wait_for(self._hurry.wait(), self.linger)
        while self._published:
            positions, self._published = self._published, []
            try:
                await self.store.outbox_delete(positions)
            except Exception as exc:  # noqa: BLE001
                log.warning("outbox delete failed, sweeper will republish (deduped): %s", exc)

    async def settle(self) -> None:
        """Wait until the rows of every event published so far are deleted (or given up on),
        cutting the linger short."""
        self._hurry.set()
        try:
            while self._deleting is not None and not self._deleting.done():
                await asyncio.shield(self._deleting)
        finally:
            self._hurry.clear()

    async def sweep_once(self, *, limit: int = 500, grace: float | None = None) -> int:
        """Republish outbox rows older than ``grace`` seconds. Returns how many were sent."""
        wait = self.grace if grace is None else grace
        async with self.store.outbox_claim(wait, limit) as events:
            if not events:
                return 0
            await self.bus.publish_many(events)  # claimed rows are deleted when this succeeds
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

    def __init__(self, store: EventLog, outbox: OutboxPublisher) -> None:
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


class Append(Protocol):
    """How a component appends: ``Recorder.append`` in a service (append, then publish), or
    the log's ``append_batch`` alone (tests, tools: the outbox keeps the events for a sweeper)."""

    def __call__(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Tracking | None = None,
    ) -> Awaitable[object]: ...


def appender(log: EventLog, recorder: Recorder | None) -> Append:
    """Append with the recorder when there is one (events reach the bus at once), else to the
    log alone."""
    return recorder.append if recorder is not None else log.append_batch


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
    #: Failures of one event (other than transient ones) after which it is rejected as poison.
    max_deliver: int = 10
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    #: Nak delay after a failure: ``backoff_base`` doubling per delivery up to ``backoff_cap``
    #: (jittered). Transient failures are retried this way for as long as they last.
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    #: Messages of one batch processed at once. Handlers are I/O-bound (log fetch, database);
    #: ordering between messages is not relied on (decisions use expected versions instead).
    concurrency: int = 16
    #: Catch-up from the log (``catchup``): an event of the topic still without a tracking row
    #: this many seconds after it was recorded is taken from the log, checked for every
    #: ``catch_up_interval`` seconds. 0 interval: no catch-up (JetStream only).
    catch_up_grace: float = 60.0
    catch_up_interval: float = 10.0
    #: Events handled per catch-up round (a full round starts the next one at once).
    catch_up_batch: int = 200
    #: Seconds a replica's catch-up lease lasts unless released (one replica runs the rounds;
    #: should it die in one, another takes over after this long).
    catch_up_lease: float = 120.0


class _Retry(float):
    """Handler outcome: failed, try again after this many seconds."""


class _Reject(str):
    """Handler outcome: give up on the event as poison, for this reason."""


#: Handler outcome: someone else had processed the event (``AlreadyProcessed``).
_DUPLICATE = _Retry(-1.0)


class Consumer:
    """A follower: a durable pull consumer shared by all replicas of a service (the fast path),
    and a catch-up from the log (the guarantee; see ``catchup``).

    For each message: decode, run the handler inside a span whose parent is the producer's trace
    context, then ack. The handler commits its outputs with a tracking row (a bare one when the
    event needs nothing), so a redelivery after a crash between commit and ack is a no-op
    (``AlreadyProcessed`` is acked), and so whatever has no tracking row is still to do.
    Transient errors nak with backoff, without limit: the server never drops a message on its
    own. Undecodable messages and ``PoisonMessage`` are terminated and recorded as
    ``MessageRejected`` (with the tracking row: handled); other errors nak until
    ``max_deliver``, then likewise.

    The catch-up hands events of the topic that have no tracking row ``catch_up_grace`` seconds
    after they were recorded to the same handler, one replica at a time (a lease per
    follower in the database): whatever the bus lost is still processed, exactly once.
    """

    def __init__(
        self,
        bus: Bus,
        store: EventLog,
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
        self.log = FollowerLog(store, name, topic_types(topic))
        self.processed = 0
        self.rejected = 0
        #: Events processed from the log rather than the bus.
        self.caught_up = 0
        self._sub: Any = None
        self._settled = asyncio.Condition()
        #: Failed catch-up attempts per event (the bus counts its deliveries itself).
        self._log_attempts: dict[uuid.UUID, int] = {}

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked each time a message is settled."""
        async with self._settled:
            await self._settled.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._settled:
            self._settled.notify_all()

    async def setup(self) -> None:
        # Unlimited deliveries on the server: we decide when a message is poison (and record
        # it); the server would stop delivering silently once its count was spent, which a
        # dependency away for longer than the backoff schedule used to do.
        await self.bus.ensure_consumer(
            self.name,
            self.filter_subject,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.settings.max_ack_pending,
        )
        self._sub = await self.bus.js.pull_subscribe_bind(durable=self.name, stream=self.bus.stream)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process until ``stop`` is set, with the catch-up alongside. On stop,
        messages already being processed finish (commit and ack) and the rest of the batch is
        nak'ed for other replicas, so SIGTERM loses and duplicates nothing and does not wait for
        a whole batch."""
        if self._sub is None:
            await self.setup()
        catch_up = asyncio.create_task(self.run_catch_up(stop), name=f"{self.name}-catch-up")
        try:
            await self._fetch_loop(stop)
        finally:
            await asyncio.gather(catch_up, return_exceptions=True)
            await self.close()

    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        """Keep ``concurrency`` messages under way: fetch as many as there is room for whenever
        one finishes, rather than a batch at a time (one slow message, a 20 MB log say, would
        hold back the next batch for everyone)."""
        limit = asyncio.Semaphore(self.settings.concurrency)
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                room = self.settings.concurrency - len(running)
                if room <= 0:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await self._sub.fetch(
                        min(self.settings.batch, room), timeout=self.settings.fetch_timeout
                    )
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except Exception as exc:  # noqa: BLE001 - NATS reconnecting: wait and retry
                    if stop.is_set():
                        break
                    log.warning("%s: fetch failed: %s", self.name, exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._process_one(msg, limit, stop))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            # Stopping: what is under way finishes (commit and ack); nothing else was fetched.
            if running:
                await asyncio.gather(*running, return_exceptions=True)

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
        await self._notify()

    async def process(self, msg: Msg) -> None:
        deliveries = msg.metadata.num_delivered or 1
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        try:
            event = from_wire(msg.data)
        except (EventDecodeError, UnknownEventType) as exc:
            recorded = await self._reject(
                f"undecodable: {exc}",
                deliveries,
                subject=msg.subject,
                message_id=msg_id or str(msg.metadata.sequence.stream),
                payload=bytes(msg.data[:512]),
                event_id=_as_uuid(msg_id),
            )
            await self._settle(msg.term() if recorded else msg.nak(delay=self._backoff(deliveries)))
            return
        outcome = await self._handle(
            event, deliveries, parent=context_from_headers(msg.headers), subject=msg.subject
        )
        if outcome is None or outcome is _DUPLICATE:
            await self._settle(msg.ack())
            self.processed += 1
        elif isinstance(outcome, _Retry):
            await self._settle(msg.nak(delay=float(outcome)))
        else:
            recorded = await self._reject(
                str(outcome),
                deliveries,
                subject=msg.subject,
                message_id=msg_id or str(event.event_id),
                payload=bytes(msg.data[:512]),
                event_id=event.event_id,
                event=event,
            )
            await self._settle(msg.term() if recorded else msg.nak(delay=self._backoff(deliveries)))

    async def _handle(
        self, event: RecordedEvent, deliveries: int, *, parent: Any, subject: str, via: str = "bus"
    ) -> _Retry | _Reject | None:
        """Run the handler on one event (from the bus or the log). None: done;
        ``_DUPLICATE``: done before, by someone else; ``_Retry``: try again later; ``_Reject``:
        poison."""
        with current_span(
            f"consume {event.type}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": subject,
                "messaging.consumer.group.name": self.name,
                "messaging.message.id": str(event.event_id),
                "ciretry.stream": event.stream,
                "ciretry.via": via,
            },
        ) as span:
            try:
                await self.handler(event)
            except AlreadyProcessed:
                span.set_attribute("ciretry.duplicate", True)
                return _DUPLICATE
            except PoisonMessage as exc:
                return _Reject(str(exc))
            except Exception as exc:  # noqa: BLE001 - classified below
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                if not is_transient(exc) and deliveries >= self.settings.max_deliver:
                    log.exception("%s: giving up on %s", self.name, event.event_id)
                    return _Reject(f"{type(exc).__name__}: {exc}")
                delay = self._backoff(deliveries)
                log.warning(
                    "%s: %s on %s (%s attempt %d), retry in %.1fs",
                    self.name,
                    type(exc).__name__,
                    event.event_id,
                    via,
                    deliveries,
                    delay,
                )
                return _Retry(delay)
        return None

    def _backoff(self, deliveries: int) -> float:
        s = self.settings
        return float(
            min(s.backoff_cap, s.backoff_base * 2 ** (deliveries - 1)) * random.uniform(0.5, 1.0)
        )

    async def _reject(
        self,
        reason: str,
        deliveries: int,
        *,
        subject: str,
        message_id: str,
        payload: bytes,
        event_id: uuid.UUID | None,
        event: RecordedEvent | None = None,
    ) -> bool:
        """Record the poison message, with the tracking row of its event when it has one (the
        event then counts as handled: the catch-up leaves it alone). True when recorded (or
        someone processed the event meanwhile); False if recording failed: the caller tries
        again later and nothing is lost."""
        rejected = MessageRejected(
            consumer=self.name,
            subject=subject,
            reason=reason[:2000],
            message_id=message_id,
            deliveries=deliveries,
            payload_excerpt=payload.decode("utf-8", "replace"),
        )
        key = f"rejected:{self.name}:{message_id}"
        try:
            await self.store.append_batch(
                [
                    NewEvent(
                        stream=f"rejected-{self.name}",
                        data=rejected,
                        metadata=metadata_from_context(causation=event, idempotency_key=key),
                    )
                ],
                tracking=Tracking(self.name, event_id) if event_id is not None else None,
            )
        except AlreadyProcessed:
            return True  # a redelivery or the catch-up processed it after all
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: could not record rejection, will see it again: %s", self.name, exc)
            return False
        log.error("%s: rejected message %s: %s", self.name, message_id, reason)
        instruments().messages_rejected.add(1, {"consumer": self.name})
        self.rejected += 1
        return True

    async def _settle(self, action: Awaitable[None]) -> None:
        # An ack lost to a NATS hiccup means a redelivery, which tracking makes harmless.
        try:
            await action
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: ack/nak not sent: %s", self.name, exc)

    # --- catch-up from the log --------------------------------------------------------------

    async def run_catch_up(self, stop: asyncio.Event) -> None:
        """Catch-up rounds until ``stop`` is set: every ``catch_up_interval`` seconds, at once
        again after a full round. Outages only delay it."""
        interval = self.settings.catch_up_interval
        if interval <= 0:
            return
        while not stop.is_set():
            try:
                handled = await self.catch_up_once(stop)
            except Exception as exc:  # noqa: BLE001 - keep following through outages
                log.warning("%s: catch-up: %s", self.name, exc)
                handled = 0
            if handled < self.settings.catch_up_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=interval)

    async def catch_up_once(self, stop: asyncio.Event | None = None) -> int:
        """One round: bring the follower's view of the log up to date, then hand the events
        still unprocessed after the grace period to the handler. Does nothing when another
        replica is in a round for this follower (holds its lease). Returns how many events were
        handed over."""
        if not await self.log.claim(self.settings.catch_up_lease):
            return 0
        try:
            await self.log.refresh()
            positions = self.log.due(
                dt.datetime.now(dt.UTC), self.settings.catch_up_grace, self.settings.catch_up_batch
            )
            if not positions or await self._bus_has_backlog():
                return 0
            items = await self.log.read(positions)
            limit = asyncio.Semaphore(self.settings.concurrency)

            async def one(item: RecordedEvent | Undecodable) -> None:
                async with limit:
                    if stop is None or not stop.is_set():
                        await self._process_logged(item)
                await self._notify()

            await asyncio.gather(*(one(item) for item in items))
            return len(items)
        finally:
            with contextlib.suppress(Exception):  # unreleased, it expires
                await self.log.release()

    async def _bus_has_backlog(self) -> bool:
        """True when JetStream still holds undelivered messages for this consumer: the bus is
        behind, not lossy, and will deliver them; handling the same events from the log too
        would only double the work of a follower that is already behind."""
        try:
            return await self.bus.undelivered(self.name) > 0
        except Exception:  # noqa: BLE001 - NATS away: the log is all there is
            return False

    async def _process_logged(self, item: RecordedEvent | Undecodable) -> None:
        if isinstance(item, Undecodable):
            exc = item.error
            event_id = self.log.event_id(item.position)
            if event_id is not None:
                await self._reject(
                    f"undecodable: {exc}",
                    1,
                    subject=self.filter_subject,
                    message_id=str(event_id),
                    payload=b"",
                    event_id=event_id,
                )
            return
        event = item
        attempts = self._log_attempts.get(event.event_id, 0) + 1
        outcome = await self._handle(
            event,
            attempts,
            parent=context_from_metadata(event.metadata),
            subject=subject_for(self.bus.prefix, event.data),
            via="log",
        )
        if outcome is _DUPLICATE:  # the bus (or another replica) got there first
            self._log_attempts.pop(event.event_id, None)
            return
        if isinstance(outcome, _Retry):
            self._log_attempts[event.event_id] = attempts
            return
        self._log_attempts.pop(event.event_id, None)
        if outcome is None:
            # Tracked by the handler's commit, or not if the handler had nothing to do: then
            # here, so that the event is not taken again.
            await self.store.record_tracking(Tracking(self.name, event.event_id))
            self.caught_up += 1
            log.info("%s: caught up %s %s from the log", self.name, event.type, event.event_id)
        else:
            await self._reject(
                str(outcome),
                attempts,
                subject=subject_for(self.bus.prefix, event.data),
                message_id=str(event.event_id),
                payload=to_wire(event)[:512],
                event_id=event.event_id,
                event=event,
            )

    async def oldest_unprocessed_age(self) -> float:
        """Seconds since the oldest event of this follower's topic without a tracking row was
        recorded (0: nothing waiting). Sampled into the ``ciretry.follower.oldest_unprocessed``
        gauge."""
        return await self.log.oldest_unprocessed_age(dt.datetime.now(dt.UTC))


def _as_uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


__all__ = [
    "Append",
    "Bus",
    "PublishRefused",
    "Consumer",
    "ConsumerSettings",
    "OutboxPublisher",
    "Recorder",
    "appender",
    "inject_headers",
    "metadata_from_context",
]
