"""GitHub Actions' executor: rerun a job, or a run's failed jobs, each checked first (``base``).

A rerun is a new attempt of the same run: the check lists the run's jobs of every attempt
(``filter=all``) for a newer job of the same name; the requests of one run carried out at
once share that listing (``listings``: one listing sent after each of their claims). Actions
cannot change a job's resources on rerun, so ``rerun_with_resources`` is refused as unsupported
(final, nothing called).
"""

from __future__ import annotations

from typing import Any

from ciretry.common.events import JobFinished, RetryRequested
from ciretry.common.http import DEFAULT_SETTINGS, HttpSettings, Sleep, TransientError, Transport
from ciretry.common.providers import GITHUB

from .base import CheckingExecutor, Outcome, newer_id
from .listings import Listing, SharedListings

#: Jobs per page of a run's listing (GitHub's maximum).
PER_PAGE = 100


class GitHubExecutor(CheckingExecutor):
    source = "github"
    api = GITHUB

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        settings: HttpSettings = DEFAULT_SETTINGS,
        transport: Transport | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        super().__init__(base_url, token, settings=settings, transport=transport, sleep=sleep)
        #: Each run's jobs, by (repository, run), listed once for the requests that check them
        #: at once.
        self.run_jobs: SharedListings[tuple[str, str]] = SharedListings(self._list_jobs)

    async def _list_jobs(self, run: tuple[str, str]) -> Listing:
        """Every page of a run's jobs of every attempt, up to the first answer other than 200
        (or not an object)."""
        repo, run_id = run
        pages: list[list[Any]] = []
        try:
            while True:
                resp = await self.http.request(
                    "GET",
                    f"/repos/{repo}/actions/runs/{run_id}/jobs",
                    params={
                        "filter": "all",
                        "per_page": str(PER_PAGE),
                        "page": str(len(pages) + 1),
                    },
                )
                if resp.status != 200 or not isinstance(resp.data, dict):
                    return Listing(tuple(pages), refused=resp)
                jobs = resp.data.get("jobs") or []
                pages.append(jobs)
                if len(jobs) < PER_PAGE:
                    return Listing(tuple(pages))
        except TransientError as exc:
            return Listing(tuple(pages), failed=exc)

    async def close(self) -> None:
        await self.run_jobs.close()
        await super().close()

    def unsupported(self, request: RetryRequested) -> str | None:
        if request.action == "rerun_with_resources":
            return "GitHub Actions cannot change a job's resources on rerun"
        return None

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        listing = await self.run_jobs.get((request.project, request.pipeline_id))
        for same_name in listing.named(request.job_name, "list the run's jobs"):
            newer = [j for j in same_name if newer_id(str(j.get("id")), request.job_id)]
            if newer:
                best = max(newer, key=lambda j: int(j["id"]))
                return Outcome(
                    issued=True,
                    new_job_id=str(best["id"]),
                    found_existing=True,
                    detail=f"run attempt {best.get('run_attempt')} already reruns the job",
                )
        return None

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
