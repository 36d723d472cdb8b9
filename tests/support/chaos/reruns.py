"""Retries that fail again, for the chaos run, and the budget invariant computed from raw events.

Without reruns every retry of the chaos run is its last word: no attempt limit, chain or size cap
is ever reached end to end. Here a seeded share of the jobs is *sticky*: whatever act does (retry
the job, recreate its pipeline, rerun it with more memory), the new attempt fails again the same
way, and the fake GitLab reports it as GitLab would (a job hook for the new job; for a new
pipeline, first its pipeline hook with its variables, except for a share of them whose hook is
"lost", so act must find the link at the provider). The chains then run into their limits while
the nemesis kills and restarts everything.

``budget_violations`` checks the budgets from the raw events and the fake's record with this
module's own code, not the product's replay: which chain a pipeline belongs to comes from the
provider's side (the ``CIRETRY_RETRY_OF`` variable of each pipeline act created, traced back to
the request and the pipeline of its job), and each chain's requests are counted against the
policy's limits (per job name, and per chain).
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support.scenario import FIXTURES

#: Posts one webhook (route, event kind, body) until it has a final answer; returns the status.
Post = Callable[[str, bytes, int], Awaitable[int]]


@dataclass
class Rerun:
    """A new attempt the fake started for a sticky job, and how its webhooks were answered."""

    job_id: int
    pipeline_id: int
    name: str
    kind: str
    statuses: list[int] = field(default_factory=list)


@dataclass
class StickyFailures:
    """Which jobs fail again when retried, and the webhooks of their new attempts."""

    rng: random.Random
    share: float = 0.3
    #: Share of pipelines act creates whose pipeline hook never arrives.
    lost_pipeline_hooks: float = 0.3
    sticky: dict[int, str] = field(default_factory=dict)  # job id -> kind
    reruns: list[Rerun] = field(default_factory=list)
    post: Post | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def choose(self, kinds: dict[int, str]) -> None:
        for job_id, kind in sorted(kinds.items()):
            if kind in ("network", "oom") and self.rng.random() < self.share:
                self.sticky[job_id] = kind

    def retried(self, old_job: int, new_job: int, pipeline_id: int, name: str) -> None:
        """GitLab retried ``old_job`` as ``new_job`` (same pipeline)."""
        kind = self.sticky.get(old_job)
        if kind is not None:
            self.sticky[new_job] = kind
            self._spawn(self._report(Rerun(new_job, pipeline_id, name, kind), None))

    def recreated(
        self, old_job: int | None, new_job: int, pipeline: dict[str, Any], name: str
    ) -> None:
        """act created ``pipeline`` (to rerun ``old_job``), whose job ``new_job`` ran again."""
        kind = self.sticky.get(old_job) if old_job is not None else None
        if kind is not None:
            self.sticky[new_job] = kind
            hook = None if self.rng.random() < self.lost_pipeline_hooks else pipeline
            self._spawn(self._report(Rerun(new_job, pipeline["id"], name, kind), hook))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def busy(self) -> bool:
        """A rerun's webhooks are still being delivered."""
        return bool(self._tasks)

    async def _report(self, rerun: Rerun, pipeline: dict[str, Any] | None) -> None:
        assert self.post is not None
        self.reruns.append(rerun)
        if pipeline is not None:
            status = await self.post("Pipeline Hook", pipeline_hook(pipeline), rerun.job_id)
            rerun.statuses.append(status)
        rerun.statuses.append(await self.post("Job Hook", rerun_job_hook(rerun), rerun.job_id))


def pipeline_hook(pipeline: dict[str, Any]) -> bytes:
    hook = copy.deepcopy(json.loads(
        (FIXTURES / "gitlab_webhooks" / "gitlab-docs__pipeline_hook_example.json").read_text()
    ))  # fmt: skip
    hook["object_attributes"].update(
        id=pipeline["id"], status="running", ref=pipeline["ref"], sha=pipeline["sha"],
        source="api", finished_at=None, variables=pipeline["variables"],
    )  # fmt: skip
    hook["project"]["id"] = 1
    hook["builds"] = []
    return json.dumps(hook).encode()


