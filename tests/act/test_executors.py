"""Executors against fake providers: in-process (the providers' fakes answering through a
``FunctionTransport``) for the logic, and over real HTTP on 127.0.0.1 for at least one test per
provider (``served``), where timeouts, headers and paths are what the wire carries."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ciretry.act.executors import (
    MAX_PIPELINE_PAGES,
    BuildkiteExecutor,
    ClaimLost,
    GitHubExecutor,
    GitLabExecutor,
    HttpSettings,
    TaskclusterExecutor,
    executors_from_config,
)
from ciretry.common.config import load_config
from ciretry.common.events import (
    Action,
    BudgetSnapshot,
    Resources,
    RetryRequested,
)
from tests.support.fakehttp import FakeHttp, Sleeps, running
from tests.support.providers import FakeBuildkite, FakeGitHub, FakeGitLab, FakeTaskcluster

from .helpers import job

TOKEN = "glpat-SECRET-token-123"
FAST = HttpSettings(timeout_s=0.5, max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.05)


def request(
    job_id: str, action: Action = "retry_job", *, source: str = "gitlab", project: str = "42",
    pipeline: str = "900", name: str = "build", resources: Resources | None = None,
) -> RetryRequested:
    return RetryRequested(
        source=source, project=project, pipeline_id=pipeline, job_id=job_id,  # type: ignore[arg-type]
        job_name=name, action=action, idempotency_key=f"k-{job_id}-{action}",
        category="preempted", budget="system", snapshot=BudgetSnapshot(), resources=resources,
    )


def over(fake: FakeHttp) -> dict[str, Any]:
    """How an executor reaches ``fake``: its own aiohttp session when the fake is served over
    HTTP, else the fake's in-process transport."""
    return {} if fake.server is not None else {"transport": fake.transport()}


@pytest.fixture(params=["in-process"])
async def gitlab(request: pytest.FixtureRequest) -> AsyncIterator[FakeGitLab]:
    async with running(FakeGitLab(), request.param) as fake:
        fake.add_job(500, "build", 900)
        yield fake


def gl(fake: FakeGitLab, sleep: Any = None, settings: HttpSettings = FAST) -> GitLabExecutor:
    return GitLabExecutor(fake.url, TOKEN, settings=settings, sleep=sleep or Sleeps(), **over(fake))


@pytest.mark.parametrize("gitlab", ["in-process", "served"], indirect=True)
async def test_gitlab_retry_job_calls_once_with_token(gitlab: FakeGitLab) -> None:
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert out.issued and not out.found_existing and out.new_job_id == "100001"
    (post,) = gitlab.posts()
    assert post.path == "/api/v4/projects/42/jobs/500/retry"
    assert post.headers["PRIVATE-TOKEN"] == TOKEN
    # Checked before acting: the pipeline's jobs, retried ones included.
    first = gitlab.calls[0]
    assert first.method == "GET" and first.query["include_retried"] == "true"


async def test_gitlab_finds_existing_newer_attempt_and_does_not_call(gitlab: FakeGitLab) -> None:
    gitlab.add_job(501, "build", 900)
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert out.issued and out.found_existing and out.new_job_id == "501"
    assert gitlab.posts() == []


class Held:
    """A ``confirm`` that answers ``held`` and counts how often it was asked."""

    def __init__(self, held: bool) -> None:
        self.held = held
        self.asked = 0

    async def __call__(self) -> bool:
        self.asked += 1
        return self.held


@pytest.mark.parametrize("gitlab", ["in-process", "served"], indirect=True)
async def test_no_call_once_the_request_is_no_longer_held(gitlab: FakeGitLab) -> None:
    """Asked after the check and before the call: a holder whose claim died meanwhile (another
    replica may have checked and called since) calls nothing."""
    lost = Held(False)
    ex = gl(gitlab)
    with pytest.raises(ClaimLost):
        await ex.execute(request("500"), job(500), confirm=lost)
    await ex.close()
    assert lost.asked == 1 and gitlab.posts() == []
    assert [c.method for c in gitlab.calls] == ["GET"]  # the check came first


async def test_each_call_is_confirmed_again_after_a_transient_failure(gitlab: FakeGitLab) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [503]
    held = Held(True)
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500), confirm=held)
    await ex.close()
    assert out.issued and not out.found_existing
    assert held.asked == 2 and len(gitlab.posts()) == 2


async def test_a_retry_found_at_the_provider_is_recorded_whoever_holds_it(
    gitlab: FakeGitLab,
) -> None:
    gitlab.add_job(501, "build", 900)
    lost = Held(False)
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500), confirm=lost)
    await ex.close()
    assert out.found_existing and out.new_job_id == "501" and lost.asked == 0


