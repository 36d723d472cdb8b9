"""The audit's answers: read queries over the read models (and the log, by position), shared by
the HTTP API, the dashboard and the CLI. Checks the request's limits, asks ``AuditStore`` for
rows (no SQL here) and shapes them with the pure ``why`` functions into plain dicts and lists,
ready for JSON."""

from __future__ import annotations

import datetime as dt
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from ciretry.common.events import JobFinished, RecordedEvent, StormStarted
from ciretry.common.learning import wilson

from .clusters import shape
from .store import OUTCOME_DIMENSIONS, AuditStore, IdColumn, Row
from .storms import STORM_EVENT_TYPES, incidents
from .why import ChainAttempt, RetryOutcome, chain_summary, explain

#: Metrics the stats query serves (audit_stats.kind values).
METRICS: Final = (
    "jobs", "failures", "category", "retryable", "rule", "runner", "job_name", "decision",
    "retry_outcome", "budget_exhausted", "disputed", "confirmed",
)  # fmt: skip
BUCKETS: Final = {
    "hour": dt.timedelta(hours=1),
    "day": dt.timedelta(days=1),
    "week": dt.timedelta(weeks=1),
}
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 100
#: Widest time range a stats or events query may span (bounded work per request).
MAX_RANGE: Final = dt.timedelta(days=400)
DEFAULT_RANGE: Final = dt.timedelta(days=30)


class QueryError(ValueError):
    """A request the API answers with 400 and this message."""


def event_json(e: RecordedEvent) -> dict[str, Any]:
    return {
        "event_id": str(e.event_id),
        "position": e.position,
        "stream": e.stream,
        "stream_version": e.stream_version,
        "recorded_at": e.recorded_at.isoformat(),
        "type": e.type,
        "data": msgspec.to_builtins(e.data),
        "metadata": msgspec.to_builtins(e.metadata),
    }


