"""Replay: rebuild every chain's budget from the log and check each decision against it.

A RetryRequested was allowed only if, at the versions it was appended at (the chain's streams'
prefixes before it, which is what act folded since it appended with those expected versions), the
chain had spent fewer retries than the limit the request recorded, and the job fewer than its
limit. ``verify`` re-derives those counts with the same fold act uses, following chains the way
act does: a decision names the pipeline of its job, and that pipeline's stream joins the chain of
the stream the decision is stored in (the origin's) before the decision is checked.

``rebuild_budgets`` is the fast path (bench, large logs): PostgreSQL concatenates each pipeline
stream's bodies into one JSON array, and msgspec decodes it in one call into the slim views of
``views`` (only what the fold reads), so most of each body is skipped, not materialized. Ranges
of streams are read over several connections sharing one snapshot, so PostgreSQL aggregates the
next ranges while Python decodes and folds this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field

from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    RecordedEvent,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    pipeline_stream,
)

from .budget import BudgetState, attempt_order
from .slim import FOLD_TYPES, VIEW_SCHEMA_VERSION, collector_paused, stream_decoder

PIPELINE_TYPES = FOLD_TYPES

#: Events folded between two yields to the event loop (which then serves the log's other
#: connections, so their queries do not stall on full buffers).
_YIELD_EVERY = 5000


async def rebuild_budgets(log: EventLog) -> dict[str, BudgetState]:
    """Every chain's BudgetState (by its origin's stream), from the whole log, as of one
    snapshot: every pipeline stream's bodies as one JSON array each (``stream_bodies``), decoded
    in one call into the slim views (only what the fold reads), folded, chains joined."""
    states: dict[str, BudgetState] = {}
    folded = 0
    with collector_paused():
        async with aclosing(
            log.stream_bodies("pipeline-", PIPELINE_TYPES, VIEW_SCHEMA_VERSION)
        ) as bodies:
            async for stream, body in bodies:
                state = states[stream] = BudgetState().feed(stream_decoder.decode(body))
                folded += state.events
                if folded >= _YIELD_EVERY:
                    folded = 0
                    await asyncio.sleep(0)
    return join_chains(states)


def join_chains(states: dict[str, BudgetState]) -> dict[str, BudgetState]:
    """Fold each chain's member streams (folded on their own) into its origin's state."""
    for stream in sorted(states, key=lambda s: -len(states[s].members)):
        state = states.get(stream)
        if state is None:
            continue
        for member in sorted(state.members):
            if member != stream and member in states:
                state.merge(states.pop(member))
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
    #: Pipeline streams seen; ``states`` has one entry per chain (a chain spans pipelines).
    pipelines: int = 0
    requests: int = 0
    skips: int = 0
    issued: int = 0
    failed: int = 0
    pending: int = 0
    violations: list[Violation] = field(default_factory=list)
    states: dict[str, BudgetState] = field(default_factory=dict)
    #: Member pipeline stream -> the stream of its chain's origin.
    chain_of: dict[str, str] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)


def check_request(state: BudgetState, r: RetryRequested) -> str | None:
    """Why ``r`` exceeded its budget given the state folded before it, or None if it did not."""
    snap = r.snapshot
    if state.retries_requested >= snap.pipeline_limit:
        return f"pipeline had {state.retries_requested} retries, limit {snap.pipeline_limit}"
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
    """Fold events (any interleaving of streams, each in stream order) and check every request.
    ``report.states`` holds each chain's state by its origin's stream."""
    report = report or ReplayReport()
    states = report.states
    chain_of = report.chain_of
    for e in events:
        report.events += 1
        if progress is not None and report.events % 10_000 == 0:
            progress(10_000)
        if not e.stream.startswith("pipeline-"):
            continue
        report.streams.add(e.stream)
        data = e.data
        if isinstance(data, RetryRequested | RetrySkipped | RetryIssued | RetryFailed):
            # Decisions live in the origin's stream and name the pipeline of their job.
            member = pipeline_stream(data.source, data.project, data.pipeline_id)
            _join(states, chain_of, e.stream, member)
        target = chain_of.get(e.stream, e.stream)
        state = states.get(target)
        if state is None:
            state = states[target] = BudgetState()
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
        if isinstance(data, RetryIssued) and data.new_pipeline_id is not None:
            _join(
                states,
                chain_of,
                e.stream,
                pipeline_stream(data.source, data.project, data.new_pipeline_id),
            )
    report.pipelines = len(report.streams)
    report.pending = sum(len(state.pending()) for state in states.values())
    return report


def _join(
    states: dict[str, BudgetState], chain_of: dict[str, str], origin: str, member: str
) -> None:
    """``member`` joins the chain stored in ``origin``: what was folded of it moves there."""
    origin = chain_of.get(origin, origin)
    if member == origin or chain_of.get(member) == origin:
        return
    chain_of[member] = origin
    folded = states.pop(member, None)
    if folded is not None:
        states.setdefault(origin, BudgetState()).merge(folded)
    for stream, root in chain_of.items():  # a member that had members of its own (rare)
        if root == member:
            chain_of[stream] = origin


async def _all(store: EventLog, stream: str | None) -> AsyncIterator[RecordedEvent]:
    if stream:
        for e in await store.read_stream(stream):
            yield e
        return
    async for e in store.read_all(batch=5000):
        yield e


async def replay(
    store: EventLog,
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
    "join_chains",
    "rebuild_budgets",
    "replay",
    "verify",
]
