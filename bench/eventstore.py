"""Event store append throughput: single appends and batched appends of 1,000 vs raw COPY.

Runs with no arguments (starts embedded PostgreSQL unless CIRETRY_DATABASE_URL is set).
All three write the same rows into identical ``events`` tables (same indexes and triggers),
each in a fresh schema, alternating rounds so machine noise hits all of them alike.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ciretry.common.events import JobFinished, Metadata, NewEvent, encode  # noqa: E402
from ciretry.common.eventstore import EventStore  # noqa: E402
from tests.support.servers import servers  # noqa: E402

BATCH = 1000
BATCHES = 10
SINGLES = 1500
ROUNDS = 5


def make_events(n: int, tag: str) -> list[NewEvent]:
    out = []
    for i in range(n):
        job = JobFinished(
            source="gitlab", project="278964", pipeline_id=str(100000 + i // 20),
            job_id=f"{tag}{i}", job_name=f"test:unit {i % 37}", stage="test", status="failed",
            provider_failure_reason="script_failure", failure_reason="script_failure",
            runner="gitlab-runner-42", ref="main", sha="a" * 40,
        )
        out.append(
            NewEvent(
                stream=f"pipeline-gitlab-278964-{100000 + i // 20}-{tag}",
                data=job,
                metadata=Metadata(idempotency_key=f"gitlab:{tag}:{i}", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
            )
        )
    return out


async def fresh_store(dsn: str, label: str) -> EventStore:
    schema = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    store = await EventStore.connect(dsn, schema, max_size=2)
    await store.migrate()
    return store


async def drop(dsn: str, store: EventStore) -> None:
    await store.close()
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'DROP SCHEMA "{store.schema}" CASCADE')
    await conn.close()


async def bench_single(dsn: str) -> float:
    store = await fresh_store(dsn, "single")
    events = make_events(SINGLES, "s")
    t0 = time.perf_counter()
    for e in events:
        await store.append_batch([e])
    dt = time.perf_counter() - t0
    await drop(dsn, store)
    return SINGLES / dt


async def bench_batched(dsn: str) -> float:
    store = await fresh_store(dsn, "batched")
    batches = [make_events(BATCH, f"b{i}-") for i in range(BATCHES)]
    t0 = time.perf_counter()
    for batch in batches:
        await store.append_batch(batch)
    dt = time.perf_counter() - t0
    assert await store.last_position() == BATCH * BATCHES
    await drop(dsn, store)
    return BATCH * BATCHES / dt


async def bench_copy(dsn: str) -> float:
    """The floor to compare with: asyncpg COPY of the same rows, versions precomputed."""
    store = await fresh_store(dsn, "copy")
    batches = [make_events(BATCH, f"c{i}-") for i in range(BATCHES)]
    t0 = time.perf_counter()
    async with store.connection() as conn:
        for batch in batches:
            versions: dict[str, int] = {}
            records = []
            for e in batch:
                v = versions.get(e.stream, 0) + 1
                versions[e.stream] = v
                records.append(
                    (e.event_id, e.stream, v, e.data.type_name(), e.data.schema_version,
                     encode(e.data), encode(e.metadata), e.metadata.idempotency_key)
                )
            await conn.copy_records_to_table(
                "events", records=records, schema_name=store.schema,
                columns=["event_id", "stream", "stream_version", "type", "schema_version",
                         "body", "metadata", "idempotency_key"],
            )
    dt = time.perf_counter() - t0
    await drop(dsn, store)
    return BATCH * BATCHES / dt


async def main() -> None:
    with servers(nats=False) as s:
        print(f"PostgreSQL: {s.how}; {BATCHES} batches of {BATCH} events, {SINGLES} single appends, {ROUNDS} rounds")
        results: dict[str, list[float]] = {"single": [], "batched": [], "copy": []}
        for r in range(ROUNDS):
            results["copy"].append(await bench_copy(s.database_url))
            results["batched"].append(await bench_batched(s.database_url))
            results["single"].append(await bench_single(s.database_url))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} ev/s" for k, v in results.items()))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["batched"] / med["copy"]
    print()
    print(f"{'method':<34}{'events/s (median)':>20}")
    print(f"{'append_batch, 1,000 per call':<34}{med['batched']:>20,.0f}")
    print(f"{'append, one event per call':<34}{med['single']:>20,.0f}")
    print(f"{'raw asyncpg COPY (no outbox)':<34}{med['copy']:>20,.0f}")
    print(f"batched / COPY = {ratio:.2f} (target >= 0.40)")
    print("BENCH " + json.dumps({
        "batched_eps": round(med["batched"]), "single_eps": round(med["single"]),
        "copy_eps": round(med["copy"]), "ratio": round(ratio, 3),
    }))


if __name__ == "__main__":
    asyncio.run(main())
