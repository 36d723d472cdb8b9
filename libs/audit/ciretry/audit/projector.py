"""The projector: follows the log by position and applies ``Batch``es to the read models.

Exactly-once: each transaction locks this projection's row in ``projection_position``
(``FOR UPDATE``), reads the events after it, applies their changes and moves the position, then
commits; a crash rolls the whole batch back and a restart resumes from the committed position.
A second replica waits on the row lock and then continues after what the first committed, so no
event is applied twice. The log's appends commit in position order (see eventstore), so reading
``position > p`` never skips an event that commits late.

One bad event never stalls the read models. A batch is one transaction; when it fails with
anything but a transient error (a value PostgreSQL refuses, such as a NUL stored before ingest
made text safe, or a bug on one kind of event), the same events are applied again one at a time,
each under a savepoint: the ones that fail are rolled back alone, recorded as ``MessageRejected``
(consumer ``projector-<name>``, stream ``rejected-projector-<name>``, idempotency key per event, so
a rebuild records each once) and skipped, the others are applied and the position moves on.
A rebuild after the fix projects the skipped events again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Final

from ciretry.common.bus import metadata_from_context
from ciretry.common.errors import is_transient
from ciretry.common.eventlog import Undecodable
from ciretry.common.events import MessageRejected, NewEvent, RecordedEvent, encode
from ciretry.common.metrics import instruments
from ciretry.common.text import safe_text

from .projections import Batch
from .store import AuditStore, ProjectionTx

log = logging.getLogger(__name__)

DEFAULT_NAME: Final = "audit"


def _decoded(events: Sequence[RecordedEvent | Undecodable]) -> list[RecordedEvent]:
    out = []
    for e in events:
        if isinstance(e, Undecodable):
            # Written by a newer ciretry: skipping keeps the read models live; a rebuild after
            # the upgrade projects it.
            log.warning("projector skips event at position %s: %s", e.position, e.error)
        else:
            out.append(e)
    return out


async def _apply_one_by_one(
    tx: ProjectionTx, events: Sequence[RecordedEvent]
) -> list[tuple[RecordedEvent, str]]:
    """Apply each event under its own savepoint; returns the ones that failed, with why."""
    poison: list[tuple[RecordedEvent, str]] = []
    for event in events:
        try:
            async with tx.savepoint():
                batch = Batch()
                batch.add_event(event)
                await tx.apply(batch)
        except Exception as exc:
            if is_transient(exc):
                raise
            poison.append((event, f"{type(exc).__name__}: {exc}"))
    return poison


class Projector:
    """Applies the log to the audit read models. ``run(stop)`` is a service worker."""

    def __init__(
        self,
        store: AuditStore,
        *,
        name: str = DEFAULT_NAME,
        batch_size: int = 5000,
        idle_interval: float = 0.5,
    ) -> None:
        self.store = store
        self.name = name
        self.batch_size = batch_size
        self.idle_interval = idle_interval

    async def position(self) -> int:
        return await self.store.position(self.name)

    @property
    def consumer(self) -> str:
        """The name this projector's rejections are recorded under."""
        return f"projector-{self.name}"

    async def step(self) -> int:
        """Apply the next batch (at most ``batch_size`` events); returns how many were read.
        A batch that fails for its data is applied again event by event (module doc)."""
        try:
            return await self._step(isolate=False)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning(
                "projector %s: batch failed (%s), applying it one event at a time",
                self.name,
                type(exc).__name__,
            )
            return await self._step(isolate=True)

    async def _step(self, *, isolate: bool) -> int:
        async with self.store.projection(self.name) as tx:
            read = await tx.read(self.batch_size)
            if not read:
                return 0
            events = _decoded(read)
            if isolate:
                poison = await _apply_one_by_one(tx, events)
                # Recorded before the position moves: a crash in between finds them again,
                # and the idempotency key stores each rejection once.
                await self._reject(poison)
            else:
                batch = Batch()
                for event in events:
                    batch.add_event(event)
                await tx.apply(batch)
            await tx.advance(read[-1].position)
            return len(read)

    async def _reject(self, poison: Sequence[tuple[RecordedEvent, str]]) -> None:
        if not poison:
            return
        new = [
            NewEvent(
                stream=f"rejected-{self.consumer}",
                data=MessageRejected(
                    consumer=self.consumer,
                    subject=safe_text(f"{event.stream}@{event.stream_version}", 500),
                    reason=safe_text(reason, 2000),
                    message_id=str(event.event_id),
                    deliveries=1,
                    payload_excerpt=safe_text(
                        encode(event.data)[:512].decode("utf-8", "replace"), 512
                    ),
                ),
                metadata=metadata_from_context(
                    causation=event,
                    idempotency_key=f"rejected:{self.consumer}:{event.event_id}",
                ),
            )
            for event, reason in poison
        ]
        await self.store.log.append_batch(new)
        for event, reason in poison:
            log.error(
                "projector %s skips event %s at position %d: %s",
                self.name,
                event.event_id,
                event.position,
                reason[:300],
            )
        instruments().messages_rejected.add(len(poison), {"consumer": self.consumer})

    async def catch_up(self) -> int:
        """Apply everything committed so far; returns the number of events read."""
        total = 0
        while True:
            n = await self.step()
            total += n
            if n < self.batch_size:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the log until ``stop``; transient errors are retried after a pause."""
        delay = self.idle_interval
        while not stop.is_set():
            try:
                await self.catch_up()
                delay = self.idle_interval
            except Exception:
                log.exception("projector %s failed; retrying", self.name)
                delay = min(max(delay * 2, 1.0), 30.0)
            # Caught up (the last step was not full): pause even when it found events. Under a
            # steady stream of appends, stepping again at once would apply a handful of events
            # per transaction, ~8 round trips each, and cost the process (ingest's) more than
            # the requests that appended them; pausing lets the next step take everything
            # appended meanwhile in one transaction. The read models then lag by at most
            # ``idle_interval`` plus one step, busy or idle alike.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)


async def rebuild_projections(store: AuditStore, *, name: str = DEFAULT_NAME) -> int:
    """Truncate the read models and project the whole log again (``ciretry replay
    --projections``). Returns the number of events projected."""
    await store.reset(name)
    return await Projector(store, name=name).catch_up()


__all__ = ["DEFAULT_NAME", "Projector", "rebuild_projections"]
