"""The first hour (issue 14): the README's commands, run as a user would, on a bad day too.

Each test runs the real command line: ports taken, a database or NATS that does not answer,
wrong settings, ``kill -9`` of ``up``, what an earlier run left behind, a server that cannot
start. What is asserted is what the user sees (the lines, the exit code) and what is left
running afterwards (nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from ciretry.cli.devstack import probe
from ciretry.common.embedded import EmbeddedNats, EmbeddedPostgres
from ciretry.common.startup import EXIT_CONFIG, EXIT_IN_USE, EXIT_UNAVAILABLE
from tests.support.commands import (
    CIRETRY,
    Command,
    clean_env,
    closed_port,
    free_base_port,
    processes_using,
    run,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # 0755 under /tmp, as a normal user's checkout would be (the private-home case has its own
    # test, tests/test_readme_commands.py).
    root = Path(tempfile.mkdtemp(prefix="ciretry-first-hour-"))
    os.chmod(root, 0o755)
    yield root / "data"
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return int(r.status)
    except OSError as exc:
        return int(getattr(exc, "code", 0) or 0)


async def _database_facts(stack: dict[str, Any]) -> dict[str, Any]:
    conn = await asyncpg.connect(stack["database_url"])
    try:
        listen = await conn.fetchval("SHOW listen_addresses")
        users = await conn.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {"listen_addresses": listen, "users": sorted(r[0] for r in users)}


def _stack_pids(data: Path) -> list[int]:
    """Every process of the stack ``up`` wrote down: itself, services, PostgreSQL, NATS."""
    info = json.loads((data / "stack.json").read_text())
    pids = [info["pid"], *(s["pid"] for s in info["services"].values())]
    pids.append(int((data / "nats.pid").read_text()))
    pids.append(int((data / "pgdata" / "postmaster.pid").read_text().split()[0]))
    return pids


def _up(data: Path, base: int, **settings: str) -> Command:
    return Command(
        [*CIRETRY, "up", "--data-dir", str(data), "--base-port", str(base)],
        clean_env(CIRETRY_LOG_JSON="false", **settings),
    )


# --- item 2: ports taken, readiness of our own children --------------------------------------


class _OtherStack(BaseHTTPRequestHandler):
    """Another program on our port, answering /readyz 200 as another ciretry would."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b'{"status": "ready", "service": "ingest", "instance": "someone-else"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def other_stack() -> Iterator[int]:
    # The middle of three ports found free: the tests run `up` on the one before it, whose
    # other ports must be free too (one free port alone left ingest's to chance, and parallel
    # test workers' client sockets took it once).
    server = HTTPServer(("127.0.0.1", free_base_port(3) + 1), _OtherStack)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_up_names_a_taken_port_and_starts_nothing(data_dir: Path, other_stack: int) -> None:
    base = other_stack - 1  # classify's port is the taken one
    up = _up(data_dir, base)
    code = up.finish()
    assert code == EXIT_IN_USE, up.text()
    said = up.text("err")
    assert f"port {other_stack} (classify)" in said and "--base-port" in said
    assert "embedded PostgreSQL" not in up.text() and "ready" not in up.text("out")
    assert not (data_dir / "pgdata").exists()


def test_readiness_is_our_own_instance_not_whoever_answers(other_stack: int) -> None:
    state, detail = probe("127.0.0.1", other_stack, "our-instance-ingest")
    assert state == "other" and str(other_stack) in detail and "someone-else" in detail
    assert probe("127.0.0.1", other_stack, "someone-else")[0] == "ready"
    assert probe("127.0.0.1", closed_port(), "x")[0] == "down"


def test_serve_on_a_taken_port_says_so(pg_dsn: str, nats_url: str, schema: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run(
            [*CIRETRY, "serve", "classify"],
            clean_env(
                CIRETRY_DATABASE_URL=pg_dsn,
                CIRETRY_DATABASE_SCHEMA=schema,
                CIRETRY_NATS_URL=nats_url,
                CIRETRY_NATS_PREFIX=f"p{schema}",
                CIRETRY_NATS_STREAM=f"P{schema}",
                CIRETRY_HTTP_PORT=str(port),
            ),
        )
    assert res.returncode == EXIT_IN_USE, res.stderr
    assert f"127.0.0.1:{port}" in res.stderr and "CIRETRY_HTTP_PORT" in res.stderr
    assert "Traceback" not in res.stderr


# --- item 3: PostgreSQL or NATS unreachable, signals at every stage --------------------------


def _attempt_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "retrying in" in line]


