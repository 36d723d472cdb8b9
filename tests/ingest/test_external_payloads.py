"""Real third-party payloads (tests/fixtures/external, origins in its SOURCES.txt) posted at the
ingest app on the real database, with the answer a CI maintainer expects:

* GitLab System Hook deliveries (go-playground/webhooks): group/project/user/key events, pushes,
  tags and merge requests are 202 ignored (a hook that keeps failing is disabled by GitLab),
  while job and pipeline events that come through a system hook are stored as usual;
* octokit's workflow_job with U+0000 spliced into its name, runner, branch and labels: stored as
  safe text, readable by the documented jsonb query and projected into the audit read models;
* Taskcluster: a run resolved ``superseded`` is a cancellation (stored ``canceled``, classified
  ``cancelled``, not counted as a failure by audit); Taskcluster's default ids (projectId
  ``none``, schedulerId ``-``) give project ``none``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ciretry.audit.projector import Projector
from ciretry.audit.store import AuditStore
from ciretry.classify.classifier import RuleClassifier
from ciretry.classify.logsource import LogFetched
from ciretry.classify.rules import load_ruleset
from ciretry.common.events import (
    JobFinished,
    MergeRequestUpdated,
    MessageRejected,
    PipelineFinished,
)
from ciretry.common.eventstore import EventStore

from .conftest import API_TOKEN, encode, github_headers, gitlab_headers
from .helpers import failed_job_hook

Client = TestClient[Any, Any]
EXTERNAL = Path(__file__).resolve().parents[1] / "fixtures" / "external"
SYSTEM_HOOKS = sorted((EXTERNAL / "gitlab_system_hooks").glob("system-*.json"))
#: Merge requests are ciretry's (opt-out labels) whichever hook delivers them.
SYSTEM_MERGE_REQUEST = EXTERNAL / "gitlab_system_hooks" / "system-merge-request-event.json"
IGNORED_SYSTEM_HOOKS = [p for p in SYSTEM_HOOKS if p != SYSTEM_MERGE_REQUEST]
#: Sent byte for byte as the upstream files hold them.
SYSTEM_HOOK_BODIES = {p: p.read_bytes() for p in SYSTEM_HOOKS}
WORKFLOW_JOB = EXTERNAL / "github" / "workflow_job.completed.failure.with-organization.payload.json"


def external(path: Path) -> Any:
    return json.loads(path.read_text())


def test_the_fixtures_have_their_sources() -> None:
    lines = (EXTERNAL / "SOURCES.txt").read_text().splitlines()
    listed = {line.split(" | ", 1)[0] for line in lines if line.split(" | ")[0].endswith(".json")}
    assert all(line.count(" | ") >= 3 for line in lines if line.split(" | ")[0] in listed)
    present = {str(p.relative_to(EXTERNAL)) for p in EXTERNAL.rglob("*.json")}
    assert present and present == listed


# --- GitLab system hooks ---------------------------------------------------------------------


@pytest.mark.parametrize("path", IGNORED_SYSTEM_HOOKS, ids=lambda p: p.stem)
async def test_gitlab_system_hook_events_are_ignored_not_refused(
    client: Client, store: EventStore, path: Path
) -> None:
    before = await store.last_position()
    resp = await client.post(
        "/webhooks/gitlab",
        data=SYSTEM_HOOK_BODIES[path],
        headers=gitlab_headers(f"sys-{path.stem}", event="System Hook"),
    )
    body = await resp.json()
    assert resp.status == 202, body
    assert body["status"] == "ignored" and "not a job or pipeline event" in body["reason"]
    assert await store.last_position() == before


async def test_a_merge_request_through_a_system_hook_is_stored(
    client: Client, store: EventStore
) -> None:
    """GitLab's system hook sends a merge request with a project that has no id: the target
    project id stands in for it."""
    doc = external(SYSTEM_MERGE_REQUEST)
    resp = await client.post(
        "/webhooks/gitlab",
        data=SYSTEM_HOOK_BODIES[SYSTEM_MERGE_REQUEST],
        headers=gitlab_headers("sys-mr", event="System Hook"),
    )
    assert resp.status == 202, await resp.text()
    [mr] = [e.data async for e in store.read_all()]
    assert isinstance(mr, MergeRequestUpdated)
    attrs = doc["object_attributes"]
    assert (mr.project, mr.number, mr.source_branch) == (
        str(attrs["target_project_id"]), str(attrs["iid"]), attrs["source_branch"]
    )  # fmt: skip


async def test_system_hooks_cover_every_event_name_in_the_fixtures() -> None:
    names = {external(p).get("event_name") or external(p).get("object_kind") for p in SYSTEM_HOOKS}
    # group, project, user, key, team membership, push, tag push, merge request
    assert {"group_create", "project_create", "push", "tag_push", "merge_request"} <= names
    assert len(SYSTEM_HOOKS) >= 20


@pytest.mark.parametrize("event", ["System Hook", "Pipeline Hook"])
async def test_a_pipeline_event_is_stored_whichever_hook_delivers_it(
    client: Client, store: EventStore, event: str
) -> None:
    doc = external(EXTERNAL / "gitlab" / "pipeline-event.json")
    resp = await client.post(
        "/webhooks/gitlab", data=encode(doc), headers=gitlab_headers(f"p-{event}", event=event)
    )
    assert resp.status == 202, await resp.text()
    stored = [e.data async for e in store.read_all()]
    pipelines = [d for d in stored if isinstance(d, PipelineFinished)]
    jobs = [d for d in stored if isinstance(d, JobFinished)]
    assert [(p.pipeline_id, p.status) for p in pipelines] == [
        (str(doc["object_attributes"]["id"]), "success")
    ]
    terminal = [b for b in doc["builds"] if b["status"] in ("success", "failed", "canceled")]
    assert sorted(j.job_id for j in jobs) == sorted(str(b["id"]) for b in terminal)


async def test_a_job_event_through_a_system_hook_is_stored(
    client: Client, store: EventStore
) -> None:
    resp = await client.post(
        "/webhooks/gitlab",
        data=encode(failed_job_hook(job_id=4242)),
        headers=gitlab_headers("sys-job", event="System Hook"),
    )
    assert resp.status == 202, await resp.text()
    [job] = [e.data async for e in store.read_all()]
    assert isinstance(job, JobFinished) and (job.job_id, job.status) == ("4242", "failed")


async def test_a_system_hook_with_neither_kind_nor_event_name_is_still_ignored(
    client: Client,
) -> None:
    resp = await client.post(
        "/webhooks/gitlab", data=encode({}), headers=gitlab_headers("e", event="System Hook")
    )
    assert resp.status == 202 and (await resp.json())["status"] == "ignored"


async def test_a_job_hook_without_object_kind_is_still_a_400(client: Client) -> None:
    resp = await client.post("/webhooks/gitlab", data=encode({}), headers=gitlab_headers())
    assert resp.status == 400 and (await resp.json())["field"] == "object_kind"


# --- GitHub workflow_job with NULs -----------------------------------------------------------


def _with_nuls() -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(external(WORKFLOW_JOB))
    job = doc["workflow_job"]
    job["name"] = "lin\x00ters"
    job["runner_name"] = "GitHub Actions\x00 5"
    job["head_branch"] = "main\x00"
    job["labels"] = ["ubuntu-\x00latest"]
    return doc


async def test_a_workflow_job_with_nuls_is_stored_safe_and_projected(
    pg_client: Client, pg_store: EventStore
) -> None:
    client, store = pg_client, pg_store
    body = encode(_with_nuls())
    assert b"\\u0000" in body  # the NULs travel as JSON escapes, as GitHub would send them
    resp = await client.post(
        "/webhooks/github", data=body, headers=github_headers(body, "workflow_job")
    )
    assert resp.status == 202, await resp.text()
    [job] = [e.data async for e in store.read_all()]
    assert isinstance(job, JobFinished)
    assert (job.job_name, job.runner, job.ref, job.runner_tags) == (
        "lin\ufffdters", "GitHub Actions\ufffd 5", "main\ufffd", ("ubuntu-\ufffdlatest",)
    )  # fmt: skip

    async with store.connection() as conn:
        # The query docs/architecture.md documents, on the labels too.
        label = await conn.fetchval(
            "SELECT convert_from(body, 'UTF8')::jsonb -> 'runner_tags' ->> 0 FROM events"
        )
    assert label == "ubuntu-\ufffdlatest"

    projector = Projector(AuditStore(store))
    await projector.catch_up()
    assert await projector.position() == await store.last_position()
    async with store.connection() as conn:
        row = await conn.fetchrow("SELECT job_name, runner, ref FROM audit_jobs")
    assert tuple(row) == ("lin\ufffdters", "GitHub Actions\ufffd 5", "main\ufffd")
    assert not [e async for e in store.read_all() if isinstance(e.data, MessageRejected)]


# --- Taskcluster -----------------------------------------------------------------------------


def _pulse_headers(exchange: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {API_TOKEN}",
        "Content-Type": "application/json",
        "X-Taskcluster-Exchange": f"exchange/taskcluster-queue/v1/{exchange}",
    }


async def _post_task(client: Client, message: Any, exchange: str = "task-exception") -> None:
    resp = await client.post("/pulse", data=encode(message), headers=_pulse_headers(exchange))
    assert resp.status == 202, await resp.text()


async def test_a_superseded_run_is_a_cancellation_everywhere(
    pg_client: Client, pg_store: EventStore
) -> None:
    client, store = pg_client, pg_store
    message = external(EXTERNAL / "taskcluster" / "task-exception.superseded.json")
    await _post_task(client, message)
    [job] = [e.data async for e in store.read_all()]
    assert isinstance(job, JobFinished)
    assert (job.status, job.provider_failure_reason, job.failure_reason) == (
        "canceled", "superseded", "taskcluster:superseded"
    )  # fmt: skip

    verdict = RuleClassifier(load_ruleset()).classify(job, [], LogFetched(None, note="none"))
    assert (verdict.category, verdict.retryable) == ("cancelled", False)

    await Projector(AuditStore(store)).catch_up()
    async with store.connection() as conn:
        failures = await conn.fetchval(
            "SELECT coalesce(sum(n), 0) FROM audit_stats WHERE kind = 'failures'"
        )
        jobs_failed = await conn.fetchval("SELECT jobs_failed FROM audit_pipelines")
    assert (failures, jobs_failed) == (0, 0)


async def test_an_exception_that_is_no_cancellation_stays_a_failure(
    client: Client, store: EventStore
) -> None:
    message = external(EXTERNAL / "taskcluster" / "task-exception.superseded.json")
    message["status"]["runs"][0]["reasonResolved"] = "worker-shutdown"
    await _post_task(client, message)
    [job] = [e.data async for e in store.read_all()]
    assert isinstance(job, JobFinished) and job.status == "failed"


@pytest.mark.parametrize(
    ("project_id", "scheduler_id", "expected"),
    [
        ("none", "-", "none"),  # both Taskcluster defaults: the fixture as it is
        (None, "-", "none"),
        (None, None, "none"),
        ("none", "gecko-level-3", "gecko-level-3"),
        (None, "gecko-level-3", "gecko-level-3"),
        ("proj-ciretry", "-", "proj-ciretry"),
        ("proj-ciretry", "gecko-level-3", "proj-ciretry"),
    ],
)
async def test_taskcluster_project_rule(
    client: Client,
    store: EventStore,
    project_id: str | None,
    scheduler_id: str | None,
    expected: str,
) -> None:
    message = external(EXTERNAL / "taskcluster" / "task-exception.default-ids.json")
    for key, value in (("projectId", project_id), ("schedulerId", scheduler_id)):
        if value is None:
            message["status"].pop(key)
        else:
            message["status"][key] = value
    await _post_task(client, message)
    [event] = [e async for e in store.read_all()]
    assert isinstance(event.data, JobFinished)
    assert event.data.project == expected
    assert event.stream == f"pipeline-taskcluster-{expected}-{message['status']['taskGroupId']}"
    # No run: the deadline passed before one started.
    assert event.data.failure_reason == "taskcluster:deadline-exceeded"
