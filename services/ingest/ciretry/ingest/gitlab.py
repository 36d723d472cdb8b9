"""GitLab Job Hook, Pipeline Hook (and the jobs API, for reconcile) -> JobFinished / PipelineFinished.

Idempotency, thought through:

* One ``JobFinished`` per job attempt and terminal status, whichever of the job hook, the
  pipeline hook or reconcile reports it first. A GitLab job id *is* one attempt (a retry gets a
  new id), and a job id reaches a given terminal status at most once, so the key is
  ``gitlab:job:{project_id}:{job_id}:{status}``. It subsumes ``X-Gitlab-Event-UUID``: a
  redelivery of the same hook (same UUID) yields the same key; the UUID itself is kept as
  ``metadata.source_delivery_id``. Keying on the UUID instead would store the job twice when
  both its job hook and its pipeline's hook arrive.
* ``PipelineFinished``: a pipeline can finish more than once (failed, a job is retried, failed
  again), so the key adds ``finished_at``: ``gitlab:pipeline:{project}:{id}:{status}:{finished}``
  (a content hash of the builds' statuses when ``finished_at`` is missing).

Quirks of GitLab's payloads handled here:

* The job hook has no exit code, so ``exit_code`` stays None.
* In a job hook ``commit.id`` is the *pipeline* id (older GitLab has no ``pipeline_id``).
* ``retries_count`` is unreliable and not used: attempts are counted from the event log.
* ``build_failure_reason`` is ``unknown_failure`` even on *successful* jobs, so a failure
  reason is only recorded for ``failed`` jobs.
* Pipeline hooks carry ``builds`` (gitlab4j's fixture also has ``jobs``); JobFinished is emitted
  for every terminal build in it, so a lost job hook is covered by its pipeline's hook.
* Pipeline hooks of *every* status are read for ``object_attributes.variables``: a pipeline that
  act created carries ``CIRETRY_RETRY_OF`` (the request's idempotency key), which links the
  pipeline into its attempt chain (``PipelineLinked``, with the size its ``KUBERNETES_MEMORY_*``
  variables ask for). GitLab sends a pipeline hook when the pipeline starts, long before its
  jobs fail, so the link is usually in the log before act needs it; act asks the API when not.
* Note hooks on merge requests carrying ``/ciretry wrong <job> [why]`` are disputes
  (``disputes``): ingest records them as ``VerdictDisputed``; other notes are ignored.
* Merge request hooks give ``MergeRequestUpdated`` (labels, state, source branch): opt-out by
  merge request label reads those, never the runner tags (``JobFinished.runner_tags``).
* Only ``success``, ``failed``, ``canceled`` are terminal for a job. ``skipped`` is not: GitLab
  turns skipped jobs back into ``created`` when an earlier job is retried, and a skipped job never
  ran. Non-terminal and unknown statuses are *ignored* (202), not rejected: GitLab disables a
  webhook that keeps getting 4xx answers, which would lose every later event.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Final

from ciretry.common.events import (
    RETRY_OF_VARIABLE,
    JobFinished,
    JobRef,
    LogLocator,
    MergeRequestUpdated,
    Metadata,
    NewEvent,
    PipelineFinished,
    PipelineLinked,
    link_key,
    pipeline_stream,
)
from ciretry.common.resources import DEFAULT_VARIABLES

from .disputes import gitlab_note
from .failure_reasons import gitlab_canonical, is_unknown
from .fields import (
    Accepted,
    Ignored,
    InvalidPayload,
    Result,
    content_hash,
    header,
    ident,
    obj,
    opt_bool,
    opt_ident,
    opt_list,
    opt_number_id,
    opt_obj,
    opt_str,
    opt_str_of,
    opt_time,
    req_number_id,
    req_str,
    str_list,
)
from .reviews import review_event

SOURCE: Final = "gitlab"
TERMINAL_JOB_STATUSES: Final = frozenset({"success", "failed", "canceled"})
NONTERMINAL_JOB_STATUSES: Final = frozenset(
    {
        "created",
        "waiting_for_resource",
        "waiting_for_callback",
        "preparing",
        "pending",
        "running",
        "canceling",
        "skipped",
        "manual",
        "scheduled",
    }
)
TERMINAL_PIPELINE_STATUSES: Final = frozenset({"success", "failed", "canceled", "skipped"})
#: object_kind values GitLab sends for hooks ciretry does not need (answered 202 ignored).
OTHER_KINDS: Final = frozenset(
    {
        "push",
        "tag_push",
        "issue",
        "work_item",
        "wiki_page",
        "deployment",
        "release",
        "feature_flag",
        "emoji",
        "member",
        "subgroup",
        "project",
        "access_token",
        "vulnerability",
        "milestone",
        "resource_access_token",
        "repository_update",
    }
)
OUR_EVENTS: Final = frozenset({"Job Hook", "Pipeline Hook", "System Hook", "Note Hook"})
MAX_COMMIT_MESSAGE = 4096


def job_key(project: str, job_id: str, status: str) -> str:
    return f"gitlab:job:{project}:{job_id}:{status}"


def normalize(headers: Mapping[str, str], body: Any) -> Result:
    """A GitLab webhook delivery -> events to append, or why it is ignored."""
    event = header(headers, "X-Gitlab-Event")
    delivery = header(headers, "X-Gitlab-Event-UUID")
    data = obj(body, "")
    kind = data.get("object_kind")
    if kind == "build":
        return _job_hook(data, delivery)
    if kind == "pipeline":
        return _pipeline_hook(data, delivery)
    if kind == "merge_request":
        return _merge_request_hook(data, delivery)
    if kind == "note":
        return gitlab_note(data, delivery)  # a /ciretry command replying to our note
    if isinstance(kind, str) and kind in OTHER_KINDS:
        return Ignored(f"object_kind {kind!r} is not a job or pipeline event")
    if event == "System Hook":
        # A system hook carries every instance event: group, project, user and key changes
        # (``event_name``, no object_kind), pushes, merge requests... Only jobs and pipelines are
        # ours; anything else is answered 202 (a hook that keeps failing is disabled by GitLab).
        what = kind if kind is not None else data.get("event_name")
        return Ignored(f"system hook event {str(what)[:80]!r} is not a job or pipeline event")
    if event is not None and event not in OUR_EVENTS:
        return Ignored(f"X-Gitlab-Event {event[:80]!r} is not a job or pipeline event")
    if kind is None:
        raise InvalidPayload("object_kind", "required")
    if not isinstance(kind, str):
        raise InvalidPayload("object_kind", "expected a string")
    raise InvalidPayload("object_kind", f"unknown object_kind {kind[:80]!r}")


# --- job hook ---------------------------------------------------------------------------------


def _job_hook(data: Mapping[str, Any], delivery: str | None) -> Result:
    status = req_str(data, "build_status", "")
    if status not in TERMINAL_JOB_STATUSES:
        return _ignored_status("job", status)
    project_obj = opt_obj(data, "project", "")
    project = opt_number_id(data, "project_id", "")
    if project is None:
        if project_obj is None:
            raise InvalidPayload("project_id", "required")
        project = req_number_id(project_obj, "id", "project")
    commit = opt_obj(data, "commit", "")
    pipeline = opt_number_id(data, "pipeline_id", "")
    if pipeline is None:
        if commit is None:
            raise InvalidPayload("pipeline_id", "required")
        pipeline = req_number_id(commit, "id", "commit")  # commit.id is the pipeline id
    job_id = req_number_id(data, "build_id", "")
    runner = opt_obj(data, "runner", "")
    notes: list[str] = []
    raw_reason, reason = _failure(status, opt_str(data, "build_failure_reason", ""), notes)
    web_url = opt_str_of(project_obj, "web_url", "project")
    event = JobFinished(
        source=SOURCE,
        project=project,
        pipeline_id=pipeline,
        job_id=job_id,
        job_name=req_str(data, "build_name", ""),
        status=status,
        stage=opt_str(data, "build_stage", ""),
        provider_failure_reason=raw_reason,
        failure_reason=reason,
        runner=_runner_name(runner, "runner"),
        runner_tags=str_list(runner, "tags", "runner") if runner else (),
        ref=opt_str(data, "ref", ""),
        sha=opt_str(data, "sha", "") or opt_str_of(commit, "sha", "commit"),
        user=_user(opt_obj(data, "user", ""), "user"),
        commit_message=_message(opt_str_of(commit, "message", "commit")),
        started_at=opt_time(data, "build_started_at", ""),
        finished_at=opt_time(data, "build_finished_at", ""),
        allow_failure=bool(opt_bool(data, "build_allow_failure", "")),
        log=_log(project, job_id, web_url),
    )
    return Accepted([_new(event, job_key(project, job_id, status), delivery)], tuple(notes))


# --- pipeline hook ----------------------------------------------------------------------------


def _pipeline_hook(data: Mapping[str, Any], delivery: str | None) -> Result:
    attrs = opt_obj(data, "object_attributes", "")
    if attrs is None:
        raise InvalidPayload("object_attributes", "required")
    status = req_str(attrs, "status", "object_attributes")
    linked = RETRY_OF_VARIABLE in _variables(attrs)
    if status not in TERMINAL_PIPELINE_STATUSES and not linked:
        return _ignored_status("pipeline", status)
    project_obj = opt_obj(data, "project", "")
    if project_obj is None:
        raise InvalidPayload("project", "required")
    project = req_number_id(project_obj, "id", "project")
    pipeline = req_number_id(attrs, "id", "object_attributes")
    link = _link(project, pipeline, attrs, delivery)
    if status not in TERMINAL_PIPELINE_STATUSES:
        # A pipeline act created, starting: its link is what the hook is worth now.
        assert link is not None
        return Accepted([link])
    web_url = opt_str(project_obj, "web_url", "project")
    ref = opt_str(attrs, "ref", "object_attributes")
    sha = opt_str(attrs, "sha", "object_attributes")
    user = _user(opt_obj(data, "user", ""), "user")
    commit = opt_obj(data, "commit", "")
    message = _message(opt_str_of(commit, "message", "commit"))
    finished_at = opt_time(attrs, "finished_at", "object_attributes")

    key_name = "builds" if data.get("builds") is not None else "jobs"
    notes: list[str] = []
    refs: list[JobRef] = []
    jobs: list[NewEvent] = []
    for i, item in enumerate(opt_list(data, key_name, "")):
        path = f"{key_name}[{i}]"
        build = obj(item, path)
        job_id = req_number_id(build, "id", path)
        name = req_str(build, "name", path)
        stage = opt_str(build, "stage", path)
        job_status = req_str(build, "status", path)
        raw_reason, reason = _failure(job_status, opt_str(build, "failure_reason", path), notes)
        refs.append(
            JobRef(job_id=job_id, name=name, stage=stage, status=job_status, failure_reason=reason)
        )
        if job_status not in TERMINAL_JOB_STATUSES:
            continue
        runner = opt_obj(build, "runner", path)
        job = JobFinished(
            source=SOURCE,
            project=project,
            pipeline_id=pipeline,
            job_id=job_id,
            job_name=name,
            status=job_status,
            stage=stage,
            provider_failure_reason=raw_reason,
            failure_reason=reason,
            runner=_runner_name(runner, f"{path}.runner"),
            runner_tags=str_list(runner, "tags", f"{path}.runner") if runner else (),
            ref=ref,
            sha=sha,
            user=_user(opt_obj(build, "user", path), f"{path}.user") or user,
            commit_message=message,
            started_at=opt_time(build, "started_at", path),
            finished_at=opt_time(build, "finished_at", path),
            allow_failure=bool(opt_bool(build, "allow_failure", path)),
            log=_log(project, job_id, web_url),
        )
        jobs.append(_new(job, job_key(project, job_id, job_status), delivery))

    # The parsed instant, not the raw text: GitLab versions format the same time differently.
    marker = (
        finished_at.astimezone(dt.UTC).isoformat()
        if finished_at is not None
        else content_hash([(r.job_id, r.status) for r in refs])
    )
    pipeline_event = PipelineFinished(
        source=SOURCE,
        project=project,
        pipeline_id=pipeline,
        status=status,
        ref=ref,
        sha=sha,
        user=user,
        commit_message=message,
        jobs=tuple(refs),
        finished_at=finished_at,
    )
    key = f"gitlab:pipeline:{project}:{pipeline}:{status}:{marker}"
    # The link first (it says which chain the jobs belong to), then PipelineFinished: a reader
    # of the stream sees the pipeline's verdict, then its jobs.
    head = [link] if link is not None else []
    return Accepted([*head, _new(pipeline_event, key, delivery), *jobs], tuple(notes))


def _variables(attrs: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(opt_list(attrs, "variables", "object_attributes")):
        path = f"object_attributes.variables[{i}]"
        var = obj(item, path)
        key = opt_str(var, "key", path, limit=255)
        value = opt_str(var, "value", path, limit=4096)
        if key is not None and value is not None:
            out[key] = value
    return out


def _link(
    project: str, pipeline: str, attrs: Mapping[str, Any], delivery: str | None
) -> NewEvent | None:
    """``PipelineLinked`` when act created this pipeline (its variables name the request)."""
    variables = _variables(attrs)
    retry_of = variables.get(RETRY_OF_VARIABLE)
    if not retry_of:
        return None
    event = PipelineLinked(
        source=SOURCE,
        project=project,
        pipeline_id=pipeline,
        retry_of=ident(retry_of, f"object_attributes.variables[{RETRY_OF_VARIABLE}]"),
        resources=DEFAULT_VARIABLES.read(variables),
    )
    return NewEvent(
        stream=pipeline_stream(SOURCE, project, pipeline),
        data=event,
        metadata=Metadata(
            idempotency_key=link_key(SOURCE, project, pipeline),
            source_delivery_id=_delivery(delivery),
        ),
    )


# --- merge request hook -----------------------------------------------------------------------


def _merge_request_hook(data: Mapping[str, Any], delivery: str | None) -> Result:
    attrs = opt_obj(data, "object_attributes", "")
    if attrs is None:
        raise InvalidPayload("object_attributes", "required")
    path = "object_attributes"
    project_obj = opt_obj(data, "project", "")
    # ``project.id`` when there is one; a system hook's merge request event (GitLab's older
    # shape, go-playground's system-merge-request-event) has a project without an id.
    project = opt_number_id(project_obj, "id", "project") if project_obj is not None else None
    if project is None:
        project = opt_number_id(attrs, "target_project_id", path)
    if project is None:
        raise InvalidPayload("project.id", "required (or object_attributes.target_project_id)")
    number = req_number_id(attrs, "iid", path)
    branch = ident(req_str(attrs, "source_branch", path), f"{path}.source_branch")
    # Top-level ``labels`` is what GitLab documents; older versions only had them in attrs.
    raw_labels = data.get("labels")
    where = "labels"
    if raw_labels is None:
        raw_labels, where = attrs.get("labels"), f"{path}.labels"
    labels = _label_titles(raw_labels, where)
    last_commit = opt_obj(attrs, "last_commit", path)
    updated_at = opt_time(attrs, "updated_at", path)
    event = MergeRequestUpdated(
        source=SOURCE,
        project=project,
        number=number,
        source_branch=branch,
        target_branch=opt_str(attrs, "target_branch", path),
        state=req_str(attrs, "state", path),
        labels=labels,
        sha=opt_str_of(last_commit, "id", f"{path}.last_commit"),
        updated_at=updated_at,
    )
    return Accepted([review_event(event, _delivery(delivery))])


def _label_titles(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidPayload(path, "expected an array of labels")
    titles: list[str] = []
    for i, item in enumerate(value):
        label = obj(item, f"{path}[{i}]")
        title = opt_str(label, "title", f"{path}[{i}]", limit=255) or opt_str(
            label, "name", f"{path}[{i}]", limit=255
        )
        if title:
            titles.append(title)
    return tuple(sorted(set(titles)))


# --- jobs API (reconcile) ---------------------------------------------------------------------


def job_from_api(job: Any, path: str = "") -> NewEvent | None:
    """One entry of ``GET /projects/:id/jobs`` -> the JobFinished a webhook would have given
    (same idempotency key), or None if the job is not in a terminal status."""
    data = obj(job, path)
    status = req_str(data, "status", path)
    if status not in TERMINAL_JOB_STATUSES:
        return None
    pipe = opt_obj(data, "pipeline", path)
    if pipe is None:
        raise InvalidPayload(f"{path}.pipeline", "required")
    project = req_number_id(pipe, "project_id", f"{path}.pipeline")
    pipeline = req_number_id(pipe, "id", f"{path}.pipeline")
    job_id = req_number_id(data, "id", path)
    commit = opt_obj(data, "commit", path)
    runner = opt_obj(data, "runner", path)
    notes: list[str] = []
    raw_reason, reason = _failure(status, opt_str(data, "failure_reason", path), notes)
    web_url = opt_str(data, "web_url", path)
    event = JobFinished(
        source=SOURCE,
        project=project,
        pipeline_id=pipeline,
        job_id=job_id,
        job_name=req_str(data, "name", path),
        status=status,
        stage=opt_str(data, "stage", path),
        provider_failure_reason=raw_reason,
        failure_reason=reason,
        runner=_runner_name(runner, f"{path}.runner"),
        runner_tags=str_list(data, "tag_list", path),
        ref=opt_str(data, "ref", path),
        sha=opt_str_of(commit, "id", f"{path}.commit") or opt_str(pipe, "sha", path),
        user=_user(opt_obj(data, "user", path), f"{path}.user"),
        commit_message=_message(opt_str_of(commit, "message", f"{path}.commit")),
        started_at=opt_time(data, "started_at", path),
        finished_at=opt_time(data, "finished_at", path),
        allow_failure=bool(opt_bool(data, "allow_failure", path)),
        log=LogLocator(kind="gitlab", project=project, job_id=job_id, url=web_url),
    )
    return _new(event, job_key(project, job_id, status), None)


# --- helpers ----------------------------------------------------------------------------------


def _ignored_status(what: str, status: str) -> Ignored:
    known = NONTERMINAL_JOB_STATUSES | TERMINAL_JOB_STATUSES | TERMINAL_PIPELINE_STATUSES
    if status in known:
        return Ignored(f"{what} status {status!r} is not terminal")
    return Ignored(f"unknown {what} status {status[:80]!r}")


def _failure(status: str, raw: str | None, notes: list[str]) -> tuple[str | None, str | None]:
    if status != "failed" or not raw:
        return None, None
    canonical = gitlab_canonical(raw)
    if is_unknown(canonical):
        note = f"unknown GitLab failure_reason {raw[:80]!r}"
        if note not in notes:
            notes.append(note)
    return raw, canonical


def _runner_name(runner: Mapping[str, Any] | None, path: str) -> str | None:
    if not runner:
        return None
    return opt_str(runner, "description", path) or opt_ident(runner, "id", path)


def _user(user: Mapping[str, Any] | None, path: str) -> str | None:
    # Never the e-mail: the event log is append-only, personal data in it cannot be erased.
    if not user:
        return None
    return opt_str(user, "username", path) or opt_str(user, "name", path)


def _message(message: str | None) -> str | None:
    return message[:MAX_COMMIT_MESSAGE] if message else message


def _log(project: str, job_id: str, web_url: str | None) -> LogLocator:
    url = f"{web_url.rstrip('/')}/-/jobs/{job_id}" if web_url else None
    return LogLocator(kind="gitlab", project=project, job_id=job_id, url=url)


def _new(event: JobFinished | PipelineFinished, key: str, delivery: str | None) -> NewEvent:
    return NewEvent(
        stream=pipeline_stream(SOURCE, event.project, event.pipeline_id),
        data=event,
        metadata=Metadata(idempotency_key=key, source_delivery_id=_delivery(delivery)),
    )


def _delivery(delivery: str | None) -> str | None:
    if delivery is None:
        return None
    try:
        return ident(delivery, "X-Gitlab-Event-UUID")
    except InvalidPayload:
        return None  # a malformed delivery id is not worth refusing the event for
