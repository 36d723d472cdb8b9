"""A reply ``/ciretry wrong <job> [why]`` on a merge request (GitLab note hook) or pull request
(GitHub issue_comment) lands as the ``VerdictDisputed`` of the job's latest verdict."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient

from ciretry.common.eventlog import EventLog
from ciretry.common.events import VerdictDisputed, VerdictReached, job_stream
from ciretry.ingest.disputes import command

from .conftest import github_headers, gitlab_headers

Client = TestClient[Any, Any]


def test_command_is_read_from_its_own_line() -> None:
    assert command("/ciretry wrong 5001 the network was down") == ("5001",
                                                                   "the network was down")  # fmt: skip
    assert command("thanks!\n  /ciretry wrong #77\nbye") == (
        "77",
        "disputed by reply, no reason given",
    )
    assert command("we could say /ciretry wrong 5001 here") is None  # not at a line start
    assert command("/ciretry wrong compile") is None  # jobs are named by id
    assert command(None) is None


def verdict(job_id: str, project: str = "42", source: str = "gitlab") -> VerdictReached:
    return VerdictReached(source=source, project=project, pipeline_id="77",  # type: ignore[arg-type]
                          job_id=job_id, job_name="compile", category="deterministic",
                          retryable=False, budget="user", action="none", confidence=0.9)  # fmt: skip


def note_hook(text: str, note_id: int = 1244, noteable: str = "MergeRequest") -> dict[str, Any]:
    """A GitLab note hook on a merge request, in the documented shape."""
    return {
        "object_kind": "note",
        "event_type": "note",
        "user": {"id": 1, "name": "Administrator", "username": "root"},
        "project_id": 42,
        "project": {"id": 42, "name": "app", "path_with_namespace": "group/app"},
        "object_attributes": {
            "id": note_id,
            "note": text,
            "noteable_type": noteable,
            "project_id": 42,
            "system": False,
        },  # fmt: skip
        "merge_request": {"iid": 7, "source_branch": "feature", "state": "opened"},
    }


async def post_note(client: Client, body: dict[str, Any], uuid: str = "n-1") -> Any:
    resp = await client.post("/webhooks/gitlab", data=json.dumps(body),
                             headers=gitlab_headers(uuid=uuid, event="Note Hook"))  # fmt: skip
    return resp.status, await resp.json()


async def test_gitlab_reply_disputes_the_latest_verdict(client: Client, store: EventLog) -> None:
    stream = job_stream("gitlab", "42", "5001")
    await store.append(stream, [verdict("5001")])
    (latest,) = await store.append(stream, [verdict("5001")])  # classified again
    status, body = await post_note(client, note_hook("/ciretry wrong 5001 it was the runner"))
    assert (status, body["status"]) == (202, "accepted")
    (dispute,) = [e for e in await store.read_stream(stream) if isinstance(e.data, VerdictDisputed)]
    assert dispute.data == VerdictDisputed(verdict_event_id=latest.event_id, who="gitlab:root",
                                           why="it was the runner")  # fmt: skip
    assert dispute.metadata.idempotency_key == "gitlab:dispute:42:1244"
    # GitLab delivers the hook again: stored once.
    status, body = await post_note(
        client, note_hook("/ciretry wrong 5001 it was the runner"), "n-2"
    )
    assert (status, body["status"]) == (200, "duplicate")


async def test_gitlab_notes_that_are_not_disputes_are_ignored(
    client: Client, store: EventLog
) -> None:
    await store.append(job_stream("gitlab", "42", "5001"), [verdict("5001")])
    for body in (
        note_hook("LGTM"),
        note_hook("/ciretry wrong 5001", noteable="Issue"),
        note_hook("/ciretry wrong 999 no such job here"),
    ):
        status, answer = await post_note(client, body)
        assert (status, answer["status"]) == (202, "ignored"), answer
    assert not [e async for e in store.read_all() if isinstance(e.data, VerdictDisputed)]


async def test_github_pull_request_comment_disputes(client: Client, store: EventLog) -> None:
    stream = job_stream("github", "octo/app", "71")
    (v,) = await store.append(stream, [verdict("71", project="octo/app", source="github")])
    payload = {
        "action": "created",
        "issue": {"number": 3, "pull_request": {"url": "https://api.github.com/repos/octo/app/pulls/3"}},
        "comment": {"id": 991, "body": "/ciretry wrong 71 flaky, not mine", "user": {"login": "bob"}},
        "repository": {"full_name": "octo/app"},
        "sender": {"login": "bob"},
    }  # fmt: skip
    raw = json.dumps(payload).encode()
    resp = await client.post("/webhooks/github", data=raw,
                             headers=github_headers(raw, "issue_comment"))  # fmt: skip
    assert resp.status == 202, await resp.text()
    (dispute,) = [
        e.data for e in await store.read_stream(stream) if isinstance(e.data, VerdictDisputed)
    ]
    assert dispute == VerdictDisputed(verdict_event_id=v.event_id, who="github:bob",
                                      why="flaky, not mine")  # fmt: skip
    # A comment on an issue (not a pull request) is not a dispute.
    payload["issue"] = {"number": 4}
    raw = json.dumps(payload).encode()
    resp = await client.post("/webhooks/github", data=raw,
                             headers=github_headers(raw, "issue_comment"))  # fmt: skip
    assert (resp.status, (await resp.json())["status"]) == (202, "ignored")
