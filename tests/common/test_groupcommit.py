"""Group commit (``ciretry.common.groupcommit``): concurrent submissions, each with its own
tracking row, in one transaction; one bad or redelivered submission fails alone; a transient
failure fails them all and a retry commits each once. On each event log (PostgreSQL, memory)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import asyncpg
import pytest

from ciretry.common.eventlog import (
    AlreadyProcessed,
    AppendResult,
    EventLog,
    TrackedAppend,
    Tracking,
)
from ciretry.common.events import JobFinished, Metadata, NewEvent, RecordedEvent
from ciretry.common.eventstore import EventStore
from ciretry.common.groupcommit import AppendBatcher, StreamReader


def verdict_for(job_id: str) -> NewEvent:
    """A stand-in for a consumer's output: one event with an idempotency key, in its stream."""
    return NewEvent(
        stream=f"job-{job_id}",
        data=JobFinished(
            source="gitlab", project="42", pipeline_id="7", job_id=job_id, job_name="build",
            status="failed",
        ),
        metadata=Metadata(idempotency_key=f"out:{job_id}"),
    )  # fmt: skip


class Faulty:
    """An event log whose ``append_tracked`` fails as told, and that counts its calls."""

    def __init__(self, log: EventLog, *, transient: int = 0, refuse: str | None = None) -> None:
        self.log = log
        self.transient = transient
        self.refuse = refuse
        self.calls: list[int] = []  # units per call
        self.reads: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)

    async def append_tracked(
        self, units: Sequence[TrackedAppend]
    ) -> list[list[AppendResult] | AlreadyProcessed]:
        self.calls.append(len(units))
        if self.transient:
            self.transient -= 1
            raise ConnectionRefusedError("database restarting")
        if any(e.stream == self.refuse for u in units for e in u.events):
            raise ValueError("a value the database refuses")
        return await self.log.append_tracked(units)

    async def read_streams(self, streams: Sequence[str]) -> dict[str, list[RecordedEvent]]:
        self.reads.append(list(streams))
        if self.transient:
            self.transient -= 1
            raise ConnectionRefusedError("database restarting")
        return await self.log.read_streams(streams)


@pytest.fixture
async def faulty(log: EventLog) -> Faulty:
    return Faulty(log)


@pytest.fixture
async def batcher(faulty: Faulty) -> AsyncIterator[AppendBatcher]:
    b = AppendBatcher(cast(EventLog, faulty), name="test")
    yield b
    await b.close()


async def submit(
    batcher: AppendBatcher, job_ids: Sequence[str], causes: dict[str, uuid.UUID]
) -> list[list[AppendResult] | BaseException]:
    """Submit one output per job, with its tracking row, all at once (they queue together)."""
    return await asyncio.gather(
        *(
            batcher.append([verdict_for(j)], tracking=Tracking("test", causes[j]))
            for j in job_ids
        ),
        return_exceptions=True,
    )


async def test_concurrent_submissions_commit_in_one_transaction_with_their_tracking_rows(
    log: EventLog, faulty: Faulty, batcher: AppendBatcher
) -> None:
    jobs = [str(i) for i in range(20)]
    causes = {j: uuid.uuid4() for j in jobs}
    bare = uuid.uuid4()
    results, tracked_alone = await asyncio.gather(
        submit(batcher, jobs, causes), batcher.append([], tracking=Tracking("test", bare))
    )
    assert faulty.calls == [21]  # one transaction for all of them
    assert tracked_alone == []
    for j, result in zip(jobs, results, strict=True):
        assert not isinstance(result, BaseException)
        (r,) = result
        assert not r.duplicate and r.event.stream == f"job-{j}"
        assert await log.is_processed("test", causes[j])
    assert await log.is_processed("test", bare)
    assert batcher.stats.batches == 1 and batcher.stats.events == 20


async def test_an_idle_batcher_holds_no_task_and_takes_work_again(
    log: EventLog, faulty: Faulty
) -> None:
    """Its collector ends once nothing is queued (a batcher nobody closes, as in tools and
    tests, leaves nothing pending), and the next append starts another."""
    batcher = AppendBatcher(cast(EventLog, faulty), name="idle")
    for job_id in ("idle-1", "idle-2"):
        await batcher.append([verdict_for(job_id)])
        (collector,) = [t for t in asyncio.all_tasks() if t.get_name() == "idle-batcher"]
        await asyncio.wait_for(collector, timeout=5)  # ends by itself
        assert len(await log.read_stream(f"job-{job_id}")) == 1
    assert faulty.calls == [1, 1]


async def test_a_redelivered_submission_fails_alone(
    log: EventLog, faulty: Faulty, batcher: AppendBatcher
) -> None:
    jobs = ["a", "b", "c"]
    causes = {j: uuid.uuid4() for j in jobs}
    await log.record_tracking(Tracking("test", causes["b"]))  # b was processed before
    a, b, c = await submit(batcher, jobs, causes)
    assert isinstance(b, AlreadyProcessed) and b.event_id == causes["b"]
    assert not isinstance(a, BaseException) and not isinstance(c, BaseException)
    assert faulty.calls == [3]  # no retry needed: the others committed with it
    assert await log.read_stream("job-b") == []
    assert len(await log.read_stream("job-a")) == len(await log.read_stream("job-c")) == 1
    assert batcher.stats.already_processed == 1


