import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ciretry.common.bus import Bus, OutboxPublisher, Recorder
from ciretry.common.events import JobFinished, PipelineFinished, PodTerminated
from ciretry.common.eventstore import EventStore
from ciretry.ingest.app import BATCHER

from .conftest import API_TOKEN, ClientFactory, encode, github_headers, gitlab_headers
from .helpers import (
    GITLAB,
    TASKCLUSTER,
    failed_job_hook,
    github_event,
    github_fixtures,
    gitlab_fixtures,
    load,
    pod,
    pulse_messages,
    task_message,
)
from .test_github import EXPECTED as GITHUB_EXPECTED
from .test_gitlab import EXPECTED as GITLAB_EXPECTED

Client = TestClient[Any, Any]
BEARER = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


async def all_events(store: EventStore) -> list[Any]:
    return [e async for e in store.read_all()]


# Posted in file order; the pipeline fixtures all describe pipeline 31 finishing at the same
# instant, so later ones are duplicates except where a build's status differs.
GITLAB_HTTP_STATUS = {
    "gitlab-docs__pipeline_hook_example.json": 202,
    "gitlab4j__pipeline-event.json": 200,  # same pipeline, jobs and instant (other time format)
    "go-gitlab__job.json": 202,
    "go-gitlab__pipeline.json": 202,  # job 378 reported success here: a new fact
    "jenkins-gitlab-plugin__PipelineEvent.json": 200,  # identical to go-gitlab's
}


async def test_every_gitlab_fixture(client: Client, store: EventStore) -> None:
    for i, path in enumerate(gitlab_fixtures()):
        kind, detail = GITLAB_EXPECTED[path.name]
        resp = await client.post(
            "/webhooks/gitlab", data=encode(load(path)), headers=gitlab_headers(f"u{i}")
        )
        body = await resp.json()
        if kind == "invalid":
            assert resp.status == 400, path.name
            assert body["field"] == detail
        elif kind == "ignored":
            assert (resp.status, body["status"]) == (202, "ignored"), path.name
            assert detail in body["reason"]
        else:
            assert resp.status == GITLAB_HTTP_STATUS[path.name], path.name
            assert body["status"] == ("accepted" if resp.status == 202 else "duplicate")
    stored = await all_events(store)
    keys = [e.metadata.idempotency_key for e in stored]
    assert len(keys) == len(set(keys))
    jobs = [e.data for e in stored if isinstance(e.data, JobFinished)]
    assert sorted((j.job_id, j.status) for j in jobs) == [
        ("3580121225", "success"),
        ("376", "success"),
        ("377", "success"),
        ("378", "failed"),
        ("378", "success"),
    ]
    (pipeline,) = [e.data for e in stored if isinstance(e.data, PipelineFinished)]
    assert (pipeline.pipeline_id, pipeline.status, len(pipeline.jobs)) == ("31", "success", 5)
    failed = next(j for j in jobs if j.status == "failed")
    assert failed.failure_reason == "script_failure"
    assert {e.stream for e in stored if e.data.project == "1"} == {"pipeline-gitlab-1-31"}


async def test_duplicate_delivery_stores_once(client: Client, store: EventStore) -> None:
    body = encode(failed_job_hook())
    first = await client.post("/webhooks/gitlab", data=body, headers=gitlab_headers("same"))
    second = await client.post("/webhooks/gitlab", data=body, headers=gitlab_headers("same"))
    assert first.status == 202
    assert (second.status, (await second.json())["status"]) == (200, "duplicate")
    (event,) = await all_events(store)
    assert event.metadata.source_delivery_id == "same"
    assert event.metadata.idempotency_key == "gitlab:job:1:378:failed"


