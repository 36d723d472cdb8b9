""" "Why was this job retried (or not)?": a pure function of the job's timeline.

Every number in the answer comes from the events themselves (the verdict's rules and evidence,
the decision's ``BudgetSnapshot`` and detail), never from current state, so the answer is the
one that was true when act decided, however the budgets moved since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ciretry.common.events import (
    BudgetSnapshot,
    JobFinished,
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


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What the read model knows of the attempt after a retry (None: not finished yet)."""

    outcome: str | None
    job_id: str | None


class ChainAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt of a job in its chain, as the read model has it (sizes in MiB)."""

    job_id: str
    pipeline_id: str | None
    status: str | None
    category: str | None
    decision: str | None
    action: str | None
    reason: str | None
    #: Memory of the container that died (the verdict's observed size).
    observed_memory_mb: int | None
    #: Memory act asked for the rerun of this attempt.
    requested_memory_mb: int | None
    #: Memory the attempt's pipeline was created with (its resource variables).
    asked_memory_mb: int | None


def chain_summary(origin: str | None, attempts: Sequence[ChainAttempt]) -> str:
    """One sentence per attempt of a chain, origin first: what ran, at which size, what act did."""
    parts = [
        f"Attempt chain from pipeline {origin}: {len(attempts)} attempt"
        + ("s" if len(attempts) != 1 else "")
        + "."
    ]
    for n, a in enumerate(attempts, 1):
        where = f"job {a.job_id} in pipeline {a.pipeline_id}"
        size = a.asked_memory_mb or a.observed_memory_mb
        bits = [f"{n}. {where}" + (f" ({size} MB)" if size else "")]
        if a.status:
            bits.append(a.status + (f" as {a.category}" if a.category else ""))
        if a.decision == "requested" and a.action:
            then = a.action
            if a.requested_memory_mb:
                then += f" with {a.requested_memory_mb} MB"
            bits.append(f"act requested {then}")
        elif a.decision == "skipped":
            bits.append(f"act did not retry it ({a.reason})")
        parts.append(", ".join(bits) + ".")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Why:
    summary: str
    facts: dict[str, Any]


def _budget(s: BudgetSnapshot) -> dict[str, int]:
    return {
        "job_attempts": s.job_attempts,
        "job_limit": s.job_limit,
        "pipeline_retries": s.pipeline_retries,
        "pipeline_limit": s.pipeline_limit,
        "pipeline_jobs": s.pipeline_jobs,
        "deterministic_failures": s.deterministic_failures,
    }


def _numbers(s: BudgetSnapshot, budget: str | None) -> str:
    cls = f"{budget} " if budget else ""
    return (
        f"Budget when act decided: the job had used {s.job_attempts} of {s.job_limit} "
        f"{cls}retries; the pipeline had used {s.pipeline_retries} of {s.pipeline_limit} "
        f"retries allowed for its {s.pipeline_jobs} jobs; {s.deterministic_failures} jobs "
        "had failed deterministically."
    )


def _resources(r: Any) -> str:
    parts = []
    if r.memory_request_mb is not None or r.memory_limit_mb is not None:
        parts.append(f"memory request {r.memory_request_mb} MB / limit {r.memory_limit_mb} MB")
    if r.cpu_request_millis is not None or r.cpu_limit_millis is not None:
        parts.append(f"CPU request {r.cpu_request_millis}m / limit {r.cpu_limit_millis}m")
    return ", ".join(parts) or "resources unchanged"


def _skip_sentence(d: RetrySkipped, budget: str | None) -> str:
    s = d.snapshot
    reason = d.reason
    if reason == "not_retryable":
        return f"act did not retry it (not_retryable): {d.detail}."
    if reason == "job_budget_exhausted":
        cls = f"{budget} " if budget else ""
        return (
            f"act did not retry it (job_budget_exhausted): the job had already used "
            f"{s.job_attempts} of its {s.job_limit} {cls}retries ({d.detail})."
        )
    if reason == "pipeline_budget_exhausted":
        return (
            f"act did not retry it (pipeline_budget_exhausted): the pipeline had already used "
            f"{s.pipeline_retries} of the {s.pipeline_limit} retries allowed for its "
            f"{s.pipeline_jobs} jobs."
        )
    if reason == "pipeline_mostly_broken":
        return (
            f"act did not retry it (pipeline_mostly_broken): {s.deterministic_failures} of the "
            f"pipeline's {s.pipeline_jobs} jobs failed deterministically, so retrying would "
            "not make it pass."
        )
    if reason == "opted_out":
        return f"act did not retry it (opted_out): {d.detail}."
    if reason == "resource_cap_reached":
        return f"act did not rerun it with more resources (resource_cap_reached): {d.detail}."
    if reason == "dry_run":
        would = d.would_action or "retry"
        return (
            f"act decided to {would} but runs in dry-run mode (dry_run): the decision was "
            "recorded and counted against the budgets, and the CI API was not called."
        )
    return f"act did not retry it ({reason}): {d.detail}."


def explain(events: Sequence[RecordedEvent], retry: RetryOutcome | None = None) -> Why:
    """The explanation of one job attempt from its timeline (events in log order)."""
    job: JobFinished | None = None
    verdict: RecordedEvent | None = None
    decision: RetryRequested | RetrySkipped | RetryParked | None = None
    dry_run_outcome: RetrySkipped | None = None
    issued: RetryIssued | None = None
    failed: RetryFailed | None = None
    feedback: list[dict[str, Any]] = []
    for e in events:
        d = e.data
        if isinstance(d, JobFinished):
            job = d
        elif isinstance(d, VerdictReached):
            verdict = e
        elif (
            isinstance(d, RetrySkipped)
            and d.reason == "dry_run"
            and isinstance(decision, RetryRequested)
        ):
            # The outcome of a dry-run request, not a new decision.
            dry_run_outcome = d
        elif isinstance(d, RetryRequested | RetrySkipped | RetryParked):
            decision = d
            issued = None
            failed = None
            dry_run_outcome = None
        elif isinstance(d, RetryIssued):
            issued = d
        elif isinstance(d, RetryFailed):
            failed = d
        elif isinstance(d, VerdictDisputed | VerdictConfirmed):
            feedback.append(
                {
                    "kind": "disputed" if isinstance(d, VerdictDisputed) else "confirmed",
                    "who": d.who,
                    "why": d.why,
                    "correct_category": getattr(d, "correct_category", None),
                    "verdict_event_id": str(d.verdict_event_id),
                }
            )

    v = verdict.data if verdict is not None else None
    assert v is None or isinstance(v, VerdictReached)
    parts: list[str] = []
    facts: dict[str, Any] = {
        "job": None,
        "verdict": None,
        "decision": None,
        "execution": None,
        "retry_outcome": None,
        "feedback": feedback,
    }

    ident = job or v or decision
    if ident is None:
        return Why("No events are recorded for this job.", facts)
    name = ident.job_name
    head = (
        f"Job {ident.job_id} '{name}' (pipeline {ident.pipeline_id} of {ident.project} on "
        f"{ident.source})"
    )
    if job is not None:
        facts["job"] = {
            "source": job.source, "project": job.project, "pipeline_id": job.pipeline_id,
            "job_id": job.job_id, "job_name": job.job_name, "status": job.status,
            "attempt": job.attempt, "failure_reason": job.failure_reason,
            "exit_code": job.exit_code, "runner": job.runner, "ref": job.ref,
        }  # fmt: skip
        bits = [f"status {job.status}"]
        if job.failure_reason:
            bits.append(f"failure reason {job.failure_reason}")
        if job.exit_code is not None:
            bits.append(f"exit code {job.exit_code}")
        parts.append(f"{head} finished with {', '.join(bits)}.")
    else:
        parts.append(f"{head}: its JobFinished event is not in the log.")

    if v is None:
        parts.append("classify has not reached a verdict on it, so act has not decided.")
        return Why(" ".join(parts), facts)
    assert verdict is not None
    evidence = [msgspec.to_builtins(ev) for ev in v.evidence]
    facts["verdict"] = {
        "event_id": str(verdict.event_id), "category": v.category, "retryable": v.retryable,
        "budget": v.budget, "action": v.action, "confidence": v.confidence,
        "rules": list(v.rules), "evidence": evidence, "ruleset_version": v.ruleset_version,
    }  # fmt: skip
    rules = ", ".join(v.rules) if v.rules else "no rule (nothing recognised)"
    ev_text = "; ".join(
        f"line {ev.line}: {ev.text!r}" if ev.line is not None and ev.text
        else (ev.signal or ev.rule)
        for ev in v.evidence[:3]
    )  # fmt: skip
    parts.append(
        f"classify judged it {v.category} ({'retryable' if v.retryable else 'not retryable'}, "
        f"{v.budget} budget, recommended action {v.action}, confidence {v.confidence:g}) by "
        f"rule {rules}" + (f" (evidence: {ev_text})" if ev_text else "") + "."
    )

    if decision is None:
        parts.append("act has not recorded a decision on this verdict yet.")
        return Why(" ".join(parts), facts)
    s = decision.snapshot
    dfacts: dict[str, Any] = {
        "budget": _budget(s),
        "policy": decision.policy,
        "category": decision.category,
        "storm_id": None,
    }
    if isinstance(decision, RetryRequested):
        dfacts |= {
            "kind": "requested",
            "action": decision.action,
            "reason": "dry_run" if decision.dry_run else None,
            "detail": dry_run_outcome.detail if dry_run_outcome else decision.detail,
            "dry_run": decision.dry_run,
            "budget_class": decision.budget,
            "resources": msgspec.to_builtins(decision.resources) if decision.resources else None,
            "not_before": decision.not_before.isoformat() if decision.not_before else None,
        }
        if decision.dry_run:
            parts.append(
                f"act decided to {decision.action} but runs in dry-run mode (dry_run): the "
                "decision was recorded and counted against the budgets, and the CI API was not "
                "called."
            )
        else:
            sentence = f"act requested {decision.action} on the {decision.budget} budget" + (
                f" (policy {decision.policy})" if decision.policy else ""
            )
            if decision.resources is not None:
                sentence += f" with {_resources(decision.resources)}"
            if decision.not_before is not None:
                sentence += f", not before {decision.not_before.isoformat()}"
            if decision.detail:
                sentence += f" ({decision.detail})"
            parts.append(sentence + ".")
        parts.append(_numbers(s, decision.budget))
    elif isinstance(decision, RetryParked):
        dfacts |= {
            "kind": "parked",
            "action": decision.would_action,
            "reason": None,
            "detail": decision.detail,
            "dry_run": False,
            "budget_class": v.budget,
            "resources": None,
            "not_before": None,
            "storm_id": decision.storm_id,
        }
        parts.append(
            f"act would {decision.would_action} but parked it (retry storm {decision.storm_id}): "
            "the same failure is failing many pipelines at once, so no budget is spent on it "
            "until the failure has stopped appearing; then the job is decided again."
        )
        parts.append(_numbers(s, v.budget))
    else:
        dfacts |= {
            "kind": "skipped",
            "action": decision.would_action,
            "reason": decision.reason,
            "detail": decision.detail,
            "dry_run": False,
            "budget_class": v.budget,
            "resources": None,
            "not_before": None,
        }
        parts.append(_skip_sentence(decision, v.budget))
        parts.append(_numbers(s, v.budget))
    facts["decision"] = dfacts

    if isinstance(decision, RetryRequested):
        if decision.dry_run:
            facts["execution"] = {"status": "dry_run", "new_job_id": None, "detail": None}
        elif issued is not None:
            facts["execution"] = {
                "status": "issued", "new_job_id": issued.new_job_id,
                "detail": "a newer attempt already existed" if issued.found_existing else None,
            }  # fmt: skip
            new = f" as job {issued.new_job_id}" if issued.new_job_id else ""
            parts.append(f"The retry was issued{new}.")
        elif failed is not None:
            facts["execution"] = {
                "status": "failed" if not failed.will_retry else "retrying",
                "new_job_id": None, "detail": failed.detail,
            }  # fmt: skip
            parts.append(f"The CI API call failed: {failed.detail}.")
        else:
            facts["execution"] = {"status": "pending", "new_job_id": None, "detail": None}
            parts.append("The retry is scheduled but not issued yet.")
        if retry is not None and not decision.dry_run:
            facts["retry_outcome"] = {"outcome": retry.outcome, "job_id": retry.job_id}
            if retry.outcome is not None:
                parts.append(f"The next attempt (job {retry.job_id}) {retry.outcome}.")
    disputed = [f for f in feedback if f["kind"] == "disputed"]
    if disputed:
        parts.append(f"The verdict was disputed by {', '.join(f['who'] for f in disputed)}.")
    return Why(" ".join(parts), facts)


__all__ = ["ChainAttempt", "RetryOutcome", "Why", "chain_summary", "explain"]
