"""Attempt chains end to end: ``ciretry serve`` processes on real PostgreSQL and NATS, and a fake
GitLab that runs the pipelines act creates and sends their webhooks as GitLab does.

Three chains run at once, under a nemesis:

* two origin pipelines on the same ref whose ``build`` job runs out of memory every time: each is
  rerun exactly three times, with 2048, 4096 and 8192 MB (the pod died at 1024 MB; factor 2, cap
  8192), then skipped with ``resource_cap_reached``; the two never share a budget;
* one pipeline (another ref) whose ``build`` fails with ``missing_dependency_failure`` in every
  pipeline: recreated exactly three times (its per-job limit), then ``job_budget_exhausted``.

Nemeses: act killed with SIGKILL between each provider call and its record (the provider acted,
its answer never arrived), or every service killed and restarted at each step of the chains. In
both, one provider call per step. Everything is counted from the raw events and the fake's record
of calls, with the test's own code.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.chaos.processes import ServiceProcess
from tests.support.gitlab_ci import End, GitLabCI, Run, oom
from tests.support.published import decisions_until, delete_stream, read_log
from tests.support.scenario import SECRET, service_env

API_TOKEN = "chains-push-token-0123"
POLICY = """
version = 1
name = "chains"
[default.attempts]
system = 5
user = 0
[default.pipeline]
floor = 20
[default.resources]
memory_factor = 2.0
memory_cap_mb = 8192
base_memory_mb = 512