async def test_a_submission_the_log_refuses_fails_alone(log: EventLog) -> None:
    faulty = Faulty(log, refuse="job-bad")
    batcher = AppendBatcher(cast(EventLog, faulty), name="test")
    jobs = ["a", "bad", "c"]
    causes = {j: uuid.uuid4() for j in jobs}
    try:
        a, bad, c = await submit(batcher, jobs, causes)
    finally:
        await batcher.close()
    assert isinstance(bad, ValueError)
    assert not isinstance(a, BaseException) and not isinstance(c, BaseException)
    assert faulty.calls == [3, 1, 1, 1]  # the batch, then each on its own
    assert batcher.stats.isolated_retries == 1
    assert await log.is_processed("test", causes["a"]) and await log.is_processed("test", causes["c"])
    assert not await log.is_processed("test", causes["bad"])  # free to be tried again


async def test_a_value_postgresql_refuses_fails_only_its_submission(store: EventStore) -> None:
    """The real thing: PostgreSQL refuses a NUL character in text (a stream name)."""
    batcher = AppendBatcher(store, name="test")
    bad = NewEvent(stream="job-\x00", data=verdict_for("x").data)
    causes = [uuid.uuid4() for _ in range(3)]
    try:
        results = await asyncio.gather(
            batcher.append([verdict_for("a")], tracking=Tracking("test", causes[0])),
            batcher.append([bad], tracking=Tracking("test", causes[1])),
            batcher.append([verdict_for("c")], tracking=Tracking("test", causes[2])),
            return_exceptions=True,
        )
    finally:
        await batcher.close()
    assert isinstance(results[1], asyncpg.PostgresError)
    assert [await store.is_processed("test", c) for c in causes] == [True, False, True]
    assert len(await store.read_stream("job-a")) == len(await store.read_stream("job-c")) == 1


async def test_a_transient_failure_fails_every_submission_and_a_retry_commits_each_once(
    log: EventLog,
) -> None:
    faulty = Faulty(log, transient=1)
    batcher = AppendBatcher(cast(EventLog, faulty), name="test")
    jobs = [str(i) for i in range(5)]
    causes = {j: uuid.uuid4() for j in jobs}
    try:
        first = await submit(batcher, jobs, causes)
        # Each caller retries (a consumer naks; the event comes back).
        second = await submit(batcher, jobs, causes)
        # And a retry of a retry is a redelivery: the tracking rows say so.
        third = await submit(batcher, jobs, causes)
    finally:
        await batcher.close()
    assert all(isinstance(r, ConnectionRefusedError) for r in first)
    assert faulty.calls == [5, 5, 5]  # a transient failure is not retried one by one
    assert all(not isinstance(r, BaseException) for r in second)
    assert all(isinstance(r, AlreadyProcessed) for r in third)
    for j in jobs:
        assert len(await log.read_stream(f"job-{j}")) == 1
        assert await log.is_processed("test", causes[j])


async def test_only_what_was_stored_is_published(log: EventLog) -> None:
    published: list[list[AppendResult]] = []

    async def publish(fresh: Sequence[AppendResult]) -> None:
        published.append(list(fresh))

    batcher = AppendBatcher(log, name="test", publish=publish)
    causes = {j: uuid.uuid4() for j in "abc"}
    await log.record_tracking(Tracking("test", causes["b"]))
    await log.append_batch([verdict_for("c")])  # c's output is in the log already
    try:
        await submit(batcher, list("abc"), causes)
    finally:
        await batcher.close()  # waits for the background publish
    assert [[r.event.stream for r in batch] for batch in published] == [["job-a"]]
    assert published[0][0].body is not None


async def test_concurrent_stream_reads_share_one_query(log: EventLog, faulty: Faulty) -> None:
    await log.append_batch([verdict_for("a"), verdict_for("b")])
    reader = StreamReader(cast(EventLog, faulty))
    a, b, again, empty = await asyncio.gather(
        reader.read("job-a"), reader.read("job-b"), reader.read("job-a"), reader.read("job-z")
    )
    assert faulty.reads == [["job-a", "job-b", "job-z"]]
    assert [e.stream for e in a + b + again] == ["job-a", "job-b", "job-a"]
    assert a == again and a is not again  # each caller its own list
    assert empty == []


async def test_a_failed_stream_read_fails_its_callers_and_the_next_read_works(
    log: EventLog,
) -> None:
    await log.append_batch([verdict_for("a")])
    faulty = Faulty(log, transient=1)
    reader = StreamReader(cast(EventLog, faulty))
    failed = await asyncio.gather(
        reader.read("job-a"), reader.read("job-b"), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionRefusedError) for r in failed)
    (event,) = await reader.read("job-a")
    assert event.stream == "job-a"
