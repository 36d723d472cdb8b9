import copy
import datetime as dt
from typing import Any

import pytest

from ciretry.common.events import JobFinished, PipelineFinished
from ciretry.ingest import gitlab
from ciretry.ingest.fields import Accepted, Ignored, InvalidPayload

from .helpers import GITLAB, failed_job_hook, gitlab_fixtures, load

HEADERS = {"X-Gitlab-Event": "Job Hook", "X-Gitlab-Event-UUID": "0a6c1f1c-4d1c-4a1b-9a5e-1"}

# Every GitLab fixture and what ingest must make of it.
EXPECTED: dict[str, tuple[str, Any]] = {
    "gitlab-docs__job_hook_example.jsonc": ("ignored", "'created' is not terminal"),
    "gitlab-docs__pipeline_hook_example.json": ("accepted", 4),
    "gitlab4j__build-event.json": ("ignored", "'running' is not terminal"),
    "gitlab4j__job-event.json": ("invalid", "object_kind"),
    "gitlab4j__pipeline-event.json": ("accepted", 4),
    "go-gitlab__build.json": ("ignored", "'created' is not terminal"),
    "go-gitlab__job.json": ("accepted", 1),
    "go-gitlab__pipeline.json": ("accepted", 4),
    "jenkins-gitlab-plugin__PipelineEvent.json": ("accepted", 4),
    "jenkins-gitlab-plugin__PipelineFailureEvent.json": ("ignored", "unknown pipeline status"),
}


def test_every_fixture_has_an_expectation() -> None:
    assert {p.name for p in gitlab_fixtures()} == set(EXPECTED)


@pytest.mark.parametrize("path", gitlab_fixtures(), ids=lambda p: p.name)
def test_fixture_outcome(path: Any) -> None:
    kind, detail = EXPECTED[path.name]
    body = load(path)
    if kind == "invalid":
        with pytest.raises(InvalidPayload) as exc:
            gitlab.normalize(HEADERS, body)
        assert exc.value.field == detail
        return
    result = gitlab.normalize(HEADERS, body)
    if kind == "ignored":
        assert isinstance(result, Ignored)
        assert detail in result.reason
    else:
        assert isinstance(result, Accepted)
        assert len(result.events) == detail
        for e in result.events:
            assert e.metadata.idempotency_key
            assert e.metadata.source_delivery_id == HEADERS["X-Gitlab-Event-UUID"]


def test_captured_job_hook_fields() -> None:
    result = gitlab.normalize(HEADERS, load(GITLAB / "go-gitlab__job.json"))
    assert isinstance(result, Accepted)
    (new,) = result.events
    job = new.data
    assert isinstance(job, JobFinished)
    assert new.stream == "pipeline-gitlab-31537070-743121198"
    assert (job.source, job.project, job.pipeline_id, job.job_id) == (
        "gitlab",
        "31537070",
        "743121198",
        "3580121225",
    )
    assert (job.job_name, job.stage, job.status) == (
        "auto_deploy:start",
        "coordinated:tag",
        "success",
    )
    # GitLab sends unknown_failure on successful jobs: no failure reason is recorded.
    assert job.failure_reason is None and job.provider_failure_reason is None
    assert job.exit_code is None  # the job hook has none
    assert job.attempt is None  # retries_count is unreliable
    assert job.runner == "4-blue.shared.runners-manager.gitlab.com/default"
    assert job.runner_tags == ("linux", "docker")
    assert job.ref == "main" and job.sha == "95d49d1efbd941908580e79d65e4b5ecaf4a8305"
    assert job.user == "jsmithy2"
    assert job.started_at == dt.datetime(2023, 1, 10, 13, 50, 5, tzinfo=dt.UTC)
    assert job.finished_at == dt.datetime(2023, 1, 10, 13, 50, 54, tzinfo=dt.UTC)
    assert job.log is not None and job.log.kind == "gitlab" and job.log.job_id == "3580121225"
    assert new.metadata.idempotency_key == "gitlab:job:31537070:3580121225:success"


