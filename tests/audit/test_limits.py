"""Input limits (issue 18), on real PostgreSQL: a time range with only one end is bounded
(never "scan the whole log"), every list endpoint pages (events, disputes, a pipeline's jobs),
and request bodies are capped on every route that reads one (the feedback POST, the dashboard's
forms), by Content-Length and while reading a chunked body."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from ciretry.audit.api import MAX_BODY
from ciretry.audit.dashboard import MAX_FORM
from ciretry.audit.projector import Projector
from ciretry.audit.queries import MAX_RANGE
from ciretry.audit.store import AuditStore
from ciretry.common.eventstore import EventStore

from .conftest import AUTH
from .helpers import Seeded

Client = TestClient[web.Request, web.Application]


async def _json(client: Client, url: str) -> Any:
    r = await client.get(url, headers=AUTH)
    assert r.status == 200, await r.text()
    return await r.json()


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def test_a_range_with_one_end_is_bounded(client: Client, seeded: Seeded) -> None:
    now = dt.datetime.now(dt.UTC)
    everything = (await _json(client, "/api/v1/events?limit=1000"))["events"]
    assert everything
    # Only "from", long ago: the range ends MAX_RANGE later, before anything was recorded.
    old = _iso(now - MAX_RANGE - dt.timedelta(days=100))
    assert (await _json(client, f"/api/v1/events?from={old}&limit=1000"))["events"] == []
    recent = _iso(now - dt.timedelta(days=1))
    page = await _json(client, f"/api/v1/events?from={recent}&limit=1000")
    assert len(page["events"]) == len(everything)
    # Only "to", far ahead: the range starts MAX_RANGE before it, after everything recorded.
    ahead = _iso(now + MAX_RANGE + dt.timedelta(days=100))
    assert (await _json(client, f"/api/v1/events?to={ahead}&limit=1000"))["events"] == []
    soon = _iso(now + dt.timedelta(days=1))
    assert len((await _json(client, f"/api/v1/events?to={soon}&limit=1000"))["events"]) == len(
        everything
    )


async def _pages(client: Client, url: str, key: str) -> AsyncIterator[list[Any]]:
    cursor = None
    for _ in range(100):
        sep = "&" if "?" in url else "?"
        page = await _json(client, url + (f"{sep}cursor={cursor}" if cursor else ""))
        yield page[key]
        cursor = page["next_cursor"]
        if cursor is None:
            return
    raise AssertionError("paging did not end")


async def test_disputes_page_with_a_cursor(
    client: Client, store: EventStore, seeded: Seeded
) -> None:
    verdicts = [seeded.ids[k].event_id for k in ("build_verdict", "lint_verdict", "oom_verdict")]
    for i in range(7):
        r = await client.post(
            f"/api/v1/verdicts/{verdicts[i % 3]}/feedback",
            json={"verdict": "disputed", "who": f"person{i}", "why": f"reason {i}"},
            headers=AUTH,
        )
        assert r.status == 201, await r.text()
    await Projector(AuditStore(store)).catch_up()
    whole = (await _json(client, "/api/v1/verdicts/disputed?limit=1000"))["disputes"]
    assert len(whole) == 8  # the seeded one and these seven
    paged = [d async for page in _pages(client, "/api/v1/verdicts/disputed?limit=3", "disputes")
             for d in page]  # fmt: skip
    assert [d["event_id"] for d in paged] == [d["event_id"] for d in whole]
    r = await client.get("/api/v1/verdicts/disputed?cursor=12.not-a-uuid", headers=AUTH)
    assert r.status == 400


async def test_a_pipelines_jobs_page_with_a_cursor(client: Client, seeded: Seeded) -> None:
    path = "/api/v1/pipelines/gitlab/380/9001"
    whole = await _json(client, path)
    assert len(whole["jobs"]) >= 2 and whole["next_cursor"] is None
    pages = [p async for p in _pages(client, path + "?limit=1", "jobs")]
    assert len(pages) == len(whole["jobs"]) and all(len(p) == 1 for p in pages)
    assert [p[0]["job_id"] for p in pages] == [j["job_id"] for j in whole["jobs"]]
    for bad in ("cursor=x", "cursor=99999999", "limit=0", "limit=1001"):
        r = await client.get(f"{path}?{bad}", headers=AUTH)
        assert r.status == 400, bad


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 1024):
        yield b"x" * 1024


async def test_bodies_are_capped_on_every_route_that_reads_one(
    client: Client, seeded: Seeded
) -> None:
    verdict = seeded.ids["build_verdict"].event_id
    feedback = f"/api/v1/verdicts/{verdict}/feedback"
    big = {"verdict": "disputed", "who": "x", "why": "y" * (MAX_BODY + 10)}
    r = await client.post(feedback, json=big, headers=AUTH)
    assert r.status == 413 and (await r.json())["error"] == "too_large"
    # No Content-Length (chunked): cut off while reading.
    r = await client.post(feedback, data=_chunks(MAX_BODY + 4096),
                          headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert r.status == 413
    for path in ("/login", "/feedback", "/logout"):
        r = await client.post(path, data={"token": "t" * (MAX_FORM + 10)}, allow_redirects=False)
        assert r.status == 413, path
        r = await client.post(path, data=_chunks(MAX_FORM + 4096), allow_redirects=False,
                              headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert r.status == 413, path
