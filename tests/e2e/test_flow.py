"""One failing GitLab job, end to end: webhook → verdict → decision → provider call → trace."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import aiohttp
import msgspec
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ciretry.common.events import (
    RetryIssued,
    RetryRequested,
    VerdictReached,
    job_stream,
    pipeline_stream,
)
from tests.support.metrics import sample

from .conftest import SECRET, SpanWaiter, Stack

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "gitlab_webhooks"
OOM_LOG = (
    b"\x1b[0KRunning with gitlab-runner 16.11.0\n"
    b"$ make -j8\n"
    b"cc -O2 -c big.c\n"
    b"ERROR: Job failed: command terminated with exit code 137\n"
)


def job_hook(job_id: int, pipeline_id: int, project_id: int) -> dict[str, object]:
    hook: dict[str, object] = copy.deepcopy(
        json.loads((FIXTURES / "go-gitlab__job.json").read_text())
    )
    hook.update(
        build_id=job_id,
        build_status="failed",
        build_failure_reason="script_failure",
        project_id=project_id,
        pipeline_id=pipeline_id,
        build_name="compile",
        sha="abc123",  # the tip of its ref at the fake provider: a rerun is not superseded
    )
    return hook


async def scrape(stack: Stack, service: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(stack.url(service, "/metrics")) as r:
        assert r.status == 200
        return await r.text()


async def post_hook(stack: Stack, hook: dict[str, object], delivery: str) -> int:
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            stack.url("ingest", "/webhooks/gitlab"),
            data=json.dumps(hook),
            headers={
                "Content-Type": "application/json",
                "X-Gitlab-Event": "Job Hook",
                "X-Gitlab-Token": SECRET,
                "X-Gitlab-Event-UUID": delivery,
            },
        )
        return resp.status


async def test_failing_job_is_classified_decided_and_rerun_with_more_memory_in_one_trace(
    stack: Stack, spans: InMemorySpanExporter, span_waiter: SpanWaiter
) -> None:
    stack.gitlab.add_job(5001, "compile", 77)
    stack.gitlab.traces[5001] = OOM_LOG
    before = {name: await scrape(stack, name) for name in ("ingest", "classify", "act")}
    async with stack.subscription("action", "RetryIssued") as issued:
        assert await post_hook(stack, job_hook(5001, 77, 42), "uuid-1") == 202
        assert await post_hook(stack, job_hook(5001, 77, 42), "uuid-1") == 200  # duplicate
        await asyncio.wait_for(issued.get(), 60)
    # RetryIssued is published from inside act's handler: wait for its span to end.
    await span_waiter.wait_for("consume VerdictReached")

    # The log records every step, once.
    (verdict,) = [
        e.data
        for e in await stack.store.read_stream(job_stream("gitlab", "42", "5001"))
        if isinstance(e.data, VerdictReached)
    ]
    assert verdict.category == "oom" and verdict.action == "rerun_with_resources"
    assert verdict.evidence[0].line == 4
    pipeline = [
        e.data for e in await stack.store.read_stream(pipeline_stream("gitlab", "42", "77"))
    ]
    (request,) = [e for e in pipeline if isinstance(e, RetryRequested)]
    (done,) = [e for e in pipeline if isinstance(e, RetryIssued)]
    assert request.resources is not None and request.resources.memory_limit_mb == 8192
    assert done.idempotency_key == request.idempotency_key and done.new_pipeline_id
    # The fake GitLab saw one pipeline creation carrying the doubled memory.
    (create,) = stack.gitlab.posts("/pipeline")
    variables = {v["key"]: v["value"] for v in create.body["variables"]}
    assert any("8192" in value for key, value in variables.items() if "MEMORY" in key)

    # One trace: webhook → classify → act decision → provider call, correctly parented.
    finished = spans.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)
    (webhook,) = [
        s
        for s in by_name["POST /webhooks/gitlab"]
        if s.attributes and s.attributes.get("http.response.status_code") == 202
    ]
    trace_id = webhook.context.trace_id
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}

    def parent_of(span):  # type: ignore[no-untyped-def]
        return by_id.get(span.parent.span_id) if span.parent else None

    (consume_job,) = [s for s in in_trace if s.name == "consume JobFinished"]
    assert parent_of(consume_job) is webhook
    (scan,) = [s for s in in_trace if s.name == "rule scan"]
    assert parent_of(scan) is consume_job
    assert scan.attributes and scan.attributes["ciretry.verdict.category"] == "oom"
    (consume_verdict,) = [s for s in in_trace if s.name == "consume VerdictReached"]
    assert parent_of(consume_verdict) is consume_job
    (decide,) = [s for s in in_trace if s.name == "budget decide"]
    assert parent_of(decide) is consume_verdict
    assert decide.attributes and decide.attributes["ciretry.decision"] == "rerun_with_resources"
    calls = [
        s
        for s in in_trace
        if s.name == "POST"
        and s.attributes
        and str(s.attributes.get("url.path", "")).endswith("/pipeline")
    ]
    assert len(calls) == 1
    ancestor = parent_of(calls[0])
    while ancestor is not None and ancestor is not decide:
        ancestor = parent_of(ancestor)
    assert ancestor is decide
    # /metrics on each service counts the run (one process here, so compare deltas).
    after = {name: await scrape(stack, name) for name in ("ingest", "classify", "act")}

    def delta(service: str, metric: str, **labels: str) -> float:
        return sample(after[service], metric, **labels) - sample(before[service], metric, **labels)

    ingested = delta("ingest", "ciretry_events_ingested_total", source="gitlab", type="JobFinished")
    assert ingested == 1
    assert delta("ingest", "ciretry_events_duplicates_total", source="gitlab") == 1
    assert delta("classify", "ciretry_verdicts_total", category="oom") == 1
    assert delta("classify", "ciretry_log_scanned_bytes_total") == len(OOM_LOG)
    assert delta("act", "ciretry_retries_total", outcome="requested") == 1
    assert delta("act", "ciretry_retries_total", outcome="issued") == 1
    assert delta("act", "ciretry_retries_total", outcome="skipped") == 0
    assert delta("act", "ciretry_provider_call_duration_seconds_count", provider="gitlab") >= 2

    # No secret leaks into span attributes.
    text = msgspec.json.encode([dict(s.attributes or {}) for s in finished]).decode()
    assert SECRET not in text and "glpat-e2e-token" not in text
