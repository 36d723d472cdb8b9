"""The audit read models on PostgreSQL: every SQL statement of ``ciretry.audit`` is here.

``AuditStore`` lives beside the event log in the same database and schema, on connections the
log lends it (``EventStore.connection()``, the one escape hatch of the log's private pool). The
read models are rows projected from the log, so their statements may join ``events`` by
position (a job's timeline, the projector's next batch) but never write to it; events are
appended through the log's port (``AuditStore.log``).

* The projector's side: ``projection(name)`` opens one transaction with the projection's
  position row locked (``ProjectionTx``: read the next events, apply a ``Batch``, savepoints for
  one event at a time, move the position); ``reset`` truncates the read models for a rebuild.
  A ``Batch`` becomes one parameterized statement per table (``unnest`` arrays), in the order
  ``projections`` documents (jobs before retries and outcomes, verdicts before feedback).
* The queries' side: rows as plain dicts (values as PostgreSQL returns them) for
  ``queries.Audit`` to shape into answers.

Identifiers in SQL text come from code constants only (column tuples of ``projections``,
``READ_MODEL_TABLES``, ``STATS_TABLES``); every value is a bind parameter
(tests/security/test_sql_parameterized.py).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Literal

from ciretry.common.eventlog import Undecodable
from ciretry.common.events import EventDecodeError, RecordedEvent, UnknownEventType
from ciretry.common.eventstore import Connection, EventStore, row_to_event

from .projections import (
    JOB_COLUMNS,
    PIPELINE_COLUMNS,
    PIPELINE_COUNTERS,
    SUCCESS_STATUSES,
    Batch,
)

#: Read-model tables a rebuild truncates (never the log: it refuses TRUNCATE anyway).
READ_MODEL_TABLES: Final = (
    "audit_jobs", "audit_job_events", "audit_verdicts", "audit_pipelines", "audit_stats",
    "audit_retries", "audit_allocation", "audit_feedback", "audit_stats_daily", "audit_chains",
    "audit_signatures", "audit_signature_jobs",
)  # fmt: skip
_RULE_SEP: Final = "\x1f"

#: A row of a read model: column name -> value as PostgreSQL returns it.
Row = dict[str, Any]
#: Columns whose value identifies a job's rows (``project_has``, ``project_candidates``).
IdColumn = Literal["job_id", "pipeline_id"]

# --- the projector's statements -------------------------------------------------------------

_READ = (
    "SELECT event_id, stream, stream_version, position, recorded_at, type, schema_version, "
    "body, metadata FROM events WHERE position > $1 ORDER BY position LIMIT $2"
)

_JOB_TYPES: Final = {
    "pipeline_id": "text", "job_name": "text", "order_key": "text", "status": "text",
    "stage": "text", "runner": "text", "ref": "text", "attempt": "int4",
    "failure_reason": "text", "exit_code": "int4", "finished_at": "timestamptz",
    "verdict_event_id": "uuid", "category": "text", "retryable": "bool", "budget": "text",
    "rules": "text", "decision": "text", "decision_action": "text", "decision_reason": "text",
    "decision_detail": "text", "dry_run": "bool", "retry_job_id": "text",
    "observed_memory_mb": "int4", "requested_memory_mb": "int4", "call_status": "text",
}  # fmt: skip
_PIPELINE_TYPES: Final = {
    "status": "text", "ref": "text", "sha": "text", "user": "text", "pipeline_retries": "int4",
    "pipeline_limit": "int4", "pipeline_jobs": "int4",
}  # fmt: skip


def _job_upsert() -> str:
    # Built once from the column constants above: no identifier comes from data.
    cols = list(JOB_COLUMNS)
    params = ", ".join(f"${i + 6}::{_JOB_TYPES[c]}[]" for i, c in enumerate(cols))
    select = ", ".join(
        f"string_to_array(u.{c}, chr(31))" if c == "rules" else f"u.{c}" for c in cols
    )
    sets = ", ".join(f'"{c}" = coalesce(excluded."{c}", audit_jobs."{c}")' for c in cols)
    names = ", ".join(f'"{c}"' for c in cols)
    return (
        f"INSERT INTO audit_jobs (source, project, job_id, first_position, last_position, {names}) "  # noqa: S608
        f"SELECT u.source, u.project, u.job_id, u.first_position, u.last_position, {select} "
        f"FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], {params}) "
        f"AS u(source, project, job_id, first_position, last_position, {', '.join(cols)}) "
        "ON CONFLICT (source, project, job_id) DO UPDATE SET "
        "first_position = least(audit_jobs.first_position, excluded.first_position), "
        f"last_position = greatest(audit_jobs.last_position, excluded.last_position), {sets}"
    )


def _pipeline_upsert() -> str:
    attrs = list(PIPELINE_COLUMNS)
    counters = list(PIPELINE_COUNTERS)
    n = 6
    attr_params = []
    for c in attrs:
        attr_params.append(f"${n}::{_PIPELINE_TYPES[c]}[]")
        n += 1
    counter_params = []
    for _ in counters:
        counter_params.append(f"${n}::int4[]")
        n += 1
    names = ", ".join(f'"{c}"' for c in attrs + counters)
    aliases = ", ".join(f"a_{c}" for c in attrs) + ", " + ", ".join(f"c_{c}" for c in counters)
    select = ", ".join(f"u.a_{c}" for c in attrs) + ", " + ", ".join(f"u.c_{c}" for c in counters)
    sets = ", ".join(f'"{c}" = coalesce(excluded."{c}", audit_pipelines."{c}")' for c in attrs)
    adds = ", ".join(f'"{c}" = audit_pipelines."{c}" + excluded."{c}"' for c in counters)
    return (
        f"INSERT INTO audit_pipelines (source, project, pipeline_id, first_seen, last_seen, {names}) "  # noqa: S608
        f"SELECT u.source, u.project, u.pipeline_id, u.first_seen, u.last_seen, {select} "
        "FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], "
        f"{', '.join(attr_params + counter_params)}) "
        f"AS u(source, project, pipeline_id, first_seen, last_seen, {aliases}) "
        "ON CONFLICT (source, project, pipeline_id) DO UPDATE SET "
        "first_seen = least(audit_pipelines.first_seen, excluded.first_seen), "
        f"last_seen = greatest(audit_pipelines.last_seen, excluded.last_seen), {sets}, {adds}"
    )


_JOB_UPSERT: Final = _job_upsert()
_PIPELINE_UPSERT: Final = _pipeline_upsert()

_LINKS = """
INSERT INTO audit_job_events (source, project, job_id, position)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[])
ON CONFLICT DO NOTHING
"""

_VERDICTS = """
INSERT INTO audit_verdicts (event_id, source, project, pipeline_id, job_id, job_name, category,
                            retryable, rules, recorded_at)
