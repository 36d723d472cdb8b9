"""Budgets as folds over the log, and the retry decision as a pure function of them.

Nothing here does I/O or reads a clock: ``fold_budget`` turns a pipeline's events into a
``BudgetState`` and ``decide`` turns (state, verdict, policy, job, now) into the event act appends.
``replay`` runs the very same fold over the whole log, so what was decided can be re-derived.

Counting rules (DESIGN "count attempts from the record"):

* attempts of a job = ``JobFinished`` events of the pipeline with the job's name, ordered by job
  id (numerically when the ids are numbers; then by the provider's attempt number, since a
  Taskcluster task keeps its id across runs), manual retries included;
* a retry from attempt k to k+1 is charged to the budget class of act's ``RetryRequested`` for
  attempt k; a retry act did not request (manual, or by another tool) is charged to the class
  being asked for now, so it can only make act more cautious;
* the pipeline budget counts every ``RetryRequested`` of the pipeline, dry-run ones included
  (dry-run must show what real mode would have spent); a later ``RetryFailed`` refunds nothing;
* deterministic failures = job names act skipped as ``not_retryable`` with category
  ``deterministic``: act writes those skips into the pipeline stream itself, so it learns of the
  other jobs' deterministic verdicts without reading their job streams.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from ciretry.common.events import (
    Action,
    BudgetClass,
    BudgetSnapshot,
    Event,
    JobFinished,
    PipelineFinished,
    RecordedEvent,
    Resources,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    SkipReason,
    VerdictReached,
)

from .policy import Policy, Settings

Decision = RetryRequested | RetrySkipped

_RETRY_ACTIONS: frozenset[str] = frozenset(
    {"retry_job", "recreate_pipeline", "rerun_with_resources"}
)


def attempt_order(job_id: str, attempt: int | None) -> tuple[int, int, str, int]:
    """Sort key of a job attempt: numeric ids numerically (GitLab 99 < 100), then the provider's
    attempt number (Taskcluster runs of one task)."""
    n = int(job_id) if job_id.isdigit() else -1
    return (0 if n >= 0 else 1, n, job_id, -1 if attempt is None else attempt)


def attempt_id(job_id: str, attempt: int | None) -> str:
    return job_id if attempt is None else f"{job_id}#{attempt}"


def idempotency_key(
    source: str, project: str, job_id: str, attempt: int | None, action: str
) -> str:
    """One job attempt, one action: the key of the decision and of its provider call."""
    return f"act:{source}:{project}:{attempt_id(job_id, attempt)}:{action}"


def outcome_key(request_key: str) -> str:
    """Metadata idempotency key of a request's final outcome (RetryIssued, final RetryFailed or
    dry-run skip): the unique index then allows at most one outcome per request."""
    return request_key + ":outcome"


class JobHistory:
    """What the pipeline stream says about one job name."""

    __slots__ = ("attempts", "requested", "resources")

    def __init__(self) -> None:
        #: attempt id -> provider attempt number, of every attempt seen (JobFinished).
        self.attempts: dict[str, int | None] = {}
        #: attempt id -> act's request for that attempt (the retry it caused).
        self.requested: dict[str, RetryRequested] = {}
        #: Size the job runs with after act's last resource change (survives a later preemption).
        self.resources: Resources | None = None


class BudgetState:
    """A pipeline's budgets, folded from its stream. Mutable only while folding."""

    __slots__ = (
        "jobs",
        "job_names",
        "retries_requested",
        "deterministic",
        "requests",
        "outcomes",
        "failing",
        "decided_verdicts",
        "events",
        "jobs_by_event",
        "job_by_id",
        "job_versions",
        "version",
    )

    def __init__(self) -> None:
        self.jobs: dict[str, JobHistory] = {}
        #: Logical jobs of the pipeline: names from JobFinished and PipelineFinished.jobs.
        self.job_names: set[str] = set()
        self.retries_requested = 0
        #: Job names act skipped as deterministic failures.
        self.deterministic: set[str] = set()
        #: idempotency key -> request, in log order.
        self.requests: dict[str, RetryRequested] = {}
        #: keys of requests with a final outcome (issued, final failure, dry-run skip).
        self.outcomes: set[str] = set()
        #: keys of requests whose provider call failed at least once in a way worth trying
        #: again (``RetryFailed(will_retry)``): ``run_due`` owns them, after the failure
        #: backoff, and a redelivered verdict must not call at once.
        self.failing: set[str] = set()
        #: verdict event ids act already decided on (a redelivery must not decide twice).
        self.decided_verdicts: set[Any] = set()
        self.events = 0
        self.jobs_by_event: dict[Any, JobFinished] = {}
        #: job id -> its latest JobFinished (from RecordedEvents).
        self.job_by_id: dict[str, JobFinished] = {}
        #: job id -> stream version of its latest JobFinished, for what was folded from slim
        #: views (``views.load_state``), which do not keep the event; ``views.find_job`` reads it.
        self.job_versions: dict[str, int] = {}
        #: Stream version of the last RecordedEvent folded (0: none): lets a caller keep the
        #: state and fold only what was appended since.
        self.version = 0

    def history(self, name: str) -> JobHistory:
        h = self.jobs.get(name)
        if h is None:
            h = self.jobs[name] = JobHistory()
        return h

    def pending(self) -> list[RetryRequested]:
        """Requests (not dry-run) with no final outcome yet: scheduled or interrupted."""
        return [r for k, r in self.requests.items() if k not in self.outcomes and not r.dry_run]

    def feed(self, events: Iterable[Any]) -> BudgetState:
        """Apply events in stream order: RecordedEvents, bare Events, or replay's slim views
        (``views``: same field names, fewer fields). A tight loop: replay runs it over the
        whole log, so dispatch is one dict lookup on the class and nothing is allocated for
        events that do not change a budget."""
        jobs = self.jobs
        names = self.job_names
        requests = self.requests
        outcomes = self.outcomes
        kinds = _KINDS
        n = 0
        data: Any
        for item in events:
            n += 1
            kind = kinds.get(type(item), 0)
            if kind == _JOB:  # the most common event first
                data = item
            elif kind == _RECORDED:
                data = item.data
                self.version = item.stream_version
                kind = kinds.get(type(data), 0)
                if kind == _JOB:
                    self.jobs_by_event[item.event_id] = data
                    self.job_by_id[data.job_id] = data
            else:
                data = item
            if kind == _JOB:
                name = data.job_name
                names.add(name)
                h = jobs.get(name)
                if h is None:
                    h = jobs[name] = JobHistory()
                a = data.attempt
                # First sighting of an attempt wins (the same attempt id may be seen again).
                h.attempts.setdefault(data.job_id if a is None else f"{data.job_id}#{a}", a)
            elif kind == _REQUESTED:
                key = data.idempotency_key
                if key in requests:
                    continue
                requests[key] = data
                self.retries_requested += 1
                h = jobs.get(data.job_name)
                if h is None:
                    h = jobs[data.job_name] = JobHistory()
                h.requested[_attempt_of(key, data.job_id)] = data
                if data.resources is not None:
                    h.resources = data.resources
                if data.verdict_event_id is not None:
                    self.decided_verdicts.add(data.verdict_event_id)
            elif kind == _SKIPPED:
                if data.reason == "dry_run":
                    # The dry-run outcome of a request; its detail starts with the request key.
                    outcomes.add(data.detail.split(" ", 1)[0])
                    continue
                if data.reason == "not_retryable" and data.category == "deterministic":
                    self.deterministic.add(data.job_name)
                if data.verdict_event_id is not None:
                    self.decided_verdicts.add(data.verdict_event_id)
            elif kind == _ISSUED:
                outcomes.add(data.idempotency_key)
            elif kind == _FAILED:
                if data.will_retry:
                    self.failing.add(data.idempotency_key)
                else:
                    outcomes.add(data.idempotency_key)
            elif kind == _PIPELINE:
                for ref in data.jobs:
                    names.add(ref.name)
        self.events += n
        return self

    # --- queries used by decide and replay ------------------------------------------------

    def retries_used(
        self, name: str, aid: str, order: tuple[int, int, str, int], budget: BudgetClass
    ) -> tuple[int, int, bool]:
        """(retries charged to ``budget``, all retries, newer attempt exists) before attempt
        ``aid`` of job ``name``."""
        h = self.jobs.get(name)
        if h is None:
            return 0, 0, False
        charged = total = 0
        newer = False
        for other, provider_attempt in h.attempts.items():
            if other == aid:
                continue
            if attempt_order(other.split("#", 1)[0], provider_attempt) > order:
                newer = True
                continue
            total += 1
            req = h.requested.get(other)
            if req is None or req.budget == budget:
                charged += 1
        return charged, total, newer


