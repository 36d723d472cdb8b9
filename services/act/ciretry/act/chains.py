"""Loading attempt chains: which pipelines a decision's budget spans, and their folded state.

A chain starts at an *origin* pipeline. A pipeline act created (to rerun a job of the chain with
more memory, or to recreate it) carries the request's idempotency key, and its stream holds a
``PipelineLinked`` naming it (ingest records it from the pipeline's hooks; act from the
provider's API when no hook has told yet). The request itself is in the origin's stream (every
decision of a chain is: ``events.decision_stream``), so one lookup by key finds the origin:

    pipeline P3 --PipelineLinked(retry_of=K2)--> request K2 (in the origin's stream P1)

A chain's state is the fold of the origin's stream and of its members' streams (the pipelines
its decisions name, and the pipeline being decided on): ``BudgetState.merge`` of each, then only
what was appended since (``EventLog.read_streams_after``, one round trip). States are cached by
origin; a cached state is only a cache of the log: decisions are appended with every pipeline
stream's version as expected, so a stale entry costs a conflict, never a wrong decision.

A stream is loaded cold from its bodies only (``load_into``: the log's ``body_groups``, decoded
by ``slim``'s decoders in one msgspec call per group, folded). Views do not keep the events, so
the state remembers where each job's latest ``JobFinished`` is (``job_versions``: stream and
version) and ``find_job`` fetches the one event a decision needs from there. The jobs of a
decision batch are read ahead together: with a cached chain's catching up (``load(jobs=...)``,
the same round trip), else in one read after a cold load (``prefetch_jobs``).
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterable
from contextlib import aclosing
from dataclasses import dataclass

from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    JobFinished,
    RecordedEvent,
    RetryRequested,
    pipeline_stream,
    review_stream,
)

from .budget import BudgetState
from .slim import FOLD_TYPES, VIEW_SCHEMA_VERSION, JobFinishedView, collector_paused, stream_decoder

log = logging.getLogger(__name__)

PipelineKey = tuple[str, str, str]  # (source, project, pipeline id)


@dataclass(frozen=True, slots=True)
class Chain:
    """A loaded chain: where its decisions go and what they are decided from."""

    source: str
    project: str
    origin: str
    state: BudgetState

    @property
    def stream(self) -> str:
        """The origin's pipeline stream: where the chain's decisions are stored."""
        return pipeline_stream(self.source, self.project, self.origin)

    def expected(self) -> dict[str, int]:
        """Expected versions for appending a decision: every pipeline stream the state was
        folded from (a job appended meanwhile, a decision by another replica, a new link: the
        decision is made again)."""
        return {s: v for s, v in self.state.versions.items() if s.startswith("pipeline-")}


class ChainLoader:
    """Finds a pipeline's chain and keeps the chains' states up to date from the log."""

    def __init__(self, store: EventLog, *, cache_size: int = 1024) -> None:
        self.store = store
        self.cache_size = cache_size
        #: Folded chain states by origin stream (least recently used first).
        self._states: OrderedDict[str, BudgetState] = OrderedDict()
        #: Linked pipeline -> its chain's origin. A link never changes, so this is never stale.
        self._origins: dict[PipelineKey, str] = {}

    def forget(self, stream: str) -> None:
        self._states.pop(stream, None)

    async def load(
        self,
        source: str,
        project: str,
        pipeline_id: str,
        *,
        jobs: Collection[uuid.UUID] = (),
    ) -> Chain:
        """The chain ``pipeline_id`` belongs to, folded up to what is in the log now. ``jobs``:
        JobFinished events of ``pipeline_id`` that decisions are about to need (``find_job``);
        a cached chain reads those it does not hold in its catching-up round trip."""
        key = (source, project, pipeline_id)
        origin = self._origins.get(key, pipeline_id)
        state = await self._refresh(source, project, origin, pipeline_id, jobs)
        if origin == pipeline_id:
            link = state.links.get(pipeline_id)
            found = await self._origin_of(source, project, link.retry_of) if link else None
            if found is not None and found != pipeline_id:
                self._origins[key] = found
                # Cached as its own chain until now: from here on it is a member of ``found``.
                self._states.pop(pipeline_stream(source, project, pipeline_id), None)
                origin = found
                state = await self._refresh(source, project, origin, pipeline_id, jobs)
        return Chain(source, project, origin, state)

    async def load_origin(self, source: str, project: str, origin: str, member: str) -> Chain:
        """The chain whose origin is known (a request's ``origin_pipeline_id``), with ``member``
        (the pipeline of the job a request is about) folded in."""
        return Chain(source, project, origin, await self._refresh(source, project, origin, member))

    async def _origin_of(self, source: str, project: str, retry_of: str) -> str | None:
        recorded = await self.store.get_by_key(retry_of)
        request = recorded.data if recorded is not None else None
        if not isinstance(request, RetryRequested):
            # Created by another deployment, or a key someone set by hand: not ours to chain.
            log.warning("act: pipeline link to unknown request %s; treated as an origin", retry_of)
            return None
        if (request.source, request.project) != (source, project):
            return None
        return request.origin_pipeline_id or request.pipeline_id

    async def ensure_review(self, chain: Chain, ref: str | None) -> None:
        """Fold the merge/pull requests of branch ``ref`` into the chain's state (opt-out by
        label reads them)."""
        if ref:
            await self._ensure(chain.state, [review_stream(chain.source, chain.project, ref)])

    async def _refresh(
        self,
        source: str,
        project: str,
        origin: str,
        extra: str,
        jobs: Collection[uuid.UUID] = (),
    ) -> BudgetState:
        stream = pipeline_stream(source, project, origin)
        state = self._states.pop(stream, None)
        if state is None:
            state = BudgetState()
            state.origin = origin
        elif missing := _missing_jobs(state, jobs):
            after, found = await self.store.read_streams_after_and_get(state.versions, missing)
            state.feed(after)
            _keep_jobs(state, pipeline_stream(source, project, extra), found)
        else:
            state.feed(await self.store.read_streams_after(state.versions))
        self._states[stream] = state
        while len(self._states) > self.cache_size:
            self._states.popitem(last=False)
        # Members named by the decisions just folded may be new: load them (rarely more than
        # one round: a member's stream holds job facts, which name no further members).
        while True:
            wanted = [stream, pipeline_stream(source, project, extra), *sorted(state.members)]
            if not await self._ensure(state, wanted):
                return state

    async def _ensure(self, state: BudgetState, streams: list[str]) -> bool:
        """Load the streams ``state`` has not folded yet; True if it loaded any."""
        missing = [s for s in dict.fromkeys(streams) if s not in state.versions]
        for stream in missing:
            if not await load_into(self.store, state, stream):
                # Stored under a schema version the slim views do not know: the full read.
                part = BudgetState().feed(await self.store.read_stream(stream))
                state.merge(part)
            state.versions.setdefault(stream, 0)  # loaded, even if empty
        return bool(missing)


async def load_into(log: EventLog, state: BudgetState, stream: str) -> bool:
    """Fold ``stream`` (bodies only, slim decode) into ``state``; False (state untouched) when
    a fold type is stored under a schema version the views were not written for: the caller
    then reads the stream in full, through the registry.

    Same budgets as ``state.feed(await log.read_stream(stream))``, except that the state does
    not hold the ``JobFinished`` events themselves (``job_by_id`` / ``jobs_by_event`` stay empty
    for what was loaded here; ``job_versions`` says where each job's latest one is, and
    ``find_job`` fetches it)."""
    # Folded into a scratch state first: a stream the views cannot read leaves ``state`` as it
    # was, for the caller's full read.
    part = BudgetState()
    last = 0
    job_versions = part.job_versions
    async with aclosing(log.body_groups(stream, FOLD_TYPES, VIEW_SCHEMA_VERSION)) as groups:
        async for group in groups:
            if group.foreign:
                return False
            last = max(last, group.upto)
            if group.body is None:  # a group of other types only
                continue
            with collector_paused():  # no await inside: other tasks are unaffected
                views = stream_decoder.decode(group.body)
                part.feed(views)
                job_versions.update(
                    {
                        v.job_id: (stream, version)
                        for version, v in zip(group.versions, views, strict=True)
                        if type(v) is JobFinishedView
                    }
                )
    # Versions run 1..last without gaps; events of other types count as folded (the fold
    # ignores them), as in the full read.
    part.events = last
    if last:
        part.versions[stream] = last
    state.merge(part)
    return True


async def prefetch_jobs(
    log: EventLog, stream: str, state: BudgetState, job_event_ids: Iterable[uuid.UUID | None]
) -> None:
    """Fetch the JobFinished events ``job_event_ids`` name that ``state`` does not hold yet
    (a stream loaded cold keeps only ``job_versions``) in one round trip, so that ``find_job``
    finds each in ``jobs_by_event`` instead of fetching them one by one."""
    wanted = _missing_jobs(state, job_event_ids)
    if len(wanted) > 1:  # one is what ``find_job`` fetches alone anyway
        _keep_jobs(state, stream, await log.get_many(wanted))


def _missing_jobs(state: BudgetState, job_event_ids: Iterable[uuid.UUID | None]) -> list[uuid.UUID]:
    if not state.job_versions:
        return []  # every JobFinished folded was a full event: all in ``jobs_by_event`` already
    have = state.jobs_by_event
    return list({i for i in job_event_ids if i is not None and i not in have})


def _keep_jobs(state: BudgetState, stream: str, found: Iterable[RecordedEvent]) -> None:
    """``find_job``'s checks: only JobFinished events of the job's pipeline stream count."""
    for rec in found:
        if rec.stream == stream and isinstance(rec.data, JobFinished):
            state.jobs_by_event[rec.event_id] = rec.data


async def find_job(
    log: EventLog,
    stream: str,
    state: BudgetState,
    job_id: str,
    job_event_id: uuid.UUID | None = None,
) -> JobFinished | None:
    """The JobFinished a decision is about: the event ``job_event_id`` when it is a JobFinished
    in ``stream`` (the job's pipeline stream), else the latest JobFinished of ``job_id`` in the
    chain. From the state's own maps when it holds them (events folded as RecordedEvents), else
    one fetch from the log."""
    if job_event_id is not None:
        job = state.jobs_by_event.get(job_event_id)
        if job is not None:
            return job
        if state.job_versions:
            found = await log.get(job_event_id)
            if found is not None and found.stream == stream and isinstance(found.data, JobFinished):
                state.jobs_by_event[found.event_id] = found.data
                return found.data
    job = state.job_by_id.get(job_id)
    if job is not None:
        return job
    where = state.job_versions.get(job_id)
    if where is None:
        return None
    rec = await log.read_event(*where)
    if rec is None or not isinstance(rec.data, JobFinished):
        return None
    state.jobs_by_event[rec.event_id] = rec.data
    state.job_by_id[job_id] = rec.data
    return rec.data


__all__ = ["Chain", "ChainLoader", "find_job", "load_into", "prefetch_jobs"]
