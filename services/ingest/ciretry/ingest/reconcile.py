"""Reconciliation: append the failed GitLab jobs that webhooks missed.

Webhooks get lost (GitLab disabled the hook, ingest was down past GitLab's retries, a network
partition). ``reconcile`` lists recently failed jobs with ``GET /projects/:id/jobs?scope[]=failed``
(newest first, GitLab's offset paging: ``ciretry.common.providers``, each page tried again on
429/5xx/no answer) and appends a JobFinished for each, with the
very idempotency key a webhook would have used (``gitlab:job:{project}:{job}:{status}``): jobs the
webhooks did deliver come back as duplicates and nothing is stored twice. Running it on a
schedule (or after an outage) is therefore always safe.

Paging stops at the first page whose jobs were all *created* more than ``slack`` before
``since``: a job created earlier may still have failed inside the window if it ran long, so a
day of slack keeps those (jobs are listed by id, i.e. by creation).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciretry.common.eventlog import AppendResult
from ciretry.common.events import JobFinished, NewEvent
from ciretry.common.http import HttpClient, HttpSettings, TransientError
from ciretry.common.providers import GITLAB_PER_PAGE, gitlab_pages, gitlab_project

from .fields import InvalidPayload, parse_time
from .gitlab import job_from_api

log = logging.getLogger(__name__)

Append = Callable[[Sequence[NewEvent]], Awaitable[list[AppendResult]]]

#: A one-shot command may wait a minute for a page, and for a rate limit to pass.
RECONCILE_HTTP = HttpSettings(
    timeout_s=60.0, max_attempts=4, backoff_base_s=0.5, backoff_cap_s=30.0, retry_after_cap_s=60.0
)


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


async def failed_jobs(
    gitlab: HttpClient, project: str, *, per_page: int = GITLAB_PER_PAGE
) -> AsyncIterator[list[Any]]:
    """Pages of failed jobs of ``project`` (id or full path), newest first; each page is tried
    again on transient errors."""
    path = f"{gitlab_project(project)}/jobs"
    async for page in gitlab_pages(
        gitlab, path, [("scope[]", "failed")], per_page=per_page, retry=True
    ):
        if page.response.status != 200:
            raise GitLabAPIError(page.response.status, page.response.text[:200])
        if page.items is None:
            raise GitLabAPIError(page.response.status, "expected a JSON array of jobs")
        yield page.items


async def reconcile(
    since: dt.datetime,
    *,
    projects: Sequence[str],
    gitlab: HttpClient,
    append: Append | None,
    slack: dt.timedelta = dt.timedelta(days=1),
    per_page: int = GITLAB_PER_PAGE,
) -> ReconcileReport:
    """Append failed jobs of ``projects`` that finished at or after ``since``, listed through
    ``gitlab`` (``ciretry.common.providers.GITLAB``). ``append`` None is a dry run
    (counts only)."""
    report = ReconcileReport()
    for project in projects:
        try:
            jobs = failed_jobs(gitlab, project, per_page=per_page)
            await _reconcile_project(project, since, jobs, append, slack, report)
        except (GitLabAPIError, TransientError) as exc:
            report.errors.append(f"project {project}: {exc}")
            log.warning("reconcile: project %s: %s", project, exc)
    return report


async def _reconcile_project(
    project: str,
    since: dt.datetime,
    pages: AsyncIterator[list[Any]],
    append: Append | None,
    slack: dt.timedelta,
    report: ReconcileReport,
) -> None:
    async for jobs in pages:
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
