"""Log fetching against fake providers that are real HTTP servers speaking the API shapes."""

from __future__ import annotations

import aiohttp

from ciretry.classify.logsource import LogSource, ProviderEndpoints
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
