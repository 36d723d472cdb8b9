"""Budgets as folds over the log, and the retry decision as a pure function of them.

Nothing here does I/O or reads a clock: ``fold_budget`` turns a chain's events into a
``BudgetState`` and ``decide`` turns (state, verdict, policy, job, now) into the event act appends.
``replay`` runs the very same fold over the whole log, so what was decided can be re-derived.

**Attempt chains.** A budget belongs to a *chain*: the origin pipeline and every pipeline act
created to rerun one of its jobs (``recreate_pipeline``, ``rerun_with_resources`` on GitLab), and
the pipelines those reruns created, and so on. Every decision about any job of the chain is stored
in the origin's stream (``events.decision_stream``); the other pipelines' streams hold only job
facts (``JobFinished``, ``PipelineFinished``, ``PipelineLinked``). A chain's state is the fold of
the origin's stream and of its members' streams (``members``: pipelines its decisions name). The
state folds the review stream of the chain's ref too (merge request labels, for opt-out).

Counting rules (DESIGN "count attempts from the record"):

* attempts of a job = ``JobFinished`` events of the chain with the job's name, ordered by job
  id (numerically when the ids are numbers; then by the provider's attempt number, since a
  Taskcluster task keeps its id across runs), manual retries included; an attempt that passed
  is not a retry of the one after it (a recreated pipeline runs every job again);
* a retry from attempt k to k+1 is charged to the budget class of act's ``RetryRequested`` for
  attempt k; a retry act did not request (manual, or by another tool) is charged to the class
  being asked for now, so it can only make act more cautious;
* the pipeline budget counts every ``RetryRequested`` of the chain, dry-run ones included
  (dry-run must show what real mode would have spent); a later ``RetryFailed`` refunds nothing;
* deterministic failures = job names act skipped as ``not_retryable`` with category
  ``deterministic``: act writes those skips into the pipeline stream itself, so it learns of the
  other jobs' deterministic verdicts without reading their job streams;
* the size of a rerun with more memory = ``max(size of the container that died (the verdict's
  ``observed``), last size the chain asked for, base) x factor``, capped; never below what died.
  A later retry for another reason (a preemption) keeps the larger size.
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
    MergeRequestUpdated,
    PipelineFinished,
    PipelineLinked,
    RecordedEvent,
    Resources,
    RetryFailed,
    RetryIssued,
    RetryParked,
    RetryRequested,
    RetrySkipped,
    SkipReason,
    VerdictReached,
)
from ciretry.common.resources import larger

from .policy import Policy, Settings
from .slim import (
    JobFinishedView,
    PipelineFinishedView,
    RetryFailedView,
    RetryIssuedView,
    RetrySkippedView,
)

Decision = RetryRequested | RetrySkipped | RetryParked

_RETRY_ACTIONS: frozenset[str] = frozenset(
    {"retry_job", "recreate_pipeline", "rerun_with_resources"}
)
#: Sources whose executor can rerun a job with a different size (GitLab: a new pipeline with the
#: Kubernetes executor's overwrite variables). GitHub Actions reruns on the same runner label;
#: Taskcluster's rerun keeps the task definition (its worker pool decides the size); a Buildkite
#: retry runs on the same agent queue.
RESIZABLE_SOURCES: frozenset[str] = frozenset({"gitlab"})
#: Actions that (on GitLab) create a new pipeline on the tip of the ref instead of retrying.
PIPELINE_ACTIONS: frozenset[str] = frozenset({"recreate_pipeline", "rerun_with_resources"})
#: Merge/pull request states in which its labels speak for the branch's pipelines.
OPEN_REVIEW_STATES: frozenset[str] = frozenset({"opened", "open", "reopened", "locked"})


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

    __slots__ = ("attempts", "passed", "requested", "resources")

    def __init__(self) -> None:
        #: attempt id -> provider attempt number, of every attempt seen (JobFinished).
        self.attempts: dict[str, int | None] = {}
        #: attempt ids that succeeded: not retries of what came before them.
        self.passed: set[str] = set()
        #: attempt id -> act's request for that attempt (the retry it caused).
        self.requested: dict[str, RetryRequested] = {}
        #: Size the job runs with after act's last resource change (survives a later preemption).
        self.resources: Resources | None = None

    def copy(self) -> JobHistory:
        h = JobHistory()
        h.attempts, h.passed, h.requested = dict(self.attempts), set(self.passed), dict(self.requested)
        h.resources = self.resources
        return h


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
        "versions",
        "origin",
        "members",
        "links",
        "reviews",
        "parked",
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
        #: job id -> (stream, version) of its latest JobFinished, for what was folded from slim
        #: views (``chains.load_into``), which do not keep the event; ``chains.find_job`` reads it.
        self.job_versions: dict[str, tuple[str, int]] = {}
        #: stream -> version of the last event folded from it (RecordedEvents, or set by the
        #: loader): lets a caller keep the state, fold only what was appended since, and append
        #: a decision with these as expected versions.
        self.versions: dict[str, int] = {}
        #: The chain's origin pipeline id (set by whoever loads the chain; None: not known).
        self.origin: str | None = None
        #: Pipeline streams the chain's decisions name (reruns it created, their jobs' pipelines).
        self.members: set[str] = set()
        #: pipeline id -> its link (the request that created it, and the size it asked for).
        self.links: dict[str, PipelineLinked] = {}
        #: source branch -> request number -> latest update of that merge/pull request.
        self.reviews: dict[str, dict[str, MergeRequestUpdated]] = {}
        #: verdict event id -> its latest park by a retry storm (``storms``): not a decision
        #: that spends anything; the verdict is decided again once the storm has ended.
        self.parked: dict[Any, RetryParked] = {}

    @property
    def version(self) -> int:
        """For a state folded from one stream: that stream's version (0: nothing folded)."""
        return max(self.versions.values(), default=0)

    def history(self, name: str) -> JobHistory:
        h = self.jobs.get(name)
        if h is None:
            h = self.jobs[name] = JobHistory()
        return h

    def pending(self) -> list[RetryRequested]:
        """Requests (not dry-run) with no final outcome yet: scheduled or interrupted."""
        return [r for k, r in self.requests.items() if k not in self.outcomes and not r.dry_run]

    def fork(self) -> BudgetState:
        """A copy to fold tentative events into (decisions not recorded yet), leaving this one
        as the log says. Events are immutable and shared; the containers are copied."""
        other = BudgetState()
        for slot in BudgetState.__slots__:
            value = getattr(self, slot)
            if isinstance(value, dict | set):
                value = value.copy()
            setattr(other, slot, value)
        other.jobs = {name: h.copy() for name, h in self.jobs.items()}
        other.reviews = {branch: dict(of) for branch, of in self.reviews.items()}
        return other

    def feed(self, events: Iterable[Any]) -> BudgetState:
        """Apply events in stream order: RecordedEvents, bare Events, or slim views (``slim``:
        same field names, fewer fields). A tight loop: replay runs it over the
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
                self.versions[item.stream] = item.stream_version
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
                aid = data.job_id if a is None else f"{data.job_id}#{a}"
                # First sighting of an attempt wins (the same attempt id may be seen again).
                h.attempts.setdefault(aid, a)
                if data.status in _PASSED:
                    h.passed.add(aid)
            elif kind == _REQUESTED:
                key = data.idempotency_key
                if key in requests:
                    continue
                requests[key] = data
                self.retries_requested += 1
                self.members.add(f"pipeline-{data.source}-{data.project}-{data.pipeline_id}")
                h = jobs.get(data.job_name)
                if h is None:
                    h = jobs[data.job_name] = JobHistory()
                h.requested[_attempt_of(key, data.job_id)] = data
                if data.resources is not None:
                    h.resources = larger(h.resources, data.resources)
                if data.verdict_event_id is not None:
                    self.decided_verdicts.add(data.verdict_event_id)
            elif kind == _SKIPPED:
                if data.reason == "dry_run":
                    # The dry-run outcome of a request; its detail starts with the request key.
                    outcomes.add(data.detail.split(" ", 1)[0])
                    continue
                self.members.add(f"pipeline-{data.source}-{data.project}-{data.pipeline_id}")
                if data.reason == "not_retryable" and data.category == "deterministic":
                    self.deterministic.add(data.job_name)
                if data.verdict_event_id is not None:
                    self.decided_verdicts.add(data.verdict_event_id)
            elif kind == _ISSUED:
                outcomes.add(data.idempotency_key)
                if data.new_pipeline_id is not None:
                    self.members.add(
                        f"pipeline-{data.source}-{data.project}-{data.new_pipeline_id}"
                    )
            elif kind == _FAILED:
                if data.will_retry:
                    self.failing.add(data.idempotency_key)
                else:
                    outcomes.add(data.idempotency_key)
            elif kind == _PIPELINE:
                for ref in data.jobs:
                    names.add(ref.name)
            elif kind == _LINKED:
                self.links.setdefault(data.pipeline_id, data)
            elif kind == _REVIEW:
                requests_of = self.reviews.setdefault(data.source_branch, {})
                known = requests_of.get(data.number)
                if known is None or _newer_review(data, known):
                    requests_of[data.number] = data
            elif kind == _PARKED:
                self.members.add(f"pipeline-{data.source}-{data.project}-{data.pipeline_id}")
                self.parked[data.verdict_event_id] = data
        self.events += n
        return self

    def merge(self, other: BudgetState) -> None:
        """Fold in another stream's state (folded on its own): what a chain's state is made of
        (the origin's stream, with the decisions, and its members' streams, with job facts).
        Streams are disjoint, so nothing is counted twice."""
        for name, oh in other.jobs.items():
            h = self.history(name)
            for aid, a in oh.attempts.items():
                h.attempts.setdefault(aid, a)
            h.passed |= oh.passed
            for aid, req in oh.requested.items():
                h.requested.setdefault(aid, req)
            h.resources = larger(h.resources, oh.resources)
        self.job_names |= other.job_names
        for key, req in other.requests.items():
            if key not in self.requests:
                self.requests[key] = req
                self.retries_requested += 1
        self.deterministic |= other.deterministic
        self.outcomes |= other.outcomes
        self.failing |= other.failing
        self.decided_verdicts |= other.decided_verdicts
        self.parked.update(other.parked)
        self.members |= other.members
        self.jobs_by_event.update(other.jobs_by_event)
        self.job_by_id.update(other.job_by_id)
        self.job_versions.update(other.job_versions)
        self.versions.update(other.versions)
        for pid, link in other.links.items():
            self.links.setdefault(pid, link)
        for branch, reviews in other.reviews.items():
            mine = self.reviews.setdefault(branch, {})
            for number, review in reviews.items():
                known = mine.get(number)
                if known is None or _newer_review(review, known):
                    mine[number] = review
        self.events += other.events

    def labels_for(self, ref: str | None) -> set[str]:
        """Labels of the open merge/pull requests whose source branch is ``ref``."""
        if not ref:
            return set()
        out: set[str] = set()
        for review in self.reviews.get(ref, {}).values():
            if review.state in OPEN_REVIEW_STATES:
                out.update(review.labels)
        return out

    def asked_size(self, name: str, pipeline_id: str) -> Resources | None:
        """The largest size the chain asked for job ``name``: act's requests, and what the
        pipeline the job ran in was created with (its link)."""
        h = self.jobs.get(name)
        link = self.links.get(pipeline_id)
        return larger(h.resources if h is not None else None, link.resources if link else None)

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
            if other in h.passed:
                continue
            total += 1
            req = h.requested.get(other)
            if req is None or req.budget == budget:
                charged += 1
        return charged, total, newer


_RECORDED, _JOB, _REQUESTED, _SKIPPED, _ISSUED, _FAILED, _PIPELINE, _LINKED, _REVIEW, _PARKED = (
    range(1, 11)
)
#: Class -> what the fold does with it: the events, and the slim decoders (``slim``) that stand
#: for them when a stream is loaded from its bodies (same field names, fewer fields).
_KINDS: dict[type, int] = {
    RecordedEvent: _RECORDED,
    JobFinished: _JOB,
    JobFinishedView: _JOB,
    RetryRequested: _REQUESTED,
    RetrySkipped: _SKIPPED,
    RetrySkippedView: _SKIPPED,
    RetryIssued: _ISSUED,
    RetryIssuedView: _ISSUED,
    RetryFailed: _FAILED,
    RetryFailedView: _FAILED,
    PipelineFinished: _PIPELINE,
    PipelineFinishedView: _PIPELINE,
    PipelineLinked: _LINKED,
    MergeRequestUpdated: _REVIEW,
    RetryParked: _PARKED,
}
#: Job statuses that mean the attempt passed (providers' spellings).
_PASSED: frozenset[str] = frozenset({"success", "succeeded", "completed", "passed"})


def _newer_review(new: MergeRequestUpdated, known: MergeRequestUpdated) -> bool:
    # Hooks arrive out of order: the provider's update time decides, the log order breaks ties.
    if new.updated_at is not None and known.updated_at is not None:
        return new.updated_at >= known.updated_at
    return True


def _attempt_of(key: str, job_id: str) -> str:
    # Keys are act:<source>:<project>:<attempt id>:<action>; projects may contain ':' so the
    # attempt id is taken from the right.
    parts = key.rsplit(":", 2)
    return parts[1] if len(parts) == 3 else job_id


def fold_budget(
    pipeline_events: Iterable[RecordedEvent | Event],
    job_events: Iterable[RecordedEvent | Event] = (),
    *,
    origin: str | None = None,
) -> BudgetState:
    """Fold a chain's events (the origin's stream, then its members' streams) into its budgets.

    Job streams hold verdicts and pod facts, which budgets do not count (decide takes the verdict
    itself); they are folded so a JobFinished that only reached the job stream still counts."""
    state = BudgetState().feed(pipeline_events)
    state.origin = origin
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


def _opted_out(settings: Settings, job: JobFinished | None, labels: set[str]) -> str | None:
    """Why the job's scope, author, ref, commit message or merge request labels say not to
    retry it (``labels``: of the open merge/pull requests of its branch), or None."""
    user = job.user if job else None
    message = (job.commit_message or "") if job else ""
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
            return f"merge request label {label!r}"
    if not settings.enabled:
        opted_in = any(m and m in message for m in settings.opt_in.markers) or any(
            lbl in labels for lbl in settings.opt_in.labels
        )
        if not opted_in:
            return "retries are off for this scope and no opt-in marker or label is present"
    return None


def _scale(
    asked: Resources | None, observed: Resources | None, settings: Settings
) -> tuple[Resources | None, str]:
    """The next size for an OOM rerun, or None with the reason (and the numbers) when it cannot
    grow: ``max(what died, what the chain last asked for, base) x factor``, capped, and never
    below what died."""
    rs = settings.resources
    died = observed.memory_mb if observed else None
    last = asked.memory_mb if asked else None
    mem = max(died or 0, last or 0, rs.base_memory_mb)
    sizes = f"died at {died} MB" if died else "size that died unknown"
    sizes += f", last asked {last} MB" if last else ""
    if mem >= rs.memory_cap_mb:
        return None, (
            f"memory {mem} MB ({sizes}) is already at or above the cap of {rs.memory_cap_mb} MB"
        )
    new_mem = min(rs.memory_cap_mb, int(mem * rs.memory_factor))
    if new_mem <= mem:
        return None, f"memory factor {rs.memory_factor} does not grow {mem} MB ({sizes})"
    base = larger(asked, observed)
    cpu_req = base.cpu_request_millis if base else None
    cpu_lim = base.cpu_limit_millis if base else None
    if rs.cpu_factor > 1.0:
        cpu = max((base.cpu_millis if base else None) or 0, rs.base_cpu_millis)
        cpu_lim = max(cpu, min(rs.cpu_cap_millis, int(cpu * rs.cpu_factor)))
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


class Unknown:
    """Nobody looked (see ``decide``'s ``ref_head``)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = Unknown()


def decide(
    state: BudgetState,
    verdict: VerdictReached,
    policy: Policy,
    job: JobFinished | None,
    now: dt.datetime,
    *,
    verdict_event_id: Any = None,
    ref_head: str | None | Unknown = UNKNOWN,
    storm: str | None = None,
) -> Decision:
    """The decision for ``verdict`` given its chain's budgets (``state``). Pure.

    ``ref_head``: where the job's ref points now (None: the ref is gone), for actions that create
    a pipeline on the tip of the ref; ``UNKNOWN`` when nobody looked (other actions, sources).
    ``storm``: the open retry storm of the verdict's signature (``storms``), if the breaker
    parks it: a retry that every other check allows is parked instead (``RetryParked``, no
    budget spent). A verdict parked before, decided again after its storm, waits a share of
    ``[storm] jitter_s`` (from its key), so the parked jobs do not all retry at once.

    Checks run from the most specific reason to the most general: who asked not to be retried,
    whether the failure is retryable at all, whether the pipeline is broken, then the job's and
    the chain's budgets, then resources. The first that says no is the recorded reason.
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
    origin = state.origin if state.origin != verdict.pipeline_id else None

    #: What every decision about this verdict says about it.
    about: dict[str, Any] = {
        "source": verdict.source,
        "project": verdict.project,
        "pipeline_id": verdict.pipeline_id,
        "job_id": verdict.job_id,
        "job_name": verdict.job_name,
        "category": verdict.category,
        "snapshot": snapshot,
        "verdict_event_id": verdict_event_id,
        "policy": policy_id,
        "origin_pipeline_id": origin,
    }

    def skip(reason: SkipReason, detail: str, would: Action | None = None) -> RetrySkipped:
        return RetrySkipped(**about, reason=reason, detail=detail, would_action=would)

    reason = _opted_out(settings, job, state.labels_for(ref))
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
    detail = None
    if action in PIPELINE_ACTIONS and verdict.source in RESIZABLE_SOURCES:
        moved = _moved(job, ref_head)
        if moved is not None and not settings.recreate_on_moved_ref:
            return skip("superseded", moved, action)
        detail = f"GitLab runs it as a new pipeline on the tip of {ref or 'the ref'}"
        if moved is not None:
            detail += f" ({moved})"
    resources = state.asked_size(verdict.job_name, verdict.pipeline_id)
    if action == "rerun_with_resources":
        if verdict.source not in RESIZABLE_SOURCES:
            return skip(
                "resize_unsupported",
                f"{verdict.source} cannot rerun a job with more memory (the rerun would get the "
                "same size and fail the same way)",
                action,
            )
        resources, why = _scale(resources, verdict.observed, settings)
        if resources is None:
            return skip("resource_cap_reached", why, action)
        if detail is not None and resources.memory_limit_mb:
            detail += f", with KUBERNETES_MEMORY_LIMIT={resources.memory_limit_mb}Mi"
    if storm is not None and verdict.signature is not None and verdict_event_id is not None:
        return RetryParked(
            **about,
            storm_id=storm,
            signature=verdict.signature.id,
            would_action=action,
            detail=(
                f"retry storm {storm}: this failure is failing many pipelines at once; retried "
                "after the storm ends, no budget spent meanwhile"
            ),
        )
    key = idempotency_key(verdict.source, verdict.project, verdict.job_id, attempt, action)
    delay = settings.backoff_for(verdict.category).delay(total, _unit(key))
    if verdict_event_id is not None and verdict_event_id in state.parked:
        delay += policy.storm.jitter_s * _unit(key + ":storm")
    return RetryRequested(
        **about,
        action=action,
        idempotency_key=key,
        budget=budget,
        not_before=now + dt.timedelta(seconds=delay) if delay > 0 else None,
        resources=resources,
        dry_run=settings.dry_run,
        detail=detail,
    )


def _moved(job: JobFinished | None, head: str | None | Unknown) -> str | None:
    """Why the failed commit is no longer the tip of its ref (None: it is, or nobody knows)."""
    if isinstance(head, Unknown) or job is None or not job.sha or not job.ref:
        return None
    if head is None:
        return f"{job.ref} no longer exists"
    if head == job.sha:
        return None
    return (
        f"{job.ref} moved past the failed commit {job.sha[:12]} (now {head[:12]}): the pipeline "
        f"of the newer commit runs {job.job_name} anyway"
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
        origin_pipeline_id=request.origin_pipeline_id,
    )


def is_due(request: RetryRequested, now: dt.datetime) -> bool:
    return request.not_before is None or request.not_before <= now


__all__ = [
    "UNKNOWN",
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
