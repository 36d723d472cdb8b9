"""Audit stats over 1M events: projected read models vs computing from the events table.

Writes ~1M realistic events (pipelines of 20 jobs; a fifth fail and get a verdict, a decision,
and for retries an issue and a next attempt) spread over 30 days with COPY into a fresh schema,
projects them with the audit projector, then times the dashboard's stats queries (median of
several runs) and the same numbers computed directly from the events table.
Last line: ``BENCH {"stats_ms": …, "direct_ms": …, "ratio": direct/stats, "events": …}``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ciretry.audit.projector import Projector  # noqa: E402
from ciretry.audit.queries import Audit  # noqa: E402
from ciretry.audit.store import AuditStore  # noqa: E402
from ciretry.common.events import (  # noqa: E402
    BudgetSnapshot,
    Event,
    Evidence,
    JobFinished,
    Metadata,
    Resources,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
    encode,
    job_stream,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore  # noqa: E402
from tests.support.servers import servers  # noqa: E402

TARGET = 1_000_000
DAYS = 30
RUNS = 7
CATEGORIES = [("oom", True, "rerun_with_resources"), ("preempted", True, "retry_job"),
              ("infra_network", True, "retry_job"), ("flaky_test", True, "retry_job"),
              ("deterministic", False, "none"), ("timeout", True, "retry_job"),
              ("unknown", False, "none")]  # fmt: skip
RULES = [f"rule.{i:02d}" for i in range(40)]
SKIPS = ["not_retryable", "job_budget_exhausted", "pipeline_budget_exhausted", "dry_run"]


def generate(now: dt.datetime) -> list[tuple[object, ...]]:
    rng = random.Random(6)
    rows: list[tuple[object, ...]] = []
    versions: dict[str, int] = {}
    start = now - dt.timedelta(days=DAYS)
    meta = encode(Metadata())
    p = 0
    while len(rows) < TARGET:
        p += 1
        project = f"group/project-{p % 50}"
        pipeline = str(100_000 + p)
        at = start + dt.timedelta(seconds=rng.uniform(0, DAYS * 86400 - 3600))

        def add(stream: str, data: Event, t: dt.datetime) -> None:
            v = versions[stream] = versions.get(stream, 0) + 1
            rows.append((uuid.uuid4(), stream, v, data.type_name(), data.schema_version,
                         encode(data), meta, None, t))  # fmt: skip

        pstream = pipeline_stream("gitlab", project, pipeline)
        for j in range(20):
            job_id = str(p * 100 + j)
            name = f"job-{j}"
            failed = rng.random() < 0.2
            t = at + dt.timedelta(seconds=j * 10)
            runner = f"runner-{rng.randrange(30)}"
            add(pstream, JobFinished(source="gitlab", project=project, pipeline_id=pipeline,
                                     job_id=job_id, job_name=name, runner=runner, ref="main",
                                     status="failed" if failed else "success"), t)  # fmt: skip
            if not failed:
                continue
            cat, retryable, action = rng.choice(CATEGORIES)
            rules = tuple(rng.sample(RULES, 2))
            v = VerdictReached(source="gitlab", project=project, pipeline_id=pipeline,
                               job_id=job_id, job_name=name, category=cat,  # type: ignore[arg-type]
                               retryable=retryable, budget="system", action=action,  # type: ignore[arg-type]
                               confidence=0.9, rules=rules,
                               evidence=(Evidence(rule=rules[0], line=10, text="x"),),
                               signals={"status": "failed"})  # fmt: skip
            add(job_stream("gitlab", project, job_id), v, t + dt.timedelta(seconds=2))
            snap = BudgetSnapshot(job_attempts=0, job_limit=2, pipeline_retries=1,
                                  pipeline_limit=3, pipeline_jobs=20)  # fmt: skip
            t3 = t + dt.timedelta(seconds=3)
            if retryable and rng.random() < 0.7:
                key = f"act:gitlab:{project}:{job_id}:{action}"
                res = (
                    Resources(memory_request_mb=4096, memory_limit_mb=4096)
                    if cat == "oom"
                    else None
                )
                add(pstream, RetryRequested(source="gitlab", project=project,
                                            pipeline_id=pipeline, job_id=job_id, job_name=name,
                                            action=action, idempotency_key=key,  # type: ignore[arg-type]
                                            category=cat, budget="system", snapshot=snap,  # type: ignore[arg-type]
                                            resources=res), t3)  # fmt: skip
                new_id = str(p * 100 + 50 + j)
                add(pstream, RetryIssued(source="gitlab", project=project, pipeline_id=pipeline,
                                         job_id=job_id, idempotency_key=key,
                                         new_job_id=new_id), t3)  # fmt: skip
                add(pstream, JobFinished(source="gitlab", project=project, pipeline_id=pipeline,
                                         job_id=new_id, job_name=name, runner=runner, ref="main",
                                         status="success" if rng.random() < 0.8 else "failed"),
                    t3 + dt.timedelta(seconds=60))  # fmt: skip
            else:
                reason = "not_retryable" if not retryable else rng.choice(SKIPS[1:])
                add(pstream, RetrySkipped(source="gitlab", project=project, pipeline_id=pipeline,
                                          job_id=job_id, job_name=name, reason=reason,  # type: ignore[arg-type]
                                          detail="bench", category=cat, snapshot=snap), t3)  # type: ignore[arg-type]  # fmt: skip
    return rows[:TARGET] if len(rows) > TARGET else rows


DIRECT = {
    "category": """
        SELECT date_bin('1 day', recorded_at, TIMESTAMPTZ '2000-01-03 00:00+00') AS t,
               convert_from(body, 'UTF8')::jsonb->>'category' AS key, count(*)
        FROM events WHERE type = 'VerdictReached' AND recorded_at >= $1 AND recorded_at < $2
        GROUP BY 1, 2""",
    "rule": """
        SELECT date_bin('1 day', recorded_at, TIMESTAMPTZ '2000-01-03 00:00+00') AS t, r, count(*)
        FROM events, jsonb_array_elements_text(convert_from(body, 'UTF8')::jsonb->'rules') AS r
        WHERE type = 'VerdictReached' AND recorded_at >= $1 AND recorded_at < $2
        GROUP BY 1, 2""",
    "runner": """
        SELECT date_bin('1 day', recorded_at, TIMESTAMPTZ '2000-01-03 00:00+00') AS t,
               convert_from(body, 'UTF8')::jsonb->>'runner', count(*)
        FROM events WHERE type = 'JobFinished' AND recorded_at >= $1 AND recorded_at < $2
          AND convert_from(body, 'UTF8')::jsonb->>'status' = 'failed'
        GROUP BY 1, 2""",
    "decision": """
        SELECT date_bin('1 day', recorded_at, TIMESTAMPTZ '2000-01-03 00:00+00') AS t,
               type || coalesce(convert_from(body, 'UTF8')::jsonb->>'reason', ''), count(*)
        FROM events WHERE type IN ('RetryRequested', 'RetrySkipped', 'RetryIssued')
          AND recorded_at >= $1 AND recorded_at < $2
        GROUP BY 1, 2""",
}


async def median_ms(fn: object) -> float:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        await fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def main(dsn: str) -> dict[str, object]:
    schema = f"bench_audit_{uuid.uuid4().hex[:8]}"
    store = await EventStore.connect(dsn, schema, max_size=4)
    try:
        await store.migrate()
        now = dt.datetime.now(dt.UTC)
        t0 = time.perf_counter()
        rows = generate(now)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        async with store.connection() as conn:
            await conn.copy_records_to_table(
                "events", records=rows, schema_name=schema,
                columns=["event_id", "stream", "stream_version", "type", "schema_version",
                         "body", "metadata", "idempotency_key", "recorded_at"],
            )  # fmt: skip
            await conn.execute("ANALYZE events")
        copy_s = time.perf_counter() - t0
        events = len(rows)
        del rows
        t0 = time.perf_counter()
        # As ingest's worker runs it (its default batch size): the catch-up after a restart.
        projected = await Projector(AuditStore(store)).catch_up()
        project_s = time.perf_counter() - t0
        async with store.connection() as conn:
            await conn.execute("ANALYZE")
            stat_rows = await conn.fetchval("SELECT count(*) FROM audit_stats")
        assert projected == events, (projected, events)

        audit = Audit(AuditStore(store))
        start, end = now - dt.timedelta(days=DAYS), now + dt.timedelta(hours=1)
        stats_ms: dict[str, float] = {}
        direct_ms: dict[str, float] = {}
        for metric, sql in DIRECT.items():
            stats_ms[metric] = await median_ms(
                lambda m=metric: audit.stats(m, bucket="day", start=start, end=end)
            )

            async def direct(q: str = sql) -> None:
                async with store.connection() as conn:
                    await conn.fetch(q, start, end)

            direct_ms[metric] = await median_ms(direct)
            print(f"{metric:10s} read model {stats_ms[metric]:8.1f} ms   "
                  f"events table {direct_ms[metric]:9.1f} ms")  # fmt: skip
        # Check that the read model and the direct query agree on a number.
        cat = await audit.stats(
            "category", bucket="day", start=start - dt.timedelta(days=1), end=end, top=20
        )
        async with store.connection() as conn:
            direct_total = await conn.fetchval(
                "SELECT count(*) FROM events WHERE type = 'VerdictReached'"
            )
        assert cat["total"] == direct_total, (cat["total"], direct_total)
        worst = max(stats_ms.values())
        worst_direct = max(direct_ms.values())
        print(f"generated in {gen_s:.1f}s, COPY {copy_s:.1f}s, projected {projected:,} events "
              f"in {project_s:.1f}s ({projected / project_s:,.0f} events/s), "
              f"{stat_rows:,} stats rows")  # fmt: skip
        return {
            "stats_ms": round(worst, 2),
            "direct_ms": round(worst_direct, 2),
            "ratio": round(worst_direct / worst, 1),
            "events": events,
            "project_events_per_s": round(projected / project_s),
        }
    finally:
        async with store.connection() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await store.close()


if __name__ == "__main__":
    with servers(nats=False) as s:
        result = asyncio.run(main(s.database_url))
    print("BENCH " + json.dumps(result))