async def test_concurrent_duplicates_in_one_batch(client: Client, store: EventStore) -> None:
    body = encode(failed_job_hook())
    responses = await asyncio.gather(
        *(
            client.post("/webhooks/gitlab", data=body, headers=gitlab_headers("x"))
            for _ in range(20)
        )
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 19 + [202]
    assert len(await all_events(store)) == 1


async def test_job_hook_then_pipeline_hook_store_the_job_once(
    client: Client, store: EventStore
) -> None:
    r1 = await client.post(
        "/webhooks/gitlab", data=encode(failed_job_hook()), headers=gitlab_headers("a")
    )
    r2 = await client.post(
        "/webhooks/gitlab",
        data=encode(load(GITLAB / "gitlab-docs__pipeline_hook_example.json")),
        headers=gitlab_headers("b", event="Pipeline Hook"),
    )
    assert (r1.status, r2.status) == (202, 202)
    jobs = [e.data for e in await all_events(store) if isinstance(e.data, JobFinished)]
    assert sorted(j.job_id for j in jobs) == ["376", "377", "378"]


async def test_concurrent_requests_are_batched(client: Client, store: EventStore) -> None:
    def hook(i: int) -> bytes:
        h = failed_job_hook(job_id=10_000 + i)
        return encode(h)

    responses = await asyncio.gather(
        *(
            client.post("/webhooks/gitlab", data=hook(i), headers=gitlab_headers(f"b{i}"))
            for i in range(200)
        )
    )
    assert all(r.status == 202 for r in responses)
    stats = client.server.app[BATCHER].stats
    assert stats.events == 200
    assert stats.batches < 200  # several requests shared a transaction
    assert len(await all_events(store)) == 200


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Gitlab-Token": "wrong"}, "bad or missing"),
        ({"X-Gitlab-Token": ""}, "bad or missing"),
        ({}, "bad or missing"),
    ],
)
async def test_gitlab_bad_token(
    client: Client, store: EventStore, headers: dict[str, str], message: str
) -> None:
    h = gitlab_headers()
    h.pop("X-Gitlab-Token")
    h.update(headers)
    resp = await client.post("/webhooks/gitlab", data=encode(failed_job_hook()), headers=h)
    assert resp.status == 401
    assert message in (await resp.json())["message"]
    assert await all_events(store) == []


async def test_gitlab_project_scoped_secret(client: Client, store: EventStore) -> None:
    hook = failed_job_hook()
    hook["project_id"] = 77
    ok = await client.post(
        "/webhooks/gitlab", data=encode(hook), headers=gitlab_headers(token="scoped-secret")
    )
    assert ok.status == 202
    other = failed_job_hook()  # project 1: the project-77 secret must not open it
    bad = await client.post(
        "/webhooks/gitlab", data=encode(other), headers=gitlab_headers(token="scoped-secret")
    )
    assert bad.status == 401


async def test_no_secret_configured_fails_closed(
    store: EventStore, make_client: ClientFactory
) -> None:
    client = await make_client(
        store, gitlab_webhook_secrets=(), github_webhook_secrets=(), api_token=""
    )
    resp = await client.post(
        "/webhooks/gitlab", data=encode(failed_job_hook()), headers=gitlab_headers()
    )
    assert resp.status == 401 and (await resp.json())["message"] == "no secret configured"
    resp = await client.post("/pulse", data=b"{}", headers=BEARER)
    assert resp.status == 401


@pytest.mark.parametrize("path", github_fixtures(), ids=lambda p: p.name)
async def test_every_github_fixture(client: Client, store: EventStore, path: Path) -> None:
    kind, detail = GITHUB_EXPECTED[path.name]
    raw = read_bytes(path)
    resp = await client.post(
        "/webhooks/github", data=raw, headers=github_headers(raw, github_event(path))
    )
    body = await resp.json()
    assert resp.status == 202
    if kind == "ignored":
        assert body["status"] == "ignored"
        assert await all_events(store) == []
    else:
        (event,) = await all_events(store)
        assert event.data.status == detail
        assert event.metadata.source_delivery_id == "d-1"


async def test_github_bad_signature_and_form_encoding(client: Client, store: EventStore) -> None:
    path = github_fixtures()[0]
    raw = read_bytes(path)
    h = github_headers(raw, "workflow_job", secret="not-the-secret")
    assert (await client.post("/webhooks/github", data=raw, headers=h)).status == 401
    h = github_headers(raw, "workflow_job")
    h.pop("X-Hub-Signature-256")
    assert (await client.post("/webhooks/github", data=raw, headers=h)).status == 401
    import urllib.parse

    form = urllib.parse.urlencode({"payload": raw.decode()}).encode()
    h = github_headers(form, "workflow_job")
    h["Content-Type"] = "application/x-www-form-urlencoded"
    assert (await client.post("/webhooks/github", data=form, headers=h)).status == 202
    assert len(await all_events(store)) == 1


