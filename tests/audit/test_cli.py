"""``ciretry audit …`` subcommands (registered by the lead's CLI) against a seeded schema."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from ciretry.audit import cli
from ciretry.common.events import NewEvent, StormStarted, storm_stream
from ciretry.common.eventstore import EventStore

from .helpers import Seeded


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ciretry")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pg_dsn: str, store: EventStore) -> None:
    monkeypatch.setenv("CIRETRY_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CIRETRY_DATABASE_SCHEMA", store.schema)
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps long cells at 80 columns otherwise


async def run(*argv: str) -> int:
    args = parse(*argv)
    # The commands call asyncio.run themselves, as `ciretry` does: give them a thread.
    return int(await asyncio.to_thread(args.func, args))


async def test_why_json(env: None, seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("audit", "why", "gitlab", "380", "1980", "--json") == 0
    body = json.loads(capsys.readouterr().out)
    assert body["facts"]["decision"]["reason"] == "not_retryable"
    assert "log.compile_error" in body["summary"]


async def test_tables(env: None, seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("audit", "job", "github", "Codertocat/Hello-World", "289782451") == 0
    out = capsys.readouterr().out
    assert "gha.network_reset" in out and "RetryIssued" in out
    assert await run("audit", "pipeline", "gitlab", "380", "9001") == 0
    assert "pipeline_budget_exhausted" in capsys.readouterr().out
    assert await run("audit", "stats", "rule", "--bucket", "hour") == 0
    assert "log.compile_error" in capsys.readouterr().out
    assert await run("audit", "events", "--type", "VerdictDisputed", "--json") == 0
    assert [e["type"] for e in json.loads(capsys.readouterr().out)["events"]] == ["VerdictDisputed"]


async def test_not_found_and_bad_input(
    env: None, seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run("audit", "why", "gitlab", "380", "999999") == 1
    with pytest.raises(SystemExit) as exc:
        await run("audit", "events", "--limit", "5000")
    assert exc.value.code == 2


async def test_rebuild(env: None, seeded: Seeded, store: EventStore) -> None:
    args = argparse.Namespace()
    assert await asyncio.to_thread(cli.run_rebuild, args) == 0
    async with store.connection() as conn:
        assert await conn.fetchval("SELECT position FROM projection_position") == (
            await store.last_position()
        )


async def test_storms(env: None, store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    start = StormStarted(
        storm_id="storm:sig-v1:ab12:1", signature="sig-v1:ab12", category="infra_network",
        example="pull: 503 Service Unavailable", pipeline_count=12, threshold=10, window_s=300.0,
    )  # fmt: skip
    await store.append_batch([NewEvent(stream=storm_stream("sig-v1:ab12"), data=start)])
    assert await run("audit", "storms") == 0
    out = capsys.readouterr().out
    assert "storm:sig-v1:ab12:1" in out and "open" in out and "pull: 503 Service" in out
    assert await run("audit", "storms", "--json") == 0
    (storm,) = json.loads(capsys.readouterr().out)["storms"]
    assert (storm["state"], storm["pipeline_count"], storm["parked_count"]) == ("open", 12, 0)
