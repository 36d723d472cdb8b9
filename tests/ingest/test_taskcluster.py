import json
from typing import Any

import pytest

from ciretry.common.events import JobFinished
from ciretry.ingest import taskcluster
from ciretry.ingest.fields import Accepted, Ignored, InvalidPayload

from .helpers import GROUP_ID, TASK_ID, TASKCLUSTER, load, pulse_messages, task_message

EXCEPTION = "exchange/taskcluster-queue/v1/task-exception"
FAILED = "exchange/taskcluster-queue/v1/task-failed"


@pytest.mark.parametrize("task_id", sorted(pulse_messages()))
def test_every_real_message(task_id: str) -> None:
    envelope = pulse_messages()[task_id]
    result = taskcluster.normalize_http({}, envelope)
    if envelope["exchange"].endswith("task-completed"):
        assert isinstance(result, Accepted)
        (new,) = result.events
        job = new.data
        assert isinstance(job, JobFinished)
        status = envelope["payload"]["status"]
        assert (job.job_id, job.pipeline_id, job.status) == (
            task_id,
            status["taskGroupId"],
            "success",
        )
        assert job.project == status["schedulerId"]  # 2019 messages have no projectId
        assert job.attempt == envelope["payload"]["runId"] + 1
        assert job.failure_reason is None
        assert job.log is not None and job.log.run_id == envelope["payload"]["runId"]
        assert new.metadata.idempotency_key == (
            f"taskcluster:{task_id}:{envelope['payload']['runId']}:{envelope['exchange']}"
        )
    else:
        assert isinstance(result, Ignored)
        assert "not terminal" in result.reason


def test_worker_shutdown_exception() -> None:
    result = taskcluster.normalize(EXCEPTION, task_message(), root_url="https://tc.example.com")
    assert isinstance(result, Accepted)
    (new,) = result.events
    job = new.data
    assert isinstance(job, JobFinished)
    assert new.stream == f"pipeline-taskcluster-ciretry-{GROUP_ID}"
    assert (job.status, job.failure_reason, job.provider_failure_reason) == (
        "failed",
        "taskcluster:worker-shutdown",
        "worker-shutdown",
    )
    assert (job.job_name, job.stage, job.attempt) == ("test-linux64/opt-xpcshell-1", "test", 1)
    assert job.runner == "us-east-1/i-0123456789" and job.runner_tags == ("proj-ciretry/linux-large",)
    assert job.log is not None and job.log.url == (
        f"https://tc.example.com/api/queue/v1/task/{TASK_ID}/runs/0/artifacts/public/logs/live_backing.log"
    )
    assert new.metadata.idempotency_key == f"taskcluster:{TASK_ID}:0:{EXCEPTION}"


def test_failed_and_canceled() -> None:
    failed = taskcluster.normalize(FAILED, task_message(state="failed", reason="failed"))
    assert isinstance(failed, Accepted)
    assert failed.events[0].data.failure_reason == "taskcluster:failed"  # type: ignore[attr-defined]
    canceled = taskcluster.normalize(EXCEPTION, task_message(reason="canceled"))
    assert isinstance(canceled, Accepted)
    assert canceled.events[0].data.status == "canceled"  # type: ignore[attr-defined]


def test_exception_before_any_run_is_deadline_exceeded() -> None:
    result = taskcluster.normalize(EXCEPTION, task_message(run_id=None))
    assert isinstance(result, Accepted)
    job = result.events[0].data
    assert isinstance(job, JobFinished)
    assert job.failure_reason == "taskcluster:deadline-exceeded" and job.attempt is None
    assert result.events[0].metadata.idempotency_key == f"taskcluster:{TASK_ID}:-:{EXCEPTION}"


def test_unknown_reason_is_surfaced() -> None:
    result = taskcluster.normalize(EXCEPTION, task_message(reason="solar-flare"))
    assert isinstance(result, Accepted)
    assert result.events[0].data.failure_reason == "unknown:taskcluster:solar-flare"  # type: ignore[attr-defined]
    assert result.notes


def test_same_message_on_two_exchanges_has_two_keys() -> None:
    a = taskcluster.normalize(EXCEPTION, task_message())
    b = taskcluster.normalize(FAILED, task_message())
    assert isinstance(a, Accepted) and isinstance(b, Accepted)
    assert a.events[0].metadata.idempotency_key != b.events[0].metadata.idempotency_key


def test_every_queue_exchange_is_classified() -> None:
    ref = json.loads((TASKCLUSTER / "rendered" / "queue-exchanges-reference.json").read_text())
    names = {e["exchange"] for e in ref["entries"]}
    assert names == taskcluster.TERMINAL_EXCHANGES | taskcluster.OTHER_EXCHANGES


def test_http_forms() -> None:
    bare = taskcluster.normalize_http({"X-Taskcluster-Exchange": EXCEPTION}, task_message())
    assert isinstance(bare, Accepted)
    with pytest.raises(InvalidPayload) as exc:
        taskcluster.normalize_http({}, task_message())
    assert exc.value.field == "exchange"
    job_data = load(TASKCLUSTER / "real_messages" / "treeherder__job_data.json")
    for message in job_data:
        assert isinstance(taskcluster.normalize_http({}, message), Ignored)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: m.pop("status"), "payload.status"),
        (lambda m: m["status"].pop("taskId"), "payload.status.taskId"),
        (lambda m: m.update(runId="0"), "payload.runId"),
        (lambda m: m["status"].update(runs=[7]), "payload.status.runs[0]"),
    ],
)
def test_malformed_message_names_the_field(mutate: Any, field: str) -> None:
    message = task_message()
    mutate(message)
    with pytest.raises(InvalidPayload) as exc:
        taskcluster.normalize_http({}, {"exchange": EXCEPTION, "payload": message})
    assert exc.value.field == field
