"""Explanations end to end on PostgreSQL, JetStream and a fake GitLab over HTTP, with two act
replicas: a merge request's pipeline fails three ways, and the merge request gets one note,
edited in place, and a commit status."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import msgspec
import pytest

from ciretry.common.events import ExplanationPosted, VerdictDisputed, VerdictReached, job_stream

from .conftest import SECRET, Stack
from .test_flow import OOM_LOG, job_hook

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT.parent / "shared" / "fixtures" / "logs" / "pytorch"
MR_HOOK = ROOT / "tests" / "fixtures" / "reviews" / "go-playground__gitlab-merge-request-event.json"
MR = 7


@pytest.fixture
def stack_settings(tmp_path: Path) -> dict[str, object]:
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n[default]\nexplain = "note"\nexplain_interval_s = 0.2\n')
    return {"policy_path": str(policy), "act_replicas": 2, "public_url": "https://ci.example"}


async def hook(stack: Stack, body: dict[str, object], event: str, delivery: str) -> int:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            stack.url("ingest", "/webhooks/gitlab"),
            data=json.dumps(body),
            headers={"Content-Type": "application/json", "X-Gitlab-Event": event,
                     "X-Gitlab-Token": SECRET, "X-Gitlab-Event-UUID": delivery},
        )  # fmt: skip
        return resp.status


def mr_hook() -> dict[str, object]:
    body = json.loads(MR_HOOK.read_text())
    body["project"]["id"] = 42
    body["object_attributes"].update(iid=MR, source_branch="feature", state="opened")
    body["labels"] = []
    return body


async def test_one_note_and_a_status_for_a_merge_request_over_two_replicas(stack: Stack) -> None:
    compile_log = (LOGS / "compile_error.log").read_bytes()
    jobs = {5001: ("compile-a", compile_log), 5002: ("compile-b", compile_log),
            5003: ("build-big", OOM_LOG)}  # fmt: skip
    for job_id, (name, trace) in jobs.items():
        stack.gitlab.add_job(job_id, name, 77, ref="feature")
        stack.gitlab.traces[job_id] = trace
    assert await hook(stack, mr_hook(), "Merge Request Hook", "mr-1") == 202
    async with stack.subscription("explain", "ExplanationPosted") as posted:
        for job_id, (name, _) in jobs.items():
            body = job_hook(job_id, 77, 42)
            body.update(build_name=name, ref="feature")
            assert await hook(stack, body, "Job Hook", f"job-{job_id}") == 202

        async def all_explained() -> None:
            while True:
                msgspec.json.decode(await posted.get())
                notes = stack.gitlab.notes.get(MR, [])
                if notes and all(f"(#{j})" in notes[0]["body"] for j in jobs):
                    return

        await asyncio.wait_for(all_explained(), 90)
    (note,) = stack.gitlab.notes[MR]
    creates = [c for c in stack.gitlab.calls if c.method == "POST" and c.path.endswith("/notes")]
    assert len(creates) == 1
    assert "**Needs your attention**" in note["body"]
    assert "https://ci.example/jobs/gitlab/42/5001" in note["body"]
    status = stack.gitlab.statuses["abc123"][0]
    assert (status["name"], status["status"]) == ("ciretry", "failed")
    # What was posted is in the log, every record naming the one note.
    stream = f"explain-gitlab-42-mr_note-mr-{MR}"
    records = [e.data for e in await stack.store.read_stream(stream)]
    assert records and all(isinstance(r, ExplanationPosted) for r in records)
    assert {r.provider_id for r in records} == {str(note["id"])}  # type: ignore[union-attr]

    # The author disputes a verdict by replying to the note: it lands as VerdictDisputed.
    reply = {
        "object_kind": "note", "event_type": "note", "user": {"username": "alice"},
        "project_id": 42, "project": {"id": 42},
        "object_attributes": {"id": 9001, "note": "/ciretry wrong 5001 this file compiles here",
                              "noteable_type": "MergeRequest"},
        "merge_request": {"iid": MR},
    }  # fmt: skip
    assert await hook(stack, reply, "Note Hook", "note-1") == 202
    job_events = await stack.store.read_stream(job_stream("gitlab", "42", "5001"))
    (verdict,) = [e for e in job_events if isinstance(e.data, VerdictReached)]
    (dispute,) = [e.data for e in job_events if isinstance(e.data, VerdictDisputed)]
    assert dispute == VerdictDisputed(verdict_event_id=verdict.event_id, who="gitlab:alice",
                                      why="this file compiles here")  # fmt: skip
