"""Driving a running ciretry from outside, as CI providers do: webhooks in, published events
observed on the bus. Shared by the scaling tests and bench/scale.py."""

from __future__ import annotations

import asyncio
import copy
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
SECRET = "scale-secret"
PROJECT = 1


@dataclass
class Progress:
    """Counts of distinct published events by type, from a NATS subscription (by Msg-Id)."""

    seen: dict[str, set[str]] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def count(self, *types: str) -> int:
        return sum(len(self.seen.get(t, ())) for t in types)

    async def on_msg(self, msg: nats.aio.msg.Msg) -> None:
        headers = msg.headers or {}
        kind = headers.get("Ciretry-Type", "?")
        self.seen.setdefault(kind, set()).add(headers.get("Nats-Msg-Id", ""))
        async with self.changed:
            self.changed.notify_all()

    async def wait(self, predicate: Callable[[], bool], within: float) -> None:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(predicate)

        await asyncio.wait_for(until(), within)


def job_hook(job_id: int, pipeline_id: int, name: str, sha: str = "abc123") -> bytes:
    """A failed job's GitLab hook. ``sha``: the commit (default: the one the fake provider's refs
    point at); pipelines of different pushes have different commits."""
    hook = copy.deepcopy(
        json.loads((FIXTURES / "gitlab_webhooks" / "go-gitlab__job.json").read_text())
    )
    hook.update(
        build_id=job_id,
        build_status="failed",
        build_failure_reason="script_failure",
        project_id=PROJECT,
        pipeline_id=pipeline_id,
        build_name=name,
        ref="main",
        sha=sha,
    )
    return json.dumps(hook).encode()


async def post_all(url: str, hooks: list[tuple[str, bytes]], concurrency: int = 32) -> Counter[int]:
    statuses: Counter[int] = Counter()
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for h in hooks:
        queue.put_nowait(h)
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while not queue.empty():
                delivery, body = queue.get_nowait()
                for _ in range(20):  # a 503 asks the sender to retry, as GitLab does
                    async with session.post(
                        url,
                        data=body,
                        headers={
                            "Content-Type": "application/json",
                            "X-Gitlab-Event": "Job Hook",
                            "X-Gitlab-Token": SECRET,
                            "X-Gitlab-Event-UUID": delivery,
                        },
                    ) as r:
                        if r.status != 503:
                            statuses[r.status] += 1
                            break
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def service_env(
    *,
    pg_dsn: str,
    schema: str,
    nats_url: str,
    prefix: str,
    gitlab_url: str,
    policy_path: Path,
    stream_replicas: int = 1,
) -> dict[str, str]:
    """Environment for ``ciretry serve`` processes of one isolated deployment."""
    from tests.support.chaos.processes import base_env

    return base_env(
        CIRETRY_DATABASE_URL=pg_dsn,
        CIRETRY_DATABASE_SCHEMA=schema,
        CIRETRY_DATABASE_POOL_MAX="8",
        CIRETRY_NATS_URL=nats_url,
        CIRETRY_NATS_PREFIX=prefix.lower(),
        CIRETRY_NATS_STREAM=prefix.upper(),
        CIRETRY_NATS_STREAM_REPLICAS=str(stream_replicas),
        CIRETRY_GITLAB_URL=gitlab_url,
        CIRETRY_GITLAB_TOKEN="glpat-scale",
        CIRETRY_GITLAB_WEBHOOK_SECRETS=SECRET,
        CIRETRY_POLICY_PATH=str(policy_path),
        CIRETRY_CLASSIFY_POD_GRACE="0",
        CIRETRY_CONSUMER_ACK_WAIT="10",
        CIRETRY_CONSUMER_FETCH_TIMEOUT="0.2",
        CIRETRY_OUTBOX_GRACE="1",
        CIRETRY_LOG_LEVEL="WARNING",
        CIRETRY_HTTP_HOST="127.0.0.1",
    )


def policy_without_backoff(extra: str = "") -> str:
    """The default policy with every backoff at zero (runs measure decisions, not waiting)."""
    from ciretry.act.policy import default_policy_text

    policy = default_policy_text()
    for value in ("30.0", "10.0"):
        policy = policy.replace(f"base_s = {value}", "base_s = 0.0")
    return policy + extra
