"""Attempt chains in the pure core: budgets, attempt counts and sizes folded over every pipeline a
chain spans, replay following chains, and the runaway OOM rerun that per-pipeline budgets allowed.

A chain here is built the way the log holds it: the origin's stream (jobs and every decision of
the chain) and each rerun pipeline's stream (its link and its jobs), folded on their own and
merged, as act's loader does."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from ciretry.act.budget import BudgetState, decide, fold_budget
from ciretry.act.policy import Policy, parse_policy
from ciretry.act.replay import multi_stream_chains, verify
from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    JobFinished,
    Metadata,
    PipelineLinked,
    RecordedEvent,
    Resources,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    VerdictReached,
    pipeline_stream,
)

from .helpers import NOW, PROJECT, job, verdict

ORIGIN = "900"


def policy(system: int = 5, cap: int = 8192, base: int = 512, factor: float = 2.0) -> Policy:
    return parse_policy(
        f"""
version = 1
[default.attempts]
system = {system}
[default.pipeline]
floor = 50
[default.resources]
memory_factor = {factor}
memory_cap_mb = {cap}
base_memory_mb = {base}
"""
    )


class Chain:
    """A chain's streams as the log holds them, and the decisions act would append."""

    def __init__(self, origin: str = ORIGIN) -> None:
        self.origin = origin
        self.streams: dict[str, list[Event]] = {origin: []}

    def run(self, pipeline: str, job_id: int, name: str = "build", **kw: Any) -> JobFinished:
        j = job(job_id, name, pipeline_id=pipeline, **kw)
        self.streams.setdefault(pipeline, []).append(j)
        return j

    def link(self, pipeline: str, request: RetryRequested, memory: int | None = None) -> None:
        size = Resources(memory_limit_mb=memory) if memory else None
        self.streams.setdefault(pipeline, []).append(
            PipelineLinked(
                source="gitlab", project=PROJECT, pipeline_id=pipeline,
                retry_of=request.idempotency_key, resources=size,
            )
        )  # fmt: skip

    def state(self) -> BudgetState:
        state = fold_budget(self.streams[self.origin], origin=self.origin)
        for pipeline, events in self.streams.items():
            if pipeline != self.origin:
                state.merge(fold_budget(events))
        return state

    def decide(
        self, v: VerdictReached, p: Policy, j: JobFinished | None = None
    ) -> RetryRequested | RetrySkipped:
        d = decide(self.state(), v, p, j, NOW)
        self.streams[self.origin].append(d)
        return d


def oom(job_id: int, pipeline: str, died_at: int | None = None) -> VerdictReached:
    observed = Resources(memory_limit_mb=died_at) if died_at else None
    return verdict(job_id, "build", "oom", pipeline_id=pipeline, observed=observed)


def test_an_oom_that_never_ends_is_rerun_bigger_until_the_cap_then_stops() -> None:
    """The retry storm of issue 12: every rerun is a new pipeline. Folded over the chain, the
    size grows from what died and the chain stops at the cap."""
    p = policy()
    chain = Chain()
    chain.run(ORIGIN, 10)
    pipeline, job_id, size = ORIGIN, 10, 1024
    asked: list[int] = []
    for step in range(10):
        d = chain.decide(oom(job_id, pipeline, died_at=size), p)
        if isinstance(d, RetrySkipped):
            break
        assert d.resources is not None and d.resources.memory_limit_mb is not None
        assert d.origin_pipeline_id == (None if pipeline == ORIGIN else ORIGIN)
        assert d.snapshot.job_attempts == step
        size = d.resources.memory_limit_mb
        asked.append(size)
        pipeline, job_id = str(1000 + step), 2000 + step
        chain.link(pipeline, d, memory=size)
        chain.run(pipeline, job_id)
    assert asked == [2048, 4096, 8192]
    assert isinstance(d, RetrySkipped) and d.reason == "resource_cap_reached"
    assert "8192 MB" in d.detail and "cap of 8192 MB" in d.detail
    assert d.origin_pipeline_id == ORIGIN


