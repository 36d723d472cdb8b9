"""Learning from outcomes (issue 15), pure: attribution across attempts and pipelines, Wilson
scores, thresholds, demotion, disputes, and replay rebuilding the same state from the log."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import msgspec
import pytest

from ciretry.common.events import (
    Event,
    JobFinished,
    LearnedVerdictChanged,
    NewEvent,
    OutcomeRecorded,
    RecordedEvent,
    VerdictDisputed,
    VerdictReached,
)
from ciretry.common.learning import (
    Learner,
    LearningError,
    LearningSettings,
    Record,
    apply_learning,
    demote,
    evidence_text,
    fold_all,
    learning_settings_from_text,
    promote,
    wilson,
)
from ciretry.common.signature import signature_of

T0 = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.UTC)
SPURIOUS = signature_of(["error: connection reset by peer while fetching the mirror"])
BROKEN = signature_of(["error: cannot find symbol Foo"])


class Log:
    """A tiny event log for the pure fold: events in order, proposals appended once by key."""

    def __init__(self, settings: LearningSettings | None = None) -> None:
        self.events: list[RecordedEvent] = []
        self.keys: set[str] = set()
        self.learner = Learner(settings or LearningSettings())
        self.clock = T0

    def add(self, data: Event, key: str | None = None) -> RecordedEvent:
        self.clock += dt.timedelta(minutes=1)
        event = RecordedEvent(
            event_id=uuid.uuid4(),
            stream="s",
            stream_version=1,
            position=len(self.events) + 1,
            recorded_at=self.clock,
            data=data,
            metadata=msgspec.structs.replace(
                NewEvent(stream="s", data=data).metadata, idempotency_key=key
            ),
        )
        self.events.append(event)
        for new in self.learner.fold(event):
            self._store(new)
        return event

    def _store(self, new: NewEvent) -> None:
        key = new.metadata.idempotency_key
        assert key is not None
        if key not in self.keys:
            self.keys.add(key)
            self.add(new.data, key)

    def expire(self) -> None:
        for new in self.learner.expire():
            self._store(new)

    def of(self, kind: type[Event]) -> Iterator[Event]:
        return (e.data for e in self.events if isinstance(e.data, kind))


_JOB = 100


def job(log: Log, status: str, *, sha: str = "c1", name: str = "test", pipeline: str = "1",
        sig: object = SPURIOUS, category: str = "unknown", rules: tuple[str, ...] = (),
        retryable: bool = False) -> str:  # fmt: skip
    """A job attempt (and, when it failed, its verdict); returns its id."""
    global _JOB
    _JOB += 1
    jid = str(_JOB)
    log.add(JobFinished(source="gitlab", project="p", pipeline_id=pipeline, job_id=jid,
                        job_name=name, status=status, sha=sha, ref="main"))  # fmt: skip
    if status == "failed":
        verdict = VerdictReached(
            source="gitlab", project="p", pipeline_id=pipeline, job_id=jid, job_name=name,
            category=category, retryable=retryable, budget="user",  # type: ignore[arg-type]
            action="retry_job" if retryable else "none", confidence=0.5, rules=rules,
            signature=sig,  # type: ignore[arg-type]
        )  # fmt: skip
        log.add(verdict)
    return jid


def outcomes(log: Log) -> list[tuple[str, str]]:
    return [(o.job_id, o.outcome) for o in log.of(OutcomeRecorded)]  # type: ignore[attr-defined]


def test_each_failure_is_followed_to_its_next_attempt_on_the_same_commit() -> None:
    log = Log()
    a = job(log, "failed")
    b = job(log, "failed")  # a retry that failed the same way
    job(log, "success")  # then passed
    c = job(log, "failed", sha="c2")
    d = job(log, "failed", sha="c2", sig=BROKEN)  # failed differently
    job(log, "failed", sha="c3", name="other")  # never retried (yet)
    assert outcomes(log) == [
        (a, "failed_again_same"),
        (b, "passed_on_retry"),
        (c, "failed_differently"),
    ]
    assert d not in dict(outcomes(log))
    # The log's own clock decides "never retried": a day later by the events' time.
    log.clock += dt.timedelta(days=2)
    log.add(JobFinished(source="gitlab", project="p", pipeline_id="9", job_id="x", job_name="z",
                        status="success", sha="c9"))  # fmt: skip
    log.expire()
    assert {o for _, o in outcomes(log)[3:]} == {"never_retried"}
    assert len(outcomes(log)) == 5


def _expire_by_definition(learner: Learner) -> set[tuple[str, str]]:
    """``never_retried`` as the docstring defines it, over every open attempt list: one
    attempt, with a verdict, older than the horizon by the log's clock."""
    assert learner.now is not None
    horizon = learner.now - dt.timedelta(seconds=learner.settings.never_retried_after_s)
    return {
        (chain[0].job_id, chain[0].pipeline_id)
        for chain in learner.attempts.values()
        if len(chain) == 1 and chain[0].verdict is not None and chain[0].at < horizon
    }


