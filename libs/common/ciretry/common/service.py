"""The life of one service process: connect, migrate, serve health, run workers, drain on SIGTERM.

Each service's ``main`` module provides only ``setup(infra, app) -> list[Worker]``: it adds its
routes to the aiohttp app and returns its background workers. Everything else is here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .bus import Bus, Consumer, ConsumerSettings, OutboxPublisher, Recorder
from .config import Config, redacted
from .errors import is_transient
from .eventstore import EventStore
from .metrics import instruments, metrics_endpoint, setup_metrics, shutdown_metrics
from .telemetry import (
    server_span_middleware,
    setup_logging,
    setup_telemetry,
    shutdown_telemetry,
)

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"ingest": 8080, "classify": 8081, "act": 8082}

Worker = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class Infra:
    """The connections a service works with, opened and closed by ``run_service``."""

    name: str
    config: Config
    store: EventStore
    bus: Bus
    outbox: OutboxPublisher
    recorder: Recorder
    #: Extra readiness checks a service registers (e.g. the pulse consumer's AMQP link).
    ready_checks: list[Callable[[], Awaitable[bool]]] = field(default_factory=list)
    #: Followers whose lag and oldest unprocessed event the metrics sampler reports.
    consumers: list[Consumer] = field(default_factory=list)
    #: Called on shutdown after the workers stopped, in reverse order.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def ready(self) -> bool:
        try:
            await self.store.ping()
        except Exception:  # noqa: BLE001 - not ready is the answer, not an error
            return False
        if not self.bus.connected:
            return False
        for check in self.ready_checks:
            try:
                if not await check():
                    return False
            except Exception:  # noqa: BLE001
                return False
        return True


Setup = Callable[[Infra, web.Application], Awaitable[list[Worker]]]


async def connect_with_retry(
    config: Config, *, name: str, attempts: int = 60
) -> tuple[EventStore, Bus]:
    """Open the database pool and the NATS connection, waiting out a dependency that is still
    starting (compose and Kubernetes start everything at once)."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            store = await EventStore.connect(
                config.database_url, config.database_schema, max_size=config.database_pool_max
            )
            break
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts:
                raise
            log.warning("database not reachable yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
    try:
        bus = await Bus.connect(
            config.nats_url,
            prefix=config.nats_prefix,
            stream=config.nats_stream,
            duplicate_window=config.nats_duplicate_window,
            name=f"ciretry-{name}",
        )
    except BaseException:
        await store.close()
        raise
    return store, bus


def consumer_settings(config: Config) -> ConsumerSettings:
    return ConsumerSettings(
        batch=config.consumer_batch,
        fetch_timeout=config.consumer_fetch_timeout,
        max_deliver=config.consumer_max_deliver,
        ack_wait=config.consumer_ack_wait,
        concurrency=config.consumer_concurrency,
        max_ack_pending=config.consumer_max_ack_pending,
        backoff_base=config.consumer_backoff_base,
        backoff_cap=config.consumer_backoff_cap,
        catch_up_grace=config.consumer_catch_up_grace,
        catch_up_interval=config.consumer_catch_up_interval,
    )


def health_routes(infra: Infra) -> list[web.RouteDef]:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "service": infra.name})

    async def readyz(_: web.Request) -> web.Response:
        ok = await infra.ready()
        return web.json_response(
            {"status": "ready" if ok else "not ready", "service": infra.name},
            status=200 if ok else 503,
        )

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics_endpoint),
    ]


async def sample_gauges(infra: Infra, stop: asyncio.Event, interval: float = 5.0) -> None:
    """Read the gauges that need I/O every ``interval`` seconds (``sample_once``)."""
    while not stop.is_set():
        await sample_once(infra)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def sample_once(infra: Infra, timeout: float = 1.0) -> None:  # noqa: ASYNC109
    """Read the gauges that need I/O: outbox depth, and per follower its consumer lag and the
    age of its oldest unprocessed event. Each read is bounded: a busy pool or a slow server
    skips a sample, never delays shutdown."""
    samples = instruments().samples

    async def depth() -> None:
        samples.outbox_depth = await infra.store.outbox_depth()

    async def lag(consumer: Consumer) -> None:
        samples.consumer_lag[consumer.name] = await infra.bus.pending(consumer.name)

    async def oldest(consumer: Consumer) -> None:
        samples.oldest_unprocessed[consumer.name] = await consumer.oldest_unprocessed_age()

    reads = [depth()]
    for c in infra.consumers:
        reads += [lag(c), oldest(c)]
    for read in reads:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(read, timeout=timeout)


async def run_service(
    name: str,
    config: Config,
    setup: Setup,
    *,
    stop: asyncio.Event | None = None,
    own_process: bool = True,
    started: asyncio.Event | None = None,
) -> None:
    """Run one service until SIGTERM/SIGINT (or ``stop``), then drain and close everything.

    ``own_process=False`` leaves logging, telemetry providers and signals to the caller (tests
    run several services in one process); ``started`` is set once the HTTP server listens.
    """
    if own_process:
        setup_logging(config.log_level, config.log_json)
        setup_telemetry(f"ciretry-{name}")
        setup_metrics(f"ciretry-{name}")
    log.info("starting %s with %s", name, redacted(config))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_process:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

    store, bus = await connect_with_retry(config, name=name)
    outbox = OutboxPublisher(store, bus, grace=config.outbox_grace)
    infra = Infra(name, config, store, bus, outbox, Recorder(store, outbox))
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await store.migrate()
        await bus.ensure_stream(replicas=config.nats_stream_replicas)
        app = web.Application(
            client_max_size=config.max_body_bytes, middlewares=[server_span_middleware()]
        )
        app.add_routes(health_routes(infra))
        workers = await setup(infra, app)
        workers.append(lambda s: outbox.run_sweeper(s, interval=config.outbox_sweep_interval))
        workers.append(lambda s: sample_gauges(infra, s))
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        port = config.http_port or DEFAULT_PORTS.get(name, 0)
        site = web.TCPSite(runner, config.http_host, port)
        await site.start()
        log.info("%s listening on %s:%s", name, config.http_host, port)
        if started is not None:
            started.set()
        tasks = [asyncio.create_task(w(stop), name=f"{name}-worker") for w in workers]
        waiter = asyncio.create_task(stop.wait())
        first, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for f in first:
            if f is not waiter and f.exception() is not None:
                log.error("worker failed: %r; shutting down", f.exception())
        stop.set()
        waiter.cancel()
        # Workers see ``stop`` and finish what is in flight (drain) before returning. Past the
        # ack wait, JetStream redelivers unacked messages anyway: stop waiting, say who hung.
        done, pending = await asyncio.wait(tasks, timeout=config.consumer_ack_wait)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                log.warning("worker ended with %r", t.exception())
        for t in pending:
            stack = "".join(
                f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}; " for f in t.get_stack()
            )
            log.error("worker still busy after the drain timeout, cancelled: %s", stack)
    finally:
        log.info("%s stopping", name)
        for t in tasks:
            t.cancel()
        if runner is not None:
            await runner.cleanup()
        for cleanup in reversed(infra.cleanups):
            with contextlib.suppress(Exception):
                await cleanup()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(outbox.settle(), timeout=5)  # or the sweeper republishes
        with contextlib.suppress(Exception):
            await bus.close()
        await store.close()
        if own_process:
            shutdown_telemetry()
            shutdown_metrics()
