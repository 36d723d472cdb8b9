"""Ingest throughput: GitLab job webhooks/s through the real app vs a bare aiohttp handler.

Runs with no arguments. Uses CIRETRY_DATABASE_URL / CIRETRY_NATS_URL when set, else the loopback
servers (postgresql://postgres@127.0.0.1:5432/test, nats://127.0.0.1:4222).

* The server under test runs in a subprocess (this script with ``--serve``): the ingest app with
  a real EventStore (fresh schema) and the outbox fast path to a real JetStream stream, exactly
  as deployed. A second subprocess serves a bare aiohttp handler that only returns 202.
* The load generator is a keep-alive HTTP/1.1 client on raw asyncio streams (aiohttp's client
  costs several times more CPU per request, and it shares the machine's cores with the server,
  PostgreSQL and NATS). Each webhook is a distinct failed job, so every request commits a new
  event; 202s are counted only after commit, and the stored count is checked at the end.

Last line: ``BENCH {"webhooks_per_s": ..., "bare_per_s": ..., "ratio": ..., "p50_ms": ...,
"p99_ms": ...}`` (latencies are of the webhook run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

DB = os.environ.get("CIRETRY_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
NATS = os.environ.get("CIRETRY_NATS_URL") or "nats://127.0.0.1:4222"
SECRET = "bench-secret"
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "1"))
HOOK = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gitlab_webhooks"


# --- server side (subprocess) -------------------------------------------------------------


async def serve(kind: str, port: int, schema: str, prefix: str) -> None:
    from aiohttp import web

    runner_app = web.Application()
    closers: list[Any] = []
    if kind == "bare":

        async def bare(_: web.Request) -> web.Response:
            return web.Response(status=202)

        runner_app.router.add_post("/webhooks/gitlab", bare)
    else:
        from ciretry.common.bus import Bus, OutboxPublisher, Recorder
        from ciretry.common.config import Config
        from ciretry.common.eventstore import EventStore
        from ciretry.ingest.app import create_app

        store = await EventStore.connect(DB, schema, min_size=2, max_size=4)
        bus = await Bus.connect(NATS, prefix=prefix, stream=prefix.upper())
        closers += [bus.close, store.close]
        config = Config(gitlab_webhook_secrets=(SECRET,))
        runner_app = create_app(config, store, Recorder(store, OutboxPublisher(store, bus)))
    runner = web.AppRunner(runner_app, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print("READY", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        # Bounded: a benchmark server must not outlive its run.
        for close in (runner.cleanup, *closers):
            try:
                await asyncio.wait_for(close(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - report and go on closing
                print(f"shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)


# --- load generator -----------------------------------------------------------------------


def webhook_requests(port: int, n: int, run: str) -> list[bytes]:
    import msgspec

    base = json.loads((HOOK / "go-gitlab__job.json").read_text())
    base.update(build_status="failed", build_failure_reason="runner_system_failure")
    out = []
    for i in range(n):
        base["build_id"] = 10_000_000 + i
        base["pipeline_id"] = 1_000 + i // 50
        body = msgspec.json.encode(base)
        head = (
            f"POST /webhooks/gitlab HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
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

    async def worker() -> None:
        nonlocal next_index, done_in_window
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                now = time.perf_counter()
                if now >= stop_at or next_index >= len(requests):
                    return
                req = requests[next_index]
                next_index += 1
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                end = time.perf_counter()
                if now >= measure_from and end <= stop_at:
                    done_in_window += 1
                    latencies.append(end - now)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    latencies.sort()
    return {
        "per_s": done_in_window / SECONDS,
        "statuses": statuses,
        "sent": next_index,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else None,
    }


def start_server(kind: str, port: int, schema: str, prefix: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            kind,
            "--port",
            str(port),
            "--schema",
            schema,
            "--prefix",
            prefix,
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"READY":
        proc.kill()
        raise SystemExit(f"{kind} server did not start")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def prepare(schema: str, prefix: str) -> None:
    from ciretry.common.bus import Bus
    from ciretry.common.eventstore import EventStore

    store = await EventStore.connect(DB, schema, max_size=1)
    await store.migrate()
    await store.close()
    bus = await Bus.connect(NATS, prefix=prefix, stream=prefix.upper())
    await bus.ensure_stream()
    await bus.close()


async def cleanup(schema: str, prefix: str) -> int:
    import asyncpg

    from ciretry.common.bus import Bus

    conn = await asyncpg.connect(DB)
    try:
        stored = int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".events'))
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    bus = await Bus.connect(NATS, prefix=prefix, stream=prefix.upper())
    await bus.delete_stream()
    await bus.close()
    return stored


def run_one(kind: str, requests_for: Any, schema: str, prefix: str) -> dict[str, Any]:
    port = free_port()
    proc = start_server(kind, port, schema, prefix)
    try:
        return asyncio.run(load(port, requests_for(port)))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    run = uuid.uuid4().hex[:10]
    schema, prefix = f"bench_{run}", f"bench{run}"
    asyncio.run(prepare(schema, prefix))
    budget = int((WARMUP + SECONDS) * 20_000)  # more requests than the server can take
    try:
        bare = run_one("bare", lambda port: webhook_requests(port, budget, run), schema, prefix)
        hooks = run_one("ingest", lambda port: webhook_requests(port, budget, run), schema, prefix)
    finally:
        stored = asyncio.run(cleanup(schema, prefix))
    accepted = sum(v for k, v in hooks["statuses"].items() if k == 202)
    print(f"bare:     {bare['per_s']:9.0f} req/s  statuses {bare['statuses']}")
    print(
        f"webhooks: {hooks['per_s']:9.0f} req/s  statuses {hooks['statuses']}  "
        f"p50 {hooks['p50_ms']:.2f} ms  p99 {hooks['p99_ms']:.2f} ms"
    )
    print(f"events stored: {stored} (>= {accepted} accepted in the measured window)")
    if set(hooks["statuses"]) != {202} or stored < accepted:
        print("WARNING: non-202 answers or fewer events stored than accepted", file=sys.stderr)
    result = {
        "webhooks_per_s": round(hooks["per_s"], 1),
        "bare_per_s": round(bare["per_s"], 1),
        "ratio": round(hooks["per_s"] / bare["per_s"], 3) if bare["per_s"] else None,
        "p50_ms": round(hooks["p50_ms"], 2),
        "p99_ms": round(hooks["p99_ms"], 2),
    }
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["ingest", "bare"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--schema", default="")
    parser.add_argument("--prefix", default="")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port, args.schema, args.prefix))
    else:
        main()