@pytest.mark.parametrize("gitlab", ["in-process", "served"], indirect=True)
async def test_gitlab_project_path_is_one_quoted_segment(gitlab: FakeGitLab) -> None:
    ex = gl(gitlab)
    out = await ex.execute(request("500", project="grp/sub"), job(500))
    await ex.close()
    assert out.issued
    assert [c.path for c in gitlab.calls] == [
        "/api/v4/projects/grp%2Fsub/pipelines/900/jobs",
        "/api/v4/projects/grp%2Fsub/jobs/500/retry",
    ]


async def test_gitlab_rerun_with_resources_creates_pipeline_with_variables(
    gitlab: FakeGitLab,
) -> None:
    ex = gl(gitlab)
    res = Resources(memory_limit_mb=8192, memory_request_mb=8192)
    out = await ex.execute(request("500", "rerun_with_resources", resources=res), job(500))
    await ex.close()
    assert out.issued and out.new_pipeline_id == "100001"
    (post,) = gitlab.posts()
    assert post.path == "/api/v4/projects/42/pipeline" and post.body["ref"] == "main"
    variables = {v["key"]: v["value"] for v in post.body["variables"]}
    assert variables["KUBERNETES_MEMORY_LIMIT"] == "8192Mi"
    assert variables["KUBERNETES_MEMORY_REQUEST"] == "8192Mi"
    assert variables["CIRETRY_RETRY_OF"] == "k-500-rerun_with_resources"
    # A second execution finds the pipeline it created and does not create another.
    ex2 = gl(gitlab)
    again = await ex2.execute(request("500", "rerun_with_resources", resources=res), job(500))
    await ex2.close()
    assert again.found_existing and again.new_pipeline_id == "100001"
    assert len(gitlab.posts()) == 1
    # Someone else's newer pipeline for the same commit is not taken for ours.
    ex3 = gl(gitlab)
    other = await ex3.execute(request("500", "recreate_pipeline"), job(500))
    await ex3.close()
    assert other.issued and not other.found_existing and len(gitlab.posts()) == 2


async def test_gitlab_recreate_pipeline(gitlab: FakeGitLab) -> None:
    ex = gl(gitlab)
    out = await ex.execute(request("500", "recreate_pipeline"), job(500))
    await ex.close()
    assert out.issued and out.new_pipeline_id is not None
    variables = {v["key"] for v in gitlab.posts()[0].body["variables"]}
    assert variables == {"CIRETRY_RETRY_OF"}


async def test_gitlab_finds_its_pipeline_pages_back_among_api_pipelines_only(
    gitlab: FakeGitLab,
) -> None:
    ex = gl(gitlab)
    first = await ex.execute(request("500", "recreate_pipeline"), job(500))
    assert first.issued and not first.found_existing
    # The ref moves on: 150 newer pipelines created through the API by someone else, and
    # pushes in between (which ciretry never creates, so never inspects).
    for i in range(150):
        gitlab.next_id += 1
        gitlab.pipelines[gitlab.next_id] = {
            "id": gitlab.next_id, "ref": "main", "sha": "abc123", "source": "api",
            "variables": [{"key": "OTHER", "value": str(i)}],
        }  # fmt: skip
        gitlab.add_pipeline(200_000 + i)
    again = await ex.execute(request("500", "recreate_pipeline"), job(500))
    await ex.close()
    assert again.found_existing and again.new_pipeline_id == first.new_pipeline_id
    listed = [c for c in gitlab.calls if c.path.endswith("/pipelines")]
    assert [c.query["page"] for c in listed[1:]] == ["1", "2"]
    assert all(c.query["source"] == "api" for c in listed)
    inspected = {c.path.split("/")[-2] for c in gitlab.calls if c.path.endswith("/variables")}
    assert not any(p.startswith("2000") for p in inspected) and len(inspected) == 151


async def test_5xx_then_success_rechecks_and_backs_off(gitlab: FakeGitLab) -> None:
    # Refused before it was carried out (503, 429): called again, after a check, at once.
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [503, 429]
    sleeps = Sleeps()
    ex = gl(gitlab, sleeps)
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert out.issued and len(gitlab.posts()) == 3
    assert len(sleeps.delays) == 2 and all(0 < d <= 0.05 for d in sleeps.delays)
    gets = [c for c in gitlab.calls if c.method == "GET"]
    assert len(gets) == 3  # checked again before every call


