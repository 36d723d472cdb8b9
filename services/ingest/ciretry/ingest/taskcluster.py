"""Taskcluster queue pulse messages (task-completed / task-failed / task-exception) -> JobFinished.

Mapping (queue v1 schemas, ``status.runs[].reasonResolved``):

* pipeline = ``taskGroupId``; job = ``taskId``; ``attempt`` = ``runId + 1`` (1-based like GitHub's
  ``run_attempt``; the raw ``runId`` is in ``log.run_id``).
* project: the first of ``status.projectId`` and ``status.schedulerId`` that is set to something
  other than Taskcluster's default for it (``none`` for projectId, ``-`` for schedulerId), else
  ``none``, Taskcluster's name for "no project". So a deployment that uses projects is keyed by
  project, one that does not (2019-era messages have no projectId; many tasks keep the default)
  by scheduler (constant within a task group), and a task with neither is ``none``, never ``-``.
* status: task-completed -> ``success``; task-failed -> ``failed``; task-exception -> ``canceled``
  when reasonResolved is ``canceled`` or ``superseded`` (the run was cancelled because a later
  task made it unnecessary: a cancellation, never a failure), else ``failed``. ``failure_reason`` is
  ``taskcluster:<reasonResolved>`` (``taskcluster:worker-shutdown``), the raw value is kept in
  ``provider_failure_reason``. A task-exception without ``runId`` means the deadline passed
  before any run started (schema text), so its reason is ``deadline-exceeded``.
* Idempotency key: ``taskcluster:{taskId}:{runId}:{exchange}`` (``-`` for a missing runId).

The same function serves AMQP deliveries (exchange from the delivery) and ``POST /pulse``, whose
body is either the treeherder-style envelope ``{"exchange", "payload", "root_url"?}`` or the bare
message with the exchange in ``X-Taskcluster-Exchange``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ciretry.common.events import JobFinished, LogLocator, Metadata, NewEvent, pipeline_stream

from .failure_reasons import is_unknown, taskcluster_canonical
from .fields import (
    Accepted,
    Ignored,
    InvalidPayload,
    Result,
    header,
    ident,
    obj,
    opt_ident,
    opt_int,
    opt_list,
    opt_obj,
    opt_str,
    opt_str_of,
    opt_time_of,
    req_ident,
    slug_id,
    text,
)

SOURCE: Final = "taskcluster"
#: Taskcluster's defaults for a task created without a projectId / schedulerId.
NO_PROJECT: Final = "none"
NO_SCHEDULER: Final = "-"
#: task-exception reasons that mean the run was cancelled, not that it failed.
CANCELLATIONS: Final = frozenset({"canceled", "superseded"})
EXCHANGE_PREFIX: Final = "exchange/taskcluster-queue/v1/"
TERMINAL_EXCHANGES: Final = frozenset({"task-completed", "task-failed", "task-exception"})
OTHER_EXCHANGES: Final = frozenset(
    {
        "task-defined",
        "task-pending",
        "task-running",
        "artifact-created",
        "task-group-resolved",
        "task-group-sealed",
        "task-priority-changed",
        "task-group-priority-changed",
    }
)


def normalize_http(headers: Mapping[str, str], body: Any) -> Result:
    """``POST /pulse``: an envelope with ``exchange`` and ``payload``, or a bare message."""
    data = obj(body, "")
    if "payload" in data and "exchange" in data:
        exchange = data.get("exchange")
        if not isinstance(exchange, str):
            raise InvalidPayload("exchange", "expected a string")
        root_url = opt_str(data, "root_url", "")
        return normalize(exchange, data.get("payload"), root_url=root_url, path="payload")
    if "buildSystem" in data and "display" in data:
        # Treeherder's own job format (what its pulse consumer produces), not a queue message.
        return Ignored("treeherder job message, not a Taskcluster queue message")
    exchange_h = header(headers, "X-Taskcluster-Exchange")
    if not exchange_h:
        raise InvalidPayload("exchange", "required: envelope field or X-Taskcluster-Exchange")
    root_h = header(headers, "X-Taskcluster-Root-Url")
    return normalize(exchange_h, data, root_url=root_h)


def normalize(
    exchange: str, message: Any, *, root_url: str | None = None, path: str = ""
) -> Result:
    kind = exchange.rsplit("/", 1)[-1]
    if kind in OTHER_EXCHANGES:
        return Ignored(f"exchange {kind!r} is not terminal")
    if kind not in TERMINAL_EXCHANGES:
        return Ignored(f"unknown exchange {exchange[:120]!r}")
    exchange_id = ident(exchange, "exchange")
    data = obj(message, path)
    status = opt_obj(data, "status", path)
    spath = f"{path}.status" if path else "status"
    if status is None:
        raise InvalidPayload(spath, "required")
    task_id = slug_id(req_ident(status, "taskId", spath), f"{spath}.taskId")
    group = slug_id(req_ident(status, "taskGroupId", spath), f"{spath}.taskGroupId")
    project = _project(status, spath)
    run_id = opt_int(data, "runId", path)
    if run_id is not None and run_id < 0:
        raise InvalidPayload(f"{path}.runId" if path else "runId", "must be >= 0")
    run = _run(status, run_id, spath)
    rpath = f"{spath}.runs[{run_id}]"

    notes: list[str] = []
    raw_reason: str | None = None
    if run is not None:
        raw_reason = opt_str(run, "reasonResolved", rpath)
    elif kind == "task-exception" and run_id is None:
        raw_reason = "deadline-exceeded"
    if kind == "task-completed":
        job_status, raw_reason = "success", None
    elif kind == "task-exception" and raw_reason in CANCELLATIONS:
        job_status = "canceled"
    else:
        job_status = "failed"
    reason = taskcluster_canonical(raw_reason) if raw_reason else None
    if raw_reason and reason and is_unknown(reason):
        notes.append(f"unknown Taskcluster reasonResolved {raw_reason[:80]!r}")

    tags = _tags(data, path)
    worker_group = opt_str_of(run, "workerGroup", rpath) or opt_str(data, "workerGroup", path)
    worker_id = opt_str_of(run, "workerId", rpath) or opt_str(data, "workerId", path)
    queue = opt_str(status, "taskQueueId", spath) or _queue(status, spath)
    event = JobFinished(
        source=SOURCE,
        project=project,
        pipeline_id=group,
        job_id=task_id,
        job_name=tags.get("label") or tags.get("name") or task_id,
        status=job_status,
        stage=tags.get("kind"),
        attempt=run_id + 1 if run_id is not None else None,
        provider_failure_reason=raw_reason,
        failure_reason=reason,
        runner=f"{worker_group}/{worker_id}" if worker_group and worker_id else worker_id,
        runner_tags=(queue,) if queue else (),
        started_at=opt_time_of(run, "started", rpath),
        finished_at=opt_time_of(run, "resolved", rpath),
        log=LogLocator(
            kind="taskcluster",
            job_id=task_id,
            run_id=run_id,
            url=_log_url(root_url, task_id, run_id),
        ),
    )
    key = f"taskcluster:{task_id}:{'-' if run_id is None else run_id}:{exchange_id}"
    new = NewEvent(
        stream=pipeline_stream(SOURCE, project, group),
        data=event,
        metadata=Metadata(idempotency_key=key),
    )
    return Accepted([new], tuple(notes))


def _project(status: Mapping[str, Any], path: str) -> str:
    """The project rule of the module doc."""
    for key, default in (("projectId", NO_PROJECT), ("schedulerId", NO_SCHEDULER)):
        value = opt_ident(status, key, path)
        if value is not None and value != default:
            return value
    return NO_PROJECT


def _run(status: Mapping[str, Any], run_id: int | None, path: str) -> Mapping[str, Any] | None:
    runs = opt_list(status, "runs", path)
    if run_id is None:
        return obj(runs[-1], f"{path}.runs[{len(runs) - 1}]") if runs else None
    for i, item in enumerate(runs):
        run = obj(item, f"{path}.runs[{i}]")
        if run.get("runId") == run_id:
            return run
    return None


def _tags(data: Mapping[str, Any], path: str) -> dict[str, str]:
    task = opt_obj(data, "task", path)
    tags = task and opt_obj(task, "tags", f"{path}.task" if path else "task")
    if not tags:
        return {}
    return {k: text(v, k) for k, v in tags.items() if isinstance(v, str) and v}


def _queue(status: Mapping[str, Any], path: str) -> str | None:
    provisioner = opt_str(status, "provisionerId", path)
    worker_type = opt_str(status, "workerType", path)
    return f"{provisioner}/{worker_type}" if provisioner and worker_type else None


def _log_url(root_url: str | None, task_id: str, run_id: int | None) -> str | None:
    if not root_url or run_id is None:
        return None
    return (
        f"{root_url.rstrip('/')}/api/queue/v1/task/{task_id}/runs/{run_id}"
        "/artifacts/public/logs/live_backing.log"
    )
