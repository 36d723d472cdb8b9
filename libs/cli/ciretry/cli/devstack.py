"""``ciretry up``: the whole stack in one command, stopped cleanly by Ctrl-C.

With no URLs configured, PostgreSQL and NATS come from PyPI wheels (see ciretry.common.embedded).
The services run as child processes (``ciretry serve <name>``), as they do in production.

What it promises, because a first run on a bad day depends on it:

* it says "ready" only when *its own* services answer: each gets an instance id that its
  ``/readyz`` repeats, so another program on the same port is named, not mistaken for ours;
* a port that is taken is found before anything starts, and named (exit code 3);
* an unreachable database or NATS gets one line per attempt and a final cause (exit code 4);
* Ctrl-C or SIGTERM stop it at any stage; its children die with it even if it is killed with
  ``kill -9`` (Linux), and the next ``up`` on the data directory clears whatever an earlier one
  left behind (see ciretry.common.devstack for the lock and the stack file);
* a server that fails to start is shown with the last lines of its own log;
* the dashboard and API are closed by default: with no read, feedback or admin token set (and
  ``CIRETRY_API_OPEN`` not true), ``up`` makes an admin token for this run and prints it with
  the dashboard's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

import msgspec

from ciretry.common import devstack as stackfile
from ciretry.common.bus import Bus
from ciretry.common.config import (
    Config,
    check_paths,
    load_config,
    startup_warnings,
    unknown_variables,
)
from ciretry.common.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    die_with_parent,
    process_command_line,
    stop_process,
)
from ciretry.common.eventstore import EventStore
from ciretry.common.startup import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_IN_USE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    PortInUse,
    StopRequested,
    endpoint,
    is_retryable_connect_error,
    wait_for,
)

READY_TIMEOUT = 60.0
SERVICE_ORDER = ("ingest", "classify", "act")


def say(line: str) -> None:
    """Progress, on stdout."""
    print(line, flush=True)


def warn(line: str) -> None:
    """What went wrong or needs attention, on stderr."""
    print(line, file=sys.stderr, flush=True)


# --- signals: stop at any stage -------------------------------------------------------------


def _stop_on_signals() -> None:
    """The first SIGINT/SIGTERM raises StopRequested wherever ``up`` is (starting a server,
    migrating, waiting for readiness, running); later ones are noted while it stops."""

    def first(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, later)
        signal.signal(signal.SIGTERM, later)
        raise StopRequested

    def later(signum: int, _frame: object) -> None:
        say("stopping (the services drain what they hold, then the servers stop)")

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


# --- before anything starts -----------------------------------------------------------------


def _check_ports_free(host: str, ports: dict[str, int]) -> None:
    bind_host = host or "0.0.0.0"  # what the service binds
    for name, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as s:
            # As aiohttp does: a socket in TIME_WAIT from an earlier run is no obstacle.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind_host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise PortInUse(
                    f"port {port} ({name}) on {bind_host} is already in use, by another "
                    "`ciretry up` or another program: stop it, or pass --base-port "
                    f"(ingest's port; classify +1, act +2), e.g. --base-port {port + 100}"
                ) from None


def _clear_stale(root: Path, pg: EmbeddedPostgres | None, nats: EmbeddedNats | None) -> None:
    """What an ``up`` that died without stopping (``kill -9``) left on this data directory."""
    old = stackfile.read(root)
    if old is not None:
        for name, entry in old.services.items():
            if _is_our_service(entry.pid, f"{old.instance}-{name}"):
                stop_process(entry.pid, signal.SIGTERM, timeout=40)
                say(f"stopped {name} (pid {entry.pid}), left running by an earlier `ciretry up`")
    for server in (nats, pg):
        if server is not None:
            done = server.clear_stale()
            if done:
                say(done)


def _is_our_service(pid: int, instance: str) -> bool:
    command = process_command_line(pid)
    if command is None or "ciretry" not in command or " serve " not in command:
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"CIRETRY_INSTANCE_ID={instance}".encode() in environ


# --- dependencies ---------------------------------------------------------------------------


async def _migrate(config: Config, dsn: str, runtime_role: str = "") -> list[str]:
    """Migrate as the owner (``dsn``); with ``runtime_role``, create it (LOGIN) and grant it
    what the services need."""
    store = await wait_for(
        endpoint("PostgreSQL", dsn),
        lambda: EventStore.connect(dsn, config.database_schema, max_size=1),
        attempts=config.connect_attempts,
        report=warn,
    )
    try:
        applied = await store.migrate()
        if runtime_role:
            # Embedded PostgreSQL trusts loopback connections: the password only makes the
            # role LOGIN. What binds the services is the role's privileges.
            await store.grant_runtime(runtime_role, secrets.token_urlsafe(24))
        return applied
    finally:
        await store.close()


def _as_role(dsn: str, role: str) -> str:
    """``dsn`` with ``role`` as its user (no password: embedded PostgreSQL trusts loopback)."""
    scheme, _, rest = dsn.partition("://")
    return f"{scheme}://{role}@{rest.split('@', 1)[1] if '@' in rest else rest}"


async def _check_nats(config: Config, url: str) -> None:
    bus = await wait_for(
        endpoint("NATS", url),
        lambda: Bus.connect(url, name="ciretry-up"),
        attempts=config.connect_attempts,
        report=warn,
        retryable=is_retryable_connect_error,
    )
    await bus.close()


# --- readiness ------------------------------------------------------------------------------


def probe(host: str, port: int, instance: str) -> tuple[str, str]:
    """("ready" | "starting" | "down" | "other", detail) for the service that should answer on
    ``port`` with ``instance`` in its /readyz."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as resp:
            status, raw = resp.status, resp.read(4096)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read(4096)
    except OSError:
        return "down", ""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("instance") != instance:
        shown = raw.decode("utf-8", "replace")[:200]
        return "other", f"port {port} answers for another program: HTTP {status} {shown}"
    if status == 200:
        return "ready", ""
    checks = body.get("checks")
    return "starting", json.dumps(checks) if checks else str(body.get("status"))


