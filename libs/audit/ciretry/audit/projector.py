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
import datetime as dt
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

from ciretry.common.bus import metadata_from_context
from ciretry.common.errors import is_transient
from ciretry.common.events import (
    EventDecodeError,
    MessageRejected,
    NewEvent,
    RecordedEvent,
    UnknownEventType,
    encode,
)
from ciretry.common.eventstore import Connection, EventStore, row_to_event
from ciretry.common.metrics import instruments
from ciretry.common.text import safe_text

from .projections import (
    JOB_COLUMNS,
    PIPELINE_COLUMNS,
    PIPELINE_COUNTERS,
    SUCCESS_STATUSES,
    Batch,
)

log = logging.getLogger(__name__)

DEFAULT_NAME: Final = "audit"
#: Read-model tables a rebuild truncates (never the log: it refuses TRUNCATE anyway).
READ_MODEL_TABLES: Final = (
    "audit_jobs", "audit_job_events", "audit_verdicts", "audit_pipelines", "audit_stats",
    "audit_retries", "audit_allocation", "audit_feedback", "audit_stats_daily", "audit_chains",
)  # fmt: skip
_RULE_SEP: Final = "\x1f"

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
    SELECT DISTINCT ON (r.idempotency_key) r.idempotency_key, u.job_id, u.passed
    FROM audit_retries r JOIN u
      ON r.source = u.source AND r.project = u.project AND r.pipeline_id = u.pipeline_id
     AND r.job_name = u.job_name AND r.order_key < u.order_key
    WHERE r.outcome IS NULL AND NOT r.dry_run
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


async def apply_batch(conn: Connection, b: Batch) -> None:
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
    if b.feedback:
        await conn.executemany(
            _FEEDBACK,
            [
                (f.event_id, f.verdict_event_id, f.kind, f.who, f.why, f.correct_category,
                 f.recorded_at, f.position)
                for f in b.feedback
            ],
        )  # fmt: skip


def _decode(rows: Sequence[Any]) -> list[RecordedEvent]:
    out = []
    for r in rows:
        try:
            out.append(row_to_event(r))
        except (UnknownEventType, EventDecodeError) as exc:
            # Written by a newer ciretry: skipping keeps the read models live; a rebuild after
            # the upgrade projects it.
            log.warning("projector skips event at position %s: %s", r[3], exc)
    return out


async def _apply_one_by_one(
    conn: Connection, events: Sequence[RecordedEvent]
) -> list[tuple[RecordedEvent, str]]:
    """Apply each event under its own savepoint; returns the ones that failed, with why."""
    poison: list[tuple[RecordedEvent, str]] = []
    for event in events:
        try:
            async with conn.transaction():
                batch = Batch()
                batch.add_event(event)
                await apply_batch(conn, batch)
        except Exception as exc:
            if is_transient(exc):
                raise
            poison.append((event, f"{type(exc).__name__}: {exc}"))
    return poison


class Projector:
    """Applies the log to the audit read models. ``run(stop)`` is a service worker."""

    def __init__(
        self,
        store: EventStore,
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
        async with self.store.connection() as conn:
            value = await conn.fetchval(
                "SELECT position FROM projection_position WHERE name = $1", self.name
            )
        return int(value or 0)

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
        async with self.store.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO projection_position (name) VALUES ($1) ON CONFLICT DO NOTHING",
                self.name,
            )
            position = await conn.fetchval(
                "SELECT position FROM projection_position WHERE name = $1 FOR UPDATE", self.name
            )
            rows = await conn.fetch(_READ, position, self.batch_size)
            if not rows:
                return 0
            events = _decode(rows)
            if isolate:
                poison = await _apply_one_by_one(conn, events)
                # Recorded before the position moves: a crash in between finds them again,
                # and the idempotency key stores each rejection once.
                await self._reject(poison)
            else:
                batch = Batch()
                for event in events:
                    batch.add_event(event)
                await apply_batch(conn, batch)
            await conn.execute(
                "UPDATE projection_position SET position = $2 WHERE name = $1",
                self.name,
                rows[-1][3],
            )
            return len(rows)

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
        await self.store.append_batch(new)
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
                n = await self.catch_up()
                delay = self.idle_interval
            except Exception:
                log.exception("projector %s failed; retrying", self.name)
                n = 0
                delay = min(max(delay * 2, 1.0), 30.0)
            if n == 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)


async def rebuild_projections(store: EventStore, *, name: str = DEFAULT_NAME) -> int:
    """Truncate the read models and project the whole log again (``ciretry replay
    --projections``). Returns the number of events projected."""
    async with store.connection() as conn, conn.transaction():
        # Identifiers come from the READ_MODEL_TABLES constant only.
        await conn.execute(f"TRUNCATE {', '.join(READ_MODEL_TABLES)}")
        await conn.execute(
            "INSERT INTO projection_position (name, position) VALUES ($1, 0) "
            "ON CONFLICT (name) DO UPDATE SET position = 0",
            name,
        )
    return await Projector(store, name=name).catch_up()


__all__ = ["Projector", "apply_batch", "rebuild_projections", "READ_MODEL_TABLES"]
