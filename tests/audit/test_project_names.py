"""Projects as people name them (issue 14, item 10): ``audit why`` and the dashboard search take
``group/project`` for GitLab (whose events key projects by numeric id) and GitHub's
``owner/repo`` in any case, as their help says."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciretry.audit.projector import Projector
from ciretry.audit.queries import Audit
from ciretry.audit.store import AuditStore
from ciretry.common.events import LogLocator
from ciretry.common.eventstore import EventStore

from .conftest import AUTH
from .helpers import History, github_values

Client = TestClient[web.Request, web.Application]


async def _seed(store: EventStore) -> None:
    h = History(store)
    for project, path, job_id in (
        ("42", "group/sub/tool", "501"),
        ("43", "other/tool", "502"),  # the same project name in another group
    ):
        await h.job(
            source="gitlab", project=project, pipeline_id=f"9{job_id}", job_id=job_id,
            job_name="build",
            log=LogLocator(kind="gitlab", project=project, job_id=job_id,
                           url=f"https://gitlab.example/{path}/-/jobs/{job_id}"),
        )  # fmt: skip
    gh = github_values()
    await h.job(source="github", project=gh["project"], pipeline_id=gh["pipeline_id"],
                job_id=gh["job_id"], job_name=gh["job_name"])  # fmt: skip
    await Projector(AuditStore(store)).catch_up()


@pytest.fixture
async def named(store: EventStore) -> Audit:
    await _seed(store)
    return Audit(AuditStore(store))


@pytest.mark.parametrize("spelling", ["42", "group/sub/tool", "Group/Sub/Tool", "/group/sub/tool/"])
async def test_gitlab_project_by_id_or_path(named: Audit, spelling: str) -> None:
    job = await named.job("gitlab", spelling, "501")
    assert job is not None and job["job"]["project"] == "42"
    assert await named.why("gitlab", spelling, "501") is not None
    pipeline = await named.pipeline("gitlab", spelling, "9501")
    assert pipeline is not None and pipeline["pipeline"]["project"] == "42"


async def test_a_path_that_is_not_the_jobs_project_finds_nothing(named: Audit) -> None:
    assert await named.why("gitlab", "other/tool", "501") is None
    assert await named.job("gitlab", "group/sub/tool", "502") is None
    assert await named.why("gitlab", "43", "501") is None


async def test_github_owner_repo_in_any_case(named: Audit) -> None:
    gh = github_values()
    assert await named.why("github", gh["project"].upper(), gh["job_id"]) is not None


async def test_api_and_dashboard_search_take_the_path(named: Audit, client: Client) -> None:
    resp = await client.get("/api/v1/jobs/gitlab/group/sub/tool/501/why", headers=AUTH)
    assert resp.status == 200, await resp.text()
    resp = await client.get(
        "/search", params={"q": "gitlab/group/sub/tool/501"}, headers=AUTH, allow_redirects=True
    )
    assert resp.status == 200
    assert "build" in await resp.text()


def test_cli_why_takes_the_path(named: Audit, pg_dsn: str, schema: str) -> None:
    env: dict[str, Any] = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CIRETRY_")},
        "CIRETRY_DATABASE_URL": pg_dsn,
        "CIRETRY_DATABASE_SCHEMA": schema,
    }
    res = subprocess.run(
        [sys.executable, "-m", "ciretry.cli", "audit", "why", "gitlab", "group/sub/tool", "501",
         "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert '"summary"' in res.stdout