def _exit_meaning(code: int | None) -> str:
    meaning = {
        EXIT_IN_USE: "its port is in use",
        EXIT_UNAVAILABLE: "PostgreSQL or NATS unreachable",
        EXIT_CONFIG: "configuration error",
    }.get(code or 0)
    return f"exited with code {code}" + (f" ({meaning})" if meaning else "")


def _wait_ready(
    host: str,
    ports: dict[str, int],
    instances: dict[str, str],
    children: dict[str, subprocess.Popen[bytes]],
) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    pending = dict.fromkeys(ports, "")
    while pending:
        for name in list(pending):
            proc = children[name]
            if proc.poll() is not None:
                warn(f"{name} {_exit_meaning(proc.returncode)}; its log is above")
                passed_on = (EXIT_CONFIG, EXIT_IN_USE, EXIT_UNAVAILABLE)
                return proc.returncode if proc.returncode in passed_on else EXIT_FAILED
            state, detail = probe(host, ports[name], instances[name])
            if state == "ready":
                del pending[name]
            elif state == "other":
                warn(f"{name}: {detail}")
                return EXIT_IN_USE
            else:
                pending[name] = detail
        if pending and time.monotonic() > deadline:
            for name, detail in pending.items():
                warn(
                    f"{name} not ready after {READY_TIMEOUT:.0f} s"
                    + (f": {detail}" if detail else ": /readyz does not answer")
                )
            return EXIT_FAILED
        time.sleep(0.1)
    return EXIT_OK


