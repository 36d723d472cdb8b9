"""reconcile against a fake GitLab speaking the jobs API (pagination, 429, PRIVATE-TOKEN)."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ciretry.common.events import JobFinished
from ciretry.common.eventstore import EventStore
from ciretry.ingest import cli, gitlab
from ciretry.ingest.fields import Accepted
from ciretry.ingest.reconcile import GitLabClient, parse_since, reconcile

from .helpers import failed_job_hook

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
TOKEN = "glpat-test"


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


class FakeGitLab:
    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = sorted(jobs, key=lambda j: -j["id"])  # the API lists newest first
        self.pages: list[str] = []
        self.throttle_once = True

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("PRIVATE-TOKEN") != TOKEN:
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        if request.match_info["project"] != "1":
            return web.json_response({"message": "404 Project Not Found"}, status=404)
        assert request.query.getall("scope[]") == ["failed"]
        page = int(request.query.get("page", "1"))
        if self.throttle_once and page == 2:
            self.throttle_once = False
            return web.json_response({"message": "429"}, status=429, headers={"Retry-After": "0"})
        self.pages.append(str(page))
        per_page = int(request.query.get("per_page", "20"))
        chunk = self.jobs[(page - 1) * per_page : page * per_page]
        last = page * per_page >= len(self.jobs)
        headers = {
            "X-Page": str(page),
            "X-Per-Page": str(per_page),
            "X-Next-Page": "" if last else str(page + 1),
        }
        return web.json_response(chunk, headers=headers)


@pytest.fixture
async def fake() -> Any:
    jobs = [api_job(1000 + i, dt.timedelta(minutes=i)) for i in range(150)]  # within 2.5 h
    jobs += [api_job(500 + i, dt.timedelta(days=3, minutes=i)) for i in range(150)]  # long ago
    fake = FakeGitLab(jobs)
    app = web.Application()
    app.router.add_get("/api/v4/projects/{project}/jobs", fake.handle)
    server = TestServer(app)
    await server.start_server()
    yield fake, str(server.make_url(""))
    await server.close()


async def test_reconcile_appends_what_webhooks_missed(fake: Any, store: EventStore) -> None:
    fake_gitlab, url = fake
    # The webhook for job 1000 did arrive: reconcile must not store it again.
    hook = failed_job_hook(job_id=1000, reason="runner_system_failure")
    delivered = gitlab.normalize({}, hook)
    assert isinstance(delivered, Accepted)
    await store.append_batch(delivered.events)

    since = NOW - dt.timedelta(hours=2)
    async with aiohttp.ClientSession() as session:
        client = GitLabClient(url, TOKEN, session, per_page=100)
        report = await reconcile(
            since, projects=["1", "404"], client=client, append=store.append_batch
        )
        # In window: jobs finished at or after NOW-2h: created within 2h05m -> ages 0..125 min.
        assert report.in_window == 126
        assert (report.appended, report.duplicates) == (125, 1)
        assert report.errors and "404" in report.errors[0]
        # Paging stopped at the first page older than since - 1 day: page 3 is all 3 days old.
        assert fake_gitlab.pages == ["1", "2", "3"]
        again = await reconcile(since, projects=["1"], client=client, append=store.append_batch)
    assert (again.appended, again.duplicates) == (0, 126)

    stored = [e async for e in store.read_all()]
    assert len(stored) == 126
    job = next(e.data for e in stored if e.data.job_id == "1001")
    assert isinstance(job, JobFinished)
    assert (job.failure_reason, job.pipeline_id, job.runner) == (
        "runner_system_failure",
        "31",
        "k8s-runner",
    )
    assert {e.stream for e in stored} == {"pipeline-gitlab-1-31"}


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
