"""Retry storms as incidents (pure; issue 15): act's ``StormStarted``, ``StormEnded`` and
``RetryParked`` events folded into one row per storm, for the API and the dashboard.

Storms are rare (incidents), so the query reads their events from the log by type (indexed)
instead of keeping a read model; a storm's parked count is its ``RetryParked`` events (a park
that reached the log after the storm's end included), and its pipelines are every pipeline its
events name, so the row is right whichever replica recorded what.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any, Final

from ciretry.common.events import RecordedEvent, RetryParked, StormEnded, StormStarted

#: The event types a storm is made of.
STORM_EVENT_TYPES: Final = ("StormStarted", "StormEnded", "RetryParked")
#: Pipelines and jobs listed per storm (the counts are exact).
LISTED: Final = 50


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def incidents(events: Iterable[RecordedEvent]) -> list[dict[str, Any]]:
    """One row per storm whose start is among ``events``: open storms first, then the latest."""
    rows: dict[str, dict[str, Any]] = {}
    pipelines: dict[str, dict[tuple[str, str, str], None]] = {}
    parked: dict[str, dict[str, dict[str, str]]] = {}
    for e in events:
        data = e.data
        if isinstance(data, StormStarted):
            rows.setdefault(data.storm_id, {
                "storm_id": data.storm_id, "signature": data.signature,
                "category": data.category, "rules": list(data.rules), "example": data.example,
                "mode": data.mode, "state": "open", "threshold": data.threshold,
                "window_s": data.window_s, "first_seen": _iso(data.first_seen),
                "started_at": _iso(e.recorded_at), "last_seen": _iso(data.last_seen),
                "ended_at": None, "end_reason": None, "quiet_s": None, "jitter_s": None,
            })  # fmt: skip
            seen = pipelines.setdefault(data.storm_id, {})
            seen.update(dict.fromkeys((p.source, p.project, p.pipeline_id) for p in data.pipelines))
            # The start lists at most STORM_PIPELINES_LISTED; its count is exact.
            rows[data.storm_id]["_counted"] = data.pipeline_count
        elif isinstance(data, StormEnded):
            row = rows.get(data.storm_id)
            if row is None:
                continue
            row |= {"state": "ended", "ended_at": _iso(data.ended_at or e.recorded_at),
                    "end_reason": data.reason, "last_seen": _iso(data.last_seen),
                    "quiet_s": data.quiet_s, "jitter_s": data.jitter_s}  # fmt: skip
            seen = pipelines.setdefault(data.storm_id, {})
            seen.update(dict.fromkeys((p.source, p.project, p.pipeline_id) for p in data.pipelines))
            row["_counted"] = max(row.get("_counted", 0), data.pipeline_count)
        elif isinstance(data, RetryParked):
            if data.storm_id not in rows:
                continue
            parked.setdefault(data.storm_id, {})[str(data.verdict_event_id)] = {
                "source": data.source, "project": data.project, "pipeline_id": data.pipeline_id,
                "job_id": data.job_id, "job_name": data.job_name,
            }  # fmt: skip
            pipelines.setdefault(data.storm_id, {})[
                (data.source, data.project, data.pipeline_id)
            ] = None
    out = []
    for sid, row in rows.items():
        seen = pipelines.get(sid, {})
        jobs = list(parked.get(sid, {}).values())
        counted = row.pop("_counted", 0)
        row["pipeline_count"] = max(counted, len(seen))
        row["pipelines"] = [
            {"source": s, "project": p, "pipeline_id": i} for s, p, i in list(seen)[:LISTED]
        ]
        row["parked_count"] = len(jobs)
        row["parked"] = jobs[:LISTED]
        out.append(row)
    opened = [r for r in out if r["state"] == "open"]
    ended = sorted((r for r in out if r["state"] != "open"),
                   key=lambda r: r["started_at"] or "", reverse=True)  # fmt: skip
    return sorted(opened, key=lambda r: r["started_at"] or "", reverse=True) + ended


__all__ = ["LISTED", "STORM_EVENT_TYPES", "incidents"]
