"""Fetching a job's log from its provider: streamed, gzip-aware, capped to the tail, retried.

GitLab ``GET /projects/:id/jobs/:job_id/trace``, GitHub ``GET /repos/:repo/actions/jobs/:id/logs``
(a redirect to blob storage), Taskcluster's ``public/logs/live_backing.log`` artifact (also a
redirect, often gzip-encoded) and Buildkite's ``GET …/builds/:n/jobs/:id/log.txt`` (the raw log). Memory is bounded by the cap whatever the log's size: chunks are
kept in a deque and the oldest dropped once the cap is exceeded, so a huge log yields its tail,
which is where the failure is.

Each provider is reached through its client (its URL layout and token:
``ciretry.common.providers``) over one injectable transport, so the tests can answer in-process.
Retries are the shared client's (``HttpClient.retrying``: 429, 5xx and no answer, Retry-After
honoured up to a few seconds), plus 404, which GitLab answers briefly while it archives a trace;
any other 4xx is final.

Memory across concurrent fetches is bounded by a ``ByteBudget`` shared by every handler of the
process (``CIRETRY_CLASSIFY_LOG_BUDGET_BYTES``): sixteen handlers with a 64 MiB cap could
otherwise hold a gigabyte of logs at once. A handler holds a ``LogLease`` from before its request
until its verdict is made. Until the answer arrives that is only what may be read ahead of the
first read (``FETCH_OVERHEAD``); then the most the log can occupy: its size plus the chunks in
flight when the answer shows a ``Content-Length`` (and no compression), else the cap plus those.
Holding the cap from before the request let only budget / cap fetches (three, by default) ask
at once whatever their logs' sizes: the handlers queued behind them, and at 150 failed jobs/s
half a second passed between a job and its verdict on a core half idle (docs/benchmarks.md,
"Stop 28"). A lease never waits while it holds bytes (it gives them back first), and the budget
serves waiters in order, so no handler starves and none deadlock; while it waits for its size,
a fetch's answer sits in the transport's read-ahead (aiohttp stops reading at 128 KiB) or, for a
gzip file found in its first chunk, in that chunk: outside the budget, bounded per fetch. The log
is kept as the chunks it arrived in (``LogFetched.chunks``), never joined into a second copy.
"""

from __future__ import annotations

import asyncio
import collections
import zlib
from dataclasses import dataclass
from types import TracebackType

from ciretry.common.events import JobFinished, LogLocator
from ciretry.common.http import HttpClient, HttpSettings, Response, Sleep, TransientError, Transport
from ciretry.common.providers import (
    BUILDKITE,
    GITHUB,
    GITLAB,
    TASKCLUSTER_QUEUE,
    buildkite_job,
    gitlab_project,
)

from .logtext import TailKeeper

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
    buildkite_url: str = "https://api.buildkite.com"
    buildkite_token: str = ""


#: A log fetch may take long (a large log over a slow link) but must not stall between chunks;
#: a Retry-After longer than a few seconds is not waited for (the log is reported unavailable).
LOG_HTTP = HttpSettings(
    timeout_s=60.0, read_timeout_s=30.0, backoff_base_s=0.5, retry_after_cap_s=10.0
)


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
    if job.source == "buildkite" and job.pipeline_id.isdigit():
        build = int(job.pipeline_id)
        return LogLocator(kind="buildkite", project=job.project, job_id=job.job_id, run_id=build)
    return None