SELECT u.event_id, u.source, u.project, u.pipeline_id, u.job_id, u.job_name, u.category,
       u.retryable, string_to_array(u.rules, chr(31)), u.recorded_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::bool[], $9::text[], $10::timestamptz[])
     AS u(event_id, source, project, pipeline_id, job_id, job_name, category, retryable, rules,
          recorded_at)
ON CONFLICT DO NOTHING
"""

#: Hourly counts and their daily roll-up: every count goes to both (table names are constants).
STATS_TABLES: Final = {"hour": "audit_stats", "day": "audit_stats_daily"}

_STATS_SQL = """
INSERT INTO {table} (kind, bucket, source, project, key, n)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::int8[])
ON CONFLICT (kind, bucket, source, project, key) DO UPDATE SET n = {table}.n + excluded.n
"""
_STATS: Final = {unit: _STATS_SQL.format(table=t) for unit, t in STATS_TABLES.items()}

_STAT_ADD = """
, stat_hour AS (
    INSERT INTO audit_stats (kind, bucket, source, project, key, n)
    SELECT 'retry_outcome', date_trunc('hour', requested_at, 'UTC'), source, project, outcome,
           count(*)
    FROM {source} WHERE outcome IS NOT NULL GROUP BY 2, 3, 4, 5
    ON CONFLICT (kind, bucket, source, project, key) DO UPDATE SET n = audit_stats.n + excluded.n
)
INSERT INTO audit_stats_daily (kind, bucket, source, project, key, n)
SELECT 'retry_outcome', date_trunc('day', requested_at, 'UTC'), source, project, outcome, count(*)
FROM {source} WHERE outcome IS NOT NULL GROUP BY 2, 3, 4, 5
ON CONFLICT (kind, bucket, source, project, key) DO UPDATE SET n = audit_stats_daily.n + excluded.n
"""

# A retry whose next attempt is already projected (same batch, or the log had them out of
# order) gets its outcome at insert; otherwise _OUTCOMES settles it when that attempt finishes.
_RETRIES = """
WITH ins AS (
    INSERT INTO audit_retries (source, project, pipeline_id, job_id, job_name, order_key,
                               idempotency_key, action, category, dry_run, requested_at,
                               outcome, outcome_job_id, origin_pipeline_id)
    SELECT u.source, u.project, u.pipeline_id, u.job_id, u.job_name, u.order_key, u.ikey,
           u.action, u.category, u.dry_run, u.requested_at, nxt.outcome, nxt.job_id, u.origin
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::bool[], $11::timestamptz[], $13::text[])
         AS u(source, project, pipeline_id, job_id, job_name, order_key, ikey, action,
              category, dry_run, requested_at, origin)
    LEFT JOIN LATERAL (
        SELECT CASE WHEN lower(j.status) = ANY($12::text[]) THEN 'passed' ELSE 'failed' END
                   AS outcome,
               j.job_id
        FROM audit_jobs j
        WHERE NOT u.dry_run AND j.source = u.source AND j.project = u.project
          AND j.pipeline_id = u.pipeline_id AND j.job_name = u.job_name
          AND j.status IS NOT NULL AND j.order_key > u.order_key
        ORDER BY j.order_key LIMIT 1
    ) nxt ON true
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING source, project, outcome, requested_at
)
""" + _STAT_ADD.format(source="ins")  # noqa: S608 - constant SQL only

_OUTCOMES = """
WITH u AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::bool[])
           AS u(source, project, pipeline_id, job_name, job_id, order_key, passed)
), m AS (
    -- One probe of the open retries' index per job (OFFSET 0 keeps the LATERAL subquery from
    -- being flattened into a join the planner may turn around): the plan cached while the table
    -- was small compared every open retry with every job of the batch, 100k comparisons and
    -- ~50 ms a batch once a thousand retries were open (bench/e2e.py).
    SELECT DISTINCT ON (r.idempotency_key) r.idempotency_key, u.job_id, u.passed
    FROM u CROSS JOIN LATERAL (
        SELECT x.idempotency_key FROM audit_retries x
        WHERE x.source = u.source AND x.project = u.project AND x.pipeline_id = u.pipeline_id
          AND x.job_name = u.job_name AND x.outcome IS NULL AND x.order_key < u.order_key
          AND NOT x.dry_run
        OFFSET 0
    ) r
    ORDER BY r.idempotency_key, u.order_key
), upd AS (
    UPDATE audit_retries r
    SET outcome = CASE WHEN m.passed THEN 'passed' ELSE 'failed' END, outcome_job_id = m.job_id
    FROM m WHERE r.idempotency_key = m.idempotency_key
    RETURNING r.source, r.project, r.outcome, r.requested_at
)
""" + _STAT_ADD.format(source="upd")  # noqa: S608 - constant SQL only

# After the retries: a link names the request that created its pipeline, whose chain it joins.
_CHAINS = """
INSERT INTO audit_chains AS c (source, project, pipeline_id, origin_pipeline_id, asked_memory_mb)
SELECT u.source, u.project, u.pipeline_id,
       coalesce(u.origin,
                (SELECT coalesce(r.origin_pipeline_id, r.pipeline_id) FROM audit_retries r
                 WHERE r.idempotency_key = u.retry_of),
                u.pipeline_id),
       u.asked
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[])
     AS u(source, project, pipeline_id, origin, retry_of, asked)
