"""Read queries over the audit read models (and the log, by position): shared by the HTTP API,
the dashboard and the CLI. Results are plain dicts and lists, ready for JSON."""

from __future__ import annotations

import datetime as dt
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import msgspec

from ciretry.common.events import JobFinished, RecordedEvent
from ciretry.common.eventstore import EventStore, row_to_event

from .projector import STATS_TABLES
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

_EVENT_COLS: Final = (
    "e.event_id, e.stream, e.stream_version, e.position, e.recorded_at, e.type, "
    "e.schema_version, e.body, e.metadata"
)


_STATS_TEMPLATE: Final = """
SELECT date_bin($1::interval, bucket, TIMESTAMPTZ '2000-01-03 00:00+00') AS t, key,
       sum(n)::bigint AS n
FROM {table}
WHERE kind = $2 AND bucket >= $3 AND bucket < $4
  AND ($5::text IS NULL OR project = $5) AND ($6::text IS NULL OR source = $6)
GROUP BY 1, 2 ORDER BY 1, 2
"""
#: One query per stats table; the table names are code constants (STATS_TABLES).
_STATS_QUERY: Final = {t: _STATS_TEMPLATE.format(table=t) for t in STATS_TABLES.values()}


#: Every attempt of a job's chain (the origin pipeline and the pipelines that rerun it), in
#: attempt order, with the sizes: what "why" shows for a job that was rerun elsewhere.
_CHAIN = """
WITH me AS (
    SELECT pipeline_id, job_name FROM audit_jobs
    WHERE source = $1 AND project = $2 AND job_id = $3
), o AS (
    SELECT coalesce(
        (SELECT c.origin_pipeline_id FROM audit_chains c, me
         WHERE c.source = $1 AND c.project = $2 AND c.pipeline_id = me.pipeline_id),
        (SELECT pipeline_id FROM me)) AS origin
), p AS (
    SELECT origin AS pipeline_id FROM o
    UNION
    SELECT c.pipeline_id FROM audit_chains c, o
    WHERE c.source = $1 AND c.project = $2 AND c.origin_pipeline_id = o.origin
)
SELECT (SELECT origin FROM o) AS origin, j.job_id, j.pipeline_id, j.status, j.category,
       j.decision, j.decision_action, j.decision_reason, j.observed_memory_mb,
       j.requested_memory_mb, c.asked_memory_mb
FROM audit_jobs j
JOIN p ON j.pipeline_id = p.pipeline_id
LEFT JOIN audit_chains c
       ON c.source = j.source AND c.project = j.project AND c.pipeline_id = j.pipeline_id
WHERE j.source = $1 AND j.project = $2 AND j.job_name = (SELECT job_name FROM me)
ORDER BY j.order_key
LIMIT 200
"""


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


def _row(r: asyncpg.Record) -> dict[str, Any]:
    return {k: _iso(v) for k, v in r.items()}


_JOB_FIELDS: Final = (
    "source, project, job_id, pipeline_id, job_name, status, stage, runner, ref, attempt, "
    "failure_reason, exit_code, finished_at, verdict_event_id, category, retryable, budget, "
    "rules, decision, decision_action, decision_reason, decision_detail, dry_run, retry_job_id, "
    "call_status"
)


#: ``Audit._project_key``'s lookups, by the id column a request names.
_KEYED: Final = {
    column: "SELECT 1 FROM audit_jobs "  # noqa: S608 - a column name from the tuple below
    f"WHERE source = $1 AND project = $2 AND {column} = $3 LIMIT 1"
    for column in ("job_id", "pipeline_id")
}
_CANDIDATES: Final = {
    column: "SELECT DISTINCT ON (project) project, job_id FROM audit_jobs "  # noqa: S608
    f"WHERE source = $1 AND {column} = $2 ORDER BY project LIMIT 20"
    for column in ("job_id", "pipeline_id")
}


