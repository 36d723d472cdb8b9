"""Bench: what act's scheduler and a follower's catch-up cost as history grows (issue 13).

Two logs in schemas of their own (dropped at the end), alike but for their history: 10,000 and
1,000,000 closed retry requests (a ``RetryRequested`` and its ``RetryIssued`` each, 1,000 per
pipeline stream), both tracked by a follower. On top of each, the same present: 100 open
requests not yet due (20 of them after a transient failure) and 10 events the follower has not
processed. Then, in the same run, on both:

* run_due: ``ActHandler.run_due``, which finds the open requests in the ``pending_requests``
  read model (migration 0004) and skips them (not due): the scheduler's every-5-s cost;
* run_due before: the query run_due used before, a scan of every ``RetryRequested`` ever stored
  and its outcome, for reference;
* catch-up round: ``FollowerLog.refresh`` in the steady state (what every round reads: the
  events appended since the last one, the open ones re-checked), and the oldest-unprocessed
  query behind the ``ciretry.follower.oldest_unprocessed`` gauge.

``ratio`` = run_due time with 1M / with 10k (target <= 1.5). Medians of several rounds,
warm database. Runs with no arguments: CIRETRY_DATABASE_URL when set, else an embedded
PostgreSQL. ``--large N`` changes the 1M.
Last line: BENCH {"run_due_10k_ms": ..., "run_due_1m_ms": ..., "ratio": ..., ...}
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ciretry.act.budget import outcome_key  # noqa: E402
from ciretry.act.policy import load_policy  # noqa: E402
from ciretry.act.service import ActHandler  # noqa: E402
from ciretry.common.catchup import FollowerLog  # noqa: E402
from ciretry.common.events import (  # noqa: E402
    BudgetSnapshot,
    Event,
    Metadata,
    RetryFailed,
    RetryIssued,
    RetryRequested,
    encode,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore  # noqa: E402
from tests.support.pending import PENDING_FROM_THE_LOG  # noqa: E402
from tests.support.servers import servers  # noqa: E402

SMALL = 10_000
PER_STREAM = 1_000
OPEN = 100
FAILING = 20
UNPROCESSED = 10
FOLLOWER = "bench"
NOT_YET = dt.datetime(2999, 1, 1, tzinfo=dt.UTC)
NOW = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def request(i: int, *, not_before: dt.datetime | None = None) -> RetryRequested:
    return RetryRequested(
        source="gitlab", project="bench/app", pipeline_id=str(i // PER_STREAM), job_id=str(i),
        job_name=f"test-{i % 50}", action="retry_job", idempotency_key=key(i),
        category="preempted", budget="system",
        snapshot=BudgetSnapshot(job_attempts=0, job_limit=3, pipeline_limit=50),
        not_before=not_before,
    )  # fmt: skip


def key(i: int) -> str:
    return f"act:gitlab:bench/app:{i}:retry_job"


def stream(i: int) -> str:
    return pipeline_stream("gitlab", "bench/app", str(i // PER_STREAM))


def closed_history(n: int) -> Iterator[tuple[str, Event, str]]:
    """(stream, event, idempotency key) of n closed requests, stream by stream."""
    for i in range(n):
        yield stream(i), request(i), key(i)
        issued = RetryIssued(
            source="gitlab", project="bench/app", pipeline_id=str(i // PER_STREAM),
            job_id=str(i), idempotency_key=key(i), new_job_id=str(i + 10_000_000),
        )  # fmt: skip
        yield stream(i), issued, outcome_key(key(i))


def present(first: int) -> Iterator[tuple[str, Event, str]]:
    """The same open requests in every log: not due yet, some after a transient failure."""
    for j in range(OPEN):
        i = first + j
        yield stream(i), request(i, not_before=NOT_YET), key(i)
        if j < FAILING:
            failed = RetryFailed(
                source="gitlab", project="bench/app", pipeline_id=str(i // PER_STREAM),
                job_id=str(i), idempotency_key=key(i), status=503, detail="HTTP 503",
                will_retry=True,
            )  # fmt: skip
            yield stream(i), failed, f"{key(i)}:failed:1"


async def copy_events(conn: asyncpg.Connection, rows: Iterator[tuple[str, Event, str]]) -> int:
    """COPY into events (the append path's checks are not what is measured; the
    pending_requests trigger fires all the same), 50,000 rows per round trip."""
    versions: dict[str, int] = {}
    meta = encode(Metadata())
    total = 0
    batch: list[tuple[Any, ...]] = []

    async def flush() -> None:
        await conn.copy_records_to_table(
            "events",
            columns=["event_id", "stream", "stream_version", "type", "schema_version", "body",
                     "metadata", "idempotency_key"],
            records=batch,
        )  # fmt: skip

    for s, e, k in rows:
        versions[s] = versions.get(s, 0) + 1
        batch.append((uuid.uuid4(), s, versions[s], e.type_name(), e.schema_version, encode(e),
                      meta, k))  # fmt: skip
        if len(batch) >= 50_000:
            await flush()
            total += len(batch)
            batch = []
    if batch:
        await flush()
        total += len(batch)
    return total


async def build(store: EventStore, history: int) -> None:
    async with store.connection() as conn:
        t0 = time.perf_counter()
        n = await copy_events(conn, closed_history(history))
        n += await copy_events(conn, present(history))
        # The follower has processed every request so far (tracking rows, as a follower of
        # RetryRequested would have committed them).
        await conn.execute(
            "INSERT INTO tracking (consumer, event_id) "
            "SELECT $1, event_id FROM events WHERE type = 'RetryRequested'",
            FOLLOWER,
        )
        await conn.execute("VACUUM (ANALYZE) events, tracking, pending_requests")
        open_rows = await conn.fetchval("SELECT count(*) FROM pending_requests")
        assert open_rows == OPEN, open_rows
        print(f"  {history:,} closed requests: {n:,} events in {time.perf_counter() - t0:.1f}s")


async def old_run_due(store: EventStore) -> int:
    """The old query, paged as run_due paged it."""
    seen, position = 0, 0
    async with store.connection() as conn:
        while True:
            rows = await conn.fetch(PENDING_FROM_THE_LOG, position, 500)
            seen += len(rows)
            if len(rows) < 500:
                return seen
            position = rows[-1][0]


class Subject:
    """One log, ready to be measured: act's handler and a follower in their steady state."""

    def __init__(self, store: EventStore, history: int) -> None:
        self.store = store
        self.history = history
        self.handler = ActHandler(store, None, load_policy(), {})
        self.follower = FollowerLog(store, FOLLOWER, ("RetryRequested",))
        self.first_ms = 0.0

    async def prepare(self) -> None:
        assert await self.handler.run_due(NOW) == 0  # nothing is due
        assert await old_run_due(self.store) == OPEN
        t = time.perf_counter()
        first = await self.follower.refresh()  # per process start: from the mark (0 here)
        self.first_ms = (time.perf_counter() - t) * 1000
        assert first == self.history + OPEN and not self.follower.open
        # Steady state: UNPROCESSED new events arrive, and stay unprocessed.
        fresh = range(10**9, 10**9 + UNPROCESSED)
        async with self.store.connection() as conn:
            # Not due either: run_due is measured finding nothing to do, every round alike.
            await copy_events(
                conn, ((stream(i), request(i, not_before=NOT_YET), key(i)) for i in fresh)
            )
        assert await self.follower.refresh() == UNPROCESSED
        assert len(self.follower.open) == UNPROCESSED

    async def run_due(self) -> None:
        assert await self.handler.run_due(NOW) == 0  # found and skipped, none run

    def probes(self) -> dict[str, Callable[[], Awaitable[Any]]]:
        return {
            "run_due": self.run_due,
            "round": self.follower.refresh,
            "oldest": lambda: self.follower.oldest_unprocessed_age(dt.datetime.now(dt.UTC)),
        }