ON CONFLICT (source, project, pipeline_id) DO UPDATE SET
    origin_pipeline_id = CASE WHEN excluded.origin_pipeline_id <> excluded.pipeline_id
                              THEN excluded.origin_pipeline_id ELSE c.origin_pipeline_id END,
    asked_memory_mb = coalesce(excluded.asked_memory_mb, c.asked_memory_mb)
"""

# One row at a time, in log order: two changes of one (project, job name) in a batch must both
# apply, which one multi-row upsert cannot do. They are rare (OOMs and OOM reruns).
_ALLOCATION = """
INSERT INTO audit_allocation AS a (source, project, job_name, ref, memory_request_mb,
                                   memory_limit_mb, cpu_request_millis, cpu_limit_millis,
                                   last_oom_at, last_oom_job_id, updated_at)
SELECT $1, $2, $3,
       coalesce((SELECT ref FROM audit_jobs WHERE source = $1 AND project = $2 AND job_id = $4), ''),
       $5, $6, $7, $8,
       CASE WHEN $9 THEN $10::timestamptz END, CASE WHEN $9 THEN $4 END, $10
ON CONFLICT (project, job_name, ref, source) DO UPDATE SET
    memory_request_mb = coalesce(excluded.memory_request_mb, a.memory_request_mb),
    memory_limit_mb = coalesce(excluded.memory_limit_mb, a.memory_limit_mb),
    cpu_request_millis = coalesce(excluded.cpu_request_millis, a.cpu_request_millis),
    cpu_limit_millis = coalesce(excluded.cpu_limit_millis, a.cpu_limit_millis),
    last_oom_at = coalesce(excluded.last_oom_at, a.last_oom_at),
    last_oom_job_id = coalesce(excluded.last_oom_job_id, a.last_oom_job_id),
    updated_at = greatest(a.updated_at, excluded.updated_at)
