"""Replay: rebuild every pipeline budget from the log and check each decision against it.

A RetryRequested was allowed only if, at the version it was appended (the stream's prefix before
it, which is exactly what act folded since it appended with that expected version), the pipeline
had spent fewer retries than the limit the request recorded, and the job fewer than its limit.
``verify`` re-derives those counts with the same fold act uses.

``rebuild_budgets`` is the fast path (bench, large logs): PostgreSQL concatenates each pipeline
stream's bodies into one JSON array, and msgspec decodes it in one call into slim structs that hold
only what the fold reads (``register_view``), so most of each body is skipped, not materialized.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from ciretry.common.events import (
    JobFinished,
    PipelineFinished,
    RecordedEvent,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
)
from ciretry.common.eventstore import EventStore

from .budget import BudgetState, attempt_order, register_view

PIPELINE_TYPES = (
    "JobFinished",
    "PipelineFinished",
    "RetryRequested",
    "RetrySkipped",
    "RetryIssued",
    "RetryFailed",
)


# --- slim views: same field names as the events, only what the fold reads ----------------------


class _View(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class JobFinishedView(_View, frozen=True, tag="JobFinished"):
    job_id: str
    job_name: str
    attempt: int | None = None


class _JobRefView(msgspec.Struct, frozen=True):
    name: str


class PipelineFinishedView(_View, frozen=True, tag="PipelineFinished"):
    jobs: tuple[_JobRefView, ...] = ()


class RetrySkippedView(_View, frozen=True, tag="RetrySkipped"):
    job_name: str
    reason: str
    category: str
    detail: str
    verdict_event_id: uuid.UUID | None = None


class RetryIssuedView(_View, frozen=True, tag="RetryIssued"):
    idempotency_key: str


class RetryFailedView(_View, frozen=True, tag="RetryFailed"):
    idempotency_key: str
    will_retry: bool = False


register_view(JobFinishedView, JobFinished)
register_view(PipelineFinishedView, PipelineFinished)
register_view(RetrySkippedView, RetrySkipped)
register_view(RetryIssuedView, RetryIssued)
register_view(RetryFailedView, RetryFailed)

_stream_decoder = msgspec.json.Decoder(
    list[
        JobFinishedView
        | PipelineFinishedView
        | RetryRequested
        | RetrySkippedView
        | RetryIssuedView
        | RetryFailedView
    ]
)

_REBUILD = """
SELECT stream, '['::bytea || string_agg(body, ','::bytea ORDER BY stream_version) || ']'::bytea,
       count(*)
FROM events
WHERE stream LIKE 'pipeline-%' AND type = ANY($1::text[]) AND schema_version = 1
GROUP BY stream
"""


async def rebuild_budgets(store: EventStore) -> dict[str, BudgetState]:
    """Every pipeline's BudgetState, from the whole log."""
    states: dict[str, BudgetState] = {}
    async with store.pool.acquire() as conn, conn.transaction():
        async for stream, body, _count in conn.cursor(
            _REBUILD, list(PIPELINE_TYPES), prefetch=200
        ):
            states[stream] = BudgetState().feed(_stream_decoder.decode(body))
    return states


# --- verify -------------------------------------------------------------------------------------


@dataclass
class Violation:
    stream: str
    position: int
    key: str
    why: str


@dataclass
class ReplayReport:
    events: int = 0
    pipelines: int = 0
    requests: int = 0
    skips: int = 0
    issued: int = 0
    failed: int = 0
    pending: int = 0
    violations: list[Violation] = field(default_factory=list)
    states: dict[str, BudgetState] = field(default_factory=dict)


def check_request(state: BudgetState, r: RetryRequested) -> str | None:
    """Why ``r`` exceeded its budget given the state folded before it, or None if it did not."""
    snap = r.snapshot
    if state.retries_requested >= snap.pipeline_limit:
        return (
            f"pipeline had {state.retries_requested} retries, limit {snap.pipeline_limit}"
        )
    h = state.jobs.get(r.job_name)
    if h is not None and r.idempotency_key not in state.requests:
        parts = r.idempotency_key.rsplit(":", 2)
        aid = parts[1] if len(parts) == 3 else r.job_id
        provider_attempt = h.attempts.get(aid)
        charged, _total, _newer = state.retries_used(
            r.job_name, aid, attempt_order(aid.split("#", 1)[0], provider_attempt), r.budget
        )
        if charged >= snap.job_limit:
            return f"job {r.job_name} had {charged} {r.budget} retries, limit {snap.job_limit}"
    return None


def verify(
    events: Iterable[RecordedEvent],
    report: ReplayReport | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Fold events (any interleaving of streams, each in stream order) and check every request."""
    report = report or ReplayReport()
    states = report.states
    for e in events:
        report.events += 1
        if progress is not None and report.events % 10_000 == 0:
            progress(10_000)
        if not e.stream.startswith("pipeline-"):
            continue
        state = states.get(e.stream)
        if state is None:
            state = states[e.stream] = BudgetState()
        data = e.data
        if isinstance(data, RetrySkipped):
            report.skips += 1
        elif isinstance(data, RetryIssued):
            report.issued += 1
        elif isinstance(data, RetryFailed):
            report.failed += 1
        elif isinstance(data, RetryRequested):
            if data.idempotency_key not in state.requests:
                report.requests += 1
                why = check_request(state, data)
                if why is not None:
                    report.violations.append(
                        Violation(e.stream, e.position, data.idempotency_key, why)
                    )
        state.feed((e,))
    report.pipelines = len(states)
    for state in states.values():
        report.pending += len(state.pending())
    return report


async def _all(store: EventStore, stream: str | None) -> AsyncIterator[RecordedEvent]:
    if stream:
        for e in await store.read_stream(stream):
            yield e
        return
    async for e in store.read_all(batch=5000):
        yield e


async def replay(
    store: EventStore,
    stream: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Rebuild budgets from the log (read_all, or one stream) and verify every decision."""
    report = ReplayReport()
    batch: list[RecordedEvent] = []
    async for e in _all(store, stream):
        batch.append(e)
        if len(batch) >= 5000:
            verify(batch, report, progress)
            batch = []
    verify(batch, report, progress)
    return report


__all__ = [
    "ReplayReport",
    "Violation",
    "check_request",
    "rebuild_budgets",
    "replay",
    "verify",
]
