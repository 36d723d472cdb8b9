"""The cold-start loader (bodies, slim decoders) folds the same budgets as the full read, on each
event log adapter."""

from __future__ import annotations

from typing import Any, cast

import pytest

from ciretry.act.budget import BudgetState, fold_budget
from ciretry.act.chains import ChainLoader, find_job, load_into, prefetch_jobs
from ciretry.common import eventstore, memory
from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    BudgetSnapshot,
    JobRef,
    NewEvent,
    PipelineFinished,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    pipeline_stream,
)

from .helpers import PIPELINE, PROJECT, job

STREAM = pipeline_stream("gitlab", PROJECT, PIPELINE)


def _req(job_id: str, name: str) -> RetryRequested:
    return RetryRequested(
        source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id=job_id, job_name=name,
        action="retry_job", idempotency_key=f"act:gitlab:{PROJECT}:{job_id}:retry_job",
        category="preempted", budget="system", snapshot=BudgetSnapshot(pipeline_limit=9),
    )


def _same(a: BudgetState, b: BudgetState) -> None:
    assert (a.events, a.version, a.retries_requested, a.job_names, a.deterministic) == (
        b.events, b.version, b.retries_requested, b.job_names, b.deterministic
    )
    assert list(a.requests.items()) == list(b.requests.items())
    assert a.outcomes == b.outcomes and a.decided_verdicts == b.decided_verdicts
    assert {k: (h.attempts, h.requested, h.resources) for k, h in a.jobs.items()} == {
        k: (h.attempts, h.requested, h.resources) for k, h in b.jobs.items()
    }


async def load_state(log: EventLog, stream: str) -> BudgetState | None:
    state = BudgetState()
    return state if await load_into(log, state, stream) else None


async def test_load_state_matches_full_fold_across_ranges(
    log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = log
    # Tiny ranges and groups, so several connections and groups are exercised.
    monkeypatch.setattr(eventstore, "BODY_RANGE", 3)
    monkeypatch.setattr(eventstore, "BODY_GROUP", 2)
    monkeypatch.setattr(memory, "BODY_GROUP", 2)
    events = [
        job(1, "a"), job(2, "b", attempt=1), _req("1", "a"), job(3, "a"),
        RetryIssued(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="1",
                    idempotency_key=f"act:gitlab:{PROJECT}:1:retry_job", new_job_id="3"),
        RetrySkipped(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id="2",
                     job_name="b", reason="not_retryable", detail="x",
                     category="deterministic", snapshot=BudgetSnapshot()),
        PipelineFinished(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                         status="failed", jobs=(JobRef(job_id="9", name="c", status="failed"),)),
        job(3, "a", user="bob"),
    ]
    await store.append(STREAM, events)
    full = fold_budget(await store.read_stream(STREAM))
    fast = await load_state(store, STREAM)
    assert fast is not None
    _same(fast, full)
    assert fast.job_versions == {"1": (STREAM, 1), "2": (STREAM, 2), "3": (STREAM, 8)}
    # The job a decision needs: the latest JobFinished of the id, fetched by its version...
    assert await find_job(store, STREAM, fast, "3") == full.job_by_id["3"]
    # ... or the event the verdict names, when it is a JobFinished of this pipeline.
    first3 = next(e for e in await store.read_stream(STREAM) if e.stream_version == 4)
    fresh = await load_state(store, STREAM)
    assert fresh is not None
    assert await find_job(store, STREAM, fresh, "3", first3.event_id) == first3.data
    assert await find_job(store, STREAM, fresh, "404") is None
    # Appended since: folded from RecordedEvents as before.
    await store.append_batch([NewEvent(stream=STREAM, data=job(4, "d"))])
    fresh.feed(await store.read_stream(STREAM, fresh.version + 1))
    _same(fresh, fold_budget(await store.read_stream(STREAM)))


async def test_load_state_of_missing_stream_is_empty(log: EventLog) -> None:
    state = await load_state(log, "pipeline-gitlab-none-1")
    assert state is not None and state.version == 0 and state.events == 0


class _NoReads:
    """A log that must not be read: what ``find_job`` gets after ``prefetch_jobs``."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"read the log ({name}) for a job that was prefetched")


async def test_a_batch_of_jobs_is_fetched_together_and_found_without_reads(
    log: EventLog,
) -> None:
    other = pipeline_stream("gitlab", PROJECT, "999")
    await log.append(STREAM, [job(1, "a"), job(2, "b"), _req("1", "a")])
    await log.append(other, [job(7, "x", pipeline_id="999")])
    one, two, request = await log.read_stream(STREAM)
    (elsewhere,) = await log.read_stream(other)
    state = await load_state(log, STREAM)
    assert state is not None and not state.jobs_by_event  # cold: job versions only
    # Only JobFinished events of the pipeline's own stream are taken (as ``find_job`` does).
    await prefetch_jobs(
        log, STREAM, state, [one.event_id, two.event_id, request.event_id, elsewhere.event_id, None]
    )
    assert state.jobs_by_event == {one.event_id: one.data, two.event_id: two.data}
    no_reads = cast(EventLog, _NoReads())
    assert await find_job(no_reads, STREAM, state, "1", one.event_id) == one.data
    assert await find_job(no_reads, STREAM, state, "2", two.event_id) == two.data
    await prefetch_jobs(no_reads, STREAM, state, [one.event_id, two.event_id])  # held: no read


async def test_a_cached_chain_reads_the_jobs_it_needs_while_catching_up(log: EventLog) -> None:
    other = pipeline_stream("gitlab", PROJECT, "999")
    await log.append(STREAM, [job(1, "a"), job(2, "b")])
    await log.append(other, [job(7, "x", pipeline_id="999")])
    one, two = await log.read_stream(STREAM)
    (elsewhere,) = await log.read_stream(other)
    chains = ChainLoader(log)
    cold = await chains.load("gitlab", PROJECT, PIPELINE)
    assert not cold.state.jobs_by_event  # loaded cold: job versions only
    (three,) = await log.append(STREAM, [job(3, "c")])  # appended since: caught up in full
    ids = [one.event_id, three.event_id, elsewhere.event_id]
    chain = await chains.load("gitlab", PROJECT, PIPELINE, jobs=ids)
    assert chain.state is cold.state
    assert chain.state.jobs_by_event == {
        one.event_id: one.data, three.event_id: three.data  # not another pipeline's job
    }
    assert await find_job(cast(EventLog, _NoReads()), STREAM, chain.state, "1", one.event_id) == (
        one.data
    )
    assert two.event_id not in chain.state.jobs_by_event  # only what was asked for