"""

# Feedback copies the verdict's job and rules (so disputes count per rule) and links the event
# into the job's timeline.
_FEEDBACK = """
WITH v AS (
    SELECT source, project, job_id, category, rules FROM audit_verdicts WHERE event_id = $2
), ins AS (
    INSERT INTO audit_feedback (event_id, verdict_event_id, kind, who, why, correct_category,
                                source, project, job_id, category, rules, recorded_at)
    SELECT $1, $2, $3, $4, $5, $6, v.source, v.project, v.job_id, v.category,
           coalesce(v.rules, '{}'), $7
    FROM (SELECT 1) AS one LEFT JOIN v ON true
    ON CONFLICT DO NOTHING
    RETURNING source, project, job_id, rules
), link AS (
    INSERT INTO audit_job_events (source, project, job_id, position)
    SELECT source, project, job_id, $8 FROM ins WHERE job_id IS NOT NULL
    ON CONFLICT DO NOTHING
), stat_hour AS (
    INSERT INTO audit_stats (kind, bucket, source, project, key, n)
    SELECT DISTINCT $3, date_trunc('hour', $7::timestamptz, 'UTC'), ins.source, ins.project, r, 1
    FROM ins, unnest(ins.rules) AS r
    WHERE ins.source IS NOT NULL
    ON CONFLICT (kind, bucket, source, project, key) DO UPDATE SET n = audit_stats.n + excluded.n
)
INSERT INTO audit_stats_daily (kind, bucket, source, project, key, n)
SELECT DISTINCT $3, date_trunc('day', $7::timestamptz, 'UTC'), ins.source, ins.project, r, 1
FROM ins, unnest(ins.rules) AS r
WHERE ins.source IS NOT NULL
ON CONFLICT (kind, bucket, source, project, key) DO UPDATE SET n = audit_stats_daily.n + excluded.n
"""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    cols: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for i, value in enumerate(row):
            cols[i].append(value)
    return cols


async def _apply(conn: Connection, b: Batch) -> None:
    """Apply a batch's changes; the caller owns the transaction. Order matters: see module doc
    of projections (jobs before retries and outcomes, verdicts before feedback)."""
    rows: list[Sequence[Any]]
    if b.jobs:
        rows = []
        for key, fields in b.jobs.items():
            first, last = b.job_positions[key]
            values = [
                _RULE_SEP.join(fields["rules"]) if c == "rules" and c in fields
                else fields.get(c)
                for c in JOB_COLUMNS
            ]  # fmt: skip
            rows.append([*key, first, last, *values])
        await conn.execute(_JOB_UPSERT, *_columns(rows, 5 + len(JOB_COLUMNS)))
    if b.links:
        rows = [(*link.key, link.position) for link in b.links]
        await conn.execute(_LINKS, *_columns(rows, 4))
    if b.verdicts:
        rows = [
            (v.event_id, v.source, v.project, v.pipeline_id, v.job_id, v.job_name, v.category,
             v.retryable, _RULE_SEP.join(v.rules), v.recorded_at)
            for v in b.verdicts
        ]  # fmt: skip
        await conn.execute(_VERDICTS, *_columns(rows, 10))
    keys = set(b.pipelines) | {k for k, _ in b.pipeline_counts}
    if keys:
        rows = []
        for pkey in keys:
            attrs = b.pipelines.get(pkey, {})
            seen_first, seen_last = b.pipeline_seen[pkey]
            rows.append(
                [*pkey, seen_first, seen_last, *(attrs.get(c) for c in PIPELINE_COLUMNS),
                 *(b.pipeline_counts.get((pkey, c), 0) for c in PIPELINE_COUNTERS)]
            )  # fmt: skip
        await conn.execute(
            _PIPELINE_UPSERT, *_columns(rows, 5 + len(PIPELINE_COLUMNS) + len(PIPELINE_COUNTERS))
        )
    if b.stats:
        rows = [(*k, n) for k, n in b.stats.items()]
        await conn.execute(_STATS["hour"], *_columns(rows, 6))
        daily: Counter[tuple[str, dt.datetime, str, str, str]] = Counter()
        for (kind, bucket, source, project, stat_key), n in b.stats.items():
            daily[(kind, bucket.replace(hour=0), source, project, stat_key)] += n
        rows = [(*k, n) for k, n in daily.items()]
        await conn.execute(_STATS["day"], *_columns(rows, 6))
    success = sorted(SUCCESS_STATUSES)
    if b.retries:
        rows = [
            (r.source, r.project, r.pipeline_id, r.job_id, r.job_name, r.order_key,
             r.idempotency_key, r.action, r.category, r.dry_run, r.requested_at)
            for r in b.retries
        ]  # fmt: skip
        origins = [r.origin_pipeline_id for r in b.retries]
        await conn.execute(_RETRIES, *_columns(rows, 11), success, origins)
    if b.chains:
        rows = [
            (c.source, c.project, c.pipeline_id, c.origin_pipeline_id, c.retry_of,
             c.asked_memory_mb)
            for c in b.chains.values()
        ]  # fmt: skip
        await conn.execute(_CHAINS, *_columns(rows, 6))
    if b.attempts:
        rows = [
            (a.source, a.project, a.pipeline_id, a.job_name, a.job_id, a.order_key, a.passed)
            for a in b.attempts
        ]
        await conn.execute(_OUTCOMES, *_columns(rows, 7))
    if b.allocations:
        await conn.executemany(
            _ALLOCATION,
            [
                (a.source, a.project, a.job_name, a.job_id, a.memory_request_mb,
                 a.memory_limit_mb, a.cpu_request_millis, a.cpu_limit_millis, a.oom, a.at)
                for a in b.allocations
            ],
        )  # fmt: skip
    await _apply_signatures(conn, b)
    if b.feedback:
        await conn.executemany(
            _FEEDBACK,
            [
                (f.event_id, f.verdict_event_id, f.kind, f.who, f.why, f.correct_category,
                 f.recorded_at, f.position)
                for f in b.feedback
            ],
        )  # fmt: skip


_SIGNATURES: Final = """
INSERT INTO audit_signatures AS s (signature, algorithm, text, examples, first_seen, last_seen)
SELECT signature, algorithm, text, examples, first_seen, last_seen
FROM jsonb_to_recordset($1::jsonb) AS r(signature text, algorithm text, text text,
     examples text[], first_seen timestamptz, last_seen timestamptz)
ON CONFLICT (signature) DO UPDATE SET
    first_seen = least(s.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(s.last_seen, EXCLUDED.last_seen),
    examples = CASE WHEN EXCLUDED.last_seen > s.last_seen THEN EXCLUDED.examples
                    ELSE s.examples END
"""
_SIGNATURE_JOBS: Final = """
INSERT INTO audit_signature_jobs (verdict_event_id, signature, source, project, pipeline_id,
    job_id, job_name, category, retryable, learned, recorded_at, rule)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::bool[], $10::bool[], $11::timestamptz[], $12::text[])
