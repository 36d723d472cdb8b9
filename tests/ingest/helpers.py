"""Fixture loading and payload builders shared by the ingest tests."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
GITLAB = FIXTURES / "gitlab_webhooks"
GITHUB = FIXTURES / "github_workflow_job"
TASKCLUSTER = FIXTURES / "taskcluster"


def load(path: Path) -> Any:
    """JSON fixture; the GitLab doc example is JSONC (``//`` comments, trailing comma), which
    GitLab itself never sends, so it is made strict here rather than accepted by ingest."""
    text = path.read_text()
    if path.suffix == ".jsonc":
        text = re.sub(r"\s//[^\n\"]*$", "", text, flags=re.M)
        text = re.sub(r",(\s*[}\]])", r"\1", text)
    return json.loads(text)


def gitlab_fixtures() -> list[Path]:
    return sorted(GITLAB.iterdir())


def github_fixtures() -> list[Path]:
    return sorted(p for p in GITHUB.glob("*.json"))


def github_event(path: Path) -> str:
    return path.name.split("__", 1)[0]


def pulse_messages() -> dict[str, Any]:
    data: dict[str, Any] = load(
        TASKCLUSTER / "real_messages" / "treeherder__taskcluster_pulse_messages.json"
    )
    return data


def failed_job_hook(job_id: int = 378, reason: str = "script_failure") -> dict[str, Any]:
    """The go-gitlab captured job hook, turned into a failed job of the doc pipeline."""
    hook: dict[str, Any] = copy.deepcopy(load(GITLAB / "go-gitlab__job.json"))
    hook.update(
        build_id=job_id,
        build_status="failed",
        build_failure_reason=reason,
        project_id=1,
        pipeline_id=31,
        build_name="test-build",
    )
    return hook


TASK_ID = "fJYNJvrqTzu9XKcVvGZc8w"
GROUP_ID = "Q0g0nH6hQpSxg2FT6RY0sA"


def task_message(
    *, state: str = "exception", reason: str | None = "worker-shutdown", run_id: int | None = 0
) -> dict[str, Any]:
    """A queue message shaped by the rendered task-exception/-failed schemas."""
    run: dict[str, Any] = {
        "runId": 0,
        "state": state,
        "reasonCreated": "scheduled",
        "scheduled": "2024-05-01T10:00:00.000Z",
        "started": "2024-05-01T10:01:00.000Z",
        "resolved": "2024-05-01T10:31:00.000Z",
        "workerGroup": "us-east-1",
        "workerId": "i-0123456789",
    }
    if reason is not None:
        run["reasonResolved"] = reason
    message: dict[str, Any] = {
        "version": 1,
        "status": {
            "taskId": TASK_ID,
            "provisionerId": "proj-ciretry",
            "workerType": "linux-large",
            "taskQueueId": "proj-ciretry/linux-large",
            "schedulerId": "taskcluster-github",
            "projectId": "ciretry",
            "taskGroupId": GROUP_ID,
            "deadline": "2024-05-02T10:00:00.000Z",
            "expires": "2025-05-01T10:00:00.000Z",
            "retriesLeft": 4,
            "state": state,
            "runs": [run] if run_id is not None else [],
        },
        "task": {"tags": {"kind": "test", "label": "test-linux64/opt-xpcshell-1"}},
    }
    if run_id is not None:
        message["runId"] = run_id
        message["workerGroup"] = "us-east-1"
        message["workerId"] = "i-0123456789"
    return message


def pod(
    *,
    reason: str = "OOMKilled",
    exit_code: int = 137,
    container: str = "build",
    pod_reason: str | None = None,
    disruption: str | None = None,
    phase: str = "Failed",
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    terminated: bool = True,
) -> dict[str, Any]:
    """A gitlab-runner job pod as the Kubernetes API returns it."""
    state: dict[str, Any] = (
        {
            "terminated": {
                "reason": reason,
                "exitCode": exit_code,
                "startedAt": "2024-05-01T10:01:00Z",
                "finishedAt": "2024-05-01T10:09:30Z",
                "containerID": "containerd://abc",
            }
        }
        if terminated
        else {"running": {"startedAt": "2024-05-01T10:01:00Z"}}
    )
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [
            {"name": "helper", "state": {"running": {"startedAt": "2024-05-01T10:01:00Z"}}},
            {"name": container, "state": state, "lastState": {}, "restartCount": 0},
        ],
    }
    if pod_reason:
        status["reason"] = pod_reason
    if disruption:
        status["conditions"].append(
            {"type": "DisruptionTarget", "status": "True", "reason": disruption}
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "runner-abc-project-1-concurrent-0-xyz",
            "namespace": "ci",
            "uid": "7d0c2b0e-4b43-4a57-9f0e-2f1e5f3c9a11",
            "labels": labels
            if labels is not None
            else {"project.runner.gitlab.com/id": "1", "pod": "runner-abc"},
            "annotations": annotations
            if annotations is not None
            else {
                "job.runner.gitlab.com/id": "378",
                "project.runner.gitlab.com/id": "1",
                "job.runner.gitlab.com/name": "test-build",
            },
        },
        "status": status,
    }
