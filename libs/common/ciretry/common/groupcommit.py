"""Group commit: appends from concurrent requests share one transaction.

Each request submits its events (and, for a consumer, the tracking row of the event they answer)
and awaits its own future. One collector task takes an
in-flight slot, then drains everything queued meanwhile (up to ``max_events``) into one
``append_batch``: under load batches grow by themselves while the previous transaction runs, and
an idle server commits a lone request at once (``max_wait`` = 0 adds no timer), and the
collector ends when it finds nothing queued (the next request starts another). Appends
serialize on the store's advisory lock anyway, so a second slot only overlaps one batch's
encoding and round trips with the other's commit.

A batch that fails for a reason that is not transient (say, a value PostgreSQL refuses) is
retried one submission at a time, so one bad request cannot fail the requests it shared a
transaction with. A submission whose tracking row exists already (a redelivery) fails alone,
with ``AlreadyProcessed``: the others commit (``EventLog.append_tracked``). A transient failure
fails every submission of the batch; each caller retries (a consumer naks and sees the event
again), and tracking rows and idempotency keys make a commit that did happen harmless.

After the commit the fresh events are handed to the outbox fast path in the background: the
request is answered as soon as its events are durable; the outbox sweeper covers a publish that
never happens (crash, NATS down).

``StreamReader`` is the same idea for reads: whole streams asked for by concurrent tasks while a
read runs are read together by the next one (``read_streams``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .bus import Recorder
from .errors import is_transient
from .eventlog import AlreadyProcessed, AppendResult, EventLog, TrackedAppend, Tracking
from .events import NewEvent, RecordedEvent

log = logging.getLogger(__name__)

#: Takes the fresh (not duplicate) results of an append: their events and encoded bodies.
Publish = Callable[[Sequence[AppendResult]], Awaitable[object]]


def outbox_fast_path(recorder: Recorder | None) -> Publish | None:
    """What a batcher publishes its fresh events with: the recorder's outbox fast path right
    after the commit, or None without one (tests and tools: the events stay in the outbox for a
    sweeper)."""
    if recorder is None:
        return None
    outbox = recorder.outbox

    async def publish(fresh: Sequence[AppendResult]) -> bool:
        return await outbox.publish([r.event for r in fresh], bodies=[r.body for r in fresh])

    return publish


class BatcherClosed(Exception):
    """The batcher is shutting down; the caller should answer 503 (or nak) so the sender
    retries."""


@dataclass(slots=True)
class _Submission:
    events: Sequence[NewEvent]
    tracking: Tracking | None
    future: asyncio.Future[list[AppendResult]]

    @property
    def weight(self) -> int:
        """What it counts against ``max_events``: a bare tracking row is a row too."""
        return max(1, len(self.events))


@dataclass(slots=True)
class BatcherStats:
    batches: int = 0
    events: int = 0
    isolated_retries: int = 0
    #: Submissions whose tracking row existed (redeliveries): failed alone, nothing stored.
    already_processed: int = 0
    largest_batch: int = 0
    #: Fast-path publishes skipped because too many were pending (the sweeper sends those).
    publish_skipped: int = 0
    #: Wall time spent in ``append_batch`` (summed over batches, overlapping ones included).
    append_seconds: float = 0.0


class AppendBatcher:
    def __init__(
        self,
        store: EventLog,
        *,
        name: str = "group-commit",
        publish: Publish | None = None,
        max_events: int = 1000,
        max_wait: float = 0.0,
        max_inflight: int = 1,
        max_pending_publishes: int = 32,
        flush_timeout: float = 10.0,
    ) -> None:
        self.store = store
        #: The service, in task names and messages.
        self.name = name
        self.publish = publish
        self.max_events = max_events
        self.max_wait = max_wait
        self.max_pending_publishes = max_pending_publishes
        self.flush_timeout = flush_timeout
        self.stats = BatcherStats()
        self._publishing = 0
        self._slots = asyncio.Semaphore(max_inflight)
        self._queue: asyncio.Queue[_Submission] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        """Start the collector (``append`` does; it ends when nothing is queued)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=f"{self.name}-batcher")

    async def append(
        self, events: Sequence[NewEvent], *, tracking: Tracking | None = None
    ) -> list[AppendResult]:
        """Append ``events`` (in one transaction with other requests'); results in input order.
        ``tracking``: commit this row with them; ``AlreadyProcessed`` (and nothing stored) when
        it exists. No events and a tracking row: record the row alone."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is shutting down")
        future: asyncio.Future[list[AppendResult]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Submission(events, tracking, future))
        await self.start()
        return await future

    async def close(self, grace: float = 10.0) -> None:
        """Stop taking work, finish what was submitted, then wait for background publishes."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._queue.join()
                if self._tasks:
                    await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        while not self._queue.empty():
            sub = self._queue.get_nowait()
            if not sub.future.done():
                sub.future.set_exception(BatcherClosed(f"{self.name} is shutting down"))

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                try:
                    batch = [self._queue.get_nowait()]
                except asyncio.QueueEmpty:
                    # Idle: end (the next append starts another), so that a batcher nobody
                    # closes (tests, tools) leaves no task pending forever.
                    self._slots.release()
                    self._runner = None
                    return
                size = self._drain(batch, batch[0].weight)
                if self.max_wait > 0 and size < self.max_events:
                    await asyncio.sleep(self.max_wait)
                    self._drain(batch, size)
            except BaseException:
                self._slots.release()
                raise
            self._spawn(self._flush(batch), f"{self.name}-flush", release=True)

    def _drain(self, batch: list[_Submission], size: int) -> int:
        while size < self.max_events:
            try:
                sub = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            batch.append(sub)
            size += sub.weight
        return size

    def _spawn(self, coro: Awaitable[None], name: str, *, release: bool = False) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if release:
                self._slots.release()
            if not t.cancelled() and t.exception() is not None:
                log.error("%s background task failed", self.name, exc_info=t.exception())

        task.add_done_callback(done)

    async def _flush(self, batch: list[_Submission]) -> None:
        try:
            await self._flush_batch(batch)
        finally:
            for _ in batch:
                self._queue.task_done()

    async def _flush_batch(self, batch: list[_Submission]) -> None:
        events = sum(len(sub.events) for sub in batch)
        self.stats.batches += 1
        self.stats.events += events
        self.stats.largest_batch = max(self.stats.largest_batch, events)
        try:
            # One timer per transaction, not one per request: a hung database fails the whole
            # batch with TimeoutError (503, the senders retry; the idempotency keys make a
            # commit that did happen harmless).
            started = time.perf_counter()
            async with asyncio.timeout(self.flush_timeout):
                results = await self.store.append_tracked(
                    [TrackedAppend(sub.events, sub.tracking) for sub in batch]
                )
            self.stats.append_seconds += time.perf_counter() - started
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, TimeoutError) or len(batch) == 1:
                for sub in batch:
                    _fail(sub, exc)
                return
            # Isolate the submission PostgreSQL refused; the others still commit.
            self.stats.isolated_retries += 1
            log.warning("batch of %d refused (%s); retrying one by one", len(batch), exc)
            for sub in batch:
                await self._flush_one(sub)
            return
        fresh: list[AppendResult] = []
        for sub, result in zip(batch, results, strict=True):
            if isinstance(result, AlreadyProcessed):
                self.stats.already_processed += 1
                _fail(sub, result)
                continue
            fresh.extend(r for r in result if not r.duplicate)
            if not sub.future.done():
                sub.future.set_result(result)
        self._publish(fresh)

    async def _flush_one(self, sub: _Submission) -> None:
        try:
            async with asyncio.timeout(self.flush_timeout):
                (result,) = await self.store.append_tracked([TrackedAppend(sub.events, sub.tracking)])
        except Exception as exc:
            _fail(sub, exc)
            return
        if isinstance(result, AlreadyProcessed):
            self.stats.already_processed += 1
            _fail(sub, result)
            return
        if not sub.future.done():
            sub.future.set_result(result)
        self._publish([r for r in result if not r.duplicate])

    def _publish(self, fresh: list[AppendResult]) -> None:
        if self.publish is None or not fresh:
            return
        if self._publishing >= self.max_pending_publishes:
            # NATS is slower than the database: leave these to the sweeper rather than pile up
            # unbounded tasks (the outbox rows are committed, nothing is lost).
            self.stats.publish_skipped += len(fresh)
            return
        publish = self.publish
        self._publishing += 1

        async def run() -> None:
            try:
                await publish(fresh)
            finally:
                self._publishing -= 1

        self._spawn(run(), f"{self.name}-publish")