ON CONFLICT (verdict_event_id) DO NOTHING
"""
_SIGNATURE_OUTCOMES: Final = """
UPDATE audit_signature_jobs j SET outcome = o.outcome
FROM unnest($1::uuid[], $2::text[]) AS o(verdict_event_id, outcome)
WHERE j.verdict_event_id = o.verdict_event_id
"""


async def _apply_signatures(conn: Connection, b: Batch) -> None:
    """Failure clusters: signatures, their jobs, then outcomes (an outcome follows its verdict
    in the log, so in a batch its row is inserted first)."""
    if b.signatures:
        texts: dict[str, dict[str, Any]] = {}
        for r in b.signatures:  # one row per signature: a multi-row upsert touches a row once
            seen = r.recorded_at.isoformat()
            t = texts.setdefault(r.signature, {"signature": r.signature, "algorithm": r.algorithm,
                                               "text": r.text, "first_seen": seen})  # fmt: skip
            t["examples"], t["last_seen"] = list(r.examples), seen
        await conn.execute(_SIGNATURES, json.dumps(list(texts.values())))
        rows = [
            (r.event_id, r.signature, r.source, r.project, r.pipeline_id, r.job_id, r.job_name,
             r.category, r.retryable, r.learned, r.recorded_at, r.rule)
            for r in b.signatures
        ]  # fmt: skip
        await conn.execute(_SIGNATURE_JOBS, *_columns(rows, 12))
    if b.signature_outcomes:
        outcomes: list[Sequence[Any]] = [
            (o.verdict_event_id, o.outcome) for o in b.signature_outcomes
        ]
        await conn.execute(_SIGNATURE_OUTCOMES, *_columns(outcomes, 2))


_CLUSTERS: Final = """
WITH members AS (
    SELECT s.*, j.runner, p.sha, p."user"
    FROM audit_signature_jobs s
    LEFT JOIN audit_jobs j
           ON (j.source, j.project, j.job_id) = (s.source, s.project, s.job_id)
    LEFT JOIN audit_pipelines p
           ON (p.source, p.project, p.pipeline_id) = (s.source, s.project, s.pipeline_id)
    WHERE s.recorded_at >= $1 AND s.recorded_at < $2
      AND ($3::text IS NULL OR s.project = $3)
      AND (NOT $4 OR s.category IN ('unknown', 'learned_spurious'))
)
SELECT m.signature, t.algorithm, t.text, t.examples, t.first_seen, t.last_seen,
       count(*)::int AS jobs,
       count(DISTINCT (m.source, m.project, m.pipeline_id))::int AS pipelines,
       count(DISTINCT m.sha)::int AS commits,
       count(DISTINCT m."user")::int AS people,
       count(*) FILTER (WHERE m.recorded_at >= $2 - interval '1 day')::int AS jobs_1d,
       count(*) FILTER (WHERE m.recorded_at >= $2 - interval '7 days')::int AS jobs_7d,
       count(*) FILTER (WHERE m.recorded_at >= $2 - interval '30 days')::int AS jobs_30d,
       count(*) FILTER (WHERE m.outcome = 'passed_on_retry')::int AS passed_on_retry,
       count(*) FILTER (WHERE m.outcome = 'failed_again_same')::int AS failed_again_same,
       count(*) FILTER (WHERE m.outcome = 'failed_differently')::int AS failed_differently,
       count(*) FILTER (WHERE m.outcome = 'never_retried')::int AS never_retried,
       count(*) FILTER (WHERE m.learned)::int AS learned,
       (array_agg(DISTINCT m.category))::text[] AS categories,
       (SELECT array_agg(x) FROM (SELECT job_name AS x FROM members i
            WHERE i.signature = m.signature GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 3) a)
            AS top_jobs,
       (SELECT array_agg(x) FROM (SELECT runner AS x FROM members i
            WHERE i.signature = m.signature AND runner IS NOT NULL
            GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 3) a) AS top_runners,
       (SELECT array_agg(x) FROM (SELECT project AS x FROM members i
            WHERE i.signature = m.signature GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 3) a)
            AS top_projects
FROM members m JOIN audit_signatures t USING (signature)
GROUP BY m.signature, t.algorithm, t.text, t.examples, t.first_seen, t.last_seen
ORDER BY pipelines DESC, jobs DESC, m.signature
LIMIT $5
"""


#: What ``outcomes`` groups by: code constants only (the SQL is built from these).
OUTCOME_DIMENSIONS: Final = {
    "none": "''", "project": "s.project", "runner": "coalesce(j.runner, '')",
    "job": "s.job_name", "signature": "s.signature",
}  # fmt: skip
_OUTCOMES_TEMPLATE: Final = """
SELECT coalesce(s.rule, '') AS rule, {dim} AS key, count(*)::int AS failures,
       count(*) FILTER (WHERE s.outcome = 'passed_on_retry')::int AS passed_on_retry,
       count(*) FILTER (WHERE s.outcome = 'failed_again_same')::int AS failed_again_same,
       count(*) FILTER (WHERE s.outcome = 'failed_differently')::int AS failed_differently,
       count(*) FILTER (WHERE s.outcome = 'never_retried')::int AS never_retried
FROM audit_signature_jobs s
LEFT JOIN audit_jobs j ON (j.source, j.project, j.job_id) = (s.source, s.project, s.job_id)
WHERE s.recorded_at >= $1 AND s.recorded_at < $2 AND ($3::text IS NULL OR s.project = $3)
  AND s.category <> 'cancelled'
