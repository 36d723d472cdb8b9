"""Ingest throughput: GitLab job webhooks/s through the real app vs a bare aiohttp handler.

Runs with no arguments. Uses CIRETRY_DATABASE_URL / CIRETRY_NATS_URL when set, else starts
embedded PostgreSQL and NATS (stopped at the end).

* The server under test runs in a subprocess (this script with ``--serve``): the ingest app as
  ``create_app`` builds it, with a real EventStore (fresh schema, the server's own fsync
  settings) and the outbox fast path to a real JetStream stream (file storage). Metrics are
  set up as ``ciretry serve`` sets them up (Prometheus reader); no trace exporter is configured. A second subprocess serves a bare aiohttp handler that only returns
  202. Both use the same event loop (uvloop when installed, as ``ciretry serve`` does) and the
  same runner settings (no access log).
* The load generator is a keep-alive HTTP/1.1 client on raw asyncio streams (aiohttp's client
  costs several times more CPU per request, and it shares the machine's cores with the server,
  PostgreSQL and NATS), ``BENCH_CONNECTIONS`` connections each with one request in flight. Each
  webhook is a distinct failed job, so every request commits a new event; a 202 is sent only
  after the commit. At the end the stored events, the messages JetStream holds and the outbox
  rows left are counted: every accepted webhook must be in the log and on the bus.
* ``BENCH_INGEST_OPTIONS``: JSON of ``create_app`` options (say ``{"max_inflight": 1}``) to
  compare batcher settings; the defaults are what ``ciretry serve`` runs.
* ``BENCH_ROUNDS`` rounds (default 3) alternate bare and ingest so that machine noise hits both
  alike; the figures are medians over rounds, ``ratio`` the median of each round's ratio.

Last line: ``BENCH {"webhooks_per_s": ..., "bare_per_s": ..., "ratio": ..., "p50_ms": ...,
"p99_ms": ...}`` (latencies: accept latency of the webhook runs, from the request's write to
the end of its answer, medians over rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECRET = "bench-secret"
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "1"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
HOOK = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gitlab_webhooks"


def use_uvloop() -> bool:
    """uvloop when it is installed (``BENCH_LOOP=asyncio`` forces the stock loop)."""
    if os.environ.get("BENCH_LOOP") == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on the loop ``ciretry serve`` uses; both servers and the client alike."""
    if use_uvloop():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


# --- server side (subprocess) -------------------------------------------------------------


