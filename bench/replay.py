"""Bench: rebuilding budgets from the log vs merely reading and decoding it; one decision.

Stores >= 1M events (1,000 pipelines x 1,000 events: job attempts, decisions, outcomes) in a
schema of its own (dropped at the end), then in the same run measures

* decode loop: read every row (by position, in batches) and msgspec-decode it with decode_event;
* rebuild: ``ciretry.act.replay.rebuild_budgets`` over the same rows, which folds every budget;
* raw rows (reference): the same rows' bodies fetched (``SELECT body``, batches of 50,000),
  not decoded: what PostgreSQL + asyncpg deliver at all;
* decide_10k: act's cold start on one pipeline of 10,000 events: read it from the log
  (``views.load_state``: bodies only, slim decode, fold), fetch the failed job's event
  (``views.find_job``) and decide; warm database, nothing cached in Python.

Runs with no arguments: CIRETRY_DATABASE_URL when set, else an embedded PostgreSQL.
Last line: BENCH {"events_per_s": ..., "decode_per_s": ..., "ratio": ..., "decide_10k_ms": ...}
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ciretry.act.budget import decide, fold_budget  # noqa: E402
from ciretry.act.policy import load_policy  # noqa: E402
from ciretry.act.replay import rebuild_budgets  # noqa: E402
from ciretry.act.views import find_job, load_state  # noqa: E402
from ciretry.common.events import (  # noqa: E402
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
from ciretry.common.eventstore import EventStore  # noqa: E402
from tests.support.servers import servers  # noqa: E402

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
    async with store.connection() as conn:
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


async def raw_loop(store: EventStore) -> int:
    """Reference: the rows' bodies as PostgreSQL and asyncpg deliver them, nothing decoded."""
    n = 0
    position = 0
    async with store.connection() as conn:
        while True:
            rows = await conn.fetch(
                "SELECT position, body FROM events "
                "WHERE position > $1 ORDER BY position LIMIT 50000",
                position,
            )
            if not rows:
                return n
            n += len(rows)
            position = rows[-1][0]


async def main() -> None:
    with servers(nats=False) as s:
        print(f"PostgreSQL: {s.how}")
        await run(s.database_url)


async def run(dsn: str) -> None:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    store = await EventStore.connect(dsn, schema, max_size=4)
    try:
        await store.migrate()
        t0 = time.perf_counter()
        template = pipeline_events(1, PER_PIPELINE)
        async with store.connection() as conn:
            # COPY: the append path's idempotency and version checks are not what is measured.
            for pid in range(PIPELINES):
                # Same shape per pipeline; the fold does not look at pipeline ids in bodies.
                await load(conn, pipeline_stream("gitlab", "bench/app", str(pid)), template)
            big = pipeline_events(10_001, 10_000)
            await load(conn, pipeline_stream("gitlab", "bench/app", "10001"), big)
            # As autovacuum would have by now: hint bits set, visibility map and statistics.
            await conn.execute("VACUUM (ANALYZE) events")
        total = PIPELINES * PER_PIPELINE + len(big)
        print(f"stored {total:,} events in {time.perf_counter() - t0:.1f}s")

        # Alternating rounds, so machine noise hits all three alike; medians reported.
        decode_rates, rebuild_rates, raw_rates = [], [], []
        for r in range(3):
            t = time.perf_counter()
            n = await decode_loop(store)
            decode_rates.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            states = await rebuild_budgets(store)
            folded = sum(s.events for s in states.values())
            rebuild_rates.append(folded / (time.perf_counter() - t))
            del states
            t = time.perf_counter()
            raw = await raw_loop(store)
            raw_rates.append(raw / (time.perf_counter() - t))
            assert folded == n == raw == total, (folded, n, raw, total)
            print(
                f"  round {r + 1}: decode loop {decode_rates[-1]:,.0f} ev/s, "
                f"rebuild {rebuild_rates[-1]:,.0f} ev/s, raw rows {raw_rates[-1]:,.0f} rows/s"
            )
        decode_per_s = statistics.median(decode_rates)
        events_per_s = statistics.median(rebuild_rates)
        raw_per_s = statistics.median(raw_rates)

        policy = load_policy()
        stream = pipeline_stream("gitlab", "bench/app", "10001")
        last_job = next(e for e in reversed(big) if isinstance(e, JobFinished))
        verdict = VerdictReached(
            source="gitlab", project="bench/app", pipeline_id="10001", job_id=last_job.job_id,
            job_name=last_job.job_name, category="preempted", retryable=True, budget="system",
            action="retry_job", confidence=1.0,
        )
        # What the full read (every column, envelope and metadata decoded) decides, to check the
        # fast path against; timed too, for reference.
        full_timings = []
        for _ in range(5):
            t = time.perf_counter()
            recorded = await store.read_stream(stream)
            full = fold_budget(recorded)
            expected = decide(full, verdict, policy, full.job_by_id.get(verdict.job_id), NOW)
            full_timings.append((time.perf_counter() - t) * 1000)
        assert len(recorded) == 10_000
        timings = []
        for _ in range(15):
            t = time.perf_counter()
            state = await load_state(store, stream)
            assert state is not None
            job = await find_job(store, stream, state, verdict.job_id, verdict.job_event_id)
            decision = decide(state, verdict, policy, job, NOW)
            timings.append((time.perf_counter() - t) * 1000)
        assert decision == expected and job == full.job_by_id[verdict.job_id]
        assert (state.events, state.version) == (full.events, full.version) == (10_000, 10_000)
        decide_ms = statistics.median(timings)
        full_ms = statistics.median(full_timings)
        print(
            f"decide on 10k events (cold start: read + fold + job fetch + decide): "
            f"{type(decision).__name__}, {decide_ms:.1f} ms (median of 15); "
            f"full read_stream + fold + decide {full_ms:.1f} ms"
        )
        print(
            f"decode loop {decode_per_s:,.0f} ev/s; rebuild {events_per_s:,.0f} ev/s; "
            f"raw rows (no decode) {raw_per_s:,.0f} rows/s"
        )
        result = {
            "events_per_s": round(events_per_s),
            "decode_per_s": round(decode_per_s),
            "ratio": round(events_per_s / decode_per_s, 3),
            "decide_10k_ms": round(decide_ms, 2),
            "raw_rows_per_s": round(raw_per_s),
        }
    finally:
        async with store.connection() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await store.close()
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
