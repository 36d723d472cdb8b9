"""The verdict for one failed job attempt: a pure function of its events and the rule set.

Signals (provider failure reason, exit code, Kubernetes Pod reasons) and log matches each
fire rules; the rule with the highest priority decides the category, and with it whether to
retry, on which budget and how. Priorities encode the deconfliction order (Spack's lesson):
the provider's own verdicts first, then deterministic errors, then generic infrastructure text,
so a compile error that also prints "Killed" is not an OOM, and an exit code 137 after a
cancel or a node shutdown is not an OOM either.

The log speaks for itself too (``logsignals.LogFacts``): the exit status and signal the runner
printed and the stage the job died in complete the provider's signals (the provider's exit
code wins when it gave one), so a rule can say ``signals = { exit_code = 137 }`` and fire on a
log whose only evidence is GitHub's "Process completed with exit code 137.".
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Final

from ciretry.common.events import Evidence, JobFinished, PodTerminated, Resources, VerdictReached
from ciretry.common.resources import larger

from .engine import LogMatch
from .logsignals import LogFacts
from .rules import Rule, RuleSet, Signals

CANCELLED_STATUSES: Final = frozenset({"canceled", "cancelled", "canceling", "superseded"})
SUCCESS_STATUSES: Final = frozenset({"success", "succeeded", "completed", "passed"})
#: Evidence entries kept on a verdict (the event must stay small).
MAX_EVIDENCE: Final = 20
#: Confidence added when another fired rule agrees with the winner's category.
AGREEMENT_BONUS: Final = 0.05


def job_signals(
    job: JobFinished, pods: Sequence[PodTerminated], log_facts: LogFacts | None = None
) -> Signals:
    """The signals of a job attempt: the job's exit code wins over the pod's, and either over
    the one the log reports; the log adds the signal and the stage it died in."""
    reasons: set[str] = set()
    exit_code = job.exit_code
    for pod in pods:
        reasons.update(
            r for r in (pod.container_reason, pod.pod_reason, pod.disruption_reason) if r
        )
        if exit_code is None and pod.exit_code is not None:
            exit_code = pod.exit_code
    return Signals(
        exit_code=exit_code, failure_reason=job.failure_reason, pod_reasons=frozenset(reasons)
    ).with_log(log_facts)


def observed_size(pods: Sequence[PodTerminated]) -> Resources | None:
    """The size of the container that ended the job, from its pod events: the largest seen when
    there are several (a rerun with more memory must not start below what ran)."""
    size: Resources | None = None
    for pod in pods:
        size = larger(size, pod.resources)
    return size


def fired_rules(
    ruleset: RuleSet, signals: Signals, matches: Iterable[LogMatch]
) -> dict[str, list[LogMatch]]:
    """Rules that fire, with their log evidence (empty for signal-only rules), in rule order."""
    by_rule: dict[str, list[LogMatch]] = {}
    for m in matches:
        by_rule.setdefault(m.rule, []).append(m)
    fired: dict[str, list[LogMatch]] = {}
    for rule in ruleset.rules:
        if rule.log is not None:
            if rule.id in by_rule and rule.signals_match(signals):
                fired[rule.id] = by_rule[rule.id]
        elif rule.has_signals and rule.signals_match(signals):
            fired[rule.id] = []
    return fired


def _signal_text(rule: Rule, s: Signals) -> str:
    parts = []
    if rule.failure_reasons:
        parts.append(f"failure_reason={s.failure_reason}")
    if rule.exit_codes:
        parts.append(f"exit_code={s.exit_code}")
    if rule.signal_names:
        parts.append(f"signal={s.effective_signal}")
    if rule.stages:
        parts.append(f"stage={s.stage}")
    if rule.pod_reasons:
        parts.append("pod_reason=" + ",".join(sorted(rule.pod_reasons & s.pod_reasons)))
    return " ".join(parts)


def _signals_map(
    job: JobFinished, s: Signals, log_facts: LogFacts | None
) -> dict[str, str | int | None]:
    out: dict[str, str | int | None] = {"status": job.status}
    if log_facts is not None:
        out.update(log_facts.as_map())
    if s.exit_code is not None:
        out["exit_code"] = s.exit_code
    if s.failure_reason is not None:
        out["failure_reason"] = s.failure_reason
    if job.provider_failure_reason is not None:
        out["provider_failure_reason"] = job.provider_failure_reason
    if s.pod_reasons:
        out["pod_reasons"] = ",".join(sorted(s.pod_reasons))
    return out


def fold_verdict(
    job: JobFinished,
    pods: Sequence[PodTerminated],
    matches: Iterable[LogMatch],
    rules: RuleSet,
    *,
    log_available: bool,
    log_note: str | None = None,
    job_event_id: uuid.UUID | None = None,
    log_facts: LogFacts | None = None,
) -> VerdictReached:
    """Decide the verdict for ``job`` from its pods, the log matches and the rule set.

    ``matches`` are the scanner's evidence lines (``ScanResult.matches()``), already limited
    to each rule's scope; ``log_facts`` what the scan read from the log (``ScanResult.facts``).
    Deterministic: the same inputs give the same verdict.
    """
    signals = job_signals(job, pods, log_facts)
    observed = observed_size(pods)

    def verdict(
        category: str, retryable: bool, budget: str, action: str, confidence: float,
        rule_ids: tuple[str, ...], evidence: tuple[Evidence, ...],
    ) -> VerdictReached:  # fmt: skip
        return VerdictReached(
            source=job.source,
            project=job.project,
            pipeline_id=job.pipeline_id,
            job_id=job.job_id,
            job_name=job.job_name,
            category=category,  # type: ignore[arg-type]  # values come from validated rules
            retryable=retryable,
            budget=budget,  # type: ignore[arg-type]
            action=action,  # type: ignore[arg-type]
            confidence=round(confidence, 3),
            rules=rule_ids,
            evidence=evidence,
            signals=_signals_map(job, signals, log_facts),
            log_available=log_available,
            log_note=log_note,
            ruleset_version=rules.version,
            job_event_id=job_event_id,
            observed=observed,
        )

    status = job.status.lower()
    if status in CANCELLED_STATUSES:
        # A cancel explains any exit code (137 included): never an OOM, never retried.
        ev = (Evidence(rule="status:cancelled", signal=f"status={job.status}"),)
        return verdict("cancelled", False, "user", "none", 0.99, ("status:cancelled",), ev)
    if status in SUCCESS_STATUSES:
        ev = (Evidence(rule="status:success", signal=f"status={job.status}"),)
        return verdict("unknown", False, "user", "none", 0.99, ("status:success",), ev)

    fired = fired_rules(rules, signals, matches)
    if not fired:
        # Nothing recognised: do not guess. Less sure still when the log could not be read.
        return verdict("unknown", False, "user", "none", 0.5 if log_available else 0.3, (), ())

    order = {r.id: i for i, r in enumerate(rules.rules)}
    ranked = sorted(
        (rules[rid] for rid in fired),
        key=lambda r: (-r.priority, -r.confidence, order[r.id]),
    )
    winner = ranked[0]
    confidence = winner.confidence
    if any(r.category == winner.category for r in ranked[1:]):
        confidence = min(0.99, confidence + AGREEMENT_BONUS)

    evidence: list[Evidence] = []
    for r in ranked:
        if fired[r.id]:
            evidence.extend(Evidence(rule=r.id, line=m.line, text=m.text) for m in fired[r.id])
        else:
            evidence.append(Evidence(rule=r.id, signal=_signal_text(r, signals)))
    return verdict(
        winner.category,
        winner.retryable,
        winner.budget,
        winner.action,
        confidence,
        tuple(r.id for r in ranked),
        tuple(evidence[:MAX_EVIDENCE]),
    )