def test_per_pipeline_folding_is_the_runaway() -> None:
    """What act did before chains: each rerun pipeline's own stream, a fresh budget and the base
    size every time (the same decision forever)."""
    p = policy(system=1)
    for job_id, pipeline in ((10, ORIGIN), (20, "1000"), (30, "1001")):
        state = fold_budget([job(job_id, "build", pipeline_id=pipeline)])
        d = decide(state, oom(job_id, pipeline, died_at=None), p, None, NOW)
        assert isinstance(d, RetryRequested) and d.resources is not None
        assert d.resources.memory_limit_mb == 1024 and d.snapshot.job_attempts == 0


def test_infrastructure_failures_in_every_recreated_pipeline_stop_at_the_job_limit() -> None:
    p = policy(system=3)
    chain = Chain()
    chain.run(ORIGIN, 10)
    pipeline, job_id = ORIGIN, 10
    made = 0
    for step in range(10):
        v = verdict(job_id, "build", "runner_system", action="recreate_pipeline",
                    pipeline_id=pipeline)  # fmt: skip
        d = chain.decide(v, p)
        if isinstance(d, RetrySkipped):
            break
        made += 1
        pipeline, job_id = str(1000 + step), 2000 + step
        chain.link(pipeline, d)
        chain.run(pipeline, job_id)
    assert made == 3
    assert d.reason == "job_budget_exhausted" and d.snapshot.job_attempts == 3


@pytest.mark.parametrize(
    ("died_at", "cap", "expect"),
    [
        (32768, 16384, None),  # killed above the cap: skipped, never "rerun bigger" at 8 GiB
        (32768, 131072, 65536),
        (32768, 40000, 40000),  # capped, still above what died
        (16384, 16384, None),
    ],
)
def test_a_pod_killed_big_is_never_rerun_smaller(
    died_at: int, cap: int, expect: int | None
) -> None:
    d = decide(fold_budget([job(10)]), oom(10, "900", died_at), policy(cap=cap, base=4096),
               None, NOW)  # fmt: skip
    if expect is None:
        assert isinstance(d, RetrySkipped) and d.reason == "resource_cap_reached"
        assert f"died at {died_at} MB" in d.detail
    else:
        assert isinstance(d, RetryRequested) and d.resources is not None
        assert d.resources.memory_limit_mb == expect
        assert d.resources.memory_limit_mb > died_at


def test_size_starts_from_the_largest_of_what_died_what_was_asked_and_base() -> None:
    chain = Chain()
    chain.run(ORIGIN, 10)
    first = chain.decide(oom(10, ORIGIN, died_at=1024), policy(base=4096))
    assert isinstance(first, RetryRequested) and first.resources is not None
    assert first.resources.memory_limit_mb == 8192  # base 4096 > died 1024
    chain.link("1000", first, memory=8192)
    chain.run("1000", 20)
    # The pod of the rerun reports less than was asked (a limit range clamped it): the chain
    # still starts from the larger size it asked for.
    again = chain.decide(oom(20, "1000", died_at=6000), policy(base=4096, cap=65536))
    assert isinstance(again, RetryRequested) and again.resources is not None
    assert again.resources.memory_limit_mb == 16384


def test_a_preemption_after_a_bigger_rerun_keeps_the_bigger_size() -> None:
    chain = Chain()
    chain.run(ORIGIN, 10)
    bigger = chain.decide(oom(10, ORIGIN, died_at=2048), policy())
    assert isinstance(bigger, RetryRequested) and bigger.resources is not None
    chain.link("1000", bigger, memory=bigger.resources.memory_limit_mb)
    chain.run("1000", 20)
    again = chain.decide(verdict(20, "build", "preempted", pipeline_id="1000"), policy())
    assert isinstance(again, RetryRequested) and again.action == "retry_job"
    assert again.resources == bigger.resources


