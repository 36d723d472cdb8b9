"""Replay: budgets rebuilt from the log; over-budget decisions are found."""

from __future__ import annotations

import argparse

from ciretry.act import cli
from ciretry.act.budget import fold_budget
from ciretry.act.replay import rebuild_budgets, replay, verify
from ciretry.common.eventlog import EventLog
from ciretry.common.events import BudgetSnapshot, RetryRequested, pipeline_stream

from .helpers import PIPELINE, PROJECT, job

STREAM = pipeline_stream("gitlab", PROJECT, PIPELINE)


def req(job_id: str, name: str, limit: int, job_limit: int = 3) -> RetryRequested:
    return RetryRequested(
        source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id=job_id, job_name=name,
        action="retry_job", idempotency_key=f"act:gitlab:{PROJECT}:{job_id}:retry_job",
        category="preempted", budget="system",
        snapshot=BudgetSnapshot(pipeline_limit=limit, job_limit=job_limit),
    )


async def test_replay_finds_over_budget_and_fast_rebuild_agrees(log: EventLog) -> None:
    store = log
    events = [job(1, "a"), job(2, "b"), job(3, "c"),
              req("1", "a", 2), req("2", "b", 2), req("3", "c", 2),  # third exceeds limit 2
              job(4, "a"), req("4", "a", 5, job_limit=1)]  # a's second retry, job limit 1
    await store.append(STREAM, events)
    report = await replay(store)
    assert report.requests == 4 and report.pipelines == 1
    assert [v.key.split(":")[3] for v in report.violations] == ["3", "4"]
    assert "limit 2" in report.violations[0].why and "job a" in report.violations[1].why
    fast = await rebuild_budgets(store)
    slow = fold_budget(await store.read_stream(STREAM))
    assert fast[STREAM].retries_requested == slow.retries_requested == 4
    assert fast[STREAM].job_names == slow.job_names
    assert fast[STREAM].events == slow.events == len(events)


def test_verify_accepts_decisions_within_budget() -> None:
    import datetime as dt
    import uuid

    from ciretry.common.events import Metadata, RecordedEvent

    recs = [
        RecordedEvent(event_id=uuid.uuid4(), stream=STREAM, stream_version=i + 1, position=i + 1,
                      recorded_at=dt.datetime.now(dt.UTC), data=e, metadata=Metadata())
        for i, e in enumerate([job(1, "a"), req("1", "a", 1)])
    ]
    report = verify(recs)
    assert report.violations == [] and report.requests == 1


def test_cli_registers_replay() -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["replay", "--stream", "s", "--verify"])
    assert args.stream == "s" and args.verify and args.func is cli.run