def test_pipeline_hook_yields_pipeline_and_terminal_jobs() -> None:
    result = gitlab.normalize(HEADERS, load(GITLAB / "gitlab-docs__pipeline_hook_example.json"))
    assert isinstance(result, Accepted)
    first, *jobs = result.events
    pipe = first.data
    assert isinstance(pipe, PipelineFinished)
    assert (pipe.project, pipe.pipeline_id, pipe.status) == ("1", "31", "success")
    assert [(r.job_id, r.status) for r in pipe.jobs] == [
        ("380", "skipped"),
        ("377", "success"),
        ("378", "failed"),
        ("376", "success"),
        ("379", "created"),
    ]
    assert pipe.jobs[2].failure_reason == "script_failure"
    assert pipe.user == "root" and pipe.sha == "bcbb5ec396a2c0f828686f14fac9b80b780504f2"
    assert {e.stream for e in result.events} == {"pipeline-gitlab-1-31"}
    by_id = {e.data.job_id: e for e in jobs if isinstance(e.data, JobFinished)}
    assert set(by_id) == {"377", "378", "376"}  # skipped/created jobs are not terminal
    failed = by_id["378"].data
    assert isinstance(failed, JobFinished)
    assert failed.failure_reason == failed.provider_failure_reason == "script_failure"
    assert failed.runner == "shared-runners-manager-6.gitlab.com"
    assert failed.log is not None and failed.log.url == (
        "http://192.168.64.1:3005/gitlab-org/gitlab-test/-/jobs/378"
    )


def test_job_hook_and_pipeline_hook_share_the_job_key() -> None:
    pipeline = gitlab.normalize(HEADERS, load(GITLAB / "gitlab-docs__pipeline_hook_example.json"))
    job = gitlab.normalize({"X-Gitlab-Event-UUID": "other"}, failed_job_hook(378))
    assert isinstance(pipeline, Accepted) and isinstance(job, Accepted)
    keys = {e.metadata.idempotency_key for e in pipeline.events}
    assert job.events[0].metadata.idempotency_key == "gitlab:job:1:378:failed"
    assert job.events[0].metadata.idempotency_key in keys
    assert job.events[0].stream == pipeline.events[0].stream


def test_pipeline_key_changes_when_the_pipeline_finishes_again() -> None:
    body = load(GITLAB / "go-gitlab__pipeline.json")
    again = copy.deepcopy(body)
    again["object_attributes"]["finished_at"] = "2016-08-12 16:00:00 UTC"
    a, b = gitlab.normalize({}, body), gitlab.normalize({}, again)
    assert isinstance(a, Accepted) and isinstance(b, Accepted)
    assert a.events[0].metadata.idempotency_key != b.events[0].metadata.idempotency_key


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("server_timeout_running", "job_execution_timeout"),
        ("job_execution_timeout", "job_execution_timeout"),
        ("no_updates_running", "stuck_or_timeout_failure"),
        ("runner_system_failure", "runner_system_failure"),
    ],
)
def test_failed_job_reason_is_canonical(raw: str, canonical: str) -> None:
    result = gitlab.normalize({}, failed_job_hook(reason=raw))
    assert isinstance(result, Accepted)
    job = result.events[0].data
    assert isinstance(job, JobFinished)
    assert (job.status, job.provider_failure_reason, job.failure_reason) == (
        "failed",
        raw,
        canonical,
    )
    assert result.notes == ()


def test_unknown_failure_reason_is_surfaced() -> None:
    result = gitlab.normalize({}, failed_job_hook(reason="quantum_flake"))
    assert isinstance(result, Accepted)
    job = result.events[0].data
    assert isinstance(job, JobFinished)
    assert job.failure_reason == "unknown:quantum_flake"
    assert any("quantum_flake" in n for n in result.notes)


