"""Reconciliation: append the failed GitLab jobs that webhooks missed.

Webhooks get lost (GitLab disabled the hook, ingest was down past GitLab's retries, a network
partition). ``reconcile`` lists recently failed jobs with ``GET /projects/:id/jobs?scope[]=failed``
(newest first, offset pagination via ``X-Next-Page``) and appends a JobFinished for each, with the
very idempotency key a webhook would have used (``gitlab:job:{project}:{job}:{status}``): jobs the
webhooks did deliver come back as duplicates and nothing is stored twice. Running it on a
schedule (or after an outage) is therefore always safe.

Paging stops at the first page whose jobs were all *created* more than ``slack`` before
``since``: a job created earlier may still have failed inside the window if it ran long, so a
day of slack keeps those (jobs are listed by id, i.e. by creation).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ciretry.common.eventlog import AppendResult
from ciretry.common.events import JobFinished, NewEvent

from .fields import InvalidPayload, parse_time
from .gitlab import job_from_api

log = logging.getLogger(__name__)

Append = Callable[[Sequence[NewEvent]], Awaitable[list[AppendResult]]]


class GitLabAPIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"GitLab API {status}: {message}")
        self.status = status


@dataclass
class ReconcileReport:
    listed: int = 0
    in_window: int = 0
    appended: int = 0
    duplicates: int = 0
    invalid: int = 0
    errors: list[str] = field(default_factory=list)


class GitLabClient:
    """The few GitLab REST calls reconcile needs (token sent as ``PRIVATE-TOKEN``)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        session: aiohttp.ClientSession,
        *,
        per_page: int = 100,
        max_attempts: int = 4,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.session = session
        self.per_page = per_page
        self.max_attempts = max_attempts

    async def failed_jobs(self, project: str) -> AsyncIterator[list[Any]]:
        """Pages of failed jobs of ``project`` (id or full path), newest first."""
        quoted = urllib.parse.quote(project, safe="")
        page: str | None = "1"
        while page:
            url = f"{self.base_url}/api/v4/projects/{quoted}/jobs"
            params = [("scope[]", "failed"), ("per_page", str(self.per_page)), ("page", page)]
            jobs, next_page = await self._get_page(url, params)
            yield jobs
            page = next_page

    async def _get_page(self, url: str, params: list[tuple[str, str]]) -> tuple[list[Any], str]:
        headers = {"PRIVATE-TOKEN": self.token} if self.token else {}
        for attempt in range(1, self.max_attempts + 1):
            async with self.session.get(url, params=params, headers=headers) as resp:
                if resp.status == 429 or resp.status >= 500:
                    if attempt == self.max_attempts:
                        raise GitLabAPIError(resp.status, "giving up after retries")
                    await asyncio.sleep(_retry_after(resp.headers.get("Retry-After"), attempt))
                    continue
                if resp.status != 200:
                    raise GitLabAPIError(resp.status, (await resp.text())[:200])
                body = await resp.json(content_type=None)
                if not isinstance(body, list):
                    raise GitLabAPIError(resp.status, "expected a JSON array of jobs")
                return body, resp.headers.get("X-Next-Page", "").strip()
        raise GitLabAPIError(0, "unreachable")


def _retry_after(value: str | None, attempt: int) -> float:
    if value and value.isdigit():
        return min(float(value), 60.0)
    return float(min(0.5 * 2**attempt, 30.0))


async def reconcile(
    since: dt.datetime,
    *,
    projects: Sequence[str],
    client: GitLabClient,
    append: Append | None,
    slack: dt.timedelta = dt.timedelta(days=1),
) -> ReconcileReport:
    """Append failed jobs of ``projects`` that finished at or after ``since``. ``append`` None is
    a dry run (counts only)."""
    report = ReconcileReport()
    for project in projects:
        try:
            await _reconcile_project(project, since, client, append, slack, report)
        except (GitLabAPIError, aiohttp.ClientError, TimeoutError) as exc:
            report.errors.append(f"project {project}: {exc}")
            log.warning("reconcile: project %s: %s", project, exc)
    return report


async def _reconcile_project(
    project: str,
    since: dt.datetime,
    client: GitLabClient,
    append: Append | None,
    slack: dt.timedelta,
    report: ReconcileReport,
) -> None:
    async for jobs in client.failed_jobs(project):
        report.listed += len(jobs)
        events: list[NewEvent] = []
        all_too_old = bool(jobs)
        for i, job in enumerate(jobs):
            try:
                event = job_from_api(job, f"jobs[{i}]")
                created = _created(job)
            except InvalidPayload as exc:
                report.invalid += 1
                log.warning("reconcile: project %s: skipping job: %s", project, exc)
                continue
            if created is None or created >= since - slack:
                all_too_old = False
            if event is None:
                continue
            data = event.data
            assert isinstance(data, JobFinished)
            when = data.finished_at or created
            if when is not None and when >= since:
                events.append(event)
        report.in_window += len(events)
        if events and append is not None:
            results = await append(events)
            report.duplicates += sum(1 for r in results if r.duplicate)
            report.appended += sum(1 for r in results if not r.duplicate)
        if all_too_old:
            return


def _created(job: Any) -> dt.datetime | None:
    value = job.get("created_at") if isinstance(job, dict) else None
    return parse_time(value, "created_at") if isinstance(value, str) and value else None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """``2h``, ``30m``, ``1d``, ``90s``, ``1w`` before now, or an ISO 8601 timestamp."""
    match = _DURATION.match(value)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
    try:
        return parse_time(value, "--since")
    except InvalidPayload:
        raise ValueError(
            f"--since: expected e.g. 2h, 30m, 1d or an ISO timestamp: {value!r}"
        ) from None
