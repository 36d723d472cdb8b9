"""ciretry beside its floor: the same open-loop load on the same I/O, with nothing else.

``bench/e2e.py`` says how fast ciretry serves failed jobs on this machine; this says how fast the
machine itself could, so that its ratio separates what ciretry costs from what two cores allow.
The floor (the reference) is three processes doing only the I/O a job needs on ciretry's path,
over the same PostgreSQL, NATS JetStream (a file stream), fake GitLab, logs and load generator:

- ingest: an aiohttp handler checks the webhook's token in constant time, decodes the JSON,
  commits the payload (one row; concurrent webhooks share one INSERT and commit), publishes the
  job to JetStream and answers 202;
- classify: a pull consumer (up to 64 messages at once) fetches the job's log through aiohttp,
  runs the classify engine's own Hyperscan database over it with no Python work per match (the
  scan floor ``bench/classify.py`` measures; on a thread above 256 KiB, as ciretry does),
  commits a verdict row, publishes it and acks;
- act: a pull consumer commits a decision row, POSTs the retry, commits the outcome row, acks.

Left out, because the floor has no features: deduplication of deliveries and events, tracking
rows (exactly-once), the outbox, budgets, claims and the check before each call, attempt chains,
failure signatures, the audit read models, spans and metrics. So the floor is a ceiling no
implementation of ciretry's guarantees reaches; the gap per process is where ciretry's own work
goes.

Steps alternate, ciretry then the floor at each rate, both deployments up all along (the idle
one's background work, ciretry's projector and followers polling, counts in PostgreSQL's CPU).
Ends with ``BENCH {"ciretry_max_rate_p99_under_1s", "floor_max_rate_p99_under_1s",
"ciretry_cpu_ms_per_job", "floor_cpu_ms_per_job", "ratio"}``: CPU milliseconds per job, every
process counted (PostgreSQL, NATS, the load generator and its fake too), at 500 offered (the
rate issue 20 asks for) or else at the last step, and the ratio ciretry's highest offered rate
with p99 under a second over the floor's.

    python bench/e2e_floor.py [--rates 100 250 500 1000] [--seconds 5]

``--serve ingest|classify|act`` runs one floor process (what the bench starts).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import nats
from aiohttp import web
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from e2e import (  # noqa: E402
    GENEROUS,
    SEED,
    CpuMeter,
    Deployment,
    TimedGitLab,
    _fixed,
    blobs_for_steps,
    deployment,
    fetch_rows,
    run_step,
    server_processes,
    summarize,
)

from ciretry.common.embedded import free_port  # noqa: E402
from tests.support.chaos.processes import wait_http_ready  # noqa: E402
from tests.support.scenario import SECRET, policy_without_backoff  # noqa: E402
from tests.support.servers import servers  # noqa: E402

#: Messages a floor consumer holds at once (ciretry's default consumer concurrency).
CONCURRENCY = 64
#: Logs up to this size are scanned on the event loop, larger ones on a thread (as classify).
INLINE_SCAN_BYTES = 256 * 1024
#: The floor's rows, and the stage names ``bench/e2e.py``'s report gives them.
STAGE_OF = {"job": "JobFinished", "verdict": "VerdictReached", "decision": "RetryRequested"}


class GroupCommit:
    """Rows from concurrent tasks, committed together: while one INSERT runs, the next batch
    gathers (the group commit ciretry's ``AppendBatcher`` does, without its bookkeeping)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.pending: list[tuple[str, int, bytes, asyncio.Future[None]]] = []
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def add(self, kind: str, job_id: int, body: bytes) -> None:
        done = asyncio.get_running_loop().create_future()
        self.pending.append((kind, job_id, body, done))
        self.wake.set()
        await done

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.pending = self.pending, []
            if not batch:
                continue
            try:
                await self.pool.execute(
                    "INSERT INTO floor_events (kind, job_id, body) "
                    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])",
                    [k for k, _, _, _ in batch],
                    [j for _, j, _, _ in batch],
                    [b for _, _, b, _ in batch],
                )
            except Exception as exc:  # noqa: BLE001 - each waiter gets the error
                for *_, done in batch:
                    done.set_exception(exc)
            else:
                for *_, done in batch:
                    done.set_result(None)


async def _connect(env: dict[str, str]) -> tuple[asyncpg.Pool, Any]:
    pool = await asyncpg.create_pool(
        env["FLOOR_DSN"], min_size=2, max_size=8,
        server_settings={"search_path": env["FLOOR_SCHEMA"]},
    )  # fmt: skip
    nc = await nats.connect(env["FLOOR_NATS"])
    return pool, nc.jetstream()