@pytest.mark.parametrize("seed", range(8))
def test_expire_finds_exactly_the_lists_due_without_reading_the_rest(seed: int) -> None:
    # Jobs on a few commits and names, failing, passing and cancelled, with clock jumps past
    # the horizon now and then; each expire proposes exactly what the definition says was due
    # (its proposals, read back, move the test log's clock: what they make due is the next's).
    import random

    rng = random.Random(seed)
    log = Log(LearningSettings(never_retried_after_s=3600))
    for _ in range(300):
        if rng.random() < 0.05:
            log.clock += dt.timedelta(hours=rng.choice((0.5, 1, 2)))
        status = rng.choice(("failed", "failed", "failed", "success", "canceled"))
        sha, name = f"c{rng.randrange(30)}", f"n{rng.randrange(3)}"
        job(log, status, sha=sha, name=name, pipeline=str(rng.randrange(5)),
            sig=rng.choice((SPURIOUS, BROKEN)))  # fmt: skip
        if rng.random() < 0.2:
            due = _expire_by_definition(log.learner)
            assert log.learner.now is not None
            horizon = log.learner.now - dt.timedelta(hours=1)
            before = len(outcomes(log))
            log.expire()
            # What stays queued is younger than the horizon: expire read only what was due.
            assert all(at >= horizon for at, _, _ in log.learner.expiring)
            got = {
                (o.job_id, o.pipeline_id)  # type: ignore[attr-defined]
                for o in list(log.of(OutcomeRecorded))[before:]
            }
            assert got == due
            assert all(o == "never_retried" for _, o in outcomes(log)[before:])


def test_retries_in_a_recreated_pipeline_and_by_people_count_and_cancels_do_not() -> None:
    log = Log()
    first = job(log, "failed", pipeline="1")
    job(log, "canceled", pipeline="2")  # a cancel is no retry result
    job(log, "success", pipeline="3")  # the job again on the same commit, another pipeline
    assert outcomes(log) == [(first, "passed_on_retry")]
    (outcome,) = log.of(OutcomeRecorded)
    assert isinstance(outcome, OutcomeRecorded)
    assert outcome.next_pipeline_id == "3" and outcome.sha == "c1"


def test_attempts_of_one_task_id_are_told_apart_by_their_attempt_number() -> None:
    """Taskcluster reruns keep the task id: the attempt number orders them."""
    log = Log()

    def attempt(n: int, status: str) -> None:
        log.add(JobFinished(source="taskcluster", project="p", pipeline_id="g", job_id="T",
                            job_name="t", status=status, sha="s", attempt=n))  # fmt: skip

    def verdict() -> None:
        log.add(VerdictReached(source="taskcluster", project="p", pipeline_id="g", job_id="T",
                               job_name="t", category="unknown", retryable=False, budget="user",
                               action="none", confidence=0.5, signature=SPURIOUS))  # fmt: skip

    attempt(1, "failed")
    attempt(2, "failed")  # before the first verdict
    verdict()
    verdict()
    attempt(2, "failed")  # told twice: one attempt
    attempt(3, "success")
    assert outcomes(log) == [("T", "failed_again_same"), ("T", "passed_on_retry")]


def test_the_verdict_may_arrive_after_the_next_attempt() -> None:
    log = Log()
    log.add(JobFinished(source="gitlab", project="p", pipeline_id="1", job_id="j1",
                        job_name="t", status="failed", sha="s"))  # fmt: skip
    log.add(JobFinished(source="gitlab", project="p", pipeline_id="1", job_id="j2",
                        job_name="t", status="success", sha="s"))  # fmt: skip
    assert outcomes(log) == []
    log.add(VerdictReached(source="gitlab", project="p", pipeline_id="1", job_id="j1",
                           job_name="t", category="unknown", retryable=False, budget="user",
                           action="none", confidence=0.5, signature=SPURIOUS))  # fmt: skip
    assert outcomes(log) == [("j1", "passed_on_retry")]


def test_wilson_interval() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(7, 7)
    assert 0.6 < low < 0.7 and high == 1.0
    low, high = wilson(0, 10)
    assert low == 0.0 and 0.27 < high < 0.29
    low, high = wilson(5, 10)
    assert low < 0.5 < high


