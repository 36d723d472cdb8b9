"""Retry storms in the audit (issue 15): the incidents folded from act's storm events, the API
(against its OpenAPI document) and the "Retry storms" page."""

from __future__ import annotations

import datetime as dt
import uuid

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit import mount
from ciretry.audit.storms import incidents
from ciretry.common.config import Config
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    Metadata,
    NewEvent,
    RecordedEvent,
    RetryParked,
    StormEnded,
    StormPipeline,
    StormStarted,
    pipeline_stream,
    storm_stream,
)
from ciretry.common.eventstore import EventStore

from .conftest import AUTH, TOKEN
from .test_api import check

T0 = dt.datetime(2026, 11, 2, 10, 0, tzinfo=dt.UTC)


def started(sig: str, n: int = 1, pipelines: int = 3) -> StormStarted:
    return StormStarted(
        storm_id=f"storm:{sig}:{n}", signature=sig, category="infra_network",
        rules=("registry-5xx",), example="pull: 503 Service Unavailable",
        pipelines=tuple(StormPipeline(source="gitlab", project="web", pipeline_id=f"p{i}")
                        for i in range(pipelines)),
        pipeline_count=pipelines, threshold=pipelines, window_s=300.0, first_seen=T0,
        last_seen=T0, mode="park",
    )  # fmt: skip


def parked(storm: str, pipeline: str, job_id: str) -> RetryParked:
    return RetryParked(
        source="gitlab", project="web", pipeline_id=pipeline, job_id=job_id, job_name="build",
        category="infra_network", storm_id=storm, signature=storm.split(":")[1],
        would_action="retry_job", verdict_event_id=uuid.uuid4(), snapshot=BudgetSnapshot(),
    )  # fmt: skip


def ended(s: StormStarted, pipelines: int) -> StormEnded:
    return StormEnded(
        storm_id=s.storm_id, signature=s.signature, reason="quiet", started_at=T0,
        last_seen=T0 + dt.timedelta(seconds=40), ended_at=T0 + dt.timedelta(seconds=340),
        quiet_s=300.0, jitter_s=120.0, pipeline_count=pipelines,
    )  # fmt: skip


def recorded(data: Event, n: int) -> RecordedEvent:
    return RecordedEvent(event_id=uuid.uuid4(), stream="s", stream_version=1, position=n,
                         recorded_at=T0 + dt.timedelta(seconds=n), data=data,
                         metadata=Metadata())  # fmt: skip


def test_incidents_count_pipelines_and_parks_from_every_event_open_storms_first() -> None:
    a, b = started("sig-v1:a"), started("sig-v1:b", pipelines=4)
    events = [
        a, parked(a.storm_id, "p7", "71"), parked(a.storm_id, "p8", "81"), ended(a, 9),
        b, parked(b.storm_id, "p1", "11"),
        parked(a.storm_id, "p9", "91"),  # a park that reached the log after the end
        parked("storm:sig-v1:unknown:1", "p1", "12"),  # a storm outside the window: left out
    ]  # fmt: skip
    rows = incidents(recorded(d, i + 1) for i, d in enumerate(events))
    assert [(r["storm_id"], r["state"]) for r in rows] == [
        (b.storm_id, "open"), (a.storm_id, "ended"),
    ]  # fmt: skip
    first, second = rows
    assert first["parked_count"] == 1 and first["pipeline_count"] == 4
    assert second["parked_count"] == 3 and second["end_reason"] == "quiet"
    assert second["pipeline_count"] == 9  # the end's count; the events name 6 of them
    assert {j["job_id"] for j in second["parked"]} == {"71", "81", "91"}
    assert second["quiet_s"] == 300.0 and second["example"] == "pull: 503 Service Unavailable"


async def test_storms_api_and_page(store: EventStore) -> None:
    a = started("sig-v1:registry")
    news = [
        NewEvent(stream=storm_stream(a.signature), data=a),
        NewEvent(stream=pipeline_stream("gitlab", "web", "p5"), data=parked(a.storm_id, "p5", "51")),
        NewEvent(stream=pipeline_stream("gitlab", "web", "p6"), data=parked(a.storm_id, "p6", "61")),
        NewEvent(stream=storm_stream(a.signature), data=ended(a, 5)),
    ]  # fmt: skip
    for new in news:
        await store.append_batch([new])
    app = web.Application()
    mount(app, store, Config(api_token=TOKEN))
    async with TestClient(TestServer(app)) as client:
        spec = await (await client.get("/api/v1/openapi.json")).json()
        r = await client.get("/api/v1/storms?days=7", headers=AUTH)
        assert r.status == 200, await r.text()
        body = await r.json()
        check(spec, "/api/v1/storms", "get", 200, body)
        (storm,) = body["storms"]
        assert storm["storm_id"] == a.storm_id and storm["signature"] == "sig-v1:registry"
        assert storm["state"] == "ended" and storm["parked_count"] == 2
        assert storm["pipeline_count"] == 5 and storm["started_at"] and storm["ended_at"]
        assert (await client.get("/api/v1/storms")).status == 401
        assert (await client.get("/api/v1/storms?days=0", headers=AUTH)).status == 400
        page = await client.get("/storms", headers=AUTH)
        html = await page.text()
        assert page.status == 200 and "Retry storms" in html and "sig-v1:registry" in html
        assert "/jobs/gitlab/web/51" in html and "parked jobs (2)" in html
        # Every page's header leads there.
        assert "href='/storms'" in await (await client.get("/clusters", headers=AUTH)).text()