GROUP BY 1, 2 ORDER BY failures DESC, 1, 2 LIMIT $4
"""
_OUTCOMES_BY: Final = {k: _OUTCOMES_TEMPLATE.format(dim=v) for k, v in OUTCOME_DIMENSIONS.items()}


# --- the queries' statements ----------------------------------------------------------------

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
_STATS_QUERY: Final = {unit: _STATS_TEMPLATE.format(table=t) for unit, t in STATS_TABLES.items()}

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

_JOB_FIELDS: Final = (
    "source, project, job_id, pipeline_id, job_name, status, stage, runner, ref, attempt, "
    "failure_reason, exit_code, finished_at, verdict_event_id, category, retryable, budget, "
    "rules, decision, decision_action, decision_reason, decision_detail, dry_run, retry_job_id, "
    "call_status"
)

#: ``project_has``'s lookups, by the id column a request names.
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

_TIMELINE: Final = (
    f"SELECT {_EVENT_COLS} FROM audit_job_events j "  # noqa: S608 - constant columns
    "JOIN events e ON e.position = j.position "
    "WHERE j.source = $1 AND j.project = $2 AND j.job_id = $3 ORDER BY e.position"
)
_LATEST_RETRY: Final = (
    "SELECT outcome, outcome_job_id FROM audit_retries "
    "WHERE source = $1 AND project = $2 AND job_id = $3 AND NOT dry_run "
    "ORDER BY requested_at DESC LIMIT 1"
)
_VERDICT_JOB: Final = "SELECT source, project, job_id FROM audit_verdicts WHERE event_id = $1"
_JOB: Final = (
    f"SELECT {_JOB_FIELDS} FROM audit_jobs "  # noqa: S608 - constant columns
    "WHERE source = $1 AND project = $2 AND job_id = $3"
)
_PIPELINE: Final = (
    "SELECT * FROM audit_pipelines WHERE source = $1 AND project = $2 AND pipeline_id = $3"
)
_PIPELINE_JOBS: Final = (
    f"SELECT {_JOB_FIELDS} FROM audit_jobs "  # noqa: S608 - constant columns
    "WHERE source = $1 AND project = $2 AND pipeline_id = $3 "
    "ORDER BY job_name, order_key, job_id LIMIT $4 OFFSET $5"
)
_PIPELINE_RETRIES: Final = (
    "SELECT job_id, job_name, action, category, dry_run, outcome, outcome_job_id "
    "FROM audit_retries WHERE source = $1 AND project = $2 AND pipeline_id = $3 "
    "ORDER BY requested_at LIMIT $4"
)
_EVENTS: Final = (
    f"SELECT {_EVENT_COLS} FROM events e WHERE e.position > $1 "  # noqa: S608
    "AND ($2::text IS NULL OR e.stream = $2) "
    "AND (cardinality($3::text[]) = 0 OR e.type = ANY($3::text[])) "
    "AND ($4::timestamptz IS NULL OR e.recorded_at >= $4) "
    "AND ($5::timestamptz IS NULL OR e.recorded_at < $5) "
    "ORDER BY e.position LIMIT $6"
)
_ALLOCATION_OF: Final = (
    "SELECT * FROM audit_allocation WHERE project = $1 AND job_name = $2 "
    "ORDER BY (ref = coalesce($3, '')) DESC, updated_at DESC LIMIT 1"
)
_FEEDBACK_PER_RULE: Final = (
    "SELECT r AS rule, count(*) FILTER (WHERE kind = 'disputed') AS disputed, "
    "count(*) FILTER (WHERE kind = 'confirmed') AS confirmed "
    "FROM audit_feedback, unnest(rules) AS r GROUP BY r "
    "ORDER BY 2 DESC, 1 LIMIT 100"
)
_DISPUTES: Final = (
    "SELECT event_id, verdict_event_id, who, why, correct_category, source, "
    "project, job_id, category, rules, recorded_at FROM audit_feedback "
    "WHERE kind = 'disputed' AND ($1::text IS NULL OR $1 = ANY(rules)) "
    "AND ($3::timestamptz IS NULL OR (recorded_at, event_id) < ($3, $4::uuid)) "
    "ORDER BY recorded_at DESC, event_id DESC LIMIT $2"
)
_DAILY_COUNTS: Final = (
    "SELECT kind, key, sum(n)::bigint AS n FROM audit_stats_daily "
    "WHERE kind = ANY($1::text[]) AND bucket >= $2 AND bucket < $3 "
    "AND ($4::text IS NULL OR project = $4) GROUP BY 1, 2 ORDER BY 1, 2"
)
_EXHAUSTED_PIPELINES: Final = (
    "SELECT source, project, pipeline_id, pipeline_retries, pipeline_limit, "
    "pipeline_jobs, budget_exhausted FROM audit_pipelines "
    "WHERE budget_exhausted > 0 AND last_seen >= $1 "
    "AND ($2::text IS NULL OR project = $2) ORDER BY last_seen DESC LIMIT 20"
)
_RECENT_FAILED_JOBS: Final = (
    "SELECT source, project, job_id, job_name, category, decision, decision_reason, "
    "decision_action, call_status FROM audit_jobs WHERE verdict_event_id IS NOT NULL "
    "AND ($1::text IS NULL OR project = $1) "
    "ORDER BY last_position DESC LIMIT 25"
)
_JOBS_WITH_ID: Final = (
    "SELECT source, project, job_id, job_name FROM audit_jobs WHERE job_id = $1 "
    "ORDER BY source, project LIMIT 50"
)

_POSITION: Final = "SELECT position FROM projection_position WHERE name = $1"
_POSITION_ROW: Final = "INSERT INTO projection_position (name) VALUES ($1) ON CONFLICT DO NOTHING"
_LOCK_POSITION: Final = "SELECT position FROM projection_position WHERE name = $1 FOR UPDATE"
_MOVE_POSITION: Final = "UPDATE projection_position SET position = $2 WHERE name = $1"
_RESET_POSITION: Final = (
    "INSERT INTO projection_position (name, position) VALUES ($1, 0) "
    "ON CONFLICT (name) DO UPDATE SET position = 0"
)
# Identifiers come from the READ_MODEL_TABLES constant only.
_TRUNCATE: Final = f"TRUNCATE {', '.join(READ_MODEL_TABLES)}"


def _decoded(row: Any) -> RecordedEvent | Undecodable:
    try:
        return row_to_event(row)
    except (UnknownEventType, EventDecodeError) as exc:
        return Undecodable(int(row[3]), exc)


class ProjectionTx:
    """One projector transaction, with the projection's position row locked until it ends."""

    def __init__(self, conn: Connection, name: str, position: int) -> None:
        self._conn = conn
        self.name = name
        #: The position the projection had applied when the transaction began.
        self.position = position

    async def read(self, limit: int) -> list[RecordedEvent | Undecodable]:
        """The next ``limit`` events after ``position``, in log order; one this code cannot
        decode (a newer writer's type) comes back as ``Undecodable`` in its place."""
        return [_decoded(row) for row in await self._conn.fetch(_READ, self.position, limit)]

    async def apply(self, batch: Batch) -> None:
        await _apply(self._conn, batch)

    def savepoint(self) -> AbstractAsyncContextManager[Any]:
        """A nested transaction: an exception in the block rolls back the block only."""
        return self._conn.transaction()

    async def advance(self, position: int) -> None:
        """Move the projection to ``position`` (committed with the changes applied)."""
        await self._conn.execute(_MOVE_POSITION, self.name, position)
        self.position = position


