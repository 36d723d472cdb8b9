"""A fake CI provider serving job logs: a real HTTP server speaking GitLab's, GitHub's and
Taskcluster's log endpoints, recording every call."""

from __future__ import annotations

import gzip

from aiohttp import web
from aiohttp.test_utils import TestServer

TOKEN = "glpat-never-in-logs"


class FakeProvider:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.failures_left = 0
        self.body = b"line 1\nline 2\nERROR: boom\n"
        #: Per-job logs (GitLab job id -> body); others get ``body``.
        self.logs: dict[str, bytes] = {}
        app = web.Application()
        app.router.add_get("/api/v4/projects/{project}/jobs/{job}/trace", self.gitlab_trace)
        app.router.add_get("/repos/{owner}/{repo}/actions/jobs/{job}/logs", self.github_logs)
        app.router.add_get("/blob/{name}", self.blob)
        app.router.add_get(
            "/api/queue/v1/task/{task}/runs/{run}/artifacts/public/logs/live_backing.log",
            self.tc_artifact,
        )
        self.server = TestServer(app)

    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def gitlab_trace(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, dict(request.headers)))
        if self.failures_left:
            self.failures_left -= 1
            return web.Response(status=502)
        if request.headers.get("PRIVATE-TOKEN") != TOKEN:
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        resp = web.StreamResponse()
        await resp.prepare(request)
        body = self.logs.get(request.match_info["job"], self.body)
        for i in range(0, len(body), 7):  # dribble it out in small chunks
            await resp.write(body[i : i + 7])
        await resp.write_eof()
        return resp

    async def github_logs(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, dict(request.headers)))
        raise web.HTTPFound(self.url() + "/blob/job.txt")

    async def blob(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, dict(request.headers)))
        return web.Response(body=self.body)

    async def tc_artifact(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, dict(request.headers)))
        return web.Response(body=gzip.compress(self.body), content_type="text/plain")
