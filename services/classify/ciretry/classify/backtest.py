"""Backtest a candidate rule set on stored failures before trusting it (pure; issue 15).

Every failed job's verdict keeps its decisive lines (the signature's block, ``examples``), the
lines its rules matched (``evidence``) and its signals. ``rejudge`` runs a rule set over exactly
that (the lines as a small log, the signals as the job and pod facts), ``backtest`` compares the
result with the verdict stored at the time and with what happened next (``OutcomeRecorded``):
verdicts gained and lost per rule, category changes, retries the candidate would have spent or
saved, and **conflicts**: failures the candidate would retry that failed again the same way when
they were retried. A conflict means the rule is wrong about a failure ciretry has already seen.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ciretry.common.events import JobFinished, PodTerminated, VerdictReached

from .engine import Scanner
from .fold import fold_verdict
from .rules import RuleSet


@dataclass(frozen=True, slots=True)
class StoredFailure:
    verdict_event_id: uuid.UUID
    verdict: VerdictReached
    outcome: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    job: str
    signature: str | None
    old: str
    new: str
    rule: str | None
    outcome: str | None


@dataclass(slots=True)
class BacktestReport:
    failures: int = 0
    #: Failures without stored lines or signals to judge (verdicts from before signatures).
    unjudged: int = 0
    gained: list[Change] = field(default_factory=list)
    lost: list[Change] = field(default_factory=list)
    recategorized: list[Change] = field(default_factory=list)
    conflicts: list[Change] = field(default_factory=list)
    #: Per rule of the candidate: verdicts it would make retryable / no longer retryable.
    gained_by_rule: Counter[str] = field(default_factory=Counter)
    lost_by_rule: Counter[str] = field(default_factory=Counter)

    @property
    def retries_added(self) -> int:
        return len(self.gained)

    @property
    def retries_saved(self) -> int:
        return len(self.lost)


def _rule_part(verdict: VerdictReached) -> tuple[str, bool]:
    """What the rules alone said (a learned verdict's rule part is what it overrode)."""
    if verdict.learned is not None and verdict.retryable:
        return ("unknown" if verdict.category == "learned_spurious" else verdict.category), False
    return verdict.category, verdict.retryable


def rejudge(verdict: VerdictReached, ruleset: RuleSet, scanner: Scanner) -> VerdictReached | None:
    """The verdict ``ruleset`` gives the stored failure (None when nothing was stored)."""
    lines = list(verdict.signature.examples) if verdict.signature is not None else []
    lines += [e.text for e in verdict.evidence if e.text and e.text not in lines]
    sig = verdict.signals
    if not lines and len(sig) <= 1:
        return None
    exit_code = sig.get("exit_code")
    reason = sig.get("failure_reason")
    provider_reason = sig.get("provider_failure_reason")
    job = JobFinished(
        source=verdict.source, project=verdict.project, pipeline_id=verdict.pipeline_id,
        job_id=verdict.job_id, job_name=verdict.job_name, status=str(sig.get("status", "failed")),
        exit_code=exit_code if isinstance(exit_code, int) else None,
        failure_reason=reason if isinstance(reason, str) else None,
        provider_failure_reason=provider_reason if isinstance(provider_reason, str) else None,
    )  # fmt: skip
    pod_reasons = sig.get("pod_reasons")
    pods = [
        PodTerminated(namespace="backtest", pod="backtest", source=verdict.source,
                      project=verdict.project, job_id=verdict.job_id, container_reason=r)
        for r in (pod_reasons.split(",") if isinstance(pod_reasons, str) and pod_reasons else ())
    ]  # fmt: skip
    scan = scanner.scan_bytes("\n".join(lines).encode()) if lines else None
    return fold_verdict(
        job, pods, scan.matches() if scan else [], ruleset, log_available=bool(lines),
        log_facts=scan.facts if scan else None,
    )  # fmt: skip


def backtest(failures: Iterable[StoredFailure], ruleset: RuleSet) -> BacktestReport:
    report = BacktestReport()
    scanner = Scanner(ruleset)
    for stored in failures:
        old = stored.verdict
        if old.category == "cancelled":
            continue
        report.failures += 1
        new = rejudge(old, ruleset, scanner)
        if new is None:
            report.unjudged += 1
            continue
        old_category, old_retry = _rule_part(old)
        rule = new.rules[0] if new.rules else None
        change = Change(
            job=f"{old.source}/{old.project}/{old.job_id}",
            signature=old.signature.id if old.signature else None,
            old=f"{old_category}{' (retry)' if old_retry else ''}",
            new=f"{new.category}{' (retry)' if new.retryable else ''}",
            rule=rule,
            outcome=stored.outcome,
        )
        if new.retryable and not old_retry:
            report.gained.append(change)
            report.gained_by_rule[rule or "-"] += 1
        elif old_retry and not new.retryable:
            report.lost.append(change)
            report.lost_by_rule[(old.rules[0] if old.rules else "-")] += 1
        elif new.category != old_category:
            report.recategorized.append(change)
        if new.retryable and stored.outcome == "failed_again_same":
            report.conflicts.append(change)
    return report
