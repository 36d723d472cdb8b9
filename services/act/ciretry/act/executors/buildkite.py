"""Buildkite's executor: retry a job (``PUT …/builds/:n/jobs/:id/retry``: a new job, with a new
id, in the same build), checked first (``base``).

Buildkite retries each job id at most once, and the job it retried says so: ``retried`` and
``retried_in_job_id``. So the check reads the failed job (``GET …/jobs/:id``): a
``retried_in_job_id`` means the retry already happened (maybe by us before a crash, maybe by a
person or the step's own ``retry.automatic``) and nothing is called. The job id is the
idempotency key Buildkite keeps for us: the retry API takes no body, and a second retry of the
same job is refused.

Only ``retry_job`` exists here: ``recreate_pipeline`` would be a new build (``POST …/builds``),
which ciretry does not link into an attempt chain for Buildkite yet, so it is refused as
unsupported (final, nothing called); act skips ``rerun_with_resources`` itself
(``resize_unsupported``), since a retried job runs on the same agent queue.
"""

from __future__ import annotations

from ciretry.common.events import JobFinished, RetryRequested
from ciretry.common.providers import BUILDKITE, buildkite_job

from .base import CannotCheck, CheckingExecutor, Outcome


class BuildkiteExecutor(CheckingExecutor):
    """Its token is a Buildkite API access token with ``read_builds`` and ``write_builds``."""

    source = "buildkite"
    api = BUILDKITE

    def unsupported(self, request: RetryRequested) -> str | None:
        if request.action != "retry_job":
            return f"Buildkite executor supports retry_job only, not {request.action}"
        return None

    def _job(self, request: RetryRequested) -> str:
        return buildkite_job(request.project, request.pipeline_id, request.job_id)

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        resp = await self.http.request("GET", self._job(request))
        if resp.status != 200 or not isinstance(resp.data, dict):
            raise CannotCheck("read the job", resp)
        newer = resp.data.get("retried_in_job_id")
        if not newer:
            return None
        return Outcome(
            issued=True,
            new_job_id=str(newer),
            found_existing=True,
            detail=f"job {newer} already retries {request.job_id}",
        )

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        resp = await self.http.request("PUT", f"{self._job(request)}/retry")
        if resp.status == 200 and isinstance(resp.data, dict) and resp.data.get("id"):
            return Outcome(issued=True, new_job_id=str(resp.data["id"]), status=resp.status)
        return self.refused(resp, "retry job")