def rerun_job_hook(rerun: Rerun) -> bytes:
    from tests.support.scenario import job_hook

    hook = json.loads(job_hook(rerun.job_id, rerun.pipeline_id, rerun.name))
    hook.update(ref="main", sha="abc123")
    return json.dumps(hook).encode()


# --- the budget invariant, from raw events ----------------------------------------------------


@dataclass(frozen=True)
class Limits:
    job_system: int
    job_user: int
    floor: int
    percent: float

    @classmethod
    def of(cls, policy: dict[str, Any]) -> Limits:
        d = policy["default"]
        return cls(
            d["attempts"]["system"], d["attempts"]["user"], d["pipeline"]["floor"],
            d["pipeline"]["percent"],
        )  # fmt: skip

    def chain(self, job_names: int) -> int:
        return max(self.floor, int(self.percent * max(job_names, 1) / 100.0))


def chains_from_provider(
    requested: Iterable[dict[str, Any]], created: Iterable[tuple[str, int]]
) -> dict[str, str]:
    """pipeline id -> its chain's origin, from what the provider saw: each pipeline act created
    carries the key of the request that created it; that request was about a job of some
    pipeline, whose chain the new one joins."""
    job_pipeline = {r["idempotency_key"]: str(r["pipeline_id"]) for r in requested}
    parent = {str(new): job_pipeline[key] for key, new in created if key in job_pipeline}

    def origin(p: str) -> str:
        seen = set()
        while p in parent and p not in seen:
            seen.add(p)
            p = parent[p]
        return p

    return {p: origin(p) for p in set(parent) | set(job_pipeline.values())}


def budget_violations(
    jobs: list[dict[str, Any]],
    requested: list[dict[str, Any]],
    created: list[tuple[str, int]],
    limits: Limits,
) -> tuple[list[str], dict[str, int]]:
    """Requests beyond a job's or a chain's limit, counted from the raw events; and stats."""
    chain_of = chains_from_provider(requested, created)

    def chain(pipeline: Any) -> str:
        return chain_of.get(str(pipeline), str(pipeline))

    names: dict[str, set[str]] = {}
    for j in jobs:
        names.setdefault(chain(j["pipeline_id"]), set()).add(j["job_name"])
    per_chain: Counter[str] = Counter()
    per_job: Counter[tuple[str, str, str]] = Counter()
    bad: list[str] = []
    for r in requested:
        c = chain(r["pipeline_id"])
        per_chain[c] += 1
        per_job[(c, r["job_name"], r["budget"])] += 1
        # act must have stored the decision in the same chain the provider's record implies.
        stored_in = r.get("origin_pipeline_id") or str(r["pipeline_id"])
        if stored_in != c:
            bad.append(f"request {r['idempotency_key']} stored in chain {stored_in}, not {c}")
    for c, n in per_chain.items():
        limit = limits.chain(len(names.get(c, ())))
        if n > limit:
            bad.append(f"chain {c}: {n} retries, limit {limit}")
    for (c, name, budget), n in per_job.items():
        limit = limits.job_system if budget == "system" else limits.job_user
        if n > limit:
            bad.append(f"chain {c} job {name}: {n} {budget} retries, limit {limit}")
    stats = {
        "chains": len(per_chain),
        "chains_longer_than_one_pipeline": len({o for p, o in chain_of.items() if p != o}),
        "jobs_at_their_limit": sum(
            1 for (_, _, b), n in per_job.items()
            if n >= (limits.job_system if b == "system" else limits.job_user)
        ),  # fmt: skip
    }
    return bad, stats


__all__ = ["Limits", "StickyFailures", "budget_violations", "chains_from_provider"]
