"""The classify handler: one failed JobFinished in, one VerdictReached out, exactly once.

I/O only: gather the signals (pod events from the job's stream, the log from the provider), hand
them to the pure ``Classifier``, append the verdict to the job's stream with a tracking row.

The handler runs for many jobs at once (the consumer's concurrency), and a round trip to
PostgreSQL costs more CPU than most of what a job needs besides its log scan: concurrent jobs
share their round trips. Their reads of the job streams go out as one ``read_streams``; their
verdicts, each with its tracking row, commit in one transaction (group commit), a redelivered
event failing alone with ``AlreadyProcessed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

import msgspec
from opentelemetry import trace

from ciretry.common.bus import Recorder, metadata_from_context
from ciretry.common.eventlog import EventLog, Tracking
from ciretry.common.events import (
    Category,
    JobFinished,
    NewEvent,
    PodTerminated,
    RecordedEvent,
    VerdictReached,
    job_stream,
)
from ciretry.common.groupcommit import AppendBatcher, StreamReader, outbox_fast_path
from ciretry.common.metrics import instruments
from ciretry.common.telemetry import current_span

from .learner import LearningFollower
from .logsource import LogFetched, LogLease

log = logging.getLogger(__name__)

#: Terminal statuses that get a verdict. Success needs none; a cancel gets one (``cancelled``)
#: so act can say why it did not retry.
NEEDS_VERDICT = frozenset({"failed", "failure", "canceled", "cancelled", "exception", "timed_out"})

#: Logs up to this size are scanned on the event loop (well under a millisecond): a thread
#: hand-over would cost more. Larger ones go to a thread, so the loop keeps serving.
INLINE_SCAN_BYTES = 256 * 1024

#: Verdicts a pod's end can change: no rule knew the failure, or the log points at the machine
#: (killed, evicted, out of time). Only these wait for a late PodTerminated (``pod_grace``); a
#: compile error or a failing test is decided at once. On Kubernetes runners an OOM kill also
#: shows in the log (exit code 137, "Killed"), which lands the verdict here.
POD_SENSITIVE: frozenset[Category] = frozenset(
    {"unknown", "oom", "runner_system", "preempted", "timeout"}
)


class Classifier(Protocol):
    def classify(
        self, job: JobFinished, pods: Sequence[PodTerminated], fetched: LogFetched
    ) -> VerdictReached: ...


class LogFetcher(Protocol):
    def lease(self) -> LogLease: ...

    async def fetch(self, job: JobFinished, lease: LogLease | None = None) -> LogFetched: ...


class ClassifyHandler:
    def __init__(
        self,
        store: EventLog,
        recorder: Recorder | None,
        logs: LogFetcher,
        classifier: Classifier,
        *,
        consumer: str = "classify",
        pod_grace: float = 5.0,
        pod_poll: float = 0.25,
        learning: LearningFollower | None = None,
    ) -> None:
        self.store = store
        #: Verdicts and bare tracking rows of concurrent jobs, one transaction for many.
        self.commits = AppendBatcher(
            store,
            name=consumer,
            publish=outbox_fast_path(recorder),
        )
        #: Job streams asked for by concurrent jobs, one query for many.
        self.reads = StreamReader(store)
        self.logs = logs
        self.classifier = classifier
        self.consumer = consumer
        self.pod_grace = pod_grace
        self.pod_poll = pod_poll
        #: What was learned from outcomes (issue 15); None: rule verdicts only.
        self.learning = learning

    async def handle(self, event: RecordedEvent) -> None:
        job = event.data
        if not isinstance(job, JobFinished) or job.status not in NEEDS_VERDICT:
            # Nothing to do, and that is recorded too: an event of the topic without a
            # tracking row is one the catch-up still has to process (ciretry.common.catchup).
            # A row that exists already is a redelivery: AlreadyProcessed, acked all the same.
            await self.commits.append([], tracking=Tracking(self.consumer, event.event_id))
            return
        stream = job_stream(job.source, job.project, job.job_id)
        # One read of the job's stream serves twice: a verdict already made for this event (a
        # redelivery after the commit: skip the log fetch) and the pods seen so far.
        pods, done = await self._read_job(stream, event)
        if done:
            return
        started = time.monotonic()
        # The log's bytes count against the process's log budget from before the request until
        # the verdict is made, then the log is dropped (logsource's module doc).
        async with self.logs.lease() as lease:
            with current_span(
                "log fetch",
                attributes={"ciretry.job.id": job.job_id, "ciretry.source": job.source},
            ) as span:
                fetched = await self.logs.fetch(job, lease)
                span.set_attribute("ciretry.log.bytes", fetched.size)
                span.set_attribute("ciretry.log.available", fetched.available)
            scanned = fetched.kept
            verdict = await self._classify(job, pods, fetched)
            if not pods and verdict.category in POD_SENSITIVE and self.pod_grace > 0:
                # A pod can change this verdict (an OOM kill, an eviction, a deadline): its
                # PodTerminated may land just after the job's hook, so wait for it a little.
                pods = await self._pods(stream, deadline=started + self.pod_grace)
                if pods:
                    verdict = await self._classify(job, pods, fetched)
            del fetched  # before the lease is given back
        if self.learning is not None:
            verdict = self.learning.apply(verdict)
        verdict = _with_cause(verdict, event)
        await self.commits.append(
            [
                NewEvent(
                    stream=job_stream(job.source, job.project, job.job_id),
                    data=verdict,
                    metadata=metadata_from_context(
                        causation=event, idempotency_key=f"verdict:{event.event_id}"
                    ),
                )
            ],
            tracking=Tracking(self.consumer, event.event_id),
        )
        inst = instruments()
        inst.verdicts.add(1, {"category": verdict.category, "source": job.source})
        inst.log_bytes_scanned.add(scanned, {"source": job.source})
        trace.get_current_span().set_attribute("ciretry.verdict.category", verdict.category)

    async def close(self) -> None:
        """Commit what was submitted, then stop (after the consumer has drained)."""
        await self.commits.close()

    async def _classify(
        self, job: JobFinished, pods: Sequence[PodTerminated], fetched: LogFetched
    ) -> VerdictReached:
        with current_span("rule scan") as span:
            if fetched.kept <= INLINE_SCAN_BYTES:
                verdict = self.classifier.classify(job, pods, fetched)
            else:
                verdict = await asyncio.to_thread(self.classifier.classify, job, pods, fetched)
            span.set_attribute("ciretry.log.bytes", fetched.kept)
            span.set_attribute("ciretry.rules.matched", len(verdict.rules))
            span.set_attribute("ciretry.verdict.category", verdict.category)
            span.set_attribute("ciretry.verdict.retryable", verdict.retryable)
        return verdict

    async def _read_job(
        self, stream: str, event: RecordedEvent
    ) -> tuple[list[PodTerminated], bool]:
        """The job's pods so far, and whether ``event`` has its verdict already."""
        pods: list[PodTerminated] = []
        for e in await self.reads.read(stream):
            if isinstance(e.data, PodTerminated):
                pods.append(e.data)
            elif isinstance(e.data, VerdictReached) and e.data.job_event_id == event.event_id:
                return pods, True
        return pods, False

    async def _pods(self, stream: str, *, deadline: float) -> list[PodTerminated]:
        """Pod events of the job, waiting for one until ``deadline``."""
        while True:
            pods = [
                e.data for e in await self.reads.read(stream) if isinstance(e.data, PodTerminated)
            ]
            if pods or time.monotonic() >= deadline:
                return pods
            await asyncio.sleep(min(self.pod_poll, max(0.0, deadline - time.monotonic())))


def _with_cause(verdict: VerdictReached, event: RecordedEvent) -> VerdictReached:
    return msgspec.structs.replace(verdict, job_event_id=event.event_id)
