"""HTTP fixtures for ingest: the app on aiohttp's test server with a real EventStore."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ciretry.common.bus import Recorder
from ciretry.common.config import Config
from ciretry.common.eventlog import EventLog
from ciretry.common.eventstore import EventStore
from ciretry.ingest.app import create_app

GITLAB_SECRET = "gl-secret-1"
GITHUB_SECRET = "gh-secret-1"
BUILDKITE_SECRET = "bk-secret-1"
API_TOKEN = "api-token-1"

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def test_config(**overrides: Any) -> Config:
    base: dict[str, Any] = {
        "gitlab_webhook_secrets": ("other-secret", GITLAB_SECRET, "project:77:scoped-secret"),
        "github_webhook_secrets": (GITHUB_SECRET,),
        "buildkite_webhook_secrets": ("bk-rotated-out", BUILDKITE_SECRET),
        "api_token": API_TOKEN,
        "max_body_bytes": 256 * 1024,
    }
    base.update(overrides)
    return Config(**base)


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def make(
        store: EventStore, recorder: Recorder | None = None, **config: Any
    ) -> TestClient[Any, Any]:
        app = create_app(test_config(**config), store, recorder)
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
async def client(store: EventStore, make_client: ClientFactory) -> TestClient[Any, Any]:
    return await make_client(store)


def gitlab_headers(
    uuid: str = "uuid-1", token: str = GITLAB_SECRET, event: str = "Job Hook"
) -> dict[str, str]:
    return {
        "X-Gitlab-Token": token,
        "X-Gitlab-Event": event,
        "X-Gitlab-Event-UUID": uuid,
        "Content-Type": "application/json",
    }


def github_headers(body: bytes, event: str, secret: str = GITHUB_SECRET) -> dict[str, str]:
    sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": "d-1",
        "X-Hub-Signature-256": f"sha256={sig}",
        "Content-Type": "application/json",
    }


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


@pytest.fixture
def store(log: EventLog) -> EventLog:
    """Ingest's HTTP tests run on each event log: PostgreSQL and the in-memory twin."""
    return log


@pytest.fixture
async def pg_client(pg_store: EventStore, make_client: ClientFactory) -> TestClient[Any, Any]:
    """The app on PostgreSQL, for what only the database does (the audit projector's read
    models, the database refusing a value)."""
    return await make_client(pg_store)
