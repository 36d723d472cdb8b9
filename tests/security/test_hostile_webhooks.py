"""Hostile input at every webhook endpoint, beyond tests/ingest/test_fuzz.py (which mutates
fixtures and sends garbage bytes): unicode in every string field at once, wrong content types,
huge nesting inside a field, lone surrogates and NULs, and wrong or missing tokens and signatures
(401 and nothing stored). Never a 5xx; whatever is accepted can be read back from the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciretry.audit.projector import Projector
from ciretry.audit.store import AuditStore
from ciretry.common.config import Config
from ciretry.common.events import MessageRejected
from ciretry.common.eventstore import EventStore
from ciretry.ingest.app import create_app
from tests.ingest.helpers import GITHUB as GITHUB_FIXTURES
from tests.ingest.helpers import failed_job_hook, load, pod, pulse_messages, task_message

GITLAB_SECRET = "gl-hostile-secret"
GITHUB_SECRET = "gh-hostile-secret"
BUILDKITE_SECRET = "bk-hostile-secret"
API_TOKEN = "api-hostile-token"
ENDPOINTS = ("gitlab", "github", "pulse", "kubernetes", "buildkite")
BUILDKITE_JOB = (
    Path(__file__).resolve().parents[1]
    / "fixtures"
    / "external"
    / "buildkite"
    / "job.finished.failed.agent-stop.json"
)

Client = TestClient[Any, Any]


def config(**overrides: Any) -> Config:
    base: dict[str, Any] = {
        "gitlab_webhook_secrets": (GITLAB_SECRET,),
        "github_webhook_secrets": (GITHUB_SECRET,),
        "buildkite_webhook_secrets": (BUILDKITE_SECRET,),
        "api_token": API_TOKEN,
        "max_body_bytes": 1024 * 1024,
    }
    base.update(overrides)
    return Config(**base)


@pytest.fixture
async def client(store: EventStore) -> AsyncIterator[Client]:
    c: Client = TestClient(TestServer(create_app(config(), store)))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


def _github_doc() -> dict[str, Any]:
    path = next(p for p in sorted(GITHUB_FIXTURES.glob("workflow_job__*.json")))
    doc: dict[str, Any] = load(path)
    return doc


def _pulse_doc() -> dict[str, Any]:
    return {
        "exchange": "exchange/taskcluster-queue/v1/task-failed",
        "payload": task_message(),
    }


BASES: dict[str, Any] = {
    "gitlab": failed_job_hook(),
    "github": _github_doc(),
    "pulse": _pulse_doc(),
    "kubernetes": pod(),
    "buildkite": json.loads(BUILDKITE_JOB.read_text()),
}


def request_for(endpoint: str, body: bytes, **over: str) -> tuple[str, dict[str, str]]:
    if endpoint == "gitlab":
        headers = {
            "X-Gitlab-Token": GITLAB_SECRET,
            "X-Gitlab-Event": "Job Hook",
            "X-Gitlab-Event-UUID": "hostile-1",
        }
        path = "/webhooks/gitlab"
    elif endpoint == "github":
        sig = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {
            "X-GitHub-Event": "workflow_job",
            "X-GitHub-Delivery": "hostile-1",
            "X-Hub-Signature-256": f"sha256={sig}",
        }
        path = "/webhooks/github"
    elif endpoint == "buildkite":
        stamp = int(time.time())
        mac = hmac.new(BUILDKITE_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        headers = {
            "X-Buildkite-Event": "job.finished",
            "X-Buildkite-Signature": f"timestamp={stamp},signature={mac.hexdigest()}",
        }
        path = "/webhooks/buildkite"
    else:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        path = "/pulse" if endpoint == "pulse" else "/webhooks/kubernetes"
    headers["Content-Type"] = "application/json"
    headers.update(over)
    return path, {k: v for k, v in headers.items() if v is not None}


async def count(store: EventStore) -> int:
    return await store.last_position()


async def readable(store: EventStore) -> int:
    """Every stored event decodes (read_all raises on one that does not), reads as jsonb, and
    the audit projector applies it without rejecting one."""
    events = [e async for e in store.read_all()]
    async with store.connection() as conn:
        as_jsonb = await conn.fetchval(
            "SELECT count(convert_from(body, 'UTF8')::jsonb) FROM events"
        )
    assert as_jsonb == len(events)
    await Projector(AuditStore(store)).catch_up()
    rejected = [e for e in events if isinstance(e.data, MessageRejected)]
    rejected += await store.read_stream("rejected-projector-audit")
    assert rejected == []
    return len(events)


# --- unicode in every field ----------------------------------------------------------------

UNICODE = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # lone surrogates: see below
    max_size=40,
) | st.sampled_from(
    [
        "\x00",
        "a\x00b",
        "\u202e\u2066evil\u2069",
        "💥🧨" * 10,
        "\ufeff",
        "\uffff",
        "\U0010ffff",
        "e\u0301" * 20,
        "ℌ𝔢𝔩𝔩𝔬",
        "'; DROP TABLE events; --",
        "${jndi:ldap://x}",
        "../../../../etc/passwd",
        "x" * 10_000,
    ]
)


def _replace_strings(node: Any, draw: st.DrawFn) -> Any:
    if isinstance(node, str):
        return draw(UNICODE)
    if isinstance(node, dict):
        return {k: _replace_strings(v, draw) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_strings(v, draw) for v in node[:8]]
    return node


@st.composite
def every_string_replaced(draw: st.DrawFn, endpoint: str) -> Any:
    doc = _replace_strings(BASES[endpoint], draw)
    if endpoint == "gitlab" and draw(st.booleans()):
        # Keep it a job hook sometimes, so that the unicode reaches the normalizer's fields.
        doc["object_kind"] = "build"
        doc["build_status"] = "failed"
    return doc


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    gl=every_string_replaced("gitlab"),
    gh=every_string_replaced("github"),
    tc=every_string_replaced("pulse"),
    k8s=every_string_replaced("kubernetes"),
    bk=every_string_replaced("buildkite"),
)
async def test_unicode_in_every_field_never_5xx(
    client: Client, store: EventStore, gl: Any, gh: Any, tc: Any, k8s: Any, bk: Any
) -> None:
    for endpoint, doc in zip(ENDPOINTS, (gl, gh, tc, k8s, bk), strict=True):
        body = msgspec.json.encode(doc)
        path, headers = request_for(endpoint, body)
        resp = await client.post(path, data=body, headers=headers)
        assert resp.status in (200, 202, 400), (endpoint, resp.status, await resp.text())
    await readable(store)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_lone_surrogates_and_nuls_in_the_raw_json(
    client: Client, store: EventStore, endpoint: str
) -> None:
    text = json.dumps(BASES[endpoint])
    for needle in ('"\\ud800"', '"\\udfff\\ud800"', '"a\\u0000b"', '"\\u0000"'):
        # Every string value of the document, replaced by the escape at once.
        hostile = json.loads(text, object_hook=None)
        raw = json.dumps(hostile)
        raw = _all_strings_to(raw, needle)
        body = raw.encode()
        path, headers = request_for(endpoint, body)
        resp = await client.post(path, data=body, headers=headers)
        assert resp.status in (200, 202, 400), (endpoint, needle, resp.status, await resp.text())
    await readable(store)


def _all_strings_to(raw: str, literal: str) -> str:
    """Replace every JSON string *value* (not keys) in ``raw`` with ``literal``."""
    doc = json.loads(raw)
    marker = "\x01MARK\x01"

    def walk(n: Any) -> Any:
        if isinstance(n, str):
            return marker
        if isinstance(n, dict):
            return {k: walk(v) for k, v in n.items()}
        if isinstance(n, list):
            return [walk(v) for v in n]
        return n

    return json.dumps(walk(doc)).replace(json.dumps(marker), literal)


# --- content types, nesting, sizes ---------------------------------------------------------

WRONG_TYPES = [
    "text/plain",
    "application/xml",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "application/jsonx",
    "application/x-www-form-urlencoded",
    "",
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("ctype", WRONG_TYPES)
async def test_wrong_content_types_are_415_and_store_nothing(
    client: Client, store: EventStore, endpoint: str, ctype: str
) -> None:
    before = await count(store)
    body = msgspec.json.encode(BASES[endpoint])
    path, headers = request_for(endpoint, body, **{"Content-Type": ctype})
    resp = await client.post(path, data=body, headers=headers)
    if endpoint == "github" and ctype == "application/x-www-form-urlencoded":
        # GitHub's form encoding is supported: without a payload field it is a 400.
        assert resp.status == 400, await resp.text()
    else:
        assert resp.status == 415, (ctype, resp.status, await resp.text())
    assert await count(store) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("shape", ["array", "object", "mixed"])
async def test_huge_nesting_inside_a_field_is_a_400(
    client: Client, store: EventStore, endpoint: str, shape: str
) -> None:
    depth = 50_000
    if shape == "array":
        deep = "[" * depth + "]" * depth
    elif shape == "object":
        deep = '{"a":' * depth + "1" + "}" * depth
    else:
        deep = '[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2)
    doc = json.dumps(BASES[endpoint])
    # The deep value goes in place of the first string field of the document.
    first = next(v for v in json.loads(doc).values() if isinstance(v, str))
    raw = doc.replace(json.dumps(first), deep, 1).encode()
    path, headers = request_for(endpoint, raw)
    before = await count(store)
    resp = await client.post(path, data=raw, headers=headers)
    assert resp.status in (400, 413), (resp.status, await resp.text())
    assert await count(store) == before


# --- authentication ------------------------------------------------------------------------

BAD_AUTH: dict[str, list[dict[str, str | None]]] = {
    "gitlab": [
        {"X-Gitlab-Token": None},
        {"X-Gitlab-Token": ""},
        {"X-Gitlab-Token": GITLAB_SECRET + "x"},
        {"X-Gitlab-Token": GITLAB_SECRET[:-1]},
        {"X-Gitlab-Token": GITLAB_SECRET.upper()},
        {"X-Gitlab-Token": "é" * 20},
        {"X-Gitlab-Token": GITHUB_SECRET},
        {"X-Gitlab-Token": API_TOKEN},
    ],
    "github": [
        {"X-Hub-Signature-256": None},
        {"X-Hub-Signature-256": ""},
        {"X-Hub-Signature-256": "sha256="},
        {"X-Hub-Signature-256": "sha1=" + "0" * 40},
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},
        {"X-Hub-Signature-256": "sha256=" + "é" * 64},
        {"X-Hub-Signature-256": "sha256=zz"},
        {
            "X-Hub-Signature-256": "sha256="
            + hmac.new(b"wrong-secret", b"{}", hashlib.sha256).hexdigest()
        },
    ],
    "pulse": [
        {"Authorization": None},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": f"bearer{API_TOKEN}"},
        {"Authorization": f"Bearer {API_TOKEN}x"},
        {"Authorization": f"Bearer {GITLAB_SECRET}"},
        {"Authorization": "Bearer " + "é" * 10},
    ],
}
BAD_AUTH["kubernetes"] = BAD_AUTH["pulse"]
_STALE = int(time.time()) - 3600
BAD_AUTH["buildkite"] = [
    {"X-Buildkite-Signature": None},
    {"X-Buildkite-Signature": None, "X-Buildkite-Token": ""},
    {"X-Buildkite-Signature": None, "X-Buildkite-Token": BUILDKITE_SECRET + "x"},
    {"X-Buildkite-Signature": None, "X-Buildkite-Token": BUILDKITE_SECRET.upper()},
    {"X-Buildkite-Signature": None, "X-Buildkite-Token": GITHUB_SECRET},
    {"X-Buildkite-Signature": ""},
    {"X-Buildkite-Signature": "timestamp=1,signature=" + "0" * 64},
    {"X-Buildkite-Signature": "signature=" + "0" * 64},
    {"X-Buildkite-Signature": "sha256=" + "0" * 64},
    {"X-Buildkite-Signature": f"timestamp={int(time.time())},signature=" + "é" * 64},
    # Signed with the right secret, an hour ago (a replay); the body is the same document.
    {
        "X-Buildkite-Signature": f"timestamp={_STALE},signature="
        + hmac.new(
            BUILDKITE_SECRET.encode(),
            f"{_STALE}.".encode() + msgspec.json.encode(BASES["buildkite"]),
            hashlib.sha256,
        ).hexdigest()
    },
]


@pytest.mark.parametrize(
    ("endpoint", "headers"),
    # Ids by position: some headers carry the time, and xdist's workers, collecting a second
    # apart, must name every test alike.
    [pytest.param(e, h, id=f"{e}-{i}") for e, hs in BAD_AUTH.items() for i, h in enumerate(hs)],
)
async def test_wrong_or_missing_credentials_are_401_and_store_nothing(
    client: Client, store: EventStore, endpoint: str, headers: dict[str, str | None]
) -> None:
    before = await count(store)
    body = msgspec.json.encode(BASES[endpoint])
    path, sent = request_for(endpoint, body, **headers)  # type: ignore[arg-type]
    resp = await client.post(path, data=body, headers=sent)
    assert resp.status == 401, (resp.status, await resp.text())
    text = await resp.text()
    for secret in (GITLAB_SECRET, GITHUB_SECRET, BUILDKITE_SECRET, API_TOKEN):
        assert secret not in text  # the answer never echoes a secret
    assert await count(store) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_no_secret_configured_fails_closed(store: EventStore, endpoint: str) -> None:
    app = create_app(
        config(
            gitlab_webhook_secrets=(),
            github_webhook_secrets=(),
            buildkite_webhook_secrets=(),
            api_token="",
        ),
        store,
    )
    async with TestClient(TestServer(app)) as c:
        body = msgspec.json.encode(BASES[endpoint])
        path, headers = request_for(endpoint, body)
        before = await count(store)
        resp = await c.post(path, data=body, headers=headers)
        assert resp.status == 401
        assert await count(store) == before


def test_credentials_are_compared_in_constant_time() -> None:
    """Every comparison of a presented credential goes through hmac.compare_digest (checked in
    the source: a timing test would be flaky on a shared CI machine). Ingest's checks are those
    of ``ciretry.common.auth`` (tests/security/test_credentials.py pins that no other module
    compares credentials)."""
    import ast
    import inspect

    from ciretry.common import auth

    tree = ast.parse(inspect.getsource(auth))
    compares = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare)
        and any(isinstance(op, ast.Eq | ast.NotEq) for op in n.ops)
        and any(
            isinstance(x, ast.Name) and x.id in ("token", "presented", "secret", "signature")
            for x in [n.left, *n.comparators]
        )
    ]
    assert not compares, [ast.unparse(c) for c in compares]
    assert "hmac.compare_digest" in inspect.getsource(auth)


async def test_pulse_envelopes_with_hostile_routing(client: Client, store: EventStore) -> None:
    """Real pulse envelopes with hostile exchange names and routing keys."""
    base = next(iter(pulse_messages().values()))
    for exchange in (
        "",
        "exchange/../../etc",
        "exchange/taskcluster-queue/v1/" + "x" * 5000,
        "\x00",
    ):
        doc = {**base, "exchange": exchange, "routingKey": "\u202e" * 100}
        body = msgspec.json.encode(doc)
        path, headers = request_for("pulse", body)
        resp = await client.post(path, data=body, headers=headers)
        assert resp.status in (200, 202, 400), (exchange[:20], resp.status, await resp.text())
    await readable(store)
