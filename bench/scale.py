"""End-to-end throughput with 1, 2 and 4 replicas of classify and act (one ingest).

Failed jobs/s from the first webhook to the last provider call: every job's webhook is posted to
ingest, classify fetches its log from a fake GitLab and reaches a verdict, act decides and calls
the fake GitLab's retry endpoint. Each replica count gets a fresh schema and stream. Runs with no
arguments (embedded PostgreSQL/NATS unless CIRETRY_DATABASE_URL/CIRETRY_NATS_URL are set).

On this 2-core machine every process competes for the same two cores: the load generator, the
fake provider, ingest, N classify, N act, PostgreSQL and NATS. More replicas add concurrency
(useful while a replica waits on I/O) but no CPU, so the curve flattens, then drops as the
processes' own overhead grows. The report prints the curve as measured.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ciretry.common.bus import Bus  # noqa: E402
from tests.support.chaos.processes import ServiceProcess  # noqa: E402
from tests.support.providers import FakeGitLab  # noqa: E402
from tests.support.scenario import (  # noqa: E402
    Progress,
    job_hook,
    policy_without_backoff,
    post_all,
    service_env,
)
from tests.support.servers import servers  # noqa: E402

JOBS = 1500
PIPELINES = 100
REPLICAS = (1, 2, 4)
LOG = b"$ git fetch\nfatal: unable to access 'https://gitlab.example/x.git/': Could not resolve host: gitlab.example\n"
# Every retryable failure gets a retry: the run measures the whole path, budgets never skip it.
GENEROUS = "\n[[scopes]]\nname = \"bench\"\nprojects = [\"*\"]\n[scopes.pipeline]\nfloor = 100000\npercent = 100.0\n"


async def one_run(replicas: int, dsn: str, nats_url: str, workdir: Path) -> float:
    tag = uuid.uuid4().hex[:8]
    schema, prefix = f"bench_scale_{tag}", f"bs{tag}"
    gitlab = await FakeGitLab().started()
    policy = workdir / f"policy-{tag}.toml"
    policy.write_text(policy_without_backoff(GENEROUS))
    env = service_env(pg_dsn=dsn, schema=schema, nats_url=nats_url, prefix=prefix,
                      gitlab_url=gitlab.url, policy_path=policy)
    hooks = []
    for i in range(JOBS):
        job_id, pipeline_id, name = 10_000 + i, 700 + i % PIPELINES, f"test-{i // PIPELINES}"
        gitlab.add_job(job_id, name, pipeline_id)
        gitlab.traces[job_id] = LOG
        hooks.append((f"d-{tag}-{i}", job_hook(job_id, pipeline_id, name, sha=f"{pipeline_id:040x}")))
    procs = [ServiceProcess("ingest", env, workdir / f"{tag}-ingest.log")]
    procs += [ServiceProcess("classify", env, workdir / f"{tag}-classify{i}.log") for i in range(replicas)]
    procs += [ServiceProcess("act", env, workdir / f"{tag}-act{i}.log") for i in range(replicas)]
    progress = Progress()
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(f"{prefix}.action.RetryIssued", cb=progress.on_msg)
        procs[0].start()
        await procs[0].wait_ready()
        for p in procs[1:]:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in procs[1:]))
        t0 = time.perf_counter()
        statuses = await post_all(f"http://127.0.0.1:{procs[0].port}/webhooks/gitlab", hooks)
        assert statuses[202] == JOBS, statuses
        await progress.wait(lambda: progress.count("RetryIssued") >= JOBS, 600)
        elapsed = time.perf_counter() - t0
        calls = len(gitlab.posts("/retry"))
        assert calls == JOBS, f"{calls} provider calls for {JOBS} jobs"
    finally:
        await nc.close()
        for p in procs:
            p.stop()
        await gitlab.close()
        bus = await Bus.connect(nats_url, prefix=prefix, stream=prefix.upper())
        await bus.delete_stream()
        await bus.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return JOBS / elapsed


async def main() -> None:
    with servers() as s, tempfile.TemporaryDirectory(prefix="ciretry-scale-") as tmp:
        print(f"servers: {s.how}; {JOBS} failed jobs in {PIPELINES} pipelines per run; "
              "1 ingest + N classify + N act processes")
        results = {}
        for n in REPLICAS:
            rate = await one_run(n, s.database_url, s.nats_url, Path(tmp))
            results[n] = rate
            print(f"  {n} classify + {n} act: {rate:8.1f} failed jobs/s (webhook -> provider call)")
    base = results[REPLICAS[0]]
    print()
    print("replicas  jobs/s  vs 1")
    for n, rate in results.items():
        print(f"{n:>8}  {rate:6.1f}  {rate / base:4.2f}x")
    print("Ceiling: all processes share 2 cores; see the docstring and docs/benchmarks.md.")
    print("BENCH " + json.dumps({
        "jobs_per_s_1": round(results[1], 1), "jobs_per_s_2": round(results[2], 1),
        "jobs_per_s_4": round(results[4], 1), "ratio": round(results[4] / base, 3),
    }))


if __name__ == "__main__":
    asyncio.run(main())
