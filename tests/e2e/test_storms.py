"""A retry storm end to end: ``ciretry serve`` processes (ingest, classify, two act replicas) on
real PostgreSQL and NATS, and a fake GitLab that runs the pipelines and sends their webhooks.

Pipelines, pushed one after the other on their own branches, all fail the same way: the image
registry answers 503. The breaker parks (``[storm] mode = "park"``, three pipelines make a
storm, quiet after 5 s, jitter 2 s). What the test checks, from the log and the fake's record
with its own code: one incident; the jobs decided after it are parked with no budget spent; once
the registry failure stops appearing the storm ends once and every parked job is retried exactly
once (and passes: the registry is back), spread over the jitter; no job is retried twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos.processes import ServiceProcess
from tests.support.gitlab_ci import End, GitLabCI, Run
from tests.support.published import Published, delete_stream, read_log
from tests.support.scenario import SECRET, service_env

API_TOKEN = "storms-push-token-0123"
BRANCHES = [f"feature-{n}" for n in range(16)]
REGISTRY_DOWN = (
    b"$ docker pull registry.example.com/ci/image:1.4\n"
    b"Error response from daemon: received unexpected HTTP status: 503 Service Unavailable\n"
    b"ERROR: Job failed: exit code 1\n"
)
POLICY = """
version = 1
name = "storms"
[default.attempts]
system = 3
[default.pipeline]
floor = 5
[storm]
mode = "park"
pipelines = 3
window_s = 300
quiet_s = 5
jitter_s = 2
"""


def registry_outage(run: Run) -> End:
    """Every first run meets the registry down; a retry finds it back."""
    if run.previous_runs == 0:
        return End("failed", "script_failure", REGISTRY_DOWN, exit_code=1)
    return End()


@pytest.fixture
async def deployment(
    pg_dsn: str, nats_url: str, schema: str, unique: str, tmp_path: Path
) -> AsyncIterator[tuple[GitLabCI, dict[str, str]]]:
    ci = await GitLabCI(script=registry_outage).started()
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(POLICY)
    env = service_env(
        pg_dsn=pg_dsn, schema=schema, nats_url=nats_url, prefix=f"s{unique}",
        gitlab_url=ci.url, policy_path=policy_path,
    )  # fmt: skip
    env |= {"CIRETRY_PUSH_TOKENS": API_TOKEN, "CIRETRY_ACT_SCHEDULER_INTERVAL": "0.5"}
    services = [
        ServiceProcess(name, env, tmp_path / f"{name}-{n}.log").start()
        for n, name in enumerate(("ingest", "classify", "act", "act"))
    ]
    try:
        await asyncio.gather(*(s.wait_ready() for s in services))
        ci.connect(f"http://127.0.0.1:{services[0].port}", SECRET, API_TOKEN)
        yield ci, env
    finally:
        for s in services:
            s.stop()
        await ci.close()
        await delete_stream(nats_url, env)


def decided(events: list[dict[str, Any]]) -> int:
    """Jobs with a first decision: retried at once, or parked."""
    return len({e["job_id"] for e in events if e["type"] in ("RetryRequested", "RetryParked")})


def parked(events: list[dict[str, Any]]) -> int:
    return len({e["job_id"] for e in events if e["type"] == "RetryParked"})


def settled(events: list[dict[str, Any]]) -> bool:
    """The storm ended and every parked job's retry was issued."""
    parked = {e["job_id"] for e in events if e["type"] == "RetryParked"}
    issued = {e["job_id"] for e in events if e["type"] == "RetryIssued"}
    ended = any(e["type"] == "StormEnded" for e in events)
    return ended and bool(parked) and parked <= issued


@pytest.mark.slow
async def test_a_registry_outage_across_pipelines_parks_then_retries_each_job_once(
    deployment: tuple[GitLabCI, dict[str, str]], pg_dsn: str, schema: str, nats_url: str
) -> None:
    ci, env = deployment
    published = await Published.subscribe(
        nats_url, env["CIRETRY_NATS_PREFIX"], topics=("action", "storm")
    )
    try:
        # One push at a time, each awaited until its job is decided, as pushes come apart in
        # time; until two jobs were parked (act reads a storm's start within half a second of
        # its recording, so the first pushes after it may still be retried).
        for n, branch in enumerate(BRANCHES, 1):
            ci.push(branch, ["build"])
            await ci.idle()
            await published.until(lambda events, n=n: decided(events) >= n, within=120)
            if parked(published.events) >= 2:
                break
        await published.until(settled, within=180)
    finally:
        await published.close()
    await ci.idle()

    log = await read_log(pg_dsn, schema)
    types = Counter(t for _, t, _ in log)
    assert types["StormStarted"] == 1 and types["StormEnded"] == 1, types
    started = next(b for _, t, b in log if t == "StormStarted")
    ended = next(b for _, t, b in log if t == "StormEnded")
    assert started["threshold"] == 3 and started["pipeline_count"] >= 3
    assert started["category"] == "infra_network" and started.get("mode", "park") == "park"

    parks = [b for _, t, b in log if t == "RetryParked"]
    parked_jobs = {b["job_id"] for b in parks}
    assert parked_jobs and all(b["storm_id"] == started["storm_id"] for b in parks)
    requests = [b for _, t, b in log if t == "RetryRequested"]
    requested_jobs = Counter(b["job_id"] for b in requests)
    # Every failed job is retried once: the ones before the storm at once, the parked ones after.
    first_runs = {str(r.job_id) for r in ci.runs if r.previous_runs == 0}
    assert set(requested_jobs) == first_runs and set(requested_jobs.values()) == {1}
    assert ended["parked_count"] == len(parked_jobs)

    # A park spends nothing: the first request after the storm for a parked job finds the
    # chain's budget untouched (no attempt charged to it yet).
    end_at = dt.datetime.fromisoformat(ended["ended_at"])
    released = [r for r in requests if r["job_id"] in parked_jobs]
    assert len(released) == len(parked_jobs)
    assert all(r["snapshot"].get("job_attempts", 0) == 0 for r in released), released
    # Spread over the jitter (from each request's key): not all at once, none before the end.
    not_before = [dt.datetime.fromisoformat(r["not_before"]) for r in released if r.get("not_before")]
    assert all(end_at <= t for t in not_before)
    assert len(set(not_before)) == len(not_before)

    # The provider's record: each job retried exactly once, and every retry passed.
    retries = Counter(c.path for c in ci.calls_of("POST", "/retry"))
    assert len(retries) == len(first_runs) and set(retries.values()) == {1}, retries
    assert all(
        r.previous_runs == 1 and ci.jobs[r.job_id]["status"] == "success"
        for r in ci.runs
        if r.previous_runs > 0
    )
