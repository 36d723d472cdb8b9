"""Fake CI providers speaking the API shapes ciretry uses, recording every call: each is a
``FakeHttp`` (tests/support/fakehttp.py), reachable in-process (``fake.transport()``, for the
pure tests) or over real HTTP on 127.0.0.1 (``await fake.started()``). Failures are injected per
route: ``fail[(method, path_prefix)] = [503, 429, ...]``."""

from __future__ import annotations

from typing import Any

from ciretry.common.ids import uuid7
from tests.support.fakehttp import Call, FakeHttp, Reply


def paged(call: Call, rows: list[Any]) -> Reply:
    """``rows`` as GitLab pages them: ``page``/``per_page`` (20 by default), and the paging
    headers (``X-Next-Page`` empty on the last page)."""
    page = max(1, int(call.query.get("page", "1")))
    per = int(call.query.get("per_page", "20"))
    last = page * per >= len(rows)
    headers = {
        "X-Page": str(page),
        "X-Per-Page": str(per),
        "X-Next-Page": "" if last else str(page + 1),
        "X-Total": str(len(rows)),
    }
    return Reply.json(rows[(page - 1) * per : page * per], headers=headers)


class FakeGitLab(FakeHttp):
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
        api = "/api/v4/projects/{p}"
        self.route("GET", api + "/pipelines/{pl}/jobs", self._pipeline_jobs)
        self.route("POST", api + "/jobs/{job}/retry", self._retry)
        self.route("GET", api + "/pipelines", self._pipelines)
        self.route("POST", api + "/pipeline", self._create)
        self.route("GET", api + "/pipelines/{pl}/variables", self._variables)
        self.route("GET", api + "/jobs/{job}/trace", self._trace)
        self.route("GET", api + "/repository/commits/{ref}", self._commit)

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

    def _commit(self, call: Call, match: dict[str, str]) -> Reply:
        sha = self.heads.get(match["ref"], "abc123")
        if sha is None:
            return Reply.json({"message": "404 Commit Not Found"}, 404)
        return Reply.json({"id": sha, "short_id": sha[:8]})

    def _trace(self, call: Call, match: dict[str, str]) -> Reply:
        trace = self.traces.get(int(match["job"]))
        if trace is None:
            return Reply.json({"message": "404 Not found"}, 404)
        return Reply(200, trace, {"Content-Type": "text/plain"})

    def _pipeline_jobs(self, call: Call, match: dict[str, str]) -> Reply:
        pl = int(match["pl"])
        jobs = sorted(
            (j for j in self.jobs.values() if j["pipeline_id"] == pl), key=lambda j: -j["id"]
        )
        return paged(call, jobs)

    def _retry(self, call: Call, match: dict[str, str]) -> Reply:
        old = self.jobs.get(int(match["job"]))
        if old is None:
            return Reply.json({"message": "404 Job Not Found"}, 404)
        self.next_id += 1
        new = {**old, "id": self.next_id, "status": "pending"}
        self.jobs[self.next_id] = new
        return Reply.json(new, 201)

    def _pipelines(self, call: Call, match: dict[str, str]) -> Reply:
        # As GitLab: filters by ref/sha/source, newest first, paged.
        q = call.query
        out = sorted(
            (
                p
                for p in self.pipelines.values()
                if all(q.get(k) in (None, p[k]) for k in ("ref", "sha", "source"))
            ),
            key=lambda p: -p["id"],
        )
        return paged(call, out)

    def _variables(self, call: Call, match: dict[str, str]) -> Reply:
        p = self.pipelines.get(int(match["pl"]))
        if p is None:
            return Reply.json({"message": "404 Not found"}, 404)
        return Reply.json(p["variables"])

    async def _create(self, call: Call, match: dict[str, str]) -> Reply:
        self.next_id += 1
        p = {
            "id": self.next_id,
            "ref": call.body["ref"],
            "sha": "abc123",
            "source": "api",
            "variables": call.body.get("variables", []),
        }
        self.pipelines[self.next_id] = p
        return Reply.json(p, 201)


