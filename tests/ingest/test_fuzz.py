"""Property: no input, however broken, gets a 5xx (or a 500 in particular) from ingest.

Payloads are real fixtures mutated at random places: fields dropped, retyped, replaced by odd
unicode (NUL, RTL marks, astral characters), huge numbers or nested garbage; plus raw bytes.
Every request carries valid credentials so that the mutation reaches the normalizers and the
database, which is where a 500 would come from.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciretry.common.eventstore import EventStore
from tests.support.fuzz import BASES, paths

from .conftest import API_TOKEN, BUILDKITE_SECRET, encode, github_headers, gitlab_headers

Client = TestClient[Any, Any]
BEARER = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}


ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\u202e",
        "💥" * 3,
        "\ufeff",
        "0",
        "-1",
        "1e999",
        "null",
        "x" * 5000,
    ]
) | st.text(max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | ODD_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw: st.DrawFn, endpoint: str) -> tuple[Any, str]:
    base, event = draw(st.sampled_from(BASES[endpoint]))
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        candidates = paths(doc)
        path = draw(st.sampled_from(candidates))
        op = draw(st.sampled_from(["drop", "replace", "replace", "text"]))
        if not path:
            doc = draw(JSON) if op != "drop" else {}
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        if op == "drop":
            if isinstance(parent, dict):
                parent.pop(key, None)
            else:
                parent.pop(key)
        else:
            parent[key] = draw(ODD_TEXT if op == "text" else JSON)
    return doc, event


def _request(endpoint: str, body: bytes, event: str) -> tuple[str, dict[str, str]]:
    if endpoint == "gitlab":
        return "/webhooks/gitlab", gitlab_headers("fuzz", event=event)
    if endpoint == "github":
        return "/webhooks/github", github_headers(body, event)
    if endpoint == "pulse":
        return "/pulse", BEARER
    if endpoint == "buildkite":
        headers = {"X-Buildkite-Event": event or "job.finished", "X-Buildkite-Token": BUILDKITE_SECRET}
        return "/webhooks/buildkite", {**headers, "Content-Type": "application/json"}
    return "/webhooks/kubernetes", BEARER


@pytest.fixture
async def fuzz_client(store: EventStore, make_client: Any) -> Client:
    client: Client = await make_client(store)
    return client


@settings(
    max_examples=700,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    gl=mutated("gitlab"),
    gh=mutated("github"),
    tc=mutated("pulse"),
    k8s=mutated("kubernetes"),
    bk=mutated("buildkite"),
)
async def test_mutated_payloads_never_5xx(
    fuzz_client: Client,
    gl: tuple[Any, str],
    gh: tuple[Any, str],
    tc: tuple[Any, str],
    k8s: tuple[Any, str],
    bk: tuple[Any, str],
) -> None:
    sent = [("gitlab", gl), ("github", gh), ("pulse", tc), ("kubernetes", k8s), ("buildkite", bk)]

    async def post(endpoint: str, doc: Any, event: str) -> tuple[int, Any]:
        body = encode(doc)
        path, headers = _request(endpoint, body, event)
        resp = await fuzz_client.post(path, data=body, headers=headers)
        return resp.status, await resp.json()

    results = await asyncio.gather(*(post(e, d, ev) for e, (d, ev) in sent))
    for (endpoint, (doc, _)), (status, body) in zip(sent, results, strict=True):
        assert status < 500, (endpoint, status, body, doc)
        assert status in (200, 202, 400), (endpoint, status, body)
        if status == 400:
            assert body["field"]  # a malformed payload always names what was wrong


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
    endpoint=st.sampled_from(["gitlab", "github", "pulse", "kubernetes", "buildkite"]),
)
async def test_garbage_bytes_never_5xx(fuzz_client: Client, raw: bytes, endpoint: str) -> None:
    path, headers = _request(endpoint, raw, "Job Hook" if endpoint == "gitlab" else "workflow_job")
    resp = await fuzz_client.post(path, data=raw, headers=headers)
    assert resp.status in (200, 202, 400), (resp.status, await resp.text())


async def test_deeply_nested_json_is_a_400(fuzz_client: Client) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    resp = await fuzz_client.post("/webhooks/gitlab", data=deep, headers=gitlab_headers())
    assert resp.status == 400