def _iso(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _row(r: Row) -> dict[str, Any]:
    return {k: _iso(v) for k, v in r.items()}


@dataclass
class Audit:
    """Queries on one deployment's read models."""

    store: AuditStore

    async def _project_key(
        self,
        source: str,
        project: str,
        *,
        job_id: str | None = None,
        pipeline_id: str | None = None,
    ) -> str:
        """The project as the read models key it, from the spelling a person gives: GitLab
        projects are keyed by their numeric id and people name them ``group/project``; GitHub's
        ``owner/repo`` is case-insensitive. Job and pipeline ids are unique per provider
        instance, so the id finds the candidates and the job's own URL confirms the path."""
        column: IdColumn
        if job_id is not None:
            column, value = "job_id", job_id
        else:
            column, value = "pipeline_id", pipeline_id or ""
        if await self.store.project_has(column, source, project, value):
            return project
        rows = await self.store.project_candidates(column, source, value)
        wanted = project.strip("/").lower()
        for r in rows:
            if r["project"].lower() == wanted:
                return str(r["project"])
            url = await self._job_url(source, r["project"], r["job_id"])
            if url is not None and f"/{wanted}/-/" in urllib.parse.urlsplit(url).path.lower():
                return str(r["project"])
            if url is None and len(rows) == 1 and source == "gitlab" and not wanted.isdigit():
                return str(r["project"])  # no URL to confirm it with; the id is unique
        return project

    async def _job_url(self, source: str, project: str, job_id: str) -> str | None:
        for e in await self.store.timeline(source, project, job_id):
            if isinstance(e.data, JobFinished) and e.data.log is not None and e.data.log.url:
                return e.data.log.url
        return None

    async def _retry(self, source: str, project: str, job_id: str) -> RetryOutcome | None:
        r = await self.store.latest_retry(source, project, job_id)
        return RetryOutcome(r["outcome"], r["outcome_job_id"]) if r else None

    async def job(self, source: str, project: str, job_id: str) -> dict[str, Any] | None:
        project = await self._project_key(source, project, job_id=job_id)
        row = await self.store.job(source, project, job_id)
        if row is None:
            return None
        events = await self.store.timeline(source, project, job_id)
        retry = await self._retry(source, project, job_id)
        why = explain(events, retry)
        job = _row(row)
        job["rules"] = list(row["rules"] or [])
        return {
            "job": job,
            "events": [event_json(e) for e in events],
            "verdict": why.facts["verdict"],
            "decision": why.facts["decision"],
            "retry_outcome": why.facts["retry_outcome"],
            "feedback": why.facts["feedback"],
        }

    async def chain(self, source: str, project: str, job_id: str) -> dict[str, Any] | None:
        """The job's attempt chain: origin pipeline and every attempt with its size."""
        rows = await self.store.chain(source, project, job_id)
        if not rows:
            return None
        attempts = [
            ChainAttempt(
                job_id=r["job_id"],
                pipeline_id=r["pipeline_id"],
                status=r["status"],
                category=r["category"],
                decision=r["decision"],
                action=r["decision_action"],
                reason=r["decision_reason"],
                observed_memory_mb=r["observed_memory_mb"],
                requested_memory_mb=r["requested_memory_mb"],
                asked_memory_mb=r["asked_memory_mb"],
            )
            for r in rows
        ]
        return {
            "origin_pipeline_id": rows[0]["origin"],
            "attempts": [msgspec.structs.asdict(a) for a in attempts],
            "summary": chain_summary(rows[0]["origin"], attempts),
        }

    async def why(self, source: str, project: str, job_id: str) -> dict[str, Any] | None:
        project = await self._project_key(source, project, job_id=job_id)
        events = await self.store.timeline(source, project, job_id)
        if not events:
            return None
        w = explain(events, await self._retry(source, project, job_id))
        chain = await self.chain(source, project, job_id)
        summary = w.summary
        if chain is not None and len(chain["attempts"]) > 1:
            summary += " " + chain["summary"]
        return {"summary": summary, "facts": w.facts, "chain": chain}

    async def pipeline(
        self,
        source: str,
        project: str,
        pipeline_id: str,
        *,
        limit: int = MAX_PAGE,
        cursor: str | None = None,
    ) -> dict[str, Any] | None:
        """The pipeline, ``limit`` of its jobs from ``cursor`` on (``next_cursor`` continues;
        every page repeats the summary and the retries, at most MAX_PAGE of them)."""
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be between 1 and {MAX_PAGE}")
        offset = 0
        if cursor:
            if not cursor.isdigit() or int(cursor) > MAX_OFFSET:
                raise QueryError("cursor is not one this API returned")
            offset = int(cursor)
        project = await self._project_key(source, project, pipeline_id=pipeline_id)
        found = await self.store.pipeline(
            source, project, pipeline_id, limit=limit + 1, offset=offset, retries=MAX_PAGE
        )
        if found is None:
            return None
        row, jobs, retries = found
        out = _row(row)
        job_rows = []
        for j in jobs[:limit]:
            d = _row(j)
            d["rules"] = list(j["rules"] or [])
            job_rows.append(d)
        return {
            "pipeline": out,
            "jobs": job_rows,
            "retries": [_row(r) for r in retries],
            "next_cursor": str(offset + limit) if len(jobs) > limit else None,
        }

    async def stats(
        self,
        metric: str,
        *,
        bucket: str = "day",
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        project: str | None = None,
        source: str | None = None,
        top: int = 10,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Counts of ``metric`` per key and time bucket; the ``top`` keys by total."""
        if metric not in METRICS:
            raise QueryError(f"metric must be one of {', '.join(METRICS)}")
        if bucket not in BUCKETS:
            raise QueryError(f"bucket must be one of {', '.join(BUCKETS)}")
        if not 1 <= top <= 100:
            raise QueryError("top must be between 1 and 100")
        start, end = time_range(start, end, now)
        if bucket != "hour":
            # Day and week buckets read the daily roll-up: the range widens to whole UTC days.
            start, end = floor_day(start), ceil_day(end)
        rows = await self.store.stats(
            "hour" if bucket == "hour" else "day",
            bucket=BUCKETS[bucket],
            metric=metric,
            start=start,
            end=end,
            project=project,
            source=source,
        )
        totals: dict[str, int] = {}
        points: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            totals[r["key"]] = totals.get(r["key"], 0) + int(r["n"])
            points.setdefault(r["key"], []).append({"t": r["t"].isoformat(), "n": int(r["n"])})
        keys = sorted(totals, key=lambda k: (-totals[k], k))[:top]
        return {
            "metric": metric,
            "bucket": bucket,
            "from": start.isoformat(),
            "to": end.isoformat(),
            "filters": {"project": project, "source": source},
            "total": sum(totals.values()),
            "series": [{"key": k, "total": totals[k], "points": points[k]} for k in keys],
        }

    async def events(
        self,
        *,
        stream: str | None = None,
        types: Sequence[str] = (),
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        after: int = 0,
        limit: int = DEFAULT_PAGE,
    ) -> dict[str, Any]:
        """Raw events in log order, ``limit`` at a time; ``next_cursor`` continues."""
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be between 1 and {MAX_PAGE}")
        # Only one end given: the range is MAX_RANGE wide from it, so that one bound never means
        # "scan the whole log" (issue 18: bounded work per request).
        if start is not None and end is None:
            end = start + MAX_RANGE
        elif end is not None and start is None:
            start = end - MAX_RANGE
        if start is not None and end is not None:
            if end <= start:
                raise QueryError("'to' must be after 'from'")
            if end - start > MAX_RANGE:
                raise QueryError(f"time range is limited to {MAX_RANGE.days} days")
        found = await self.store.events(
            after=after, stream=stream, types=types, start=start, end=end, limit=limit + 1
        )
        page = found[:limit]
        more = len(found) > limit
        return {
            "events": [event_json(e) for e in page],
            "next_cursor": str(page[-1].position) if more and page else None,
        }

    async def allocation(
        self, project: str, job_name: str, ref: str | None = None
    ) -> dict[str, Any]:
        """The size a job should run with: the row for its ref if there is one, else the most
        recently updated row of the project + job name on any ref."""
        row = await self.store.allocation(project, job_name, ref)
        base: dict[str, Any] = {"project": project, "job_name": job_name, "ref": ref}
        keys = ("memory_request_mb", "memory_limit_mb", "cpu_request_millis", "cpu_limit_millis")
        if row is None:
            return base | {k: None for k in keys} | {
                "found": False, "matched_ref": None, "last_oom_at": None,
                "last_oom_job_id": None, "updated_at": None,
            }  # fmt: skip
        return (
            base
            | {k: row[k] for k in keys}
            | {
                "found": True,
                "matched_ref": row["ref"],
                "last_oom_at": _iso(row["last_oom_at"]),
                "last_oom_job_id": row["last_oom_job_id"],
                "updated_at": _iso(row["updated_at"]),
            }
        )

    async def clusters(
        self,
        *,
        days: int = 30,
        project: str | None = None,
        unexplained: bool = True,
        limit: int = 50,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Failures grouped by signature over the last ``days`` days, most pipelines first:
        impact, trend, outcomes, where they happen, and a rule stub each. ``unexplained``: only
        failures no rule explained (``unknown``, and those retried on learning alone)."""
        if not 1 <= days <= MAX_RANGE.days:
            raise QueryError(f"days must be between 1 and {MAX_RANGE.days}")
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be between 1 and {MAX_PAGE}")
        until = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(minutes=1)
        rows = await self.store.clusters(
            until - dt.timedelta(days=days), until, project, unexplained, limit
        )
        return {"days": days, "unexplained": unexplained, "clusters": shape(rows)}

    async def storms(
        self, *, days: int = 30, limit: int = 50, now: dt.datetime | None = None
    ) -> dict[str, Any]:
        """Retry storms recorded over the last ``days`` days (open ones first, then the latest):
        signature, when, pipelines affected and jobs parked. A storm that started earlier and
        ended or parked within the window is listed too."""
        if not 1 <= days <= MAX_RANGE.days:
            raise QueryError(f"days must be between 1 and {MAX_RANGE.days}")
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be between 1 and {MAX_PAGE}")
        until = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(minutes=1)
        since = until - dt.timedelta(days=days)
        events: list[RecordedEvent] = []
        after = 0
        while True:
            page = await self.store.events(after=after, stream=None, types=STORM_EVENT_TYPES,
                                           start=since, end=until, limit=MAX_PAGE)  # fmt: skip
            events += page
            if len(page) < MAX_PAGE:
                break
            after = page[-1].position
        started = {e.data.storm_id for e in events if isinstance(e.data, StormStarted)}
        earlier = {getattr(e.data, "storm_id", "") for e in events} - started
        for storm in sorted(earlier):
            found = await self.store.log.get_by_key(storm)
            if found is not None:
                events.insert(0, found)
        return {"days": days, "storms": incidents(events)[:limit]}

    async def outcomes(
        self,
        *,
        days: int = 7,
        by: str = "none",
        project: str | None = None,
        limit: int = 100,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """How failures ended, per deciding rule (``""``: no rule) and ``by`` (project, runner,
        job, signature or none), over the last ``days`` days: counts and the pass-on-retry rate
        with its 95 % Wilson interval (passes / (passes + failed again the same way))."""
        if days not in (1, 7, 30):
            raise QueryError("days must be 1, 7 or 30")
        if by not in OUTCOME_DIMENSIONS:
            raise QueryError(f"by must be one of {', '.join(sorted(OUTCOME_DIMENSIONS))}")
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be between 1 and {MAX_PAGE}")
        until = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(minutes=1)
        rows = await self.store.outcomes(until - dt.timedelta(days=days), until, by, project, limit)
        items = []
        for r in rows:
            passed, again = int(r["passed_on_retry"]), int(r["failed_again_same"])
            low, high = wilson(passed, passed + again)
            items.append(
                {
                    "rule": r["rule"] or None,
                    "key": r["key"] or None,
                    "failures": int(r["failures"]),
                    "passed_on_retry": passed,
                    "failed_again_same": again,
                    "failed_differently": int(r["failed_differently"]),
                    "never_retried": int(r["never_retried"]),
                    "pass_rate": round(passed / (passed + again), 3) if passed + again else None,
                    "pass_rate_low": round(low, 3),
                    "pass_rate_high": round(high, 3),
                }
            )
        return {"days": days, "by": by, "items": items}

    async def disputed(
        self, rule: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """Disputes and confirmations per rule, and the latest disputes, ``limit`` at a time
        (``next_cursor``: the next, older page)."""
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be between 1 and {MAX_PAGE}")
        before: tuple[dt.datetime, uuid.UUID] | None = None
        if cursor:
            before = _dispute_cursor(cursor)
        per_rule = await self.store.feedback_per_rule()
        recent = await self.store.disputes(rule, limit + 1, before)
        items = []
        for r in recent[:limit]:
            d = _row(r)
            d["rules"] = list(r["rules"] or [])
            items.append(d)
        last = recent[limit - 1] if len(recent) > limit else None
        return {
            "rules": [
                {
                    "rule": r["rule"],
                    "disputed": int(r["disputed"]),
                    "confirmed": int(r["confirmed"]),
                }
                for r in per_rule
            ],
            "disputes": items,
            "next_cursor": (
                f"{_micros(last['recorded_at'])}.{last['event_id']}" if last is not None else None
            ),
        }

    async def retry_summary(
        self, start: dt.datetime, end: dt.datetime, project: str | None = None
    ) -> dict[str, Any]:
        """Retries issued vs skipped (by reason) and how many retries passed, over a range
        (widened to whole UTC days: it reads the daily roll-up)."""
        start, end = floor_day(start), ceil_day(end)
        rows = await self.store.daily_counts(
            ["decision", "retry_outcome", "budget_exhausted"], start, end, project
        )
        decisions: dict[str, int] = {}
        outcomes = {"passed": 0, "failed": 0}
        exhausted: dict[str, int] = {}
        for r in rows:
            if r["kind"] == "decision":
                decisions[r["key"]] = int(r["n"])
            elif r["kind"] == "retry_outcome":
                outcomes[r["key"]] = int(r["n"])
            else:
                exhausted[r["key"]] = int(r["n"])
        requested = sum(n for k, n in decisions.items() if k.startswith("requested:"))
        skipped = {k.split(":", 1)[1]: n for k, n in decisions.items() if k.startswith("skipped:")}
        settled = outcomes["passed"] + outcomes["failed"]
        return {
            "requested": requested,
            "requested_by_action": {
                k.split(":", 1)[1]: n for k, n in decisions.items() if k.startswith("requested:")
            },
            "issued": decisions.get("issued", 0),
            "call_failed": decisions.get("call_failed", 0),
            "skipped": skipped,
            "passed": outcomes["passed"],
            "failed": outcomes["failed"],
            "success_rate": (outcomes["passed"] / settled) if settled else None,
            "budget_exhausted": exhausted,
        }

    async def dashboard(
        self,
        *,
        days: int = 30,
        project: str | None = None,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Everything the dashboard page shows, over the last ``days`` (``pages.render_dashboard``
        draws it)."""
        if not 1 <= days <= 400:
            raise QueryError("days must be between 1 and 400")
        now = now or dt.datetime.now(dt.UTC)
        end = now + dt.timedelta(hours=1)
        start, end = time_range(end - dt.timedelta(days=days), end)
        bucket = "hour" if days <= 2 else "day"
        out: dict[str, Any] = {
            "from": start.isoformat(), "to": end.isoformat(), "project": project, "bucket": bucket,
        }  # fmt: skip
        for metric, top in (("category", 20), ("retryable", 20), ("rule", 15), ("job_name", 10),
                            ("runner", 10)):  # fmt: skip
            out[metric] = await self.stats(
                metric, bucket=bucket, top=top, start=start, end=end, project=project
            )
        out["retries"] = await self.retry_summary(start, end, project)
        out["disputed"] = await self.disputed(limit=20)
        out["exhausted_pipelines"] = await self.store.exhausted_pipelines(start, project)
        out["recent"] = await self.store.recent_failed_jobs(project)
        return out

    async def find_jobs(self, job_id: str) -> list[dict[str, Any]]:
        """Jobs of any source and project with this id (the dashboard's search box)."""
        return await self.store.jobs_with_id(job_id)


#: The furthest a pipeline's job list may be paged (offset paging on one pipeline's jobs).
MAX_OFFSET: Final = 9_999_999


def _micros(t: dt.datetime) -> int:
    return int((t - _EPOCH) / dt.timedelta(microseconds=1))


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _dispute_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """``<microseconds since the epoch>.<event id>`` of the last dispute of a page."""
    micros, _, event_id = cursor.partition(".")
    try:
        if not micros.isdigit() or len(micros) > 16:
            raise ValueError
        return _EPOCH + dt.timedelta(microseconds=int(micros)), uuid.UUID(event_id)
    except (ValueError, OverflowError):
        raise QueryError("cursor is not one this API returned") from None


def floor_day(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(t: dt.datetime) -> dt.datetime:
    day = floor_day(t)
    return day if day == t else day + dt.timedelta(days=1)


def time_range(
    start: dt.datetime | None, end: dt.datetime | None, now: dt.datetime | None = None
) -> tuple[dt.datetime, dt.datetime]:
    """Defaults (last 30 days) and the limit on the width of a range."""
    now = now or dt.datetime.now(dt.UTC)
    end = end or now + dt.timedelta(hours=1)
    start = start or end - DEFAULT_RANGE
    if end <= start:
        raise QueryError("'to' must be after 'from'")
    if end - start > MAX_RANGE:
        raise QueryError(f"time range is limited to {MAX_RANGE.days} days")
    return start, end


_EARLIEST: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_LATEST: Final = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)


def parse_time(value: str | None, name: str) -> dt.datetime | None:
    if value is None or value == "":
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"{name}: not an ISO 8601 time: {value!r}") from None
    try:
        utc: dt.datetime | None = (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
    except OverflowError:  # year 1 at a positive offset
        utc = None
    # Bounded well inside what datetime holds, so that defaults, buckets and ranges computed
    # from it never overflow; no CI system has events outside these years.
    if utc is None or not _EARLIEST <= utc < _LATEST:
        raise QueryError(f"{name}: time out of range (1970 to 9000): {value!r}")
    return utc


__all__ = ["Audit", "QueryError", "event_json", "parse_time", "time_range"]
