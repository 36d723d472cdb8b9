"""Security review: the read (audit) API refuses unauthenticated access when a token is set, and
refuses writes (405), storing nothing; the one write it has (verdict feedback) needs the token.
The dashboard and the OpenAPI document are public by design (no data in them)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit import mount
from ciretry.common.config import Config
from ciretry.common.eventstore import EventStore

TOKEN = "read-api-s3cret"
Client = TestClient[web.Request, web.Application]

READS = [
    "/api/v1/jobs/gitlab/1/100",
    "/api/v1/jobs/gitlab/1/100/why",
    "/api/v1/jobs/github/owner/repo/100",
    "/api/v1/pipelines/gitlab/1/500",
    "/api/v1/stats",
    "/api/v1/events",
    "/api/v1/allocation",
    "/api/v1/verdicts/disputed",
    "/api/v1/nope",
]
WRITES = [
    ("POST", "/api/v1/events"),
    ("PUT", "/api/v1/jobs/gitlab/1/100"),
    ("PATCH", "/api/v1/jobs/gitlab/1/100"),
    ("DELETE", "/api/v1/jobs/gitlab/1/100"),
    ("DELETE", "/api/v1/events"),
    ("POST", "/api/v1/stats"),
    ("PUT", "/api/v1/pipelines/gitlab/1/500"),
    ("POST", "/api/v1/anything"),
]
BAD = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Token {TOKEN}"},
    {"Cookie": f"ciretry_audit_token={TOKEN}x"},
]


@pytest.fixture
async def client(store: EventStore) -> AsyncIterator[Client]:
    app = web.Application()
    mount(app, store, Config(api_token=TOKEN))
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize("path", READS)
@pytest.mark.parametrize("headers", BAD, ids=lambda h: repr(h)[:30])
async def test_reads_need_the_token(client: Client, path: str, headers: dict[str, str]) -> None:
    resp = await client.get(path, headers=headers)
    assert resp.status == 401, (path, resp.status)
    assert TOKEN not in await resp.text()


@pytest.mark.parametrize("path", READS[:-1])
async def test_reads_with_the_token_are_not_401(client: Client, path: str) -> None:
    resp = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status != 401 and resp.status < 500, (path, resp.status, await resp.text())


@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_writes_are_refused_and_store_nothing(
    client: Client, store: EventStore, method: str, path: str
) -> None:
    before = await store.last_position()
    anon = await client.request(method, path, json={"x": 1})
    assert anon.status == 401, (method, path, anon.status)
    authed = await client.request(
        method, path, json={"x": 1}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert authed.status in (404, 405), (method, path, authed.status)
    assert authed.status == 405 or method == "GET"
    assert await store.last_position() == before


@pytest.mark.parametrize("headers", BAD, ids=lambda h: repr(h)[:30])
async def test_feedback_needs_the_token_and_stores_nothing_without_it(
    client: Client, store: EventStore, headers: dict[str, str]
) -> None:
    before = await store.last_position()
    body: dict[str, Any] = {"verdict": "disputed", "who": "mallory", "why": "because"}
    resp = await client.post(
        f"/api/v1/verdicts/{uuid.uuid4()}/feedback", json=body, headers=headers
    )
    assert resp.status == 401
    assert await store.last_position() == before


def test_the_token_check_is_the_shared_constant_time_one() -> None:
    """The API and the dashboard ask the scopes of ``ciretry.common.auth`` (whose compares are
    constant-time: tests/security/test_credentials.py); they compare nothing themselves, not
    even the CSRF token."""
    import inspect

    from ciretry.audit import access, api, dashboard

    assert ".allows(" in inspect.getsource(access)
    assert "TokenSet.of(s.csrf).matches(" in inspect.getsource(access)
    for module in (access, api, dashboard):
        source = inspect.getsource(module)
        assert "compare_digest" not in source and "import hmac" not in source, module
        assert "== token" not in source and "token ==" not in source, module
        assert "given ==" not in source and "== given" not in source, module