def _record(passes: int, commits: int, again: int = 0, again_jobs: int | None = None) -> Record:
    r = Record(passes=passes, failed_again=again)
    r.pass_commits = {f"c{i}" for i in range(commits)}
    r.again_jobs = {
        ("p", "job", f"d{i}") for i in range(again if again_jobs is None else again_jobs)
    }
    return r


@pytest.mark.parametrize(
    ("passes", "commits", "again", "expected"),
    [(3, 2, 0, True), (2, 2, 0, False), (3, 1, 0, False), (7, 5, 1, False), (9, 9, 0, True)],
)
def test_promotion_thresholds(passes: int, commits: int, again: int, expected: bool) -> None:
    assert promote(_record(passes, commits, again), LearningSettings()) is expected


def test_demotion_when_the_upper_bound_falls_below_the_threshold() -> None:
    s = LearningSettings()
    assert not demote(_record(0, 0, again=3), s)  # too few retries to judge
    assert demote(_record(0, 0, again=4), s)  # 0 of 4: at most 49 % would pass
    assert not demote(_record(2, 2, again=2), s)
    assert demote(_record(1, 1, again=9), s)
    # One job failing again and again (a rerun that still runs out of memory) is not enough.
    assert not demote(_record(0, 0, again=9, again_jobs=1), s)


def test_a_signature_earns_a_retry_then_loses_it_and_the_verdict_says_why() -> None:
    log = Log()
    for sha in ("c1", "c2", "c2"):
        job(log, "failed", sha=sha)
        job(log, "success", sha=sha)
    (change,) = log.of(LearnedVerdictChanged)
    assert isinstance(change, LearnedVerdictChanged)
    assert (change.kind, change.subject, change.state) == ("signature", SPURIOUS.id, "retryable")
    assert change.text.startswith("3 of 3 retries passed across 2 commits since 2026-11-02")
    unknown = VerdictReached(
        source="gitlab", project="p", pipeline_id="1", job_id="9", job_name="t",
        category="unknown", retryable=False, budget="user", action="none", confidence=0.5,
        signature=SPURIOUS,
    )  # fmt: skip
    learned = apply_learning(unknown, log.learner.state, LearningSettings())
    assert (learned.category, learned.retryable, learned.budget) == (
        "learned_spurious",
        True,
        "learned",
    )
    assert learned.evidence[-1].text == change.text and learned.learned == change.evidence
    # Off: the same state changes nothing. A rule's category stays, but a rule that said
    # "deterministic" is overruled by the evidence; a cancel is never a failure to retry.
    assert apply_learning(unknown, log.learner.state, LearningSettings(enabled=False)) == unknown
    det = msgspec.structs.replace(unknown, category="deterministic", rules=("compile",))
    assert apply_learning(det, log.learner.state, LearningSettings()).category == "learned_spurious"
    net = msgspec.structs.replace(unknown, category="timeout", rules=("slow",))
    assert apply_learning(net, log.learner.state, LearningSettings()).category == "timeout"
    cancel = msgspec.structs.replace(unknown, category="cancelled")
    assert apply_learning(cancel, log.learner.state, LearningSettings()) == cancel
    # Its retries stop passing: demoted to explain-only, with an event saying why.
    for sha in [f"d{i}" for i in range(12)]:  # 3 of 15: at most 45 % would pass
        job(log, "failed", sha=sha)
        job(log, "failed", sha=sha)
    changes = list(log.of(LearnedVerdictChanged))
    assert len(changes) == 2
    last = changes[-1]
    assert isinstance(last, LearnedVerdictChanged)
    assert (last.state, last.reason) == ("explain_only", "retries_stopped_passing")
    assert apply_learning(unknown, log.learner.state, LearningSettings()) == unknown


def test_a_failure_again_on_the_same_commit_blocks_learning() -> None:
    log = Log()
    for sha in ("c1", "c2", "c3", "c4"):
        job(log, "failed", sha=sha, sig=BROKEN)
        job(log, "success", sha=sha)
    job(log, "failed", sha="c5", sig=BROKEN)
    job(log, "failed", sha="c5", sig=BROKEN)
    # Four passes, but one failure again came before the third: never promoted after it either.
    log2 = Log()
    job(log2, "failed", sha="c0", sig=BROKEN)
    job(log2, "failed", sha="c0", sig=BROKEN)
    for sha in ("c1", "c2", "c3", "c4"):
        job(log2, "failed", sha=sha, sig=BROKEN)
        job(log2, "success", sha=sha)
    assert list(log2.of(LearnedVerdictChanged)) == []


