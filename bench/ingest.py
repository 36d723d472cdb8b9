"""Ingest throughput: GitLab job webhooks/s through the real app vs a bare aiohttp handler.

Runs with no arguments. Uses CIRETRY_DATABASE_URL / CIRETRY_NATS_URL when set, else starts
embedded PostgreSQL and NATS (stopped at the end).

* The server under test runs in a subprocess (this script with ``--serve``) as ``ciretry serve
  ingest`` runs it: its configuration from ``CIRETRY_*`` variables (``load_config``), then
  ``run_service("ingest", config, setup)`` with ingest's own ``main.setup``: the same app (the
  tracing middleware, health and metrics routes, the webhook routes and the audit API), the
  same workers (the audit projector, the outbox sweeper, the gauge sampler), logging, metrics
  and the tracer provider as in production (no trace exporter unless ``OTEL_EXPORTER_OTLP_*``
  is set), a real EventStore (fresh schema, the server's own fsync settings) and the outbox
  fast path to a real JetStream stream (file storage). The only addition is a reference to the
  batcher, kept to print its counters at the end. No AMQP (the pulse consumer is for
  Taskcluster). A second subprocess serves a bare aiohttp handler that only returns 202. Both
  run on the stock asyncio loop (``ciretry serve`` uses ``asyncio.run``) with the same runner
  settings (no access log).
* The load generator is a keep-alive HTTP/1.1 client on raw asyncio streams (aiohttp's client
  costs several times more CPU per request, and it shares the machine's cores with the server,
  PostgreSQL and NATS), ``BENCH_CONNECTIONS`` connections each with one request in flight. Each
  webhook is a distinct failed job, so every request commits a new event; a 202 is sent only
  after the commit. At the end the stored events, the messages JetStream holds and the outbox
  rows left are counted: every accepted webhook must be in the log and on the bus.
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
import tempfile
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECRET = "bench-secret"
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "1"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
HOOK = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gitlab_webhooks"


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """The loop ``ciretry serve`` runs on (``asyncio.run``); both servers and the client."""
    return asyncio.run(main)


# --- server side (subprocess) -------------------------------------------------------------


async def serve_bare(port: int) -> None:
    from aiohttp import web

    async def bare(_: web.Request) -> web.Response:
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/webhooks/gitlab", bare)
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
    await asyncio.wait_for(runner.cleanup(), timeout=10)
    print("STATS " + json.dumps({"cpu_busy": busy, "cpu_s": cpu}), flush=True)


async def serve_ingest() -> None:
    """``ciretry serve ingest`` (``_cmd_serve``: ``load_config`` then ``run_service`` with
    ingest's ``setup``), plus a reference to the batcher for its counters."""
    from aiohttp import web

    from ciretry.common.config import load_config
    from ciretry.common.service import Infra, Worker, run_service
    from ciretry.ingest import main as ingest_main
    from ciretry.ingest.app import BATCHER, AppendBatcher

    config = load_config()
    batchers: list[AppendBatcher] = []

    async def setup(infra: Infra, app: web.Application) -> list[Worker]:
        workers = await ingest_main.setup(infra, app)
        batchers.append(app[BATCHER])
        return workers

    stop, started = asyncio.Event(), asyncio.Event()
    usage: dict[str, float] = {}

    async def account() -> None:
        await started.wait()
        print("READY", flush=True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await stop.wait()  # set by SIGTERM (run_service's handler)
        usage["cpu_s"] = time.process_time() - cpu0
        usage["cpu_busy"] = usage["cpu_s"] / (time.perf_counter() - wall0)

    accounting = asyncio.create_task(account())
    await run_service("ingest", config, setup, stop=stop, started=started)
    await accounting
    s = batchers[0].stats
    stats = {
        "batches": s.batches,
        "events": s.events,
        "largest_batch": s.largest_batch,
        "publish_skipped": s.publish_skipped,
        "append_ms": 1000 * s.append_seconds / max(1, s.batches),
    }
    print("STATS " + json.dumps({**stats, **usage}), flush=True)


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


def server_environment(port: int, db: str, nats_url: str, schema: str, prefix: str) -> dict[str, str]:
    """What a deployment of ingest would set (everything else: ``Config``'s defaults)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRETRY_")}
    env.update(
        CIRETRY_DATABASE_URL=db,
        CIRETRY_DATABASE_SCHEMA=schema,
        CIRETRY_NATS_URL=nats_url,
        CIRETRY_NATS_PREFIX=prefix,
        CIRETRY_NATS_STREAM=prefix.upper(),
        CIRETRY_HTTP_HOST="127.0.0.1",
        CIRETRY_HTTP_PORT=str(port),
        CIRETRY_GITLAB_WEBHOOK_SECRETS=SECRET,
        CIRETRY_PUSH_TOKENS="bench-push-token-0123456789",
    )
    return env


def start_server(
    kind: str, port: int, db: str, nats_url: str, schema: str, prefix: str, log: Path
) -> subprocess.Popen[bytes]:
    args = ["--serve", kind, "--port", str(port)]
    with log.open("ab") as errors:
        proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdout=subprocess.PIPE,
            stderr=errors,  # the service's own JSON log lines
            env=server_environment(port, db, nats_url, schema, prefix),
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"READY":
        proc.kill()
        tail = log.read_text(errors="replace").splitlines()[-10:]
        raise SystemExit(f"{kind} server did not start:\n" + "\n".join(tail))
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
    kind: str,
    requests: list[bytes],
    port: int,
    db: str,
    nats_url: str,
    schema: str,
    prefix: str,
    log: Path,
) -> dict[str, Any]:
    proc = start_server(kind, port, db, nats_url, schema, prefix, log)
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
            f"PostgreSQL and NATS: {s.how}; loop: asyncio; {CONNECTIONS} connections, "
            f"{WARMUP:g} s warm-up + {SECONDS:g} s measured, {ROUNDS} rounds"
        )
        asyncio.run(prepare(db, nats_url, schema, prefix))
        rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
        accepted = 0
        log = Path(tempfile.gettempdir()) / f"ciretry-bench-ingest-{run}.log"
        print(f"the ingest server's log: {log}")
        try:
            for r in range(ROUNDS):
                reqs = webhook_requests(budget, run, r * budget)
                where = (db, nats_url, schema, prefix, log)
                bare = run_one("bare", reqs, free_port(), *where)
                hooks = run_one("ingest", reqs, free_port(), *where)
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
    args = parser.parse_args()
    if args.serve == "bare":
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(serve_bare(args.port))
    elif args.serve == "ingest":
        run_loop(serve_ingest())
    else:
        main()
