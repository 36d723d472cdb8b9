"""Buildkite pipeline webhooks: the normalizer on Buildkite's documented payloads
(tests/fixtures/external/buildkite, SOURCES.txt), and the route with both of Buildkite's ways to
authenticate a webhook (the token in ``X-Buildkite-Token``, or the ``X-Buildkite-Signature``
HMAC), on each event log."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ciretry.common.eventlog import EventLog
from ciretry.common.events import JobFinished, LogLocator, PipelineFinished, pipeline_stream
from ciretry.ingest import buildkite
from ciretry.ingest.fields import Accepted, Ignored, InvalidPayload

from .conftest import BUILDKITE_SECRET, ClientFactory

Client = TestClient[Any, Any]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "external" / "buildkite"
PROJECT = "my-great-org/great-pipeline"
JOB_ID = "b63254c0-3271-4a98-8270-7cfbd6c2f14e"


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def event_headers(body: dict[str, Any]) -> dict[str, str]:
    return {"X-Buildkite-Event": body["event"]}


def accepted(body: dict[str, Any]) -> Accepted:
    result = buildkite.normalize(event_headers(body), body)
    assert isinstance(result, Accepted), result
    return result


# --- the normalizer --------------------------------------------------------------------------


def test_a_job_the_agent_stopped_is_a_failed_job_with_buildkites_reason() -> None:
    result = accepted(payload("job.finished.failed.agent-stop.json"))
    [new] = result.events
    job = new.data
    assert isinstance(job, JobFinished)
    assert (job.source, job.project, job.pipeline_id, job.job_id) == (
        "buildkite",
        PROJECT,
        "2",
        JOB_ID,
    )
    assert (job.job_name, job.status, job.exit_code) == ("RSpec", "failed", -1)
    assert (job.provider_failure_reason, job.failure_reason) == (
        "agent_stop",
        "buildkite:agent_stop",
    )
    assert job.attempt == 2  # retries_count 1: the second attempt of its step
    assert (job.ref, job.sha, job.user) == (
        "main",
        "abcd0b72a1e580e90712cdd9eb26d3fb41cd09c8",
        "Keith Pitt",
    )
    assert (job.runner, job.runner_tags, job.allow_failure) == ("my-agent", ("*",), False)
    assert job.log == LogLocator(
        kind="buildkite",
        project=PROJECT,
        job_id=JOB_ID,
        run_id=2,
        url=f"https://buildkite.com/my-great-org/my-pipeline/builds/2#{JOB_ID}",
    )
    assert new.stream == pipeline_stream("buildkite", PROJECT, "2")
    assert new.metadata.idempotency_key == f"buildkite:job:{PROJECT}:{JOB_ID}:failed"
    assert result.notes == ()


def test_a_passed_job_and_a_failed_build() -> None:
    [passed] = accepted(payload("job.finished.passed.json")).events
    assert isinstance(passed.data, JobFinished)
    assert passed.data.status == "success"
    assert passed.data.failure_reason is None and passed.data.provider_failure_reason is None
    assert passed.metadata.idempotency_key == f"buildkite:job:{PROJECT}:{JOB_ID}:passed"
    [build] = accepted(payload("build.finished.failed.json")).events
    assert isinstance(build.data, PipelineFinished)
    assert (build.data.project, build.data.pipeline_id, build.data.status) == (
        PROJECT,
        "2",
        "failed",
    )
    assert build.data.commit_message == "Bumping to version 0.2-beta.6"
    assert build.stream == passed.stream
    # A build finishes again after one of its jobs is retried: its key tells the two apart.
    assert build.metadata.idempotency_key.startswith(f"buildkite:build:{PROJECT}:2:failed:2015")


@pytest.mark.parametrize(
    ("state", "exit_status", "status", "reason"),
    [
        ("timed_out", -1, "failed", "job_execution_timeout"),
        ("canceled", -1, "canceled", None),
        ("finished", 0, "success", None),
        ("finished", 2, "failed", None),
    ],
)
def test_job_states(state: str, exit_status: int, status: str, reason: str | None) -> None:
    body = payload("job.finished.passed.json")
    body["job"].update(state=state, exit_status=exit_status)
    [new] = accepted(body).events
    assert isinstance(new.data, JobFinished)
    assert (new.data.status, new.data.failure_reason) == (status, reason)


def test_what_never_ran_is_ignored() -> None:
    body = payload("job.finished.passed.json")
    for change in ({"type": "waiter"}, {"type": "manual"}, {"state": "skipped"}, {"state": "broken"}):
        changed = copy.deepcopy(body)
        changed["job"].update(change)
        assert isinstance(buildkite.normalize(event_headers(changed), changed), Ignored)
    for event in ("ping", "job.started", "build.running"):
        assert isinstance(buildkite.normalize({"X-Buildkite-Event": event}, body), Ignored)
    blocked = payload("build.finished.failed.json")
    blocked["build"]["state"] = "not_run"
    assert isinstance(buildkite.normalize(event_headers(blocked), blocked), Ignored)


def test_an_unknown_signal_reason_is_kept_and_surfaced() -> None:
    body = payload("job.finished.failed.agent-stop.json")
    body["job"]["signal_reason"] = "moon_phase"
    result = accepted(body)
    assert isinstance(result.events[0].data, JobFinished)
    assert result.events[0].data.failure_reason == "unknown:buildkite:moon_phase"
    assert result.notes and "moon_phase" in result.notes[0]


def test_a_soft_failed_job_is_a_failure_its_step_allows() -> None:
    body = payload("job.finished.failed.agent-stop.json")
    body["job"]["soft_failed"] = True
    [new] = accepted(body).events
    assert isinstance(new.data, JobFinished) and new.data.allow_failure


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda b: b["job"].update(id="not-a-uuid"), "job.id"),
        (lambda b: b["job"].update(id=None), "job.id"),
        (lambda b: b["build"].update(number="two"), "build.number"),
        (lambda b: b["pipeline"].update(slug="a/b"), "pipeline.slug"),
        (lambda b: (b["pipeline"].pop("url"), b["build"].pop("url")), "pipeline.url"),
        (lambda b: b.pop("pipeline"), "pipeline"),
        (lambda b: b["job"].update(exit_status="-1"), "job.exit_status"),
    ],
)
def test_malformed_payloads_name_the_field(edit: Any, field: str) -> None:
    body = payload("job.finished.failed.agent-stop.json")
    edit(body)
    with pytest.raises(InvalidPayload) as raised:
        buildkite.normalize(event_headers(body), body)
    assert raised.value.field == field


def test_the_organization_comes_from_the_build_when_the_pipeline_has_no_url() -> None:
    body = payload("job.finished.failed.agent-stop.json")
    del body["pipeline"]["url"]
    [new] = accepted(body).events
    assert new.data.project == PROJECT


# --- the route -------------------------------------------------------------------------------


def _signed(raw: bytes, secret: str = BUILDKITE_SECRET, stamp: int | None = None) -> str:
    stamp = int(time.time()) if stamp is None else stamp
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + raw, hashlib.sha256).hexdigest()
    return f"timestamp={stamp},signature={mac}"


async def post(client: Client, raw: bytes, event: str, **auth: str) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "X-Buildkite-Event": event}
    headers.update({f"X-Buildkite-{k.title()}": v for k, v in auth.items()})
    resp = await client.post("/webhooks/buildkite", data=raw, headers=headers)
    return resp.status, await resp.json()


async def test_a_job_webhook_with_the_token_is_stored_once(
    client: Client, store: EventLog
) -> None:
    raw = (FIXTURES / "job.finished.failed.agent-stop.json").read_bytes()
    assert (await post(client, raw, "job.finished", token=BUILDKITE_SECRET))[0] == 202
    assert await post(client, raw, "job.finished", token=BUILDKITE_SECRET) == (
        200,
        {"status": "duplicate"},
    )
    events = await store.read_stream(pipeline_stream("buildkite", PROJECT, "2"))
    assert [type(e.data) for e in events] == [JobFinished]


async def test_a_signed_job_webhook_is_stored(client: Client, store: EventLog) -> None:
    raw = (FIXTURES / "job.finished.failed.agent-stop.json").read_bytes()
    status, body = await post(client, raw, "job.finished", signature=_signed(raw))
    assert status == 202, body
    assert len(await store.read_stream(pipeline_stream("buildkite", PROJECT, "2"))) == 1


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"token": "wrong"},
        {"token": ""},
        {"signature": "timestamp=1,signature=00"},
        # A real signature, but of a delivery sent ten minutes ago: a replay.
        {"signature": "stale"},
        # A valid token does not excuse a bad signature: the signature form was chosen.
        {"signature": "timestamp=1,signature=00", "token": BUILDKITE_SECRET},
    ],
)
async def test_bad_credentials_are_refused(
    client: Client, store: EventLog, auth: dict[str, str]
) -> None:
    raw = (FIXTURES / "job.finished.failed.agent-stop.json").read_bytes()
    if auth.get("signature") == "stale":
        auth = {"signature": _signed(raw, stamp=int(time.time()) - 600)}
    status, body = await post(client, raw, "job.finished", **auth)
    assert status == 401 and body["error"] == "unauthorized"
    assert await store.read_stream(pipeline_stream("buildkite", PROJECT, "2")) == []


async def test_no_buildkite_secret_configured_fails_closed(
    store: EventLog, make_client: ClientFactory
) -> None:
    client = await make_client(store, buildkite_webhook_secrets=())
    raw = (FIXTURES / "job.finished.passed.json").read_bytes()
    status, body = await post(client, raw, "job.finished", token="")
    assert status == 401 and body["message"] == "no secret configured"


async def test_a_ping_is_acknowledged_and_not_stored(client: Client) -> None:
    raw = json.dumps({"event": "ping", "service": {}, "sender": {}}).encode()
    status, body = await post(client, raw, "ping", token=BUILDKITE_SECRET)
    assert (status, body["status"]) == (202, "ignored")
