"""Bench: what an explanation costs act, on PostgreSQL, against the fake GitLab in-process.

A merge request's pipeline with 50 failed jobs (half compile errors, half preemptions, each
decided by act: 25 retries requested and issued, 25 skipped), its note and status posted. Then:

* render: the pure part (``explain`` + ``render_note``) of the 50-job chain;
* unchanged: ``Explainer.handle`` of a decision whose explanation is already shown (a
  redelivery, or a decision that changes nothing visible): reads the chain from the log, renders,
  finds the same digest recorded, asks no provider;
* edit: one more job fails and is decided, then ``handle`` of its decision: reads, renders, looks
  up the note (one page) and the status, edits both, records two ``ExplanationPosted``;
* against: act's decision on that job (``handle_verdict``, the same chain), what every failed
  job costs act already. ``ratio`` = edit / decide.

Medians; warm database. Runs with no arguments: CIRETRY_DATABASE_URL when set, else an embedded
PostgreSQL. Last line: BENCH {"render_ms": ..., "unchanged_ms": ..., "edit_ms": ..., "ratio": ...}
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ciretry.act.executors import GitLabExecutor, HttpSettings  # noqa: E402
from ciretry.act.explain import explain, render_note  # noqa: E402
from ciretry.act.policy import parse_policy  # noqa: E402
from ciretry.act.service import build  # noqa: E402
from ciretry.common.config import Config  # noqa: E402
from ciretry.common.events import (  # noqa: E402
    Evidence,
    JobFinished,
    MergeRequestUpdated,
    VerdictReached,
    job_stream,
    pipeline_stream,
    review_stream,
)
from ciretry.common.eventstore import EventStore  # noqa: E402
from tests.support.providers import FakeGitLab  # noqa: E402
from tests.support.servers import servers  # noqa: E402

JOBS = 50
ROUNDS = 30
PROJECT, PIPELINE, MR = "42", "900", 7
STREAM = pipeline_stream("gitlab", PROJECT, PIPELINE)
POLICY = parse_policy(
    'version = 1\n[default]\nexplain = "note"\nexplain_interval_s = 0.0\n'
    "[default.pipeline]\nfloor = 1000\n[default.mostly_broken]\ncount = 1000\nfraction = 1.0\n"
)


async def nosleep(_: float) -> None:
    return None


async def fail(store: EventStore, fake: FakeGitLab, act: Any, job_id: int, infra: bool) -> float:
    """A failed job and its verdict appended, act's decision on it; returns the decision's
    time (``handle_verdict``)."""
    name = f"job-{job_id}"
    fake.add_job(job_id, name, int(PIPELINE), ref="feature")
    job = JobFinished(source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id=str(job_id),
                      job_name=name, status="failed", ref="feature", sha="abc123")  # fmt: skip
    (jf,) = await store.append(STREAM, [job])
    category = "preempted" if infra else "deterministic"
    verdict = VerdictReached(
        source="gitlab", project=PROJECT, pipeline_id=PIPELINE, job_id=str(job_id), job_name=name,
        category=category, retryable=infra, budget="system" if infra else "user",
        action="retry_job" if infra else "none", confidence=0.9, rules=(f"{category}-rule",),
        evidence=(Evidence(rule=f"{category}-rule", line=40, text=f"src/m{job_id}.c:3: error"),),
        job_event_id=jf.event_id,
    )  # fmt: skip
    (rec,) = await store.append(job_stream("gitlab", PROJECT, str(job_id)), [verdict])
    t = time.perf_counter()
    await act.handle_verdict(rec)
    return time.perf_counter() - t


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


async def run(dsn: str) -> dict[str, Any]:
    schema = f"bench_explain_{uuid.uuid4().hex[:6]}"
    store = await EventStore.connect(dsn, schema, max_size=4)
    fake = FakeGitLab()
    settings = HttpSettings(timeout_s=5.0, max_attempts=2)
    ex = GitLabExecutor(fake.url, "tok", settings=settings, sleep=nosleep,
                        transport=fake.transport())  # fmt: skip
    try:
        await store.migrate()
        act = build(store, None, Config(), policy=POLICY, executors={"gitlab": ex})
        await store.append(review_stream("gitlab", PROJECT, "feature"), [MergeRequestUpdated(
            source="gitlab", project=PROJECT, number=str(MR), source_branch="feature",
            state="opened")])  # fmt: skip
        for i in range(JOBS):
            await fail(store, fake, act, 1000 + i, infra=i % 2 == 1)
        actions = [r for r in await store.read_stream(STREAM) if r.data.topic == "action"]
        await act.explainer.handle(actions[-1])
        assert len(fake.notes[MR]) == 1

        decisions, jobs, _ = await act.explainer._chain("gitlab", PROJECT, PIPELINE)
        verdicts = await act.explainer._verdicts(decisions)
        render: list[float] = []
        for _ in range(200):
            t = time.perf_counter()
            e = explain(source="gitlab", project=PROJECT, pipeline_id=PIPELINE,
                        decisions=decisions, verdicts=verdicts, jobs=jobs)  # fmt: skip
            render_note(e, f"mr-{MR}")
            render.append(time.perf_counter() - t)

        unchanged: list[float] = []
        for _ in range(ROUNDS):
            calls = len(fake.calls)
            t = time.perf_counter()
            await act.explainer.handle(actions[-1])
            unchanged.append(time.perf_counter() - t)
            assert len(fake.calls) == calls  # no provider asked

        edit: list[float] = []
        decide: list[float] = []
        calls_per_edit: list[int] = []
        for i in range(ROUNDS):
            decide.append(await fail(store, fake, act, 2000 + i, infra=False))
            last = [r for r in await store.read_stream(STREAM) if r.data.topic == "action"][-1]
            calls = len(fake.calls)
            t = time.perf_counter()
            posted = await act.explainer.handle(last)
            edit.append(time.perf_counter() - t)
            calls_per_edit.append(len(fake.calls) - calls)
            assert [p.how for p in posted] == ["edited", "edited"], posted
        assert len(fake.notes[MR]) == 1
    finally:
        async with store.connection() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await store.close()
        await ex.close()
    return {
        "jobs": JOBS,
        "render_ms": median_ms(render),
        "unchanged_ms": median_ms(unchanged),
        "edit_ms": median_ms(edit),
        "decide_ms": median_ms(decide),
        "ratio": round(statistics.median(edit) / statistics.median(decide), 2),
        "provider_calls_per_edit": statistics.median(calls_per_edit),
        "note_chars": len(fake.notes[MR][0]["body"]),
    }


async def main() -> None:
    with servers(nats=False) as s:
        print(f"PostgreSQL: {s.how}")
        result = await run(s.database_url)
    print(
        f"a {result['jobs']}-job chain: render {result['render_ms']} ms; handle with nothing "
        f"new {result['unchanged_ms']} ms (no provider call); handle that edits the note and "
        f"the status {result['edit_ms']} ms ({result['provider_calls_per_edit']} provider calls, "
        f"in-process fake), against the decision itself {result['decide_ms']} ms: ratio "
        f"{result['ratio']}; note {result['note_chars']} characters"
    )
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
