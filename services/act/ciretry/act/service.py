"""The act service as one object: decide on verdicts, carry out requests, run what is due.

``ActHandler`` composes act's parts, each with one job:

* ``budget`` (pure): the fold of a chain's events into its budgets, and ``decide``;
* ``chains``: loads a chain's state from the log (origin, members, slim decoding);
* ``handler.VerdictHandler``: decides on a verdict and appends the decision;
* ``runner.RequestRunner``: carries out a request at the provider, once, and records the outcome;
* ``scheduler.Scheduler``: runs the requests whose time has come;
* ``executors``: the providers' APIs.

``build`` (below) is the composition root: the service's ``main`` and the tests build act the
same way, over PostgreSQL or over the in-memory event log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping

from ciretry.common.bus import Recorder, appender
from ciretry.common.eventlog import EventLog
from ciretry.common.events import JobFinished, RecordedEvent, RetryRequested

from .budget import Decision
from .chains import ChainLoader
from .executors import Executor, Executors, Outcome
from .handler import TooMuchContention, VerdictHandler
from .policy import Policy
from .runner import RequestRunner
from .scheduler import Scheduler

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ActHandler:
    def __init__(
        self,
        store: EventLog,
        recorder: Recorder | None,
        policy: Policy,
        executors: Executors | Mapping[str, Executor],
        consumer_name: str = "act",
        *,
        clock: Clock = utcnow,
        max_conflicts: int = 100,
        max_failures: int = 5,
        failure_backoff_s: float = 60.0,
        cache_size: int = 1024,
    ) -> None:
        """``recorder``: append-then-publish (production); None appends to the log only
        (tests, replay tools). ``max_failures``: transient provider failures after which a
        request is given up (final RetryFailed)."""
        self.store = store
        self.policy = policy
        self.executors = (
            executors if isinstance(executors, Executors) else Executors(dict(executors))
        )
        append = appender(store, recorder)
        self.chains = ChainLoader(store, cache_size=cache_size)
        self.runner = RequestRunner(store, append, self.executors, max_failures=max_failures)
        self.verdicts = VerdictHandler(
            store,
            append,
            self.chains,
            self.runner,
            policy,
            self.executors,
            consumer_name,
            clock=clock,
            max_conflicts=max_conflicts,
            cache_size=cache_size,
        )
        self.scheduler = Scheduler(
            store, self.chains, self.runner, clock=clock, failure_backoff_s=failure_backoff_s
        )

    @property
    def conflicts(self) -> int:
        return self.verdicts.conflicts

    async def handle_verdict(self, event: RecordedEvent) -> Decision | None:
        return await self.verdicts.handle_verdict(event)

    async def execute(
        self, request: RetryRequested, job: JobFinished | None, *, failures: int = 0
    ) -> Outcome | None:
        return await self.runner.execute(request, job, failures=failures)

    async def run_due(self, now: dt.datetime | None = None, *, limit: int = 500) -> int:
        return await self.scheduler.run_due(now, limit=limit)

    async def run_scheduler(self, stop: asyncio.Event, *, interval: float = 5.0) -> None:
        await self.scheduler.run(stop, interval=interval)


__all__ = ["ActHandler", "TooMuchContention", "utcnow"]
