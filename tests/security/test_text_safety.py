"""Every text field of every input, with a NUL, a lone surrogate and an overlong string: what is
stored is always text PostgreSQL takes, and no reader of the log ever stops on it.

For each input (GitLab job and pipeline hooks, GitHub workflow_job and workflow_run, Buildkite
job.finished and build.finished, a Taskcluster message, a Kubernetes pod; and GitLab's jobs API,
which reconcile reads) each string in the document is replaced, one at a time,
by each hostile value, written into the raw JSON (a lone surrogate cannot be built any other
way). The answer is a 202/200, or a 400 naming exactly that field (identifiers are refused, free
text is kept safe: fields.py's rule). Then, over everything stored: the documented
``convert_from(body, 'UTF8')::jsonb`` query reads every row, every string of every event is safe
and within its cap, and the audit projector applies it all without rejecting one event.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import hashlib
import hmac
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit.projector import Projector
from ciretry.audit.store import AuditStore
from ciretry.common.events import NewEvent
from ciretry.common.eventstore import EventStore
from ciretry.common.text import CUT_MARK, REPLACEMENT, is_safe_text
from ciretry.ingest.app import create_app
from ciretry.ingest.fields import InvalidPayload
from ciretry.ingest.gitlab import job_from_api
from tests.ingest.conftest import API_TOKEN, BUILDKITE_SECRET, GITHUB_SECRET, GITLAB_SECRET
from tests.ingest.conftest import test_config as ingest_config
from tests.ingest.helpers import GITHUB, GITLAB, failed_job_hook, load, pod, task_message
from tests.ingest.test_reconcile import api_job

Client = TestClient[Any, Any]
EXTERNAL = Path(__file__).resolve().parents[1] / "fixtures" / "external"
MARK = "\x01MARK\x01"
#: The longest free text the rule stores (a commit message).
LONGEST_TEXT = 4096
#: Raw JSON string literals: NUL, a lone surrogate (valid JSON grammar, not Unicode), overlong.
HOSTILE = {
    "nul": '"a\\u0000b"',
    "surrogate": '"a\\ud800b"',
    "overlong": json.dumps("x" * 5000),
}


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any], int], None]:
    def apply(doc: dict[str, Any], n: int) -> None:
        node: Any = doc
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value(n) if callable(value) else value

    return apply


def _pipeline_ids(doc: dict[str, Any], n: int) -> None:
    doc["object_attributes"]["id"] = n
    for i, build in enumerate(doc["builds"]):
        build["id"] = n * 100 + i


def slugid(n: int) -> str:
    """A Taskcluster slugid of its own for each request (a v4 UUID, URL-safe base64)."""
    return base64.urlsafe_b64encode(uuid.UUID(int=n, version=4).bytes).decode().rstrip("=")


def _pulse_doc() -> dict[str, Any]:
    return {
        "exchange": "exchange/taskcluster-queue/v1/task-failed",
        "payload": task_message(state="failed", reason="failed"),
    }


#: input -> (document, event header, how to give each request its own ids, so each is stored)
INPUTS: dict[str, tuple[dict[str, Any], str, Callable[[dict[str, Any], int], None]]] = {
    "gitlab-job": (failed_job_hook(), "Job Hook", _set(("build_id",), lambda n: n)),
    "gitlab-pipeline": (
        load(GITLAB / "gitlab4j__pipeline-event.json"),
        "Pipeline Hook",
        _pipeline_ids,
    ),
    "github-job": (
        load(EXTERNAL / "github" / "workflow_job.completed.failure.with-organization.payload.json"),
        "workflow_job",
        _set(("workflow_job", "id"), lambda n: n),
    ),
    "github-run": (
        load(GITHUB / "workflow_run__completed.payload.json"),
        "workflow_run",
        _set(("workflow_run", "id"), lambda n: n),
    ),
    "buildkite-job": (
        load(EXTERNAL / "buildkite" / "job.finished.failed.agent-stop.json"),
        "job.finished",
        _set(("job", "id"), lambda n: str(uuid.UUID(int=n))),
    ),
    "buildkite-build": (
        load(EXTERNAL / "buildkite" / "build.finished.failed.json"),
        "build.finished",
        _set(("build", "number"), lambda n: n),
    ),
    "pulse": (_pulse_doc(), "", _set(("payload", "status", "taskId"), lambda n: slugid(n))),
    "kubernetes": (pod(), "", _set(("metadata", "uid"), lambda n: f"uid-{n}")),
}


def string_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, str):
        yield prefix
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from string_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from string_paths(v, (*prefix, i))


def field_of(path: tuple[Any, ...]) -> str:
    """The JSON path as a 400 names it (``builds[0].name``, ``metadata.labels['k']``)."""
    out = ""
    for i, step in enumerate(path):
        if isinstance(step, int):
            out += f"[{step}]"
        elif i > 0 and path[i - 1] in ("annotations", "labels") and path[0] != "workflow_job":
            out += f"[{step!r}]"
        else:
            out += f".{step}" if out else step
    return out


def request(input_name: str, body: bytes) -> tuple[str, dict[str, str]]:
    _, event, _ = INPUTS[input_name]
    headers = {"Content-Type": "application/json"}
    if input_name.startswith("gitlab"):
        headers.update(
            {"X-Gitlab-Token": GITLAB_SECRET, "X-Gitlab-Event": event, "X-Gitlab-Event-UUID": "u"}
        )
        return "/webhooks/gitlab", headers
    if input_name.startswith("github"):
        sig = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers.update(
            {
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": "d",
                "X-Hub-Signature-256": f"sha256={sig}",
            }
        )
        return "/webhooks/github", headers
    if input_name.startswith("buildkite"):
        headers.update({"X-Buildkite-Event": event, "X-Buildkite-Token": BUILDKITE_SECRET})
        return "/webhooks/buildkite", headers
    headers["Authorization"] = f"Bearer {API_TOKEN}"
    return ("/pulse" if input_name == "pulse" else "/webhooks/kubernetes"), headers


def hostile_body(input_name: str, path: tuple[Any, ...], literal: str, n: int) -> bytes:
    doc, _, give_ids = INPUTS[input_name]
    doc = copy.deepcopy(doc)
    give_ids(doc, n)
    node: Any = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = MARK
    return json.dumps(doc).replace(json.dumps(MARK), literal).encode()


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


@pytest.mark.timeout(600)
async def test_every_text_field_of_every_input_is_stored_safe_or_refused_by_name(
    store: EventStore,
) -> None:
    app = create_app(ingest_config(max_body_bytes=1024 * 1024), store)
    async with TestClient(TestServer(app)) as client:
        await _post_every_case(client)
    await _reconcile_every_case(store)
    await _check_what_was_stored(store)


async def _reconcile_every_case(store: EventStore) -> None:
    """The other input: GitLab's jobs API, read by reconcile (aiohttp parses it with the
    standard library, which lets lone surrogates through) into the same normalizer code."""
    base = api_job(1, dt.timedelta(hours=1))
    new: list[NewEvent] = []
    ids = itertools.count(10_000)
    for path in string_paths(base):
        for kind, literal in HOSTILE.items():
            doc = copy.deepcopy(base)
            doc["id"] = next(ids)  # each case its own job, so each is stored
            node: Any = doc
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = MARK
            parsed = json.loads(json.dumps(doc).replace(json.dumps(MARK), literal))
            try:
                event = job_from_api(parsed, "jobs[0]")
            except InvalidPayload as exc:
                assert exc.field == "jobs[0]." + field_of(path), (path, kind, exc)
                continue
            if event is not None:  # None: the status made it not terminal
                new.append(event)
    assert len(new) > len(list(string_paths(base)))
    await store.append_batch(new)


async def _post_every_case(client: Client) -> None:
    cases = [
        (name, path, kind)
        for name, (doc, _, _) in INPUTS.items()
        for path in string_paths(doc)
        for kind in HOSTILE
    ]
    outcomes: dict[str, int] = {}
    refused: set[str] = set()

    async def post(n: int, name: str, path: tuple[Any, ...], kind: str) -> None:
        body = hostile_body(name, path, HOSTILE[kind], 1000 + n)
        url, headers = request(name, body)
        resp = await client.post(url, data=body, headers=headers)
        answer = await resp.json()
        where = (name, field_of(path), kind, resp.status, answer)
        if resp.status == 400:
            # Refused: only ever for the field that was made hostile, named as such.
            assert answer["field"] == field_of(path), where
            refused.add(f"{name}:{field_of(path)}")
        else:
            assert resp.status in (200, 202), where
        key = f"{resp.status}:{answer.get('status')}"
        outcomes[key] = outcomes.get(key, 0) + 1

    sem = asyncio.Semaphore(16)

    async def bounded(n: int, case: tuple[str, tuple[Any, ...], str]) -> None:
        async with sem:
            await post(n, *case)

    await asyncio.gather(*(bounded(n, case) for n, case in enumerate(cases)))
    assert outcomes.get("202:accepted", 0) > len(cases) // 2, outcomes
    # Identifiers are refused (a sample of each input's), free text is not.
    for expected in (
        "github-job:repository.full_name",
        "buildkite-job:pipeline.slug",
        "pulse:payload.status.taskGroupId",
        "kubernetes:metadata.namespace",
    ):
        assert expected in refused, sorted(refused)
    for kept in (
        "github-job:workflow_job.name",
        "gitlab-job:build_name",
        "buildkite-job:job.name",
        "pulse:payload.task.tags.label",
    ):
        assert kept not in refused, kept


async def _check_what_was_stored(store: EventStore) -> None:
    # The documented query reads every row of the log, and every stored string is safe.
    async with store.connection() as conn:
        rows = await conn.fetchval(
            "SELECT count(*) FROM events "
            "WHERE convert_from(body, 'UTF8')::jsonb IS NOT NULL "
            "AND convert_from(metadata, 'UTF8')::jsonb IS NOT NULL"
        )
    events = [e async for e in store.read_all()]
    assert rows == len(events) > 1000
    seen_replaced = seen_cut = False
    for e in events:
        for s in strings(msgspec.to_builtins(e.data)):
            assert is_safe_text(s) and len(s) <= LONGEST_TEXT, (e.type, s[:80])
            seen_replaced |= REPLACEMENT in s
            seen_cut |= s.endswith(CUT_MARK)
    assert seen_replaced and seen_cut

    # The read models take it all: nothing rejected, the projection at the end of the log.
    projector = Projector(AuditStore(store))
    assert await projector.catch_up() == len(events)
    assert await projector.position() == await store.last_position()
    assert [e async for e in store.read_all() if e.type == "MessageRejected"] == []