async def median_ms(fn: Callable[[], Awaitable[Any]], rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        t = time.perf_counter()
        await fn()
        timings.append((time.perf_counter() - t) * 1000)
    return statistics.median(timings)


async def measure(subjects: list[Subject], rounds: int = 10) -> dict[int, dict[str, float]]:
    """Every probe on every log, in alternating rounds (machine noise hits both alike);
    medians of the rounds' medians. The old scan, seconds at 1M, a few times each."""
    samples: dict[int, dict[str, list[float]]] = {s.history: {} for s in subjects}
    for _ in range(rounds):
        for s in subjects:
            for name, probe in s.probes().items():
                await probe()  # warm
                samples[s.history].setdefault(name, []).append(await median_ms(probe, 15))
    out: dict[int, dict[str, float]] = {}
    for s in subjects:
        out[s.history] = {name: statistics.median(v) for name, v in samples[s.history].items()}
        out[s.history]["old"] = await median_ms(lambda s=s: old_run_due(s.store), 3)  # type: ignore[misc]
        out[s.history]["first"] = s.first_ms
        r = out[s.history]
        print(
            f"  {s.history:,}: run_due {r['run_due']:.3f} ms (the scan before: {r['old']:.1f} "
            f"ms); catch-up round {r['round']:.3f} ms; oldest-unprocessed gauge "
            f"{r['oldest']:.3f} ms; first round from mark 0 {r['first']:.0f} ms"
        )
    return out


async def run(dsn: str, large: int) -> dict[str, Any]:
    results: dict[int, dict[str, float]] = {}
    schemas = {n: f"bench_pending_{n}_{uuid.uuid4().hex[:6]}" for n in (SMALL, large)}
    stores = {}
    try:
        print("loading:")
        for n, schema in schemas.items():
            stores[n] = await EventStore.connect(dsn, schema, max_size=4)
            await stores[n].migrate()
            await build(stores[n], n)
        print("measuring (alternating rounds, medians; warm database):")
        subjects = [Subject(stores[n], n) for n in schemas]
        for subject in subjects:
            await subject.prepare()
        results = await measure(subjects)
    finally:
        for n, schema in schemas.items():
            if n in stores:
                async with stores[n].connection() as conn:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await stores[n].close()
    small, big = results[SMALL], results[large]
    out: dict[str, Any] = {"history_small": SMALL, "history_large": large, "open_requests": OPEN}
    for key_, name, digits in (
        ("run_due", "run_due", 3),
        ("old", "run_due_before", 1),
        ("round", "catch_up_round", 3),
        ("oldest", "oldest_gauge", 3),
    ):
        out[f"{name}_10k_ms"] = round(small[key_], digits)
        out[f"{name}_1m_ms"] = round(big[key_], digits)
        ratio = round(big[key_] / small[key_], 3)
        out["ratio" if key_ == "run_due" else f"{name.removesuffix('_round')}_ratio"] = ratio
    out["first_round_from_zero_1m_ms"] = round(big["first"])
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=1_000_000, help="closed requests (1M)")
    args = parser.parse_args()
    with servers(nats=False) as s:
        print(f"PostgreSQL: {s.how}")
        result = await run(s.database_url, args.large)
    print(
        f"run_due: {result['run_due_10k_ms']} ms with {SMALL:,} closed requests, "
        f"{result['run_due_1m_ms']} ms with {args.large:,}: ratio {result['ratio']} "
        f"(the scan it replaced: ratio {result['run_due_before_ratio']})"
    )
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
