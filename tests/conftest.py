"""Test infrastructure: real PostgreSQL and NATS JetStream, isolated per test.

Which servers: ``CIRETRY_DATABASE_URL`` / ``CIRETRY_NATS_URL`` when set; else testcontainers when
``CIRETRY_TEST_CONTAINERS=1`` and a Docker engine answers; else embedded servers from PyPI wheels,
started once per test session. Each test gets its own database schema and its own NATS subject
prefix and stream, so tests can run in parallel and never see each other's events.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ciretry.common.bus import Bus
from ciretry.common.eventlog import EventLog
from ciretry.common.eventstore import EventStore
from ciretry.common.memory import MemoryEventLog
from ciretry.common.metrics import setup_metrics
from ciretry.common.telemetry import setup_telemetry
from tests.support.servers import Servers
from tests.support.servers import servers as configured_or_embedded

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def pytest_report_header() -> str:
    found = "found" if FIXTURES.is_dir() else "MISSING: the tests that replay real payloads fail"
    return f"shared fixtures: {FIXTURES} ({found}; README, Development)"


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 - no engine is a normal answer
        return False


@contextlib.contextmanager
def _containers() -> Iterator[Servers]:
    from testcontainers.nats import NatsContainer
    from testcontainers.postgres import PostgresContainer

    with (
        PostgresContainer("postgres:16-alpine", driver=None) as pg,
        NatsContainer("nats:2.10-alpine").with_command("-js") as nc,
    ):
        yield Servers(pg.get_connection_url(), nc.nats_uri(), "testcontainers")


#: Tests that start servers of their own (embedded PostgreSQL/NATS, whole stacks of processes)
#: without asking for the ``servers`` fixture.
_STARTS_SERVERS = (
    "tests/chaos/",
    "tests/scale/",
    "tests/test_readme_commands.py",
    "tests/test_first_hour.py",
    "tests/security/test_secrets.py",
    "tests/common/test_ensure_stream.py",
)


#: The xdist group (``--dist loadgroup``, pyproject addopts) of the tests in ``_STARTS_SERVERS``:
#: each runs a whole stack of processes whose faults and deadlines are timed, so they run one
#: after the other on one worker (as in a serial run) while the other worker takes the rest; the
#: largest group is scheduled first, so this long pole starts at once.
OWN_STACKS = "own_stacks"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs PostgreSQL/NATS (``needs_servers``), so that
    ``pytest -m "not needs_servers"`` runs the pure and in-memory suite alone, in seconds."""
    for item in items:
        if item.nodeid.startswith(_STARTS_SERVERS):
            item.add_marker(pytest.mark.xdist_group(OWN_STACKS))
        callspec = getattr(item, "callspec", None)
        if (
            "servers" in getattr(item, "fixturenames", ())
            or (callspec is not None and callspec.params.get("log") == "postgres")
            or item.nodeid.startswith(_STARTS_SERVERS)
            or item.get_closest_marker("needs_servers") is not None
        ):
            item.add_marker(pytest.mark.needs_servers)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    configured = os.environ.get("CIRETRY_DATABASE_URL") and os.environ.get("CIRETRY_NATS_URL")
    if not configured and os.environ.get("CIRETRY_TEST_CONTAINERS") == "1" and _docker_answers():
        with _containers() as s:
            yield s
    else:
        with configured_or_embedded(prefix="ciretry-test-") as s:
            yield s


@pytest.fixture(scope="session")
def pg_dsn(servers: Servers) -> str:
    return servers.database_url


@pytest.fixture(scope="session")
def nats_url(servers: Servers) -> str:
    return servers.nats_url


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
async def schema(pg_dsn: str, unique: str) -> AsyncIterator[str]:
    """A fresh, empty schema name, dropped after the test."""
    name = f"t_{unique}"
    yield name
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(pg_dsn: str, schema: str) -> AsyncIterator[EventStore]:
    """An EventStore on a freshly migrated schema of its own."""
    s = await EventStore.connect(pg_dsn, schema, max_size=8)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def pg_store(pg_dsn: str, schema: str) -> AsyncIterator[EventStore]:
    """The PostgreSQL store, for a test about what only the database does, in a package whose
    ``store`` runs on each event log adapter."""
    s = await EventStore.connect(pg_dsn, schema, max_size=8)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["postgres", "memory"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    """The event log on each adapter in turn: PostgreSQL (a fresh schema) and the in-memory
    twin. Only the PostgreSQL case asks for the servers, so the memory case runs without."""
    if request.param == "memory":
        yield MemoryEventLog()
        return
    pg_dsn: str = request.getfixturevalue("pg_dsn")
    name = f"c_{uuid.uuid4().hex[:12]}"
    store = await EventStore.connect(pg_dsn, name, max_size=8)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
def memory_log() -> MemoryEventLog:
    """The in-memory event log: service logic tested without servers."""
    return MemoryEventLog()


@pytest.fixture
async def bus(nats_url: str, unique: str) -> AsyncIterator[Bus]:
    """A Bus with its own subject prefix and JetStream stream, deleted after the test."""
    b = await Bus.connect(nats_url, prefix=f"t{unique}", stream=f"T{unique}")
    await b.ensure_stream()
    try:
        yield b
    finally:
        await b.delete_stream()
        await b.close()


@pytest.fixture(scope="session", autouse=True)
def meter_provider() -> None:
    """The process-wide meter provider with its Prometheus reader (as every service has)."""
    setup_metrics("ciretry-test")


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """Spans of this process, exported in memory (the global provider, set once)."""
    exporter = InMemorySpanExporter()
    setup_telemetry("ciretry-test", extra_processors=(SimpleSpanProcessor(exporter),))
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    span_exporter.clear()
    yield span_exporter
    span_exporter.clear()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
