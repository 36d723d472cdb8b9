"""Learning from what happened next (issue 15), pure: outcome attribution, scoring, thresholds.

* **Attribution** (``Attribution``): every failed job attempt with a verdict is followed to its
  next attempt of the same job on the same commit (same source, project, job name and SHA:
  a retry in the same pipeline, a recreated pipeline, a person's "Retry" or "Run pipeline"):
  success -> ``passed_on_retry``; a failure with the same signature -> ``failed_again_same``;
  with another -> ``failed_differently``; no attempt within ``never_retried_after`` of the log's
  own clock (the latest ``recorded_at`` seen: replay gives the same answer) ->
  ``never_retried``. A cancelled attempt is no retry result and is skipped.
* **Scoring** (``Record``): per signature and per rule, counts of outcomes and the commits they
  span; the pass-on-retry rate is passes / (passes + failed again with the same signature), with
  a Wilson interval. A job on a commit that fails again however often it is retried counts once
  (one failure the retries did not clear). A retry that failed *differently* says nothing about
  this failure and is counted apart.
* **Thresholds** (``promote`` / ``demote``): a signature with at least ``k`` passes across at
  least ``m`` commits and no failure again with the same signature becomes retryable; a
  signature or rule whose rate's upper bound falls below ``demote_below`` (with at least
  ``min_retries`` scored retries, failing again on at least ``min_commits`` different jobs or
  commits) becomes explain-only, as does a learned verdict a person disputes.
* **State** (``LearnedState``): what is retryable or demoted, folded from the
  ``LearnedVerdictChanged`` events only, so the log is the one truth and ``ciretry replay``
  rebuilds it; ``apply_learning`` turns a rule verdict into the verdict with what was learned.

Nothing here reads a clock or does I/O: ``ciretry.classify.learner`` feeds it the log and
appends what it proposes, each proposal with an idempotency key, so replicas store it once.
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
import tomllib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from .events import (
    Category,
    Event,
    Evidence,
    JobFinished,
    LearnedEvidence,
    LearnedVerdictChanged,
    NewEvent,
    OutcomeKind,
    OutcomeRecorded,
    RecordedEvent,
    VerdictDisputed,
    VerdictReached,
    job_stream,
    learning_stream,
)
from .events import Metadata as EventMetadata

CANCELLED: Final = frozenset({"canceled", "cancelled", "canceling", "superseded", "skipped"})
SUCCESS: Final = frozenset({"success", "succeeded", "completed", "passed"})
#: Categories learning never touches: a cancel is no failure.
NEVER_LEARNED: Final = frozenset({"cancelled"})
#: Rule categories that say "do not retry this": a learned verdict overrules them (with the
#: evidence that retries of this very signature kept passing) under ``learned_spurious``.
OVERRULED: Final = frozenset({"deterministic", "unknown"})
#: The event types the learner folds, in log order.
LEARNING_TYPES: Final = (
    "JobFinished",
    "VerdictReached",
    "OutcomeRecorded",
    "LearnedVerdictChanged",
    "VerdictDisputed",
)


class LearningSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[learning]`` table of the policy file."""

    #: False: outcomes are still recorded and scored, but no verdict changes because of them.
    enabled: bool = True
    #: Passes on retry a signature needs before it is retried automatically...
    min_passes: int = 3
    #: ...across at least this many distinct commits.
    min_commits: int = 2
    #: Demote a signature or rule when the upper bound of its pass-on-retry rate (Wilson, 95 %)
    #: falls below this...
    demote_below: float = 0.5
    #: ...with at least this many scored retries.
    min_retries: int = 4
    #: A failure with no later attempt after this long is ``never_retried``.
    never_retried_after_s: float = 24 * 3600.0
    #: z of the Wilson interval (1.96: 95 %).
    z: float = 1.96


class LearningError(Exception):
    """A ``[learning]`` table that is not valid."""


def learning_settings(doc: Mapping[str, Any], origin: str = "<policy>") -> LearningSettings:
    """The ``[learning]`` table of a parsed policy document (defaults when absent)."""
    raw = doc.get("learning", {})
    if not isinstance(raw, dict):
        raise LearningError(f"{origin}: learning: expected a table")
    try:
        settings = msgspec.convert(raw, LearningSettings)
    except msgspec.ValidationError as exc:
        raise LearningError(f"{origin}: learning: {exc}") from None
    if settings.min_passes < 1 or settings.min_commits < 1 or settings.min_retries < 1:
        raise LearningError(f"{origin}: learning: min_passes, min_commits, min_retries >= 1")
    if not 0.0 <= settings.demote_below <= 1.0:
        raise LearningError(f"{origin}: learning: demote_below must be within 0..1")
    return settings


