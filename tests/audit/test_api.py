"""The /api/v1 read API: real responses checked against the served OpenAPI document, auth,
read-only, limits, slashes in project names, paging, allocation and feedback."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciretry.audit.projector import Projector
from ciretry.audit.store import AuditStore
from ciretry.common.config import Config
from ciretry.common.events import VerdictDisputed
from ciretry.common.eventstore import EventStore

from .conftest import AUTH
from .helpers import Seeded, github_values

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def spec(client: Client) -> dict[str, Any]:
    r = await client.get("/api/v1/openapi.json")  # public: no token
    assert r.status == 200
    doc: dict[str, Any] = await r.json()
    jsonschema.Draft202012Validator.check_schema({"$defs": doc["components"]["schemas"]})
    return doc


def check(spec: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """Validate ``body`` against the schema the document gives for this path and status."""
    op = spec["paths"][path][method]
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(body)


async def get(client: Client, url: str, status: int = 200) -> Any:
    r = await client.get(url, headers=AUTH)
    assert r.status == status, await r.text()
    return await r.json()


def gh_job_path(encode: bool) -> str:
    gh = github_values()
    project = urllib.parse.quote(gh["project"], safe="" if encode else "/")
    return f"/api/v1/jobs/github/{project}/{gh['job_id']}"


@pytest.mark.parametrize("encode", [False, True], ids=["raw-slash", "percent-encoded"])
async def test_job_timeline_matches_the_document(
    client: Client, spec: dict[str, Any], seeded: Seeded, encode: bool
) -> None:
    body = await get(client, gh_job_path(encode))
    check(spec, "/api/v1/jobs/{source}/{project}/{job}", "get", 200, body)
    assert body["job"]["project"] == "Codertocat/Hello-World"
    assert [e["type"] for e in body["events"]] == [
        "JobFinished", "VerdictReached", "RetryRequested", "RetryIssued"
    ]  # fmt: skip
    assert body["verdict"]["evidence"] == [
        {"rule": "gha.network_reset", "line": 57, "text": "Connection reset by peer"}
    ]
    assert body["decision"]["kind"] == "requested"
    assert body["retry_outcome"] == {"outcome": "passed", "job_id": "289782452"}


async def test_why_matches_the_document(
    client: Client, spec: dict[str, Any], seeded: Seeded
) -> None:
    body = await get(client, gh_job_path(True) + "/why")
    check(spec, "/api/v1/jobs/{source}/{project}/{job}/why", "get", 200, body)
    assert "gha.network_reset" in body["summary"]


async def test_pipeline_view(client: Client, spec: dict[str, Any], seeded: Seeded) -> None:
    body = await get(client, "/api/v1/pipelines/gitlab/380/9001")
    check(spec, "/api/v1/pipelines/{source}/{project}/{pipeline}", "get", 200, body)
    p = body["pipeline"]
    assert (p["status"], p["jobs_finished"], p["jobs_failed"]) == ("failed", 5, 5)
    assert (p["retries_requested"], p["retries_skipped"], p["budget_exhausted"]) == (1, 3, 2)
    assert (p["pipeline_retries"], p["pipeline_limit"]) == (3, 3)
    assert {j["job_id"]: j["decision_reason"] for j in body["jobs"]} == {
        "1977": None, "1978": None, "1980": "not_retryable", "1981": "job_budget_exhausted",
        "1982": "pipeline_budget_exhausted",
    }  # fmt: skip
    assert body["retries"] == [
        {"job_id": "1977", "job_name": "test", "action": "rerun_with_resources",
         "category": "oom", "dry_run": False, "outcome": "failed", "outcome_job_id": "1978"}
    ]  # fmt: skip


async def test_stats_with_buckets_and_filters(
    client: Client, spec: dict[str, Any], seeded: Seeded
) -> None:
    body = await get(client, "/api/v1/stats?metric=category&bucket=hour")
    check(spec, "/api/v1/stats", "get", 200, body)
    assert {s["key"]: s["total"] for s in body["series"]} == seeded.categories
    gitlab = await get(client, "/api/v1/stats?metric=category&project=380&source=gitlab")
    assert {s["key"]: s["total"] for s in gitlab["series"]} == {
        k: v for k, v in seeded.categories.items() if k != "infra_network"
    }
    top = await get(client, "/api/v1/stats?metric=rule&top=2")
    assert len(top["series"]) == 2
    outcomes = await get(client, "/api/v1/stats?metric=retry_outcome&bucket=week")
    assert {s["key"]: s["total"] for s in outcomes["series"]} == {"passed": 1, "failed": 1}
    past = await get(client, "/api/v1/stats?metric=category&from=2001-01-01T00:00:00Z"
                             "&to=2001-02-01T00:00:00Z")  # fmt: skip
    assert past["series"] == [] and past["total"] == 0


async def test_events_cursor_paging_visits_every_event_once(
    client: Client, spec: dict[str, Any], seeded: Seeded, store: EventStore
) -> None:
    seen: list[int] = []
    url = "/api/v1/events?limit=5"
    while True:
        body = await get(client, url)
        check(spec, "/api/v1/events", "get", 200, body)
        seen += [e["position"] for e in body["events"]]
        if body["next_cursor"] is None:
            break
        url = f"/api/v1/events?limit=5&cursor={body['next_cursor']}"
    assert seen == list(range(1, await store.last_position() + 1))
    verdicts = await get(client, "/api/v1/events?type=VerdictReached,VerdictDisputed")
    assert [e["type"] for e in verdicts["events"]].count("VerdictDisputed") == 1
    stream = seeded.ids["oom_verdict"].stream
    one = await get(client, f"/api/v1/events?stream={urllib.parse.quote(stream)}")
    assert [e["type"] for e in one["events"]] == ["PodTerminated", "VerdictReached"]
    now = dt.datetime.now(dt.UTC)
    window = await get(
        client,
        "/api/v1/events?" + urllib.parse.urlencode(
            {"from": (now - dt.timedelta(hours=1)).isoformat(), "to": now.isoformat()}
        ),
    )  # fmt: skip
    assert len(window["events"]) == len(seen)


async def test_allocation(client: Client, spec: dict[str, Any], seeded: Seeded) -> None:
    body = await get(
        client, "/api/v1/allocation?project=380&job_name=test&ref=gitlab-script-trigger"
    )
    check(spec, "/api/v1/allocation", "get", 200, body)
    assert body["found"] and body["matched_ref"] == "gitlab-script-trigger"
    assert (body["memory_request_mb"], body["memory_limit_mb"]) == (8192, 8192)
    assert (body["cpu_request_millis"], body["cpu_limit_millis"]) == (2000, 2000)
    assert body["last_oom_job_id"] == "1977"
    other_ref = await get(client, "/api/v1/allocation?project=380&job_name=test&ref=main")
    assert other_ref["memory_limit_mb"] == 8192  # falls back to the job's other refs
    unknown = await get(client, "/api/v1/allocation?project=380&job_name=nope")
    check(spec, "/api/v1/allocation", "get", 200, unknown)
    assert unknown["found"] is False and unknown["memory_limit_mb"] is None


async def test_disputed_per_rule(client: Client, spec: dict[str, Any], seeded: Seeded) -> None:
    body = await get(client, "/api/v1/verdicts/disputed")
    check(spec, "/api/v1/verdicts/disputed", "get", 200, body)
    assert body["rules"] == [{"rule": "log.compile_error", "disputed": 1, "confirmed": 0}]
    assert body["disputes"][0]["who"] == "alice"


async def test_feedback_appends_to_the_verdicts_job_stream(
    client: Client, spec: dict[str, Any], seeded: Seeded, store: EventStore
) -> None:
    verdict = seeded.ids["oom_verdict"]
    url = f"/api/v1/verdicts/{verdict.event_id}/feedback"
    payload = {"verdict": "disputed", "who": "bob", "why": "it was the node, not the job",
               "correct_category": "preempted"}  # fmt: skip
    r = await client.post(url, json=payload, headers={**AUTH, "Idempotency-Key": "k1"})
    assert r.status == 201, await r.text()
    body = await r.json()
    check(spec, "/api/v1/verdicts/{event_id}/feedback", "post", 201, body)
    assert body["stream"] == verdict.stream and body["type"] == "VerdictDisputed"
    again = await client.post(url, json=payload, headers={**AUTH, "Idempotency-Key": "k1"})
    assert (await again.json())["status"] == "duplicate"
    stored = (await store.read_stream(verdict.stream))[-1]
    assert isinstance(stored.data, VerdictDisputed)
    assert (stored.data.who, stored.data.correct_category) == ("bob", "preempted")
    await Projector(AuditStore(store)).catch_up()
    disputed = await get(client, "/api/v1/verdicts/disputed?rule=exit.137")
    assert [d["who"] for d in disputed["disputes"]] == ["bob"]
    counts = {x["rule"]: x["disputed"] for x in disputed["rules"]}
    assert counts["k8s.oom_killed"] == 1 and counts["exit.137"] == 1
    timeline = await get(client, "/api/v1/jobs/gitlab/380/1977")
    assert timeline["events"][-1]["type"] == "VerdictDisputed"
    ok = await client.post(
        f"/api/v1/verdicts/{seeded.ids['gh_verdict'].event_id}/feedback",
        json={"verdict": "confirmed", "who": "carol"}, headers=AUTH,
    )  # fmt: skip
    assert ok.status == 201


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"verdict": "maybe", "who": "bob"}, 400),
        ({"verdict": "disputed", "who": "bob"}, 400),  # a dispute needs a why
        ({"verdict": "confirmed", "who": ""}, 400),
        ({"verdict": "confirmed", "who": "bob", "extra": 1}, 400),
    ],
)
async def test_feedback_rejects_bad_bodies(
    client: Client, seeded: Seeded, payload: dict[str, Any], status: int
) -> None:
    url = f"/api/v1/verdicts/{seeded.ids['oom_verdict'].event_id}/feedback"
    r = await client.post(url, json=payload, headers=AUTH)
    assert r.status == status


async def test_feedback_on_something_that_is_not_a_verdict_is_404(
    client: Client, seeded: Seeded
) -> None:
    for target in (seeded.ids["oom_request"].event_id, "0190b0c2-0000-7000-8000-000000000000"):
        r = await client.post(f"/api/v1/verdicts/{target}/feedback",
                              json={"verdict": "confirmed", "who": "x"}, headers=AUTH)  # fmt: skip
        assert r.status == 404
    r = await client.post("/api/v1/verdicts/not-a-uuid/feedback",
                          json={"verdict": "confirmed", "who": "x"}, headers=AUTH)  # fmt: skip
    assert r.status == 400


READS = [
    "/api/v1/jobs/gitlab/380/1977",
    "/api/v1/jobs/gitlab/380/1977/why",
    "/api/v1/pipelines/gitlab/380/9001",
    "/api/v1/stats?metric=rule",
    "/api/v1/events",
    "/api/v1/allocation?project=380&job_name=test",
    "/api/v1/verdicts/disputed",
]


@pytest.mark.parametrize("url", READS)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}],
    ids=["none", "wrong", "basic"],
)
async def test_reads_need_the_token(
    client: Client, spec: dict[str, Any], seeded: Seeded, url: str, headers: dict[str, str]
) -> None:
    r = await client.get(url, headers=headers)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    body = await r.json()
    jsonschema.validate(body, {**spec["components"]["schemas"]["Error"]})


async def test_feedback_needs_the_token(client: Client, seeded: Seeded) -> None:
    url = f"/api/v1/verdicts/{seeded.ids['oom_verdict'].event_id}/feedback"
    r = await client.post(url, json={"verdict": "confirmed", "who": "x"})
    assert r.status == 401


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("url", [u.split("?")[0] for u in READS] + ["/api/v1/anything"])
async def test_writes_are_refused(client: Client, seeded: Seeded, method: str, url: str) -> None:
    r = await client.request(method, url, headers=AUTH, json={})
    assert r.status == 405, (method, url, r.status)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("/api/v1/events?limit=1001", "limit"),
        ("/api/v1/events?limit=0", "limit"),
        ("/api/v1/events?from=2020-01-01T00:00:00Z&to=2022-01-01T00:00:00Z", "400 days"),
        ("/api/v1/events?cursor=abc", "cursor"),
        (
            "/api/v1/stats?metric=category&from=2020-01-01T00:00:00Z&to=2022-01-01T00:00:00Z",
            "400 days",
        ),
        ("/api/v1/stats?metric=nope", "metric"),
        ("/api/v1/stats?metric=rule&top=1000", "top"),
        ("/api/v1/stats?metric=rule&bucket=minute", "bucket"),
        ("/api/v1/stats?metric=rule&from=yesterday", "ISO 8601"),
        ("/api/v1/stats", "metric"),
        ("/api/v1/allocation?project=380", "job_name"),
        ("/api/v1/verdicts/disputed?limit=5000", "limit"),
    ],
)
async def test_limits_answer_400_with_a_reason(
    client: Client, spec: dict[str, Any], url: str, fragment: str
) -> None:
    body = await get(client, url, 400)
    jsonschema.validate(body, spec["components"]["schemas"]["Error"])
    assert fragment in body["message"]


async def test_unknown_job_is_404(client: Client, seeded: Seeded) -> None:
    body = await get(client, "/api/v1/jobs/gitlab/380/424242", 404)
    assert body["error"] == "not_found"
    await get(client, "/api/v1/jobs/gitlab/380/424242/why", 404)
    await get(client, "/api/v1/pipelines/gitlab/380/1", 404)


async def test_closed_without_a_token_open_only_on_purpose(
    store: EventStore, seeded: Seeded
) -> None:
    """No token configured: every route refuses (401); ``api_open`` opens reading, never the
    feedback POST."""
    from aiohttp.test_utils import TestServer

    from ciretry.audit import mount

    path = "/api/v1/pipelines/gitlab/380/9001"
    feedback = f"/api/v1/verdicts/{seeded.ids['build_verdict'].event_id}/feedback"
    body = {"verdict": "confirmed", "who": "mallory"}
    for config, read_status in ((Config(), 401), (Config(api_open=True), 200)):
        app = web.Application()
        mount(app, store, config)
        async with TestClient(TestServer(app)) as c:
            r = await c.get(path)
            assert r.status == read_status, config
            r = await c.post(feedback, json=body)
            assert r.status == 401, config