async def test_retry_after_is_respected(gitlab: FakeGitLab) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [429]
    gitlab.retry_after = "7"
    sleeps = Sleeps()
    ex = gl(gitlab, sleeps, HttpSettings(max_attempts=3, retry_after_cap_s=60))
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert out.issued and sleeps.delays == [7.0]


async def test_long_retry_after_is_reported_not_waited(gitlab: FakeGitLab) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [429]
    gitlab.retry_after = "3600"
    sleeps = Sleeps()
    ex = gl(gitlab, sleeps, HttpSettings(max_attempts=3, retry_after_cap_s=60))
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert not out.issued and out.will_retry and out.status == 429 and sleeps.delays == []


async def test_bounded_retries_then_will_retry(gitlab: FakeGitLab) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [503] * 10
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert not out.issued and out.will_retry and out.status == 503
    assert len(gitlab.posts()) == FAST.max_attempts


async def test_4xx_is_final_and_not_retried(
    gitlab: FakeGitLab, caplog: pytest.LogCaptureFixture
) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [403]
    ex = gl(gitlab)
    with caplog.at_level(logging.DEBUG):
        out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert not out.issued and not out.will_retry and out.status == 403
    assert len(gitlab.posts()) == 1 and "injected" in out.detail
    assert TOKEN not in caplog.text and TOKEN not in out.detail


@pytest.mark.parametrize("gitlab", ["in-process", "served"], indirect=True)
async def test_timeout_is_transient_and_token_never_logged(
    gitlab: FakeGitLab, caplog: pytest.LogCaptureFixture
) -> None:
    gitlab.stall = 2.0
    ex = gl(gitlab, settings=HttpSettings(timeout_s=0.2, max_attempts=2, backoff_base_s=0.01))
    with caplog.at_level(logging.DEBUG):
        out = await ex.execute(request("500"), job(500))
        # The stalled POST did retry the job, but no answer came: not called again now...
        assert not out.issued and out.will_retry and "TimeoutError" in out.detail
        assert len(gitlab.posts()) == 1
        # ...and the next execution's check sees the retry.
        again = await ex.execute(request("500"), job(500))
    await ex.close()
    assert again.issued and again.found_existing and len(gitlab.posts()) == 1
    assert TOKEN not in caplog.text and TOKEN not in out.detail


@pytest.mark.parametrize("gitlab", ["served"], indirect=True)
async def test_a_call_without_an_answer_is_not_made_again_before_a_later_check(
    gitlab: FakeGitLab,
) -> None:
    """GitLab is slow to carry the retry out: the client gives up first. A check a moment later
    would not see the retry yet, and a second call would retry the job twice: the call is not
    made again before the request's failure backoff, whose check finds the retry."""
    slow = gitlab.hold("POST", "/jobs/500/retry", before=True)
    ex = gl(gitlab, settings=HttpSettings(timeout_s=0.3, max_attempts=3, backoff_base_s=0.01))
    out = await ex.execute(request("500"), job(500))
    assert not out.issued and out.will_retry and "TimeoutError" in out.detail
    slow.release()  # GitLab carries the first call out, late
    await slow.done.wait()
    again = await ex.execute(request("500"), job(500))
    await ex.close()
    assert again.found_existing and again.new_job_id == "100001"
    assert len(gitlab.posts()) == 1 and sorted(gitlab.jobs) == [500, 100_001]


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_a_gateway_that_gave_up_may_have_let_the_call_through(
    gitlab: FakeGitLab, status: int
) -> None:
    gitlab.fail[("POST", "/api/v4/projects/42/jobs")] = [status]
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert not out.issued and out.will_retry and out.status == status
    assert len(gitlab.posts()) == 1



@pytest.mark.parametrize(("status", "will_retry"), [(403, True), (400, True), (404, False)])
async def test_a_check_that_gets_no_answer_fails_closed(
    gitlab: FakeGitLab, status: int, will_retry: bool
) -> None:
    """Not knowing whether the job was retried, act does not call; only a 404 (the pipeline is
    gone) is final."""
    gitlab.fail[("GET", "/api/v4/projects/42/pipelines/900/jobs")] = [status]
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert not out.issued and out.status == status and out.will_retry is will_retry
    assert "check before acting failed" in out.detail and gitlab.posts() == []


async def test_the_check_reads_every_page_of_the_pipelines_jobs(gitlab: FakeGitLab) -> None:
    for i in range(1, 230):
        gitlab.add_job(1000 + i, f"other-{i}", 900)
    gitlab.add_job(501, "build", 900)  # the newer attempt, listed on the last page
    ex = gl(gitlab)
    out = await ex.execute(request("500"), job(500))
    await ex.close()
    assert out.found_existing and out.new_job_id == "501" and gitlab.posts() == []
    pages = [c.query["page"] for c in gitlab.calls if c.path.endswith("/900/jobs")]
    assert pages == ["1", "2", "3"]


