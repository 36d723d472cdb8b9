"""Buildkite pipeline webhooks (``job.finished``, ``build.finished``) -> JobFinished /
PipelineFinished.

Mapping (Buildkite's REST job and build data models, which the webhook bodies carry):

* project = ``<organization>/<pipeline>`` slugs (what the REST API's paths take), the
  organization read from ``pipeline.url`` (``…/v2/organizations/<org>/pipelines/<slug>``), else
  from ``build.url``; pipeline = the build ``number`` (unique per pipeline, what the retry API
  takes); job = the job's UUID. A retry is a new job (a new UUID) in the same build, so every
  attempt of a step shares its build's pipeline stream and budgets see the retries.
  ``attempt`` = ``retries_count + 1`` (1-based like GitHub's ``run_attempt``). act orders the
  attempts of a step by job id: Buildkite's ids begin with their creation time in milliseconds
  (``0194b92a-…``, as a UUIDv7 does), so a retry's id sorts after its original's; ids of jobs
  created before Buildkite issued such ids are random and may sort either way.
* Only command jobs (``type: script``) run anything; wait, block and trigger jobs are ignored.
* status: ``passed`` -> ``success``; ``failed`` -> ``failed``; ``timed_out`` -> ``failed`` with
  the canonical reason ``job_execution_timeout``; ``canceled`` -> ``canceled``; ``finished`` (the
  raw state some payloads carry) by ``exit_status``. Jobs that never ran or are not finished
  (``skipped``, ``broken``, ``expired``, ``running``, ...) are ignored. A soft-failed job is a
  failure the step allows (``allow_failure``).
* ``signal_reason`` (why the agent, not the command, ended the job: ``agent_stop``,
  ``process_run_error``, ...) is the provider's failure reason, canonical as
  ``buildkite:<reason>`` (``failure_reasons``); ``exit_status`` is the exit code (``-1``: the
  agent lost the process, or it never started).
* runner = the agent's name, ``runner_tags`` = the job's ``agent_query_rules`` (``queue=…``);
  ref, sha, user and commit message from the build.
* Idempotency key ``buildkite:job:{project}:{job_id}:{state}``: a job UUID is one attempt and
  finishes once, so a redelivery gives the same key (Buildkite sends no delivery id). A build
  finishes again after a job of it is retried, so its key adds ``finished_at``.
* ``ping`` and every other event are answered ``202 ignored``.

The token (``X-Buildkite-Token``) or signature (``X-Buildkite-Signature``) is checked by the
route, with ``ciretry.common.auth``, before this runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from ciretry.common.events import (
    JobFinished,
    LogLocator,
    Metadata,
    NewEvent,
    PipelineFinished,
    pipeline_stream,
)

from .failure_reasons import buildkite_canonical, is_unknown
from .fields import (
    Accepted,
    Ignored,
    InvalidPayload,
    Result,
    buildkite_slug,
    header,
    obj,
    opt_bool,
    opt_int,
    opt_obj,
    opt_str,
    opt_str_of,
    opt_time,
    req_number_id,
    req_str,
    str_list,
    uuid_id,
)

SOURCE: Final = "buildkite"

#: Job state -> (status, canonical failure reason). ``finished`` is decided by the exit status.
JOB_STATES: Final[dict[str, tuple[str, str | None]]] = {
    "passed": ("success", None),
    "failed": ("failed", None),
    "timed_out": ("failed", "job_execution_timeout"),
    "canceled": ("canceled", None),
}
#: Build state -> status; other build states (blocked, skipped, not_run, ...) are ignored.
BUILD_STATES: Final[dict[str, str]] = {
    "passed": "success",
    "failed": "failed",
    "canceled": "canceled",
}


def normalize(headers: Mapping[str, str], body: Any) -> Result:
    event = header(headers, "X-Buildkite-Event")
    data = obj(body, "")
    if not event:
        # The body names the event too; the header is what Buildkite documents as always set.
        event = opt_str(data, "event", "")
    if not event:
        raise InvalidPayload("X-Buildkite-Event", "required header")
    if event not in ("job.finished", "build.finished"):
        return Ignored(f"X-Buildkite-Event {event[:80]!r} is not a finished job or build")
    pipeline = opt_obj(data, "pipeline", "")
    build = opt_obj(data, "build", "")
    if pipeline is None:
        raise InvalidPayload("pipeline", "required")
    if build is None:
        raise InvalidPayload("build", "required")
    project = _project(pipeline, build)
    number = req_number_id(build, "number", "build")
    if event == "job.finished":
        return _job(data, build, project, number)
    return _build(build, project, number)


def _project(pipeline: Mapping[str, Any], build: Mapping[str, Any]) -> str:
    slug = buildkite_slug(req_str(pipeline, "slug", "pipeline"), "pipeline.slug")
    for where, parent in (("pipeline.url", pipeline), ("build.url", build)):
        url = opt_str(parent, "url", where.split(".")[0])
        org = _organization(url) if url else None
        if org is not None:
            return f"{buildkite_slug(org, where)}/{slug}"
    raise InvalidPayload("pipeline.url", "no organization in the pipeline's or build's API URL")


def _organization(url: str) -> str | None:
    segments = urlsplit(url).path.split("/")
    if "organizations" in segments:
        at = segments.index("organizations") + 1
        if at < len(segments) and segments[at]:
            return segments[at]
    return None


def _job(data: Mapping[str, Any], build: Mapping[str, Any], project: str, number: str) -> Result:
    job = opt_obj(data, "job", "")
    if job is None:
        raise InvalidPayload("job", "required")
    path = "job"
    kind = opt_str(job, "type", path)
    if kind != "script":
        return Ignored(f"job type {str(kind)[:40]!r} runs no command")
    state = req_str(job, "state", path)
    exit_status = opt_int(job, "exit_status", path)
    if state == "finished":
        state = "passed" if exit_status == 0 else "failed"
    if state not in JOB_STATES:
        return Ignored(f"job state {state[:40]!r}: not a finished run")
    status, reason = JOB_STATES[state]
    notes: tuple[str, ...] = ()
    signal_reason = opt_str(job, "signal_reason", path, limit=100)
    if signal_reason and status != "success":
        reason = buildkite_canonical(signal_reason)
        if is_unknown(reason):
            notes = (f"unknown Buildkite signal_reason {signal_reason!r} stored as {reason}",)
    job_id = uuid_id(job.get("id"), f"{path}.id")
    agent = opt_obj(job, "agent", path)
    creator = opt_obj(build, "creator", "build")
    retries = opt_int(job, "retries_count", path) or 0
    event = JobFinished(
        source=SOURCE,
        project=project,
        pipeline_id=number,
        job_id=job_id,
        job_name=opt_str(job, "name", path) or opt_str(job, "step_key", path) or job_id,
        status=status,
        attempt=retries + 1,
        provider_failure_reason=(signal_reason or state) if status != "success" else None,
        failure_reason=reason,
        exit_code=exit_status,
        runner=opt_str_of(agent, "name", f"{path}.agent"),
        runner_tags=str_list(job, "agent_query_rules", path),
        ref=opt_str(build, "branch", "build"),
        sha=opt_str(build, "commit", "build"),
        user=opt_str_of(creator, "name", "build.creator"),
        commit_message=opt_str(build, "message", "build"),
        started_at=opt_time(job, "started_at", path),
        finished_at=opt_time(job, "finished_at", path),
        allow_failure=bool(opt_bool(job, "soft_failed", path)),
        log=LogLocator(
            kind="buildkite",
            project=project,
            job_id=job_id,
            run_id=int(number) if len(number) < 19 else None,
            url=opt_str(job, "web_url", path),
        ),
    )
    key = f"buildkite:job:{project}:{job_id}:{state}"
    return Accepted([_new(event, key)], notes)


def _build(build: Mapping[str, Any], project: str, number: str) -> Result:
    state = req_str(build, "state", "build")
    if state not in BUILD_STATES:
        return Ignored(f"build state {state[:40]!r}: not a finished build")
    creator = opt_obj(build, "creator", "build")
    finished_at = opt_time(build, "finished_at", "build")
    event = PipelineFinished(
        source=SOURCE,
        project=project,
        pipeline_id=number,
        status=BUILD_STATES[state],
        ref=opt_str(build, "branch", "build"),
        sha=opt_str(build, "commit", "build"),
        user=opt_str_of(creator, "name", "build.creator"),
        commit_message=opt_str(build, "message", "build"),
        finished_at=finished_at,
    )
    when = finished_at.isoformat() if finished_at else "-"
    key = f"buildkite:build:{project}:{number}:{state}:{when}"
    return Accepted([_new(event, key)])


def _new(event: JobFinished | PipelineFinished, key: str) -> NewEvent:
    return NewEvent(
        stream=pipeline_stream(SOURCE, event.project, event.pipeline_id),
        data=event,
        metadata=Metadata(idempotency_key=key),
    )