_RECORDED, _JOB, _REQUESTED, _SKIPPED, _ISSUED, _FAILED, _PIPELINE = range(1, 8)
#: Class -> what the fold does with it. ``register_view`` adds the slim decoders of ``views``.
_KINDS: dict[type, int] = {
    RecordedEvent: _RECORDED,
    JobFinished: _JOB,
    RetryRequested: _REQUESTED,
    RetrySkipped: _SKIPPED,
    RetryIssued: _ISSUED,
    RetryFailed: _FAILED,
    PipelineFinished: _PIPELINE,
}


def register_view(cls: type, like: type[Event]) -> None:
    """Let the fold take ``cls`` (a slim decoder of ``like``'s body) wherever it takes ``like``."""
    _KINDS[cls] = _KINDS[like]


def _attempt_of(key: str, job_id: str) -> str:
    # Keys are act:<source>:<project>:<attempt id>:<action>; projects may contain ':' so the
    # attempt id is taken from the right.
    parts = key.rsplit(":", 2)
    return parts[1] if len(parts) == 3 else job_id


def fold_budget(
    pipeline_events: Iterable[RecordedEvent | Event],
    job_events: Iterable[RecordedEvent | Event] = (),
) -> BudgetState:
    """Fold a pipeline's stream (and optionally the job's stream) into its budgets.

    Job streams hold verdicts and pod facts, which budgets do not count (decide takes the verdict
    itself); they are folded so a JobFinished that only reached the job stream still counts."""
    state = BudgetState().feed(pipeline_events)
    extra = [
        e
        for e in job_events
        if _KINDS.get(type(e.data if isinstance(e, RecordedEvent) else e)) == _JOB
    ]
    if extra:
        state.feed(extra)
    return state