def _fail(sub: _Submission, exc: BaseException) -> None:
    if not sub.future.done():
        sub.future.set_exception(exc)


class StreamReader:
    """Whole-stream reads from concurrent tasks, one ``read_streams`` for all the streams asked
    for while the previous read ran (at most ``max_streams`` at a time). A read starts after
    it is asked for, so it sees at least what was committed by then, as a read of its own
    would. Lives only while there is something to read: nothing to start or close."""

    def __init__(self, store: EventLog, *, max_streams: int = 256) -> None:
        self.store = store
        self.max_streams = max_streams
        self.reads = 0
        self._waiting: dict[str, list[asyncio.Future[list[RecordedEvent]]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def read(self, stream: str) -> list[RecordedEvent]:
        """The stream's events in version order (as ``read_stream``)."""
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(stream, []).append(future)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_waiting(), name="stream-reader")
        return await future

    async def _read_waiting(self) -> None:
        try:
            while self._waiting:
                names = list(self._waiting)[: self.max_streams]
                batch = {name: self._waiting.pop(name) for name in names}
                self.reads += 1
                try:
                    got = await self.store.read_streams(names)
                except Exception as exc:  # noqa: BLE001 - each waiter gets it
                    for futures in batch.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(exc)
                    continue
                for name, futures in batch.items():
                    events = got.get(name, [])
                    for f in futures:
                        if not f.done():
                            f.set_result(list(events))
        finally:
            self._reader = None