async def serve_ingest(env: dict[str, str]) -> None:
    pool, js = await _connect(env)
    commits = GroupCommit(pool)
    subject = env["FLOOR_PREFIX"] + ".job"
    secret = SECRET.encode()

    async def webhook(request: web.Request) -> web.Response:
        token = request.headers.get("X-Gitlab-Token", "").encode()
        if not hmac.compare_digest(token, secret):
            return web.Response(status=401, text="bad token")
        body = await request.read()
        try:
            hook = msgspec.json.decode(body)
            job = [int(hook["build_id"]), int(hook["project_id"])]
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return web.Response(status=400, text="not a job hook")
        await commits.add("job", job[0], body)
        await js.publish(subject, msgspec.json.encode(job))
        return web.Response(status=202)

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/webhooks/gitlab", webhook)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(env["FLOOR_PORT"])).start()
    await asyncio.Event().wait()


async def _consume(js: Any, env: dict[str, str], topic: str, handle: Any) -> None:
    """Pull ``topic``'s messages, up to ``CONCURRENCY`` handled at once, each acked after."""
    stream, prefix = env["FLOOR_STREAM"], env["FLOOR_PREFIX"]
    config = ConsumerConfig(
        durable_name=topic, ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
        filter_subject=f"{prefix}.{topic}", max_ack_pending=1000,
    )  # fmt: skip
    sub = await js.pull_subscribe(f"{prefix}.{topic}", durable=topic, stream=stream, config=config)
    running: set[asyncio.Task[None]] = set()

    async def one(msg: Any) -> None:
        await handle(msgspec.json.decode(msg.data))
        await msg.ack()

    print("ready", flush=True)
    while True:
        room = CONCURRENCY - len(running)
        if room <= 0:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            continue
        try:
            msgs = await sub.fetch(min(64, room), timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            task = asyncio.create_task(one(msg))
            running.add(task)
            task.add_done_callback(running.discard)


async def serve_classify(env: dict[str, str]) -> None:
    from ciretry.classify.engine import Scanner
    from ciretry.classify.rules import load_ruleset

    pool, js = await _connect(env)
    commits = GroupCommit(pool)
    session = aiohttp.ClientSession()
    backend: Any = Scanner(load_ruleset())._backend
    subject = env["FLOOR_PREFIX"] + ".verdict"
    base = env["FLOOR_GITLAB"] + "/api/v4/projects"

    def ignore(*_args: object) -> None:
        return None

    def scan(data: bytes) -> None:
        backend.db.scan(data, match_event_handler=ignore, scratch=backend.scratch)

    async def handle(job: list[int]) -> None:
        async with session.get(f"{base}/{job[1]}/jobs/{job[0]}/trace") as resp:
            data = await resp.read()
        if len(data) <= INLINE_SCAN_BYTES:
            scan(data)
        else:
            await asyncio.to_thread(scan, data)
        await commits.add("verdict", job[0], b"infra_network")
        await js.publish(subject, msgspec.json.encode(job))

    await _consume(js, env, "job", handle)


async def serve_act(env: dict[str, str]) -> None:
    pool, js = await _connect(env)
    commits = GroupCommit(pool)
    session = aiohttp.ClientSession()
    base = env["FLOOR_GITLAB"] + "/api/v4/projects"

    async def handle(job: list[int]) -> None:
        await commits.add("decision", job[0], b"retry_job")
        async with session.post(f"{base}/{job[1]}/jobs/{job[0]}/retry") as resp:
            answer = await resp.read()
        await commits.add("outcome", job[0], answer)

    await _consume(js, env, "verdict", handle)


async def floor_stage_times(dsn: str, schema: str, jobs: set[int]) -> dict[int, dict[str, float]]:
    rows = await fetch_rows(
        dsn, schema,
        "SELECT kind, job_id, extract(epoch FROM recorded_at) AS at FROM floor_events "
        "WHERE job_id = ANY($1::bigint[])",
        list(jobs),
    )  # fmt: skip
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        stage = STAGE_OF.get(row["kind"])
        if stage is not None:
            out.setdefault(row["job_id"], {}).setdefault(stage, float(row["at"]))
    return out


def start_floor(role: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """One floor process; classify and act say ``ready`` on stdout once bound."""
    return subprocess.Popen(
        [sys.executable, __file__, "--serve", role], env=env, stdout=subprocess.PIPE
    )


@asynccontextmanager
async def floor_deployment(blobs: list[bytes], dsn: str, nats_url: str) -> AsyncIterator[Deployment]:
    tag = uuid.uuid4().hex[:8]
    schema, prefix = f"bench_floor_{tag}", f"fl{tag}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(
        f'CREATE TABLE "{schema}".floor_events (position bigint GENERATED ALWAYS AS IDENTITY '
        "PRIMARY KEY, kind text NOT NULL, job_id bigint NOT NULL, body bytea NOT NULL, "
        "recorded_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    await conn.close()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=prefix.upper(), subjects=[f"{prefix}.>"],
                                     storage=StorageType.FILE))  # fmt: skip
    gitlab = await TimedGitLab(blobs).started()
    port = free_port()
    env = {**os.environ, "FLOOR_DSN": dsn, "FLOOR_SCHEMA": schema, "FLOOR_NATS": nats_url,
           "FLOOR_PREFIX": prefix, "FLOOR_STREAM": prefix.upper(), "FLOOR_GITLAB": gitlab.url,
           "FLOOR_PORT": str(port)}  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for role in ("ingest", "classify", "act"):
            procs[role] = start_floor(role, env)
        for role in ("classify", "act"):  # each says so once its consumer is bound
            out = procs[role].stdout
            assert out is not None
            line = await asyncio.to_thread(out.readline)
            if line.strip() != b"ready":
                raise RuntimeError(f"floor {role} did not start: {line!r}")
        await wait_http_ready(f"http://127.0.0.1:{port}/readyz", procs["ingest"], "floor ingest")
        meter = CpuMeter({
            **{f"floor {n}": _fixed(p.pid) for n, p in procs.items()},
            "postgres": server_processes("postgres"),
            "nats": server_processes("nats-server"),
            "load+fake": _fixed(os.getpid()),
        })  # fmt: skip
        url = f"http://127.0.0.1:{port}/webhooks/gitlab"
        yield Deployment(dsn, schema, gitlab, url, meter, tag,
                         partial(floor_stage_times, dsn, schema))  # fmt: skip
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)
        await gitlab.close()
        await js.delete_stream(prefix.upper())
        await nc.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def cpu_per_job(result: dict[str, Any]) -> float:
    return round(sum(result["cpu_per_1000"].values()), 2)