async def serve(kind: str, port: int, db: str, nats_url: str, schema: str, prefix: str) -> None:
    from aiohttp import web

    app = web.Application()
    closers: list[Callable[[], Coroutine[Any, Any, Any]]] = []
    stats: Callable[[], dict[str, Any]] = dict
    if kind == "bare":

        async def bare(_: web.Request) -> web.Response:
            return web.Response(status=202)

        app.router.add_post("/webhooks/gitlab", bare)
    else:
        from ciretry.common.bus import Bus, OutboxPublisher, Recorder
        from ciretry.common.config import Config
        from ciretry.common.eventstore import EventStore
        from ciretry.common.metrics import setup_metrics
        from ciretry.ingest.app import BATCHER, create_app

        setup_metrics("ciretry-ingest")  # counters on, as `ciretry serve` runs them
        store = await EventStore.connect(
            db, schema, min_size=2, max_size=Config().database_pool_max
        )
        bus = await Bus.connect(nats_url, prefix=prefix, stream=prefix.upper())
        closers += [bus.close, store.close]
        config = Config(gitlab_webhook_secrets=(SECRET,))
        options = json.loads(os.environ.get("BENCH_INGEST_OPTIONS") or "{}")
        app = create_app(config, store, Recorder(store, OutboxPublisher(store, bus)), **options)
        batcher = app[BATCHER]

        def stats() -> dict[str, Any]:
            s = batcher.stats
            return {
                "batches": s.batches,
                "events": s.events,
                "largest_batch": s.largest_batch,
                "publish_skipped": s.publish_skipped,
                "append_ms": 1000 * s.append_seconds / max(1, s.batches),
            }

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await stop.wait()
    cpu = time.process_time() - cpu0
    busy = cpu / (time.perf_counter() - wall0)
    # Bounded: a benchmark server must not outlive its run. The app's cleanup drains the
    # batcher and waits for the fast-path publishes still running.
    for close in (runner.cleanup, *closers):
        try:
            await asyncio.wait_for(close(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - report and go on closing
            print(f"shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)
    print("STATS " + json.dumps({**stats(), "cpu_busy": busy, "cpu_s": cpu}), flush=True)


# --- load generator -----------------------------------------------------------------------


def webhook_requests(n: int, run: str, offset: int) -> list[bytes]:
    import msgspec

    base = json.loads((HOOK / "go-gitlab__job.json").read_text())
    base.update(build_status="failed", build_failure_reason="runner_system_failure")
    out = []
    for i in range(offset, offset + n):
        base["build_id"] = 10_000_000 + i
        base["pipeline_id"] = 1_000 + i // 50
        body = msgspec.json.encode(base)
        head = (
            "POST /webhooks/gitlab HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nX-Gitlab-Event: Job Hook\r\n"
            f"X-Gitlab-Token: {SECRET}\r\nX-Gitlab-Event-UUID: {run}-{i}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def load(port: int, requests: list[bytes]) -> dict[str, Any]:
    """Keep CONNECTIONS connections busy for WARMUP + SECONDS; measure after the warmup."""
    next_index = 0
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from = start + WARMUP
    stop_at = measure_from + SECONDS
    done_in_window = 0
    answered: list[int] = []  # indexes of requests answered 202 (any time)

    async def worker() -> None:
        nonlocal next_index, done_in_window
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                now = time.perf_counter()
                if now >= stop_at or next_index >= len(requests):
                    return
                index = next_index
                next_index += 1
                writer.write(requests[index])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                end = time.perf_counter()
                if status == 202:
                    answered.append(index)
                if now >= measure_from and end <= stop_at:
                    done_in_window += 1
                    latencies.append(end - now)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    client_busy = (time.process_time() - cpu0) / (time.perf_counter() - start)
    latencies.sort()
    return {
        "per_s": done_in_window / SECONDS,
        "client_busy": client_busy,
        "statuses": statuses,
        "sent": next_index,
        "accepted_total": len(answered),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
    }


def start_server(
    kind: str, port: int, db: str, nats_url: str, schema: str, prefix: str
) -> subprocess.Popen[bytes]:
    args = ["--serve", kind, "--port", str(port), "--db", db, "--nats", nats_url]
    args += ["--schema", schema, "--prefix", prefix]
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"READY":
        proc.kill()
        raise SystemExit(f"{kind} server did not start")
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    for line in out.decode().splitlines():
        if line.startswith("STATS "):
            return dict(json.loads(line[6:]))
    return {}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def prepare(db: str, nats_url: str, schema: str, prefix: str) -> None:
    from ciretry.common.bus import Bus
    from ciretry.common.eventstore import EventStore

    store = await EventStore.connect(db, schema, max_size=1)
    await store.migrate()
    await store.close()
    bus = await Bus.connect(nats_url, prefix=prefix, stream=prefix.upper())
    await bus.ensure_stream()
    await bus.close()


async def settle(db: str, nats_url: str, schema: str, prefix: str) -> dict[str, Any]:
    """What the ingest runs left behind: events stored, events on the bus, outbox rows."""
    import asyncpg

    from ciretry.common.bus import Bus

    conn = await asyncpg.connect(db)
    try:
        stored = int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".events'))
        outbox = int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".outbox'))
        fsync = await conn.fetchval("SHOW fsync")
        sync_commit = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    bus = await Bus.connect(nats_url, prefix=prefix, stream=prefix.upper())
    try:
        info = await bus.js.stream_info(bus.stream)
        published = int(info.state.messages)
    finally:
        await bus.close()
    return {
        "stored": stored,
        "published": published,
        "outbox_left": outbox,
        "fsync": fsync,
        "synchronous_commit": sync_commit,
    }


async def cleanup(db: str, nats_url: str, schema: str, prefix: str) -> None:
    import asyncpg

    from ciretry.common.bus import Bus

    conn = await asyncpg.connect(db)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    bus = await Bus.connect(nats_url, prefix=prefix, stream=prefix.upper())
    await bus.delete_stream()
    await bus.close()


def run_one(
    kind: str, requests: list[bytes], port: int, db: str, nats_url: str, schema: str, prefix: str
) -> dict[str, Any]:
    proc = start_server(kind, port, db, nats_url, schema, prefix)
    try:
        result: dict[str, Any] = run_loop(load(port, requests))
    finally:
        result_stats = stop_server(proc)
    result["server"] = result_stats
    return result


def main() -> None:
    from tests.support.servers import servers

    run = uuid.uuid4().hex[:10]
    schema, prefix = f"bench_{run}", f"bench{run}"
    budget = int((WARMUP + SECONDS) * 20_000)  # more requests than the server can take
    with servers() as s:
        db, nats_url = s.database_url, s.nats_url
        print(
            f"PostgreSQL and NATS: {s.how}; loop: {'uvloop' if use_uvloop() else 'asyncio'}; {CONNECTIONS} connections, "
            f"{WARMUP:g} s warm-up + {SECONDS:g} s measured, {ROUNDS} rounds"
        )
        asyncio.run(prepare(db, nats_url, schema, prefix))
        rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
        accepted = 0
        try:
            for r in range(ROUNDS):
                reqs = webhook_requests(budget, run, r * budget)
                bare = run_one("bare", reqs, free_port(), db, nats_url, schema, prefix)
                hooks = run_one("ingest", reqs, free_port(), db, nats_url, schema, prefix)
                accepted += hooks["accepted_total"]
                rounds.append((bare, hooks))
                srv = hooks["server"]
                batch = srv["events"] / srv["batches"] if srv.get("batches") else 0
                print(
                    f"  round {r + 1}: bare {bare['per_s']:7.0f} req/s {bare['statuses']}; "
                    f"webhooks {hooks['per_s']:7.0f} req/s {hooks['statuses']} "
                    f"p50 {hooks['p50_ms']:.2f} ms p99 {hooks['p99_ms']:.2f} ms; "
                    f"ratio {hooks['per_s'] / bare['per_s']:.3f}; "
                    f"{srv.get('batches', 0)} appends, {batch:.1f} events, "
                    f"{srv.get('append_ms', 0):.1f} ms each; server CPU per request: bare "
                    f"{1e6 * bare['server'].get('cpu_s', 0) / max(1, bare['sent']):.0f} us, "
                    f"ingest {1e6 * srv.get('cpu_s', 0) / max(1, hooks['sent']):.0f} us; CPU busy: "
                    f"bare server {bare['server'].get('cpu_busy', 0):.0%} client "
                    f"{bare['client_busy']:.0%}, ingest server {srv.get('cpu_busy', 0):.0%} "
                    f"client {hooks['client_busy']:.0%}"
                )
            left = asyncio.run(settle(db, nats_url, schema, prefix))
        finally:
            asyncio.run(cleanup(db, nats_url, schema, prefix))

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    hooks_per_s = med([h["per_s"] for _, h in rounds])
    bare_per_s = med([b["per_s"] for b, _ in rounds])
    ratio = med([h["per_s"] / b["per_s"] for b, h in rounds if b["per_s"]])
    p50 = med([h["p50_ms"] for _, h in rounds])
    p99 = med([h["p99_ms"] for _, h in rounds])
    skipped = sum(h["server"].get("publish_skipped", 0) for _, h in rounds)
    print(
        f"PostgreSQL fsync={left['fsync']} synchronous_commit={left['synchronous_commit']}; "
        f"webhooks answered 202 (all rounds, warm-up included): {accepted}; "
        f"events stored: {left['stored']}; in JetStream: {left['published']}; "
        f"outbox rows left: {left['outbox_left']} (fast-path publishes skipped: {skipped})"
    )
    bad = [h["statuses"] for _, h in rounds if set(h["statuses"]) != {202}]
    if bad or left["stored"] < accepted or left["published"] + left["outbox_left"] < accepted:
        print("WARNING: non-202 answers, or accepted webhooks missing from the log or the bus")
    result = {
        "webhooks_per_s": round(hooks_per_s, 1),
        "bare_per_s": round(bare_per_s, 1),
        "ratio": round(ratio, 3),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
    }
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--serve", choices=["ingest", "bare"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", default="")
    parser.add_argument("--nats", default="")
    parser.add_argument("--schema", default="")
    parser.add_argument("--prefix", default="")
    args = parser.parse_args()
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(serve(args.serve, args.port, args.db, args.nats, args.schema, args.prefix))
    else:
        main()
