"""Bench: rebuilding budgets from the log vs merely reading and decoding it; one decision.

Stores >= 1M events (1,000 pipelines x 1,000 events: job attempts, decisions, outcomes) in a
schema of its own (dropped at the end), then in the same run measures

* decode loop: read every row (by position, in batches) and msgspec-decode it with decode_event;
* rebuild: ``ciretry.act.replay.rebuild_budgets`` over the same rows, which folds every budget;
* decide_10k: one pipeline of 10,000 events read from the log, folded and decided on.

DB: CIRETRY_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/test.
Last line: BENCH {"events_per_s": ..., "decode_per_s": ..., "ratio": ..., "decide_10k_ms": ...}
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import statistics
import time
import uuid

import asyncpg

from ciretry.act.budget import decide, fold_budget
from ciretry.act.policy import load_policy
from ciretry.act.replay import rebuild_budgets
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    JobFinished,
    Metadata,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
    decode_event,
    encode,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore

DSN = os.environ.get("CIRETRY_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
PIPELINES = 1000
PER_PIPELINE = 1000
NOW = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def pipeline_events(pid: int, n: int) -> list[Event]:
    """n events shaped like a busy pipeline: attempts of jobs, some retried, decisions."""
    out: list[Event] = []
    job_id = pid * 1_000_000
    i = 0
    while len(out) < n:
        i += 1
        job_id += 1
        name = f"test-{i % (n // 3 or 1)}"
        out.append(
            JobFinished(
                source="gitlab", project="bench/app", pipeline_id=str(pid), job_id=str(job_id),
                job_name=name, status="failed", stage="test", ref="main", sha="f" * 40,
                user="dev", failure_reason="script_failure", exit_code=1,
                started_at=NOW, finished_at=NOW, runner="runner-7",
            )
        )
        if i % 10 == 0:
            key = f"act:gitlab:bench/app:{job_id}:retry_job"
            out.append(
                RetryRequested(
                    source="gitlab", project="bench/app", pipeline_id=str(pid),
                    job_id=str(job_id), job_name=name, action="retry_job", idempotency_key=key,
                    category="preempted", budget="system",
                    snapshot=BudgetSnapshot(job_attempts=0, job_limit=3, pipeline_limit=50),
                )
            )
            out.append(
                RetryIssued(
                    source="gitlab", project="bench/app", pipeline_id=str(pid),
                    job_id=str(job_id), idempotency_key=key, new_job_id=str(job_id + 1),
                )
            )
        elif i % 10 == 5:
            out.append(
                RetrySkipped(
                    source="gitlab", project="bench/app", pipeline_id=str(pid),
                    job_id=str(job_id), job_name=name, reason="not_retryable",
                    detail="category deterministic is not retryable", category="deterministic",
                    snapshot=BudgetSnapshot(),
                )
            )
    return out[:n]


async def load(conn: asyncpg.Connection, stream: str, events: list[Event]) -> None:
    meta = encode(Metadata())
    await conn.copy_records_to_table(
        "events",
        columns=["event_id", "stream", "stream_version", "type", "schema_version", "body",
                 "metadata"],
        records=[
            (uuid.uuid4(), stream, v, e.type_name(), e.schema_version, encode(e), meta)
            for v, e in enumerate(events, 1)
        ],
    )


async def decode_loop(store: EventStore) -> int:
    n = 0
    position = 0
    async with store.pool.acquire() as conn:
        while True:
            rows = await conn.fetch(
                "SELECT position, type, schema_version, body FROM events "
                "WHERE position > $1 ORDER BY position LIMIT 50000",
                position,
            )
            if not rows:
                return n
            for r in rows:
                decode_event(r[1], r[2], r[3])
            n += len(rows)
            position = rows[-1][0]


async def main() -> None:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    store = await EventStore.connect(DSN, schema, max_size=4)
    try:
        await store.migrate()
        t0 = time.perf_counter()
        template = pipeline_events(1, PER_PIPELINE)
        async with store.pool.acquire() as conn:
            # COPY: the append path's idempotency and version checks are not what is measured.
            for pid in range(PIPELINES):
                # Same shape per pipeline; the fold does not look at pipeline ids in bodies.
                await load(conn, pipeline_stream("gitlab", "bench/app", str(pid)), template)
            big = pipeline_events(10_001, 10_000)
            await load(conn, pipeline_stream("gitlab", "bench/app", "10001"), big)
            await conn.execute("ANALYZE events")
        total = PIPELINES * PER_PIPELINE + len(big)
        print(f"stored {total:,} events in {time.perf_counter() - t0:.1f}s")

        decode_rates, rebuild_rates = [], []
        for _ in range(3):
            t = time.perf_counter()
            n = await decode_loop(store)
            decode_rates.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            states = await rebuild_budgets(store)
            folded = sum(s.events for s in states.values())
            rebuild_rates.append(folded / (time.perf_counter() - t))
        assert folded == n == total, (folded, n, total)
        decode_per_s = statistics.median(decode_rates)
        events_per_s = statistics.median(rebuild_rates)

        policy = load_policy()
        stream = pipeline_stream("gitlab", "bench/app", "10001")
        last_job = next(e for e in reversed(big) if isinstance(e, JobFinished))
        verdict = VerdictReached(
            source="gitlab", project="bench/app", pipeline_id="10001", job_id=last_job.job_id,
            job_name=last_job.job_name, category="preempted", retryable=True, budget="system",
            action="retry_job", confidence=1.0,
        )
        timings = []
        for _ in range(7):
            t = time.perf_counter()
            recorded = await store.read_stream(stream)
            state = fold_budget(recorded)
            decision = decide(state, verdict, policy, state.job_by_id.get(verdict.job_id), NOW)
            timings.append((time.perf_counter() - t) * 1000)
        assert len(recorded) == 10_000
        decide_ms = statistics.median(timings)
        print(f"decide on 10k events: {type(decision).__name__}, {decide_ms:.1f} ms (median)")
        print(f"decode loop {decode_per_s:,.0f} ev/s; rebuild {events_per_s:,.0f} ev/s")
        result = {
            "events_per_s": round(events_per_s),
            "decode_per_s": round(decode_per_s),
            "ratio": round(events_per_s / decode_per_s, 3),
            "decide_10k_ms": round(decide_ms, 2),
        }
    finally:
        async with store.pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await store.close()
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
