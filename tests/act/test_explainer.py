"""The explainer against the fake GitLab (in-process), on both event logs: one note per merge
request however many jobs fail and however many replicas post, edited not duplicated after a
crash between post and record, a commit status, and a provider error that never blocks a retry.
With two act replicas over real HTTP, PostgreSQL and NATS: tests/e2e/test_explain.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ciretry.act.explain import marker
from ciretry.act.explainer import Explainer, NotYet
from ciretry.act.policy import Policy
from ciretry.act.posting import GitLabPublisher, Post
from ciretry.act.service import ActHandler
from ciretry.common.errors import DependencyUnavailable
from ciretry.common.eventlog import EventLog
from ciretry.common.events import (
    ExplanationPosted,
    FailureSignature,
    MergeRequestUpdated,
    RecordedEvent,
    RetryIssued,
    explain_stream,
    job_stream,
    review_stream,
)
from tests.support.providers import FakeGitLab

from .helpers import NOW as NOW_
from .helpers import PROJECT, job, verdict
from .test_service import STREAM, handler, policy, seed

MR = 7
NOTE = "mr_note"


def explaining(mode: str = "note") -> Policy:
    return policy(default=f'explain = "{mode}"\nexplain_interval_s = 0.0')


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab()
    yield fake
    await fake.close()


async def open_mr(store: EventLog, branch: str = "feature") -> None:
    await store.append(
        review_stream("gitlab", PROJECT, branch),
        [
            MergeRequestUpdated(
                source="gitlab",
                project=PROJECT,
                number=str(MR),
                source_branch=branch,
                state="opened",
            )
        ],  # fmt: skip
    )


async def fail_jobs(store: EventLog, fake: FakeGitLab, act: ActHandler, n_det: int,
                    n_infra: int) -> None:  # fmt: skip
    """A pipeline of the merge request with ``n_det`` compile errors and ``n_infra``
    preemptions, each decided by act (the preemptions retried at the fake)."""
    specs = [("deterministic", f"compile-{i}") for i in range(n_det)]
    specs += [("preempted", f"test-{i}") for i in range(n_infra)]
    for i, (category, name) in enumerate(specs):
        j = job(500 + i, name, ref="feature")
        rec = await seed(store, fake, j, verdict(500 + i, name, category))  # type: ignore[arg-type]
        await act.handle_verdict(rec)


async def actions(store: EventLog) -> list[RecordedEvent]:
    return [r for r in await store.read_stream(STREAM) if r.data.topic == "action"]


async def deliver(explainer: Explainer, events: list[RecordedEvent]) -> None:
    """Each event to the explainer as a consumer would: handed back while it says NotYet."""
    for event in events:
        for _ in range(200):
            try:
                await explainer.handle(event)
                break
            except NotYet:
                await asyncio.sleep(0.001)
        else:
            raise AssertionError("never explained")


def note_posts(fake: FakeGitLab) -> list[Any]:
    return [c for c in fake.calls if c.method == "POST" and c.path.endswith(f"/{MR}/notes")]


async def posted(store: EventLog, target: str, subject: str) -> list[ExplanationPosted]:
    stream = explain_stream("gitlab", PROJECT, target, subject)
    return [r.data for r in await store.read_stream(stream)]  # type: ignore[misc]


async def test_one_note_per_merge_request_edited_as_jobs_fail(log: EventLog, gitlab: FakeGitLab
                                                              ) -> None:  # fmt: skip
    await open_mr(log)
    act = handler(log, gitlab, explaining())
    await fail_jobs(log, gitlab, act, n_det=3, n_infra=2)
    await deliver(act.explainer, await actions(log))
    (note,) = gitlab.notes[MR]
    assert note["body"].startswith(marker("gitlab", PROJECT, f"mr-{MR}"))
    assert len(note_posts(gitlab)) == 1
    assert "**Needs your attention**" in note["body"]
    for name in ("compile-0", "compile-1", "compile-2", "test-0", "test-1"):
        assert f"**{name}**" in note["body"]
    records = await posted(log, NOTE, f"mr-{MR}")
    assert records[0].how == "created" and all(r.how == "edited" for r in records[1:])
    assert {r.provider_id for r in records} == {str(note["id"])}
    # The commit status: failed (three compile errors need the author), one per change.
    (status, *older) = gitlab.statuses["abc123"]
    assert (status["name"], status["status"]) == ("ciretry", "failed")
    assert "3 needs your attention" in status["description"]
    assert status["pipeline_id"] == 900
    # Delivered again (a redelivery, a catch-up): nothing new is posted or recorded.
    calls = len(gitlab.calls)
    await deliver(act.explainer, await actions(log))
    assert not [c for c in gitlab.calls[calls:] if c.method != "GET"]
    assert len(await posted(log, NOTE, f"mr-{MR}")) == len(records)


async def test_replicas_post_one_note(log: EventLog, gitlab: FakeGitLab) -> None:
    await open_mr(log)
    act = handler(log, gitlab, explaining())
    await fail_jobs(log, gitlab, act, n_det=4, n_infra=2)
    events = await actions(log)
    replicas = [handler(log, gitlab, explaining()).explainer for _ in range(4)]
    await asyncio.gather(*(deliver(r, events) for r in replicas))
    assert len(gitlab.notes[MR]) == 1
    assert len(note_posts(gitlab)) == 1
    records = await posted(log, NOTE, f"mr-{MR}")
    assert [r.how for r in records].count("created") == 1
    # The note shows the final state, whichever replica posted last.
    assert "4 needs your attention" in gitlab.notes[MR][0]["body"]


async def test_a_crash_between_post_and_record_finds_the_note(log: EventLog, gitlab: FakeGitLab
                                                              ) -> None:  # fmt: skip
    await open_mr(log)
    act = handler(log, gitlab, explaining())
    await fail_jobs(log, gitlab, act, n_det=1, n_infra=1)
    events = await actions(log)
    # Posted, then the process died before recording: the note is there, the log knows nothing.
    ex = act.explainer
    decisions, jobs, _ = await ex._chain("gitlab", PROJECT, "900")
    from ciretry.act.explain import explain as render_expl
    from ciretry.act.explain import render_note

    expl = render_expl(source="gitlab", project=PROJECT, pipeline_id="900", decisions=decisions,
                       verdicts=await ex._verdicts(decisions), jobs=jobs)  # fmt: skip
    subject = f"mr-{MR}"
    lost = Post(target="mr_note", subject=subject, pipeline_id="900", number=str(MR),
                marker=marker("gitlab", PROJECT, subject), body=render_note(expl, subject))  # fmt: skip
    publisher = ex.publishers["gitlab"]
    assert isinstance(publisher, GitLabPublisher)
    assert (await publisher.publish(PROJECT, lost)).how == "created"
    assert await posted(log, NOTE, subject) == []
    # The redelivery finds it by its marker: no second note, the post recorded.
    await deliver(ex, events)
    assert len(gitlab.notes[MR]) == 1 and len(note_posts(gitlab)) == 1
    (record,) = await posted(log, NOTE, subject)
    assert (record.how, record.provider_id) == ("found", str(gitlab.notes[MR][0]["id"]))


async def test_a_note_someone_else_wrote_is_left_alone(log: EventLog, gitlab: FakeGitLab) -> None:
    await open_mr(log)
    for i in range(130):  # more than a page of 100: ours is on the second
        gitlab.add_note(MR, f"review comment {i}")
    act = handler(log, gitlab, explaining())
    await fail_jobs(log, gitlab, act, n_det=1, n_infra=0)
    await deliver(act.explainer, await actions(log))
    await fail_jobs_more(log, gitlab, act)  # something new to say: the note is looked up again
    calls = len(gitlab.calls)
    await deliver(act.explainer, await actions(log))
    pages = [c.query.get("page") for c in gitlab.calls[calls:]
             if c.method == "GET" and c.path.endswith(f"/{MR}/notes")]  # fmt: skip
    assert pages == ["1", "2"]
    ours = [n for n in gitlab.notes[MR] if n["body"].startswith("<!-- ciretry")]
    assert len(ours) == 1 and len(gitlab.notes[MR]) == 131
    assert "compile-late" in ours[0]["body"]
    assert [n["body"] for n in gitlab.notes[MR][:130]] == [
        f"review comment {i}" for i in range(130)
    ]


async def test_status_mode_posts_no_note_and_off_posts_nothing(log: EventLog, gitlab: FakeGitLab
                                                               ) -> None:  # fmt: skip
    await open_mr(log)
    act = handler(log, gitlab, explaining("status"))
    await fail_jobs(log, gitlab, act, n_det=1, n_infra=1)
    await deliver(act.explainer, await actions(log))
    assert MR not in gitlab.notes
    assert gitlab.statuses["abc123"][0]["status"] == "failed"
    quiet = FakeGitLab()
    off = handler(log, quiet, explaining("off"))
    await deliver(off.explainer, await actions(log))
    assert not [c for c in quiet.calls if "notes" in c.path or "statuses" in c.path]


async def test_without_a_merge_request_only_the_status(log: EventLog, gitlab: FakeGitLab) -> None:
    act = handler(log, gitlab, explaining())
    await fail_jobs(log, gitlab, act, n_det=0, n_infra=1)
    await deliver(act.explainer, await actions(log))
    assert gitlab.notes == {}
    # The retry is under way: running, until its outcome is known.
    assert gitlab.statuses["abc123"][0]["status"] == "running"


async def test_a_provider_error_never_blocks_a_retry(log: EventLog, gitlab: FakeGitLab) -> None:
    await open_mr(log)
    gitlab.fail[("POST", f"/api/v4/projects/{PROJECT}/merge_requests")] = [503] * 100
    gitlab.fail[("GET", f"/api/v4/projects/{PROJECT}/merge_requests")] = [503] * 100
    act = handler(log, gitlab, explaining())
    await fail_jobs(log, gitlab, act, n_det=0, n_infra=2)
    assert len(gitlab.posts("/retry")) == 2  # the retries went out
    assert sum(isinstance(r.data, RetryIssued) for r in await actions(log)) == 2
    events = await actions(log)
    with pytest.raises(DependencyUnavailable):
        await act.explainer.handle(events[0])
    assert not await log.is_processed("act-explain", events[0].event_id)  # handed back
    # The breaker: asked again at once, GitLab is not called.
    calls = len(gitlab.calls)
    with pytest.raises(DependencyUnavailable):
        await act.explainer.handle(events[0])
    assert len(gitlab.calls) == calls
    # GitLab is back and the breaker's pause is over: the note is posted.
    gitlab.fail.clear()
    act.explainer.breaker.reset()
    await deliver(act.explainer, events)
    assert len(gitlab.notes[MR]) == 1
    assert await log.is_processed("act-explain", events[0].event_id)


async def test_edits_are_rate_limited_per_merge_request(log: EventLog, gitlab: FakeGitLab) -> None:
    await open_mr(log)
    act = handler(log, gitlab, policy(default='explain = "note"\nexplain_interval_s = 60.0'))
    await fail_jobs(log, gitlab, act, n_det=1, n_infra=0)
    first = await actions(log)
    await deliver(act.explainer, first)
    assert len(gitlab.notes[MR]) == 1
    await fail_jobs_more(log, gitlab, act)
    later = [e for e in await actions(log) if e not in first]
    # The clock has not moved: a minute has not passed since the note was written.
    with pytest.raises(NotYet, match="again in 60.0 s"):
        await act.explainer.handle(later[0])
    assert not await log.is_processed("act-explain", later[0].event_id)
    assert "compile-late" not in gitlab.notes[MR][0]["body"]


async def fail_jobs_more(store: EventLog, fake: FakeGitLab, act: ActHandler) -> None:
    j = job(600, "compile-late", ref="feature")
    await act.handle_verdict(
        await seed(store, fake, j, verdict(600, "compile-late", "deterministic"))
    )


async def test_old_chains_are_not_written_on(log: EventLog, gitlab: FakeGitLab) -> None:
    """Switching explain on in a running deployment: the backlog of decisions older than
    ``explain_max_age_s`` is taken (tracked) but not posted."""
    import datetime as dt

    await open_mr(log)
    act = handler(log, gitlab, explaining("off"))
    await fail_jobs(log, gitlab, act, n_det=1, n_infra=1)
    later = Explainer(log, log.append_batch, explaining(), act.explainer.publishers,
                      clock=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(days=2))  # fmt: skip
    events = await actions(log)
    await deliver(later, events)
    assert gitlab.notes == {} and gitlab.statuses == {}
    assert all([await log.is_processed("act-explain", e.event_id) for e in events])
    soon = Explainer(log, log.append_batch, explaining(), act.explainer.publishers,
                     clock=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))  # fmt: skip
    await soon.handle(events[-1])
    assert len(gitlab.notes[MR]) == 1


async def test_posts_under_way_are_bounded_per_replica(log: EventLog) -> None:
    """Each post holds a claim (a pooled connection on PostgreSQL) through its provider calls:
    a slow provider must not let explanations hold every claim act's retries need."""
    from ciretry.act.explain import Explanation, render_status
    from ciretry.act.posting import Posted

    class SlowGitLab:
        source = "gitlab"

        def __init__(self) -> None:
            self.now = self.most = 0

        async def publish(self, project: str, post: Post) -> Posted:
            self.now += 1
            self.most = max(self.most, self.now)
            await asyncio.sleep(0.01)
            self.now -= 1
            return Posted("1", "created", "failed")

    slow = SlowGitLab()
    ex = Explainer(log, log.append_batch, explaining(), {"gitlab": slow}, clock=lambda: NOW_)
    expl = Explanation(source="gitlab", project=PROJECT, pipeline_id="900", sha=None, ref=None,
                       lines=())  # fmt: skip
    posts = [Post(target="commit_status", subject=f"sha{i}", pipeline_id="900", sha=f"sha{i}",
                  status=render_status(expl)) for i in range(8)]  # fmt: skip
    done = await asyncio.gather(*(ex._publish(slow, PROJECT, expl, p, 0.0) for p in posts))
    assert all(d is not None for d in done)
    assert slow.most == ex.most_posting == 2


async def test_a_line_says_how_often_its_failure_was_seen_elsewhere_this_week(
    log: EventLog, gitlab: FakeGitLab
) -> None:
    await open_mr(log)
    spot = FailureSignature(id="sig-v1:spot", algorithm="sig-v1", text="node reclaimed")
    # The same failure in three jobs of other pipelines (another push, another branch).
    for i in range(3):
        other = verdict(900 + i, f"other-{i}", "preempted", pipeline_id="4321", signature=spot)
        await log.append(job_stream("gitlab", PROJECT, other.job_id), [other])
    act = handler(log, gitlab, explaining())
    j = job(600, "test-spot", ref="feature")
    rec = await seed(log, gitlab, j, verdict(600, "test-spot", "preempted", signature=spot))
    await act.handle_verdict(rec)
    await deliver(act.explainer, await actions(log))
    (note,) = gitlab.notes[MR]
    line = next(x for x in note["body"].splitlines() if "test-spot" in x)
    assert "seen 3× elsewhere this week" in line
