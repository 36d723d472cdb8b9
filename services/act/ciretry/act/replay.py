"""Replay: rebuild every chain's budget from the log and check each decision against it.

A RetryRequested was allowed only if, at the versions it was appended at (the chain's streams'
prefixes before it, which is what act folded since it appended with those expected versions), the
chain had spent fewer retries than the limit the request recorded, and the job fewer than its
limit. ``verify`` re-derives those counts with the same fold act uses, following chains the way
act does: a decision names the pipeline of its job, and that pipeline's stream joins the chain of
the stream the decision is stored in (the origin's) before the decision is checked.

``replay`` (what ``ciretry replay`` runs) reads the log the way act's cold start does: bodies
only, one JSON array per pipeline stream (``EventLog.stream_bodies``; ``body_groups`` for one
stream), decoded in one msgspec call into the slim views of ``slim`` (only what the fold reads),
folded, each request checked against the fold of its stream's prefix (``check_stream``). That is
exact for a chain of one stream, nearly every chain: its stream order is the order act decided
in. A chain spanning several streams (reruns that created pipelines, decisions naming them) is
re-read in full and verified in position order (``verify``), since its streams' prefixes
interleave; those chains are found after the fold, from the pipelines each state's decisions name.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    RecordedEvent,
    RetryFailed,
    RetryIssued,
    RetryParked,
    RetryRequested,
    RetrySkipped,
    pipeline_stream,
)
from ciretry.common.learning import (
    LEARNING_TYPES,
    LearningCheck,
    LearningSettings,
    verify_learning,
)

from .budget import BudgetState, attempt_order
from .policy import StormSettings
from .slim import (
    FOLD_TYPES,
    VIEW_SCHEMA_VERSION,
    RetryFailedView,
    RetryIssuedView,
    RetrySkippedView,
    View,
    collector_paused,
    stream_decoder,
)
from .storms import DETECT_TYPES, StormCheck, verify_storms

PIPELINE_PREFIX = "pipeline-"

#: Events folded between two yields to the event loop (which then serves the log's other
#: connections, so their queries do not stall on full buffers) and progress reports.
_YIELD_EVERY = 5000


@dataclass
class Violation:
    stream: str
    position: int
    key: str
    why: str


@dataclass
class ReplayReport:
    #: Events folded: every event of the fold's types in pipeline streams (``verify`` on its
    #: own counts every event it is given).
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
    #: Chains of several streams, verified from their full events (``verify``).
    multi_stream_chains: int = 0


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


# --- the fast path: one stream's views --------------------------------------------------------


@dataclass
class StreamCheck:
    """One pipeline stream folded on its own from its views, its requests checked in order."""

    state: BudgetState
    requests: int = 0
    skips: int = 0
    issued: int = 0
    failed: int = 0
    #: (idempotency key, why) of each request over budget, in stream order.
    violations: list[tuple[str, str]] = field(default_factory=list)


def check_stream(views: Sequence[View]) -> StreamCheck:
    """Fold one stream's views (stream order) and check each new request against the fold of
    the views before it: what ``verify`` does for a chain of this one stream. Pure."""
    state = BudgetState()
    checked = StreamCheck(state)
    kinds = Counter(map(type, views))  # one pass in C; the fold below is the Python one
    checked.skips = kinds[RetrySkippedView]
    checked.issued = kinds[RetryIssuedView]
    checked.failed = kinds[RetryFailedView]
    start = 0
    if kinds[RetryRequested]:
        for i in [i for i, v in enumerate(views) if type(v) is RetryRequested]:
            state.feed(views[start:i])
            start = i
            request: Any = views[i]
            if request.idempotency_key in state.requests:
                continue  # a duplicate: the fold ignores it, and so does the check
            checked.requests += 1
            why = check_request(state, request)
            if why is not None:
                checked.violations.append((request.idempotency_key, why))
    state.feed(views[start:])
    return checked


# --- the full path: events in position order --------------------------------------------------


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
        if not e.stream.startswith(PIPELINE_PREFIX):
            continue
        report.streams.add(e.stream)
        data = e.data
        if isinstance(data, RetryRequested | RetrySkipped | RetryIssued | RetryFailed | RetryParked):
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


def multi_stream_chains(states: dict[str, BudgetState]) -> list[list[str]]:
    """Groups of streams that are one chain (or touch one): connected by the pipelines the
    decisions folded into each stream's state name. Streams alone in their group are left out."""
    parent: dict[str, str] = {}

    def root(s: str) -> str:
        while (up := parent.get(s, s)) != s:
            s = up
        return s

    for stream, state in states.items():
        for member in state.members:
            if member != stream:
                a, b = root(stream), root(member)
                if a != b:
                    parent[b] = a
    groups: dict[str, list[str]] = {}
    for s in parent:
        groups.setdefault(root(s), []).append(s)
    for r, members in groups.items():
        if r not in members:
            members.append(r)
    return [sorted(g) for g in groups.values()]