def _serve_act_giving_up(**settings: str) -> str:
    """``serve act`` with three connection attempts; its stderr, once it gave up (exit 4)."""
    res = run([*CIRETRY, "serve", "act"], clean_env(CIRETRY_CONNECT_ATTEMPTS="3", **settings))
    assert res.returncode == EXIT_UNAVAILABLE, res.stderr
    assert "Traceback" not in res.stderr
    return res.stderr


def test_serve_with_the_database_down_says_why_once_per_attempt(nats_url: str) -> None:
    port = closed_port()
    said = _serve_act_giving_up(
        CIRETRY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/x", CIRETRY_NATS_URL=nats_url
    )
    attempts = _attempt_lines(said)
    assert len(attempts) == 2, said
    assert f"PostgreSQL at 127.0.0.1:{port} refused the connection" in attempts[0]
    assert "(1/3)" in attempts[0] and "(2/3)" in attempts[1]
    assert "gave up after 3 attempt(s)" in said.splitlines()[-1]
    assert len(said.splitlines()) < 10


def test_serve_with_nats_down_says_why_without_tracebacks(pg_dsn: str, schema: str) -> None:
    port = closed_port()
    said = _serve_act_giving_up(
        CIRETRY_DATABASE_URL=pg_dsn,
        CIRETRY_DATABASE_SCHEMA=schema,
        CIRETRY_NATS_URL=f"nats://127.0.0.1:{port}",
    )
    assert len(_attempt_lines(said)) == 2, said
    assert f"NATS at 127.0.0.1:{port} refused the connection" in said.splitlines()[-1]
    assert len(said) < 4000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_at_once_while_waiting_for_the_database(nats_url: str, sig: int) -> None:
    serve = Command(
        [*CIRETRY, "serve", "act"],
        clean_env(
            CIRETRY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port()}/x",
            CIRETRY_NATS_URL=nats_url,
            CIRETRY_LOG_JSON="false",
        ),
    )
    try:
        serve.wait_for_line(r"retrying in .* \(1/30\)")
        serve.signal(sig)
        # The wait had ~2 minutes to go: finishing within the hang guard means it stopped.
        assert serve.finish(within=20) == 0
        assert "stopped before it was connected" in serve.text()
    finally:
        serve.kill()


def test_up_with_an_unreachable_database_says_why_and_stops_on_ctrl_c(data_dir: Path) -> None:
    port = closed_port()
    settings = {"CIRETRY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/x"}
    up = _up(data_dir, free_base_port(), CIRETRY_CONNECT_ATTEMPTS="2", **settings)
    assert up.finish() == EXIT_UNAVAILABLE, up.text()
    assert len(_attempt_lines(up.text("err"))) == 1
    assert f"PostgreSQL at 127.0.0.1:{port} refused the connection" in up.text("err")
    assert "gave up after 2 attempt(s)" in up.text("err")
    assert "Traceback" not in up.text()

    up = _up(data_dir, free_base_port(), **settings)
    try:
        up.wait_for_line(r"retrying in .* \(1/30\)")
        up.signal(signal.SIGINT)
        assert up.finish(within=30) == 0, up.text()
        assert "Traceback" not in up.text()
    finally:
        up.kill()
    assert processes_using(data_dir) == []


# --- item 4: configuration errors name the variable ------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        # One of each kind here; tests/common/test_config_checks.py has every check.
        ("CIRETRY_DATABASE_URL", "postgress://db/x", "did you mean postgres://"),
        ("CIRETRY_LOG_LEVEL", "verbose", "DEBUG, INFO, WARNING"),
        ("CIRETRY_POLICY_PATH", "/nonexistent/policy.toml", "does not exist"),
        ("CIRETRY_CONSUMER_ACK_WAIT", "-5", "greater than 0"),
    ],
)
def test_a_wrong_setting_stops_serve_and_up_naming_it(
    variable: str, value: str, says: str, data_dir: Path
) -> None:
    env = clean_env(
        CIRETRY_DATABASE_URL="postgresql://db/x", CIRETRY_NATS_URL="nats://nats:4222"
    )
    env[variable] = value
    for argv in ([*CIRETRY, "serve", "act"], [*CIRETRY, "up", "--data-dir", str(data_dir)]):
        res = run(argv, env)
        assert res.returncode == EXIT_CONFIG, res.stderr
        assert res.stderr.startswith(f"configuration error: {variable}: "), res.stderr
        assert says in res.stderr


def test_an_unknown_variable_is_named_with_the_closest_setting() -> None:
    res = run(
        [*CIRETRY, "migrate"],
        clean_env(CIRETRY_GITLAB_TOKN="glpat-x", CIRETRY_INGEST_SERVICE_HOST="10.0.0.1"),
    )
    assert (
        "CIRETRY_GITLAB_TOKN is not a setting; did you mean CIRETRY_GITLAB_TOKEN?" in res.stderr
    )
    # Kubernetes' service links for a Service named ciretry-ingest are not typos.
    assert "CIRETRY_INGEST_SERVICE_HOST" not in res.stderr
    assert "glpat-x" not in res.stderr