def learning_settings_from_text(text: str, origin: str = "<policy>") -> LearningSettings:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LearningError(f"{origin}: not valid TOML: {exc}") from None
    return learning_settings(doc, origin)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a rate (0..1 when nothing was observed)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# --- scoring --------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """The outcomes of one signature's or rule's failures."""

    passes: int = 0
    failed_again: int = 0
    failed_differently: int = 0
    never_retried: int = 0
    pass_commits: set[str] = field(default_factory=set)
    #: The jobs on commits (project, job, commit) that failed again: one job that keeps
    #: failing is one piece of evidence, however often it is retried.
    again_jobs: set[tuple[str, str, str]] = field(default_factory=set)
    first: dt.datetime | None = None

    def add(self, outcome: OutcomeRecorded) -> None:
        commit = outcome.sha or f"pipeline:{outcome.pipeline_id}"
        if outcome.outcome == "passed_on_retry":
            self.passes += 1
            self.pass_commits.add(commit)
        elif outcome.outcome == "failed_again_same":
            # One job on one commit that keeps failing is one failure that retries did not
            # clear, however many times it was retried: count it once, as a pass counts once.
            job = (outcome.project, outcome.job_name, commit)
            if job not in self.again_jobs:
                self.again_jobs.add(job)
                self.failed_again += 1
        elif outcome.outcome == "failed_differently":
            self.failed_differently += 1
        else:
            self.never_retried += 1
        at = outcome.failed_at or outcome.decided_at
        if at is not None and (self.first is None or at < self.first):
            self.first = at

    @property
    def scored(self) -> int:
        return self.passes + self.failed_again

    def evidence(self, z: float = 1.96) -> LearnedEvidence:
        low, high = wilson(self.passes, self.scored, z)
        return LearnedEvidence(
            retries=self.scored,
            passes=self.passes,
            failed_again=self.failed_again,
            failed_differently=self.failed_differently,
            commits=len(self.pass_commits),
            since=self.first,
            rate_low=round(low, 4),
            rate_high=round(high, 4),
        )


def evidence_text(ev: LearnedEvidence) -> str:
    """ "7 of 7 retries passed across 5 commits since 2026-11-02"."""
    since = f" since {ev.since.date().isoformat()}" if ev.since is not None else ""
    commits = f"{ev.commits} commit" + ("" if ev.commits == 1 else "s")
    text = f"{ev.passes} of {ev.retries} retries passed across {commits}{since}"
    if ev.failed_differently:
        text += f" ({ev.failed_differently} failed differently)"
    return text


def promote(record: Record, settings: LearningSettings) -> bool:
    """Whether a signature's record earns it the right to be retried (pure)."""
    return (
        record.passes >= settings.min_passes
        and len(record.pass_commits) >= settings.min_commits
        and record.failed_again == 0
    )


def demote(record: Record, settings: LearningSettings) -> bool:
    """Whether a signature's or rule's retries stopped passing (pure): the upper bound of the
    pass rate is below the threshold, after enough retries, failing again on at least
    ``min_commits`` different jobs or commits (one job that keeps failing, say a rerun with
    more memory that still runs out of it, does not take a rule away from every other job)."""
    if record.scored < settings.min_retries or len(record.again_jobs) < settings.min_commits:
        return False
    return wilson(record.passes, record.scored, settings.z)[1] < settings.demote_below


# --- learned state (folded from LearnedVerdictChanged only) -------------------------------------


@dataclass(slots=True)
class Learned:
    state: Literal["retryable", "explain_only"]
    change: LearnedVerdictChanged
    changes: int


