"""reconcile against a fake GitLab speaking the jobs API (pagination, 429, PRIVATE-TOKEN):
in-process on the in-memory log for the logic, over real HTTP into PostgreSQL once."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ciretry.common.eventlog import EventLog
from ciretry.common.events import JobFinished
from ciretry.common.http import HttpClient, HttpSettings
from ciretry.common.providers import GITLAB
from ciretry.ingest import cli
from ciretry.ingest import gitlab as webhooks
from ciretry.ingest.fields import Accepted
from ciretry.ingest.reconcile import parse_since, reconcile
from tests.support.fakehttp import Call, FakeHttp, Reply, Sleeps, reaching, running
from tests.support.providers import paged

from .helpers import failed_job_hook

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
TOKEN = "glpat-test"
FAST = HttpSettings(timeout_s=5.0, max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.02)


def api_job(
    job_id: int, age: dt.timedelta, reason: str = "runner_system_failure"
) -> dict[str, Any]:
    created = NOW - age
    return {
        "id": job_id,
        "status": "failed",
        "stage": "test",
        "name": f"job-{job_id % 7}",
        "ref": "main",
        "tag": False,
        "allow_failure": False,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "started_at": (created + dt.timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
        "finished_at": (created + dt.timedelta(minutes=5)).isoformat().replace("+00:00", "Z"),
        "duration": 240.0,
        "failure_reason": reason,
        "user": {"id": 1, "username": "root", "name": "Administrator"},
        "commit": {"id": "a" * 40, "short_id": "aaaaaaaa", "title": "t", "message": "t\n"},
        "pipeline": {"id": 31, "project_id": 1, "ref": "main", "sha": "a" * 40, "status": "failed"},
        "web_url": f"https://gitlab.example.com/g/p/-/jobs/{job_id}",
        "runner": {"id": 9, "description": "k8s-runner", "is_shared": False},
        "tag_list": ["k8s"],
        "artifacts": [],
    }


class FakeGitLabJobs(FakeHttp):
    """GitLab's project jobs listing: the token checked, one project, newest first, paged with
    GitLab's headers, page 2 throttled once (429 with Retry-After)."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        super().__init__()
        self.jobs = sorted(jobs, key=lambda j: -j["id"])  # the API lists newest first
        self.pages: list[str] = []
        self.throttle_once = True
        self.route("GET", "/api/v4/projects/{project}/jobs", self.list_jobs)

    def list_jobs(self, call: Call, match: dict[str, str]) -> Reply:
        if call.headers.get("PRIVATE-TOKEN") != TOKEN:
            return Reply.json({"message": "401 Unauthorized"}, 401)
        if match["project"] != "1":
            return Reply.json({"message": "404 Project Not Found"}, 404)
        assert [v for k, v in call.params if k == "scope[]"] == ["failed"]
        page = int(call.query.get("page", "1"))
        if self.throttle_once and page == 2:
            self.throttle_once = False
            return Reply.json({"message": "429"}, 429, {"Retry-After": "0"})
        self.pages.append(str(page))
        return paged(call, self.jobs)


@pytest.fixture(params=["in-process"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeGitLabJobs]:
    jobs = [api_job(1000 + i, dt.timedelta(minutes=i)) for i in range(150)]  # within 2.5 h
    jobs += [api_job(500 + i, dt.timedelta(days=3, minutes=i)) for i in range(150)]  # long ago
    async with running(FakeGitLabJobs(jobs), request.param) as fake:
        yield fake


@pytest.fixture
async def gitlab(fake: FakeGitLabJobs) -> AsyncIterator[HttpClient]:
    async with reaching(fake) as transport:
        yield GITLAB.client(transport, fake.url, TOKEN, settings=FAST, sleep=Sleeps())


@pytest.mark.parametrize("fake", ["in-process", "served"], indirect=True)
async def test_reconcile_appends_what_webhooks_missed(
    fake: FakeGitLabJobs, gitlab: HttpClient, log: EventLog
) -> None:
    # The webhook for job 1000 did arrive: reconcile must not store it again.
    hook = failed_job_hook(job_id=1000, reason="runner_system_failure")
    delivered = webhooks.normalize({}, hook)
    assert isinstance(delivered, Accepted)
    await log.append_batch(delivered.events)

    since = NOW - dt.timedelta(hours=2)
    report = await reconcile(since, projects=["1", "404"], gitlab=gitlab, append=log.append_batch)
    # In window: jobs finished at or after NOW-2h: created within 2h05m -> ages 0..125 min.
    assert report.in_window == 126
    assert (report.appended, report.duplicates) == (125, 1)
    assert report.errors and "404" in report.errors[0]
    # Paging stopped at the first page older than since - 1 day: page 3 is all 3 days old;
    # page 2 was throttled once and asked again.
    assert fake.pages == ["1", "2", "3"]
    again = await reconcile(since, projects=["1"], gitlab=gitlab, append=log.append_batch)
    assert (again.appended, again.duplicates) == (0, 126)

    stored = [e async for e in log.read_all()]
    assert len(stored) == 126
    job = next(e.data for e in stored if e.data.job_id == "1001")
    assert isinstance(job, JobFinished)
    assert (job.failure_reason, job.pipeline_id, job.runner) == (
        "runner_system_failure",
        "31",
        "k8s-runner",
    )
    assert {e.stream for e in stored} == {"pipeline-gitlab-1-31"}


async def test_a_dry_run_counts_and_appends_nothing(
    fake: FakeGitLabJobs, gitlab: HttpClient
) -> None:
    report = await reconcile(NOW - dt.timedelta(hours=2), projects=["1"], gitlab=gitlab, append=None)
    assert (report.in_window, report.appended, report.duplicates) == (126, 0, 0)
    assert report.listed == 300 and not report.errors


async def test_a_project_that_stays_throttled_is_reported_and_the_next_one_done(
    fake: FakeGitLabJobs, gitlab: HttpClient
) -> None:
    fake.fail[("GET", "/api/v4/projects/1/jobs")] = [503] * FAST.max_attempts
    report = await reconcile(
        NOW - dt.timedelta(hours=2), projects=["1", "1"], gitlab=gitlab, append=None
    )
    (error,) = report.errors
    assert error.startswith("project 1:") and "503" in error
    assert report.in_window == 126  # the second pass over the project went through


async def test_the_token_is_never_in_an_error(fake: FakeGitLabJobs) -> None:
    transport = fake.transport()
    wrong = GITLAB.client(transport, fake.url, "glpat-wrong-secret", settings=FAST)
    fake.jobs.clear()
    report = await reconcile(NOW, projects=["1"], gitlab=wrong, append=None)
    (error,) = report.errors
    assert "401" in error and "glpat-wrong-secret" not in error


def test_parse_since() -> None:
    now = NOW
    assert parse_since("2h", now) == now - dt.timedelta(hours=2)
    assert parse_since("30m", now) == now - dt.timedelta(minutes=30)
    assert parse_since("1d", now) == now - dt.timedelta(days=1)
    assert parse_since("2024-05-01T10:00:00Z") == dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("soon")


def test_cli_registers_reconcile() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(
        ["ingest", "reconcile", "--since", "2h", "--project", "1", "--project", "g/p"]
    )
    assert args.project == ["1", "g/p"] and args.since == "2h" and callable(args.func)
    bad = parser.parse_args(["ingest", "reconcile", "--since", "whenever", "--project", "1"])
    assert bad.func(bad) == 2
