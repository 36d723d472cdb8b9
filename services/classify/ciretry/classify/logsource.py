"""Fetching a job's log from its provider: streamed, gzip-aware, capped to the tail, retried.

GitLab ``GET /projects/:id/jobs/:job_id/trace``, GitHub ``GET /repos/:repo/actions/jobs/:id/logs``
(a redirect to blob storage) and Taskcluster's ``public/logs/live_backing.log`` artifact (also a
redirect, often gzip-encoded). Memory is bounded by the cap whatever the log's size: chunks are
kept in a deque and the oldest dropped once the cap is exceeded, so a huge log yields its tail,
which is where the failure is.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from dataclasses import dataclass

import aiohttp

from ciretry.common.events import JobFinished, LogLocator

from .logtext import TailKeeper

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class LogFetched:
    """The log's text (its tail, from a line start, when it was larger than the cap), or why
    there is none. ``first_line`` is the number of the tail's first line in the whole log."""

    data: bytes | None
    size: int = 0
    truncated: bool = False
    note: str | None = None
    first_line: int = 1

    @property
    def available(self) -> bool:
        return self.data is not None


@dataclass(frozen=True, slots=True)
class ProviderEndpoints:
    gitlab_url: str = "https://gitlab.com"
    gitlab_token: str = ""
    github_url: str = "https://api.github.com"
    github_token: str = ""
    taskcluster_url: str = "https://firefox-ci-tc.services.mozilla.com"
    taskcluster_token: str = ""


def locate(job: JobFinished) -> LogLocator | None:
    """The job's log locator, derived from its identity when ingest did not set one."""
    if job.log is not None:
        return job.log
    if job.source == "gitlab":
        return LogLocator(kind="gitlab", project=job.project, job_id=job.job_id)
    if job.source == "github":
        return LogLocator(kind="github", project=job.project, job_id=job.job_id)
    if job.source == "taskcluster":
        return LogLocator(kind="taskcluster", job_id=job.job_id, run_id=job.attempt or 0)
    return None


def request_for(loc: LogLocator, ep: ProviderEndpoints) -> tuple[str, dict[str, str]]:
    """URL and headers for a locator. Tokens go in headers only, never in URLs or logs."""
    headers: dict[str, str] = {}
    if loc.kind == "url" and loc.url:
        return loc.url, headers
    if loc.kind == "gitlab":
        if ep.gitlab_token:
            headers["PRIVATE-TOKEN"] = ep.gitlab_token
        project = (loc.project or "").replace("/", "%2F")
        return (
            f"{ep.gitlab_url.rstrip('/')}/api/v4/projects/{project}/jobs/{loc.job_id}/trace",
            headers,
        )
    if loc.kind == "github":
        headers["Accept"] = "application/vnd.github+json"
        if ep.github_token:
            headers["Authorization"] = f"Bearer {ep.github_token}"
        return (
            f"{ep.github_url.rstrip('/')}/repos/{loc.project}/actions/jobs/{loc.job_id}/logs",
            headers,
        )
    if loc.kind == "taskcluster":
        # Task logs are public artifacts: no credentials are sent.
        if loc.url:
            return loc.url, headers
        return (
            f"{ep.taskcluster_url.rstrip('/')}/api/queue/v1/task/{loc.job_id}"
            f"/runs/{loc.run_id or 0}/artifacts/public/logs/live_backing.log",
            headers,
        )
    raise ValueError(f"cannot locate a log for {loc!r}")


class LogSource:
    """Fetches logs over one aiohttp session, with timeouts and bounded, jittered retries."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: ProviderEndpoints,
        *,
        cap_bytes: int = 64 * 1024 * 1024,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 60.0,
    ) -> None:
        self.session = session
        self.endpoints = endpoints
        self.cap = cap_bytes
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_read=min(timeout, 30.0))

    async def fetch(self, job: JobFinished) -> LogFetched:
        loc = locate(job)
        if loc is None:
            return LogFetched(None, note=f"no log source for {job.source} jobs")
        url, headers = request_for(loc, self.endpoints)
        last = "not fetched"
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._get(url, headers)
            except _Permanent as exc:
                return LogFetched(None, note=str(exc))
            except (TimeoutError, aiohttp.ClientError, _Retryable) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.info("log fetch attempt %d for job %s failed: %s", attempt, job.job_id, last)
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        return LogFetched(None, note=f"log unavailable after {self.attempts} attempts: {last}")

    async def _get(self, url: str, headers: dict[str, str]) -> LogFetched:
        async with self.session.get(url, headers=headers, timeout=self.timeout) as resp:
            if resp.status in (429,) or resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status}")
            if resp.status == 404:
                # GitLab answers 404 briefly while a trace is archived: worth another try.
                raise _Retryable("HTTP 404")
            if resp.status >= 400:
                raise _Permanent(f"log fetch refused: HTTP {resp.status}")
            buf = TailKeeper(self.cap)
            inflate: zlib._Decompress | None = None
            first = True
            async for chunk in resp.content.iter_chunked(256 * 1024):
                if first:
                    first = False
                    # A gzip file served without Content-Encoding (Taskcluster artifacts).
                    if chunk[:2] == GZIP_MAGIC:
                        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                if inflate is not None:
                    # Bound what one compressed chunk may expand to (gzip bombs).
                    out = inflate.decompress(chunk, self.cap)
                    buf.write(out)
                    while inflate.unconsumed_tail:
                        buf.write(inflate.decompress(inflate.unconsumed_tail, self.cap))
                else:
                    buf.write(chunk)
            if inflate is not None:
                buf.write(inflate.flush())
        tail = buf.result()
        note = (
            f"log of {buf.total} bytes is larger than {self.cap}: its last lines were read"
            if buf.truncated
            else None
        )
        return LogFetched(
            b"".join(tail.chunks),
            size=buf.total,
            truncated=buf.truncated,
            note=note,
            first_line=tail.first_line,
        )


class _Retryable(Exception):
    pass


class _Permanent(Exception):
    pass
