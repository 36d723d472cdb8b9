"""GitHub ``workflow_job`` / ``workflow_run`` webhooks -> JobFinished / PipelineFinished.

* pipeline = workflow run (``run_id``); every attempt of a run shares its pipeline stream, so
  budgets see re-runs. ``attempt`` = ``run_attempt`` (1-based, reliable on GitHub).
* project = ``repository.full_name`` (what the REST API takes to re-run a job).
* Idempotency key ``github:job:{repo}:{job_id}:{conclusion}``: a GitHub job id is one attempt
  (a re-run gets a new id) and completes once, so this subsumes ``X-GitHub-Delivery`` (kept as
  ``metadata.source_delivery_id``): a redelivery gives the same key.
* Status: conclusions map to the shared vocabulary ``success`` / ``failed`` / ``canceled``;
  ``timed_out`` is a failure whose canonical reason is GitLab's ``job_execution_timeout``;
  ``skipped`` and ``action_required`` never ran and are ignored. GitHub sends no exit code and no
  reason for ``failure``: the log has to tell.
* A job's ``labels`` are its runner labels (``runs-on``): stored as ``runner_tags``. Pull request
  labels come from ``pull_request`` events (every action: opened, labeled, unlabeled,
  synchronize, closed...) as ``MergeRequestUpdated``, which opt-out by label reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ciretry.common.events import (
    JobFinished,
    LogLocator,
    MergeRequestUpdated,
    Metadata,
    NewEvent,
    PipelineFinished,
    pipeline_stream,
)

from .disputes import github_comment
from .fields import (
    Accepted,
    Ignored,
    InvalidPayload,
    Result,
    github_repo,
    header,
    ident,
    obj,
    opt_int,
    opt_list,
    opt_obj,
    opt_str,
    opt_str_of,
    opt_time,
    req_number_id,
    req_str,
    str_list,
)
from .reviews import review_event

SOURCE: Final = "github"

#: conclusion -> (status, canonical failure reason)
CONCLUSIONS: Final[dict[str, tuple[str, str | None]]] = {
    "success": ("success", None),
    "neutral": ("success", None),
    "failure": ("failed", None),
    "timed_out": ("failed", "job_execution_timeout"),
    "startup_failure": ("failed", "github:startup_failure"),
    "cancelled": ("canceled", None),
}
NOT_RUN: Final = frozenset({"skipped", "action_required", "stale"})


def normalize(headers: Mapping[str, str], body: Any) -> Result:
    event = header(headers, "X-GitHub-Event")
    if not event:
        raise InvalidPayload("X-GitHub-Event", "required header")
    delivery = header(headers, "X-GitHub-Delivery")
    if event not in ("workflow_job", "workflow_run", "pull_request", "issue_comment"):
        return Ignored(f"X-GitHub-Event {event[:80]!r} is not a workflow event")
    data = obj(body, "")
    if event == "issue_comment":
        repo = opt_obj(data, "repository", "")
        if repo is None:
            raise InvalidPayload("repository", "required")
        name = github_repo(req_str(repo, "full_name", "repository"), "repository.full_name")
        return github_comment(data, name, delivery)  # a /ciretry command on a pull request
    action = req_str(data, "action", "")
    if event == "pull_request":
        return _pull_request(data, delivery)
    if action != "completed":
        return Ignored(f"{event} action {action[:80]!r} is not terminal")
    repo = opt_obj(data, "repository", "")
    if repo is None:
        raise InvalidPayload("repository", "required")
    project = github_repo(req_str(repo, "full_name", "repository"), "repository.full_name")
    if event == "workflow_job":
        return _job(data, project, delivery)
    return _run(data, project, delivery)


def _conclusion(item: Mapping[str, Any], path: str) -> tuple[str, str, str | None] | str:
    """(conclusion, status, canonical reason), or why it is ignored."""
    conclusion = opt_str(item, "conclusion", path)
    if conclusion is None:
        return "no conclusion"
    if conclusion in NOT_RUN:
        return f"conclusion {conclusion!r}: never ran"
    if conclusion not in CONCLUSIONS:
        return f"unknown conclusion {conclusion[:80]!r}"
    status, reason = CONCLUSIONS[conclusion]
    return conclusion, status, reason


def _job(data: Mapping[str, Any], project: str, delivery: str | None) -> Result:
    job = opt_obj(data, "workflow_job", "")
    if job is None:
        raise InvalidPayload("workflow_job", "required")
    path = "workflow_job"
    concluded = _conclusion(job, path)
    if isinstance(concluded, str):
        return Ignored(f"workflow_job {concluded}")
    conclusion, status, reason = concluded
    job_id = req_number_id(job, "id", path)
    run_id = req_number_id(job, "run_id", path)
    run_attempt = opt_int(job, "run_attempt", path)
    event = JobFinished(
        source=SOURCE,
        project=project,
        pipeline_id=run_id,
        job_id=job_id,
        job_name=req_str(job, "name", path),
        status=status,
        stage=opt_str(job, "workflow_name", path),
        attempt=run_attempt,
        provider_failure_reason=conclusion if status != "success" else None,
        failure_reason=reason,
        runner=opt_str(job, "runner_name", path),
        runner_tags=str_list(job, "labels", path),
        ref=opt_str(job, "head_branch", path),
        sha=opt_str(job, "head_sha", path),
        user=_login(data),
        started_at=opt_time(job, "started_at", path),
        finished_at=opt_time(job, "completed_at", path),
        log=LogLocator(
            kind="github",
            project=project,
            job_id=job_id,
            run_id=int(run_id) if run_id.isdigit() and len(run_id) < 19 else None,
            url=opt_str(job, "html_url", path),
        ),
    )
    key = f"github:job:{project}:{job_id}:{conclusion}"
    return Accepted([_new(event, key, delivery)])


def _run(data: Mapping[str, Any], project: str, delivery: str | None) -> Result:
    run = opt_obj(data, "workflow_run", "")
    if run is None:
        raise InvalidPayload("workflow_run", "required")
    path = "workflow_run"
    concluded = _conclusion(run, path)
    if isinstance(concluded, str):
        return Ignored(f"workflow_run {concluded}")
    conclusion, status, _ = concluded
    run_id = req_number_id(run, "id", path)
    attempt = opt_int(run, "run_attempt", path) or 1
    head_commit = opt_obj(run, "head_commit", path)
    event = PipelineFinished(
        source=SOURCE,
        project=project,
        pipeline_id=run_id,
        status=status,
        ref=opt_str(run, "head_branch", path),
        sha=opt_str(run, "head_sha", path),
        user=_login(data),
        commit_message=opt_str_of(head_commit, "message", f"{path}.head_commit"),
        finished_at=opt_time(run, "updated_at", path),
    )
    key = f"github:run:{project}:{run_id}:{attempt}:{conclusion}"
    return Accepted([_new(event, key, delivery)])


def _pull_request(data: Mapping[str, Any], delivery: str | None) -> Result:
    repo = opt_obj(data, "repository", "")
    if repo is None:
        raise InvalidPayload("repository", "required")
    project = github_repo(req_str(repo, "full_name", "repository"), "repository.full_name")
    pr = opt_obj(data, "pull_request", "")
    if pr is None:
        raise InvalidPayload("pull_request", "required")
    path = "pull_request"
    head = opt_obj(pr, "head", path)
    if head is None:
        raise InvalidPayload(f"{path}.head", "required")
    base = opt_obj(pr, "base", path)
    labels: list[str] = []
    for i, item in enumerate(opt_list(pr, "labels", path)):
        name = opt_str(obj(item, f"{path}.labels[{i}]"), "name", f"{path}.labels[{i}]", limit=255)
        if name:
            labels.append(name)
    event = MergeRequestUpdated(
        source=SOURCE,
        project=project,
        number=req_number_id(pr, "number", path),
        source_branch=ident(req_str(head, "ref", f"{path}.head"), f"{path}.head.ref"),
        target_branch=opt_str_of(base, "ref", f"{path}.base"),
        state=req_str(pr, "state", path),
        labels=tuple(sorted(set(labels))),
        sha=opt_str(head, "sha", f"{path}.head"),
        updated_at=opt_time(pr, "updated_at", path),
    )
    return Accepted([review_event(event, _delivery_id(delivery))])


def _login(data: Mapping[str, Any]) -> str | None:
    sender = opt_obj(data, "sender", "")
    return opt_str(sender, "login", "sender") if sender else None


def _delivery_id(delivery: str | None) -> str | None:
    try:
        return ident(delivery, "X-GitHub-Delivery") if delivery else None
    except InvalidPayload:
        return None


def _new(event: JobFinished | PipelineFinished, key: str, delivery: str | None) -> NewEvent:
    return NewEvent(
        stream=pipeline_stream(SOURCE, event.project, event.pipeline_id),
        data=event,
        metadata=Metadata(idempotency_key=key, source_delivery_id=_delivery_id(delivery)),
    )
