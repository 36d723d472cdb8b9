"""What each event changes in the audit read models: pure functions, no I/O.

``changes_for(event)`` turns one recorded event into row changes (small frozen values);
``Batch`` folds the changes of many events into as few statements as possible (partial rows of
one job merged, counters summed) for the projector to apply in one transaction. The projector
applies a batch's change kinds in a fixed order that respects what depends on what (jobs before
retries, verdicts before feedback), so the result is the same as applying event by event.

Counts are bucketed by the hour of the event's ``recorded_at``: the log's own clock, so a
rebuild from position 0 yields the same buckets, and a provider's skewed clock cannot scatter
them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ciretry.common.events import (
    JobFinished,
    OutcomeRecorded,
    PipelineFinished,
    PipelineLinked,
    PodTerminated,
    RecordedEvent,
    RetryFailed,
    RetryIssued,
    RetryParked,
    RetryRequested,
    RetrySkipped,
    VerdictConfirmed,
    VerdictDisputed,
    VerdictReached,
)

SUCCESS_STATUSES: Final = frozenset({"success", "succeeded", "completed", "passed"})
NOT_FAILED_STATUSES: Final = SUCCESS_STATUSES | frozenset(
    {"canceled", "cancelled", "canceling", "superseded", "skipped", "manual", "created",
     "pending", "running"}
)  # fmt: skip
BUDGET_REASONS: Final = frozenset({"job_budget_exhausted", "pipeline_budget_exhausted"})
UNKNOWN: Final = "(unknown)"
ATTEMPT_SEP: Final = "\x01"

#: Columns of audit_jobs a JobRow may set (the SQL is built from these constants only).
JOB_COLUMNS: Final = (
    "pipeline_id", "job_name", "order_key", "status", "stage", "runner", "ref", "attempt",
    "failure_reason", "exit_code", "finished_at", "verdict_event_id", "category", "retryable",
    "budget", "rules", "decision", "decision_action", "decision_reason", "decision_detail",
    "dry_run", "retry_job_id", "observed_memory_mb", "requested_memory_mb", "call_status",
)  # fmt: skip
PIPELINE_COLUMNS: Final = ("status", "ref", "sha", "user", "pipeline_retries", "pipeline_limit",
                           "pipeline_jobs")  # fmt: skip
PIPELINE_COUNTERS: Final = (
    "jobs_finished", "jobs_failed", "verdicts", "retries_requested", "retries_skipped",
    "retries_issued", "retries_failed", "budget_exhausted",
)  # fmt: skip

Key3 = tuple[str, str, str]


def is_failure(status: str) -> bool:
    return status.lower() not in NOT_FAILED_STATUSES


def order_key(job_id: str, attempt: int | None) -> str:
    """A string whose byte order is act's attempt order (``budget.attempt_order``): numeric ids
    numerically, then the provider's attempt number. Stored, so SQL can compare attempts."""
    numeric = job_id.isdigit() and len(job_id) <= 30
    # The id itself after its value: act breaks ties of equal values ("01", "1") by the text.
    head = f"0:{int(job_id):030d}:{job_id}" if numeric else f"1:{job_id}"
    # \x01 sorts before any character of an id, so "ab" < "ab!" as in Python's comparison.
    return f"{head}{ATTEMPT_SEP}{(attempt if attempt is not None else -1) + 1:09d}"


def request_order_key(job_id: str, idempotency_key: str) -> str:
    """Order key of the attempt a retry request is about. act's key names the provider attempt
    when it knew one; without it, every attempt of the same job id counts as this one ('~'
    sorts after the digits), so only a later job id settles the retry."""
    attempt = _attempt_from_key(idempotency_key)
    if attempt is not None:
        return order_key(job_id, attempt)
    return order_key(job_id, None).rsplit(ATTEMPT_SEP, 1)[0] + ATTEMPT_SEP + "~"


def bucket_of(ts: dt.datetime) -> dt.datetime:
    return ts.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


# --- changes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRow:
    """Partial row of audit_jobs: only the given columns are set (later values win)."""

    key: Key3
    fields: Mapping[str, Any]
    position: int


@dataclass(frozen=True, slots=True)
class JobEventLink:
    key: Key3
    position: int