class AuditStore:
    """The audit read models of one deployment, beside its event log ``log``."""

    def __init__(self, log: EventStore) -> None:
        self.log = log

    # --- the projector's side ---------------------------------------------------------------

    async def position(self, name: str) -> int:
        """The last position projection ``name`` applied (0 before its first batch)."""
        async with self.log.connection() as conn:
            value = await conn.fetchval(_POSITION, name)
        return int(value or 0)

    @asynccontextmanager
    async def projection(self, name: str) -> AsyncIterator[ProjectionTx]:
        """A transaction on projection ``name``'s position row, locked (``FOR UPDATE``): a
        second projector waits here until the first commits. Commits when the block exits,
        rolls everything back (changes and position) when it raises."""
        async with self.log.connection() as conn, conn.transaction():
            await conn.execute(_POSITION_ROW, name)
            position = await conn.fetchval(_LOCK_POSITION, name)
            yield ProjectionTx(conn, name, int(position))

    async def reset(self, name: str) -> None:
        """Empty every read model and set projection ``name`` back to position 0 (a rebuild)."""
        async with self.log.connection() as conn, conn.transaction():
            await conn.execute(_TRUNCATE)
            await conn.execute(_RESET_POSITION, name)

    # --- the queries' side ------------------------------------------------------------------

    async def project_has(self, column: IdColumn, source: str, project: str, value: str) -> bool:
        """Is there a job of ``project`` whose ``column`` is ``value``?"""
        async with self.log.connection() as conn:
            return bool(await conn.fetchval(_KEYED[column], source, project, value))

    async def project_candidates(self, column: IdColumn, source: str, value: str) -> list[Row]:
        """Projects (with one of their job ids) that have a job whose ``column`` is ``value``."""
        return await self._fetch(_CANDIDATES[column], source, value)

    async def timeline(self, source: str, project: str, job_id: str) -> list[RecordedEvent]:
        """Every event of the job's timeline, in log order."""
        async with self.log.connection() as conn:
            rows = await conn.fetch(_TIMELINE, source, project, job_id)
        return [row_to_event(r) for r in rows]

    async def latest_retry(self, source: str, project: str, job_id: str) -> Row | None:
        """The job's latest (not dry-run) retry: its outcome and the attempt that settled it."""
        return await self._fetchrow(_LATEST_RETRY, source, project, job_id)

    async def job(self, source: str, project: str, job_id: str) -> Row | None:
        return await self._fetchrow(_JOB, source, project, job_id)

    async def verdict_job(self, verdict_id: uuid.UUID) -> tuple[str, str, str] | None:
        """The job a verdict is about, once projected."""
        row = await self._fetchrow(_VERDICT_JOB, verdict_id)
        return None if row is None else (row["source"], row["project"], row["job_id"])

    async def chain(self, source: str, project: str, job_id: str) -> list[Row]:
        """Every attempt of the job's attempt chain (``_CHAIN``)."""
        return await self._fetch(_CHAIN, source, project, job_id)

    async def pipeline(
        self,
        source: str,
        project: str,
        pipeline_id: str,
        *,
        limit: int,
        offset: int = 0,
        retries: int,
    ) -> tuple[Row, list[Row], list[Row]] | None:
        """The pipeline's row, ``limit`` of its jobs after ``offset`` and the first ``retries``
        of its retries (None for an unknown pipeline)."""
        async with self.log.connection() as conn:
            row = await conn.fetchrow(_PIPELINE, source, project, pipeline_id)
            if row is None:
                return None
            jobs = await conn.fetch(_PIPELINE_JOBS, source, project, pipeline_id, limit, offset)
            retry_rows = await conn.fetch(
                _PIPELINE_RETRIES, source, project, pipeline_id, retries
            )
        return dict(row), [dict(r) for r in jobs], [dict(r) for r in retry_rows]

    async def stats(
        self,
        unit: Literal["hour", "day"],
        *,
        bucket: dt.timedelta,
        metric: str,
        start: dt.datetime,
        end: dt.datetime,
        project: str | None,
        source: str | None,
    ) -> list[Row]:
        """Counts of ``metric`` per ``bucket`` and key (rows ``t``, ``key``, ``n``), from the
        hourly counts or their daily roll-up (``unit``)."""
        return await self._aggregate(
            _STATS_QUERY[unit], bucket, metric, start, end, project, source
        )

    async def daily_counts(
        self, kinds: Sequence[str], start: dt.datetime, end: dt.datetime, project: str | None
    ) -> list[Row]:
        """Totals per (kind, key) of the daily roll-up over whole UTC days."""
        return await self._aggregate(_DAILY_COUNTS, list(kinds), start, end, project)

    async def events(
        self,
        *,
        after: int,
        stream: str | None,
        types: Sequence[str],
        start: dt.datetime | None,
        end: dt.datetime | None,
        limit: int,
    ) -> list[RecordedEvent]:
        """Events after position ``after`` matching the filters, in log order."""
        async with self.log.connection() as conn:
            rows = await conn.fetch(_EVENTS, after, stream, list(types), start, end, limit)
        return [row_to_event(r) for r in rows]

    async def allocation(self, project: str, job_name: str, ref: str | None) -> Row | None:
        """The row for ``ref`` if there is one, else the project + job name's latest."""
        return await self._fetchrow(_ALLOCATION_OF, project, job_name, ref)

    async def clusters(
        self,
        since: dt.datetime,
        until: dt.datetime,
        project: str | None,
        unexplained: bool,
        limit: int,
    ) -> list[Row]:
        """Failures grouped by signature, most pipelines first (``_CLUSTERS``)."""
        return await self._aggregate(_CLUSTERS, since, until, project, unexplained, limit)

    async def outcomes(
        self,
        since: dt.datetime,
        until: dt.datetime,
        by: str,
        project: str | None,
        limit: int,
    ) -> list[Row]:
        """Outcomes of failures per deciding rule and ``by`` (a key of OUTCOME_DIMENSIONS)."""
        return await self._aggregate(_OUTCOMES_BY[by], since, until, project, limit)

    async def feedback_per_rule(self) -> list[Row]:
        return await self._aggregate(_FEEDBACK_PER_RULE)

    async def disputes(
        self, rule: str | None, limit: int, before: tuple[dt.datetime, uuid.UUID] | None = None
    ) -> list[Row]:
        """The latest disputes (of ``rule``'s verdicts only, when given), older than ``before``
        (recorded at, event id) when given."""
        at, event_id = before if before is not None else (None, None)
        return await self._fetch(_DISPUTES, rule, limit, at, event_id)

    async def exhausted_pipelines(self, since: dt.datetime, project: str | None) -> list[Row]:
        """Pipelines seen since ``since`` whose budget ran out, latest first."""
        return await self._fetch(_EXHAUSTED_PIPELINES, since, project)

    async def recent_failed_jobs(self, project: str | None) -> list[Row]:
        """The latest classified failures."""
        return await self._fetch(_RECENT_FAILED_JOBS, project)

    async def jobs_with_id(self, job_id: str) -> list[Row]:
        """Jobs of any source and project with this id."""
        return await self._fetch(_JOBS_WITH_ID, job_id)

    async def _fetch(self, query: str, *args: Any) -> list[Row]:
        async with self.log.connection() as conn:
            return [dict(r) for r in await conn.fetch(query, *args)]

    async def _aggregate(self, query: str, *args: Any) -> list[Row]:
        """A dashboard's aggregate over a time range, which may rightly scan a read model: with
        the planner's default, as a service's sessions look rows up by index only
        (``EventStore.connect(key_lookups=True)``; this store shares ingest's pool)."""
        async with self.log.connection() as conn, conn.transaction(readonly=True):
            await conn.execute("SET LOCAL enable_seqscan = on")
            return [dict(r) for r in await conn.fetch(query, *args)]

    async def _fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self.log.connection() as conn:
            row = await conn.fetchrow(query, *args)
        return None if row is None else dict(row)


__all__ = ["READ_MODEL_TABLES", "STATS_TABLES", "AuditStore", "ProjectionTx", "Row"]
