"""Log fetching against fake providers that are real HTTP servers speaking the API shapes."""

from __future__ import annotations

import asyncio

import aiohttp

from ciretry.classify.logsource import (
    FETCH_OVERHEAD,
    ByteBudget,
    LogLease,
    LogSource,
    ProviderEndpoints,
)
from ciretry.common.events import JobFinished, LogLocator

from .fakes import TOKEN, FakeProvider


def job(source: str = "gitlab", **kw: object) -> JobFinished:
    fields: dict[str, object] = dict(
        source=source,
        project="42",
        pipeline_id="7",
        job_id="1001",
        job_name="build",
        status="failed",
    )
    fields.update(kw)
    return JobFinished(**fields)  # type: ignore[arg-type]


def source(provider: FakeProvider, session: aiohttp.ClientSession, **kw: object) -> LogSource:
    ep = ProviderEndpoints(
        gitlab_url=provider.url(),
        gitlab_token=TOKEN,
        github_url=provider.url(),
        taskcluster_url=provider.url(),
    )
    return LogSource(session, ep, backoff=0.01, **kw)  # type: ignore[arg-type]


async def test_gitlab_trace_streamed_with_token_header(provider: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s).fetch(job())
    assert got.data == provider.body and not got.truncated
    path, headers = provider.calls[-1]
    assert path == "/api/v4/projects/42/jobs/1001/trace"
    assert headers["PRIVATE-TOKEN"] == TOKEN


async def test_large_log_keeps_the_tail_within_the_cap(provider: FakeProvider) -> None:
    provider.body = b"".join(b"noise line %d\n" % i for i in range(5000)) + b"FATAL: the end\n"
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s, cap_bytes=1000).fetch(job())
    assert got.data is not None and len(got.data) <= 1000
    assert got.data.endswith(b"FATAL: the end\n")
    assert got.data.startswith(b"noise line ")  # whole lines only
    assert got.truncated and got.size == len(provider.body)
    # Line numbers stay those of the whole log: the tail's first line is counted from the top.
    first = int(got.data.split(b"\n", 1)[0].split()[-1])
    assert got.first_line == first + 1
    assert got.note and "last lines" in got.note


async def test_transient_errors_are_retried(provider: FakeProvider) -> None:
    provider.failures_left = 2
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s).fetch(job())
    assert got.data == provider.body
    assert len(provider.calls) == 3


async def test_log_that_stays_unavailable_says_so(provider: FakeProvider) -> None:
    provider.failures_left = 100
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s, attempts=3).fetch(job())
    assert got.data is None and not got.available
    assert got.note is not None and "after 3 attempts" in got.note and "502" in got.note
    assert len(provider.calls) == 3


async def test_auth_refusal_is_not_retried(provider: FakeProvider) -> None:
    ep = ProviderEndpoints(gitlab_url=provider.url(), gitlab_token="wrong")
    async with aiohttp.ClientSession() as s:
        got = await LogSource(s, ep, backoff=0.01).fetch(job())
    assert got.data is None and got.note == "log fetch refused: HTTP 401"
    assert len(provider.calls) == 1


async def test_github_follows_redirect_to_blob(provider: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s).fetch(job("github", project="octo/repo"))
    assert got.data == provider.body
    assert [c[0] for c in provider.calls] == [
        "/repos/octo/repo/actions/jobs/1001/logs",
        "/blob/job.txt",
    ]


async def test_taskcluster_gzip_artifact_is_inflated(provider: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s).fetch(
            job("taskcluster", job_id="fTaskId", attempt=2, pipeline_id="group")
        )
    assert got.data == provider.body
    assert provider.calls[-1][0].endswith(
        "/task/fTaskId/runs/2/artifacts/public/logs/live_backing.log"
    )


async def test_explicit_url_locator(provider: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s).fetch(
            job(log=LogLocator(kind="url", url=provider.url() + "/blob/x.log"))
        )
    assert got.data == provider.body