async def side_by_side(rates: list[int], seconds: float) -> dict[str, Any]:
    rng = random.Random(SEED)
    blobs = blobs_for_steps(rng)
    how: list[str] = []
    results: dict[str, list[dict[str, Any]]] = {"ciretry": [], "floor": []}
    rngs = {name: random.Random() for name in results}
    for each in rngs.values():  # the same jobs and logs for both, as e2e.py offers them
        each.setstate(rng.getstate())
    with servers() as s:
        async with (
            deployment(blobs, policy_without_backoff(GENEROUS), how, on=s) as ciretry,
            floor_deployment(blobs, s.database_url, s.nats_url) as floor,
        ):
            print(f"servers: {how[0]}; steps {rates} jobs/s for {seconds:g} s each, ciretry "
                  "then the floor at each; logs 90% 10 KB / 9% 1 MB / 1% 20 MB")  # fmt: skip
            for rate in rates:
                for name, d in (("ciretry", ciretry), ("floor", floor)):
                    print(f"\n### {name}")
                    results[name].append(await run_step(d, rate, seconds, rngs[name]))
                if not all(r[-1]["drained"] for r in results.values()):
                    break
    print("\n### ciretry")
    mine = summarize(results["ciretry"])
    print("\n### floor")
    ref = summarize(results["floor"])
    print("\nCPU ms per job by process (ciretry / floor); the cores give 2,000 / rate:")
    for c, f in zip(results["ciretry"], results["floor"], strict=False):
        print(f"  {c['rate']:>5} offered: ciretry {c['achieved']:.1f} jobs/s, "
              f"p99 {c['pct']['total']['p99'] * 1000:.0f} ms, {cpu_per_job(c):.2f} ms; floor "
              f"{f['achieved']:.1f} jobs/s, p99 {f['pct']['total']['p99'] * 1000:.0f} ms, "
              f"{cpu_per_job(f):.2f} ms")  # fmt: skip
        for label, r in (("ciretry", c), ("floor", f)):
            print(f"      {label:<8}" + ", ".join(
                f"{k.removeprefix('floor ')} {v:.2f}" for k, v in r["cpu_per_1000"].items()))  # fmt: skip
    # CPU per job at the rate (500), else at the last step both ran.
    pairs = list(zip(results["ciretry"], results["floor"], strict=False))
    c_at, f_at = next(((c, f) for c, f in pairs if c["rate"] == 500), pairs[-1])
    best_floor = ref["max_rate_p99_under_1s"]
    return {
        "ciretry_max_rate_p99_under_1s": mine["max_rate_p99_under_1s"],
        "floor_max_rate_p99_under_1s": best_floor,
        "cpu_at_rate": c_at["rate"],
        "ciretry_cpu_ms_per_job": cpu_per_job(c_at),
        "floor_cpu_ms_per_job": cpu_per_job(f_at),
        "ratio": round(mine["max_rate_p99_under_1s"] / best_floor, 3) if best_floor else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve", choices=["ingest", "classify", "act"],
                        help="run one floor process (the bench starts them)")  # fmt: skip
    args = parser.parse_args()
    if args.serve:
        serve = {"ingest": serve_ingest, "classify": serve_classify, "act": serve_act}
        asyncio.run(serve[args.serve](dict(os.environ)))
        return
    figures = asyncio.run(side_by_side(args.rates, args.seconds))
    print("BENCH " + json.dumps(figures))


if __name__ == "__main__":
    main()
