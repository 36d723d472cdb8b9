"""The learning follower of classify (I/O): folds the log into ``ciretry.common.learning``'s
``Learner``, appends what it proposes (outcomes, learned verdict changes), and lends its learned
state to the verdicts classify reaches.

It reads the log by position (not the bus): attribution needs the jobs and verdicts in the order
the log holds them, and every replica folds the same log, so each can apply what was learned.
The proposals carry idempotency keys derived from the log (``outcome:<verdict id>``,
``learned:<kind>:<subject>:<n>``): replicas proposing the same event store it once. A learned
state changes only when its event is read back from the log, so what a verdict used is always an
event before it, and ``ciretry replay`` folds the same events to the same state.
"""

from __future__ import annotations

import asyncio
import logging

from ciretry.common.bus import Append
from ciretry.common.eventlog import EventLog
from ciretry.common.events import NewEvent, VerdictReached
from ciretry.common.learning import (
    LEARNING_TYPES,
    Learner,
    LearningSettings,
    apply_learning,
)

log = logging.getLogger(__name__)


class LearningFollower:
    def __init__(
        self, store: EventLog, append: Append, settings: LearningSettings, *, interval: float = 0.5
    ) -> None:
        self.store = store
        self.append = append
        self.settings = settings
        self.interval = interval
        self.learner = Learner(settings)

    def apply(self, verdict: VerdictReached) -> VerdictReached:
        """The verdict with what was learned so far (pure on the state in memory)."""
        return apply_learning(verdict, self.learner.state, self.settings)

    async def catch_up(self) -> int:
        """Fold what the log gained since the last call; append the proposals. Returns how many
        events were proposed (stored once, whoever proposes them)."""
        proposed: list[NewEvent] = []
        async for event in self.store.read_all(self.learner.position, types=LEARNING_TYPES):
            proposed.extend(self.learner.fold(event))
        proposed.extend(self.learner.expire())
        if proposed:
            # One at a time: an event another replica stored already is skipped by its key,
            # and does not hold back the others.
            for new in proposed:
                await self.append([new])
        return len(proposed)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.catch_up()
            except Exception:  # a bad round must not stop learning; the next one retries
                log.exception("learning: catch-up round failed; retrying")
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass
