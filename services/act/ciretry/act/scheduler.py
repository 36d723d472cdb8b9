"""Requests whose time has come: scheduled backoffs, transient failures to try again, and
requests a crash interrupted. Read from the log's open requests (``pending_requests``, a read
model kept in the appending transaction), so a round costs what is open, not what ever was.
Safe on any number of replicas at once: the runner holds each request exclusively."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

from ciretry.common.eventlog import EventLog
from ciretry.common.events import JobFinished, RetryRequested, pipeline_stream

from .budget import is_due
from .chains import ChainLoader, find_job
from .runner import RequestRunner

log = logging.getLogger("ciretry.act.service")

Clock = Callable[[], dt.datetime]


class Scheduler:
    def __init__(
        self,
        store: EventLog,
        chains: ChainLoader,
        runner: RequestRunner,
        *,
        clock: Clock,
        failure_backoff_s: float = 60.0,
    ) -> None:
        self.store = store
        self.chains = chains
        self.runner = runner
        self.clock = clock
        self.failure_backoff_s = failure_backoff_s

    async def run_due(self, now: dt.datetime | None = None, *, limit: int = 500) -> int:
        """Carry out every open request that is due. Returns how many were attempted here."""
        now = now or self.clock()
        done = 0
        position = 0
        while True:
            rows = await self.store.pending_requests(position, limit)
            if not rows:
                return done
            for row in rows:
                request = row.request
                if request.dry_run:
                    await self.runner.close_dry_run(request)
                    continue
                if not is_due(request, now):
                    continue
                if row.last_failure is not None and now < row.last_failure + dt.timedelta(
                    seconds=self.failure_backoff_s * 2 ** (row.failures - 1)
                ):
                    continue
                job = await self._job(request)
                if await self.runner.execute(request, job, failures=row.failures) is not None:
                    done += 1
            if len(rows) < limit:
                return done
            position = rows[-1].position

    async def _job(self, request: RetryRequested) -> JobFinished | None:
        origin = request.origin_pipeline_id or request.pipeline_id
        chain = await self.chains.load_origin(
            request.source, request.project, origin, request.pipeline_id
        )
        stream = pipeline_stream(request.source, request.project, request.pipeline_id)
        return await find_job(self.store, stream, chain.state, request.job_id)

    async def run(self, stop: asyncio.Event, *, interval: float = 5.0) -> None:
        """``run_due`` every ``interval`` seconds until ``stop`` is set (one per replica)."""
        while not stop.is_set():
            try:
                await self.run_due()
            except Exception as exc:  # noqa: BLE001 - keep the scheduler alive through outages
                log.warning("act scheduler: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass


__all__ = ["Scheduler"]
