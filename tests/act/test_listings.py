"""One listing of a pipeline's jobs for the requests of that pipeline checked at once
(``executors.listings``): the coalescer alone, with the moments a listing is sent and answered
in the test's hands; then the executors over a fake provider served on real HTTP, counting the
listings it answered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciretry.act.executors import CannotCheck, GitHubExecutor, GitLabExecutor, HttpSettings
from ciretry.act.executors.listings import Listing, SharedListings
from ciretry.common.events import BudgetSnapshot, RetryRequested
from ciretry.common.http import ApiResponse, TransientError
from tests.support.fakehttp import Sleeps, running
from tests.support.providers import FakeGitHub, FakeGitLab

from .helpers import job

FAST = HttpSettings(timeout_s=2.0, max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.05)
KEY = ("42", "900")


def request(
    job_id: str, *, name: str, source: str = "gitlab", project: str = "42", pipeline: str = "900"
) -> RetryRequested:
    return RetryRequested(
        source=source,  # type: ignore[arg-type]
        project=project,
        pipeline_id=pipeline,
        job_id=job_id,
        job_name=name,
        action="retry_job",
        idempotency_key=f"k-{job_id}",
        category="preempted",
        budget="system",
        snapshot=BudgetSnapshot(),
    )


class Provider:
    """A ``fetch`` for ``SharedListings`` whose listings are sent and answered when the test
    says: ``sent`` is set once a fetch has begun (its joiners are closed), and each fetch
    answers ``answers[n]`` (otherwise one page: one job whose id is its number) once ``answer``
    is set."""

    def __init__(self, *answers: Listing) -> None:
        self.fetched: list[tuple[str, str]] = []
        self.answers = list(answers)
        self.sent = asyncio.Event()
        self.answer = asyncio.Event()

    async def __call__(self, key: tuple[str, str]) -> Listing:
        self.fetched.append(key)
        n = len(self.fetched)
        self.sent.set()
        await self.answer.wait()
        return self.answers[n - 1] if n <= len(self.answers) else Listing(([numbered(n)],))


def numbered(n: int) -> dict[str, Any]:
    return {"id": n, "name": "build"}


async def at_once() -> None:
    """A window that closes as soon as the listing's task first runs: whoever asked in the same
    loop turn as the first request has joined it."""


async def test_requests_asking_before_the_listing_is_sent_share_it() -> None:
    provider = Provider()
    provider.answer.set()
    listings = SharedListings(provider, gather=at_once)
    got = await asyncio.gather(
        listings.get(KEY), listings.get(KEY), listings.get(KEY), listings.get(("42", "901"))
    )
    assert provider.fetched == [KEY, ("42", "901")]  # one listing per pipeline
    assert got[0] is got[1] is got[2] and got[0].pages == ([numbered(1)],)
    assert got[3].pages == ([numbered(2)],)


async def test_a_listing_already_sent_is_not_joined() -> None:
    """The request's claim may be younger than a listing on its way: that listing may have
    missed a retry made just before the claim, so the request waits for one of its own."""
    provider = Provider()
    listings = SharedListings(provider, gather=at_once)
    first = asyncio.ensure_future(listings.get(KEY))
    await provider.sent.wait()
    second = asyncio.ensure_future(listings.get(KEY))
    provider.answer.set()
    assert (await first).pages == ([numbered(1)],)
    assert (await second).pages == ([numbered(2)],)
    assert provider.fetched == [KEY, KEY]


async def test_requests_coming_while_a_listing_is_on_its_way_gather_for_the_next() -> None:
    """At most one listing of a pipeline on its way: the requests that come meanwhile share the
    one sent after its answer (a pipeline of many pages is not listed again every window)."""
    provider = Provider()
    listings = SharedListings(provider, gather=at_once)
    first = asyncio.ensure_future(listings.get(KEY))
    await provider.sent.wait()
    later = [asyncio.ensure_future(listings.get(KEY)) for _ in range(3)]
    other = asyncio.ensure_future(listings.get(("42", "901")))  # another pipeline: no wait
    while len(provider.fetched) < 2:
        provider.sent.clear()
        await provider.sent.wait()
    assert provider.fetched == [KEY, ("42", "901")]
    provider.answer.set()
    assert (await first).pages == ([numbered(1)],)
    assert (await other).pages == ([numbered(2)],)
    assert [(await t).pages for t in later] == [([numbered(3)],)] * 3
    assert provider.fetched == [KEY, ("42", "901"), KEY]


async def test_a_transient_failure_reaches_every_joiner_and_the_next_round_lists_afresh() -> None:
    failed = TransientError("HTTP 503: busy", status=503, retry_after=2.0)
    provider = Provider(Listing(failed=failed))
    provider.answer.set()
    listings = SharedListings(provider, gather=at_once)
    got = await asyncio.gather(listings.get(KEY), listings.get(KEY))
    raised = []
    for listing in got:
        with pytest.raises(TransientError) as caught:
            list(listing.named("build", "list the pipeline's jobs"))
        raised.append(caught.value)
    # Each its own error (its retry loop counts its attempts on it), saying what the one said.
    assert raised[0] is not raised[1]
    assert [(str(e), e.status, e.retry_after) for e in raised] == [("HTTP 503: busy", 503, 2.0)] * 2
    # The round after the failure: a new listing, not the failed one again.
    assert (await listings.get(KEY)).pages == ([numbered(2)],)
    assert provider.fetched == [KEY, KEY]


async def test_an_answer_other_than_200_fails_every_joiner_closed() -> None:
    forbidden = ApiResponse(403, {}, {"message": "403 Forbidden"}, '{"message": "403 Forbidden"}')
    provider = Provider(
        Listing(([{"id": 7, "name": "build"}, {"id": 8, "name": "lint"}],), refused=forbidden)
    )
    provider.answer.set()
    listings = SharedListings(provider, gather=at_once)
    for listing in await asyncio.gather(listings.get(KEY), listings.get(KEY)):
        rows = listing.named("build", "list the pipeline's jobs")
        assert next(rows) == [{"id": 7, "name": "build"}]  # the pages that came, then the failure
        with pytest.raises(CannotCheck) as caught:
            next(rows)
        assert caught.value.status == 403 and "list the pipeline's jobs" in str(caught.value)
    assert len(provider.fetched) == 1


async def test_a_joiner_cancelled_leaves_the_listing_to_the_others() -> None:
    provider = Provider()
    listings = SharedListings(provider, gather=at_once)
    leaving = asyncio.ensure_future(listings.get(KEY))
    staying = asyncio.ensure_future(listings.get(KEY))
    await provider.sent.wait()
    leaving.cancel()
    provider.answer.set()
    assert (await staying).pages == ([numbered(1)],)
    assert leaving.cancelled()


# --- over a fake provider on real HTTP ------------------------------------------------------


def listings_of(fake: FakeGitLab, pipeline: int) -> int:
    return len(fake.calls_of("GET", f"/pipelines/{pipeline}/jobs"))


async def test_gitlab_requests_of_one_pipeline_share_one_listing_and_each_calls_once() -> None:
    """Ten requests of one pipeline checked at once: one listing, one retry call each, and the
    job already retried (by a person, or by us before a crash) is found, for its request only."""
    async with running(FakeGitLab(), "served") as fake:
        for i in range(10):
            fake.add_job(500 + i, f"test-{i}", 900)
        fake.add_job(600, "test-3", 900)  # test-3 (job 503) was retried already
        fake.add_job(700, "test-4", 901)  # another pipeline's job of the same name
        ex = GitLabExecutor(fake.url, "tok", settings=FAST, sleep=Sleeps())
        requests = [request(str(500 + i), name=f"test-{i}") for i in range(10)]
        outcomes = await asyncio.gather(
            *(ex.execute(r, job(r.job_id, r.job_name)) for r in requests)
        )
        await ex.close()
    assert listings_of(fake, 900) == 1
    assert listings_of(fake, 901) == 0
    found = {r.job_id: o for r, o in zip(requests, outcomes, strict=True) if o.found_existing}
    assert list(found) == ["503"] and found["503"].new_job_id == "600"
    assert all(o.issued for o in outcomes)
    posts = sorted(c.path.split("/")[-2] for c in fake.posts("/retry"))
    assert posts == [str(500 + i) for i in range(10) if i != 3]  # each once, 503 not at all


async def test_gitlab_a_retry_made_after_a_listing_was_sent_is_seen_by_a_later_claim() -> None:
    """A person retries job 501 while request 500's listing is on its way (it was answered
    without the retry); request 501, claimed after that, must not use that listing: it lists
    again, finds the retry and does not call."""
    async with running(FakeGitLab(), "served") as fake:
        fake.add_job(500, "test-0", 900)
        fake.add_job(501, "test-1", 900)
        first = fake.hold("GET", "/pipelines/900/jobs")  # answered now, held on its way back
        ex = GitLabExecutor(fake.url, "tok", settings=FAST, sleep=Sleeps())
        a = asyncio.ensure_future(ex.execute(request("500", name="test-0"), job(500, "test-0")))
        await first.arrived.wait()
        fake.add_job(601, "test-1", 900)  # the person's retry of 501
        b = asyncio.ensure_future(ex.execute(request("501", name="test-1"), job(501, "test-1")))
        first.release()
        out_a, out_b = await a, await b
        await ex.close()
    assert out_a.issued and not out_a.found_existing
    assert out_b.found_existing and out_b.new_job_id == "601"
    assert [c.path for c in fake.posts()] == ["/api/v4/projects/42/jobs/500/retry"]
    assert listings_of(fake, 900) == 2


async def test_gitlab_a_failed_listing_fails_each_request_and_each_lists_again() -> None:
    """A 503 on the shared listing: each request backs off and takes a new listing (not the
    failed one), then calls once."""
    async with running(FakeGitLab(), "served") as fake:
        for i in range(4):
            fake.add_job(500 + i, f"test-{i}", 900)
        fake.fail[("GET", "/api/v4/projects/42/pipelines/900/jobs")] = [503]
        sleeps = Sleeps()
        ex = GitLabExecutor(fake.url, "tok", settings=FAST, sleep=sleeps)
        requests = [request(str(500 + i), name=f"test-{i}") for i in range(4)]
        outcomes = await asyncio.gather(
            *(ex.execute(r, job(r.job_id, r.job_name)) for r in requests)
        )
        await ex.close()
    assert len(sleeps.delays) == 4  # every request met the failure, and backed off
    # The failed listing, then a new one (the requests went round again together).
    assert listings_of(fake, 900) == 2
    assert all(o.issued and not o.found_existing for o in outcomes)
    assert len(fake.posts("/retry")) == len({c.path for c in fake.posts("/retry")}) == 4


async def test_gitlab_a_listing_refused_fails_every_request_closed() -> None:
    async with running(FakeGitLab(), "served") as fake:
        for i in range(3):
            fake.add_job(500 + i, f"test-{i}", 900)
        fake.fail[("GET", "/api/v4/projects/42/pipelines/900/jobs")] = [403]
        ex = GitLabExecutor(fake.url, "tok", settings=FAST, sleep=Sleeps())
        requests = [request(str(500 + i), name=f"test-{i}") for i in range(3)]
        outcomes = await asyncio.gather(
            *(ex.execute(r, job(r.job_id, r.job_name)) for r in requests)
        )
        await ex.close()
    assert listings_of(fake, 900) == 1
    assert all(not o.issued and o.status == 403 and o.will_retry for o in outcomes)
    assert all("check before acting failed" in o.detail for o in outcomes)
    assert fake.posts() == []


async def test_github_reruns_of_one_run_share_one_listing() -> None:
    async with running(FakeGitHub(), "served") as fake:
        for i in range(5):
            fake.add_job(77, 1000 + i, f"test-{i}")
        fake.add_job(77, 2000, "test-2", attempt=2)  # test-2 was rerun already
        ex = GitHubExecutor(fake.url, "ghp_x", settings=FAST, sleep=Sleeps())
        requests = [
            request(str(1000 + i), source="github", project="o/r", pipeline="77", name=f"test-{i}")
            for i in range(5)
        ]
        outcomes: list[Any] = await asyncio.gather(*(ex.execute(r, None) for r in requests))
        await ex.close()
    assert len(fake.calls_of("GET", "/runs/77/jobs")) == 1
    assert [o.found_existing for o in outcomes] == [False, False, True, False, False]
    assert outcomes[2].new_job_id == "2000"
    posts = sorted(c.path for c in fake.posts())
    assert posts == [f"/repos/o/r/actions/jobs/{1000 + i}/rerun" for i in (0, 1, 3, 4)]
