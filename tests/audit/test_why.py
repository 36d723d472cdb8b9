""" "Why was this job retried (or not)?" for histories appended to the real store: a retried
job, an OOM rerun, and a skip for every reason act records. Each answer must name the reason,
cite the verdict's rules and the budget numbers of the decision."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ciretry.audit.projector import Projector
from ciretry.audit.queries import Audit
from ciretry.audit.store import AuditStore
from ciretry.common.events import (
    BudgetSnapshot,
    Evidence,
    JobFinished,
    RetryParked,
    RetrySkipped,
    VerdictReached,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore

from .conftest import AUTH
from .helpers import History, Seeded, gitlab_values

Client = TestClient[web.Request, web.Application]


async def why(store: EventStore, job_id: str, project: str = "380") -> dict[str, Any]:
    await Projector(AuditStore(store)).catch_up()
    out = await Audit(AuditStore(store)).why("gitlab", project, job_id)
    assert out is not None
    return out


async def test_retried_job(client: Client, seeded: Seeded) -> None:
    r = await client.get("/api/v1/jobs/github/Codertocat%2FHello-World/289782451/why", headers=AUTH)
    body = await r.json()
    s = body["summary"]
    assert "infra_network" in s and "gha.network_reset" in s
    assert "line 57: 'Connection reset by peer'" in s
    assert "act requested retry_job on the system budget" in s
    assert "used 0 of 2 system retries" in s
    assert "0 of 3 retries allowed for its 4 jobs" in s
    assert "issued as job 289782452" in s and "(job 289782452) passed" in s
    f = body["facts"]
    assert f["decision"]["budget"] == {
        "job_attempts": 0, "job_limit": 2, "pipeline_retries": 0, "pipeline_limit": 3,
        "pipeline_jobs": 4, "deterministic_failures": 0,
    }  # fmt: skip
    assert f["verdict"]["rules"] == ["gha.network_reset"]
    assert f["execution"]["status"] == "issued"
    assert f["retry_outcome"] == {"outcome": "passed", "job_id": "289782452"}


async def test_oom_rerun(store: EventStore, seeded: Seeded) -> None:
    body = await why(store, "1977")
    s = body["summary"]
    assert "judged it oom" in s and "k8s.oom_killed, exit.137" in s
    assert "pod_reason=OOMKilled" in s and "exit code 137" in s
    assert "act requested rerun_with_resources" in s
    assert "memory request 8192 MB / limit 8192 MB" in s
    assert "CPU request 2000m / limit 2000m" in s
    assert "used 0 of 2 system retries" in s
    assert "(job 1978) failed" in s
    assert body["facts"]["decision"]["resources"] == {
        "memory_request_mb": 8192, "memory_limit_mb": 8192, "cpu_request_millis": 2000,
        "cpu_limit_millis": 2000,
    }  # fmt: skip


# reason -> (verdict fields, act's detail, snapshot, phrases the answer must contain)
SKIPS: dict[str, tuple[dict[str, Any], str, BudgetSnapshot, tuple[str, ...]]] = {
    "not_retryable": (
        {"category": "deterministic", "retryable": False, "budget": "user", "action": "none",
         "rules": ("log.compile_error",)},
        "category deterministic is not retryable (classifier action none)",
        BudgetSnapshot(job_attempts=0, job_limit=0, pipeline_retries=1, pipeline_limit=3,
                       pipeline_jobs=12, deterministic_failures=0),
        ("did not retry it (not_retryable)", "category deterministic is not retryable",
         "log.compile_error", "used 0 of 0 user retries", "1 of 3 retries allowed for its 12 jobs"),
    ),
    "job_budget_exhausted": (
        {"category": "preempted", "retryable": True, "budget": "system",
         "action": "retry_job", "rules": ("k8s.preempted",)},
        "deploy: 2 retries of 2 allowed (system budget)",
        BudgetSnapshot(job_attempts=2, job_limit=2, pipeline_retries=2, pipeline_limit=5,
                       pipeline_jobs=100),
        ("(job_budget_exhausted)", "already used 2 of its 2 system retries", "k8s.preempted",
         "2 of 5 retries allowed for its 100 jobs"),
    ),
    "pipeline_budget_exhausted": (
        {"category": "infra_network", "retryable": True, "budget": "system",
         "action": "retry_job", "rules": ("log.network_reset",)},
        "3 retries of 3 allowed for 12 jobs",
        BudgetSnapshot(job_attempts=0, job_limit=2, pipeline_retries=3, pipeline_limit=3,
                       pipeline_jobs=12),
        ("(pipeline_budget_exhausted)", "already used 3 of the 3 retries allowed for its 12 jobs",
         "log.network_reset", "used 0 of 2 system retries"),
    ),
    "pipeline_mostly_broken": (
        {"category": "runner_system", "retryable": True, "budget": "system",
         "action": "retry_job", "rules": ("gitlab.runner_system_failure",)},
        "6 of 10 jobs failed deterministically",
        BudgetSnapshot(job_attempts=0, job_limit=2, pipeline_retries=0, pipeline_limit=3,
                       pipeline_jobs=10, deterministic_failures=6),
        ("(pipeline_mostly_broken)", "6 of the pipeline's 10 jobs failed deterministically",
         "gitlab.runner_system_failure", "6 jobs had failed deterministically"),
    ),
    "opted_out": (
        {"category": "flaky_test", "retryable": True, "budget": "user", "action": "retry_job",
         "rules": ("log.flaky_marker",)},
        "commit message carries '[ci-no-retry]'",
        BudgetSnapshot(job_attempts=0, job_limit=1, pipeline_retries=0, pipeline_limit=3,
                       pipeline_jobs=8),
        ("(opted_out)", "commit message carries '[ci-no-retry]'", "log.flaky_marker",
         "used 0 of 1 user retries"),
    ),
    "resource_cap_reached": (
        {"category": "oom", "retryable": True, "budget": "system",
         "action": "rerun_with_resources", "rules": ("k8s.oom_killed",)},
        "memory 16384 MB already at the cap of 16384 MB",
        BudgetSnapshot(job_attempts=1, job_limit=2, pipeline_retries=1, pipeline_limit=3,
                       pipeline_jobs=8),
        ("(resource_cap_reached)", "16384 MB already at the cap of 16384 MB", "k8s.oom_killed",
         "used 1 of 2 system retries", "1 of 3 retries allowed for its 8 jobs"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("reason", sorted(SKIPS))
async def test_skipped_job_names_reason_rule_and_numbers(store: EventStore, reason: str) -> None:
    fields, detail, snapshot, phrases = SKIPS[reason]
    gl = gitlab_values()
    h = History(store)
    j = await h.job(source="gitlab", project=gl["project"], pipeline_id="77", job_id="5001",
                    job_name="deploy", ref=gl["ref"])  # fmt: skip
    assert isinstance(j.data, JobFinished)
    v = await h.verdict(j.data, evidence=(Evidence(rule=fields["rules"][0], line=3, text="x"),),
                        **fields)  # fmt: skip
    await h.skipped(v, reason, detail, snapshot,  # type: ignore[arg-type]
                    would_action=None if reason == "not_retryable" else fields["action"])  # fmt: skip
    body = await why(store, "5001")
    for phrase in phrases:
        assert phrase in body["summary"], (phrase, body["summary"])
    d = body["facts"]["decision"]
    assert (d["kind"], d["reason"], d["detail"]) == ("skipped", reason, detail)
    assert d["budget"]["job_attempts"] == snapshot.job_attempts
    assert d["budget"]["pipeline_limit"] == snapshot.pipeline_limit
    assert body["facts"]["verdict"]["rules"] == list(fields["rules"])
    assert body["facts"]["execution"] is None


async def test_dry_run(store: EventStore) -> None:
    """A dry-run decision is a RetryRequested(dry_run) closed by a RetrySkipped(dry_run)."""
    h = History(store)
    j = await h.job(source="gitlab", project="380", pipeline_id="78", job_id="6001",
                    job_name="e2e")  # fmt: skip
    assert isinstance(j.data, JobFinished)
    v = await h.verdict(j.data, category="infra_network", retryable=True, budget="system",
                        action="retry_job", rules=("log.dns_failure",))  # fmt: skip
    snap = BudgetSnapshot(job_attempts=0, job_limit=2, pipeline_retries=1, pipeline_limit=3,
                          pipeline_jobs=20)  # fmt: skip
    req = await h.requested(v, snap, dry_run=True)
    assert isinstance(v.data, VerdictReached)
    await h.add(req.stream, RetrySkipped(
        source="gitlab", project="380", pipeline_id="78", job_id="6001", job_name="e2e",
        reason="dry_run", detail=f"{req.data.idempotency_key} dry run: would retry_job",  # type: ignore[attr-defined]
        category="infra_network", snapshot=snap, would_action="retry_job",
        verdict_event_id=v.event_id,
    ))  # fmt: skip
    body = await why(store, "6001")
    s = body["summary"]
    assert "dry-run mode (dry_run)" in s and "CI API was not called" in s
    assert "log.dns_failure" in s and "used 0 of 2 system retries" in s
    assert "1 of 3 retries allowed for its 20 jobs" in s
    d = body["facts"]["decision"]
    assert (d["kind"], d["reason"], d["dry_run"]) == ("requested", "dry_run", True)
    assert d["detail"].endswith("dry run: would retry_job")
    assert body["facts"]["execution"]["status"] == "dry_run"
    assert body["facts"]["retry_outcome"] is None


async def test_dry_run_skip_reason_alone(store: EventStore) -> None:
    """A RetrySkipped(dry_run) without its request (log cut, older writer) still explains."""
    h = History(store)
    j = await h.job(source="gitlab", project="380", pipeline_id="79", job_id="6002",
                    job_name="e2e")  # fmt: skip
    assert isinstance(j.data, JobFinished)
    v = await h.verdict(j.data, category="preempted", retryable=True, budget="system",
                        action="retry_job", rules=("k8s.preempted",))  # fmt: skip
    await h.skipped(v, "dry_run", "k dry run: would retry_job",
                    BudgetSnapshot(job_attempts=0, job_limit=1, pipeline_retries=0,
                                   pipeline_limit=3, pipeline_jobs=5),
                    would_action="retry_job")  # fmt: skip
    s = (await why(store, "6002"))["summary"]
    assert "dry-run mode (dry_run)" in s and "k8s.preempted" in s and "0 of 1 system" in s


async def test_no_verdict_yet(store: EventStore) -> None:
    h = History(store)
    await h.job(source="gitlab", project="380", pipeline_id="80", job_id="7001", job_name="x")
    body = await why(store, "7001")
    assert "has not reached a verdict" in body["summary"]
    assert body["facts"]["decision"] is None


async def test_a_parked_job_says_which_storm_holds_it_then_the_retry_after_it(
    store: EventStore,
) -> None:
    h = History(store)
    j = await h.job(source="gitlab", project="380", pipeline_id="80", job_id="6003",
                    job_name="image")  # fmt: skip
    assert isinstance(j.data, JobFinished)
    v = await h.verdict(j.data, category="infra_network", retryable=True, budget="system",
                        action="retry_job", rules=("http-5xx-from-service",))  # fmt: skip
    snap = BudgetSnapshot(job_attempts=0, job_limit=3, pipeline_retries=0, pipeline_limit=5,
                          pipeline_jobs=1)  # fmt: skip
    await h.add(pipeline_stream("gitlab", "380", "80"), RetryParked(
        source="gitlab", project="380", pipeline_id="80", job_id="6003", job_name="image",
        category="infra_network", storm_id="storm:sig-v1:ab12:1", signature="sig-v1:ab12",
        would_action="retry_job", verdict_event_id=v.event_id, snapshot=snap,
        detail="retry storm storm:sig-v1:ab12:1: retried after the storm ends",
    ))  # fmt: skip
    body = await why(store, "6003")
    s = body["summary"]
    assert "parked it (retry storm storm:sig-v1:ab12:1)" in s and "no budget is spent" in s
    assert "used 0 of 3 system retries" in s
    d = body["facts"]["decision"]
    assert (d["kind"], d["storm_id"], d["action"]) == ("parked", "storm:sig-v1:ab12:1", "retry_job")
    assert body["facts"]["execution"] is None
    row = (await Audit(AuditStore(store)).job("gitlab", "380", "6003")) or {}
    assert row["job"]["decision"] == "parked"

    await h.requested(v, snap)  # the storm ended: decided again, on the usual budget
    body = await why(store, "6003")
    assert body["facts"]["decision"]["kind"] == "requested"
    assert "act requested retry_job on the system budget" in body["summary"]
    assert "parked" not in body["summary"]
