"""Taskcluster's executor: rerun a task (a new run of the same task id), checked first
(``base``): the task's status lists its runs, and a run newer than the failed one means the rerun
already happened. Only ``retry_job`` exists here: a task graph is not recreated from outside.
"""

from __future__ import annotations

from ciretry.common.events import JobFinished, RetryRequested
from ciretry.common.providers import TASKCLUSTER_QUEUE

from .base import CannotCheck, CheckingExecutor, Outcome


class TaskclusterExecutor(CheckingExecutor):
    """Its token is ``clientId:accessToken`` (empty: anonymous)."""

    source = "taskcluster"
    api = TASKCLUSTER_QUEUE

    def unsupported(self, request: RetryRequested) -> str | None:
        if request.action != "retry_job":
            return f"Taskcluster executor supports retry_job only, not {request.action}"
        return None

    async def find_newer(self, request: RetryRequested, job: JobFinished | None) -> Outcome | None:
        failed_run = job.attempt if job is not None and job.attempt is not None else None
        resp = await self.http.request("GET", f"/task/{request.job_id}/status")
        if resp.status != 200 or not isinstance(resp.data, dict):
            raise CannotCheck("read the task's status", resp)
        runs = (resp.data.get("status") or {}).get("runs") or []
        ids = [int(r["runId"]) for r in runs]
        if failed_run is None or not ids or max(ids) <= failed_run:
            return None
        return Outcome(
            issued=True,
            new_job_id=f"{request.job_id}#{max(ids)}",
            found_existing=True,
            detail=f"run {max(ids)} already reruns run {failed_run}",
        )

    async def call(self, request: RetryRequested, job: JobFinished | None) -> Outcome:
        resp = await self.http.request("POST", f"/task/{request.job_id}/rerun")
        if resp.status == 200 and isinstance(resp.data, dict):
            runs = (resp.data.get("status") or {}).get("runs") or []
            new = max((int(r["runId"]) for r in runs), default=None)
            return Outcome(
                issued=True,
                new_job_id=f"{request.job_id}#{new}" if new is not None else None,
                status=resp.status,
            )
        return self.refused(resp, "rerun task")
