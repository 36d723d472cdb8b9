"""Bench: ``ciretry replay`` against a ceiling that does strictly less; act's cold start.

Stores 1,010,000 events (1,000 pipelines x 1,000 events: job attempts, decisions, outcomes, and
one pipeline of 10,000) in a schema of its own (dropped at the end), then, over alternating
rounds, in the same run:

* replay: ``ciretry.act.replay.replay`` on a store opened as the command opens it (its pool
  size): what ``ciretry replay`` runs, every budget folded and every request checked;
* ceiling (``ratio``'s denominator): the same rows, fetched by the same log call
  (``stream_bodies``: one JSON array per pipeline stream) and decoded by the same decoder
  (``slim.stream_decoder``), GC paused as replay pauses it; nothing folded, nothing checked.
  Replay does all of this and more, so ``ratio`` <= 1 (the share of the ceiling it reaches);
* fetch only: the same rows, not decoded: what PostgreSQL + asyncpg deliver;
* before (once, for scale): what ``ciretry replay`` ran until now, every event read by position
  and decoded in full (``read_all`` + ``verify``);
* decide_10k: act's cold start on the pipeline of 10,000 events: a fresh ``ChainLoader.load``
  (``load_into``: ``body_groups``, slim decode, fold), ``find_job``, ``ensure_review`` and
  ``decide``, as ``VerdictHandler`` runs them (less the provider calls and the append); warm
  database, nothing cached in Python. Checked against the full read (``read_stream`` +
  ``fold_budget`` + ``decide``), timed too.

Runs with no arguments: CIRETRY_DATABASE_URL when set, else an embedded PostgreSQL.
Last line: BENCH {"events_per_s": ..., "ceiling_per_s": ..., "ratio": ..., "decide_10k_ms": ...}
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
from ciretry.act import cli  # noqa: E402
from ciretry.act.budget import decide, fold_budget  # noqa: E402
from ciretry.act.chains import ChainLoader, find_job  # noqa: E402
from ciretry.act.policy import load_policy  # noqa: E402
from ciretry.act.replay import PIPELINE_PREFIX, ReplayReport, replay, verify  # noqa: E402
from ciretry.act.slim import (  # noqa: E402
    FOLD_TYPES,
    VIEW_SCHEMA_VERSION,
    collector_paused,
    stream_decoder,
)
from ciretry.common.config import Config  # noqa: E402
from ciretry.common.events import (  # noqa: E402
    BudgetSnapshot,
    Event,
    JobFinished,
    Metadata,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
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
                    snapshot=BudgetSnapshot(job_attempts=0, job_limit=3, pipeline_limit=10_000),
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


async def ceiling(store: EventStore) -> int:
    """The rows replay reads, as it reads them, decoded by its decoder; nothing else."""
    n = 0
    with collector_paused():
        async for _stream, body in store.stream_bodies(
            PIPELINE_PREFIX, FOLD_TYPES, VIEW_SCHEMA_VERSION
        ):
            n += len(stream_decoder.decode(body))
    return n


async def fetch_only(store: EventStore) -> int:
    """The same rows, not decoded (bytes counted, to touch them)."""
    size = 0
    async for _stream, body in store.stream_bodies(PIPELINE_PREFIX, FOLD_TYPES, VIEW_SCHEMA_VERSION):
        size += len(body)
    return size


async def before(store: EventStore) -> ReplayReport:
    """``ciretry replay`` until this change: every event by position, decoded in full."""
    report = ReplayReport()
    batch = []
    async for e in store.read_all(batch=5000):
        batch.append(e)
        if len(batch) >= 5000:
            verify(batch, report)
            batch = []
    return verify(batch, report)


async def main() -> None:
    with servers(nats=False) as s:
        print(f"PostgreSQL: {s.how}")
        await run(s.database_url)


async def run(dsn: str) -> None:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    # As ``ciretry replay`` opens it, and as a service does (act's pool for the cold start).
    store = await EventStore.connect(dsn, schema, max_size=cli.POOL_SIZE)
    service_store = await EventStore.connect(dsn, schema, max_size=Config().database_pool_max)
    try:
        await store.migrate()
        t0 = time.perf_counter()
        async with store.connection() as conn:
            # COPY: the append path's idempotency and version checks are not what is measured.
            for pid in range(PIPELINES):
                # Each pipeline's own ids: replay follows the pipelines decisions name.
                events = pipeline_events(pid, PER_PIPELINE)
                await load(conn, pipeline_stream("gitlab", "bench/app", str(pid)), events)
            big = pipeline_events(10_001, 10_000)
            await load(conn, pipeline_stream("gitlab", "bench/app", "10001"), big)
            # As autovacuum would have by now: hint bits set, visibility map and statistics.
            await conn.execute("VACUUM (ANALYZE) events")
        total = PIPELINES * PER_PIPELINE + len(big)
        print(f"stored {total:,} events in {time.perf_counter() - t0:.1f}s")

        # Alternating rounds, so machine noise hits all three alike; medians reported.
        ceiling_rates, replay_rates, fetch_rates = [], [], []
        for r in range(3):
            t = time.perf_counter()
            decoded = await ceiling(store)
            ceiling_rates.append(decoded / (time.perf_counter() - t))
            t = time.perf_counter()
            report = await replay(store)
            replay_rates.append(report.events / (time.perf_counter() - t))
            t = time.perf_counter()
            await fetch_only(store)
            fetch_rates.append(total / (time.perf_counter() - t))
            assert report.events == decoded == total, (report.events, decoded, total)
            assert report.pipelines == PIPELINES + 1 and not report.violations, report.violations[:3]
            assert report.multi_stream_chains == 0
            print(
                f"  round {r + 1}: ceiling (fetch + decode) {ceiling_rates[-1]:,.0f} ev/s, "
                f"replay {replay_rates[-1]:,.0f} ev/s, fetch only {fetch_rates[-1]:,.0f} ev/s"
            )
        summary = (report.requests, report.skips, report.issued, len(report.states))
        del report
        ceiling_per_s = statistics.median(ceiling_rates)
        events_per_s = statistics.median(replay_rates)
        fetch_per_s = statistics.median(fetch_rates)
        # Each round's replay against the same round's ceiling (noise drifts between rounds).
        ratio = statistics.median(r / c for r, c in zip(replay_rates, ceiling_rates, strict=True))
        t = time.perf_counter()
        old = await before(store)
        before_per_s = old.events / (time.perf_counter() - t)
        # The same verdicts on every request, and the same counts, as the full read.
        assert (old.requests, old.skips, old.issued, len(old.states)) == summary, summary
        assert not old.violations
        del old
        print(f"  before (read_all, full decode, verify): {before_per_s:,.0f} ev/s")

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
            recorded = await service_store.read_stream(stream)
            full = fold_budget(recorded)
            expected = decide(full, verdict, policy, full.job_by_id.get(verdict.job_id), NOW)
            full_timings.append((time.perf_counter() - t) * 1000)
        assert len(recorded) == 10_000
        timings = []
        for _ in range(15):
            t = time.perf_counter()
            chains = ChainLoader(service_store)  # nothing cached: a cold start
            chain = await chains.load("gitlab", "bench/app", "10001")
            job = await find_job(
                service_store, stream, chain.state, verdict.job_id, verdict.job_event_id
            )
            await chains.ensure_review(chain, job.ref if job else None)
            decision = decide(chain.state, verdict, policy, job, NOW)
            timings.append((time.perf_counter() - t) * 1000)
        state = chain.state
        assert decision == expected and job == full.job_by_id[verdict.job_id]
        assert (state.events, state.version) == (full.events, full.version) == (10_000, 10_000)
        decide_ms = statistics.median(timings)
        full_ms = statistics.median(full_timings)
        print(
            f"decide on 10k events (cold start: ChainLoader.load + find_job + decide): "
            f"{type(decision).__name__}, {decide_ms:.1f} ms (median of 15); "
            f"full read_stream + fold + decide {full_ms:.1f} ms"
        )
        print(
            f"replay {events_per_s:,.0f} ev/s, {ratio:.0%} of the ceiling "
            f"{ceiling_per_s:,.0f} ev/s (same rows, same decoder, no fold; per-round median); "
            f"fetch only {fetch_per_s:,.0f} ev/s; before {before_per_s:,.0f} ev/s "
            f"({events_per_s / before_per_s:.1f}x)"
        )
        result = {
            "events_per_s": round(events_per_s),
            "ceiling_per_s": round(ceiling_per_s),
            "ratio": round(ratio, 3),
            "decide_10k_ms": round(decide_ms, 2),
            "decide_10k_full_read_ms": round(full_ms, 2),
            "fetch_only_per_s": round(fetch_per_s),
            "before_per_s": round(before_per_s),
        }
    finally:
        async with store.connection() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await service_store.close()
        await store.close()
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
