"""A fake GitLab that runs pipelines: the CI side of an end-to-end test.

``FakeGitLab`` answers act's API calls; ``GitLabCI`` also *runs* what they start, as GitLab and
gitlab-runner's Kubernetes executor do. A pipeline (pushed by the test, or created by act through
``POST /projects/:id/pipeline``) gets new job ids, and each job runs: the test's ``script`` says
how it ends given its name, its pipeline's variables and the memory its pod was given
(``KUBERNETES_MEMORY_LIMIT``, else the default). Then the webhooks go out to ingest as GitLab and a
pod watcher would send them, in GitLab's order: the pipeline hook when it starts (status
``running``, with its variables), the pod status of each job (``/webhooks/kubernetes``, with the
container's limits), the job hook, and the pipeline hook when it ends (with its builds). A
retried job (``POST /jobs/:id/retry``) runs again the same way.

Deliveries are retried until ingest answers 2xx (ingest may be restarting in the test): the
simulated CI loses nothing, so what the test counts is what ciretry did.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ciretry.common.resources import DEFAULT_VARIABLES
from tests.support.fakehttp import Call, Reply
from tests.support.providers import FakeGitLab
from tests.support.scenario import FIXTURES

PROJECT = 1
OOM_LOG = b"$ make -j8\nKilled\nERROR: Job failed: command terminated with exit code 137\n"
PASS_LOG = b"$ make test\nall tests passed\nJob succeeded\n"


@dataclass(frozen=True)
class Run:
    """What the script is told about the job it decides the end of."""

    job_id: int
    name: str
    pipeline_id: int
    variables: dict[str, str]
    memory_mb: int
    #: How many times a job of this name ran before on this ref (0: the first run).
    previous_runs: int


@dataclass(frozen=True)
class End:
    """How a job ends: its status and GitLab failure reason, its log, and how its pod ended
    (None: no pod status is sent)."""

    status: str = "success"
    failure_reason: str | None = None
    log: bytes = PASS_LOG
    pod_reason: str | None = None
    exit_code: int = 0


def oom(_: Run) -> End:
    return End("failed", "script_failure", OOM_LOG, "OOMKilled", 137)


Script = Callable[[Run], End]


@dataclass
class Delivery:
    route: str
    kind: str
    body: dict[str, Any]


@dataclass
class GitLabCI(FakeGitLab):
    script: Script = oom
    #: Memory of a job's pod when its pipeline sets no KUBERNETES_MEMORY_LIMIT (MiB).
    default_memory_mb: int = 1024
    #: Job names of the pipelines of a ref (what a recreated pipeline runs again).
    templates: dict[str, list[str]] = field(default_factory=dict)
    sent: list[Delivery] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    ingest_url: str = ""
    webhook_secret: str = ""
    api_token: str = ""
    #: Called when a create-pipeline call arrives, before it is answered (a test's nemesis).
    on_create: Callable[[int], Any] | None = None

    def __post_init__(self) -> None:
        FakeGitLab.__init__(self)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._runs_of: dict[tuple[str, str], int] = {}
        self._delivery_ids = itertools.count(1)

    async def started(self) -> GitLabCI:
        await super().started()
        return self

    def connect(self, ingest_url: str, webhook_secret: str, api_token: str) -> None:
        self.ingest_url, self.webhook_secret, self.api_token = ingest_url, webhook_secret, api_token

    # --- starting pipelines --------------------------------------------------------------------

    def push(self, ref: str, jobs: list[str]) -> int:
        """A pipeline started by a push to ``ref``; returns its id."""
        self.templates[ref] = list(jobs)
        return self._new_pipeline(ref, "push", [])

    def _new_pipeline(self, ref: str, source: str, variables: list[dict[str, Any]]) -> int:
        self.next_id += 1
        pid = self.next_id
        self.pipelines[pid] = {
            "id": pid, "ref": ref, "sha": "abc123", "source": source, "variables": variables,
            "status": "running",
        }  # fmt: skip
        jobs = []
        for name in self.templates.get(ref, ["build"]):
            self.next_id += 1
            jobs.append(self.next_id)
            self.jobs[self.next_id] = {
                "id": self.next_id, "name": name, "pipeline_id": pid, "status": "pending",
            }  # fmt: skip
        self._spawn(self._run_pipeline(pid, jobs))
        return pid

    async def _create(self, call: Call, match: dict[str, str]) -> Reply:
        pid = self._new_pipeline(call.body["ref"], "api", call.body.get("variables", []))
        if self.on_create is not None:
            result = self.on_create(pid)
            if asyncio.iscoroutine(result):
                await result
        return Reply.json(self.pipelines[pid], 201)

    def _retry(self, call: Call, match: dict[str, str]) -> Reply:
        reply = super()._retry(call, match)
        if reply.status == 201:
            new = json.loads(reply.body)
            self._spawn(self._run_pipeline(new["pipeline_id"], [new["id"]], start=False))
        return reply

    # --- running them --------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        self._idle.clear()

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not self._tasks:
                self._idle.set()

        task.add_done_callback(done)

    async def idle(self) -> None:
        """Until every pipeline started so far has run and its webhooks were delivered."""
        await self._idle.wait()
        for task in list(self._tasks):
            await task

    async def _run_pipeline(self, pid: int, jobs: list[int], *, start: bool = True) -> None:
        p = self.pipelines[pid]
        variables = {v["key"]: v["value"] for v in p["variables"]}
        if start:
            await self._deliver("/webhooks/gitlab", "Pipeline Hook", self._pipeline_hook(p))
        memory = DEFAULT_VARIABLES.read(variables)
        memory_mb = (memory.memory_mb if memory else None) or self.default_memory_mb
        for job_id in jobs:
            job = self.jobs[job_id]
            key = (p["ref"], job["name"])
            run = Run(job_id, job["name"], pid, variables, memory_mb, self._runs_of.get(key, 0))
            self._runs_of[key] = run.previous_runs + 1
            self.runs.append(run)
            end = self.script(run)
            job["status"] = end.status
            self.traces[job_id] = end.log
            if end.pod_reason is not None:
                await self._deliver("/webhooks/kubernetes", "", self._pod(job, end, memory_mb))
            await self._deliver("/webhooks/gitlab", "Job Hook", self._job_hook(job, p, end))
        statuses = {self.jobs[j]["status"] for j in self.jobs if self.jobs[j]["pipeline_id"] == pid}
        p["status"] = "failed" if "failed" in statuses else "success"
        await self._deliver("/webhooks/gitlab", "Pipeline Hook", self._pipeline_hook(p))

    async def _deliver(self, route: str, kind: str, body: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/json"}
        if kind:
            headers |= {
                "X-Gitlab-Event": kind,
                "X-Gitlab-Token": self.webhook_secret,
                "X-Gitlab-Event-UUID": f"sim-{next(self._delivery_ids)}",
            }
        else:
            headers["Authorization"] = f"Bearer {self.api_token}"
        data = json.dumps(body).encode()
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # a sender that does not give up (ingest may be restarting)
                try:
                    async with session.post(self.ingest_url + route, data=data, headers=headers) as r:
                        if r.status < 300:
                            self.sent.append(Delivery(route, kind, body))
                            return
                        if r.status not in (502, 503):
                            raise AssertionError(f"{route}: HTTP {r.status}: {await r.text()}")
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"{route}: not delivered in 60 s")

    # --- payloads, as GitLab and the Kubernetes API shape them --------------------------------

    def _pipeline_hook(self, p: dict[str, Any]) -> dict[str, Any]:
        hook = copy.deepcopy(_fixture("gitlab-docs__pipeline_hook_example.json"))
        attrs = hook["object_attributes"]
        attrs.update(
            id=p["id"], ref=p["ref"], sha=p["sha"], source=p["source"], status=p["status"],
            variables=[{"key": v["key"], "value": v["value"]} for v in p["variables"]],
            finished_at=None if p["status"] == "running" else "2024-05-01 12:00:00 UTC",
        )  # fmt: skip
        hook["project"]["id"] = PROJECT
        hook.pop("merge_request", None)
        hook["builds"] = [
            {
                "id": j["id"], "stage": "test", "name": j["name"], "status": j["status"],
                "created_at": "2024-05-01 11:00:00 UTC", "started_at": "2024-05-01 11:00:01 UTC",
                "finished_at": "2024-05-01 11:05:00 UTC", "when": "on_success", "manual": False,
                "allow_failure": False, "user": hook["user"], "runner": None,
                "artifacts_file": {"filename": None, "size": None},
                "failure_reason": "script_failure" if j["status"] == "failed" else None,
            }
            for j in self.jobs.values()
            if j["pipeline_id"] == p["id"] and j["status"] != "pending"
        ]  # fmt: skip
        return hook

    def _job_hook(self, job: dict[str, Any], p: dict[str, Any], end: End) -> dict[str, Any]:
        hook = copy.deepcopy(_fixture("go-gitlab__job.json"))
        hook.update(
            build_id=job["id"], build_name=job["name"], build_status=end.status,
            build_failure_reason=end.failure_reason or "unknown_failure",
            project_id=PROJECT, pipeline_id=p["id"], ref=p["ref"], sha=p["sha"],
        )  # fmt: skip
        hook["commit"]["id"] = p["id"]
        return hook

    def _pod(self, job: dict[str, Any], end: End, memory_mb: int) -> dict[str, Any]:
        limits = {"memory": f"{memory_mb}Mi", "cpu": "2"}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"runner-sim-project-{PROJECT}-{job['id']}",
                "namespace": "ci",
                "uid": f"pod-{job['id']}",
                "annotations": {
                    "job.runner.gitlab.com/id": str(job["id"]),
                    "project.runner.gitlab.com/id": str(PROJECT),
                },
            },
            "spec": {
                "containers": [
                    {"name": "build", "resources": {"limits": limits, "requests": limits}},
                    {"name": "helper", "resources": {"limits": {"memory": "128Mi"}}},
                ]
            },
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "build",
                        "state": {
                            "terminated": {
                                "reason": end.pod_reason,
                                "exitCode": end.exit_code,
                                "finishedAt": "2024-05-01T11:05:00Z",
                            }
                        },
                    }
                ],
            },
        }

    # --- what happened -------------------------------------------------------------------------

    def created(self) -> list[dict[str, Any]]:
        """Pipelines act created, oldest first."""
        return sorted(
            (p for p in self.pipelines.values() if p["source"] == "api"), key=lambda p: p["id"]
        )

    @staticmethod
    def retry_of(p: dict[str, Any]) -> str | None:
        return next((v["value"] for v in p["variables"] if v["key"] == "CIRETRY_RETRY_OF"), None)

    @staticmethod
    def memory_of(p: dict[str, Any]) -> str | None:
        return next(
            (v["value"] for v in p["variables"] if v["key"] == "KUBERNETES_MEMORY_LIMIT"), None
        )


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "gitlab_webhooks" / name).read_text())
    return data


__all__ = ["End", "GitLabCI", "Run", "oom"]