def test_a_passed_attempt_is_not_a_retry_of_the_next() -> None:
    """A recreated pipeline runs every job again: a job that passed before and fails now has
    used none of its retries."""
    chain = Chain()
    chain.run(ORIGIN, 10, "build")
    chain.run(ORIGIN, 11, "test", status="success")
    recreate = chain.decide(
        verdict(10, "build", "runner_system", action="recreate_pipeline"), policy()
    )
    assert isinstance(recreate, RetryRequested)
    chain.link("1000", recreate)
    chain.run("1000", 20, "build", status="success")
    chain.run("1000", 21, "test")
    d = chain.decide(verdict(21, "test", "preempted", pipeline_id="1000"), policy())
    assert isinstance(d, RetryRequested) and d.snapshot.job_attempts == 0
    # ...while the chain's budget counts every retry of every pipeline in it.
    assert d.snapshot.pipeline_retries == 1


def test_a_provider_that_cannot_resize_says_so() -> None:
    v = verdict(10, "build", "oom", source="github", observed=Resources(memory_limit_mb=7168))
    d = decide(fold_budget([job(10, source="github")]), v, policy(), None, NOW)
    assert isinstance(d, RetrySkipped) and d.reason == "resize_unsupported"
    assert "github cannot rerun a job with more memory" in d.detail
    assert d.would_action == "rerun_with_resources"


def test_merged_streams_fold_like_one() -> None:
    chain = Chain()
    chain.run(ORIGIN, 10)
    chain.run(ORIGIN, 11, "test", status="success")
    first = chain.decide(oom(10, ORIGIN, died_at=1024), policy())
    assert isinstance(first, RetryRequested)
    chain.link("1000", first, memory=2048)
    chain.run("1000", 20)
    merged = chain.state()
    together = fold_budget([e for events in chain.streams.values() for e in events])
    assert merged.retries_requested == together.retries_requested == 1
    assert merged.job_names == together.job_names == {"build", "test"}
    assert {n: h.attempts for n, h in merged.jobs.items()} == {
        n: h.attempts for n, h in together.jobs.items()
    }
    assert merged.members == {pipeline_stream("gitlab", PROJECT, ORIGIN)}
    assert set(merged.links) == {"1000"}


# --- replay follows chains --------------------------------------------------------------------


def recorded(log: list[tuple[str, Event]]) -> list[RecordedEvent]:
    versions: dict[str, int] = {}
    out = []
    for position, (pipeline, data) in enumerate(log, 1):
        stream = pipeline_stream("gitlab", PROJECT, pipeline)
        versions[stream] = versions.get(stream, 0) + 1
        out.append(
            RecordedEvent(
                event_id=uuid.uuid4(), stream=stream,
                stream_version=versions[stream], position=position,
                recorded_at=dt.datetime(2024, 5, 1, tzinfo=dt.UTC), data=data,
                metadata=Metadata(),
            )
        )  # fmt: skip
    return out


def request(job_id: int, pipeline: str, limit: int, **kw: Any) -> RetryRequested:
    fields: dict[str, Any] = {
        "source": "gitlab", "project": PROJECT, "pipeline_id": pipeline, "job_id": str(job_id),
        "job_name": "build", "action": "recreate_pipeline", "category": "runner_system",
        "budget": "system",
        "idempotency_key": f"act:gitlab:{PROJECT}:{job_id}:recreate_pipeline",
        "snapshot": BudgetSnapshot(job_limit=limit, pipeline_limit=50),
    }  # fmt: skip
    fields.update(kw)
    return RetryRequested(**fields)