# --- the byte budget shared by concurrent fetches --------------------------------------------


async def test_budget_serves_waiters_in_order_and_never_overlends() -> None:
    budget = ByteBudget(100)
    assert await budget.acquire(60) == 60
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await budget.acquire(n)
        order.append(name)

    big = asyncio.create_task(take("big", 80))
    await asyncio.sleep(0)  # big is queued first
    small = asyncio.create_task(take("small", 10))
    await asyncio.sleep(0)
    # 40 bytes are free, enough for "small", but "big" came first: nobody overtakes it.
    assert order == [] and budget.waiting == 2 and budget.in_use == 60
    budget.release(60)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.in_use == 90
    assert await asyncio.wait_for(budget.acquire(10), 1) == 10  # exactly full, not beyond
    assert budget.available == 0


async def test_a_request_above_the_budget_is_cut_to_it() -> None:
    budget = ByteBudget(100)
    assert await budget.acquire(500) == 100
    budget.release(100)
    assert budget.in_use == 0


async def test_a_cancelled_waiter_takes_nothing_and_lets_the_next_one_in() -> None:
    budget = ByteBudget(100)
    await budget.acquire(50)
    blocked = asyncio.create_task(budget.acquire(80))
    behind = asyncio.create_task(budget.acquire(40))
    await asyncio.sleep(0)
    assert not behind.done()  # queued behind the 80
    blocked.cancel()
    assert await asyncio.wait_for(behind, 1) == 40
    assert budget.in_use == 90 and budget.waiting == 0


async def test_a_lease_never_waits_holding_bytes() -> None:
    """Two handlers each holding part of the budget and each wanting all of it: since a lease
    gives back what it holds before it waits, one gets it, then the other: no deadlock."""
    budget = ByteBudget(100)
    a, b = LogLease(budget), LogLease(budget)
    await a.hold(60)
    await b.hold(40)
    want_all = asyncio.create_task(a.hold(100))
    await asyncio.sleep(0)
    assert budget.in_use == 40 and not want_all.done()  # a gave its 60 back to wait
    b.release()
    await asyncio.wait_for(want_all, 1)
    assert a.held == 100
    a.shrink(30)
    assert budget.in_use == 30
    async with a:
        pass
    assert budget.in_use == 0 and a.held == 0


async def test_fetch_holds_the_cap_until_the_size_is_known_then_only_the_log(
    provider: FakeProvider,
) -> None:
    budget = ByteBudget(10 * 1024 * 1024)
    cap = 1024 * 1024
    async with aiohttp.ClientSession() as s:
        logs = source(provider, s, cap_bytes=cap, budget=budget)
        # GitLab's trace here is chunked: its size is unknown until the end, the cap is held.
        async with logs.lease() as lease:
            got = await logs.fetch(job(), lease)
            assert got.data == provider.body
            assert budget.in_use == lease.held == cap + FETCH_OVERHEAD
        assert budget.in_use == 0
        # GitHub's blob has a Content-Length: the lease shrinks to the log's size.
        async with logs.lease() as lease:
            got = await logs.fetch(job("github", project="octo/repo"), lease)
            assert got.data == provider.body
            assert budget.in_use == len(provider.body) + FETCH_OVERHEAD
        # A refused fetch gives its bytes back at once; so does a fetch without a lease.
        async with logs.lease() as lease:
            got = await logs.fetch(
                job(log=LogLocator(kind="url", url=provider.url() + "/nowhere")), lease
            )
            assert not got.available and budget.in_use == 0
        await logs.fetch(job())
        assert budget.in_use == 0


async def test_the_log_is_kept_as_its_chunks_never_joined(provider: FakeProvider) -> None:
    provider.body = b"".join(b"line %d\n" % i for i in range(100_000))
    async with aiohttp.ClientSession() as s:
        got = await source(provider, s).fetch(job())
    assert got.chunks is not None and len(got.chunks) > 1
    assert got.kept == len(provider.body) and got.data == provider.body
