"""What ingest reads for attempt chains and opt-out: a pipeline's link to the request that
created it (its variables), merge request / pull request labels, and the size a pod died at."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ciretry.common.events import (
    MergeRequestUpdated,
    PipelineFinished,
    PipelineLinked,
    PodTerminated,
    Resources,
)
from ciretry.ingest import github, gitlab, kubernetes
from ciretry.ingest.fields import Accepted, Ignored, InvalidPayload

from .helpers import GITLAB, load, pod

REVIEWS = Path(__file__).resolve().parents[1] / "fixtures" / "reviews"
KEY = "act:gitlab:1:378:rerun_with_resources"


def pipeline_hook(status: str, variables: list[dict[str, str]]) -> dict[str, Any]:
    hook = copy.deepcopy(load(GITLAB / "gitlab-docs__pipeline_hook_example.json"))
    hook["object_attributes"]["status"] = status
    hook["object_attributes"]["variables"] = variables
    return hook


RERUN_VARIABLES = [
    {"key": "CIRETRY_RETRY_OF", "value": KEY},
    {"key": "KUBERNETES_MEMORY_LIMIT", "value": "8Gi"},
    {"key": "KUBERNETES_MEMORY_REQUEST", "value": "8192Mi"},
]


@pytest.mark.parametrize("status", ["created", "pending", "running"])
def test_a_starting_pipeline_act_created_is_linked(status: str) -> None:
    result = gitlab.normalize({"X-Gitlab-Event": "Pipeline Hook"}, pipeline_hook(status, RERUN_VARIABLES))
    assert isinstance(result, Accepted)
    (new,) = result.events
    link = new.data
    assert isinstance(link, PipelineLinked)
    assert (link.project, link.pipeline_id, link.retry_of) == ("1", "31", KEY)
    assert link.resources == Resources(memory_limit_mb=8192, memory_request_mb=8192)
    assert new.stream == "pipeline-gitlab-1-31"
    assert new.metadata.idempotency_key == "link:gitlab:1:31"


def test_a_finished_pipeline_act_created_is_linked_before_its_jobs() -> None:
    result = gitlab.normalize({}, pipeline_hook("failed", RERUN_VARIABLES))
    assert isinstance(result, Accepted)
    kinds = [type(e.data) for e in result.events]
    assert kinds[:2] == [PipelineLinked, PipelineFinished]
    # Every hook of the pipeline gives the same link: stored once.
    again = gitlab.normalize({}, pipeline_hook("running", RERUN_VARIABLES))
    assert isinstance(again, Accepted)
    assert again.events[0].metadata.idempotency_key == result.events[0].metadata.idempotency_key


def test_pipelines_nobody_linked() -> None:
    plain = [{"key": "NESTOR_PROD_ENVIRONMENT", "value": "us-west-1"}]
    assert isinstance(gitlab.normalize({}, pipeline_hook("running", plain)), Ignored)
    finished = gitlab.normalize({}, pipeline_hook("failed", plain))
    assert isinstance(finished, Accepted)
    assert not any(isinstance(e.data, PipelineLinked) for e in finished.events)


def test_a_malformed_link_names_its_field() -> None:
    bad = [{"key": "CIRETRY_RETRY_OF", "value": "x\x00y"}]
    with pytest.raises(InvalidPayload) as exc:
        gitlab.normalize({}, pipeline_hook("running", bad))
    assert "CIRETRY_RETRY_OF" in exc.value.field


def test_gitlab_merge_request_hook_gives_its_labels() -> None:
    body = json.loads((REVIEWS / "go-playground__gitlab-merge-request-event.json").read_text())
    result = gitlab.normalize({"X-Gitlab-Event": "Merge Request Hook"}, body)
    assert isinstance(result, Accepted)
    (new,) = result.events
    mr = new.data
    assert isinstance(mr, MergeRequestUpdated)
    assert (mr.project, mr.number, mr.source_branch, mr.state) == ("1", "1", "ms-viewport", "opened")
    assert mr.labels == ("API",) and mr.target_branch == "master"
    assert mr.sha == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    assert new.stream == "review-gitlab-1-ms-viewport"
    # A label change is a new fact; the same delivery again is not.
    relabeled = copy.deepcopy(body)
    relabeled["labels"] = [{"title": "no-retry"}]
    other = gitlab.normalize({}, relabeled)
    same = gitlab.normalize({}, body)
    assert isinstance(other, Accepted) and isinstance(same, Accepted)
    assert other.events[0].metadata.idempotency_key != new.metadata.idempotency_key
    assert same.events[0].metadata.idempotency_key == new.metadata.idempotency_key


@pytest.mark.parametrize(
    ("name", "state", "labels"),
    [
        ("octokit__pull_request.labeled.payload.json", "open", ("bug",)),
        ("octokit__pull_request.closed.payload.json", "closed", ("bug",)),
    ],
)
def test_github_pull_request_gives_its_labels(name: str, state: str, labels: tuple[str, ...]) -> None:
    body = json.loads((REVIEWS / name).read_text())
    result = github.normalize({"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": "d-1"}, body)
    assert isinstance(result, Accepted)
    (new,) = result.events
    pr = new.data
    assert isinstance(pr, MergeRequestUpdated)
    assert (pr.project, pr.number, pr.source_branch) == ("Codertocat/Hello-World", "2", "changes")
    assert (pr.state, pr.labels) == (state, labels)
    assert new.stream == "review-github-Codertocat/Hello-World-changes"


def sized_pod(**kw: Any) -> dict[str, Any]:
    body = pod(**kw)
    body["spec"] = {
        "initContainers": [
            {"name": "init-permissions", "resources": {"limits": {"memory": "64Mi"}}},
        ],
        "containers": [
            {"name": "build", "resources": {"requests": {"memory": "16Gi", "cpu": "1"},
                                            "limits": {"memory": "32Gi", "cpu": "4"}}},
            {"name": "helper"},
        ],
        "resources": {"limits": {"memory": "1Gi"}},  # pod-level: what a bare container gets
    }  # fmt: skip
    return body


def event(body: dict[str, Any]) -> PodTerminated:
    result = kubernetes.normalize(body)
    assert isinstance(result, Accepted)
    (new,) = result.events
    assert isinstance(new.data, PodTerminated)
    return new.data


def test_the_size_the_build_container_died_at() -> None:
    ev = event(sized_pod())
    assert ev.container == "build" and ev.container_reason == "OOMKilled"
    assert ev.resources == Resources(
        memory_request_mb=16384, memory_limit_mb=32768, cpu_request_millis=1000, cpu_limit_millis=4000
    )
    assert [(c.name, c.init, c.reason) for c in ev.containers] == [("build", False, "OOMKilled")]


def test_an_init_container_killed_before_the_build_started() -> None:
    body = sized_pod(terminated=False)
    body["status"]["phase"] = "Failed"
    body["status"]["initContainerStatuses"] = [
        {"name": "init-permissions", "state": {"terminated": {
            "reason": "OOMKilled", "exitCode": 137, "finishedAt": "2024-05-01T10:02:00Z"}}},
    ]  # fmt: skip
    ev = event(body)
    assert (ev.container, ev.container_init, ev.container_reason, ev.exit_code) == (
        "init-permissions", True, "OOMKilled", 137
    )
    assert ev.resources == Resources(memory_limit_mb=64)


def test_a_container_without_its_own_size_gets_the_pods() -> None:
    body = sized_pod(container="helper")
    ev = event(body)
    assert ev.container == "helper" and ev.resources == Resources(memory_limit_mb=1024)