async def test_every_taskcluster_message_over_pulse_http(client: Client, store: EventStore) -> None:
    accepted = 0
    for envelope in pulse_messages().values():
        resp = await client.post("/pulse", data=encode(envelope), headers=BEARER)
        body = await resp.json()
        assert resp.status == 202
        if envelope["exchange"].endswith("task-completed"):
            assert body["status"] == "accepted"
            accepted += 1
        else:
            assert body["status"] == "ignored"
    for message in load(TASKCLUSTER / "real_messages" / "treeherder__job_data.json"):
        resp = await client.post("/pulse", data=encode(message), headers=BEARER)
        assert (resp.status, (await resp.json())["status"]) == (202, "ignored")
    again = next(v for v in pulse_messages().values() if v["exchange"].endswith("task-completed"))
    assert (await client.post("/pulse", data=encode(again), headers=BEARER)).status == 200
    stored = await all_events(store)
    assert len(stored) == accepted == 13
    assert all(e.data.source == "taskcluster" and e.data.status == "success" for e in stored)


async def test_pulse_exception_message(client: Client, store: EventStore) -> None:
    envelope = {
        "exchange": "exchange/taskcluster-queue/v1/task-exception",
        "payload": task_message(),
    }
    resp = await client.post("/pulse", data=encode(envelope), headers=BEARER)
    assert resp.status == 202
    (event,) = await all_events(store)
    assert event.data.failure_reason == "taskcluster:worker-shutdown"


async def test_kubernetes_pod(client: Client, store: EventStore) -> None:
    resp = await client.post("/webhooks/kubernetes", data=encode(pod()), headers=BEARER)
    assert resp.status == 202
    resp = await client.post("/webhooks/kubernetes", data=encode(pod()), headers=BEARER)
    assert resp.status == 200
    (event,) = await all_events(store)
    assert isinstance(event.data, PodTerminated) and event.stream == "job-gitlab-1-378"
    unauth = await client.post(
        "/webhooks/kubernetes", data=encode(pod()), headers={"Content-Type": "application/json"}
    )
    assert unauth.status == 401


async def test_malformed_json_and_wrong_type(client: Client) -> None:
    resp = await client.post("/webhooks/gitlab", data=b"{not json", headers=gitlab_headers())
    assert resp.status == 400 and (await resp.json())["field"] == "$"
    h = gitlab_headers()
    h["Content-Type"] = "text/plain"
    assert (await client.post("/webhooks/gitlab", data=b"{}", headers=h)).status == 415
    h.pop("Content-Type")
    assert (await client.post("/webhooks/gitlab", data=b"{}", headers=h)).status == 415
    hook = failed_job_hook()
    hook["build_id"] = "x" * 500
    resp = await client.post("/webhooks/gitlab", data=encode(hook), headers=gitlab_headers())
    assert resp.status == 400 and (await resp.json())["field"] == "build_id"


async def test_body_limit(client: Client, store: EventStore) -> None:
    big = encode({**failed_job_hook(), "padding": "x" * 300_000})
    resp = await client.post("/webhooks/gitlab", data=big, headers=gitlab_headers())
    assert resp.status == 413

    async def chunks() -> Any:  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 16_384):
            yield big[i : i + 16_384]

    resp = await client.post("/webhooks/gitlab", data=chunks(), headers=gitlab_headers())
    assert resp.status == 413
    assert await all_events(store) == []


async def test_database_unreachable_is_503(
    pg_dsn: str, schema: str, make_client: ClientFactory
) -> None:
    store = await EventStore.connect(pg_dsn, schema, max_size=2)
    await store.migrate()
    client = await make_client(store)
    await store.close()
    resp = await client.post(
        "/webhooks/gitlab", data=encode(failed_job_hook()), headers=gitlab_headers()
    )
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    # Ignored payloads need no database and still get their answer.
    ignored = await client.post(
        "/webhooks/gitlab", data=encode({"object_kind": "push"}), headers=gitlab_headers()
    )
    assert ignored.status == 202


async def test_accepted_events_reach_the_bus(
    store: EventStore, bus: Bus, make_client: ClientFactory
) -> None:
    recorder = Recorder(store, OutboxPublisher(store, bus))
    client = await make_client(store, recorder)
    resp = await client.post(
        "/webhooks/gitlab", data=encode(failed_job_hook()), headers=gitlab_headers()
    )
    assert resp.status == 202
    event_id = (await resp.json())["events"][0]
    await client.server.app[BATCHER].close()  # waits for the background publish
    await recorder.outbox.settle()  # and the outbox delete behind it
    assert await store.outbox_depth() == 0
    sub = await bus.js.pull_subscribe(bus.subject("job"), durable=None, stream=bus.stream)
    (msg,) = await sub.fetch(1, timeout=5)
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == event_id
