"""classify's learning follower over a real event log (both adapters): it records outcomes and
learned changes once, lends the learned state to verdicts, and ``ciretry replay`` rebuilds the
same state from the log."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from ciretry.act import cli as act_cli
from ciretry.act.replay import replay_learning
from ciretry.classify.learner import LearningFollower
from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    JobFinished,
    LearnedEvidence,
    LearnedVerdictChanged,
    NewEvent,
    OutcomeRecorded,
    VerdictDisputed,
    VerdictReached,
    job_stream,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore
from ciretry.common.learning import LearningSettings
from ciretry.common.signature import signature_of

SIG = signature_of(["error: upstream registry answered 503 Service Unavailable"])


def _job(job_id: str, status: str, sha: str) -> NewEvent:
    return NewEvent(
        stream=pipeline_stream("gitlab", "p", sha),
        data=JobFinished(source="gitlab", project="p", pipeline_id=sha, job_id=job_id,
                         job_name="build", status=status, sha=sha),
    )  # fmt: skip


def _verdict(job_id: str, sha: str) -> VerdictReached:
    return VerdictReached(source="gitlab", project="p", pipeline_id=sha, job_id=job_id,
                          job_name="build", category="unknown", retryable=False, budget="user",
                          action="none", confidence=0.5, signature=SIG)  # fmt: skip


async def _history(log: EventLog, follower: LearningFollower) -> None:
    n = 0
    for sha in ("c1", "c2", "c3"):
        n += 1
        failed, passed = f"{n}0", f"{n}1"
        await log.append_batch([_job(failed, "failed", sha)])
        await log.append_batch(
            [NewEvent(stream=job_stream("gitlab", "p", failed), data=_verdict(failed, sha))]
        )
        await log.append_batch([_job(passed, "success", sha)])
        await follower.catch_up()


async def test_the_follower_learns_once_and_replay_rebuilds_it(log: EventLog) -> None:
    settings = LearningSettings()
    follower = LearningFollower(log, log.append_batch, settings)
    twin = LearningFollower(log, log.append_batch, settings)  # a second replica
    await _history(log, follower)
    # Each round folds what the last appended: a proposal counts once it is read back.
    for _ in range(3):
        await twin.catch_up()
        await follower.catch_up()
    events = [e async for e in log.read_all(0)]
    outcomes = [e.data for e in events if isinstance(e.data, OutcomeRecorded)]
    changes = [e.data for e in events if isinstance(e.data, LearnedVerdictChanged)]
    assert [o.outcome for o in outcomes] == ["passed_on_retry"] * 3  # stored once, two replicas
    assert len(changes) == 1 and changes[0].subject == SIG.id
    # A new failure with that signature: the verdict is retryable, with the numbers.
    learned = twin.apply(_verdict("99", "c4"))
    assert learned.retryable and learned.category == "learned_spurious"
    assert learned.evidence[-1].text is not None
    assert learned.evidence[-1].text.startswith("3 of 3 retries passed across 3 commits")
    recorded = NewEvent(stream=job_stream("gitlab", "p", "99"), data=learned)
    await log.append_batch([recorded])
    check = await replay_learning(log, settings)
    assert check.ok and check.missing == []
    assert check.learner.summary() == follower.learner.summary()
    assert check.outcomes == {"passed_on_retry": 3}
    # A person disputes the learned verdict: the signature is demoted, for every replica.
    await log.append_batch(
        [NewEvent(stream="feedback", data=VerdictDisputed(
            verdict_event_id=recorded.event_id, who="bob", why="a real outage"))]
    )  # fmt: skip
    for _ in range(2):
        await follower.catch_up()
        await twin.catch_up()
    assert not twin.apply(_verdict("100", "c5")).retryable
    check = await replay_learning(log, settings)
    assert check.ok and check.changes == 2
    # A forged change (no outcomes behind it) is found by replay.
    forged = msgspec.structs.replace(changes[0], subject="sig-v1:0000000000000000")
    await log.append_batch([NewEvent(stream="learned-forged", data=forged)])
    assert not (await replay_learning(log, settings)).ok


async def test_ciretry_replay_prints_the_learned_state_and_verifies_it(
    store: EventStore,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    follower = LearningFollower(store, store.append_batch, LearningSettings())
    await _history(store, follower)
    for _ in range(2):
        await follower.catch_up()
    monkeypatch.setenv("CIRETRY_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CIRETRY_DATABASE_SCHEMA", store.schema)
    monkeypatch.setenv("COLUMNS", "200")
    # The command calls asyncio.run itself, as `ciretry` does: give it a thread.
    assert await asyncio.to_thread(act_cli.main, ["replay", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "learning (rebuilt from the log)" in out
    assert "retryable signatures (learned)" in out and "outcomes: passed_on_retry" in out
    forged = LearnedVerdictChanged(
        kind="signature", subject="sig-v1:0000000000000000", state="retryable",
        reason="passed_on_retry", evidence=LearnedEvidence(), text="made up",
    )  # fmt: skip
    await store.append_batch([NewEvent(stream="learned-forged", data=forged)])
    assert await asyncio.to_thread(act_cli.main, ["replay", "--verify"]) == 1
    assert "not backed" in capsys.readouterr().out
