"""``ciretry rules backtest``: stored failures judged by a candidate rule set; conflicts with
known outcomes fail it (exit 1), so it can gate a rules change in CI."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from pathlib import Path

import pytest

from ciretry.classify.backtest import StoredFailure, backtest
from ciretry.classify.classifier import RuleClassifier
from ciretry.classify.cli import cmd_rules_backtest, parse_since
from ciretry.classify.logsource import LogFetched
from ciretry.classify.rules import load_ruleset
from ciretry.common.events import (
    JobFinished,
    NewEvent,
    OutcomeKind,
    OutcomeRecorded,
    VerdictReached,
    job_stream,
)
from ciretry.common.eventstore import EventStore

RESET = (
    b"$ ./fetch-assets\nassetsync: mirror handshake aborted mid-stream (peer went away)\n"
    b"ERROR: Job failed: exit code 1\n"
)
SYMBOL = b"$ make\nsrc/a.c:3: error: unknown symbol frobnicate\nERROR: Job failed: exit code 2\n"
#: A candidate: one good rule (the network reset is spurious), one bad (the symbol is a bug).
CANDIDATE = """
[[rule]]
id = "assetsync-handshake"
description = "assetsync lost its mirror mid-stream"
category = "infra_network"
budget = "system"
priority = 450
confidence = 0.8
log = 'assetsync: mirror handshake aborted'
[rule.examples]
match = ["assetsync: mirror handshake aborted mid-stream (peer went away)"]
no_match = ["assetsync: 200 assets in sync"]
"""
BAD = """
[[rule]]
id = "symbol-flake"
description = "wrongly thinks a missing symbol is a flake"
category = "flaky_test"
budget = "system"
retryable = true
priority = 560
confidence = 0.6
log = 'error: unknown symbol'
[rule.examples]
match = ["src/a.c:3: error: unknown symbol frobnicate"]
no_match = ["all symbols resolved"]
"""


def _verdict(log: bytes, job_id: str) -> VerdictReached:
    job = JobFinished(source="gitlab", project="p", pipeline_id="1", job_id=job_id,
                      job_name="build", status="failed", exit_code=1)  # fmt: skip
    return RuleClassifier(load_ruleset()).classify(job, [], LogFetched(chunks=(log,)))


def _stored() -> list[tuple[VerdictReached, OutcomeKind]]:
    return [(_verdict(RESET, "1"), "passed_on_retry"), (_verdict(SYMBOL, "2"), "failed_again_same")]


def test_the_candidate_gains_the_retry_and_the_bad_rule_conflicts(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(CANDIDATE)
    stored = [
        StoredFailure(v.job_event_id or __import__("uuid").uuid4(), v, o) for v, o in _stored()
    ]
    assert all(not v.retryable for v, _ in _stored())  # the shipped rules leave both alone
    report = backtest(stored, load_ruleset([good]))
    assert [c.rule for c in report.gained] == ["assetsync-handshake"] and report.conflicts == []
    assert report.gained_by_rule == {"assetsync-handshake": 1}
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    report = backtest(stored, load_ruleset([good, bad]))
    assert [c.rule for c in report.conflicts] == ["symbol-flake"]
    assert report.retries_added == 2


def test_since() -> None:
    assert parse_since("30d").days == 30 and parse_since("12h").seconds == 12 * 3600
    with pytest.raises(ValueError):
        parse_since("soon")


async def test_ciretry_rules_backtest_exit_codes(
    store: EventStore, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for verdict, outcome in _stored():
        recorded = NewEvent(stream=job_stream("gitlab", "p", verdict.job_id), data=verdict)
        await store.append_batch([recorded])
        await store.append_batch([NewEvent(
            stream=job_stream("gitlab", "p", verdict.job_id),
            data=OutcomeRecorded(source="gitlab", project="p", pipeline_id="1",
                                 job_id=verdict.job_id, job_name="build", outcome=outcome,
                                 verdict_event_id=recorded.event_id),
        )])  # fmt: skip
    monkeypatch.setenv("CIRETRY_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CIRETRY_DATABASE_SCHEMA", store.schema)
    (tmp_path / "good.toml").write_text(CANDIDATE)
    (tmp_path / "bad.toml").write_text(BAD)

    def run(*paths: str, as_json: bool = False) -> tuple[int, str]:
        args = argparse.Namespace(paths=[tmp_path / p for p in paths], since="30d",
                                  no_default_rules=False, json=as_json)  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        code = cmd_rules_backtest(args, out, err)
        return code, out.getvalue() + err.getvalue()

    code, text = await asyncio.to_thread(run, "good.toml")
    assert code == 0 and "1 more retries" in text and "assetsync-handshake" in text
    code, text = await asyncio.to_thread(run, "good.toml", "bad.toml", as_json=True)
    body = json.loads(text)
    assert code == 1 and [c["rule"] for c in body["conflicts"]] == ["symbol-flake"]
    (tmp_path / "broken.toml").write_text("[[rule]]\nid = 'x'\n")
    code, text = await asyncio.to_thread(run, "broken.toml")
    assert code == 2 and "error" in text