@dataclass(slots=True)
class LearnedState:
    """Signatures made retryable and signatures / rules made explain-only, as the log says."""

    signatures: dict[str, Learned] = field(default_factory=dict)
    rules: dict[str, Learned] = field(default_factory=dict)

    def apply(self, change: LearnedVerdictChanged) -> None:
        table = self.signatures if change.kind == "signature" else self.rules
        before = table.get(change.subject)
        table[change.subject] = Learned(change.state, change, (before.changes if before else 0) + 1)

    def changes(self, kind: str, subject: str) -> int:
        table = self.signatures if kind == "signature" else self.rules
        entry = table.get(subject)
        return entry.changes if entry else 0

    def retryable_signature(self, signature: str) -> LearnedVerdictChanged | None:
        entry = self.signatures.get(signature)
        return entry.change if entry is not None and entry.state == "retryable" else None

    def demoted(self, kind: str, subject: str) -> LearnedVerdictChanged | None:
        table = self.signatures if kind == "signature" else self.rules
        entry = table.get(subject)
        return entry.change if entry is not None and entry.state == "explain_only" else None


def apply_learning(
    verdict: VerdictReached, state: LearnedState, settings: LearningSettings
) -> VerdictReached:
    """The verdict with what was learned (pure): a rule verdict stays as it is unless its
    winning rule was demoted (explain-only), or its signature earned a retry (retryable with
    the numbers in the evidence; the rule's category stays, except ``deterministic`` and
    ``unknown``, which become ``learned_spurious``). Cancelled verdicts are never changed."""
    if not settings.enabled or verdict.category in NEVER_LEARNED:
        return verdict
    winner = verdict.rules[0] if verdict.rules else None
    sig = verdict.signature.id if verdict.signature is not None else None
    if verdict.retryable:
        demoted = (state.demoted("rule", winner) if winner else None) or (
            state.demoted("signature", sig) if sig else None
        )
        if demoted is None:
            return verdict
        note = Evidence(
            rule=f"learned:{demoted.kind}:{demoted.subject}",
            text=f"explain-only: {demoted.text}",
        )
        return msgspec.structs.replace(
            verdict,
            retryable=False,
            action="none",
            evidence=(*verdict.evidence, note),
            learned=demoted.evidence,
        )
    if sig is None:
        return verdict
    change = state.retryable_signature(sig)
    if change is None:
        return verdict
    category: Category = "learned_spurious" if verdict.category in OVERRULED else verdict.category
    note = Evidence(rule=f"learned:signature:{sig}", text=change.text)
    return msgspec.structs.replace(
        verdict,
        category=category,
        retryable=True,
        budget="learned",
        action="retry_job",
        evidence=(*verdict.evidence, note),
        learned=change.evidence,
    )


# --- attribution ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Attempt:
    job_id: str
    #: The provider's attempt number: Taskcluster reruns keep the task id (``runId`` + 1).
    attempt: int | None
    pipeline_id: str
    status: str
    at: dt.datetime
    ref: str | None
    runner: str | None
    verdict: VerdictReached | None = None
    verdict_event_id: uuid.UUID | None = None


def _job_order(a: _Attempt) -> tuple[int, str, int]:
    """Attempt order: numeric job ids numerically, then the provider's attempt number."""
    head = (int(a.job_id), "") if a.job_id.isdigit() else (0, a.job_id)
    return (*head, a.attempt or 0)


AttemptKey = tuple[str, str, str, str]


def attempt_key(job: JobFinished) -> AttemptKey:
    """Attempts of one job on one commit (the pipeline when the provider gave no SHA)."""
    return (job.source, job.project, job.job_name, job.sha or f"pipeline:{job.pipeline_id}")