def test_replay_checks_a_rerun_against_its_chain() -> None:
    """The request for the job in the third pipeline is the chain's third retry of ``build``
    with a limit of two: a violation only a chain-aware replay can see."""
    r1 = request(10, ORIGIN, 2)
    r2 = request(20, "1000", 2, origin_pipeline_id=ORIGIN)
    r3 = request(30, "1001", 2, origin_pipeline_id=ORIGIN)
    link = PipelineLinked(source="gitlab", project=PROJECT, pipeline_id="1000",
                          retry_of=r1.idempotency_key)  # fmt: skip
    log: list[tuple[str, Event]] = [
        (ORIGIN, job(10)),
        (ORIGIN, r1),
        (ORIGIN, RetryIssued(source="gitlab", project=PROJECT, pipeline_id=ORIGIN, job_id="10",
                             idempotency_key=r1.idempotency_key, new_pipeline_id="1000")),
        ("1000", link),
        ("1000", job(20, pipeline_id="1000")),
        (ORIGIN, r2),
        ("1001", job(30, pipeline_id="1001")),
        (ORIGIN, r3),
    ]  # fmt: skip
    report = verify(recorded(log))
    assert report.requests == 3 and report.pipelines == 3
    assert list(report.states) == [pipeline_stream("gitlab", PROJECT, ORIGIN)]
    assert [v.key for v in report.violations] == [r3.idempotency_key]
    assert "had 2 system retries, limit 2" in report.violations[0].why
    # The fast path (streams folded on their own) finds the chain and leaves it to verify.
    per_stream: dict[str, BudgetState] = {}
    for e in recorded(log):
        per_stream.setdefault(e.stream, BudgetState()).feed((e,))
    assert multi_stream_chains(per_stream) == [
        sorted(pipeline_stream("gitlab", PROJECT, p) for p in (ORIGIN, "1000", "1001"))
    ]


# --- a rerun is a new pipeline on the tip of the ref (GitLab) ---------------------------------


@pytest.mark.parametrize("action", ["rerun_with_resources", "recreate_pipeline"])
def test_a_rerun_of_a_commit_the_branch_moved_past_is_superseded(action: str) -> None:
    v = verdict(10, "build", "oom", action=action)
    j = job(10, sha="abc123abc123abc", ref="main")
    d = decide(fold_budget([j]), v, policy(), j, NOW, ref_head="def456def456def")
    assert isinstance(d, RetrySkipped) and d.reason == "superseded"
    assert d.detail == (
        "main moved past the failed commit abc123abc123 (now def456def456): the pipeline of "
        "the newer commit runs build anyway"
    )
    gone = decide(fold_budget([j]), v, policy(), j, NOW, ref_head=None)
    assert isinstance(gone, RetrySkipped) and gone.detail == "main no longer exists"


def test_policy_may_rerun_on_the_tip_anyway_and_the_decision_says_so() -> None:
    p = parse_policy(
        "version = 1\n[default]\nrecreate_on_moved_ref = true\n[default.resources]\n"
        "base_memory_mb = 1024\nmemory_cap_mb = 8192\n"
    )
    j = job(10, sha="abc123abc123abc", ref="main")
    d = decide(fold_budget([j]), oom(10, ORIGIN), p, j, NOW, ref_head="def456def456def")
    assert isinstance(d, RetryRequested) and d.detail is not None
    assert d.detail.startswith("GitLab runs it as a new pipeline on the tip of main (main moved")
    assert d.detail.endswith("with KUBERNETES_MEMORY_LIMIT=2048Mi")


def test_on_its_own_commit_a_gitlab_rerun_still_says_what_it_does() -> None:
    j = job(10, sha="abc123", ref="main")
    d = decide(fold_budget([j]), oom(10, ORIGIN, died_at=1024), policy(), j, NOW, ref_head="abc123")
    assert isinstance(d, RetryRequested)
    assert d.detail == (
        "GitLab runs it as a new pipeline on the tip of main, with KUBERNETES_MEMORY_LIMIT=2048Mi"
    )
    # A retry in place (and anything nobody looked up) says nothing more.
    plain = decide(fold_budget([j]), verdict(10, "build", "preempted"), policy(), j, NOW)
    assert isinstance(plain, RetryRequested) and plain.detail is None
