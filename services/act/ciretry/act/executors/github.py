"""GitHub Actions' executor: rerun a job, or a run's failed jobs, each checked first (``base``).

A rerun is a new attempt of the same run: the check lists the run's jobs of every attempt
(``filter=all``) for a newer job of the same name. Actions cannot change a job's resources on
rerun, so ``rerun_with_resources`` is refused as unsupported (final, nothing called).
"""

from __future__ import annotations

from ciretry.common.events import JobFinished, RetryRequested
from ciretry.common.providers import GITHUB

from .base import CannotCheck, CheckingExecutor, Outcome, newer_id

#: Jobs per page of a run's listing (GitHub's maximum).
PER_PAGE = 100


class GitHubExecutor(CheckingExecutor):
    source = "github"
    api = GITHUB

    def unsupported(self, request: RetryRequested) -> str | None:
        if request.action == "rerun_with_resources":
            return "GitHub Actions cannot change a job's resources on rerun"
        return None

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        repo, run = request.project, request.pipeline_id
        page = 1
        while True:
            resp = await self.http.request(
                "GET",
                f"/repos/{repo}/actions/runs/{run}/jobs",
                params={"filter": "all", "per_page": str(PER_PAGE), "page": str(page)},
            )
            if resp.status != 200 or not isinstance(resp.data, dict):
                raise CannotCheck("list the run's jobs", resp)
            jobs = resp.data.get("jobs") or []
            newer = [
                j
                for j in jobs
                if j.get("name") == request.job_name and newer_id(str(j.get("id")), request.job_id)
            ]
            if newer:
                best = max(newer, key=lambda j: int(j["id"]))
                return Outcome(
                    issued=True,
                    new_job_id=str(best["id"]),
                    found_existing=True,
                    detail=f"run attempt {best.get('run_attempt')} already reruns the job",
                )
            if len(jobs) < PER_PAGE:
                return None
            page += 1

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        repo = request.project
        if request.action == "retry_job":
            path = f"/repos/{repo}/actions/jobs/{request.job_id}/rerun"
        else:
            path = f"/repos/{repo}/actions/runs/{request.pipeline_id}/rerun-failed-jobs"
        resp = await self.http.request("POST", path)
        if resp.status in (200, 201, 204):
            # GitHub answers 201 with no body: the new job id appears in the run's jobs later.
            return Outcome(issued=True, new_pipeline_id=request.pipeline_id, status=resp.status)
        return self.refused(resp, "rerun")