async def test_the_search_for_our_pipeline_is_bounded(
    gitlab: FakeGitLab, caplog: pytest.LogCaptureFixture
) -> None:
    """On a very busy ref the check gives up after MAX_PIPELINE_PAGES pages (and says so): the
    call then creates a pipeline."""
    for i in range(MAX_PIPELINE_PAGES * 100 + 5):
        gitlab.pipelines[300_000 + i] = {
            "id": 300_000 + i, "ref": "main", "sha": "abc123", "source": "api", "variables": [],
        }  # fmt: skip
    ex = gl(gitlab)
    with caplog.at_level(logging.WARNING):
        out = await ex.execute(request("500", "recreate_pipeline"), job(500))
    await ex.close()
    assert out.issued and not out.found_existing
    listed = [c.query["page"] for c in gitlab.calls if c.path.endswith("/pipelines")]
    assert listed == [str(n) for n in range(1, MAX_PIPELINE_PAGES + 1)]
    assert f"more than {MAX_PIPELINE_PAGES} pages" in caplog.text


# --- GitHub ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["in-process", "served"])
async def test_github_rerun_job_then_finds_it(where: str) -> None:
    async with running(FakeGitHub(), where) as fake:
        fake.add_job(77, 1001, "test")
        ex = GitHubExecutor(fake.url, "ghp_x", settings=FAST, sleep=Sleeps(), **over(fake))
        r = request("1001", source="github", project="o/r", pipeline="77", name="test")
        out = await ex.execute(r, None)
        assert out.issued and not out.found_existing
        (post,) = fake.posts()
        assert post.path == "/repos/o/r/actions/jobs/1001/rerun"
        assert post.headers["Authorization"] == "Bearer ghp_x"
        assert post.headers["Accept"] == "application/vnd.github+json"
        again = await ex.execute(r, None)
        assert again.found_existing and again.new_job_id == "9001"
        assert len(fake.posts()) == 1
        failed = await ex.execute(
            request("1001", "recreate_pipeline", source="github", project="o/r", pipeline="77",
                    name="other"), None,
        )
        assert failed.issued and fake.posts()[-1].path.endswith("/runs/77/rerun-failed-jobs")
        nope = await ex.execute(
            request("1001", "rerun_with_resources", source="github", project="o/r"), None
        )
        assert not nope.issued and not nope.will_retry and "resources" in nope.detail
        await ex.close()


# --- Taskcluster ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["in-process", "served"])
async def test_taskcluster_rerun_with_hawk_and_check(where: str) -> None:
    async with running(FakeTaskcluster(), where) as fake:
        fake.tasks["TaskA"] = [{"runId": 0, "state": "exception"}]
        ex = TaskclusterExecutor(
            fake.url, "client:secret-access", settings=FAST, sleep=Sleeps(), **over(fake)
        )
        r = request("TaskA", source="taskcluster", project="gecko")
        tc_job = job("TaskA", source="taskcluster", project="gecko", attempt=0)
        out = await ex.execute(r, tc_job)
        assert out.issued and out.new_job_id == "TaskA#1" and not out.found_existing
        (post,) = fake.posts()
        assert post.path == "/api/queue/v1/task/TaskA/rerun"
        assert post.headers["Authorization"].startswith('Hawk id="client"')
        assert "secret-access" not in post.headers["Authorization"]
        again = await ex.execute(r, tc_job)
        assert again.found_existing and again.new_job_id == "TaskA#1"
        assert len(fake.posts()) == 1
        gone = await ex.execute(
            request("TaskB", source="taskcluster", project="gecko"),
            job("TaskB", source="taskcluster", project="gecko", attempt=0),
        )
        assert not gone.issued and gone.status == 404 and not gone.will_retry
        await ex.close()


# --- Buildkite ------------------------------------------------------------------------------

BK_JOB = "0190e4a2-7c1b-7d3e-9a4f-5b6c7d8e9f01"
BK_JOB_PATH = f"/v2/organizations/my-org/pipelines/my-pipeline/builds/12/jobs/{BK_JOB}"


def bk_request(job_id: str = BK_JOB, action: Action = "retry_job") -> RetryRequested:
    return request(job_id, action, source="buildkite", project="my-org/my-pipeline", pipeline="12")


