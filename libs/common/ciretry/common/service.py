"""The life of one service process: connect, migrate, serve health, run workers, drain on SIGTERM.

Each service's ``main`` module provides only ``setup(infra, app) -> list[Worker]``: it adds its
routes to the aiohttp app and returns its background workers. Everything else is here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .bus import Bus, Consumer, ConsumerSettings, OutboxPublisher, Recorder
from .config import Config, redacted, startup_warnings
from .eventstore import EventStore
from .metrics import instruments, metrics_endpoint, setup_metrics, shutdown_metrics
from .startup import (
    PortInUse,
    StopRequested,
    endpoint,
    is_retryable_connect_error,
    until_stopped,
    wait_for,
    why_failed,
)
from .telemetry import (
    server_span_middleware,
    setup_logging,
    setup_telemetry,
    shutdown_telemetry,
)

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"ingest": 8080, "classify": 8081, "act": 8082}
#: CPython's collector thresholds once a service serves (its defaults: 700, 10, 10). A message
#: allocates hundreds of container objects that reference counting frees; with 700 the young
#: generation was collected hundreds of times a minute, each pass also aging the survivors into
#: older generations that had to be traversed again (docs/benchmarks.md, "Stop 32").
SERVING_GC_THRESHOLDS = (10_000, 10, 10)


def settle_heap() -> None:
    """Collect what starting left behind, move every object alive now (modules, compiled rules,
    pools, providers: the process's long-lived heap) out of the collector's reach
    (``gc.freeze``), and collect the young generation less often (``SERVING_GC_THRESHOLDS``).
    Reference counting frees as before; cyclic garbage is collected after ten thousand net
    allocations instead of 700 (seconds at the busiest, against a fraction of one). The
    collector had 4-5% of every service's CPU under load; after, under 1%."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


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
        return all(value == "ok" for value in (await self.readiness()).values())

    async def readiness(self) -> dict[str, str]:
        """Each dependency and check: "ok", or what is wrong (``/readyz`` shows it)."""
        checks: dict[str, str] = {}
        try:
            await self.store.ping()
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - not ready is the answer, not an error
            checks["database"] = f"{endpoint('PostgreSQL', self.config.database_url)} " + (
                why_failed(exc)
            )
        checks["nats"] = "ok" if self.bus.connected else "not connected"
        for i, check in enumerate(self.ready_checks):
            name = getattr(check, "__name__", f"check{i}")
            try:
                checks[name] = "ok" if await check() else "not ready"
            except Exception as exc:  # noqa: BLE001
                checks[name] = why_failed(exc)
        return checks


Setup = Callable[[Infra, web.Application], Awaitable[list[Worker]]]


async def connect_with_retry(
    config: Config, *, name: str, stop: asyncio.Event | None = None
) -> tuple[EventStore, Bus]:
    """Open the database pool and the NATS connection, waiting out a dependency that is still
    starting (compose and Kubernetes start everything at once): one log line per attempt,
    ``config.connect_attempts`` attempts, DependencyUnavailable with the cause after the last,
    StopRequested as soon as ``stop`` is set."""

    def report(line: str) -> None:
        log.warning("%s", line)

    store = await wait_for(
        endpoint("PostgreSQL", config.database_url),
        lambda: EventStore.connect(
            config.database_url,
            config.database_schema,
            max_size=config.database_pool_max,
            key_lookups=True,
        ),
        attempts=config.connect_attempts,
        report=report,
        stop=stop,
    )
    try:
        bus = await wait_for(
            endpoint("NATS", config.nats_url),
            lambda: Bus.connect(
                config.nats_url,
                prefix=config.nats_prefix,
                stream=config.nats_stream,
                duplicate_window=config.nats_duplicate_window,
                name=f"ciretry-{name}",
            ),
            attempts=config.connect_attempts,
            report=report,
            stop=stop,
            retryable=is_retryable_connect_error,
        )
    except BaseException:
        await store.close()
        raise
    return store, bus


def instance_id(config: Config) -> str:
    return config.instance_id or f"{socket.gethostname()}-{os.getpid()}"


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

    instance = instance_id(infra.config)

    async def readyz(_: web.Request) -> web.Response:
        checks = await infra.readiness()
        ok = all(value == "ok" for value in checks.values())
        return web.json_response(
            {
                "status": "ready" if ok else "not ready",
                "service": infra.name,
                "instance": instance,
                "checks": checks,
            },
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
    log.info("starting %s (instance %s) with %s", name, instance_id(config), redacted(config))
    for warning in startup_warnings(config, name):
        log.warning("%s", warning)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_process:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

    try:
        store, bus = await connect_with_retry(config, name=name, stop=stop)
    except StopRequested:
        log.info("%s stopped before it was connected", name)
        if own_process:
            shutdown_telemetry()
            shutdown_metrics()
        return
    outbox = OutboxPublisher(store, bus, grace=config.outbox_grace)
    infra = Infra(name, config, store, bus, outbox, Recorder(store, outbox))
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await until_stopped(store.migrate(), stop)
        await until_stopped(bus.ensure_stream(replicas=config.nats_stream_replicas), stop)
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
        try:
            await site.start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                f"{name} cannot listen on {config.http_host}:{port}: the address is in use "
                "(another ciretry, or another program); set CIRETRY_HTTP_PORT to a free port"
            ) from None
        log.info("%s listening on %s:%s", name, config.http_host, port)
        if started is not None:
            started.set()
        if own_process:
            settle_heap()
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
    except StopRequested:
        log.info("%s stopped while starting", name)
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