class FakeGitHub(FakeHttp):
    def __init__(self) -> None:
        super().__init__()
        #: run id -> jobs of every attempt
        self.runs: dict[int, list[dict[str, Any]]] = {}
        self.next_id = 9_000
        self.route("GET", "/repos/{o}/{r}/actions/runs/{run}/jobs", self._jobs)
        self.route("POST", "/repos/{o}/{r}/actions/jobs/{job}/rerun", self._rerun_job)
        self.route(
            "POST", "/repos/{o}/{r}/actions/runs/{run}/rerun-failed-jobs", self._rerun_failed
        )

    def add_job(self, run: int, job_id: int, name: str, attempt: int = 1) -> None:
        self.runs.setdefault(run, []).append(
            {"id": job_id, "name": name, "run_attempt": attempt, "conclusion": "failure"}
        )

    def _jobs(self, call: Call, match: dict[str, str]) -> Reply:
        jobs = self.runs.get(int(match["run"]), [])
        page, per = int(call.query.get("page", "1")), int(call.query.get("per_page", "30"))
        return Reply.json({"total_count": len(jobs), "jobs": jobs[(page - 1) * per : page * per]})

    def _rerun(self, run: int, names: set[str]) -> None:
        jobs = self.runs[run]
        attempt = max(j["run_attempt"] for j in jobs) + 1
        for name in names:
            self.next_id += 1
            jobs.append(
                {"id": self.next_id, "name": name, "run_attempt": attempt, "conclusion": None}
            )

    def _rerun_job(self, call: Call, match: dict[str, str]) -> Reply:
        job_id = int(match["job"])
        for run, jobs in self.runs.items():
            for j in jobs:
                if j["id"] == job_id:
                    self._rerun(run, {j["name"]})
                    return Reply(201)
        return Reply.json({"message": "Not Found"}, 404)

    def _rerun_failed(self, call: Call, match: dict[str, str]) -> Reply:
        run = int(match["run"])
        self._rerun(run, {j["name"] for j in self.runs[run] if j["conclusion"] == "failure"})
        return Reply(201)


class FakeTaskcluster(FakeHttp):
    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, list[dict[str, Any]]] = {}
        self.route("GET", "/api/queue/v1/task/{task}/status", self._status)
        self.route("POST", "/api/queue/v1/task/{task}/rerun", self._rerun)

    def _body(self, task: str) -> dict[str, Any]:
        return {"status": {"taskId": task, "runs": self.tasks[task]}}

    def _status(self, call: Call, match: dict[str, str]) -> Reply:
        task = match["task"]
        if task not in self.tasks:
            return Reply.json({"code": "ResourceNotFound"}, 404)
        return Reply.json(self._body(task))

    def _rerun(self, call: Call, match: dict[str, str]) -> Reply:
        task = match["task"]
        runs = self.tasks[task]
        runs.append({"runId": len(runs), "state": "pending"})
        return Reply.json(self._body(task))


class FakeBuildkite(FakeHttp):
    """Buildkite's REST API (``/v2``) for one organization's jobs: read a job, retry it (once
    per job id, as Buildkite allows: the retried job then names its retry in
    ``retried_in_job_id``), and its raw log. Jobs are the REST job data model's fields that
    ciretry reads; new job ids are time-prefixed UUIDs, as Buildkite's are. Buildkite documents
    no answer for retrying a job id twice: the 422 here is an assumption (the executor treats
    any refusal as final, and its check finds the retry first)."""

    def __init__(self) -> None:
        super().__init__()
        #: job id -> the job as the API returns it (with ``build`` = its build number)
        self.jobs: dict[str, dict[str, Any]] = {}
        #: Raw logs (``…/log.txt``), by job id.
        self.logs: dict[str, bytes] = {}
        job = "/v2/organizations/{org}/pipelines/{pipeline}/builds/{build}/jobs/{job}"
        self.route("GET", job, self._get)
        self.route("PUT", job + "/retry", self._retry)
        self.route("GET", job + "/log.txt", self._log)

    def add_job(
        self,
        job_id: str,
        name: str,
        build: int,
        state: str = "failed",
        retries: int = 0,
        project: str = "my-org/my-pipeline",
    ) -> dict[str, Any]:
        self.jobs[job_id] = {
            "project": project,
            "id": job_id,
            "type": "script",
            "name": name,
            "state": state,
            "build": build,
            "exit_status": -1 if state == "failed" else None,
            "retried": False,
            "retried_in_job_id": None,
            "retries_count": retries or None,
            "retry_type": None,
        }
        return self.jobs[job_id]

    def _found(self, match: dict[str, str]) -> dict[str, Any] | None:
        job = self.jobs.get(match["job"])
        where = (job["project"], str(job["build"])) if job is not None else None
        return job if where == (f"{match['org']}/{match['pipeline']}", match["build"]) else None

    def _get(self, call: Call, match: dict[str, str]) -> Reply:
        job = self._found(match)
        if job is None:
            return Reply.json({"message": "No job found"}, 404)
        return Reply.json(job)

    def _retry(self, call: Call, match: dict[str, str]) -> Reply:
        old = self._found(match)
        if old is None:
            return Reply.json({"message": "No job found"}, 404)
        if old["retried"]:
            return Reply.json({"message": "This job has already been retried"}, 422)
        if old["state"] not in ("failed", "timed_out", "canceled"):
            return Reply.json(
                {"message": "Only failed, timed out or canceled jobs can be retried"}, 400
            )
        new_id = str(uuid7())
        retries = (old["retries_count"] or 0) + 1
        new = self.add_job(new_id, old["name"], old["build"], "scheduled", retries, old["project"])
        new["exit_status"] = None
        old.update(retried=True, retried_in_job_id=new_id)
        return Reply.json(new)

    def _log(self, call: Call, match: dict[str, str]) -> Reply:
        log = self.logs.get(match["job"])
        if self._found(match) is None or log is None:
            return Reply.json({"message": "No job found"}, 404)
        return Reply(200, log, {"Content-Type": "text/plain"})