def test_a_job_that_keeps_failing_counts_once() -> None:
    """30 % of jobs failing again however often they are retried is a 70 % pass rate, not a
    rule whose retries stopped passing (the chaos suite's sticky jobs)."""
    log = Log()
    for i in range(10):
        sha = f"c{i}"
        job(log, "failed", sha=sha, sig=BROKEN, category="infra_network", rules=("net",),
            retryable=True)  # fmt: skip
        if i < 3:
            for _ in range(3):  # retried three times, failing each time
                job(log, "failed", sha=sha, sig=BROKEN, category="infra_network",
                    rules=("net",), retryable=True)  # fmt: skip
        else:
            job(log, "success", sha=sha)
    record = log.learner.rules["net"]
    assert (record.passes, record.failed_again) == (7, 3)
    assert [c for c in log.of(LearnedVerdictChanged) if c.kind == "rule"] == []  # type: ignore[attr-defined]


def test_a_rule_whose_retries_stop_passing_is_demoted_to_explain_only() -> None:
    log = Log()
    for sha in ("c1", "c2", "c3", "c4"):
        job(log, "failed", sha=sha, sig=BROKEN, category="infra_network", rules=("net",),
            retryable=True)  # fmt: skip
        job(log, "failed", sha=sha, sig=BROKEN, category="infra_network", rules=("net",),
            retryable=True)  # fmt: skip
    rule_changes = [c for c in log.of(LearnedVerdictChanged) if c.kind == "rule"]  # type: ignore[attr-defined]
    assert len(rule_changes) == 1 and rule_changes[0].state == "explain_only"  # type: ignore[attr-defined]
    verdict = VerdictReached(
        source="gitlab", project="p", pipeline_id="1", job_id="9", job_name="t",
        category="infra_network", retryable=True, budget="system", action="retry_job",
        confidence=0.9, rules=("net",), signature=SPURIOUS,
    )  # fmt: skip
    demoted = apply_learning(verdict, log.learner.state, LearningSettings())
    assert not demoted.retryable and demoted.action == "none"
    assert demoted.evidence[-1].rule == "learned:rule:net"


def test_a_dispute_of_a_learned_verdict_demotes_its_signature() -> None:
    log = Log()
    for sha in ("c1", "c2", "c3"):
        job(log, "failed", sha=sha)
        job(log, "success", sha=sha)
    learned = apply_learning(
        VerdictReached(source="gitlab", project="p", pipeline_id="1", job_id="77", job_name="t",
                       category="unknown", retryable=False, budget="user", action="none",
                       confidence=0.5, signature=SPURIOUS),
        log.learner.state, LearningSettings(),
    )  # fmt: skip
    recorded = log.add(learned)
    log.add(VerdictDisputed(verdict_event_id=recorded.event_id, who="alice", why="real bug"))
    last = list(log.of(LearnedVerdictChanged))[-1]
    assert isinstance(last, LearnedVerdictChanged)
    assert (last.state, last.reason) == ("explain_only", "disputed")
    assert "alice" in last.text
    assert not apply_learning(learned, log.learner.state, LearningSettings()) == learned


def test_replay_rebuilds_the_same_learned_state_from_the_log() -> None:
    log = Log()
    for sha in ("c1", "c2", "c3"):
        job(log, "failed", sha=sha)
        job(log, "success", sha=sha)
    for sha in ("d1", "d2"):
        job(log, "failed", sha=sha, sig=BROKEN)
        job(log, "failed", sha=sha, sig=BROKEN)
    live = log.learner.summary()
    rebuilt = fold_all(log.events, LearningSettings())
    assert rebuilt.summary() == live
    assert live["retryable_signatures"] == [SPURIOUS.id] and live["outcomes"] == 5
    # Folding again proposes nothing new: every proposal is already in the log.
    again = Learner(LearningSettings())
    proposed = [p for e in log.events for p in again.fold(e)]
    assert {p.metadata.idempotency_key for p in proposed} <= log.keys


def test_evidence_text_and_settings() -> None:
    ev = _record(7, 5).evidence()
    ev = msgspec.structs.replace(ev, since=T0, retries=7)
    assert evidence_text(ev) == "7 of 7 retries passed across 5 commits since 2026-11-02"
    s = learning_settings_from_text("[learning]\nmin_passes = 5\nenabled = false\n")
    assert (s.min_passes, s.enabled, s.min_commits) == (5, False, 2)
    with pytest.raises(LearningError):
        learning_settings_from_text("[learning]\nmin_pases = 5\n")
    with pytest.raises(LearningError):
        learning_settings_from_text("[learning]\ndemote_below = 2.0\n")