# --- items 5 and 9: the stack's address book, kill -9, leftovers, a server that fails ---------


def test_kill_9_of_up_takes_its_children_along_and_the_next_up_starts(data_dir: Path) -> None:
    base = free_base_port()
    up = _up(data_dir, base)
    try:
        up.wait_for_line("ciretry is ready")
        dashboard = up.wait_for_line(r"^\s+dashboard\s+http").split()[-1]
        openapi = up.wait_for_line(r"OpenAPI: ").split("OpenAPI: ")[1].rstrip(")")
        assert dashboard == f"http://127.0.0.1:{base}/"
        # Closed by default: up made a token for this run and printed it with the address.
        token = up.wait_for_line(r"^\s+token\s+\S+").split()[1]
        assert len(token) >= 16 and token not in up.text("err")
        events = f"http://127.0.0.1:{base}/api/v1/events"
        assert _get(openapi) == 200 and _get(events) == 401 and _get(events, token) == 200
        assert _get(dashboard, token) == 200
        assert "no push token is set" in up.text("err")
        assert "no read token is set" not in up.text("err")
        # The embedded server listens on loopback only (trust auth: docs/security.md), and the
        # services hold their connections as the runtime role, not as the owner.
        facts = asyncio.run(_database_facts(json.loads((data_dir / "stack.json").read_text())))
        assert facts["listen_addresses"] == "127.0.0.1"
        assert "ciretry_runtime" in facts["users"] and "postgres" not in facts["users"], facts

        # A tool run next to the stack (same data directory, no URL) finds its database.
        tool = run(
            [*CIRETRY, "audit", "events", "--json"], clean_env(CIRETRY_DATA_DIR=str(data_dir))
        )
        assert tool.returncode == 0, tool.stderr
        assert json.loads(tool.stdout)["events"] == []
        assert "using the dev stack" in tool.stderr

        pids = _stack_pids(data_dir)
        processes = [psutil.Process(pid) for pid in pids]
        up.proc.kill()  # SIGKILL: no cleanup code of up runs
        up.finish()
        gone, alive = psutil.wait_procs(processes, timeout=60)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        up.kill()

    # Without a running up, the tool says how to get one.
    tool = run([*CIRETRY, "audit", "events"], clean_env(CIRETRY_DATA_DIR=str(data_dir)))
    assert tool.returncode == EXIT_CONFIG and "./run up" in tool.stderr

    again = _up(data_dir, base)
    try:
        again.wait_for_line("ciretry is ready")
        again.signal(signal.SIGINT)
        assert again.finish() == 0
    finally:
        again.kill()


def test_up_clears_servers_an_earlier_run_left_on_its_data_dir(data_dir: Path) -> None:
    # Servers left running on the data directory, not children of any up (as after a kill -9
    # where the kernel could not kill them: another OS, or an older ciretry).
    pg = EmbeddedPostgres(data_dir)
    nats = EmbeddedNats(data_dir)
    pg.start()
    nats.start()
    up = _up(data_dir, free_base_port())
    try:
        up.wait_for_line("ciretry is ready")
        assert f"stopped the PostgreSQL an earlier run left on {data_dir / 'pgdata'}" in up.text()
        assert "stopped the NATS server an earlier run left" in up.text()
        assert pg.proc is not None and nats.proc is not None
        assert pg.proc.wait(30) is not None and nats.proc.wait(30) is not None
        up.signal(signal.SIGINT)
        assert up.finish() == 0
    finally:
        up.kill()
        pg.stop()
        nats.stop()


def test_a_second_up_on_the_same_data_dir_names_the_first(data_dir: Path) -> None:
    first = _up(data_dir, free_base_port())
    try:
        first.wait_for_line("ciretry is ready")
        second = _up(data_dir, free_base_port())
        assert second.finish() == EXIT_IN_USE
        assert f"pid {first.proc.pid}" in second.text("err")
        first.signal(signal.SIGINT)
        assert first.finish() == 0
    finally:
        first.kill()


def test_a_server_that_cannot_start_shows_its_log(data_dir: Path) -> None:
    pgdata = data_dir / "pgdata"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("18\n")  # a cluster that lost its files
    up = _up(data_dir, free_base_port())
    assert up.finish() == 1
    said = up.text("err")
    assert "embedded PostgreSQL exited" in said and "postgres.log" in said
    # PostgreSQL's own words, from its log:
    assert 'could not access the server configuration file' in said and "postgresql.conf" in said
    assert processes_using(data_dir) == []
