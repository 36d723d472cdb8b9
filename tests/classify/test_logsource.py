"""Log fetching against a fake provider speaking the log endpoints' shapes: in-process (through
its ``FunctionTransport``) for the logic, and over real HTTP for each provider's path (``served``)
where chunked transfer, redirects and Content-Length are what the wire carries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ciretry.classify.logsource import (
    FETCH_OVERHEAD,
    ByteBudget,
    LogLease,
    LogSource,
    ProviderEndpoints,
)
from ciretry.classify.main import log_source
from ciretry.common.config import load_config
from ciretry.common.events import JobFinished, LogLocator
from ciretry.common.http import HttpSettings, Transport
from tests.support.fakehttp import Sleeps, reaching, running
from tests.support.providers import FakeBuildkite

from .fakes import TOKEN, FakeProvider

FAST = HttpSettings(timeout_s=5.0, max_attempts=4, backoff_base_s=0.01, backoff_cap_s=0.02)
BOTH = pytest.mark.parametrize("provider", ["in-process", "served"], indirect=True)


@pytest.fixture(params=["in-process"])
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[FakeProvider]:
    async with running(FakeProvider(), request.param) as fake:
        yield fake


@pytest.fixture
async def transport(provider: FakeProvider) -> AsyncIterator[Transport]:
    async with reaching(provider) as transport:
        yield transport


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


def source(provider: FakeProvider, transport: Transport, **kw: object) -> LogSource:
    ep = ProviderEndpoints(
        gitlab_url=provider.url,
        gitlab_token=TOKEN,
        github_url=provider.url,
        github_token="ghp-secret",
        taskcluster_url=provider.url,
    )
    kw.setdefault("settings", FAST)
    return LogSource(transport, ep, sleep=Sleeps(), **kw)  # type: ignore[arg-type]


@BOTH
async def test_gitlab_trace_streamed_with_token_header(
    provider: FakeProvider, transport: Transport
) -> None:
    got = await source(provider, transport).fetch(job())
    assert got.data == provider.body and not got.truncated
    (call,) = provider.calls
    assert call.path == "/api/v4/projects/42/jobs/1001/trace"
    assert call.headers["PRIVATE-TOKEN"] == TOKEN


async def test_a_project_path_is_one_quoted_segment(
    provider: FakeProvider, transport: Transport
) -> None:
    got = await source(provider, transport).fetch(job(project="grp/sub"))
    assert got.data == provider.body
    assert provider.calls[0].path == "/api/v4/projects/grp%2Fsub/jobs/1001/trace"


async def test_large_log_keeps_the_tail_within_the_cap(
    provider: FakeProvider, transport: Transport
) -> None:
    provider.body = b"".join(b"noise line %d\n" % i for i in range(5000)) + b"FATAL: the end\n"
    got = await source(provider, transport, cap_bytes=1000).fetch(job())
    assert got.data is not None and len(got.data) <= 1000
    assert got.data.endswith(b"FATAL: the end\n")
    assert got.data.startswith(b"noise line ")  # whole lines only
    assert got.truncated and got.size == len(provider.body)
    # Line numbers stay those of the whole log: the tail's first line is counted from the top.
    first = int(got.data.split(b"\n", 1)[0].split()[-1])
    assert got.first_line == first + 1
    assert got.note and "last lines" in got.note


async def test_transient_errors_are_retried(provider: FakeProvider, transport: Transport) -> None:
    provider.failures_left = 2
    got = await source(provider, transport).fetch(job())
    assert got.data == provider.body
    assert len(provider.calls) == 3


async def test_a_trace_being_archived_is_asked_again(
    provider: FakeProvider, transport: Transport
) -> None:
    """GitLab answers 404 while it archives a trace: another try finds it."""
    provider.fail[("GET", "/api/v4/projects/42/jobs/1001/trace")] = [404]
    got = await source(provider, transport).fetch(job())
    assert got.data == provider.body and len(provider.calls) == 2


async def test_a_rate_limit_is_waited_out_when_short_and_reported_when_long(
    provider: FakeProvider, transport: Transport
) -> None:
    sleeps = Sleeps()
    ep = ProviderEndpoints(gitlab_url=provider.url, gitlab_token=TOKEN)
    logs = LogSource(transport, ep, settings=FAST, sleep=sleeps)
    provider.fail[("GET", "/api/v4/projects")] = [429]
    provider.retry_after = "3"
    assert (await logs.fetch(job())).data == provider.body
    assert sleeps.delays == [3.0]
    provider.fail[("GET", "/api/v4/projects")] = [429]
    provider.retry_after = "3600"
    got = await logs.fetch(job())
    assert not got.available and got.note is not None and "429" in got.note
    assert sleeps.delays == [3.0]  # an hour is not waited for


async def test_log_that_stays_unavailable_says_so(
    provider: FakeProvider, transport: Transport
) -> None:
    provider.failures_left = 100
    three = HttpSettings(max_attempts=3, backoff_base_s=0.01)
    got = await source(provider, transport, settings=three).fetch(job())
    assert got.data is None and not got.available
    assert got.note is not None and "after 3 attempts" in got.note and "502" in got.note
    assert len(provider.calls) == 3


async def test_auth_refusal_is_not_retried(provider: FakeProvider, transport: Transport) -> None:
    ep = ProviderEndpoints(gitlab_url=provider.url, gitlab_token="wrong")
    got = await LogSource(transport, ep, settings=FAST).fetch(job())
    assert got.data is None and got.note == "log fetch refused: HTTP 401"
    assert len(provider.calls) == 1


@BOTH
async def test_github_follows_redirect_to_blob(
    provider: FakeProvider, transport: Transport
) -> None:
    got = await source(provider, transport).fetch(job("github", project="octo/repo"))
    assert got.data == provider.body
    assert [c.path for c in provider.calls] == [
        "/repos/octo/repo/actions/jobs/1001/logs",
        "/blob/job.txt",
    ]
    assert provider.calls[0].headers["Authorization"] == "Bearer ghp-secret"


@BOTH
async def test_taskcluster_gzip_artifact_is_inflated(
    provider: FakeProvider, transport: Transport
) -> None:
    got = await source(provider, transport).fetch(
        job("taskcluster", job_id="fTaskId", attempt=2, pipeline_id="group")
    )
    assert got.data == provider.body
    (call,) = provider.calls
    assert call.path == "/api/queue/v1/task/fTaskId/runs/2/artifacts/public/logs/live_backing.log"
    assert "Authorization" not in call.headers  # public artifacts: no credentials


async def test_explicit_url_locator_gets_no_token(
    provider: FakeProvider, transport: Transport
) -> None:
    got = await source(provider, transport).fetch(
        job(log=LogLocator(kind="url", url=provider.url + "/blob/x.log"))
    )
    assert got.data == provider.body
    assert "PRIVATE-TOKEN" not in provider.calls[0].headers


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
    assert a.held == 100 and budget.in_use == 100
    async with a:
        pass
    assert budget.in_use == 0 and a.held == 0


@BOTH
async def test_fetches_ask_at_once_whatever_the_cap(
    provider: FakeProvider, transport: Transport
) -> None:
    """Before its answer shows the log's size, a fetch holds what can arrive ahead of its first
    read, not the cap: with a budget of two caps, eight fetches are at the provider at once
    (holding the cap first, the third waited for one of the first two to be answered)."""
    cap = 16 * FETCH_OVERHEAD
    budget = ByteBudget(2 * (cap + FETCH_OVERHEAD))
    logs = source(provider, transport, cap_bytes=cap, budget=budget)
    holds = [provider.hold("GET", "/actions/jobs/", before=True) for _ in range(8)]
    fetches = [
        asyncio.create_task(logs.fetch(job("github", project="octo/repo", job_id=str(n))))
        for n in range(8)
    ]
    # A bound on a failure, not a wait for time to pass: the holds are awaited.
    await asyncio.wait_for(asyncio.gather(*(h.arrived.wait() for h in holds)), 10)
    assert budget.in_use == 8 * FETCH_OVERHEAD
    for h in holds:
        h.release()
    got = await asyncio.gather(*fetches)
    assert all(g.data == provider.body for g in got) and budget.in_use == 0


@BOTH
async def test_fetch_holds_the_cap_until_the_size_is_known_then_only_the_log(
    provider: FakeProvider, transport: Transport
) -> None:
    budget = ByteBudget(10 * 1024 * 1024)
    cap = 1024 * 1024
    logs = source(provider, transport, cap_bytes=cap, budget=budget)
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
    # Taskcluster's gzip file, served without Content-Encoding: its length is not the text's.
    async with logs.lease() as lease:
        got = await logs.fetch(job("taskcluster", job_id="abc123"), lease)
        assert got.data == provider.body
        assert budget.in_use == cap + FETCH_OVERHEAD
    # A refused fetch gives its bytes back at once; so does a fetch without a lease.
    async with logs.lease() as lease:
        got = await logs.fetch(
            job(log=LogLocator(kind="url", url=provider.url + "/nowhere")), lease
        )
        assert not got.available and budget.in_use == 0
    await logs.fetch(job())
    assert budget.in_use == 0


async def test_the_log_is_kept_as_its_chunks_never_joined(
    provider: FakeProvider, transport: Transport
) -> None:
    provider.body = b"".join(b"line %d\n" % i for i in range(100_000))
    got = await source(provider, transport).fetch(job())
    assert got.chunks is not None and len(got.chunks) > 1
    assert got.kept == len(provider.body) and got.data == provider.body


@pytest.mark.parametrize("where", ["in-process", "served"])
async def test_buildkite_raw_log_with_its_token(where: str) -> None:
    job_id = "0190e4a2-7c1b-7d3e-9a4f-5b6c7d8e9f01"
    async with running(FakeBuildkite(), where) as fake, reaching(fake) as transport:
        fake.add_job(job_id, "build", 12)
        fake.logs[job_id] = b"~~~ Running commands\n^^^ +++\nError: The command exited with status -1\n"
        ep = ProviderEndpoints(buildkite_url=fake.url, buildkite_token="bkua_secret")
        logs = LogSource(transport, ep, settings=FAST, sleep=Sleeps())
        # Without a locator from ingest, the job's identity says where its log is.
        bk = job("buildkite", project="my-org/my-pipeline", pipeline_id="12", job_id=job_id)
        got = await logs.fetch(bk)
        assert got.data == fake.logs[job_id]
        (call,) = fake.calls
        assert call.path == (
            f"/v2/organizations/my-org/pipelines/my-pipeline/builds/12/jobs/{job_id}/log.txt"
        )
        assert call.headers["Authorization"] == "Bearer bkua_secret"
        # The web URL ingest keeps on the locator is for people: never fetched with the token.
        located = job(
            "buildkite",
            project="my-org/my-pipeline",
            pipeline_id="12",
            job_id=job_id,
            log=LogLocator(
                kind="buildkite",
                project="my-org/my-pipeline",
                job_id=job_id,
                run_id=12,
                url="https://buildkite.com/my-org/my-pipeline/builds/12#" + job_id,
            ),
        )
        assert (await logs.fetch(located)).data == fake.logs[job_id]
        assert [c.path for c in fake.calls] == [call.path, call.path]


@BOTH
async def test_classify_asks_a_provider_at_most_its_configured_requests_at_once(
    provider: FakeProvider, transport: Transport
) -> None:
    """``CIRETRY_PROVIDER_MAX_IN_FLIGHT`` reaches the log source classify's ``setup`` builds:
    of eight fetches under way, three are at the provider; the rest follow as they finish."""
    config = load_config(
        {
            "CIRETRY_GITLAB_URL": provider.url,
            "CIRETRY_GITLAB_TOKEN": TOKEN,
            "CIRETRY_PROVIDER_MAX_IN_FLIGHT": "3",
        }
    )
    logs = log_source(config, transport)
    holds = [provider.hold("GET", "/jobs/", before=True) for _ in range(8)]
    fetches = [asyncio.create_task(logs.fetch(job(job_id=str(n)))) for n in range(8)]
    # A bound on a failure, not a wait for time to pass: the holds are awaited.
    await asyncio.wait_for(asyncio.gather(*(h.arrived.wait() for h in holds[:3])), 10)
    assert [h.arrived.is_set() for h in holds].count(True) == 3
    assert not any(f.done() for f in fetches)
    for h in holds:
        h.release()
    got = await asyncio.gather(*fetches)
    assert all(g.data == provider.body for g in got)
    assert len(provider.calls_of("GET", "/jobs/")) == 8
