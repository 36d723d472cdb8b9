"""Feedback on a verdict: append a ``VerdictDisputed`` or ``VerdictConfirmed`` to the verdict's
job stream (the outbox sweeper publishes it). Shared by the API's POST and the dashboard's form;
who may is the caller's business (the ``feedback`` scope)."""

from __future__ import annotations

import uuid
from typing import Any, Final, Literal

import msgspec

from ciretry.common.events import (
    Category,
    Metadata,
    NewEvent,
    VerdictConfirmed,
    VerdictDisputed,
    VerdictReached,
)

from .queries import Audit, QueryError

MAX_WHO: Final = 200
MAX_WHY: Final = 2000


class FeedbackRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    verdict: Literal["disputed", "confirmed"]
    who: str
    why: str | None = None
    correct_category: Category | None = None


class NoSuchVerdict(LookupError):
    """The event id names no ``VerdictReached``."""


def check(body: FeedbackRequest) -> None:
    """Raise QueryError for feedback the log should not hold."""
    if not body.who.strip() or len(body.who) > MAX_WHO or len(body.why or "") > MAX_WHY:
        raise QueryError(f"who is required (<= {MAX_WHO} chars), why <= {MAX_WHY} chars")
    if body.verdict == "disputed" and not (body.why or "").strip():
        raise QueryError("a dispute needs a why")
    if any("\x00" in (v or "") for v in (body.who, body.why)):
        raise QueryError("who and why must not contain NUL characters")


async def record(
    audit: Audit, verdict_id: uuid.UUID, body: FeedbackRequest, key: str | None
) -> dict[str, Any]:
    """Append the feedback (once per ``key`` when given); its event's id, stream and type."""
    check(body)
    event_log = audit.store.log
    verdict = await event_log.get(verdict_id)
    if verdict is None or not isinstance(verdict.data, VerdictReached):
        raise NoSuchVerdict(str(verdict_id))
    data: VerdictDisputed | VerdictConfirmed
    if body.verdict == "disputed":
        data = VerdictDisputed(
            verdict_event_id=verdict_id,
            who=body.who.strip(),
            why=(body.why or "").strip(),
            correct_category=body.correct_category,
        )
    else:
        data = VerdictConfirmed(verdict_event_id=verdict_id, who=body.who.strip(), why=body.why)
    metadata = Metadata(
        idempotency_key=f"feedback:{verdict_id}:{key}" if key else None,
        causation_id=str(verdict_id),
    )
    (result,) = await event_log.append_batch(
        [NewEvent(stream=verdict.stream, data=data, metadata=metadata)]
    )
    return {
        "status": "duplicate" if result.duplicate else "recorded",
        "event_id": str(result.event.event_id),
        "stream": result.event.stream,
        "type": result.event.type,
    }


__all__ = ["FeedbackRequest", "NoSuchVerdict", "check", "record"]
