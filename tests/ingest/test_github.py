import copy
from pathlib import Path
from typing import Any

import pytest

from ciretry.common.events import JobFinished, PipelineFinished
from ciretry.ingest import github
from ciretry.ingest.fields import Accepted, Ignored, InvalidPayload

from .helpers import GITHUB, github_event, github_fixtures, load

EXPECTED: dict[str, tuple[str, str]] = {
    "workflow_job__completed.failure.with-organization.payload.json": ("accepted", "failed"),
    "workflow_job__completed.success.with-organization.payload.json": ("accepted", "success"),
    "workflow_job__in_progress.payload.json": ("ignored", "in_progress"),
    "workflow_job__in_progress.with-queued-steps.payload.json": ("ignored", "in_progress"),
    "workflow_job__queued.payload.json": ("ignored", "queued"),
    "workflow_job__queued.with-deployment.payload.json": ("ignored", "queued"),
    "workflow_job__waiting.payload.json": ("ignored", "waiting"),
    "workflow_run__completed.payload.json": ("accepted", "success"),
    "workflow_run__completed.with-pull-requests.payload.json": ("accepted", "success"),
    "workflow_run__requested.payload.json": ("ignored", "requested"),
    "workflow_run__requested.with-conclusion.payload.json": ("ignored", "requested"),
}
FAILURE = GITHUB / "workflow_job__completed.failure.with-organization.payload.json"


def headers(event: str) -> dict[str, str]:
    return {"X-GitHub-Event": event, "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}


def test_every_fixture_has_an_expectation() -> None:
    assert {p.name for p in github_fixtures()} == set(EXPECTED)


@pytest.mark.parametrize("path", github_fixtures(), ids=lambda p: p.name)
def test_fixture_outcome(path: Path) -> None:
    kind, detail = EXPECTED[path.name]
    result = github.normalize(headers(github_event(path)), load(path))
    if kind == "ignored":
        assert isinstance(result, Ignored) and detail in result.reason
    else:
        assert isinstance(result, Accepted)
        (new,) = result.events
        assert new.data.status == detail  # type: ignore[attr-defined]
        assert new.metadata.source_delivery_id == "72d3162e-cc78-11e3-81ab-4c9367dc0958"


def test_failed_job_fields() -> None:
    result = github.normalize(headers("workflow_job"), load(FAILURE))
    assert isinstance(result, Accepted)
    (new,) = result.events
    job = new.data
    assert isinstance(job, JobFinished)
    assert new.stream == "pipeline-github-Codertocat/Hello-World-2202229078"
    assert (job.project, job.pipeline_id, job.job_id, job.job_name) == (
        "Codertocat/Hello-World",
        "2202229078",
        "289782451",
        "linters",
    )
    assert (job.status, job.attempt, job.stage) == ("failed", 1, "CodeQL")
    assert job.provider_failure_reason == "failure" and job.failure_reason is None
    assert job.runner == "GitHub Actions 5" and job.runner_tags == ("ubuntu-latest",) and job.labels == ()
    assert job.log is not None and job.log.run_id == 2202229078
    assert new.metadata.idempotency_key == "github:job:Codertocat/Hello-World:289782451:failure"


def test_run_attempt_is_kept_and_timed_out_is_canonical() -> None:
    body: dict[str, Any] = copy.deepcopy(load(FAILURE))
    body["workflow_job"].update(run_attempt=3, conclusion="timed_out")
    result = github.normalize(headers("workflow_job"), body)
    assert isinstance(result, Accepted)
    job = result.events[0].data
    assert isinstance(job, JobFinished)
    assert job.attempt == 3
    assert (job.status, job.failure_reason) == ("failed", "job_execution_timeout")


def test_cancelled_and_skipped() -> None:
    body: dict[str, Any] = copy.deepcopy(load(FAILURE))
    body["workflow_job"]["conclusion"] = "cancelled"
    result = github.normalize(headers("workflow_job"), body)
    assert isinstance(result, Accepted) and result.events[0].data.status == "canceled"  # type: ignore[attr-defined]
    body["workflow_job"]["conclusion"] = "skipped"
    assert isinstance(github.normalize(headers("workflow_job"), body), Ignored)


def test_workflow_run_is_a_pipeline() -> None:
    result = github.normalize(
        headers("workflow_run"), load(GITHUB / "workflow_run__completed.payload.json")
    )
    assert isinstance(result, Accepted)
    run = result.events[0].data
    assert isinstance(run, PipelineFinished)
    assert (run.project, run.pipeline_id, run.status) == (
        "octo-org/octo-repo",
        "289782451",
        "success",
    )


def test_other_events_ignored_and_missing_header_rejected() -> None:
    assert isinstance(github.normalize(headers("ping"), {"zen": "x"}), Ignored)
    with pytest.raises(InvalidPayload) as exc:
        github.normalize({}, load(FAILURE))
    assert exc.value.field == "X-GitHub-Event"
    body = copy.deepcopy(load(FAILURE))
    del body["workflow_job"]["run_id"]
    with pytest.raises(InvalidPayload) as exc:
        github.normalize(headers("workflow_job"), body)
    assert exc.value.field == "workflow_job.run_id"