@dataclass
class Audit:
    """Queries on one store."""

    store: EventStore

    async def _project_key(
        self, source: str, project: str, *, job_id: str | None = None, pipeline_id: str | None = None
    ) -> str:
        """The project as the read models key it, from the spelling a person gives: GitLab
        projects are keyed by their numeric id and people name them ``group/project``; GitHub's
        ``owner/repo`` is case-insensitive. Job and pipeline ids are unique per provider
        instance, so the id finds the candidates and the job's own URL confirms the path."""
        column, value = ("job_id", job_id) if job_id is not None else ("pipeline_id", pipeline_id)
        async with self.store.connection() as conn:
            if await conn.fetchval(_KEYED[column], source, project, value):
                return project
            rows = await conn.fetch(_CANDIDATES[column], source, value)
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
        for e in await self._timeline_events(source, project, job_id):
            if isinstance(e.data, JobFinished) and e.data.log is not None and e.data.log.url:
                return e.data.log.url
        return None

    async def _timeline_events(self, source: str, project: str, job_id: str) -> list[RecordedEvent]:
        async with self.store.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_EVENT_COLS} FROM audit_job_events j "  # noqa: S608 - constant columns
                "JOIN events e ON e.position = j.position "
                "WHERE j.source = $1 AND j.project = $2 AND j.job_id = $3 ORDER BY e.position",
                source,
                project,
                job_id,
            )
        return [row_to_event(r) for r in rows]

    async def _retry(self, source: str, project: str, job_id: str) -> RetryOutcome | None:
        async with self.store.connection() as conn:
            r = await conn.fetchrow(
                "SELECT outcome, outcome_job_id FROM audit_retries "
                "WHERE source = $1 AND project = $2 AND job_id = $3 AND NOT dry_run "
                "ORDER BY requested_at DESC LIMIT 1",
                source,
                project,
                job_id,
            )
        return RetryOutcome(r["outcome"], r["outcome_job_id"]) if r else None

    async def job(self, source: str, project: str, job_id: str) -> dict[str, Any] | None:
        project = await self._project_key(source, project, job_id=job_id)
        async with self.store.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_JOB_FIELDS} FROM audit_jobs "  # noqa: S608 - constant columns
                "WHERE source = $1 AND project = $2 AND job_id = $3",
                source,
                project,
                job_id,
            )
        if row is None:
            return None
        events = await self._timeline_events(source, project, job_id)
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
        async with self.store.connection() as conn:
            rows = await conn.fetch(_CHAIN, source, project, job_id)
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
        events = await self._timeline_events(source, project, job_id)
        if not events:
            return None
        w = explain(events, await self._retry(source, project, job_id))
        chain = await self.chain(source, project, job_id)
        summary = w.summary
        if chain is not None and len(chain["attempts"]) > 1:
            summary += " " + chain["summary"]
        return {"summary": summary, "facts": w.facts, "chain": chain}

    async def pipeline(self, source: str, project: str, pipeline_id: str) -> dict[str, Any] | None:
        project = await self._project_key(source, project, pipeline_id=pipeline_id)
        async with self.store.connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM audit_pipelines WHERE source = $1 AND project = $2 "
                "AND pipeline_id = $3",
                source,
                project,
                pipeline_id,
            )
            if row is None:
                return None
            jobs = await conn.fetch(
                f"SELECT {_JOB_FIELDS} FROM audit_jobs "  # noqa: S608 - constant columns
                "WHERE source = $1 AND project = $2 AND pipeline_id = $3 "
                "ORDER BY job_name, order_key",
                source,
                project,
                pipeline_id,
            )
            retries = await conn.fetch(
                "SELECT job_id, job_name, action, category, dry_run, outcome, outcome_job_id "
                "FROM audit_retries WHERE source = $1 AND project = $2 AND pipeline_id = $3 "
                "ORDER BY requested_at",
                source,
                project,
                pipeline_id,
            )
        out = _row(row)
        job_rows = []
        for j in jobs:
            d = _row(j)
            d["rules"] = list(j["rules"] or [])
            job_rows.append(d)
        return {"pipeline": out, "jobs": job_rows, "retries": [_row(r) for r in retries]}

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
        table = STATS_TABLES["hour" if bucket == "hour" else "day"]
        async with self.store.connection() as conn:
            rows = await conn.fetch(
                _STATS_QUERY[table],
                BUCKETS[bucket],
                metric,
                start,
                end,
                project,
                source,
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
        if start is not None and end is not None:
            if end <= start:
                raise QueryError("'to' must be after 'from'")
            if end - start > MAX_RANGE:
                raise QueryError(f"time range is limited to {MAX_RANGE.days} days")
        async with self.store.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_EVENT_COLS} FROM events e WHERE e.position > $1 "  # noqa: S608
                "AND ($2::text IS NULL OR e.stream = $2) "
                "AND (cardinality($3::text[]) = 0 OR e.type = ANY($3::text[])) "
                "AND ($4::timestamptz IS NULL OR e.recorded_at >= $4) "
                "AND ($5::timestamptz IS NULL OR e.recorded_at < $5) "
                "ORDER BY e.position LIMIT $6",
                after,
                stream,
                list(types),
                start,
                end,
                limit + 1,
            )
        page = [row_to_event(r) for r in rows[:limit]]
        more = len(rows) > limit
        return {
            "events": [event_json(e) for e in page],
            "next_cursor": str(page[-1].position) if more and page else None,
        }

    async def allocation(
        self, project: str, job_name: str, ref: str | None = None
    ) -> dict[str, Any]:
        """The size a job should run with: the row for its ref if there is one, else the most
        recently updated row of the project + job name on any ref."""
        async with self.store.connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM audit_allocation WHERE project = $1 AND job_name = $2 "
                "ORDER BY (ref = coalesce($3, '')) DESC, updated_at DESC LIMIT 1",
                project,
                job_name,
                ref,
            )
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

    async def disputed(self, rule: str | None = None, limit: int = 50) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be between 1 and {MAX_PAGE}")
        async with self.store.connection() as conn:
            per_rule = await conn.fetch(
                "SELECT r AS rule, count(*) FILTER (WHERE kind = 'disputed') AS disputed, "
                "count(*) FILTER (WHERE kind = 'confirmed') AS confirmed "
                "FROM audit_feedback, unnest(rules) AS r GROUP BY r "
                "ORDER BY 2 DESC, 1 LIMIT 100"
            )
            recent = await conn.fetch(
                "SELECT event_id, verdict_event_id, who, why, correct_category, source, "
                "project, job_id, category, rules, recorded_at FROM audit_feedback "
                "WHERE kind = 'disputed' AND ($1::text IS NULL OR $1 = ANY(rules)) "
                "ORDER BY recorded_at DESC LIMIT $2",
                rule,
                limit,
            )
        items = []
        for r in recent:
            d = _row(r)
            d["rules"] = list(r["rules"] or [])
            items.append(d)
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
        }

    async def retry_summary(
        self, start: dt.datetime, end: dt.datetime, project: str | None = None
    ) -> dict[str, Any]:
        """Retries issued vs skipped (by reason) and how many retries passed, over a range
        (widened to whole UTC days: it reads the daily roll-up)."""
        start, end = floor_day(start), ceil_day(end)
        async with self.store.connection() as conn:
            rows = await conn.fetch(
                "SELECT kind, key, sum(n)::bigint AS n FROM audit_stats_daily "
                "WHERE kind = ANY($1::text[]) AND bucket >= $2 AND bucket < $3 "
                "AND ($4::text IS NULL OR project = $4) GROUP BY 1, 2 ORDER BY 1, 2",
                ["decision", "retry_outcome", "budget_exhausted"],
                start,
                end,
                project,
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
