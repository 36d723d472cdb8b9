"""Horizontal scaling, proven: 1 ingest, 3 classify and 4 act processes on one PostgreSQL and one
NATS (and on a 3-node NATS cluster), thousands of failing jobs, replicas killed mid-run with
SIGTERM and SIGKILL; afterwards every job has exactly one verdict and one decision, no budget
was overspent, and no job was retried twice at the provider."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import nats
import pytest

from ciretry.act.replay import replay
from ciretry.common.bus import Bus
from ciretry.common.eventstore import EventStore
from tests.support.chaos.processes import NatsCluster, ServiceProcess
from tests.support.providers import FakeGitLab
from tests.support.scenario import (
    Progress,
    job_hook,
    policy_without_backoff,
    post_all,
    service_env,
)

NETWORK_LOG = b"$ git fetch\nfatal: unable to access 'https://gitlab.example/x.git/': Could not resolve host: gitlab.example\n"
OOM_LOG = b"$ make -j8\nERROR: Job failed: command terminated with exit code 137\n"
COMPILE_LOG = b"$ make\nsrc/a.c:3:1: error: unknown type name 'strin'\nmake: *** [all] Error 1\n"


def job_log(i: int) -> bytes:
    """Mostly retryable failures (so budgets, not classification, decide), a few OOMs and a
    couple of deterministic failures per pipeline."""
    k = i % 50
    if k == 0:
        return COMPILE_LOG
    if k in (1, 2):
        return OOM_LOG
    return NETWORK_LOG


@pytest.fixture
async def scale_env(
    pg_dsn: str, schema: str, unique: str, tmp_path: Path
) -> AsyncIterator[Callable[..., dict[str, str]]]:
    gitlab = await FakeGitLab().started()
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy_without_backoff())

    def env(nats_url: str, replicas: int = 1) -> dict[str, str]:
        return service_env(
            pg_dsn=pg_dsn,
            schema=schema,
            nats_url=nats_url,
            prefix=f"s{unique}",
            gitlab_url=gitlab.url,
            policy_path=policy_path,
            stream_replicas=replicas,
        )

    env.gitlab = gitlab  # type: ignore[attr-defined]
    env.logs = tmp_path  # type: ignore[attr-defined]
    try:
        yield env
    finally:
        await gitlab.close()


async def run_scenario(
    env: dict[str, str],
    gitlab: FakeGitLab,
    logs: Path,
    nats_url: str,
    pg_dsn: str,
    schema: str,
    *,
    jobs: int,
    pipelines: int,
    kill_at: tuple[int, int],
) -> None:
    prefix, stream_name = env["CIRETRY_NATS_PREFIX"], env["CIRETRY_NATS_STREAM"]
    hooks = []
    for i in range(jobs):
        job_id, pipeline_id = 10_000 + i, 500 + i % pipelines
        name = f"test-{i // pipelines}"
        gitlab.add_job(job_id, name, pipeline_id)
        gitlab.traces[job_id] = job_log(i)
        hooks.append((f"delivery-{i}", job_hook(job_id, pipeline_id, name, sha=f"{pipeline_id:040x}")))

    procs = [ServiceProcess("ingest", env, logs / "ingest.log")]
    procs += [ServiceProcess("classify", env, logs / f"classify{i}.log") for i in range(3)]
    procs += [ServiceProcess("act", env, logs / f"act{i}.log") for i in range(4)]
    ingest, classify, act = procs[0], procs[1:4], procs[4:]
    progress = Progress()
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(f"{prefix}.>", cb=progress.on_msg)
        ingest.start()
        await ingest.wait_ready()  # creates the stream and schema first
        for p in procs[1:]:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in procs[1:]))

        poster = asyncio.create_task(
            post_all(f"http://127.0.0.1:{ingest.port}/webhooks/gitlab", hooks)
        )
        # Mid-run: one classify and one act drain and leave (SIGTERM) ...
        await progress.wait(lambda: progress.count("VerdictReached") >= kill_at[0], 180)
        classify[0].signal(signal.SIGTERM)
        act[0].signal(signal.SIGTERM)
        assert await classify[0].wait_exit() == 0
        assert await act[0].wait_exit() == 0
        # ... and one of each dies on the spot (SIGKILL): in-flight messages come back later.
        await progress.wait(lambda: progress.count("VerdictReached") >= kill_at[1], 180)
        classify[1].signal(signal.SIGKILL)
        act[1].signal(signal.SIGKILL)
        statuses = await poster
        assert set(statuses) <= {200, 202} and sum(statuses.values()) == jobs, statuses

        decisions = ("RetryRequested", "RetrySkipped")
        await progress.wait(
            lambda: progress.count("VerdictReached") >= jobs and progress.count(*decisions) >= jobs,
            240,
        )

        def settled() -> bool:
            return progress.count("RetryIssued") + progress.count("RetryFailed") >= progress.count(
                "RetryRequested"
            )

        await progress.wait(settled, 60)
    finally:
        await nc.close()
        for p in procs:
            p.stop()

    await check_invariants(pg_dsn, schema, gitlab, jobs=jobs)
    bus = await Bus.connect(nats_url, prefix=prefix, stream=stream_name)
    await bus.delete_stream()
    await bus.close()


async def check_invariants(pg_dsn: str, schema: str, gitlab: FakeGitLab, *, jobs: int) -> None:
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": schema})
    try:
        counts = dict(await conn.fetch("SELECT type, count(*) FROM events GROUP BY type"))
        per_job = await conn.fetch(
            "SELECT stream, count(*) AS n FROM events WHERE type = 'VerdictReached' GROUP BY stream"
        )
        requests = await conn.fetch(
            "SELECT convert_from(body, 'UTF8')::jsonb AS b FROM events WHERE type = 'RetryRequested'"
        )
        issued = await conn.fetch(
            "SELECT convert_from(body, 'UTF8')::jsonb AS b FROM events WHERE type = 'RetryIssued'"
        )
    finally:
        await conn.close()
    # Every job stored once; every failed job has exactly one verdict and one decision.
    assert counts["JobFinished"] == jobs
    assert len(per_job) == jobs and all(r["n"] == 1 for r in per_job)
    decisions = counts.get("RetryRequested", 0) + counts.get("RetrySkipped", 0)
    assert decisions == jobs, counts
    # No budget overspent at the time of any decision (act's own replay verifier).
    store = await EventStore.connect(pg_dsn, schema, max_size=2)
    try:
        report = await replay(store)
    finally:
        await store.close()
    assert report.violations == [], report.violations[:5]
    assert report.requests == counts.get("RetryRequested", 0) > 0
    # At the provider: every request issued exactly once, no job retried twice.
    keys = [json.loads(r["b"])["idempotency_key"] for r in issued]
    assert len(keys) == len(set(keys)) == len(requests)
    retry_calls = Counter(c.path for c in gitlab.posts("/retry"))
    assert all(n == 1 for n in retry_calls.values()), retry_calls.most_common(3)
    pipeline_calls = Counter(
        v["value"]
        for c in gitlab.posts("/pipeline")
        for v in c.body["variables"]
        if v["key"] == "CIRETRY_RETRY_OF"
    )
    assert all(n == 1 for n in pipeline_calls.values()), pipeline_calls.most_common(3)
    # One call behind every RetryIssued. Some may say found_existing: an act replica killed
    # between its call and its RetryIssued left the retry to be found by the next replica,
    # which recorded it instead of calling again. The fake's ids tell that a found retry is
    # the one call made for that job, not a second.
    assert len(retry_calls) + len(pipeline_calls) == len(issued), (
        len(retry_calls),
        len(pipeline_calls),
        len(issued),
    )
    for r in issued:
        b = json.loads(r["b"])
        if b.get("new_job_id"):
            new, old = gitlab.jobs[int(b["new_job_id"])], gitlab.jobs[int(b["job_id"])]
            assert new["name"] == old["name"] and new["pipeline_id"] == old["pipeline_id"], b
        else:
            assert pipeline_calls[b["idempotency_key"]] == 1, b


@pytest.mark.slow
async def test_scaled_run_on_one_nats_survives_sigterm_and_sigkill(
    scale_env: Callable[..., dict[str, str]], nats_url: str, pg_dsn: str, schema: str
) -> None:
    env = scale_env(nats_url)
    await run_scenario(
        env,
        scale_env.gitlab,
        scale_env.logs,
        nats_url,
        pg_dsn,
        schema,  # type: ignore[attr-defined]
        jobs=5000,
        pipelines=50,
        kill_at=(1000, 2500),
    )


@pytest.mark.slow
async def test_scaled_run_on_a_three_node_nats_cluster(
    scale_env: Callable[..., dict[str, str]], pg_dsn: str, schema: str
) -> None:
    cluster = NatsCluster(3).start()
    try:
        await cluster.wait_jetstream()
        env = scale_env(cluster.urls[0], replicas=3)
        await run_scenario(
            env,
            scale_env.gitlab,
            scale_env.logs,
            cluster.urls[0],
            pg_dsn,
            schema,  # type: ignore[attr-defined]
            jobs=1000,
            pipelines=20,
            kill_at=(200, 500),
        )
    finally:
        cluster.stop()
