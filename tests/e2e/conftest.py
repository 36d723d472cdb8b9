"""The three services in one process (as tasks), on real PostgreSQL and JetStream, with a fake
GitLab and a fake Buildkite that serve job logs and their retry (and pipeline) endpoints."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

import ciretry.act.main
import ciretry.classify.main
import ciretry.ingest.main
from ciretry.common.bus import Bus
from ciretry.common.config import Config, load_config
from ciretry.common.embedded import free_port
from ciretry.common.eventstore import EventStore
from ciretry.common.service import run_service
from ciretry.common.telemetry import setup_telemetry
from tests.support.providers import FakeBuildkite, FakeGitLab

SECRET = "e2e-webhook-secret"
BUILDKITE_SECRET = "e2e-buildkite-secret"
SERVICES = {
    "ingest": ciretry.ingest.main.setup,
    "classify": ciretry.classify.main.setup,
    "act": ciretry.act.main.setup,
}


@dataclass
class Stack:
    config: Config
    ports: dict[str, int]
    gitlab: FakeGitLab
    buildkite: FakeBuildkite
    store: EventStore
    nats_url: str

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    @contextlib.asynccontextmanager
    async def subscription(self, topic: str, type_name: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """Core NATS subscription to published events of one type: lets a test await an event
        instead of polling the database."""
        nc = await nats.connect(self.nats_url)
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            await queue.put(msg.data)

        await nc.subscribe(f"{self.config.nats_prefix}.{topic}.{type_name}", cb=on_msg)
        try:
            yield queue
        finally:
            await nc.close()


class SpanWaiter(SpanProcessor):
    """Lets a test await the end of a span by name (spans end after the handler's work)."""

    def __init__(self) -> None:
        self.ended: dict[str, int] = {}
        self.changed = asyncio.Condition()
        self.loop = asyncio.get_running_loop()

    def on_end(self, span: ReadableSpan) -> None:
        self.ended[span.name] = self.ended.get(span.name, 0) + 1
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._notify()))

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, name: str, count: int = 1, within: float = 30) -> None:
        async def wait() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.ended.get(name, 0) >= count)

        await asyncio.wait_for(wait(), within)


@pytest.fixture
async def span_waiter(span_exporter: object) -> SpanWaiter:
    waiter = SpanWaiter()
    setup_telemetry("ciretry-test", extra_processors=(waiter,))
    return waiter


@pytest.fixture
async def stack(pg_dsn: str, nats_url: str, schema: str, unique: str) -> AsyncIterator[Stack]:
    gitlab = await FakeGitLab().started()
    buildkite = await FakeBuildkite().started()
    base = load_config(
        {},
        database_url=pg_dsn,
        database_schema=schema,
        database_pool_max=4,
        nats_url=nats_url,
        nats_prefix=f"e{unique}",
        nats_stream=f"E{unique}",
        gitlab_url=gitlab.url,
        gitlab_token="glpat-e2e-token",
        gitlab_webhook_secrets=(SECRET,),
        buildkite_url=buildkite.url,
        buildkite_token="bkua-e2e-token",
        buildkite_webhook_secrets=(BUILDKITE_SECRET,),
        classify_pod_grace=0.0,
        consumer_fetch_timeout=0.2,
        outbox_grace=0.5,
        log_json=False,
    )
    ports = {name: free_port() for name in SERVICES}
    stop = asyncio.Event()
    tasks = []
    for name, setup in SERVICES.items():
        started = asyncio.Event()
        config = load_config({}, **{**_as_dict(base), "http_port": ports[name]})
        tasks.append(
            asyncio.create_task(
                run_service(name, config, setup, stop=stop, own_process=False, started=started)
            )
        )
        await asyncio.wait_for(started.wait(), 30)
    store = await EventStore.connect(pg_dsn, schema, max_size=2)
    try:
        yield Stack(base, ports, gitlab, buildkite, store, nats_url)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await store.close()
        await gitlab.close()
        await buildkite.close()
        bus = await Bus.connect(nats_url, prefix=base.nats_prefix, stream=base.nats_stream)
        await bus.delete_stream()
        await bus.close()


def _as_dict(config: Config) -> dict[str, object]:
    import msgspec

    return msgspec.structs.asdict(config)
