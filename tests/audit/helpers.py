"""Event histories for audit tests, built from the real event types and appended to the real
streams (job facts to the pipeline stream, verdicts and pod facts to the job stream), with
values taken from the shared fixtures' payloads where practical:

* GitHub ``workflow_job__completed.failure.with-organization``: repository
  ``Codertocat/Hello-World``, run 2202229078, job 289782451 ``linters`` on ``GitHub Actions 5``;
* GitLab ``gitlab4j__job-event``: project 380, job 1977 ``test`` (stage test), ref
  ``gitlab-script-trigger``, sha 2293ada6…, failure reason ``script_failure``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciretry.common.events import (
    BudgetSnapshot,
    Event,
    Evidence,
    JobFinished,
    NewEvent,
    PipelineFinished,
    PodTerminated,
    RecordedEvent,
    Resources,
    RetryIssued,
    RetryRequested,
    RetrySkipped,
    SkipReason,
    VerdictDisputed,
    VerdictReached,
    job_stream,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"


def _fixture(path: str) -> dict[str, Any]:
    return json.loads((FIXTURES / path).read_text())  # type: ignore[no-any-return]


def github_values() -> dict[str, Any]:
    d = _fixture(
        "github_workflow_job/workflow_job__completed.failure.with-organization.payload.json"
    )
    j = d["workflow_job"]
    return {
        "project": d["repository"]["full_name"],
        "pipeline_id": str(j["run_id"]),
        "job_id": str(j["id"]),
        "job_name": j["name"],
        "runner": j["runner_name"],
        "ref": j["head_branch"],
        "sha": j["head_sha"],
        "attempt": j["run_attempt"],
    }


def gitlab_values() -> dict[str, Any]:
    d = _fixture("gitlab_webhooks/gitlab4j__job-event.json")
    return {
        "project": str(d["project_id"]),
        "job_id": str(d["job_id"]),
        "job_name": d["job_name"],
        "stage": d["job_stage"],
        "ref": d["ref"],
        "sha": d["sha"],
        "failure_reason": d["job_failure_reason"],
        "user": d["user"]["name"],
    }


@dataclass
class History:
    """Appends events to their proper streams and remembers what it appended."""

    store: EventStore
    recorded: list[RecordedEvent] = field(default_factory=list)

    async def add(self, stream: str, data: Event) -> RecordedEvent:
        (result,) = await self.store.append_batch([NewEvent(stream=stream, data=data)])
        self.recorded.append(result.event)
        return result.event

    async def job(self, **kw: Any) -> RecordedEvent:
        j = JobFinished(**{"status": "failed", **kw})
        return await self.add(pipeline_stream(j.source, j.project, j.pipeline_id), j)

    async def pod(self, **kw: Any) -> RecordedEvent:
        p = PodTerminated(**kw)
        return await self.add(job_stream(p.source, p.project, p.job_id), p)

    async def verdict(self, job: JobFinished, **kw: Any) -> RecordedEvent:
        fields: dict[str, Any] = {
            "source": job.source, "project": job.project, "pipeline_id": job.pipeline_id,
            "job_id": job.job_id, "job_name": job.job_name, "confidence": 0.9,
            "signals": {"status": job.status},
        }  # fmt: skip
        fields.update(kw)
        v = VerdictReached(**fields)
        return await self.add(job_stream(v.source, v.project, v.job_id), v)

    async def requested(
        self, verdict: RecordedEvent, snapshot: BudgetSnapshot, **kw: Any
    ) -> RecordedEvent:
        v = verdict.data
        assert isinstance(v, VerdictReached)
        action = kw.pop("action", v.action)
        r = RetryRequested(
            source=v.source, project=v.project, pipeline_id=v.pipeline_id, job_id=v.job_id,
            job_name=v.job_name, action=action,
            idempotency_key=f"act:{v.source}:{v.project}:{v.job_id}:{action}",
            category=v.category, budget=v.budget, snapshot=snapshot,
            verdict_event_id=verdict.event_id, policy="default:default", **kw,
        )  # fmt: skip
        return await self.add(pipeline_stream(v.source, v.project, v.pipeline_id), r)

    async def skipped(
        self,
        verdict: RecordedEvent,
        reason: SkipReason,
        detail: str,
        snapshot: BudgetSnapshot,
        **kw: Any,
    ) -> RecordedEvent:
        v = verdict.data
        assert isinstance(v, VerdictReached)
        s = RetrySkipped(
            source=v.source, project=v.project, pipeline_id=v.pipeline_id, job_id=v.job_id,
            job_name=v.job_name, reason=reason, detail=detail, category=v.category,
            snapshot=snapshot, verdict_event_id=verdict.event_id, policy="default:default", **kw,
        )  # fmt: skip
        return await self.add(pipeline_stream(v.source, v.project, v.pipeline_id), s)

    async def issued(self, request: RecordedEvent, new_job_id: str) -> RecordedEvent:
        r = request.data
        assert isinstance(r, RetryRequested)
        i = RetryIssued(
            source=r.source, project=r.project, pipeline_id=r.pipeline_id, job_id=r.job_id,
            idempotency_key=r.idempotency_key, new_job_id=new_job_id,
        )  # fmt: skip
        return await self.add(pipeline_stream(r.source, r.project, r.pipeline_id), i)

    async def dispute(self, verdict: RecordedEvent, who: str, why: str) -> RecordedEvent:
        return await self.add(
            verdict.stream, VerdictDisputed(verdict_event_id=verdict.event_id, who=who, why=why)
        )


@dataclass
class Seeded:
    """What ``seed`` appended, and the numbers the dashboard must show for it."""

    ids: dict[str, RecordedEvent]
    categories: dict[str, int]
    retryable: dict[str, int]
    rules: dict[str, int]
    passed: int
    failed: int
    requested: int
    issued: int
    skipped: dict[str, int]


async def seed(store: EventStore) -> Seeded:
    """A realistic run over two providers: a network retry that passed, an OOM rerun with more
    memory that failed again, and skips for a compile error, an exhausted job budget and an
    exhausted pipeline budget; one verdict disputed."""
    h = History(store)
    gh = github_values()
    gl = gitlab_values()
    ids: dict[str, RecordedEvent] = {}

    # GitHub: network failure, retried, the retry passed.
    j = await h.job(source="github", project=gh["project"], pipeline_id=gh["pipeline_id"],
                    job_id=gh["job_id"], job_name=gh["job_name"], runner=gh["runner"],
                    ref=gh["ref"], sha=gh["sha"], attempt=gh["attempt"],
                    failure_reason="runner_system_failure", exit_code=1)  # fmt: skip
    assert isinstance(j.data, JobFinished)
    ids["gh_job"] = j
    v = await h.verdict(
        j.data, category="infra_network", retryable=True, budget="system", action="retry_job",
        rules=("gha.network_reset",),
        evidence=(Evidence(rule="gha.network_reset", line=57, text="Connection reset by peer"),),
    )  # fmt: skip
    ids["gh_verdict"] = v
    r = await h.requested(v, BudgetSnapshot(job_attempts=0, job_limit=2, pipeline_retries=0,
                                            pipeline_limit=3, pipeline_jobs=4))  # fmt: skip
    ids["gh_request"] = r
    await h.issued(r, str(int(gh["job_id"]) + 1))
    # A GitHub re-run is a new job id in the same run, with the next run_attempt.
    ids["gh_retry"] = await h.job(
        source="github", project=gh["project"], pipeline_id=gh["pipeline_id"],
        job_id=str(int(gh["job_id"]) + 1), job_name=gh["job_name"], runner=gh["runner"],
        ref=gh["ref"],
        attempt=gh["attempt"] + 1, status="success",
    )  # fmt: skip

    # GitLab project 380, pipeline 9001.
    common = {"source": "gitlab", "project": gl["project"], "pipeline_id": "9001",
              "ref": gl["ref"], "sha": gl["sha"], "user": gl["user"]}  # fmt: skip
    oom = await h.job(**common, job_id=gl["job_id"], job_name=gl["job_name"], stage=gl["stage"],
                      exit_code=137, runner="k8s-runner-1")  # fmt: skip
    assert isinstance(oom.data, JobFinished)
    ids["oom_job"] = oom
    await h.pod(namespace="ci", pod=f"runner-{gl['job_id']}", source="gitlab",
                project=gl["project"], job_id=gl["job_id"], container_reason="OOMKilled",
                exit_code=137)  # fmt: skip
    ov = await h.verdict(
        oom.data, category="oom", retryable=True, budget="system",
        action="rerun_with_resources", rules=("k8s.oom_killed", "exit.137"),
        evidence=(Evidence(rule="k8s.oom_killed", signal="pod_reason=OOMKilled"),
                  Evidence(rule="exit.137", signal="exit_code=137")),
    )  # fmt: skip
    ids["oom_verdict"] = ov
    orq = await h.requested(
        ov, BudgetSnapshot(job_attempts=0, job_limit=2, pipeline_retries=0, pipeline_limit=3,
                           pipeline_jobs=4),
        resources=Resources(memory_request_mb=8192, memory_limit_mb=8192,
                            cpu_request_millis=2000, cpu_limit_millis=2000),
    )  # fmt: skip
    ids["oom_request"] = orq
    new_id = str(int(gl["job_id"]) + 1)
    await h.issued(orq, new_id)
    ids["oom_retry"] = await h.job(**common, job_id=new_id, job_name=gl["job_name"],
                                   stage=gl["stage"], exit_code=1, runner="k8s-runner-2",
                                   failure_reason=gl["failure_reason"])  # fmt: skip

    build = await h.job(**common, job_id="1980", job_name="build", runner="k8s-runner-1",
                        failure_reason=gl["failure_reason"], exit_code=2)  # fmt: skip
    assert isinstance(build.data, JobFinished)
    bv = await h.verdict(
        build.data, category="deterministic", retryable=False, budget="user", action="none",
        rules=("log.compile_error",),
        evidence=(Evidence(rule="log.compile_error", line=812,
                           text="error: expected ';' before '}' token"),),
    )  # fmt: skip
    ids["build_verdict"] = bv
    await h.skipped(bv, "not_retryable",
                    "category deterministic is not retryable (classifier action none)",
                    BudgetSnapshot(job_attempts=0, job_limit=0, pipeline_retries=1,
                                   pipeline_limit=3, pipeline_jobs=4))  # fmt: skip
    await h.dispute(bv, "alice", "the compiler crashed with SIGSEGV: infrastructure")

    lint = await h.job(**common, job_id="1981", job_name="lint", runner="k8s-runner-2")
    assert isinstance(lint.data, JobFinished)
    lv = await h.verdict(lint.data, category="flaky_test", retryable=True, budget="user",
                         action="retry_job", rules=("log.flaky_marker",))  # fmt: skip
    ids["lint_verdict"] = lv
    await h.skipped(lv, "job_budget_exhausted",
                    "lint: 0 retries of 0 allowed (user budget)",
                    BudgetSnapshot(job_attempts=0, job_limit=0, pipeline_retries=1,
                                   pipeline_limit=3, pipeline_jobs=4),
                    would_action="retry_job")  # fmt: skip

    deploy = await h.job(**common, job_id="1982", job_name="deploy", runner="k8s-runner-1",
                         failure_reason="runner_system_failure")  # fmt: skip
    assert isinstance(deploy.data, JobFinished)
    dv = await h.verdict(deploy.data, category="runner_system", retryable=True,
                         budget="system", action="retry_job",
                         rules=("gitlab.runner_system_failure",))  # fmt: skip
    ids["deploy_verdict"] = dv
    await h.skipped(dv, "pipeline_budget_exhausted", "3 retries of 3 allowed for 4 jobs",
                    BudgetSnapshot(job_attempts=0, job_limit=2, pipeline_retries=3,
                                   pipeline_limit=3, pipeline_jobs=4),
                    would_action="retry_job")  # fmt: skip
    await h.add(
        pipeline_stream("gitlab", gl["project"], "9001"),
        PipelineFinished(source="gitlab", project=gl["project"], pipeline_id="9001",
                         status="failed", ref=gl["ref"], sha=gl["sha"]),
    )  # fmt: skip
    return Seeded(
        ids=ids,
        categories={"infra_network": 1, "oom": 1, "deterministic": 1, "flaky_test": 1,
                    "runner_system": 1},
        retryable={"infra_network": 1, "oom": 1, "flaky_test": 1, "runner_system": 1},
        rules={"gha.network_reset": 1, "k8s.oom_killed": 1, "exit.137": 1,
               "log.compile_error": 1, "log.flaky_marker": 1,
               "gitlab.runner_system_failure": 1},
        passed=1, failed=1, requested=2, issued=2,
        skipped={"not_retryable": 1, "job_budget_exhausted": 1,
                 "pipeline_budget_exhausted": 1},
    )  # fmt: skip


def new_id() -> uuid.UUID:
    return uuid.uuid4()
