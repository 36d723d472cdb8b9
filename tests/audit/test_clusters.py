"""Clusters of failures by signature (issue 15): the read model from real events, the API, the
CLI, the "Unexplained failures" page (also in headless Chromium), and the rule stubs, which must
load as rules that pass their own examples."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ciretry.audit import cli as audit_cli
from ciretry.audit import mount
from ciretry.audit.clusters import regex_for, rule_stub
from ciretry.audit.projector import Projector
from ciretry.audit.store import AuditStore
from ciretry.classify.rules import parse_rule_text
from ciretry.common.config import Config
from ciretry.common.events import (
    FailureSignature,
    JobFinished,
    NewEvent,
    OutcomeKind,
    OutcomeRecorded,
    VerdictReached,
    job_stream,
    pipeline_stream,
)
from ciretry.common.eventstore import EventStore
from ciretry.common.signature import signature_of

from .conftest import AUTH, TOKEN
from .test_api import check

MIRROR = [
    "2026-11-02T10:00:01.1Z fatal: unable to access 'https://mirror.example/x.git/': "
    "Failed to connect to mirror.example port 443 after 130913 ms: Connection timed out",
]
FLAKE = ["E   AssertionError: worker 3 did not report within 30s (pid 41277)"]
ASSERT = ["error: no matching function for call to 'addMetadata(long int)'"]


async def seed_clusters(store: EventStore) -> dict[str, FailureSignature]:
    sigs = {
        "mirror": signature_of(MIRROR, exit_code=128),
        "flake": signature_of(FLAKE, exit_code=1),
        "compile": signature_of(ASSERT, exit_code=2),
    }
    n = 0
    plan: list[tuple[str, str, str, str, OutcomeKind | None]] = [
        # (signature, pipeline, sha, user, outcome)
        *(("mirror", f"p{i}", f"s{i}", f"u{i % 3}", "passed_on_retry") for i in range(5)),
        ("flake", "p1", "s1", "u0", "failed_again_same"),
        ("flake", "p9", "s9", "u1", None),
        ("compile", "p1", "s1", "u0", None),
    ]
    for name, pipeline, sha, user, outcome in plan:
        n += 1
        job_id = str(1000 + n)
        job = JobFinished(source="gitlab", project="web", pipeline_id=pipeline, job_id=job_id,
                          job_name=f"test-{name}", status="failed", sha=sha, user=user,
                          runner=f"r-{n % 2}")  # fmt: skip
        await store.append_batch(
            [NewEvent(stream=pipeline_stream("gitlab", "web", pipeline), data=job)]
        )
        det = name == "compile"
        verdict = VerdictReached(
            source="gitlab", project="web", pipeline_id=pipeline, job_id=job_id,
            job_name=job.job_name, category="deterministic" if det else "unknown",
            retryable=False, budget="user", action="none", confidence=0.5,
            rules=("compile-error",) if det else (), signature=sigs[name],
        )  # fmt: skip
        recorded = NewEvent(stream=job_stream("gitlab", "web", job_id), data=verdict)
        await store.append_batch([recorded])
        if outcome is not None:
            await store.append_batch(
                [NewEvent(stream=job_stream("gitlab", "web", job_id), data=OutcomeRecorded(
                    source="gitlab", project="web", pipeline_id=pipeline, job_id=job_id,
                    job_name=job.job_name, outcome=outcome, verdict_event_id=recorded.event_id,
                    signature=sigs[name].id, sha=sha))]
            )  # fmt: skip
    await Projector(AuditStore(store)).catch_up()
    return sigs


async def test_clusters_rank_the_unexplained_by_impact(store: EventStore) -> None:
    sigs = await seed_clusters(store)
    app = web.Application()
    mount(app, store, Config(api_token=TOKEN))
    async with TestClient(TestServer(app)) as client:
        spec = await (await client.get("/api/v1/openapi.json")).json()
        r = await client.get("/api/v1/clusters?days=7", headers=AUTH)
        assert r.status == 200, await r.text()
        body = await r.json()
        check(spec, "/api/v1/clusters", "get", 200, body)
        assert [c["signature"] for c in body["clusters"]] == [sigs["mirror"].id, sigs["flake"].id]
        mirror, flake = body["clusters"]
        assert mirror["impact"] == {"jobs": 5, "pipelines": 5, "commits": 5, "people": 3}
        assert mirror["outcomes"]["passed_on_retry"] == 5 and mirror["outcomes"]["pass_rate"] == 1
        assert 0.5 < mirror["outcomes"]["pass_rate_low"] < 0.6  # Wilson, 5 of 5
        assert mirror["outcomes"]["pass_rate_high"] == 1
        assert mirror["trend"] == {"1d": 5, "7d": 5, "30d": 5}
        assert mirror["top_jobs"] == ["test-mirror"] and len(mirror["top_runners"]) == 2
        assert flake["outcomes"]["failed_again_same"] == 1
        assert "Failed to connect to mirror.example" in mirror["examples"][0]
        # The deterministic cluster shows with all=1 only; unauthenticated is refused.
        every = await (await client.get("/api/v1/clusters?all=1", headers=AUTH)).json()
        assert sigs["compile"].id in {c["signature"] for c in every["clusters"]}
        assert (await client.get("/api/v1/clusters")).status == 401
        bad = await client.get("/api/v1/clusters?days=0", headers=AUTH)
        assert bad.status == 400
        # Outcomes per rule (no rule explained these) and per runner, with the Wilson interval.
        r = await client.get("/api/v1/outcomes?days=7&by=job", headers=AUTH)
        body = await r.json()
        check(spec, "/api/v1/outcomes", "get", 200, body)
        by_job = {(i["rule"], i["key"]): i for i in body["items"]}
        mirror_row = by_job[(None, "test-mirror")]
        assert (mirror_row["failures"], mirror_row["passed_on_retry"]) == (5, 5)
        assert mirror_row["pass_rate_low"] > 0.5 and mirror_row["pass_rate_high"] == 1
        assert by_job[("compile-error", "test-compile")]["pass_rate"] is None
        assert by_job[(None, "test-flake")]["failed_again_same"] == 1
        bad = await client.get("/api/v1/outcomes?days=3", headers=AUTH)
        assert bad.status == 400
        page = await client.get("/clusters", headers=AUTH)
        html = await page.text()
        assert page.status == 200 and "Unexplained failures" in html
        assert sigs["mirror"].id in html and "make this a rule" in html


def test_the_rule_stub_loads_as_a_rule_that_passes_its_examples() -> None:
    clusters: list[dict[str, Any]] = []
    for name, lines in (("a", MIRROR), ("b", FLAKE), ("c", ASSERT)):
        sig = signature_of(lines)
        clusters.append({"signature": name, "text": sig.text, "examples": list(sig.examples)})
    for cluster in clusters:
        stub = rule_stub(cluster, clusters)
        assert stub is not None
        rules, _, _ = parse_rule_text('[meta]\nversion = "t"\n' + stub, "stub.toml")
        assert len(rules) == 1 and rules[0].examples_match  # checked when it loads
    assert regex_for("took <dur> on port <n>") == r"took\s+[\d.]+ ?\w+\s+on\s+port\s+[\d.,]+"


async def test_ciretry_clusters_prints_them(
    store: EventStore,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sigs = await seed_clusters(store)
    monkeypatch.setenv("CIRETRY_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CIRETRY_DATABASE_SCHEMA", store.schema)
    monkeypatch.setenv("COLUMNS", "250")
    parser = argparse.ArgumentParser(prog="ciretry")
    audit_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["clusters", "--json"])
    # The command calls asyncio.run itself, as `ciretry` does: give it a thread.
    assert await asyncio.to_thread(args.func, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clusters"][0]["signature"] == sigs["mirror"].id
    args = parser.parse_args(["audit", "outcomes", "--by", "runner"])
    assert await asyncio.to_thread(args.func, args) == 0
    assert "(no rule)" in capsys.readouterr().out
    args = parser.parse_args(["clusters", "--stubs"])
    assert await asyncio.to_thread(args.func, args) == 0
    text = capsys.readouterr().out
    assert "[[rule]]" in text and "test-mirror" in text