# --- replay -----------------------------------------------------------------------------------


async def replay(
    log: EventLog,
    stream: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Rebuild every chain's budget from the log and check every request (or only ``stream``'s,
    on its own). The whole log is read as of one snapshot; chains of several streams are then
    read again in full (they may have grown since, which is no less true a check)."""
    report = ReplayReport()
    checks: dict[str, StreamCheck] = {}
    if stream:
        views = await _stream_views(log, stream)
        if views is None:  # stored under a schema version the views were not written for
            return verify(await log.read_stream(stream), report, progress)
        if views:
            checks[stream] = check_stream(views)
    else:
        pending = 0
        with collector_paused():
            async with aclosing(
                log.stream_bodies(PIPELINE_PREFIX, FOLD_TYPES, VIEW_SCHEMA_VERSION)
            ) as bodies:
                async for name, body in bodies:
                    checked = checks[name] = check_stream(stream_decoder.decode(body))
                    pending += checked.state.events
                    if pending >= _YIELD_EVERY:
                        if progress is not None:
                            progress(pending)
                        pending = 0
                        await asyncio.sleep(0)
        if progress is not None and pending:
            progress(pending)
    report.streams = set(checks)
    groups = [] if stream else multi_stream_chains({s: c.state for s, c in checks.items()})
    for group in groups:
        for s in group:
            checks.pop(s, None)
        events = await log.read_streams(group)
        by_position = heapq.merge(*events.values(), key=_position)
        chain = verify(by_position)
        report.events += chain.events
        report.requests += chain.requests
        report.skips += chain.skips
        report.issued += chain.issued
        report.failed += chain.failed
        report.violations += chain.violations
        report.states.update(chain.states)
        report.chain_of.update(chain.chain_of)
        report.streams |= chain.streams
    report.multi_stream_chains = len(groups)
    for name, checked in checks.items():
        report.states[name] = checked.state
        report.events += checked.state.events
        report.requests += checked.requests
        report.skips += checked.skips
        report.issued += checked.issued
        report.failed += checked.failed
        if checked.violations:
            # Views carry no positions: the stream's events say where each request is (a
            # violation is rare; the first request with a key is the one checked).
            where: dict[str, int] = {}
            for e in await log.read_stream(name):
                if isinstance(e.data, RetryRequested):
                    where.setdefault(e.data.idempotency_key, e.position)
            report.violations += [
                Violation(name, where.get(key, 0), key, why) for key, why in checked.violations
            ]
    report.violations.sort(key=lambda v: v.position)
    report.pipelines = len(report.streams)
    report.pending = sum(len(state.pending()) for state in report.states.values())
    return report


async def replay_storms(log: EventLog, settings: StormSettings) -> StormCheck:
    """Rebuild every retry storm (open, ended, parked jobs waiting for release) from the log and
    check that each recorded storm was opened by the verdicts before it and each park names a
    storm recorded before it."""
    events = [e async for e in log.read_all(0, types=DETECT_TYPES)]
    return verify_storms(events, settings)


async def replay_learning(log: EventLog, settings: LearningSettings) -> LearningCheck:
    """Rebuild every learned state (outcomes, retryable and explain-only signatures and rules)
    from the log and check the recorded changes and the verdicts that used them."""
    events = [e async for e in log.read_all(0, types=LEARNING_TYPES)]
    return verify_learning(events, settings)


def _position(e: RecordedEvent) -> int:
    return e.position


async def _stream_views(log: EventLog, stream: str) -> list[View] | None:
    """One stream's views in stream order, as act's cold start reads them (``body_groups``);
    None when a fold type is stored under another schema version."""
    views: list[View] = []
    async with aclosing(log.body_groups(stream, FOLD_TYPES, VIEW_SCHEMA_VERSION)) as groups:
        async for group in groups:
            if group.foreign:
                return None
            if group.body is not None:
                views += stream_decoder.decode(group.body)
    return views


__all__ = [
    "ReplayReport",
    "StreamCheck",
    "Violation",
    "check_request",
    "check_stream",
    "multi_stream_chains",
    "replay",
    "replay_storms",
    "verify",
]
