"""Regression tests for bugs the reliability work found: an out-of-range timestamp answered 503
(a poison delivery GitLab would retry forever) instead of 400; a recreated pipeline missed after
a crash once the branch had moved (a second pipeline, i.e. a double retry)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ciretry.act.executors import GitLabExecutor, HttpSettings
from ciretry.common.config import Config
from ciretry.common.events import BudgetSnapshot, JobFinished, RetryRequested
from ciretry.common.eventstore import EventStore
from ciretry.ingest.app import create_app
from tests.ingest.helpers import GITLAB, load, pod
from tests.support.providers import FakeGitLab

SECRET = "found-bugs-secret"


@pytest.fixture
async def ingest(store: EventStore) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(Config(gitlab_webhook_secrets=(SECRET,)), store)
    async with TestClient(TestServer(app)) as c:
        yield c


def pipeline_hook(finished_at: str) -> bytes:
    doc = copy.deepcopy(load(GITLAB / "gitlab-docs__pipeline_hook_example.json"))
    doc["object_attributes"].update(status="failed", finished_at=finished_at)
    return msgspec.json.encode(doc)


@pytest.mark.parametrize("finished_at", ["9999-12-31T23:59:59-10:00", "0001-01-01T00:00:00+14:00"])
async def test_out_of_range_timestamp_is_a_400_not_a_503(
    ingest: TestClient[Any, Any], store: EventStore, finished_at: str
) -> None:
    resp = await ingest.post(
        "/webhooks/gitlab",
        data=pipeline_hook(finished_at),
        headers={
            "X-Gitlab-Token": SECRET,
            "X-Gitlab-Event": "Pipeline Hook",
            "X-Gitlab-Event-UUID": "overflow-1",
            "Content-Type": "application/json",
        },
    )
    assert resp.status == 400, (resp.status, await resp.text())
    assert (await resp.json())["field"].endswith("finished_at")


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    fake = await FakeGitLab().started()
    fake.add_job(500, "build", 900)
    # The failed job ran on commit "old"; the branch has moved on since: a pipeline created
    # from the ref now runs on the branch head ("abc123" in the fake), not on "old".
    fake.pipelines[900]["sha"] = "old"
    yield fake
    await fake.close()


async def test_recreated_pipeline_is_found_after_a_crash_when_the_ref_moved(
    gitlab: FakeGitLab,
) -> None:
    request = RetryRequested(
        source="gitlab",
        project="42",
        pipeline_id="900",
        job_id="500",
        job_name="build",
        action="recreate_pipeline",
        idempotency_key="k-500-recreate",
        category="preempted",
        budget="system",
        snapshot=BudgetSnapshot(),
    )
    job = JobFinished(
        source="gitlab",
        project="42",
        pipeline_id="900",
        job_id="500",
        job_name="build",
        status="failed",
        ref="main",
        sha="old",
    )
    settings = HttpSettings(timeout_s=1, max_attempts=2, backoff_base_s=0.01, backoff_cap_s=0.01)
    first = GitLabExecutor(gitlab.url, "t", settings=settings)
    out = await first.execute(request, job)
    await first.close()
    assert out.issued
    # act was killed before it could append RetryIssued: the request is executed again.
    second = GitLabExecutor(gitlab.url, "t", settings=settings)
    again = await second.execute(request, job)
    await second.close()
    assert len(gitlab.posts("/pipeline")) == 1, "a second pipeline was created"
    assert again.found_existing


# Found by the long run's 100,000 fuzzed requests (bench/chaos.py --minutes 10).


@pytest.fixture
async def ingest_all(store: EventStore) -> AsyncIterator[TestClient[Any, Any]]:
    config = Config(gitlab_webhook_secrets=(SECRET,), api_token=SECRET)
    async with TestClient(TestServer(create_app(config, store))) as c:
        yield c


@pytest.mark.parametrize(
    "body", [b'{"object_kind": "build", "build_name": "a\xec\x80"}', b'["\xff"]', b'{"\xec": 1}']
)
async def test_invalid_utf8_inside_json_is_a_400_not_a_503(
    ingest_all: TestClient[Any, Any], body: bytes
) -> None:
    # msgspec reports invalid UTF-8 in a string as UnicodeDecodeError, not DecodeError.
    for path, headers in (
        ("/webhooks/gitlab", {"X-Gitlab-Token": SECRET, "X-Gitlab-Event": "Job Hook"}),
        ("/webhooks/kubernetes", {"Authorization": f"Bearer {SECRET}"}),
        ("/pulse", {"Authorization": f"Bearer {SECRET}"}),
    ):
        resp = await ingest_all.post(
            path, data=body, headers={**headers, "Content-Type": "application/json"}
        )
        assert resp.status == 400, (path, resp.status, await resp.text())
        assert "UTF-8" in (await resp.json())["message"]


async def test_nul_in_a_pod_field_that_feeds_the_idempotency_key_is_stored(
    ingest_all: TestClient[Any, Any], store: EventStore
) -> None:
    # A NUL in the pod's status reason went into the idempotency key, which PostgreSQL text
    # cannot hold: a 503 for a payload that can never be stored. Free text is now made safe
    # before it reaches the key or the body (U+FFFD for the NUL: fields.py's text rule).
    doc = pod(pod_reason="Evic\x00ted")
    for attempt in range(2):  # the second delivery is recognised as the same pod state
        resp = await ingest_all.post(
            "/webhooks/kubernetes",
            data=msgspec.json.encode(doc),
            headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"},
        )
        assert resp.status == (202, 200)[attempt], (resp.status, await resp.text())
    (event,) = [e async for e in store.read_all()]
    assert event.data.pod_reason == "Evic\ufffdted"  # type: ignore[attr-defined]
    assert "\x00" not in event.metadata.idempotency_key  # type: ignore[operator]
    assert "Evic\ufffdted" in event.metadata.idempotency_key  # type: ignore[operator]
