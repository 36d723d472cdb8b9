"""A fake CI provider serving job logs, speaking GitLab's, GitHub's and Taskcluster's log
endpoints and recording every call: a ``FakeHttp`` (tests/support/fakehttp.py), reached
in-process (``transport()``) or over real HTTP (``await start()``)."""

from __future__ import annotations

from tests.support.fakehttp import Call, FakeHttp, Reply

TOKEN = "glpat-never-in-logs"


class FakeProvider(FakeHttp):
    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 0
        self.body = b"line 1\nline 2\nERROR: boom\n"
        #: Per-job logs (GitLab job id -> body); others get ``body``.
        self.logs: dict[str, bytes] = {}
        self.route("GET", "/api/v4/projects/{project}/jobs/{job}/trace", self.gitlab_trace)
        self.route("GET", "/repos/{owner}/{repo}/actions/jobs/{job}/logs", self.github_logs)
        self.route("GET", "/blob/{name}", self.blob)
        self.route(
            "GET",
            "/api/queue/v1/task/{task}/runs/{run}/artifacts/public/logs/live_backing.log",
            self.tc_artifact,
        )

    def gitlab_trace(self, call: Call, match: dict[str, str]) -> Reply:
        if self.failures_left:
            self.failures_left -= 1
            return Reply(502)
        if call.headers.get("PRIVATE-TOKEN") != TOKEN:
            return Reply.json({"message": "401 Unauthorized"}, 401)
        # Dribbled out in small chunks, without a Content-Length (as GitLab streams a trace).
        return Reply(200, self.logs.get(match["job"], self.body), chunk=7)

    def github_logs(self, call: Call, match: dict[str, str]) -> Reply:
        return Reply.redirect(self.url + "/blob/job.txt")

    def blob(self, call: Call, match: dict[str, str]) -> Reply:
        return Reply(200, self.body)

    def tc_artifact(self, call: Call, match: dict[str, str]) -> Reply:
        return Reply.gzipped(self.body)
