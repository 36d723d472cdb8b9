"""Fetching a job's log from its provider: streamed, gzip-aware, capped to the tail, retried.

GitLab ``GET /projects/:id/jobs/:job_id/trace``, GitHub ``GET /repos/:repo/actions/jobs/:id/logs``
(a redirect to blob storage) and Taskcluster's ``public/logs/live_backing.log`` artifact (also a
redirect, often gzip-encoded). Memory is bounded by the cap whatever the log's size: chunks are
kept in a deque and the oldest dropped once the cap is exceeded, so a huge log yields its tail,
which is where the failure is.

Memory across concurrent fetches is bounded by a ``ByteBudget`` shared by every handler of the
process (``CIRETRY_CLASSIFY_LOG_BUDGET_BYTES``): sixteen handlers with a 64 MiB cap could
otherwise hold a gigabyte of logs at once. A handler holds a ``LogLease`` from before its request
until its verdict is made: the most the log can occupy (the cap, plus the chunks in flight), cut
down to the log's size once the response shows a ``Content-Length`` (and no compression). A lease
never waits while it holds bytes (it gives them back first), and the budget serves waiters in
order, so no handler starves and none deadlock. The log is kept as the chunks it arrived in
(``LogFetched.chunks``), never joined into a second copy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import zlib
from dataclasses import dataclass
from types import TracebackType

import aiohttp

from ciretry.common.events import JobFinished, LogLocator

from .logtext import TailKeeper

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
#: Bytes read from the provider at a time, and the most one gzip step may inflate to.
READ_CHUNK = 256 * 1024
#: What a fetch holds beyond the cap: the chunk being added to the tail, and the tail's first
#: chunk cut at a line start.
FETCH_OVERHEAD = 2 * READ_CHUNK


@dataclass(frozen=True, slots=True)
class LogFetched:
    """The log's text (its tail, from a line start, when it was larger than the cap) as the
    chunks it arrived in, or why there is none. ``first_line`` is the number of the tail's first
    line in the whole log; ``size`` the whole log's size."""

    chunks: tuple[bytes, ...] | None
    size: int = 0
    truncated: bool = False
    note: str | None = None
    first_line: int = 1

    @property
    def available(self) -> bool:
        return self.chunks is not None

    @property
    def kept(self) -> int:
        """Bytes of the log held (the tail)."""
        return sum(len(c) for c in self.chunks or ())

    @property
    def data(self) -> bytes | None:
        """The kept text as one buffer: a copy, for callers that want one (not the service)."""
        return None if self.chunks is None else b"".join(self.chunks)


class ByteBudget:
    """Bytes the concurrent log fetches of one process may hold at once. ``acquire`` waits
    until its bytes are free, first come first served (a large request is not overtaken by
    small ones forever); a request above the whole budget is cut to it."""

    def __init__(self, total: int) -> None:
        if total <= 0:
            raise ValueError("a byte budget must be positive")
        self.total = total
        self.available = total
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def in_use(self) -> int:
        return self.total - self.available

    @property
    def waiting(self) -> int:
        return sum(1 for _, f in self._waiters if not f.done())

    async def acquire(self, n: int) -> int:
        """Take ``n`` bytes (at most the whole budget), waiting for them; returns how many."""
        n = min(n, self.total)
        if not self._waiters and n <= self.available:
            self.available -= n
            return n
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted as we were cancelled: give it back
            else:
                self._wake()  # we may have been the head that blocked the others
            raise
        return n

    def release(self, n: int) -> None:
        self.available = min(self.total, self.available + n)
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            n, future = waiters[0]
            if future.done():  # cancelled while waiting
                waiters.popleft()
                continue
            if n > self.available:
                return
            waiters.popleft()
            self.available -= n
            future.set_result(None)


class LogLease:
    """The part of a ``ByteBudget`` one handler's log holds; given back on ``release`` (or at
    the end of ``async with``). ``hold`` gives back what is held before waiting, so a lease
    never waits holding bytes: waiters hold nothing, holders wait for nothing, no deadlock."""

    def __init__(self, budget: ByteBudget | None) -> None:
        self.budget = budget
        self.held = 0

    async def hold(self, n: int) -> None:
        self.release()
        if self.budget is not None:
            self.held = await self.budget.acquire(n)

    def shrink(self, n: int) -> None:
        """Hold at most ``n`` bytes (the log turned out smaller than feared)."""
        if self.budget is not None and n < self.held:
            self.budget.release(self.held - n)
            self.held = n

    def release(self) -> None:
        if self.budget is not None and self.held:
            self.budget.release(self.held)
        self.held = 0

    async def __aenter__(self) -> LogLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


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
    """Fetches logs over one aiohttp session, with timeouts and bounded, jittered retries;
    with a ``budget``, concurrent fetches hold at most its bytes (module doc)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: ProviderEndpoints,
        *,
        cap_bytes: int = 64 * 1024 * 1024,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 60.0,
        budget: ByteBudget | None = None,
    ) -> None:
        self.session = session
        self.endpoints = endpoints
        self.cap = cap_bytes
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_read=min(timeout, 30.0))
        self.budget = budget

    def lease(self) -> LogLease:
        """A lease on the budget, for a caller that keeps the log after ``fetch`` returns
        (``async with source.lease() as lease: fetched = await source.fetch(job, lease)``)."""
        return LogLease(self.budget)

    async def fetch(self, job: JobFinished, lease: LogLease | None = None) -> LogFetched:
        """The job's log. Its bytes stay counted in ``lease`` until the caller releases it;
        without one, only while the fetch runs."""
        if lease is None:
            async with self.lease() as own:
                return await self.fetch(job, own)
        loc = locate(job)
        if loc is None:
            return LogFetched(None, note=f"no log source for {job.source} jobs")
        url, headers = request_for(loc, self.endpoints)
        last = "not fetched"
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._get(url, headers, lease)
            except _Permanent as exc:
                lease.release()
                return LogFetched(None, note=str(exc))
            except (TimeoutError, aiohttp.ClientError, _Retryable) as exc:
                lease.release()
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.info("log fetch attempt %d for job %s failed: %s", attempt, job.job_id, last)
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        return LogFetched(None, note=f"log unavailable after {self.attempts} attempts: {last}")

    async def _get(self, url: str, headers: dict[str, str], lease: LogLease) -> LogFetched:
        # The most this log can occupy, before asking for it: nothing is read unbudgeted.
        await lease.hold(self.cap + FETCH_OVERHEAD)
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
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                if first:
                    first = False
                    # A gzip file served without Content-Encoding (Taskcluster artifacts).
                    if chunk[:2] == GZIP_MAGIC:
                        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    elif resp.content_length is not None and "Content-Encoding" not in resp.headers:
                        # Its size is known and it is not inflated: give back the rest.
                        lease.shrink(min(self.cap, resp.content_length) + FETCH_OVERHEAD)
                if inflate is not None:
                    # One step inflates to at most a chunk (gzip bombs, and the tail's bound).
                    buf.write(inflate.decompress(chunk, READ_CHUNK))
                    while inflate.unconsumed_tail:
                        buf.write(inflate.decompress(inflate.unconsumed_tail, READ_CHUNK))
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
            tuple(tail.chunks),
            size=buf.total,
            truncated=buf.truncated,
            note=note,
            first_line=tail.first_line,
        )


class _Retryable(Exception):
    pass


class _Permanent(Exception):
    pass