# --- decide -------------------------------------------------------------------------------


def _unit(key: str) -> float:
    """A number in [0, 1) derived from the key: jitter that a replay reproduces."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def _opted_out(settings: Settings, verdict: VerdictReached, job: JobFinished | None) -> str | None:
    user = job.user if job else None
    message = (job.commit_message or "") if job else ""
    labels = set(job.labels) if job else set()
    ref = job.ref if job else None
    if user and user in settings.ignored_users:
        return f"user {user!r} is ignored (bot)"
    out = settings.opt_out
    if user and user in out.users:
        return f"user {user!r} opted out"
    if ref and any(fnmatchcase(ref, p) for p in out.refs):
        return f"ref {ref!r} opted out"
    for marker in out.markers:
        if marker and marker in message:
            return f"commit message carries {marker!r}"
    for label in out.labels:
        if label in labels:
            return f"label {label!r}"
    if not settings.enabled:
        opted_in = any(m and m in message for m in settings.opt_in.markers) or any(
            lbl in labels for lbl in settings.opt_in.labels
        )
        if not opted_in:
            return "retries are off for this scope and no opt-in marker or label is present"
    return None


def _scale(current: Resources | None, settings: Settings) -> tuple[Resources | None, str]:
    """The next size for an OOM rerun, or None with the reason when the cap is reached."""
    rs = settings.resources
    mem = (current.memory_limit_mb if current else None) or rs.base_memory_mb
    if mem >= rs.memory_cap_mb:
        return None, f"memory {mem} MB already at the cap of {rs.memory_cap_mb} MB"
    new_mem = min(rs.memory_cap_mb, int(mem * rs.memory_factor))
    if new_mem <= mem:
        return None, f"memory factor {rs.memory_factor} does not grow {mem} MB"
    cpu_req = current.cpu_request_millis if current else None
    cpu_lim = current.cpu_limit_millis if current else None
    if rs.cpu_factor > 1.0:
        cpu = cpu_lim or rs.base_cpu_millis
        cpu_lim = min(rs.cpu_cap_millis, int(cpu * rs.cpu_factor))
        cpu_req = cpu_lim
    return (
        Resources(
            memory_request_mb=new_mem,
            memory_limit_mb=new_mem,
            cpu_request_millis=cpu_req,
            cpu_limit_millis=cpu_lim,
        ),
        "",
    )


def decide(
    state: BudgetState,
    verdict: VerdictReached,
    policy: Policy,
    job: JobFinished | None,
    now: dt.datetime,
    *,
    verdict_event_id: Any = None,
) -> Decision:
    """The decision for ``verdict`` given the pipeline's budgets. Pure.

    Checks run from the most specific reason to the most general: who asked not to be retried,
    whether the failure is retryable at all, whether the pipeline is broken, then the job's and
    the pipeline's budgets, then resources. The first that says no is the recorded reason.
    """
    ref = job.ref if job else None
    scope = policy.scope_for(verdict.project, ref)
    settings = scope.settings
    attempt = job.attempt if job is not None and job.job_id == verdict.job_id else None
    aid = attempt_id(verdict.job_id, attempt)
    order = attempt_order(verdict.job_id, attempt)
    budget = verdict.budget
    limits = settings.attempts
    charged, total, newer = state.retries_used(verdict.job_name, aid, order, budget)
    used = total if limits.combined is not None else charged
    job_limit = limits.limit_for(budget)
    jobs = max(len(state.job_names), 1)
    pipeline_limit = settings.pipeline.limit(jobs)
    deterministic = len(state.deterministic)
    snapshot = BudgetSnapshot(
        job_attempts=used,
        job_limit=job_limit,
        pipeline_retries=state.retries_requested,
        pipeline_limit=pipeline_limit,
        pipeline_jobs=jobs,
        deterministic_failures=deterministic,
    )
    policy_id = f"{policy.ident}:{scope.name}"
    action: Action = verdict.action

    def skip(reason: SkipReason, detail: str, would: Action | None = None) -> RetrySkipped:
        return RetrySkipped(
            source=verdict.source,
            project=verdict.project,
            pipeline_id=verdict.pipeline_id,
            job_id=verdict.job_id,
            job_name=verdict.job_name,
            reason=reason,
            detail=detail,
            category=verdict.category,
            snapshot=snapshot,
            would_action=would,
            verdict_event_id=verdict_event_id,
            policy=policy_id,
        )

    reason = _opted_out(settings, verdict, job)
    if reason is not None:
        return skip("opted_out", reason, action if action != "none" else None)
    if not verdict.retryable or action not in _RETRY_ACTIONS:
        return skip(
            "not_retryable",
            f"category {verdict.category} is not retryable (classifier action {action})",
        )
    if newer:
        # Someone (a person, GitLab's retry:, or act for an earlier verdict) already retried it.
        return skip("not_retryable", f"a newer attempt of {verdict.job_name} exists", action)
    h = state.jobs.get(verdict.job_name)
    existing = h.requested.get(aid) if h is not None else None
    if existing is not None:
        # This attempt already has a request (a second verdict for the same attempt): the same
        # decision again, which the log's idempotency key stores once.
        return existing
    if settings.mostly_broken.broken(deterministic, jobs):
        return skip(
            "pipeline_mostly_broken",
            f"{deterministic} of {jobs} jobs failed deterministically",
            action,
        )
    if used >= job_limit:
        what = "all classes" if limits.combined is not None else f"{budget} budget"
        return skip(
            "job_budget_exhausted",
            f"{verdict.job_name}: {used} retries of {job_limit} allowed ({what})",
            action,
        )
    if state.retries_requested >= pipeline_limit:
        return skip(
            "pipeline_budget_exhausted",
            f"{state.retries_requested} retries of {pipeline_limit} allowed for {jobs} jobs",
            action,
        )
    current = h.resources if h is not None else None
    resources = current
    if action == "rerun_with_resources":
        resources, why = _scale(current, settings)
        if resources is None:
            return skip("resource_cap_reached", why, action)
    key = idempotency_key(verdict.source, verdict.project, verdict.job_id, attempt, action)
    delay = settings.backoff_for(verdict.category).delay(total, _unit(key))
    return RetryRequested(
        source=verdict.source,
        project=verdict.project,
        pipeline_id=verdict.pipeline_id,
        job_id=verdict.job_id,
        job_name=verdict.job_name,
        action=action,
        idempotency_key=key,
        category=verdict.category,
        budget=budget,
        snapshot=snapshot,
        not_before=now + dt.timedelta(seconds=delay) if delay > 0 else None,
        resources=resources,
        dry_run=settings.dry_run,
        verdict_event_id=verdict_event_id,
        policy=policy_id,
    )


def dry_run_outcome(request: RetryRequested) -> RetrySkipped:
    """What closes a dry-run request: the call act would have made, recorded, not made."""
    return RetrySkipped(
        source=request.source,
        project=request.project,
        pipeline_id=request.pipeline_id,
        job_id=request.job_id,
        job_name=request.job_name,
        reason="dry_run",
        detail=f"{request.idempotency_key} dry run: would {request.action}",
        category=request.category,
        snapshot=request.snapshot,
        would_action=request.action,
        verdict_event_id=request.verdict_event_id,
        policy=request.policy,
    )


def is_due(request: RetryRequested, now: dt.datetime) -> bool:
    return request.not_before is None or request.not_before <= now


__all__ = [
    "BudgetState",
    "Decision",
    "JobHistory",
    "attempt_id",
    "attempt_order",
    "decide",
    "dry_run_outcome",
    "fold_budget",
    "idempotency_key",
    "is_due",
    "outcome_key",
]
