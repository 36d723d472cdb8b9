"""A burst from one broken push: hundreds of jobs of one pipeline fail at once, mostly for a
deterministic reason (the commit does not compile), some on the network. ciretry as
``ciretry serve`` runs it (one ingest, one classify, two act replicas racing on the one chain).

Checked from the raw events with this test's own arithmetic, not with act's fold or replay:
every job gets exactly one decision; the chain's decisions, walked in the stream's order, spend
no more than the policy allows at each point (the job count known then, the pipeline share, the
mostly-broken stop) and no retry follows the first "mostly broken" stop; every request reaches
the provider exactly once; the merge request's explanation (``explain = "note"``) is one note,
created once and edited in place, whichever replica posts. The size is 400 jobs here (``CIRETRY_BURST_JOBS``); bench/e2e.py
``--burst`` runs the issue's 5,000 in 10 s and reports how far behind the burst anything fell.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections import Counter
from pathlib import Path

import asyncpg
import nats
import pytest

from ciretry.common.bus import Bus
from ciretry.common.events import pipeline_stream
from tests.support.chaos.processes import ServiceProcess
from tests.support.providers import FakeGitLab
from tests.support.scenario import (
    PROJECT,
    Progress,
    job_hook,
    policy_without_backoff,
    post_all,
    service_env,
)

JOBS = int(os.environ.get("CIRETRY_BURST_JOBS", "400"))
PIPELINE = 900
NETWORK_LOG = b"$ git fetch\nfatal: unable to access 'https://gitlab.example/x.git/': Could not resolve host: gitlab.example\n"
COMPILE_LOG = b"$ make\nsrc/a.c:3:1: error: unknown type name 'strin'\nmake: *** [all] Error 1\n"
#: A merge request pipeline (GitLab's detached MR pipelines run on this ref): explained on MR 7.
MR = 7
MR_REF = f"refs/merge-requests/{MR}/head"
HEADLINE = re.compile(r"^### ciretry: pipeline \d+: (.*)$", re.M)


def explained_jobs(gitlab: FakeGitLab) -> int:
    """How many jobs the MR's latest ciretry note accounts for (its headline's counts)."""
    notes = [n for n in gitlab.notes.get(MR, []) if n["author"]["username"] == "ciretry-bot"]
    found = HEADLINE.search(notes[-1]["body"]) if notes else None
    return sum(int(part.split()[0]) for part in found.group(1).split(", ")) if found else 0

pytestmark = [pytest.mark.timeout(600)]


def is_infra(i: int) -> bool:
    return i % 10 == 3  # one job in ten failed on the network; the rest cannot compile


async def test_a_burst_from_one_broken_push_stops_where_the_policy_says(
    pg_dsn: str, nats_url: str, schema: str, unique: str, tmp_path: Path
) -> None:
    gitlab = await FakeGitLab().started()
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(
        policy_without_backoff()
        .replace('explain = "off"', 'explain = "note"')
        .replace("explain_interval_s = 10.0", "explain_interval_s = 1.0")
    )
    policy = tomllib.loads(policy_path.read_text())["default"]
    env = service_env(pg_dsn=pg_dsn, schema=schema, nats_url=nats_url, prefix=f"b{unique}",
                      gitlab_url=gitlab.url, policy_path=policy_path)  # fmt: skip
    hooks = []
    for i in range(JOBS):
        job_id, name = 50_000 + i, f"build-{i:04d}"
        gitlab.add_job(job_id, name, PIPELINE, ref=MR_REF)
        gitlab.traces[job_id] = NETWORK_LOG if is_infra(i) else COMPILE_LOG
        hook = json.loads(job_hook(job_id, PIPELINE, name))
        hook["ref"] = MR_REF
        hooks.append((f"burst-{unique}-{i}", json.dumps(hook).encode()))
    procs = [ServiceProcess("ingest", env, tmp_path / "ingest.log")]
    procs += [ServiceProcess("classify", env, tmp_path / "classify.log")]
    procs += [ServiceProcess("act", env, tmp_path / f"act{i}.log") for i in range(2)]
    progress = Progress()
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(f"{env['CIRETRY_NATS_PREFIX']}.>", cb=progress.on_msg)
        procs[0].start()
        await procs[0].wait_ready()
        for p in procs[1:]:
            p.start()
        for p in procs[1:]:
            await p.wait_ready()
        statuses = await post_all(f"http://127.0.0.1:{procs[0].port}/webhooks/gitlab", hooks, 64)
        assert statuses == Counter({202: JOBS}), statuses
        await progress.wait(lambda: progress.count("RetryRequested", "RetrySkipped") >= JOBS, 400)
        await progress.wait(
            lambda: progress.count("RetryIssued", "RetryFailed") >= progress.count("RetryRequested"),
            120,
        )
        # The explainers (one per act replica) bring the note up to every job's decision.
        await progress.wait(lambda: explained_jobs(gitlab) == JOBS, 120)
    finally:
        await nc.close()
        for p in procs:
            p.stop()
        await gitlab.close()
        bus = await Bus.connect(nats_url, prefix=env["CIRETRY_NATS_PREFIX"],
                                stream=env["CIRETRY_NATS_STREAM"])  # fmt: skip
        await bus.delete_stream()
        await bus.close()

    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": schema})
    try:
        chain = await conn.fetch(
            "SELECT type, convert_from(body, 'UTF8')::jsonb AS b FROM events "
            "WHERE stream = $1 ORDER BY stream_version",
            pipeline_stream("gitlab", str(PROJECT), str(PIPELINE)),
        )
        issued = await conn.fetch(
            "SELECT convert_from(body, 'UTF8')::jsonb AS b FROM events WHERE type = 'RetryIssued'"
        )
    finally:
        await conn.close()

    # Walk the chain as it was written: what each decision could know, and what it spent.
    names: set[str] = set()
    deterministic: set[str] = set()
    requested: list[str] = []
    decided: Counter[str] = Counter()
    broken_at: int | None = None
    for position, row in enumerate(chain):
        body = json.loads(row["b"])
        if row["type"] == "JobFinished":
            names.add(body["job_name"])
            continue
        if row["type"] not in ("RetryRequested", "RetrySkipped"):
            continue
        decided[body["job_id"]] += 1
        snap = body["snapshot"]
        assert snap.get("pipeline_retries", 0) == len(requested), (position, snap)
        assert snap["pipeline_jobs"] <= len(names), (position, snap)
        assert snap.get("deterministic_failures", 0) == len(deterministic), (position, snap)
        limit = max(policy["pipeline"]["floor"],
                    int(policy["pipeline"]["percent"] * snap["pipeline_jobs"] / 100))  # fmt: skip
        assert snap["pipeline_limit"] == limit
        if row["type"] == "RetryRequested":
            assert broken_at is None, f"a retry after the pipeline was found broken at {broken_at}"
            assert len(requested) < limit
            assert len(deterministic) <= policy["mostly_broken"]["count"]
            requested.append(body["idempotency_key"])
        elif body["reason"] == "pipeline_mostly_broken":
            assert len(deterministic) > policy["mostly_broken"]["count"]
            broken_at = position if broken_at is None else broken_at
        elif body["reason"] == "not_retryable" and body["category"] == "deterministic":
            deterministic.add(body["job_name"])

    # Every job once; the stop came, and came from the policy's own numbers. (How many network
    # failures were retried before it depends on the order the verdicts came in: under load
    # more than five compile errors may be decided first, and then none is.)
    assert len(decided) == JOBS and set(decided.values()) == {1}
    assert broken_at is not None
    assert len(requested) <= max(policy["pipeline"]["floor"], int(policy["pipeline"]["percent"] * JOBS / 100))
    # At the provider: each request once, no job retried twice.
    keys = [json.loads(r["b"])["idempotency_key"] for r in issued]
    assert sorted(keys) == sorted(requested)
    calls = Counter(c.path for c in gitlab.posts("/retry"))
    assert len(calls) == len(requested) and all(n == 1 for n in calls.values())
    # The explanation: one note on the MR, created by one POST, then only edited.
    assert len(gitlab.posts(f"/merge_requests/{MR}/notes")) == 1
    assert len(gitlab.notes[MR]) == 1 and explained_jobs(gitlab) == JOBS
