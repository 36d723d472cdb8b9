"""Taskcluster pulse (AMQP) consumer: durable queue, manual ack only after the event is stored.

* The queue is durable and bound to ``exchange/taskcluster-queue/v1/task-{failed,exception,
  completed}`` with configurable routing-key patterns (``#`` by default; e.g.
  ``primary.#.#.#.#.proj-myproject.#`` narrows it to one provisioner). On Mozilla's Pulse the
  queue name must be ``queue/<pulse user>/<name>``.
* A message is acked only after its JobFinished is committed (or it was a duplicate, or is
  deliberately ignored). A consumer that dies before the commit leaves the message unacked and
  RabbitMQ redelivers it; the idempotency key ``taskcluster:{taskId}:{runId}:{exchange}`` makes
  the redelivery (or a second identical message) store nothing new.
* Transient store errors are retried in place with exponential backoff (the message stays
  unacked meanwhile); a message that can never be normalized, or whose events the log keeps
  refusing for a reason that is not transient (five tries), is recorded as ``MessageRejected``
  and then rejected without requeue: one bad message never holds up the others.
* ``connect_robust`` reconnects and re-declares the queue, bindings and consumer after a broker
  restart; the first connection is retried with backoff as well.

Settings (``PulseSettings.from_config``, validated with every other setting): ``CIRETRY_AMQP_URL``,
``CIRETRY_PULSE_QUEUE``, ``CIRETRY_PULSE_BINDINGS`` (``exchange=pattern`` pairs, comma separated;
a bare exchange means ``#``), ``CIRETRY_PULSE_PREFETCH``, ``CIRETRY_TASKCLUSTER_URL`` (root URL
for log links).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from ciretry.common.config import Config, load_config
from ciretry.common.errors import is_transient
from ciretry.common.eventlog import AppendResult
from ciretry.common.events import MessageRejected, Metadata, NewEvent
from ciretry.common.text import safe_text

from . import taskcluster
from .fields import Accepted, InvalidPayload, parse_json

log = logging.getLogger(__name__)

Append = Callable[[Sequence[NewEvent]], Awaitable[list[AppendResult]]]
CONSUMER_NAME = "ingest-pulse"

DEFAULT_BINDINGS: tuple[tuple[str, str], ...] = tuple(
    (f"{taskcluster.EXCHANGE_PREFIX}{name}", "#")
    for name in ("task-failed", "task-exception", "task-completed")
)


DEFAULT_QUEUE = "ciretry-ingest-pulse"
DEFAULT_PREFETCH = 64


@dataclass(frozen=True, slots=True)
class PulseSettings:
    url: str
    queue: str = DEFAULT_QUEUE
    bindings: tuple[tuple[str, str], ...] = DEFAULT_BINDINGS
    prefetch: int = DEFAULT_PREFETCH
    #: Declare the exchanges (topic, durable). Pulse owns Taskcluster's exchanges and refuses
    #: that, so the default only checks they exist (passive); tests and replays declare them.
    declare_exchanges: bool = False
    root_url: str | None = None
    reconnect_interval: float = 5.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> PulseSettings:
        """The settings ``CIRETRY_*`` gave (validated by ``load_config`` with the others)."""
        bindings = DEFAULT_BINDINGS
        if config.pulse_bindings:
            pairs = []
            for part in config.pulse_bindings:
                exchange, _, pattern = part.strip().partition("=")
                pairs.append((exchange, pattern or "#"))
            bindings = tuple(pairs)
        return cls(
            url=config.amqp_url,
            queue=config.pulse_queue,
            bindings=bindings,
            prefetch=config.pulse_prefetch,
            root_url=config.taskcluster_url or None,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PulseSettings:
        """``from_config`` of the environment (ConfigError naming the variable if wrong)."""
        return cls.from_config(load_config(environ))


class PulseConsumer:
    """Consume Taskcluster queue messages into the event log via ``append`` (the ingest
    batcher's ``append``, so pulse and webhooks share group commits, or any equivalent)."""

    def __init__(
        self,
        settings: PulseSettings,
        append: Append,
        *,
        on_settled: Callable[[str, AbstractIncomingMessage], None] | None = None,
    ) -> None:
        self.settings = settings
        self.append = append
        self.on_settled = on_settled
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.queue: AbstractQueue | None = None
        self.counts: dict[str, int] = {}
        self._closing = False

    async def start(self) -> None:
        """Connect (retrying with backoff), declare the queue and bindings, start consuming."""
        s = self.settings
        attempt = 0
        while True:
            try:
                self.connection = await aio_pika.connect_robust(
                    s.url, reconnect_interval=s.reconnect_interval
                )
                break
            except Exception as exc:
                if not is_transient(exc) and not isinstance(exc, aio_pika.exceptions.AMQPError):
                    raise
                attempt += 1
                delay = self._backoff(attempt)
                log.warning("pulse: cannot connect (%s), retry in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
        channel = await self.connection.channel()
        assert isinstance(channel, AbstractRobustChannel)
        self.channel = channel
        await channel.set_qos(prefetch_count=s.prefetch)
        queue = await channel.declare_queue(s.queue, durable=True)
        for exchange_name, pattern in s.bindings:
            exchange: AbstractExchange
            if s.declare_exchanges:
                exchange = await channel.declare_exchange(
                    exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
            else:
                exchange = await channel.get_exchange(exchange_name, ensure=True)
            await queue.bind(exchange, routing_key=pattern)
        await queue.consume(self._on_message)
        self.queue = queue
        log.info("pulse: consuming %s (%d bindings)", s.queue, len(s.bindings))

    async def run(self, stop: asyncio.Event) -> None:
        """Worker for the service runtime: consume until ``stop``."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        self._closing = True
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()

    # --- per message --------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        outcome = await self._handle(message)
        if outcome is None:
            return  # left unacked: the broker redelivers it
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if self.on_settled is not None:
            self.on_settled(outcome, message)

    async def _handle(self, message: AbstractIncomingMessage) -> str | None:
        exchange = message.exchange or ""
        try:
            body = parse_json(message.body)
            result = taskcluster.normalize(exchange, body, root_url=self.settings.root_url)
        except InvalidPayload as exc:
            return await self._poison(message, str(exc))
        if not isinstance(result, Accepted):  # Taskcluster has no disputes by reply
            await self._settle(message.ack())
            return "ignored"
        for note in result.notes:
            log.warning("pulse: %s", note)
        try:
            results = await self._append_retrying(result.events)
        except _Refused as refused:
            # The log refuses what this message became, however often it is tried: recorded and
            # dropped, so it neither holds a prefetch slot forever nor stops the messages after.
            return await self._poison(message, f"the event log refused it: {refused}")
        if results is None:
            return None
        await self._settle(message.ack())
        return "duplicate" if all(r.duplicate for r in results) else "stored"

    async def _append_retrying(self, events: Sequence[NewEvent]) -> list[AppendResult] | None:
        """The append, retried; None when closing first. Raises ``_Refused`` when the store
        keeps refusing for a reason that is not transient."""
        attempt = 0
        while not self._closing:
            try:
                return await self.append(events)
            except Exception as exc:
                attempt += 1
                if not is_transient(exc) and attempt >= 5:
                    log.exception("pulse: giving up on a message after %d attempts", attempt)
                    raise _Refused(f"{type(exc).__name__}: {exc}") from exc
                delay = self._backoff(attempt)
                log.warning("pulse: store failed (%s), retry in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
        return None

    async def _poison(self, message: AbstractIncomingMessage, reason: str) -> str | None:
        """Record the message as rejected, then drop it; if recording fails, leave it unacked."""
        # The sender's message id keys the rejection, unless it could not be stored as text.
        ident = message.message_id
        if not ident or len(ident) > 200 or not ident.isprintable():
            ident = hashlib.sha256(message.body).hexdigest()[:32]
        event = MessageRejected(
            consumer=CONSUMER_NAME,
            # Safe text: the body, the routing key and the reason may hold a NUL.
            subject=safe_text(f"{message.exchange}:{message.routing_key}", 500),
            reason=safe_text(reason, 2000),
            message_id=ident,
            deliveries=2 if message.redelivered else 1,
            payload_excerpt=safe_text(message.body[:512].decode("utf-8", "replace"), 512),
        )
        new = NewEvent(
            stream=f"rejected-{CONSUMER_NAME}",
            data=event,
            metadata=Metadata(idempotency_key=f"rejected:{CONSUMER_NAME}:{ident}"),
        )
        try:
            if await self._append_retrying([new]) is None:
                return None
        except _Refused:
            return None  # left unacked: seen again after a reconnect
        log.error("pulse: rejected message %s: %s", ident, reason[:200])
        await self._settle(message.reject(requeue=False))
        return "rejected"

    async def _settle(self, action: Awaitable[Any]) -> None:
        # A lost ack means a redelivery, which the idempotency key makes harmless.
        with contextlib.suppress(Exception):
            await action

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return float(min(s.backoff_cap, s.backoff_base * 2 ** (attempt - 1))) * random.uniform(
            0.5, 1.0
        )


class _Refused(Exception):
    """The event log refused an append for a reason that is not transient."""