@dataclass(frozen=True, slots=True)
class VerdictRow:
    event_id: uuid.UUID
    source: str
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    category: str
    retryable: bool
    rules: tuple[str, ...]
    recorded_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SignatureRow:
    """A failed job's verdict with a signature: one member of a failure cluster."""

    event_id: uuid.UUID
    signature: str
    algorithm: str
    text: str
    examples: tuple[str, ...]
    source: str
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    category: str
    retryable: bool
    learned: bool
    recorded_at: dt.datetime
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class SignatureOutcome:
    """How the failure behind a verdict ended (``OutcomeRecorded``)."""

    verdict_event_id: uuid.UUID
    outcome: str


@dataclass(frozen=True, slots=True)
class PipelineRow:
    key: Key3
    fields: Mapping[str, Any]
    seen_at: dt.datetime


@dataclass(frozen=True, slots=True)
class PipelineCount:
    key: Key3
    column: str
    seen_at: dt.datetime
    n: int = 1


@dataclass(frozen=True, slots=True)
class Stat:
    kind: str
    bucket: dt.datetime
    source: str
    project: str
    key: str
    n: int = 1


@dataclass(frozen=True, slots=True)
class RetryRow:
    source: str
    project: str
    pipeline_id: str
    job_id: str
    job_name: str
    order_key: str
    idempotency_key: str
    action: str
    category: str
    dry_run: bool
    requested_at: dt.datetime
    origin_pipeline_id: str | None = None


@dataclass(frozen=True, slots=True)
class ChainRow:
    """``pipeline_id`` belongs to the chain of ``origin_pipeline_id`` (None: the origin of the
    request ``retry_of``, looked up in audit_retries)."""

    source: str
    project: str
    pipeline_id: str
    origin_pipeline_id: str | None = None
    retry_of: str | None = None
    asked_memory_mb: int | None = None


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """A job attempt finished: settles the outcome of retries of earlier attempts."""

    source: str
    project: str
    pipeline_id: str
    job_name: str
    job_id: str
    order_key: str
    passed: bool
    bucket: dt.datetime


@dataclass(frozen=True, slots=True)
class AllocationRow:
    """A resource change for (project, job name); the ref comes from the job's row."""

    source: str
    project: str
    job_name: str
    job_id: str
    at: dt.datetime
    memory_request_mb: int | None = None
    memory_limit_mb: int | None = None
    cpu_request_millis: int | None = None
    cpu_limit_millis: int | None = None
    oom: bool = False


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    event_id: uuid.UUID
    verdict_event_id: uuid.UUID
    kind: str
    who: str
    why: str | None
    correct_category: str | None
    recorded_at: dt.datetime
    position: int


Change = (
    JobRow | JobEventLink | VerdictRow | PipelineRow | PipelineCount | Stat | RetryRow
    | AttemptFinished | AllocationRow | FeedbackRow | ChainRow | SignatureRow | SignatureOutcome
)  # fmt: skip


def _fields(**values: Any) -> dict[str, Any]:
    # None means "unknown here", never "clear it": a later event with less detail must not
    # erase what an earlier one said.
    return {k: v for k, v in values.items() if v is not None}