@dataclass(slots=True)
class Learner:
    """The learning fold over the log (pure): feed it events in log order with ``fold``; it
    proposes the events to append (outcomes, learned changes), each with an idempotency key.
    Its own proposals change nothing until they are read back from the log."""

    settings: LearningSettings
    state: LearnedState = field(default_factory=LearnedState)
    signatures: dict[str, Record] = field(default_factory=dict)
    rules: dict[str, Record] = field(default_factory=dict)
    #: Attempts not yet scored, per job on one commit, in job order.
    attempts: dict[AttemptKey, list[_Attempt]] = field(default_factory=dict)
    #: Which attempt list a job is in (until its verdict is read).
    jobs: dict[tuple[str, str, str], AttemptKey] = field(default_factory=dict)
    #: Lists that may expire (``expire``), by their head's time: (time, order pushed, key). A
    #: list is pushed whenever it settles as one attempt with a verdict and checked again when
    #: popped, so ``expire`` reads only what is due instead of every open attempt (a day of
    #: them, at the default horizon).
    expiring: list[tuple[dt.datetime, int, AttemptKey]] = field(default_factory=list)
    pushed: int = 0
    #: Verdicts already scored (read back from the log).
    scored: set[uuid.UUID] = field(default_factory=set)
    #: Verdicts that were retryable because of learning: a dispute of one demotes its subject.
    learned_verdicts: dict[uuid.UUID, tuple[Literal["signature", "rule"], str]] = field(
        default_factory=dict
    )
    #: The log's clock: the latest ``recorded_at`` folded.
    now: dt.datetime | None = None
    position: int = 0

    def fold(self, event: RecordedEvent) -> list[NewEvent]:
        """Fold one event (log order); returns the events it proposes to append."""
        self.position = max(self.position, event.position)
        if self.now is None or event.recorded_at > self.now:
            self.now = event.recorded_at
        data = event.data
        if isinstance(data, JobFinished):
            return self._job(data, event.recorded_at)
        if isinstance(data, VerdictReached):
            return self._verdict(data, event)
        if isinstance(data, OutcomeRecorded):
            return self._outcome(data, event)
        if isinstance(data, LearnedVerdictChanged):
            self.state.apply(data)
            return []
        if isinstance(data, VerdictDisputed):
            return self._dispute(data, event)
        return []

    # JobFinished / VerdictReached: attempts

    def _job(self, job: JobFinished, at: dt.datetime) -> list[NewEvent]:
        status = job.status.lower()
        if status in CANCELLED:
            return []
        key = attempt_key(job)
        chain = self.attempts.setdefault(key, [])
        if any(a.job_id == job.job_id and a.attempt == job.attempt for a in chain):
            return []  # the same attempt told twice
        attempt = _Attempt(
            job.job_id, job.attempt, job.pipeline_id, status, at, job.ref, job.runner
        )
        chain.append(attempt)
        chain.sort(key=_job_order)
        if status not in SUCCESS:
            self.jobs[(job.source, job.project, job.job_id)] = key
        return self._settle(key)

    def _verdict(self, verdict: VerdictReached, event: RecordedEvent) -> list[NewEvent]:
        if verdict.learned is not None and verdict.retryable and verdict.signature is not None:
            self.learned_verdicts[event.event_id] = ("signature", verdict.signature.id)
        job = (verdict.source, verdict.project, verdict.job_id)
        key = self.jobs.get(job)
        if key is None:
            return []
        chain = self.attempts.get(key, [])
        # The earliest attempt of that job still without a verdict (classify verdicts the
        # attempts of one job in the order they finished).
        waiting = [a for a in chain if a.job_id == verdict.job_id and a.verdict is None]
        if waiting:
            if verdict.category == "cancelled":
                chain.remove(waiting[0])
            else:
                waiting[0].verdict, waiting[0].verdict_event_id = verdict, event.event_id
        if len(waiting) <= 1:
            del self.jobs[job]
        return self._settle(key)

    def _settle(self, key: AttemptKey) -> list[NewEvent]:
        """Score the head of the attempts while its next attempt's result is known."""
        chain = self.attempts.get(key, [])
        out: list[NewEvent] = []
        while chain:
            head = chain[0]
            if head.status in SUCCESS:
                chain.pop(0)
                continue
            if head.verdict is None or len(chain) < 2:
                break
            nxt = chain[1]
            if nxt.status in SUCCESS:
                outcome: OutcomeKind = "passed_on_retry"
            elif nxt.verdict is None:
                break
            else:
                same = (
                    head.verdict.signature is not None
                    and nxt.verdict.signature is not None
                    and head.verdict.signature.id == nxt.verdict.signature.id
                )
                outcome = "failed_again_same" if same else "failed_differently"
            out.extend(self._propose_outcome(key, head, outcome, nxt))
            chain.pop(0)
        if not chain:
            self.attempts.pop(key, None)
        elif len(chain) == 1 and chain[0].verdict is not None:
            self.pushed += 1
            heapq.heappush(self.expiring, (chain[0].at, self.pushed, key))
        return out

    def expire(self) -> list[NewEvent]:
        """``never_retried`` for the failures with no later attempt for too long (log clock)."""
        if self.now is None:
            return []
        horizon = self.now - dt.timedelta(seconds=self.settings.never_retried_after_s)
        out: list[NewEvent] = []
        due = self.expiring
        while due and due[0][0] < horizon:
            _, _, key = heapq.heappop(due)
            chain = self.attempts.get(key)
            # Gone, grown or changed since it was pushed: pushed again if it settles as one.
            if chain and len(chain) == 1 and chain[0].verdict is not None and chain[0].at < horizon:
                out.extend(self._propose_outcome(key, chain[0], "never_retried", None))
                del self.attempts[key]
        return out

    def _propose_outcome(
        self, key: AttemptKey, head: _Attempt, outcome: OutcomeKind, nxt: _Attempt | None
    ) -> list[NewEvent]:
        verdict, vid = head.verdict, head.verdict_event_id
        assert verdict is not None and vid is not None
        if vid in self.scored:
            return []
        record = OutcomeRecorded(
            source=verdict.source,
            project=verdict.project,
            pipeline_id=verdict.pipeline_id,
            job_id=verdict.job_id,
            job_name=verdict.job_name,
            outcome=outcome,
            verdict_event_id=vid,
            signature=verdict.signature.id if verdict.signature else None,
            category=verdict.category,
            rules=verdict.rules,
            retryable=verdict.retryable,
            learned=verdict.learned is not None and verdict.retryable,
            sha=None if key[3].startswith("pipeline:") else key[3],
            ref=head.ref,
            runner=head.runner,
            next_job_id=nxt.job_id if nxt else None,
            next_pipeline_id=nxt.pipeline_id if nxt else None,
            next_signature=(
                nxt.verdict.signature.id
                if nxt is not None and nxt.verdict is not None and nxt.verdict.signature
                else None
            ),
            failed_at=head.at,
            decided_at=nxt.at if nxt else self.now,
        )
        return [
            NewEvent(
                stream=job_stream(verdict.source, verdict.project, verdict.job_id),
                data=record,
                metadata=EventMetadata(idempotency_key=f"outcome:{vid}"),
            )
        ]

    # OutcomeRecorded: scores, then thresholds

    def _outcome(self, outcome: OutcomeRecorded, event: RecordedEvent) -> list[NewEvent]:
        if outcome.verdict_event_id in self.scored:
            return []
        self.scored.add(outcome.verdict_event_id)
        out: list[NewEvent] = []
        if outcome.signature is not None and outcome.category not in NEVER_LEARNED:
            record = self.signatures.setdefault(outcome.signature, Record())
            record.add(outcome)
            out.extend(self._judge_signature(outcome.signature, record, event))
        if outcome.rules and outcome.retryable and not outcome.learned:
            rule = outcome.rules[0]
            record = self.rules.setdefault(rule, Record())
            record.add(outcome)
            if demote(record, self.settings) and self.state.demoted("rule", rule) is None:
                out.append(
                    self._change("rule", rule, "explain_only", "retries_stopped_passing",
                                 record, outcome.category, event.event_id)
                )  # fmt: skip
        return out

    def _judge_signature(self, sig: str, record: Record, event: RecordedEvent) -> list[NewEvent]:
        current = self.state.signatures.get(sig)
        if current is None and promote(record, self.settings):
            return [self._change("signature", sig, "retryable", "passed_on_retry", record,
                                 "learned_spurious", event.event_id)]  # fmt: skip
        if (current is None or current.state == "retryable") and demote(record, self.settings):
            return [self._change("signature", sig, "explain_only", "retries_stopped_passing",
                                 record, "learned_spurious", event.event_id)]  # fmt: skip
        return []

    def _dispute(self, dispute: VerdictDisputed, event: RecordedEvent) -> list[NewEvent]:
        subject = self.learned_verdicts.get(dispute.verdict_event_id)
        if subject is None or self.state.demoted(*subject) is not None:
            return []
        kind, name = subject
        record = self.signatures.get(name, Record())
        change = self._change(kind, name, "explain_only", "disputed", record,
                              "learned_spurious", event.event_id)  # fmt: skip
        data = msgspec.structs.replace(
            change.data,
            dispute_event_id=event.event_id,
            text=f"disputed by {dispute.who}: {dispute.why}",
        )
        return [msgspec.structs.replace(change, data=data)]

    def _change(
        self,
        kind: Literal["signature", "rule"],
        subject: str,
        state: Literal["retryable", "explain_only"],
        reason: Literal["passed_on_retry", "retries_stopped_passing", "disputed"],
        record: Record,
        category: Category,
        cause: uuid.UUID,
    ) -> NewEvent:
        ev = record.evidence(self.settings.z)
        text = evidence_text(ev)
        if state == "explain_only" and reason == "retries_stopped_passing":
            text = f"retries stopped passing: {text} (at most {ev.rate_high:.0%} would pass)"
        change = LearnedVerdictChanged(
            kind=kind,
            subject=subject,
            state=state,
            reason=reason,
            evidence=ev,
            text=text,
            category=category,
            cause_event_id=cause,
        )
        n = self.state.changes(kind, subject) + 1
        return NewEvent(
            stream=learning_stream(kind, subject),
            data=change,
            metadata=EventMetadata(idempotency_key=f"learned:{kind}:{subject}:{n}"),
        )

    # read side

    def summary(self) -> dict[str, Any]:
        """Counts for reports and replay checks."""
        return {
            "signatures_scored": len(self.signatures),
            "retryable_signatures": sorted(
                s for s, e in self.state.signatures.items() if e.state == "retryable"
            ),
            "explain_only": sorted(
                f"{k}:{s}"
                for k, table in (("signature", self.state.signatures), ("rule", self.state.rules))
                for s, e in table.items()
                if e.state == "explain_only"
            ),
            "outcomes": len(self.scored),
        }


