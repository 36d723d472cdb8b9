"""Security review: who may see the dashboard. With a token configured, every page needs it (as
``Authorization: Bearer``, or the HttpOnly cookie ``/login`` sets) and sends anyone else to the
sign-in form; a wrong token at ``/login`` sets nothing. Without a token the dashboard is open (as
the read API is; docs/audit.md). The chart library and the sign-in form are public.

These pin today's rules, so that a change to where the checks live changes none of them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit import mount
from ciretry.common.config import Config
from ciretry.common.eventstore import EventStore

TOKEN = "dashboard-s3cret"
COOKIE = "ciretry_audit_token"
PAGES = ["/", "/?days=7", "/search?q=1977", "/jobs/gitlab/380/1977"]
Client = TestClient[web.Request, web.Application]


async def _client(store: EventStore, token: str) -> AsyncIterator[Client]:
    app = web.Application()
    mount(app, store, Config(api_token=token))
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.fixture
async def client(store: EventStore) -> AsyncIterator[Client]:
    async for c in _client(store, TOKEN):
        yield c


@pytest.fixture
async def open_client(store: EventStore) -> AsyncIterator[Client]:
    async for c in _client(store, ""):
        yield c


def _signed_in(resp: web.StreamResponse | object) -> bool:
    """Not sent to the sign-in form (the page itself answered: 200, or 404 for no such job)."""
    status = getattr(resp, "status", 0)
    location = getattr(resp, "headers", {}).get("Location", "")
    return status in (200, 404) and location != "/login"


STRANGERS = [
    {},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Cookie": f"{COOKIE}={TOKEN}x"},
    {"Cookie": f"{COOKIE}="},
    {"Cookie": f"other={TOKEN}"},
    # The header, when it is a bearer one, is what counts: a right cookie does not rescue it.
    {"Authorization": "Bearer wrong", "Cookie": f"{COOKIE}={TOKEN}"},
]
KNOWN = [
    {"Authorization": f"Bearer {TOKEN}"},
    {"Authorization": f"bearer {TOKEN}"},
    {"Authorization": f"Bearer   {TOKEN}  "},
    {"Cookie": f"{COOKIE}={TOKEN}"},
    {"Authorization": f"Basic {TOKEN}", "Cookie": f"{COOKIE}={TOKEN}"},
]


# Every page with every set of headers, on one server (one schema): a loop, not parameters.
async def test_pages_send_strangers_to_sign_in(client: Client) -> None:
    for path in PAGES:
        for headers in STRANGERS:
            resp = await client.get(path, headers=headers, allow_redirects=False)
            assert resp.status == 303, (path, headers, resp.status)
            assert resp.headers["Location"] == "/login", (path, headers)
            assert TOKEN not in await resp.text()


async def test_pages_answer_the_token(client: Client) -> None:
    for path in PAGES:
        for headers in KNOWN:
            resp = await client.get(path, headers=headers, allow_redirects=False)
            assert _signed_in(resp), (path, headers, resp.status, resp.headers.get("Location"))


async def test_sign_in_with_the_wrong_token_sets_nothing(client: Client) -> None:
    resp = await client.post("/login", data={"token": TOKEN + "x"}, allow_redirects=False)
    assert resp.status == 401
    assert "Set-Cookie" not in resp.headers
    assert TOKEN not in await resp.text()


async def test_sign_in_sets_a_strict_http_only_cookie_that_opens_the_pages(
    client: Client,
) -> None:
    resp = await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"
    cookie = resp.cookies[COOKIE]
    assert cookie.value == TOKEN
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    page = await client.get("/", allow_redirects=False)  # the client keeps the cookie
    assert page.status == 200


@pytest.mark.parametrize("path", ["/login", "/static/audit/chart.umd.min.js"])
async def test_sign_in_form_and_chart_library_are_public(client: Client, path: str) -> None:
    resp = await client.get(path, allow_redirects=False)
    assert resp.status == 200


async def test_unknown_static_files_are_404(client: Client) -> None:
    resp = await client.get("/static/audit/..%2Fapi.py", allow_redirects=False)
    assert resp.status == 404


async def test_without_a_token_configured_the_pages_are_open(open_client: Client) -> None:
    for path in PAGES:
        resp = await open_client.get(path, allow_redirects=False)
        assert _signed_in(resp), (path, resp.status)


async def test_without_a_token_configured_sign_in_lets_anyone_in(open_client: Client) -> None:
    resp = await open_client.post("/login", data={"token": "anything"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/"