def changes_for(event: RecordedEvent) -> list[Change]:
    """The read-model changes one event causes. Events the audit does not show change nothing."""
    d = event.data
    at = event.recorded_at
    bucket = bucket_of(at)
    pos = event.position
    out: list[Change] = []
    if isinstance(d, JobFinished):
        key = (d.source, d.project, d.job_id)
        pkey = (d.source, d.project, d.pipeline_id)
        okey = order_key(d.job_id, d.attempt)
        failed = is_failure(d.status)
        out += [
            JobRow(
                key,
                _fields(
                    pipeline_id=d.pipeline_id,
                    job_name=d.job_name,
                    order_key=okey,
                    status=d.status,
                    stage=d.stage,
                    runner=d.runner,
                    ref=d.ref,
                    attempt=d.attempt,
                    failure_reason=d.failure_reason,
                    exit_code=d.exit_code,
                    finished_at=d.finished_at,
                ),
                pos,
            ),  # fmt: skip
            JobEventLink(key, pos),
            PipelineRow(pkey, _fields(ref=d.ref, sha=d.sha, user=d.user), at),
            PipelineCount(pkey, "jobs_finished", at),
            Stat("jobs", bucket, d.source, d.project, d.status),
            AttemptFinished(
                d.source,
                d.project,
                d.pipeline_id,
                d.job_name,
                d.job_id,
                okey,
                d.status.lower() in SUCCESS_STATUSES,
                bucket,
            ),  # fmt: skip
        ]
        if failed:
            out += [
                PipelineCount(pkey, "jobs_failed", at),
                Stat("failures", bucket, d.source, d.project, ""),
                Stat("runner", bucket, d.source, d.project, d.runner or UNKNOWN),
                Stat("job_name", bucket, d.source, d.project, d.job_name),
            ]
    elif isinstance(d, PipelineFinished):
        pkey = (d.source, d.project, d.pipeline_id)
        out.append(
            PipelineRow(pkey, _fields(status=d.status, ref=d.ref, sha=d.sha, user=d.user), at)
        )
    elif isinstance(d, PodTerminated):
        out.append(JobEventLink((d.source, d.project, d.job_id), pos))
    elif isinstance(d, VerdictReached):
        key = (d.source, d.project, d.job_id)
        out += [
            JobRow(
                key,
                _fields(
                    pipeline_id=d.pipeline_id,
                    job_name=d.job_name,
                    verdict_event_id=event.event_id,
                    category=d.category,
                    retryable=d.retryable,
                    budget=d.budget,
                    rules=list(d.rules),
                    observed_memory_mb=d.observed.memory_mb if d.observed else None,
                ),
                pos,
            ),  # fmt: skip
            JobEventLink(key, pos),
            VerdictRow(
                event.event_id,
                d.source,
                d.project,
                d.pipeline_id,
                d.job_id,
                d.job_name,
                d.category,
                d.retryable,
                tuple(d.rules),
                at,
            ),  # fmt: skip
        ]
        # A verdict on a successful job (classify checks rules against passing logs) is not a
        # failure: it must not lower the spurious rate nor count for its rules.
        if str(d.signals.get("status", "")).lower() not in SUCCESS_STATUSES:
            out += [
                PipelineCount((d.source, d.project, d.pipeline_id), "verdicts", at),
                Stat("category", bucket, d.source, d.project, d.category),
            ]
            if d.retryable:
                out.append(Stat("retryable", bucket, d.source, d.project, d.category))
            out += [Stat("rule", bucket, d.source, d.project, r) for r in dict.fromkeys(d.rules)]
            if d.category == "oom":
                out.append(AllocationRow(d.source, d.project, d.job_name, d.job_id, at, oom=True))
            if d.signature is not None:
                sig = d.signature
                out.append(
                    SignatureRow(event.event_id, sig.id, sig.algorithm, sig.text, sig.examples,
                                 d.source, d.project, d.pipeline_id, d.job_id, d.job_name,
                                 d.category, d.retryable, d.learned is not None, at,
                                 d.rules[0] if d.rules else None)
                )  # fmt: skip
    elif isinstance(d, OutcomeRecorded):
        out.append(SignatureOutcome(d.verdict_event_id, d.outcome))
    elif isinstance(d, RetryRequested):
        key = (d.source, d.project, d.job_id)
        pkey = (d.source, d.project, d.pipeline_id)
        s = d.snapshot
        out += [
            JobRow(
                key,
                _fields(
                    pipeline_id=d.pipeline_id,
                    job_name=d.job_name,
                    decision="requested",
                    decision_action=d.action,
                    dry_run=d.dry_run,
                    requested_memory_mb=d.resources.memory_mb if d.resources else None,
                ),
                pos,
            ),  # fmt: skip
            JobEventLink(key, pos),
            PipelineRow(
                pkey,
                # The snapshot was taken before this request: it is one more retry now.
                _fields(
                    pipeline_retries=s.pipeline_retries + 1,
                    pipeline_limit=s.pipeline_limit,
                    pipeline_jobs=s.pipeline_jobs,
                ),
                at,
            ),  # fmt: skip
            PipelineCount(pkey, "retries_requested", at),
            Stat("decision", bucket, d.source, d.project, f"requested:{d.action}"),
            RetryRow(
                d.source,
                d.project,
                d.pipeline_id,
                d.job_id,
                d.job_name,
                request_order_key(d.job_id, d.idempotency_key),
                d.idempotency_key,
                d.action,
                d.category,
                d.dry_run,
                at,
                d.origin_pipeline_id,
            ),  # fmt: skip
        ]
        if d.origin_pipeline_id is not None:
            out.append(ChainRow(d.source, d.project, d.pipeline_id, d.origin_pipeline_id))
        if d.action == "rerun_with_resources" and d.resources is not None:
            r = d.resources
            out.append(
                AllocationRow(
                    d.source, d.project, d.job_name, d.job_id, at,
                    memory_request_mb=r.memory_request_mb, memory_limit_mb=r.memory_limit_mb,
                    cpu_request_millis=r.cpu_request_millis, cpu_limit_millis=r.cpu_limit_millis,
                )
            )  # fmt: skip
    elif isinstance(d, RetrySkipped):
        key = (d.source, d.project, d.job_id)
        pkey = (d.source, d.project, d.pipeline_id)
        s = d.snapshot
        out += [
            JobRow(
                key,
                _fields(
                    pipeline_id=d.pipeline_id,
                    job_name=d.job_name,
                    decision="skipped",
                    decision_action=d.would_action,
                    decision_reason=d.reason,
                    decision_detail=d.detail,
                ),
                pos,
            ),  # fmt: skip
            JobEventLink(key, pos),
            PipelineRow(
                pkey,
                _fields(
                    pipeline_retries=s.pipeline_retries,
                    pipeline_limit=s.pipeline_limit,
                    pipeline_jobs=s.pipeline_jobs,
                ),
                at,
            ),  # fmt: skip
            PipelineCount(pkey, "retries_skipped", at),
            Stat("decision", bucket, d.source, d.project, f"skipped:{d.reason}"),
        ]
        if d.reason in BUDGET_REASONS:
            out += [
                PipelineCount(pkey, "budget_exhausted", at),
                Stat("budget_exhausted", bucket, d.source, d.project, d.reason),
            ]
        if d.origin_pipeline_id is not None and d.reason != "dry_run":
            out.append(ChainRow(d.source, d.project, d.pipeline_id, d.origin_pipeline_id))
    elif isinstance(d, RetryParked):
        # Held back by a retry storm, nothing spent: decided again when the storm ends.
        key = (d.source, d.project, d.job_id)
        out += [
            JobRow(
                key,
                _fields(
                    pipeline_id=d.pipeline_id,
                    job_name=d.job_name,
                    decision="parked",
                    decision_action=d.would_action,
                    decision_detail=d.detail,
                ),
                pos,
            ),  # fmt: skip
            JobEventLink(key, pos),
            Stat("decision", bucket, d.source, d.project, "parked"),
        ]
    elif isinstance(d, RetryIssued):
        key = (d.source, d.project, d.job_id)
        pkey = (d.source, d.project, d.pipeline_id)
        out += [
            JobRow(key, _fields(retry_job_id=d.new_job_id, call_status="issued"), pos),
            JobEventLink(key, pos),
            PipelineCount(pkey, "retries_issued", at),
            Stat("decision", bucket, d.source, d.project, "issued"),
        ]
        origin = d.origin_pipeline_id or d.pipeline_id
        if d.new_pipeline_id is not None and d.new_pipeline_id != origin:
            out.append(ChainRow(d.source, d.project, d.new_pipeline_id, origin))
    elif isinstance(d, PipelineLinked):
        out.append(
            ChainRow(
                d.source,
                d.project,
                d.pipeline_id,
                retry_of=d.retry_of,
                asked_memory_mb=d.resources.memory_mb if d.resources else None,
            )
        )
    elif isinstance(d, RetryFailed):
        key = (d.source, d.project, d.job_id)
        out.append(JobEventLink(key, pos))
        if not d.will_retry:
            out += [
                JobRow(key, _fields(call_status="failed"), pos),
                PipelineCount((d.source, d.project, d.pipeline_id), "retries_failed", at),
                Stat("decision", bucket, d.source, d.project, "call_failed"),
            ]
    elif isinstance(d, VerdictDisputed | VerdictConfirmed):
        kind = "disputed" if isinstance(d, VerdictDisputed) else "confirmed"
        correct = d.correct_category if isinstance(d, VerdictDisputed) else None
        out.append(
            FeedbackRow(event.event_id, d.verdict_event_id, kind, d.who, d.why, correct, at, pos)
        )
    return out


