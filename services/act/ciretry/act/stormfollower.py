"""The retry-storm follower of act (I/O): folds the log into ``storms.StormWatch``, appends what it
proposes (``StormStarted``, ``StormEnded``), and decides the parked jobs of ended storms again.

Every act replica runs one. It reads the log by position (not the bus): a storm is counted
across every pipeline, and each replica decides only some of the verdicts, so the log is the
only place that sees them all. The proposals carry idempotency keys derived from the log (the
storm id, ``<storm id>:ended``): replicas proposing the same event store it once. act's
decisions read the fold's open storms in memory (``StormWatch.open_for``), so the breaker adds
no round trip to a decision; the price is that a replica parks a signature only once its
follower has read the storm's start (at most one ``interval`` plus a read after it is stored).

Releasing: a park of an ended storm waits in ``StormWatch.releasable`` until a later decision
on its verdict is read back. One replica at a time releases a storm's parks
(``EventLog.exclusive``); each release is ``VerdictHandler.release``, the usual decision with
the chain's expected versions and the request's idempotency key, so a release racing a
redelivery, or another replica after a crash, never retries a job twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

from ciretry.common.bus import Append
from ciretry.common.eventlog import AppendResult, EventLog
from ciretry.common.events import NewEvent, RecordedEvent, StormEnded, StormStarted

from .policy import StormSettings
from .storms import DETECT_TYPES, STORM_TYPES, StormWatch

log = logging.getLogger("ciretry.act.storms")

Clock = Callable[[], dt.datetime]
Release = Callable[[RecordedEvent], Awaitable[Any]]


class StormFollower:
    def __init__(
        self,
        store: EventLog,
        append: Append,
        settings: StormSettings,
        release: Release,
        *,
        clock: Clock,
        interval: float = 0.5,
    ) -> None:
        self.store = store
        self.append = append
        self.settings = settings
        self.release = release
        self.clock = clock
        self.interval = interval
        self.watch = StormWatch(settings)
        #: With the breaker off, the follower only ends storms a former policy opened and
        #: releases their parks; None until the log was asked whether there are any.
        self._needed: bool | None = None if settings.mode == "off" else True

    async def catch_up(self) -> int:
        """Fold what the log gained since the last call; append the proposals (storms that
        opened). Returns how many events were proposed (stored once, whoever proposes)."""
        types = DETECT_TYPES if self.watch.detects else STORM_TYPES
        proposed: list[NewEvent] = []
        async for event in self.store.read_all(self.watch.position, types=types):
            proposed.extend(self.watch.fold(event))
        await self._append(proposed)
        return len(proposed)

    async def tick(self) -> int:
        """One round: catch up, end quiet storms, release what ended. Returns the releases."""
        if not await self._wanted():
            return 0
        changed = await self.catch_up()
        ended = self.watch.expire(self.clock())
        await self._append(ended)
        if changed or ended:
            await self.catch_up()  # read them back: the state changes from the log only
        return await self.release_parked()

    async def release_parked(self) -> int:
        """Decide again every parked job of an ended storm (one replica per storm at a time)."""
        by_storm: dict[str, list[Any]] = {}
        for park in self.watch.releasable():
            by_storm.setdefault(park.storm_id, []).append(park)
        done = 0
        for storm, parks in by_storm.items():
            async with self.store.exclusive(f"storm-release:{storm}") as got:
                if not got:
                    continue  # another replica is releasing it
                for park in parks:
                    verdict = await self.store.get(park.verdict_event_id)
                    if verdict is None:
                        continue
                    await self.release(verdict)
                    done += 1
            log.info("storms: %s ended; %d parked jobs decided again", storm, len(parks))
        if done:
            await self.catch_up()
        return done

    async def _wanted(self) -> bool:
        if self._needed is None:
            # Breaker off: is there any storm a former policy recorded? (One indexed read.)
            self._needed = False
            async with aclosing(self.store.read_all(0, batch=1, types=("StormStarted",))) as any_:
                async for _ in any_:
                    self._needed = True
                    break
        return self._needed

    async def _append(self, proposed: list[NewEvent]) -> None:
        # One at a time: an event another replica stored already is skipped by its key, and
        # does not hold back the others.
        for new in proposed:
            stored = await self.append([new])
            if not _fresh(stored, new):
                continue  # another replica stored it first: it says so in its own log
            data = new.data
            if isinstance(data, StormStarted):
                log.warning(
                    "storms: %s: signature %s failed %d pipelines within %.0f s (%s)",
                    data.storm_id, data.signature, data.pipeline_count, data.window_s,
                    "parking its retries" if data.mode == "park" else "watch only",
                )  # fmt: skip
            elif isinstance(data, StormEnded):
                log.warning("storms: %s ended (%s); %d jobs were parked",
                            data.storm_id, data.reason, data.parked_count)  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # a bad round must not stop the breaker; the next one retries
                log.exception("storms: round failed; retrying")
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass


def _fresh(stored: object, new: NewEvent) -> bool:
    """Whether this append stored ``new`` (a duplicate's result is the event stored before)."""
    if not isinstance(stored, list) or not stored:
        return False
    first = stored[0]
    recorded = first.event if isinstance(first, AppendResult) else first
    return isinstance(recorded, RecordedEvent) and recorded.event_id == new.event_id


__all__ = ["StormFollower"]
