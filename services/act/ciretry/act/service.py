"""The act service as one object: decide on verdicts, carry out requests, run what is due.

``ActHandler`` composes act's parts, each with one job:

* ``budget`` (pure): the fold of a chain's events into its budgets, and ``decide``;
* ``chains``: loads a chain's state from the log (origin, members, slim decoding);
* ``handler.VerdictHandler``: decides on a verdict and appends the decision;
* ``runner.RequestRunner``: carries out a request at the provider, once, and records the outcome;
* ``scheduler.Scheduler``: runs the requests whose time has come;
* ``stormfollower.StormFollower``: the retry-storm breaker (``storms``, pure): records storms,
  lends their open set to the decisions (which park retries meanwhile), and decides the parked
  jobs again when a storm ends;
* ``explainer.Explainer``: tells people where they look (MR note, commit status, check run), on
  consumers of its own, off the retries' path;
* ``executors``: the providers' APIs.

``build`` (below) is the composition root: the service's ``main`` and the tests build act the
same way, over PostgreSQL or over the in-memory event log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping

from ciretry.common.bus import Recorder, appender
from ciretry.common.config import Config
from ciretry.common.eventlog import EventLog
from ciretry.common.events import JobFinished, RecordedEvent, RetryRequested
from ciretry.common.groupcommit import AppendBatcher, outbox_fast_path

from .budget import Decision
from .chains import ChainLoader
from .executors import Executor, Executors, Outcome, executors_from_config
from .explain import Links
from .explainer import Explainer
from .handler import TooMuchContention, VerdictHandler
from .policy import Policy, load_policy
from .posting import publishers_from
from .runner import RequestRunner
from .scheduler import Scheduler
from .stormfollower import StormFollower

Clock = Callable[[], dt.datetime]

#: The durable consumer name of act's replicas (and its tracking rows).
CONSUMER = "act"


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
        public_url: str = "",
        storm_interval: float = 0.5,
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
        #: The outcomes of requests carried out at once, one transaction for many.
        self.outcomes = AppendBatcher(
            store,
            name=consumer_name,
            publish=outbox_fast_path(recorder),
        )
        self.chains = ChainLoader(store, cache_size=cache_size)
        self.storms = StormFollower(
            store, append, policy.storm, self._release, clock=clock, interval=storm_interval
        )
        self.runner = RequestRunner(
            store, append, self.executors, outcomes=self.outcomes, max_failures=max_failures
        )
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
            storms=self.storms.watch,
        )
        self.scheduler = Scheduler(
            store, self.chains, self.runner, clock=clock, failure_backoff_s=failure_backoff_s
        )
        self.explainer = Explainer(
            store,
            append,
            policy,
            publishers_from(self.executors),
            links=Links(public_url),
            clock=clock,
        )

    async def close(self) -> None:
        """Commit the outcomes submitted, then stop (after the consumers have drained)."""
        await self.outcomes.close()

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

    async def _release(self, event: RecordedEvent) -> Decision | None:
        return await self.verdicts.release(event)


def build(
    log: EventLog,
    recorder: Recorder | None,
    config: Config,
    *,
    policy: Policy | None = None,
    executors: Executors | Mapping[str, Executor] | None = None,
    clock: Clock = utcnow,
) -> ActHandler:
    """act as the service runs it (the composition root): over PostgreSQL and the bus in
    ``main``, over the in-memory log in tests. Unset ``policy`` / ``executors`` come from the
    configuration (the policy file, the providers' URLs and tokens)."""
    return ActHandler(
        log,
        recorder,
        policy if policy is not None else load_policy(config.policy_path),
        executors if executors is not None else executors_from_config(config),
        CONSUMER,
        clock=clock,
        max_failures=config.act_max_failures,
        failure_backoff_s=config.act_failure_backoff,
        public_url=config.public_url,
    )


__all__ = ["CONSUMER", "ActHandler", "TooMuchContention", "build", "utcnow"]