# The infrastructure chain runs on its own ref, with three retries per job.
[[scopes]]
name = "release"
refs = ["release"]
[scopes.attempts]
system = 3
"""


def script(run: Run) -> End:
    """``deploy`` always misses the artifacts of an earlier pipeline; everything else runs out
    of memory, whatever its size."""
    if run.name == "deploy":
        return End("failed", "missing_dependency_failure", b"$ fetch artifacts\n404\n")
    return oom(run)


@dataclass
class Stack:
    ci: GitLabCI
    services: dict[str, ServiceProcess]
    pg_dsn: str
    schema: str
    env: dict[str, str]
    #: Services killed and not back yet (a second kill meanwhile would kill nothing).
    down: set[str] = field(default_factory=set)
    kills: int = 0
    #: Provider calls the nemesis struck: each made by a process killed during it. Two calls
    #: under way in one process at once are both struck by its one kill.
    strikes: int = 0
    restarts: list[asyncio.Task[None]] = field(default_factory=list)

    def kill(self, *names: str) -> None:
        """SIGKILL now, back in the background: what a nemesis does inside a provider call."""
        self.strikes += 1
        for name in names:
            if name in self.down:
                continue  # the call came from the process dying already
            self.down.add(name)
            self.services[name].signal(signal.SIGKILL)
            self.kills += 1
            self.restarts.append(asyncio.get_running_loop().create_task(self._back(name)))

    async def _back(self, name: str) -> None:
        proc = self.services[name]
        await proc.wait_exit()
        proc.start()
        self.down.discard(name)  # a new process: the next kill is a real one

    async def all_up(self) -> None:
        await asyncio.gather(*self.restarts)
        await asyncio.gather(*(s.wait_ready() for s in self.services.values()))


@pytest.fixture
async def stack(
    pg_dsn: str, nats_url: str, schema: str, unique: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    ci = await GitLabCI(script=script).started()
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(POLICY)
    env = service_env(
        pg_dsn=pg_dsn,
        schema=schema,
        nats_url=nats_url,
        prefix=f"c{unique}",
        gitlab_url=ci.url,
        policy_path=policy_path,
    )
    env |= {
        "CIRETRY_PUSH_TOKENS": API_TOKEN,
        "CIRETRY_ACT_SCHEDULER_INTERVAL": "0.5",
        "CIRETRY_CONSUMER_ACK_WAIT": "5",
    }
    services = {
        name: ServiceProcess(name, env, tmp_path / f"{name}.log").start()
        for name in ("ingest", "classify", "act")
    }
    try:
        await asyncio.gather(*(s.wait_ready() for s in services.values()))
        ci.connect(f"http://127.0.0.1:{services['ingest'].port}", SECRET, API_TOKEN)
        yield Stack(ci, services, pg_dsn, schema, env)
    finally:
        for s in services.values():
            s.stop()
        await ci.close()
        await delete_stream(nats_url, env)


def finished(decisions: list[dict[str, Any]]) -> bool:
    skips = Counter(d["reason"] for d in decisions if d["type"] == "RetrySkipped")
    requests = {d["idempotency_key"] for d in decisions if d["type"] == "RetryRequested"}
    issued = {d["idempotency_key"] for d in decisions if d["type"] == "RetryIssued"}
    return (
        skips["resource_cap_reached"] >= 2
        and skips["job_budget_exhausted"] >= 1
        and requests <= issued
    )


def nemesis_kill_act(stack: Stack) -> None:
    """The provider acted; act dies before its answer arrives (nothing recorded yet)."""
    stack.kill("act")


def nemesis_restart_all(stack: Stack) -> None:
    """Every service dies at this step of the chains and comes back."""
    stack.kill("ingest", "classify", "act")


async def projected(pg_dsn: str, schema: str, within: float = 60) -> None:
    """Until the audit projector (in ingest) has applied the whole log: a state of another
    process, with no event to await, so it is polled against a deadline."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            last = await conn.fetchval(f'SELECT max(position) FROM "{schema}".events')
            done = await conn.fetchval(
                f'SELECT position FROM "{schema}".projection_position WHERE name = $1', "audit"
            )
            if done is not None and done >= last:
                return
            assert asyncio.get_running_loop().time() < deadline, (done, last)
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("nemesis", [nemesis_kill_act, nemesis_restart_all])
async def test_chains_grow_to_their_limits_once_per_step(
    stack: Stack, nats_url: str, nemesis: Callable[[Stack], None]
) -> None:
    ci = stack.ci
    ci.on_create = lambda _pid: nemesis(stack)
    origins = [ci.push("main", ["build"]), ci.push("main", ["build"]), ci.push("release", ["deploy"])]
    try:
        await decisions_until(nats_url, stack.env["CIRETRY_NATS_PREFIX"], finished, within=240)
    except AssertionError as exc:
        log = await read_log(stack.pg_dsn, stack.schema)
        lines = [f"{s} {t} {json.dumps(b)[:300]}" for s, t, b in log]
        tails = {n: p.log_tail(40) for n, p in stack.services.items()}
        raise AssertionError(f"{exc}\n" + "\n".join(lines) + f"\n{tails}") from None
    ci.on_create = None
    await ci.idle()
    await stack.all_up()
    assert stack.strikes == 9  # the nemesis struck at every step of every chain
    assert stack.kills >= 3

    # --- the provider's record: one creation per step, each from its own request ------------
    created = ci.created()
    creations = ci.posts("/pipeline")
    assert len(creations) == len(created) == 9, [ci.retry_of(p) for p in created]
    keys = [ci.retry_of(p) for p in created]
    assert len(set(keys)) == len(keys)

    # --- the log, read with the test's own code ----------------------------------------------
    log = await read_log(stack.pg_dsn, stack.schema)
    requests = {b["idempotency_key"]: (s, b) for s, t, b in log if t == "RetryRequested"}
    origin_of = {str(p): str(p) for p in origins}
    for p in created:  # each created pipeline joins the chain of the request that made it
        stream, request = requests[ci.retry_of(p)]
        origin_of[str(p["id"])] = request.get("origin_pipeline_id") or request["pipeline_id"]
    chains: dict[str, list[dict[str, Any]]] = {str(p): [] for p in origins}
    for stream, kind, body in log:
        if kind in ("RetryRequested", "RetrySkipped"):
            origin = origin_of[body["pipeline_id"]]
            # Every decision of a chain is stored in its origin's stream.
            assert stream == f"pipeline-gitlab-1-{origin}", (stream, body)
            chains[origin].append(body)

    oom_a, oom_b, infra = (chains[str(p)] for p in origins)
    for chain in (oom_a, oom_b):
        asked = [d["resources"]["memory_limit_mb"] for d in chain if "idempotency_key" in d]
        assert asked == [2048, 4096, 8192]
        assert [d.get("reason") for d in chain if "reason" in d] == ["resource_cap_reached"]
        assert "8192 MB" in chain[-1]["detail"]
    created_memory = sorted(ci.memory_of(p) or "" for p in created if ci.memory_of(p))
    assert created_memory == ["2048Mi", "2048Mi", "4096Mi", "4096Mi", "8192Mi", "8192Mi"]
    assert [d["action"] for d in infra if "idempotency_key" in d] == ["recreate_pipeline"] * 3
    assert infra[-1]["reason"] == "job_budget_exhausted"
    assert infra[-1]["snapshot"]["job_attempts"] == 3

    # One outcome per request, however often act died: found at the provider when it had
    # called before dying.
    outcomes = Counter(b["idempotency_key"] for _, t, b in log if t == "RetryIssued")
    assert set(outcomes) == set(requests) and set(outcomes.values()) == {1}

    # --- why, on the last job of a chain ------------------------------------------------------
    await projected(stack.pg_dsn, stack.schema)
    last = max(int(b["job_id"]) for b in oom_a)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "ciretry.cli", "audit", "why", "gitlab", "1", str(last), "--json"),
        env=stack.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    why = json.loads(out)
    chain = why["chain"]
    assert chain["origin_pipeline_id"] == str(origins[0])
    sizes = [a["asked_memory_mb"] or a["observed_memory_mb"] for a in chain["attempts"]]
    assert sizes == [1024, 2048, 4096, 8192]
    assert "Attempt chain from pipeline" in why["summary"]
