"""Provider ids are checked against what each provider defines (issue 14, item 10): GitLab's
build_id "abc" used to be stored and then counted in the stats; now it is a 400 naming the
field, and nothing is stored."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ciretry.common.eventstore import EventStore
from ciretry.ingest import github, gitlab, kubernetes, taskcluster
from ciretry.ingest.fields import Accepted, InvalidPayload
from tests.ingest.conftest import encode, gitlab_headers
from tests.ingest.helpers import GITHUB, failed_job_hook, load, pod, task_message

Client = TestClient[Any, Any]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"build_id": "abc"}, "build_id"),
        ({"build_id": "12a"}, "build_id"),
        ({"build_id": "١٢"}, "build_id"),  # Arabic-Indic digits: str.isdigit() says yes
        ({"project_id": "group/project"}, "project_id"),
        ({"pipeline_id": "main"}, "pipeline_id"),
    ],
)
def test_gitlab_ids_are_numbers(change: dict[str, Any], field: str) -> None:
    hook = {**failed_job_hook(), **change}
    with pytest.raises(InvalidPayload) as err:
        gitlab.normalize({"X-Gitlab-Event": "Job Hook"}, hook)
    assert err.value.field == field
    assert "numeric id" in err.value.message


def test_gitlab_ids_given_as_digit_strings_are_the_same_ids() -> None:
    as_numbers = gitlab.normalize({}, failed_job_hook(job_id=378))
    as_strings = gitlab.normalize({}, {**failed_job_hook(), "build_id": "378", "project_id": "1"})
    assert isinstance(as_numbers, Accepted) and isinstance(as_strings, Accepted)
    assert as_numbers.events[0].stream == as_strings.events[0].stream
    assert as_numbers.events[0].data == as_strings.events[0].data


def test_gitlab_pipeline_hook_build_ids_are_numbers() -> None:
    hook = {
        "object_kind": "pipeline",
        "object_attributes": {"id": 31, "status": "failed", "ref": "main"},
        "project": {"id": 1},
        "builds": [{"id": "first", "name": "build", "status": "failed"}],
    }
    with pytest.raises(InvalidPayload) as err:
        gitlab.normalize({}, hook)
    assert err.value.field == "builds[0].id"


def _workflow_job() -> dict[str, Any]:
    path = GITHUB / "workflow_job__completed.failure.with-organization.payload.json"
    body: dict[str, Any] = copy.deepcopy(load(path))
    return body


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda b: b["workflow_job"].update(id="job-1"), "workflow_job.id"),
        (lambda b: b["workflow_job"].update(run_id="run"), "workflow_job.run_id"),
        (lambda b: b["repository"].update(full_name="no-owner"), "repository.full_name"),
        (lambda b: b["repository"].update(full_name="a/b/c"), "repository.full_name"),
    ],
)
def test_github_ids(edit: Any, field: str) -> None:
    body = _workflow_job()
    assert isinstance(github.normalize({"X-GitHub-Event": "workflow_job"}, body), Accepted)
    edit(body)
    with pytest.raises(InvalidPayload) as err:
        github.normalize({"X-GitHub-Event": "workflow_job"}, body)
    assert err.value.field == field


@pytest.mark.parametrize("key", ["taskId", "taskGroupId"])
@pytest.mark.parametrize("value", ["task-1", "fJYNJvrqTzu9XKcVvGZc8", "fJYNJvrqTzu9XKcVvGZc8w!"])
def test_taskcluster_ids_are_slugids(key: str, value: str) -> None:
    message = task_message()
    message["status"][key] = value
    with pytest.raises(InvalidPayload) as err:
        taskcluster.normalize("exchange/taskcluster-queue/v1/task-exception", message)
    assert err.value.field == f"status.{key}"


def test_kubernetes_pod_of_a_gitlab_job_needs_a_numeric_job_id() -> None:
    ok = pod(annotations={"job.runner.gitlab.com/id": "378", "project.runner.gitlab.com/id": "1"})
    assert isinstance(kubernetes.normalize(ok), Accepted)
    bad = pod(annotations={"job.runner.gitlab.com/id": "abc", "project.runner.gitlab.com/id": "1"})
    with pytest.raises(InvalidPayload) as err:
        kubernetes.normalize(bad)
    assert "job.runner.gitlab.com/id" in err.value.field


async def test_a_bad_gitlab_id_is_a_400_and_nothing_is_stored(
    client: Client, store: EventStore
) -> None:
    hook = {**failed_job_hook(), "build_id": "abc"}
    resp = await client.post("/webhooks/gitlab", data=encode(hook), headers=gitlab_headers())
    assert resp.status == 400
    body = await resp.json()
    assert body["field"] == "build_id" and "numeric id" in body["message"]
    assert [e async for e in store.read_all()] == []