def fold_all(events: Iterable[RecordedEvent], settings: LearningSettings) -> Learner:
    """The learner after folding ``events`` (replay): proposals are dropped, the state is what
    the recorded events say."""
    learner = Learner(settings)
    for event in events:
        learner.fold(event)
    return learner


def is_learning_event(event: Event) -> bool:
    return isinstance(event, OutcomeRecorded | LearnedVerdictChanged)


__all__ = [
    "LEARNING_TYPES",
    "LearnedState",
    "Learner",
    "LearningCheck",
    "LearningError",
    "LearningSettings",
    "Record",
    "apply_learning",
    "attempt_key",
    "demote",
    "evidence_text",
    "fold_all",
    "learning_settings",
    "learning_settings_from_text",
    "promote",
    "verify_learning",
    "wilson",
]


# --- replay ---------------------------------------------------------------------------------


@dataclass(slots=True)
class LearningCheck:
    """What ``ciretry replay`` finds when it folds the learning events again."""

    learner: Learner
    outcomes: dict[str, int] = field(default_factory=dict)
    changes: int = 0
    #: Recorded learned changes the fold would not have proposed at their place in the log.
    unexplained: list[str] = field(default_factory=list)
    #: Verdicts that claim learned evidence no recorded change before them backs.
    unbacked: list[str] = field(default_factory=list)
    #: Proposals the fold makes that the log does not hold yet (a learner behind, or stopped).
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unexplained and not self.unbacked


