"""Security review: who may see the dashboard (issue 18).

With a read token configured, every page needs it (as ``Authorization: Bearer``) or a session
cookie that ``/login`` issued for it, and sends anyone else to the sign-in form. The session
cookie is signed and dated (itsdangerous), ``HttpOnly``, ``SameSite=Strict``, ``Secure`` over
HTTPS or behind a proxy that says so, and holds no token: the old cookie with the raw token
opens nothing, a forged, foreign or expired session opens nothing, and removing the token from
the configuration ends its sessions. With no token configured at all the dashboard is closed
(401), unless ``CIRETRY_API_OPEN`` opens it on purpose. The chart library and the sign-in form
are public."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from ciretry.audit import mount
from ciretry.audit.access import SESSION_COOKIE
from ciretry.common.auth import derive_key, fingerprint
from ciretry.common.config import Config
from ciretry.common.eventstore import EventStore

TOKEN = "dashboard-s3cret-0123"
OTHER_READER = "dashboard-other-0123456"
SESSION_KEY = "session-key-for-tests-0123456789"
OLD_COOKIE = "ciretry_audit_token"
PAGES = ["/", "/?days=7", "/search?q=1977", "/jobs/gitlab/380/1977"]
Client = TestClient[web.Request, web.Application]


def _config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "read_tokens": (TOKEN, OTHER_READER),
        "session_secrets": (SESSION_KEY,),
    }
    settings.update(overrides)
    return Config(**settings)


async def _client(store: EventStore, config: Config) -> AsyncIterator[Client]:
    app = web.Application()
    mount(app, store, config)
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.fixture
async def client(store: EventStore) -> AsyncIterator[Client]:
    async for c in _client(store, _config()):
        yield c


def _signed_in(resp: web.StreamResponse | object) -> bool:
    """Not sent to the sign-in form (the page itself answered: 200, or 404 for no such job)."""
    status = getattr(resp, "status", 0)
    location = getattr(resp, "headers", {}).get("Location", "")
    return status in (200, 404) and location != "/login"


async def _sign_in(client: Client, token: str = TOKEN, **headers: str) -> Any:
    resp = await client.post("/login", data={"token": token}, headers=headers,
                             allow_redirects=False)  # fmt: skip
    assert resp.status == 303 and resp.headers["Location"] == "/", resp.status
    return resp.cookies[SESSION_COOKIE]


def _foreign_session(key: str, age: float = 0.0, token: str | None = None) -> str:
    """A session cookie signed with ``key``, ``age`` seconds old, for ``token`` (None: the
    fingerprint of no token)."""
    fp = "x" * 64
    if token is not None:
        fp = fingerprint(derive_key(key.encode(), "ciretry session fingerprint"), token)

    class Dated(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age)

    serializer = URLSafeTimedSerializer([key.encode()], salt="ciretry-audit-session", signer=Dated)
    return serializer.dumps({"f": fp, "c": "c"})


STRANGERS = [
    {},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    # The cookie that used to hold the raw token opens nothing now.
    {"Cookie": f"{OLD_COOKIE}={TOKEN}"},
    {"Cookie": f"{SESSION_COOKIE}={TOKEN}"},
    {"Cookie": f"{SESSION_COOKIE}="},
    {"Cookie": f"{SESSION_COOKIE}={_foreign_session('another-key-0123456789')}"},
    # Right key, but a fingerprint of no token.
    {"Cookie": f"{SESSION_COOKIE}={_foreign_session(SESSION_KEY)}"},
]
KNOWN = [
    {"Authorization": f"Bearer {TOKEN}"},
    {"Authorization": f"bearer {TOKEN}"},
    {"Authorization": f"Bearer   {OTHER_READER}  "},
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
    for wrong in (TOKEN + "x", "", TOKEN[:-1]):
        resp = await client.post("/login", data={"token": wrong}, allow_redirects=False)
        assert resp.status == 401
        assert "Set-Cookie" not in resp.headers
        assert TOKEN not in await resp.text()


async def test_sign_in_sets_a_signed_strict_http_only_session_without_the_token(
    client: Client,
) -> None:
    cookie = await _sign_in(client)
    assert TOKEN not in cookie.value and TOKEN.encode().hex() not in cookie.value
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain HTTP: a Secure cookie would never come back
    assert int(cookie["max-age"]) == int(Config().session_max_age)
    for path in PAGES:  # the client keeps the cookie
        page = await client.get(path, allow_redirects=False)
        assert _signed_in(page), (path, page.status)
    # The same cookie, tampered with, opens nothing.
    client.session.cookie_jar.clear()
    tampered = cookie.value[:-2] + ("AA" if not cookie.value.endswith("AA") else "BB")
    page = await client.get("/", headers={"Cookie": f"{SESSION_COOKIE}={tampered}"},
                            allow_redirects=False)  # fmt: skip
    assert page.status == 303


async def test_the_session_cookie_is_secure_over_https_or_behind_a_proxy_saying_so(
    client: Client,
) -> None:
    cookie = await _sign_in(client, **{"X-Forwarded-Proto": "https"})
    assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"


async def test_an_expired_session_opens_nothing(client: Client) -> None:
    max_age = Config().session_max_age
    fresh = _foreign_session(SESSION_KEY, age=max_age - 60, token=TOKEN)
    old = _foreign_session(SESSION_KEY, age=max_age + 60, token=TOKEN)
    for value, status in ((fresh, 200), (old, 303)):
        resp = await client.get("/", headers={"Cookie": f"{SESSION_COOKIE}={value}"},
                                allow_redirects=False)  # fmt: skip
        assert resp.status == status


async def test_a_session_ends_when_its_token_is_removed(store: EventStore) -> None:
    async for before in _client(store, _config()):
        cookie = (await _sign_in(before)).value
        ok = await before.get("/", allow_redirects=False)
        assert ok.status == 200
    # A restart with the same session key, the token rotated out: the cookie opens nothing.
    async for after in _client(store, _config(read_tokens=(OTHER_READER,))):
        resp = await after.get("/", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"},
                               allow_redirects=False)  # fmt: skip
        assert resp.status == 303
    # With the token still configured, the same cookie works across a restart.
    async for again in _client(store, _config()):
        resp = await again.get("/", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"},
                               allow_redirects=False)  # fmt: skip
        assert resp.status == 200


@pytest.mark.parametrize("path", ["/login", "/static/audit/chart.umd.min.js"])
async def test_sign_in_form_and_chart_library_are_public(client: Client, path: str) -> None:
    resp = await client.get(path, allow_redirects=False)
    assert resp.status == 200


async def test_unknown_static_files_are_404(client: Client) -> None:
    resp = await client.get("/static/audit/..%2Fapi.py", allow_redirects=False)
    assert resp.status == 404


async def test_without_a_token_configured_the_dashboard_is_closed(store: EventStore) -> None:
    async for closed in _client(store, Config()):
        for path in PAGES:
            resp = await closed.get(path, allow_redirects=False)
            assert resp.status == 401, (path, resp.status)
            assert "CIRETRY_READ_TOKENS" in await resp.text()
        resp = await closed.post("/login", data={"token": "anything"}, allow_redirects=False)
        assert resp.status == 401 and "Set-Cookie" not in resp.headers


async def test_api_open_opens_the_pages_on_purpose(store: EventStore) -> None:
    async for opened in _client(store, Config(api_open=True)):
        for path in PAGES:
            resp = await opened.get(path, allow_redirects=False)
            assert _signed_in(resp), (path, resp.status)


async def test_sign_in_forms_are_capped(client: Client) -> None:
    resp = await client.post("/login", data={"token": "x" * 20_000}, allow_redirects=False)
    assert resp.status == 413