@pytest.mark.parametrize("where", ["in-process", "served"])
async def test_buildkite_retries_once_and_then_finds_its_retry(where: str) -> None:
    async with running(FakeBuildkite(), where) as fake:
        fake.add_job(BK_JOB, "build", 12)
        ex = BuildkiteExecutor(fake.url, "bkua_x", settings=FAST, sleep=Sleeps(), **over(fake))
        out = await ex.execute(bk_request(), None)
        new_id = fake.jobs[BK_JOB]["retried_in_job_id"]
        assert out.issued and not out.found_existing and out.new_job_id == new_id
        check, put = fake.calls
        assert (check.method, check.path) == ("GET", BK_JOB_PATH)
        assert (put.method, put.path) == ("PUT", BK_JOB_PATH + "/retry")
        assert put.headers["Authorization"] == "Bearer bkua_x"
        # Again (a redelivered request, or a crash before RetryIssued was stored): the job
        # names its retry, and nothing is called.
        again = await ex.execute(bk_request(), None)
        assert again.issued and again.found_existing and again.new_job_id == new_id
        assert len(fake.calls_of("PUT")) == 1
        await ex.close()


async def test_buildkite_retry_that_timed_out_after_acting_is_found_not_repeated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeBuildkite()
    fake.add_job(BK_JOB, "build", 12)
    fake.stall = 2.0  # the PUT retries the job, then the answer is lost
    settings = HttpSettings(timeout_s=0.2, max_attempts=2, backoff_base_s=0.01)
    ex = BuildkiteExecutor(fake.url, "bkua_SECRET", settings=settings, **over(fake))
    with caplog.at_level(logging.DEBUG):
        out = await ex.execute(bk_request(), None)
        assert not out.issued and out.will_retry and "TimeoutError" in out.detail
        # The next execution's check reads the job, which names the retry: no second PUT.
        again = await ex.execute(bk_request(), None)
    assert again.issued and again.found_existing
    assert again.new_job_id == fake.jobs[BK_JOB]["retried_in_job_id"]
    assert len(fake.calls_of("PUT")) == 1
    assert "bkua_SECRET" not in caplog.text and "bkua_SECRET" not in out.detail


async def test_buildkite_retries_only_jobs() -> None:
    fake = FakeBuildkite()
    fake.add_job(BK_JOB, "build", 12)
    ex = BuildkiteExecutor(fake.url, "bkua_x", settings=FAST, sleep=Sleeps(), **over(fake))
    for action in ("recreate_pipeline", "rerun_with_resources"):
        out = await ex.execute(bk_request(action=action), None)  # type: ignore[arg-type]
        assert not out.issued and not out.will_retry and "retry_job only" in out.detail
    assert fake.calls == []


async def test_buildkite_check_fails_closed_and_a_gone_job_is_final() -> None:
    fake = FakeBuildkite()
    fake.add_job(BK_JOB, "build", 12)
    ex = BuildkiteExecutor(fake.url, "bkua_x", settings=FAST, sleep=Sleeps(), **over(fake))
    fake.fail[("GET", BK_JOB_PATH)] = [403]
    refused = await ex.execute(bk_request(), None)
    assert not refused.issued and refused.will_retry and refused.status == 403
    gone = await ex.execute(bk_request("0190e4a2-0000-7000-8000-000000000000"), None)
    assert not gone.issued and not gone.will_retry and gone.status == 404
    assert not fake.calls_of("PUT")
    # 5xx is transient: retried, check included, then called once.
    fake.fail[("GET", BK_JOB_PATH)] = [503]
    out = await ex.execute(bk_request(), None)
    assert out.issued and len(fake.calls_of("PUT")) == 1


async def test_buildkite_refusal_is_final_and_says_why() -> None:
    fake = FakeBuildkite()
    fake.add_job(BK_JOB, "build", 12, state="passed")
    ex = BuildkiteExecutor(fake.url, "bkua_x", settings=FAST, sleep=Sleeps(), **over(fake))
    out = await ex.execute(bk_request(), None)
    assert not out.issued and not out.will_retry and out.status == 400
    assert "Only failed, timed out or canceled jobs can be retried" in out.detail


async def test_executors_from_config_take_the_configured_requests_at_once() -> None:
    """``CIRETRY_PROVIDER_MAX_IN_FLIGHT`` bounds every provider's executor act builds (the
    bound itself: tests/common/test_http.py)."""
    for value, want in ((None, 16), ("40", 40)):
        env = {} if value is None else {"CIRETRY_PROVIDER_MAX_IN_FLIGHT": value}
        executors = executors_from_config(load_config(env))
        try:
            bounds = {s: e.http.settings.max_in_flight for s, e in executors.by_source.items()}
        finally:
            await executors.close()
        assert bounds == dict.fromkeys(("gitlab", "github", "taskcluster", "buildkite"), want)
