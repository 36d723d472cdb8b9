"""Fast loading of pipeline budgets: slim decoders and the queries that feed them.

The budget fold reads a handful of fields of each event; a ``JobFinished`` body is ~370 bytes of
which it needs ``job_id``, ``job_name`` and ``attempt``. The views below are msgspec Structs with
the same field names as the events but only those fields (msgspec skips the others while parsing,
without materializing them), and ``gc=False`` (they hold no containers that could form cycles).
``budget.register_view`` lets ``BudgetState.feed`` take them wherever it takes the event.
``RetryRequested``, ``PipelineLinked`` and ``MergeRequestUpdated`` are decoded in full: the state
keeps them (and they are rare).

Bodies are concatenated into one JSON array (by PostgreSQL, or by ``bytes.join`` on rows) and
decoded in one msgspec call, so no per-event Python object exists besides the view.

Two users:

* ``load_into``: act's cold start on a stream of a chain (not in its cache): the stream's bodies
  only (no metadata, no envelope), slim decode, fold into the chain's state. Views do not keep
  the events, so the state remembers where each job's latest ``JobFinished`` is
  (``job_versions``: stream and version) and ``find_job`` fetches the one event a decision needs
  (the failed job) from there;
* ``replay.rebuild_budgets``: every pipeline at once.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from ciretry.common.events import (
    JobFinished,
    MergeRequestUpdated,
    PipelineFinished,
    PipelineLinked,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
)
from ciretry.common.eventstore import EventStore, row_to_event

from .budget import BudgetState, register_view

#: Event types the budget fold reads (everything else in a pipeline stream is ignored by it).
FOLD_TYPES: tuple[str, ...] = (
    "JobFinished",
    "PipelineFinished",
    "PipelineLinked",
    "MergeRequestUpdated",
    "RetryRequested",
    "RetrySkipped",
    "RetryIssued",
    "RetryFailed",
)
#: Schema version the views below are written against, for every type in ``FOLD_TYPES``.
VIEW_SCHEMA_VERSION = 1


class _View(msgspec.Struct, frozen=True, tag_field="type", gc=False):
    pass


class JobFinishedView(_View, frozen=True, tag="JobFinished", gc=False):
    job_id: str
    job_name: str
    status: str
    attempt: int | None = None


class _JobRefView(msgspec.Struct, frozen=True, gc=False):
    name: str


class PipelineFinishedView(_View, frozen=True, tag="PipelineFinished", gc=False):
    jobs: tuple[_JobRefView, ...] = ()


class RetrySkippedView(_View, frozen=True, tag="RetrySkipped", gc=False):
    source: str
    project: str
    pipeline_id: str
    job_name: str
    reason: str
    category: str
    detail: str
    verdict_event_id: uuid.UUID | None = None


class RetryIssuedView(_View, frozen=True, tag="RetryIssued", gc=False):
    source: str
    project: str
    idempotency_key: str
    new_pipeline_id: str | None = None


class RetryFailedView(_View, frozen=True, tag="RetryFailed", gc=False):
    idempotency_key: str
    will_retry: bool = False


register_view(JobFinishedView, JobFinished)
register_view(PipelineFinishedView, PipelineFinished)
register_view(RetrySkippedView, RetrySkipped)
register_view(RetryIssuedView, RetryIssued)
register_view(RetryFailedView, RetryFailed)

View = (
    JobFinishedView
    | PipelineFinishedView
    | PipelineLinked
    | MergeRequestUpdated
    | RetryRequested
    | RetrySkippedView
    | RetryIssuedView
    | RetryFailedView
)

#: Decodes a JSON array of pipeline-stream bodies (tagged by their ``type`` field).
stream_decoder = msgspec.json.Decoder(list[View])


def decode_bodies(bodies: Sequence[bytes]) -> list[View]:
    """Bodies of fold types, in stream order, as views: one msgspec call."""
    return stream_decoder.decode(b"[" + b",".join(bodies) + b"]")


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause CPython's cyclic GC while folding: a fold allocates many long-lived, acyclic objects
    (job histories, requests), which the generational collector would otherwise traverse again
    and again as they pile up (on the whole log: the rebuild ran 2-3x slower). Reference counting
    still frees everything; collection resumes afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# --- one pipeline: act's cold start ----------------------------------------------------------

_LAST = "SELECT max(stream_version) FROM events WHERE stream = $1"

#: Versions $2..$3 of a stream, fold types only, as one row per group of $5 versions: the group's
#: bodies as a JSON array, their versions, and whether any is of a schema version the views were
#: not written for. Groups keep rows small (no per-event row to build
#: on the client, no multi-megabyte value to reassemble) and sort only $5 rows each; the lateral
#: join emits them in version order, as each is ready.
_GROUPS = """
SELECT x.body, x.versions, x.other
FROM generate_series($2::int, $3::int, $5::int) AS g(lo),
LATERAL (
    SELECT '['::bytea || string_agg(body, ','::bytea ORDER BY stream_version) || ']'::bytea
               AS body,
           array_agg(stream_version ORDER BY stream_version) AS versions,
           bool_or(schema_version <> $6) AS other
    FROM events
    WHERE stream = $1 AND stream_version BETWEEN g.lo AND least(g.lo + $5 - 1, $3)
      AND type = ANY($4::text[])
) AS x
"""

_READ_ONE = """
SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, body,
       metadata