def verify_learning(events: Iterable[RecordedEvent], settings: LearningSettings) -> LearningCheck:
    """Fold the learning events (log order) as the learner did, and check the record: every
    learned change is one the fold proposes from the outcomes before it, and every verdict made
    retryable or explain-only by learning cites a change recorded before it (pure)."""
    learner = Learner(settings)
    check = LearningCheck(learner)
    proposed: set[str] = set()
    stored: set[str] = set()
    for event in events:
        data = event.data
        key = event.metadata.idempotency_key
        if isinstance(data, LearnedVerdictChanged):
            check.changes += 1
            if key not in proposed:
                check.unexplained.append(
                    f"@{event.position} {data.kind} {data.subject}: {data.state} ({data.reason})"
                )
        elif isinstance(data, OutcomeRecorded):
            check.outcomes[data.outcome] = check.outcomes.get(data.outcome, 0) + 1
        elif isinstance(data, VerdictReached) and data.learned is not None:
            cited = [e.rule for e in data.evidence if e.rule.startswith("learned:")]
            backed = False
            for rule in cited:
                _, kind, subject = rule.split(":", 2)
                table = learner.state.signatures if kind == "signature" else learner.state.rules
                entry = table.get(subject)
                want = "retryable" if data.retryable else "explain_only"
                backed = backed or (entry is not None and entry.state == want)
            if not backed:
                check.unbacked.append(f"@{event.position} verdict of job {data.job_id}")
        if key is not None:
            stored.add(key)
        for new in learner.fold(event):
            if new.metadata.idempotency_key is not None:
                proposed.add(new.metadata.idempotency_key)
    check.missing = sorted(proposed - stored)
    return check