def _ready_message(
    host: str, ports: dict[str, int], dsn: str, nats_url: str, token: str | None = None
) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    lines = ["ciretry is ready:"]
    if "ingest" in ports:
        base = f"http://{shown}:{ports['ingest']}"
        lines += [
            f"  dashboard  {base}/",
            *(
                [f"  token      {token}  (made for this run: sign in with it, or send it as "
                 "`Authorization: Bearer`; admin: read and feedback)"]
                if token else []
            ),
            f"  API        {base}/api/v1  (OpenAPI: {base}/api/v1/openapi.json)",
            f"  webhooks   {base}/webhooks/gitlab  {base}/webhooks/github  "
            f"{base}/webhooks/buildkite",
        ]
    services = ", ".join(f"{name} http://{shown}:{port}" for name, port in ports.items())
    lines += [
        f"  services   {services}  (/healthz /readyz /metrics)",
        f"  database   {_redact(dsn)}",
        f"  NATS       {nats_url}",
        "`ciretry audit …` run in this directory uses this stack. Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split(":", 1)[0]
        return f"{scheme}://{user}:***@{rest.split('@', 1)[1]}"
    return url


# --- the command ----------------------------------------------------------------------------


def _generated_token(config: Config) -> str | None:
    """A token for this run when nothing would let anyone read (closed by default)."""
    if config.api_open or config.read_tokens or config.feedback_tokens or config.admin_tokens:
        return None
    if config.api_token:
        return None
    return secrets.token_urlsafe(24)


def run_dev_stack(*, data_dir: str | None, base_port: int, services: Sequence[str]) -> int:
    config = load_config()
    check_paths(config)
    token = _generated_token(config)
    if token is not None:
        config = msgspec.structs.replace(config, admin_tokens=(token,))
    for warning in startup_warnings(config):
        warn(f"warning: {warning}")
    root = Path(data_dir or config.data_dir).absolute()
    lock = stackfile.StackLock(root)
    lock.acquire()
    chosen = [name for name in SERVICE_ORDER if name in services]
    ports = {name: base_port + SERVICE_ORDER.index(name) for name in chosen}
    pg = None if config.database_url else EmbeddedPostgres(root, die_with_parent=True)
    nats = None if config.nats_url else EmbeddedNats(root, die_with_parent=True)
    children: dict[str, subprocess.Popen[bytes]] = {}
    code = EXIT_OK
    started = False
    try:
        _stop_on_signals()
        _clear_stale(root, pg, nats)
        _check_ports_free(config.http_host, ports)
        started = True

        dsn = config.database_url
        if pg is not None:
            dsn = pg.start()
            say(f"embedded PostgreSQL: {dsn} (data in {pg.pgdata})")
        nats_url = config.nats_url
        if nats is not None:
            nats_url = nats.start()
            say(f"embedded NATS JetStream: {nats_url} (data in {root / 'nats'})")
        else:
            asyncio.run(_check_nats(config, nats_url))
        # With the embedded server, the services run as the runtime role (no UPDATE, DELETE
        # or TRUNCATE on the log); the tools (`ciretry audit`, replay) keep the owner's DSN.
        runtime_role = config.database_runtime_role if pg is not None else ""
        applied = asyncio.run(_migrate(config, dsn, runtime_role))
        say(f"migrations applied: {', '.join(applied) or 'none pending'}")
        service_dsn = _as_role(dsn, runtime_role) if runtime_role else dsn

        run_id = uuid.uuid4().hex[:12]
        instances = {name: f"{run_id}-{name}" for name in chosen}
        # Unknown CIRETRY_* variables were reported above; the services need not repeat it.
        known = {k for k in os.environ if not unknown_variables({k: ""})}
        for name in chosen:
            env = {k: v for k, v in os.environ.items() if k in known}
            env.update(
                CIRETRY_DATABASE_URL=service_dsn,
                CIRETRY_NATS_URL=nats_url,
                CIRETRY_HTTP_PORT=str(ports[name]),
                CIRETRY_INSTANCE_ID=instances[name],
            )
            if token is not None:
                env["CIRETRY_ADMIN_TOKENS"] = token
            children[name] = subprocess.Popen(
                [sys.executable, "-m", "ciretry.cli", "serve", name],
                env=env,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        stackfile.write(
            root,
            stackfile.StackInfo(
                pid=os.getpid(),
                instance=run_id,
                data_dir=str(root),
                database_url=dsn,
                database_schema=config.database_schema,
                nats_url=nats_url,
                http_host=config.http_host,
                services={
                    name: stackfile.ServiceEntry(ports[name], children[name].pid)
                    for name in chosen
                },
            ),
        )
        host = "127.0.0.1" if config.http_host in ("0.0.0.0", "") else config.http_host
        code = _wait_ready(host, ports, instances, children)
        if code != EXIT_OK:
            return code
        print(_ready_message(config.http_host, ports, dsn, nats_url, token), flush=True)
        while True:
            for name, proc in children.items():
                if proc.poll() is not None:
                    warn(f"{name} {_exit_meaning(proc.returncode)}; stopping everything")
                    return EXIT_FAILED
            time.sleep(0.2)
    except StopRequested:
        return EXIT_OK
    finally:
        _stop_all(children, nats, pg)
        lock.release()
        if started:
            say("ciretry stopped")


def _stop_all(
    children: dict[str, subprocess.Popen[bytes]],
    nats: EmbeddedNats | None,
    pg: EmbeddedPostgres | None,
) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in children.values():
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for server in (nats, pg):
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
