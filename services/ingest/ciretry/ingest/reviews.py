"""Merge requests (GitLab) and pull requests (GitHub) as events: what opt-out by label reads.

Both providers' normalizers build a ``MergeRequestUpdated``; this module stores it. One event per
distinct picture (labels, state, source branch, head commit) at one update time: a redelivered
hook is a duplicate, a label added and removed again is two facts. The review stream is keyed by
the source branch, because that is what a pipeline of the request knows (its ``ref``).
"""

from __future__ import annotations

from ciretry.common.events import MergeRequestUpdated, Metadata, NewEvent, review_stream

from .fields import content_hash


def review_event(event: MergeRequestUpdated, delivery_id: str | None) -> NewEvent:
    marker = event.updated_at.isoformat() if event.updated_at is not None else "-"
    digest = content_hash(event.labels, event.state, event.source_branch, event.sha)
    key = f"{event.source}:review:{event.project}:{event.number}:{marker}:{digest}"
    return NewEvent(
        stream=review_stream(event.source, event.project, event.source_branch),
        data=event,
        metadata=Metadata(idempotency_key=key, source_delivery_id=delivery_id),
    )


__all__ = ["review_event"]
