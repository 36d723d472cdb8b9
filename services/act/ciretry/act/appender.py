"""How act's components append: through the recorder (append, then publish to the bus) in the
service, or to the log alone (tests, tools). One callable, so the components do not care."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol

from ciretry.common.eventlog import EventLog, Tracking
from ciretry.common.events import NewEvent


class Append(Protocol):
    def __call__(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Tracking | None = None,
    ) -> Awaitable[object]: ...


class _Recorder(Protocol):
    async def append(
        self,
        events: Sequence[NewEvent],
        *,
        expected: dict[str, int] | None = None,
        tracking: Tracking | None = None,
    ) -> object: ...


def appender(log: EventLog, recorder: _Recorder | None) -> Append:
    """Append with the recorder when there is one (events reach the bus at once), else to the
    log (its outbox sweeper publishes them later, or nothing does, in a test)."""
    if recorder is not None:
        return recorder.append
    return log.append_batch


__all__ = ["Append", "appender"]