def test_commit_id_is_the_pipeline_id_when_pipeline_id_is_missing() -> None:
    hook = failed_job_hook()
    del hook["pipeline_id"]
    hook["commit"]["id"] = 4242
    result = gitlab.normalize({}, hook)
    assert isinstance(result, Accepted)
    assert result.events[0].data.pipeline_id == "4242"  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", ["canceled", "failed", "success"])
def test_terminal_statuses_are_accepted(status: str) -> None:
    hook = failed_job_hook()
    hook["build_status"] = status
    assert isinstance(gitlab.normalize({}, hook), Accepted)


@pytest.mark.parametrize("status", ["pending", "running", "skipped", "manual", "canceling", "new?"])
def test_other_statuses_are_ignored(status: str) -> None:
    hook = failed_job_hook()
    hook["build_status"] = status
    assert isinstance(gitlab.normalize({}, hook), Ignored)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda h: h.pop("build_id"), "build_id"),
        (lambda h: h.update(build_id=True), "build_id"),
        (lambda h: h.update(build_id="a\x00b"), "build_id"),
        (lambda h: h.update(build_name=7), "build_name"),
        (lambda h: h.pop("build_status"), "build_status"),
        (lambda h: h.update(build_finished_at="yesterday"), "build_finished_at"),
        (lambda h: h.update(runner=[]), "runner"),
        (lambda h: h.update(runner={"tags": [1]}), "runner.tags[0]"),
        (lambda h: (h.pop("project_id"), h.pop("project", None)), "project_id"),
    ],
)
def test_malformed_job_hook_names_the_field(mutate: Any, field: str) -> None:
    hook = failed_job_hook()
    mutate(hook)
    with pytest.raises(InvalidPayload) as exc:
        gitlab.normalize({}, hook)
    assert exc.value.field == field


def test_malformed_pipeline_build_names_its_index() -> None:
    body = load(GITLAB / "gitlab-docs__pipeline_hook_example.json")
    body["builds"][2]["id"] = {"x": 1}
    with pytest.raises(InvalidPayload) as exc:
        gitlab.normalize({}, body)
    assert exc.value.field == "builds[2].id"


def test_other_kinds_are_ignored_and_unknown_kinds_rejected() -> None:
    assert isinstance(gitlab.normalize({}, {"object_kind": "push"}), Ignored)
    assert isinstance(gitlab.normalize({"X-Gitlab-Event": "Push Hook"}, {}), Ignored)
    for body, field in (([], "$"), ({}, "object_kind"), ({"object_kind": 3}, "object_kind")):
        with pytest.raises(InvalidPayload) as exc:
            gitlab.normalize({"X-Gitlab-Event": "Job Hook"}, body)
        assert exc.value.field == field


def test_jobs_api_entry_has_the_webhook_key() -> None:
    api_job = {
        "id": 378,
        "status": "failed",
        "stage": "test",
        "name": "test-build",
        "ref": "master",
        "created_at": "2016-08-12T15:23:28.000Z",
        "started_at": "2016-08-12T15:26:12.000Z",
        "finished_at": "2016-08-12T15:26:29.000Z",
        "allow_failure": False,
        "failure_reason": "server_timeout_running",
        "tag_list": ["docker"],
        "user": {"username": "root"},
        "commit": {"id": "bcbb5ec396a2c0f828686f14fac9b80b780504f2", "message": "test\n"},
        "pipeline": {"id": 31, "project_id": 1, "status": "failed"},
        "runner": {"id": 380987, "description": "shared-runners-manager-6.gitlab.com"},
        "web_url": "http://example.com/gitlab-org/gitlab-test/-/jobs/378",
    }
    new = gitlab.job_from_api(api_job)
    assert new is not None and new.metadata.idempotency_key == "gitlab:job:1:378:failed"
    job = new.data
    assert isinstance(job, JobFinished)
    assert job.failure_reason == "job_execution_timeout" and job.runner_tags == ("docker",)
    assert gitlab.job_from_api({**api_job, "status": "running"}) is None