class LogSource:
    """Fetches logs over one transport, each provider through its own client (its API
    conventions and token: ``ciretry.common.providers``), with timeouts and bounded, jittered
    retries; with a ``budget``, concurrent fetches hold at most its bytes (module doc)."""

    def __init__(
        self,
        transport: Transport,
        endpoints: ProviderEndpoints,
        *,
        cap_bytes: int = 64 * 1024 * 1024,
        settings: HttpSettings = LOG_HTTP,
        budget: ByteBudget | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        ep = endpoints
        self.cap = cap_bytes
        self.budget = budget
        self._gitlab = GITLAB.client(
            transport, ep.gitlab_url, ep.gitlab_token, settings=settings, sleep=sleep
        )
        self._github = GITHUB.client(
            transport, ep.github_url, ep.github_token, settings=settings, sleep=sleep
        )
        # Task logs are public artifacts: no credentials are sent.
        self._taskcluster = TASKCLUSTER_QUEUE.client(
            transport, ep.taskcluster_url, "", settings=settings, sleep=sleep
        )
        self._buildkite = BUILDKITE.client(
            transport, ep.buildkite_url, ep.buildkite_token, settings=settings, sleep=sleep
        )
        self._anywhere = HttpClient(transport, settings=settings, sleep=sleep)

    def where(self, loc: LogLocator) -> tuple[HttpClient, str]:
        """The client and path for a locator. Tokens go in headers only, never in URLs."""
        if loc.kind == "url" and loc.url:
            return self._anywhere, loc.url
        if loc.kind == "gitlab":
            return self._gitlab, f"{gitlab_project(loc.project or '')}/jobs/{loc.job_id}/trace"
        if loc.kind == "github":
            return self._github, f"/repos/{loc.project}/actions/jobs/{loc.job_id}/logs"
        if loc.kind == "taskcluster":
            if loc.url:
                return self._anywhere, loc.url
            artifact = "public/logs/live_backing.log"
            return (
                self._taskcluster,
                f"/task/{loc.job_id}/runs/{loc.run_id or 0}/artifacts/{artifact}",
            )
        if loc.kind == "buildkite" and loc.run_id is not None:
            job = buildkite_job(loc.project or "", str(loc.run_id), loc.job_id or "")
            # The raw text (``.txt``), not the JSON document that wraps it.
            return self._buildkite, f"{job}/log.txt"
        raise ValueError(f"cannot locate a log for {loc!r}")

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
        client, path = self.where(loc)
        try:
            return await client.retrying(
                lambda: self._get(client, path, lease), f"log of job {job.job_id}"
            )
        except _Refused as exc:
            return LogFetched(None, note=str(exc))
        except TransientError as exc:
            return LogFetched(None, note=f"log unavailable after {exc.attempts} attempts: {exc}")

    async def _get(self, client: HttpClient, path: str, lease: LogLease) -> LogFetched:
        # Until the answer shows the log's size: what can arrive ahead of the first read.
        await lease.hold(FETCH_OVERHEAD)
        try:
            async with client.stream("GET", path) as resp:
                if resp.status == 404:
                    # GitLab answers 404 briefly while a trace is archived: worth another try.
                    raise TransientError(f"GET {path}: HTTP 404", 404)
                if resp.status >= 400:
                    raise _Refused(f"log fetch refused: HTTP {resp.status}")
                # The most this log can occupy, before its first byte is read.
                await lease.hold(self._room(resp))
                return await self._read(resp, lease)
        except (TransientError, _Refused):
            lease.release()
            raise

    def _room(self, resp: Response) -> int:
        """What reading this answer may hold: its size when the answer says it and nothing
        inflates it (the tail's bound otherwise), plus the chunks in flight."""
        if resp.content_length is not None and "Content-Encoding" not in resp.headers:
            return min(self.cap, resp.content_length) + FETCH_OVERHEAD
        return self.cap + FETCH_OVERHEAD

    async def _read(self, resp: Response, lease: LogLease) -> LogFetched:
        buf = TailKeeper(self.cap)
        inflate: zlib._Decompress | None = None
        first = True
        async for chunk in resp.iter_bytes(READ_CHUNK):
            if first:
                first = False
                # A gzip file served without Content-Encoding (Taskcluster artifacts): its
                # Content-Length is the compressed size, the text may reach the cap.
                if chunk[:2] == GZIP_MAGIC:
                    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    if self._room(resp) < self.cap + FETCH_OVERHEAD:
                        await lease.hold(self.cap + FETCH_OVERHEAD)
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


class _Refused(Exception):
    """The provider refused the log (a 4xx other than 404): asking again will not help."""
