"""Fake CI providers: real aiohttp servers on 127.0.0.1 speaking the API shapes act uses, recording
every call. Failures are injected per route: ``fail[(method, path_prefix)] = [503, 429, ...]``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Fake:
    calls: list[Call] = field(default_factory=list)
    #: (method, path prefix) -> statuses to answer with, consumed one per matching call.
    fail: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    retry_after: str | None = None
    #: Seconds to stall the answer to the next POST (timeouts), after acting on it.
    stall: float = 0.0
    server: TestServer | None = None

    def posts(self, fragment: str = "") -> list[Call]:
        return [c for c in self.calls if c.method == "POST" and fragment in c.path]

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.calls.append(
            Call(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        for (method, prefix), statuses in self.fail.items():
            if request.method == method and request.path.startswith(prefix) and statuses:
                status = statuses.pop(0)
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return web.json_response({"message": "injected"}, status=status, headers=headers)
        if request.method == "POST" and self.stall:
            # The provider acts, then answers too late: the client's timeout fires after the
            # retry happened, which is what check-before-acting must catch.
            stall, self.stall = self.stall, 0.0
            response = await handler(request)
            await asyncio.sleep(stall)
            return response  # type: ignore[no-any-return]
        return await handler(request)  # type: ignore[no-any-return]

    async def start(self, app: web.Application) -> Fake:
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


class FakeGitLab(Fake):
    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[int, dict[str, Any]] = {}
        self.pipelines: dict[int, dict[str, Any]] = {}
        self.next_id = 100_000
        #: Job logs served by the trace endpoint, by job id.
        self.traces: dict[int, bytes] = {}
        #: Commit each ref points at (``GET /repository/commits/:ref``); others: ``abc123``,
        #: the commit every fake pipeline and test job is on. None: the ref was deleted.
        self.heads: dict[str, str | None] = {}

    def add_job(self, job_id: int, name: str, pipeline_id: int, ref: str = "main") -> None:
        self.jobs[job_id] = {
            "id": job_id,
            "name": name,
            "pipeline_id": pipeline_id,
            "status": "failed",
        }
        self.add_pipeline(pipeline_id, ref)

    def add_pipeline(self, pipeline_id: int, ref: str = "main") -> None:
        """A pipeline started by a push (ciretry's own are created through the API)."""
        self.pipelines.setdefault(
            pipeline_id,
            {"id": pipeline_id, "ref": ref, "sha": "abc123", "source": "push", "variables": []},
        )

    async def started(self) -> FakeGitLab:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/v4/projects/{p}/pipelines/{pl}/jobs", self._pipeline_jobs)
        app.router.add_post("/api/v4/projects/{p}/jobs/{job}/retry", self._retry)
        app.router.add_get("/api/v4/projects/{p}/pipelines", self._pipelines)
        app.router.add_post("/api/v4/projects/{p}/pipeline", self._create)
        app.router.add_get("/api/v4/projects/{p}/pipelines/{pl}/variables", self._variables)
        app.router.add_get("/api/v4/projects/{p}/jobs/{job}/trace", self._trace)
        app.router.add_get("/api/v4/projects/{p}/repository/commits/{ref}", self._commit)
        await self.start(app)
        return self

    async def _commit(self, request: web.Request) -> web.Response:
        sha = self.heads.get(request.match_info["ref"], "abc123")
        if sha is None:
            return web.json_response({"message": "404 Commit Not Found"}, status=404)
        return web.json_response({"id": sha, "short_id": sha[:8]})

    async def _trace(self, request: web.Request) -> web.Response:
        trace = self.traces.get(int(request.match_info["job"]))
        if trace is None:
            return web.json_response({"message": "404 Not found"}, status=404)
        return web.Response(body=trace, content_type="text/plain")

    async def _pipeline_jobs(self, request: web.Request) -> web.Response:
        pl = int(request.match_info["pl"])
        jobs = sorted(
            (j for j in self.jobs.values() if j["pipeline_id"] == pl), key=lambda j: -j["id"]
        )
        page, per = int(request.query.get("page", "1")), int(request.query.get("per_page", "20"))
        return web.json_response(jobs[(page - 1) * per : page * per])

    async def _retry(self, request: web.Request) -> web.Response:
        old = self.jobs.get(int(request.match_info["job"]))
        if old is None:
            return web.json_response({"message": "404 Job Not Found"}, status=404)
        self.next_id += 1
        new = {**old, "id": self.next_id, "status": "pending"}
        self.jobs[self.next_id] = new
        return web.json_response(new, status=201)

    async def _pipelines(self, request: web.Request) -> web.Response:
        # As GitLab: filters by ref/sha/source, newest first, paged (per_page defaults to 20).
        q = request.query
        out = sorted(
            (
                p
                for p in self.pipelines.values()
                if all(q.get(k) in (None, p[k]) for k in ("ref", "sha", "source"))
            ),
            key=lambda p: -p["id"],
        )
        page, per = max(1, int(q.get("page", "1"))), int(q.get("per_page", "20"))
        return web.json_response(out[(page - 1) * per : page * per])

    async def _variables(self, request: web.Request) -> web.Response:
        p = self.pipelines.get(int(request.match_info["pl"]))
        if p is None:
            return web.json_response({"message": "404 Not found"}, status=404)
        return web.json_response(p["variables"])

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.next_id += 1
        p = {
            "id": self.next_id,
            "ref": body["ref"],
            "sha": "abc123",
            "source": "api",
            "variables": body.get("variables", []),
        }
        self.pipelines[self.next_id] = p
        return web.json_response(p, status=201)


class FakeGitHub(Fake):
    def __init__(self) -> None:
        super().__init__()
        #: run id -> jobs of every attempt
        self.runs: dict[int, list[dict[str, Any]]] = {}
        self.next_id = 9_000

    def add_job(self, run: int, job_id: int, name: str, attempt: int = 1) -> None:
        self.runs.setdefault(run, []).append(
            {"id": job_id, "name": name, "run_attempt": attempt, "conclusion": "failure"}
        )

    async def started(self) -> FakeGitHub:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/repos/{o}/{r}/actions/runs/{run}/jobs", self._jobs)
        app.router.add_post("/repos/{o}/{r}/actions/jobs/{job}/rerun", self._rerun_job)
        app.router.add_post(
            "/repos/{o}/{r}/actions/runs/{run}/rerun-failed-jobs", self._rerun_failed
        )
        await self.start(app)
        return self

    async def _jobs(self, request: web.Request) -> web.Response:
        jobs = self.runs.get(int(request.match_info["run"]), [])
        return web.json_response({"total_count": len(jobs), "jobs": jobs})

    def _rerun(self, run: int, names: set[str]) -> None:
        jobs = self.runs[run]
        attempt = max(j["run_attempt"] for j in jobs) + 1
        for name in names:
            self.next_id += 1
            jobs.append(
                {"id": self.next_id, "name": name, "run_attempt": attempt, "conclusion": None}
            )

    async def _rerun_job(self, request: web.Request) -> web.Response:
        job_id = int(request.match_info["job"])
        for run, jobs in self.runs.items():
            for j in jobs:
                if j["id"] == job_id:
                    self._rerun(run, {j["name"]})
                    return web.Response(status=201)
        return web.json_response({"message": "Not Found"}, status=404)

    async def _rerun_failed(self, request: web.Request) -> web.Response:
        run = int(request.match_info["run"])
        self._rerun(run, {j["name"] for j in self.runs[run] if j["conclusion"] == "failure"})
        return web.Response(status=201)


class FakeTaskcluster(Fake):
    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, list[dict[str, Any]]] = {}

    async def started(self) -> FakeTaskcluster:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/queue/v1/task/{task}/status", self._status)
        app.router.add_post("/api/queue/v1/task/{task}/rerun", self._rerun)
        await self.start(app)
        return self

    def _body(self, task: str) -> dict[str, Any]:
        return {"status": {"taskId": task, "runs": self.tasks[task]}}

    async def _status(self, request: web.Request) -> web.Response:
        task = request.match_info["task"]
        if task not in self.tasks:
            return web.json_response({"code": "ResourceNotFound"}, status=404)
        return web.json_response(self._body(task))

    async def _rerun(self, request: web.Request) -> web.Response:
        task = request.match_info["task"]
        runs = self.tasks[task]
        runs.append({"runId": len(runs), "state": "pending"})
        return web.json_response(self._body(task))
