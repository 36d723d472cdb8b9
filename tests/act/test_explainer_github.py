"""GitHub: the ``ciretry`` check run (summary, annotations at the file and line the log names)
and the pull request comment, each updated in place, against the fake GitHub in-process and over
real HTTP, on both event logs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from ciretry.act.executors import GitHubExecutor
from ciretry.act.explain import marker
from ciretry.act.policy import Policy
from ciretry.act.service import ActHandler, build
from ciretry.common.config import Config
from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    Evidence,
    ExplanationPosted,
    JobFinished,
    MergeRequestUpdated,
    PipelineFinished,
    RecordedEvent,
    RetryIssued,
    VerdictReached,
    explain_stream,
    job_stream,
    pipeline_stream,
    review_stream,
)
from tests.support.fakehttp import reaching, running
from tests.support.providers import FakeGitHub

from .helpers import NOW
from .test_explainer import deliver
from .test_service import FAST, _nosleep, policy

REPO = "octo/app"
RUN = "300"
SHA = "f00dfeed"
PR = 3
STREAM = pipeline_stream("github", REPO, RUN)


@pytest.fixture(params=["in-process", "served"])
async def github(request: pytest.FixtureRequest) -> AsyncIterator[FakeGitHub]:
    async with running(FakeGitHub(), request.param) as fake:
        yield fake


def gh_job(job_id: int, name: str, status: str = "failed", attempt: int = 1) -> JobFinished:
    return JobFinished(source="github", project=REPO, pipeline_id=RUN, job_id=str(job_id),
                       job_name=name, status=status, ref="feature", sha=SHA, attempt=attempt)  # fmt: skip


def gh_verdict(job_id: int, name: str, category: str, text: str | None) -> VerdictReached:
    rule = f"{category}-rule"
    return VerdictReached(
        source="github", project=REPO, pipeline_id=RUN, job_id=str(job_id), job_name=name,
        category=category, retryable=category != "deterministic",  # type: ignore[arg-type]
        budget="system" if category != "deterministic" else "user",
        action="retry_job" if category != "deterministic" else "none", confidence=0.9,
        rules=(rule,), evidence=(Evidence(rule=rule, line=88, text=text),),
    )  # fmt: skip


async def act_on(log: EventLog, fake: FakeGitHub, p: Policy) -> AsyncIterator[ActHandler]:
    async with reaching(fake) as transport:
        ex = GitHubExecutor(fake.url, "tok", settings=FAST, sleep=_nosleep, transport=transport)
        yield build(log, None, Config(public_url="https://ci.example"), policy=p,
                    executors={"github": ex}, clock=lambda: NOW)  # fmt: skip


async def fail(log: EventLog, fake: FakeGitHub, act: ActHandler) -> None:
    await log.append(
        review_stream("github", REPO, "feature"),
        [
            MergeRequestUpdated(
                source="github", project=REPO, number=str(PR), source_branch="feature", state="open"
            )
        ],  # fmt: skip
    )
    for job_id, name, category, text in (
        (71, "unit", "deterministic", "tests/test_parser.py:12: AssertionError: 3 != 4"),
        (72, "integration", "preempted", "The runner has received a shutdown signal."),
    ):
        fake.add_job(int(RUN), job_id, name)
        (jf,) = await log.append(STREAM, [gh_job(job_id, name)])
        v = msgspec.structs.replace(
            gh_verdict(job_id, name, category, text), job_event_id=jf.event_id
        )
        (rec,) = await log.append(job_stream("github", REPO, str(job_id)), [v])
        await act.handle_verdict(rec)


async def actions(log: EventLog) -> list[RecordedEvent]:
    return [r for r in await log.read_stream(STREAM) if r.data.topic == "action"]


def calls(fake: FakeGitHub, method: str, fragment: str) -> list[Any]:
    return [c for c in fake.calls if c.method == method and fragment in c.path]


async def test_check_run_and_comment_updated_in_place(log: EventLog, github: FakeGitHub) -> None:
    p = policy(default='explain = "note"\nexplain_interval_s = 0.0')
    async for act in act_on(log, github, p):
        await fail(log, github, act)
        await deliver(act.explainer, await actions(log))
        (run,) = github.check_runs.values()
        assert (run["name"], run["head_sha"], run["status"]) == ("ciretry", SHA, "in_progress")
        assert run["output"]["title"] == "1 needs your attention, 1 retried automatically"
        assert "**Needs your attention**" in run["output"]["summary"]
        unit = [a for a in run["annotations"] if a["title"].startswith("unit")]
        assert [(a["path"], a["start_line"], a["annotation_level"]) for a in unit] == [
            ("tests/test_parser.py", 12, "failure")]  # fmt: skip
        (comment,) = github.comments[PR]
        assert comment["body"].startswith(marker("github", REPO, f"pr-{PR}"))

        # The rerun passes and the run finishes: the same check run and comment, updated.
        issued = next(r.data for r in await actions(log) if isinstance(r.data, RetryIssued))
        rerun = max(j["id"] for j in github.runs[int(RUN)] if j["name"] == "integration")
        assert issued.job_id == "72"
        await log.append(STREAM, [gh_job(rerun, "integration", "success", attempt=2)])
        (finished,) = await log.append(STREAM, [PipelineFinished(
            source="github", project=REPO, pipeline_id=RUN, status="failed", sha=SHA)])  # fmt: skip
        await act.explainer.handle(finished, "act-explain-pipeline")
        assert len(github.check_runs) == 1 and len(github.comments[PR]) == 1
        assert len(calls(github, "POST", "/check-runs")) == 1
        assert len(calls(github, "POST", "/comments")) == 1
        assert (run["status"], run["conclusion"]) == ("completed", "failure")
        assert "retry 1 of 3: passed" in github.comments[PR][0]["body"]
        # GitHub appends the annotations of an update: none is sent twice.
        keys = [(a["path"], a["start_line"], a["message"]) for a in run["annotations"]]
        assert len(keys) == len(set(keys)) == 2
        stream = explain_stream("github", REPO, "check_run", SHA)
        records = [r.data for r in await log.read_stream(stream)]
        assert all(isinstance(r, ExplanationPosted) for r in records)
        assert [r.how for r in records] == ["created", "edited"]  # type: ignore[union-attr]
        assert records[-1].state == "failure"  # type: ignore[union-attr]


async def test_status_mode_is_the_check_run_alone(log: EventLog, github: FakeGitHub) -> None:
    p = policy(default='explain = "status"\nexplain_interval_s = 0.0')
    async for act in act_on(log, github, p):
        await fail(log, github, act)
        await deliver(act.explainer, await actions(log))
        assert len(github.check_runs) == 1
        assert github.comments == {}


async def test_our_comment_is_found_past_the_first_page(log: EventLog, github: FakeGitHub) -> None:
    for i in range(150):
        github.add_comment(PR, f"comment {i}")
    p = policy(default='explain = "note"\nexplain_interval_s = 0.0')
    async for act in act_on(log, github, p):
        await fail(log, github, act)
        await deliver(act.explainer, await actions(log))
        rerun = max(j["id"] for j in github.runs[int(RUN)] if j["name"] == "integration")
        await log.append(STREAM, [gh_job(rerun, "integration", "success", attempt=2)])
        (finished,) = await log.append(STREAM, [PipelineFinished(
            source="github", project=REPO, pipeline_id=RUN, status="failed", sha=SHA)])  # fmt: skip
        before = len(github.calls)
        await act.explainer.handle(finished, "act-explain-pipeline")
        pages = [c.query.get("page") for c in github.calls[before:]
                 if c.method == "GET" and c.path.endswith(f"/issues/{PR}/comments")]  # fmt: skip
        assert pages == ["1", "2"]
        ours = [c for c in github.comments[PR] if c["body"].startswith("<!-- ciretry")]
        assert len(ours) == 1 and len(github.comments[PR]) == 151
        assert "retry 1 of 3: passed" in ours[0]["body"]
