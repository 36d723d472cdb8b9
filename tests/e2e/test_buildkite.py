"""One Buildkite job the agent lost, end to end on real PostgreSQL and JetStream: a signed
``job.finished`` webhook in, classify's verdict (from Buildkite's ``signal_reason``, the log
fetched from the fake Buildkite), act's decision, and exactly one retry call at the fake
Buildkite (``PUT …/jobs/:id/retry``), whose new job is what ``RetryIssued`` names."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from ciretry.common.events import (
    RetryIssued,
    RetryRequested,
    VerdictReached,
    job_stream,
    pipeline_stream,
)
from ciretry.common.ids import uuid7

from .conftest import BUILDKITE_SECRET, Stack

FIXTURE = (
    Path(__file__).resolve().parents[1]
    / "fixtures"
    / "external"
    / "buildkite"
    / "job.finished.failed.agent-stop.json"
)
PROJECT = "my-great-org/great-pipeline"
LOG = (
    b"~~~ Preparing working directory\n"
    b"$ cd /var/lib/buildkite-agent/builds/my-agent/my-great-org/great-pipeline\n"
    b"~~~ Running commands\n"
    b"$ bundle exec rspec\n"
    b"Randomized with seed 4242\n"
)


def job_finished(job_id: str, build: int) -> bytes:
    """Buildkite's documented job.finished body for a first attempt (retries_count null) of
    ``job_id`` in build ``build``, the agent having stopped under it."""
    body: dict[str, Any] = json.loads(FIXTURE.read_text())
    body["job"].update(id=job_id, retries_count=None, retry_source=None)
    body["build"]["number"] = build
    return json.dumps(body).encode()


def signature(raw: bytes) -> str:
    stamp = int(time.time())
    mac = hmac.new(BUILDKITE_SECRET.encode(), f"{stamp}.".encode() + raw, hashlib.sha256)
    return f"timestamp={stamp},signature={mac.hexdigest()}"


async def post(stack: Stack, raw: bytes) -> int:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            stack.url("ingest", "/webhooks/buildkite"),
            data=raw,
            headers={
                "Content-Type": "application/json",
                "X-Buildkite-Event": "job.finished",
                "X-Buildkite-Signature": signature(raw),
            },
        )
        return resp.status


async def test_a_lost_buildkite_job_is_verdicted_and_retried_exactly_once(stack: Stack) -> None:
    job_id = str(uuid7())
    fake = stack.buildkite
    fake.add_job(job_id, "RSpec", 2, project=PROJECT)
    fake.logs[job_id] = LOG
    raw = job_finished(job_id, 2)
    async with stack.subscription("action", "RetryIssued") as issued:
        assert await post(stack, raw) == 202
        assert await post(stack, raw) == 200  # a redelivery is stored once
        await asyncio.wait_for(issued.get(), 60)
    retried = fake.jobs[job_id]["retried_in_job_id"]
    assert retried

    puts = fake.calls_of("PUT")
    assert [c.path for c in puts] == [
        f"/v2/organizations/my-great-org/pipelines/great-pipeline/builds/2/jobs/{job_id}/retry"
    ]
    assert puts[0].headers["Authorization"] == "Bearer bkua-e2e-token"
    # classify read the log, with the token, before its verdict.
    assert any(c.path.endswith(f"/jobs/{job_id}/log.txt") for c in fake.calls)

    [verdict] = [
        e.data
        for e in await stack.store.read_stream(job_stream("buildkite", PROJECT, job_id))
        if isinstance(e.data, VerdictReached)
    ]
    assert (verdict.category, verdict.budget, verdict.action) == (
        "preempted",
        "system",
        "retry_job",
    )
    assert verdict.evidence[0].rule == "buildkite-agent-stop"
    decisions = [
        e.data
        for e in await stack.store.read_stream(pipeline_stream("buildkite", PROJECT, "2"))
        if isinstance(e.data, RetryRequested | RetryIssued)
    ]
    assert [type(d) for d in decisions] == [RetryRequested, RetryIssued]
    request, outcome = decisions
    assert isinstance(request, RetryRequested) and isinstance(outcome, RetryIssued)
    assert request.idempotency_key == f"act:buildkite:{PROJECT}:{job_id}#1:retry_job"
    assert outcome.idempotency_key == request.idempotency_key
    assert outcome.new_job_id == retried and not outcome.found_existing

    # The same webhook once more, after the retry: still stored once, still one call.
    assert await post(stack, raw) == 200
    assert len(fake.calls_of("PUT")) == 1