FROM events WHERE stream = $1 AND stream_version = $2
"""

#: A long stream is read in ranges of this many versions by up to ``LOAD_CONNECTIONS``
#: connections at once: PostgreSQL produces the next ranges while Python decodes and folds this
#: one. ``LOAD_GROUP``: versions per row.
LOAD_RANGE = 2500
LOAD_CONNECTIONS = 4
LOAD_GROUP = 200


async def load_into(store: EventStore, state: BudgetState, stream: str) -> bool:
    """Fold ``stream`` (bodies only, slim decode) into ``state``; False (state untouched) when
    a fold type is stored under a schema version the views were not written for: the caller
    then reads the stream in full, through the registry.

    Same budgets as ``state.feed(await store.read_stream(stream))``, except that the state does
    not hold the ``JobFinished`` events themselves (``job_by_id`` / ``jobs_by_event`` stay empty
    for what was loaded here; ``job_versions`` says where each job's latest one is, and
    ``find_job`` fetches it).

    Versions are contiguous from 1 and rows never change, so every range up to the last version
    read first gives the same rows whenever it is read: no shared snapshot is needed.
    """
    async with store.pool.acquire() as first:
        last = await first.fetchval(_LAST, stream)
        if not last:
            return True
        ranges = [(lo, min(lo + LOAD_RANGE - 1, last)) for lo in range(1, last + 1, LOAD_RANGE)]
        loop = asyncio.get_running_loop()
        results: list[asyncio.Future[list[Any]]] = [loop.create_future() for _ in ranges]
        todo = iter(enumerate(ranges))

        async def read(conn: Any) -> None:
            for i, (lo, hi) in todo:
                try:
                    rows = await conn.fetch(
                        _GROUPS, stream, lo, hi, FOLD_TYPES, LOAD_GROUP, VIEW_SCHEMA_VERSION
                    )
                except BaseException as exc:
                    results[i].set_exception(exc)
                    raise
                results[i].set_result(rows)

        async def helper() -> None:
            async with store.pool.acquire() as conn:
                await read(conn)

        helpers = min(len(ranges), max(1, min(LOAD_CONNECTIONS, store.pool.get_max_size()))) - 1
        tasks = [asyncio.ensure_future(read(first))]
        tasks += [asyncio.ensure_future(helper()) for _ in range(helpers)]
        # Folded into a scratch state first: a stream the views cannot read leaves ``state``
        # as it was, for the caller's full read.
        part = BudgetState()
        try:
            job_versions = part.job_versions
            for result in results:
                for body, versions, other in await result:
                    if other:
                        return False
                    if body is None:  # a group of other types only
                        continue
                    with collector_paused():  # no await inside: other tasks are unaffected
                        views = stream_decoder.decode(body)
                        part.feed(views)
                        job_versions.update(
                            {
                                v.job_id: (stream, version)
                                for version, v in zip(versions, views, strict=True)
                                if type(v) is JobFinishedView
                            }
                        )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:  # retrieved, so an early return leaves no warning behind
                if result.done() and not result.cancelled():
                    result.exception()
    # Versions run 1..last without gaps; events of other types count as folded (the fold
    # ignores them), as in the full read.
    part.events = last
    part.versions[stream] = last
    state.merge(part)
    return True


async def load_state(store: EventStore, stream: str) -> BudgetState | None:
    """One stream's BudgetState (``load_into`` a fresh state); None when the views cannot read
    it."""
    state = BudgetState()
    return state if await load_into(store, state, stream) else None


async def find_job(
    store: EventStore,
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
            found = await store.get(job_event_id)
            if found is not None and found.stream == stream and isinstance(found.data, JobFinished):
                state.jobs_by_event[found.event_id] = found.data
                return found.data
    job = state.job_by_id.get(job_id)
    if job is not None:
        return job
    where = state.job_versions.get(job_id)
    if where is None:
        return None
    async with store.pool.acquire() as conn:
        row = await conn.fetchrow(_READ_ONE, *where)
    if row is None:
        return None
    rec = row_to_event(row)
    if not isinstance(rec.data, JobFinished):
        return None
    state.jobs_by_event[rec.event_id] = rec.data
    state.job_by_id[job_id] = rec.data
    return rec.data


__all__ = [
    "FOLD_TYPES",
    "VIEW_SCHEMA_VERSION",
    "collector_paused",
    "LOAD_CONNECTIONS",
    "LOAD_GROUP",
    "LOAD_RANGE",
    "JobFinishedView",
    "PipelineFinishedView",
    "RetryFailedView",
    "RetryIssuedView",
    "RetrySkippedView",
    "View",
    "decode_bodies",
    "find_job",
    "load_into",
    "load_state",
    "stream_decoder",
]