def _attempt_from_key(key: str) -> int | None:
    # act:<source>:<project>:<job id>[#<attempt>]:<action>; the project may contain ':'.
    parts = key.rsplit(":", 2)
    if len(parts) != 3 or "#" not in parts[1]:
        return None
    tail = parts[1].rsplit("#", 1)[1]
    return int(tail) if tail.isdigit() else None


# --- batching -----------------------------------------------------------------------------


@dataclass
class Batch:
    """The changes of many events, merged so each table gets one statement."""

    jobs: dict[Key3, dict[str, Any]] = field(default_factory=dict)
    job_positions: dict[Key3, tuple[int, int]] = field(default_factory=dict)
    links: list[JobEventLink] = field(default_factory=list)
    verdicts: list[VerdictRow] = field(default_factory=list)
    pipelines: dict[Key3, dict[str, Any]] = field(default_factory=dict)
    pipeline_seen: dict[Key3, tuple[dt.datetime, dt.datetime]] = field(default_factory=dict)
    pipeline_counts: Counter[tuple[Key3, str]] = field(default_factory=Counter)
    stats: Counter[tuple[str, dt.datetime, str, str, str]] = field(default_factory=Counter)
    retries: list[RetryRow] = field(default_factory=list)
    attempts: list[AttemptFinished] = field(default_factory=list)
    allocations: list[AllocationRow] = field(default_factory=list)
    feedback: list[FeedbackRow] = field(default_factory=list)
    signatures: list[SignatureRow] = field(default_factory=list)
    signature_outcomes: list[SignatureOutcome] = field(default_factory=list)
    #: One row per pipeline (a multi-row upsert may touch a row once): what the batch says of it.
    chains: dict[Key3, ChainRow] = field(default_factory=dict)
    events: int = 0
    last_position: int = 0

    def add_event(self, event: RecordedEvent) -> None:
        for change in changes_for(event):
            self.add(change)
        self.events += 1
        self.last_position = max(self.last_position, event.position)

    def add(self, c: Change) -> None:
        if isinstance(c, JobRow):
            self.jobs.setdefault(c.key, {}).update(c.fields)
            first, last = self.job_positions.get(c.key, (c.position, c.position))
            self.job_positions[c.key] = (min(first, c.position), max(last, c.position))
        elif isinstance(c, JobEventLink):
            self.links.append(c)
        elif isinstance(c, VerdictRow):
            self.verdicts.append(c)
        elif isinstance(c, PipelineRow):
            self.pipelines.setdefault(c.key, {}).update(c.fields)
            self._seen(c.key, c.seen_at)
        elif isinstance(c, PipelineCount):
            self.pipeline_counts[(c.key, c.column)] += c.n
            self._seen(c.key, c.seen_at)
        elif isinstance(c, Stat):
            self.stats[(c.kind, c.bucket, c.source, c.project, c.key)] += c.n
        elif isinstance(c, RetryRow):
            self.retries.append(c)
        elif isinstance(c, AttemptFinished):
            self.attempts.append(c)
        elif isinstance(c, AllocationRow):
            self.allocations.append(c)
        elif isinstance(c, FeedbackRow):
            self.feedback.append(c)
        elif isinstance(c, SignatureRow):
            self.signatures.append(c)
        elif isinstance(c, SignatureOutcome):
            self.signature_outcomes.append(c)
        elif isinstance(c, ChainRow):
            key = (c.source, c.project, c.pipeline_id)
            known = self.chains.get(key)
            if known is not None:
                c = ChainRow(
                    c.source,
                    c.project,
                    c.pipeline_id,
                    c.origin_pipeline_id or known.origin_pipeline_id,
                    c.retry_of or known.retry_of,
                    c.asked_memory_mb or known.asked_memory_mb,
                )
            self.chains[key] = c

    def _seen(self, key: Key3, at: dt.datetime) -> None:
        first, last = self.pipeline_seen.get(key, (at, at))
        self.pipeline_seen[key] = (min(first, at), max(last, at))


def batch_of(events: Iterable[RecordedEvent]) -> Batch:
    b = Batch()
    for e in events:
        b.add_event(e)
    return b


__all__ = [
    "AllocationRow",
    "AttemptFinished",
    "Batch",
    "Change",
    "ChainRow",
    "FeedbackRow",
    "SignatureOutcome",
    "SignatureRow",
    "JobEventLink",
    "JobRow",
    "PipelineCount",
    "PipelineRow",
    "RetryRow",
    "Stat",
    "VerdictRow",
    "batch_of",
    "bucket_of",
    "changes_for",
    "is_failure",
    "order_key",
]
