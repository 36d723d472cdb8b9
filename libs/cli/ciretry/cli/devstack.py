"""``ciretry up``: the whole stack in one command, stopped cleanly by Ctrl-C.

With no URLs configured, PostgreSQL and NATS come from PyPI wheels (see ciretry.common.embedded).
The services run as child processes (``ciretry serve <name>``), as they do in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ciretry.common.config import load_config
from ciretry.common.embedded import EmbeddedNats, EmbeddedPostgres
from ciretry.common.eventstore import EventStore

READY_TIMEOUT = 60.0


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def _migrate(dsn: str, schema: str) -> list[str]:
    store = await EventStore.connect(dsn, schema, max_size=1)
    try:
        return await store.migrate()
    finally:
        await store.close()


def run_dev_stack(*, data_dir: str | None, base_port: int, services: Sequence[str]) -> int:
    config = load_config()
    root = Path(data_dir or config.data_dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    pg: EmbeddedPostgres | None = None
    nats: EmbeddedNats | None = None
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        dsn = config.database_url
        if not dsn:
            pg = EmbeddedPostgres(root)
            dsn = pg.start()
            print(f"embedded PostgreSQL: {dsn} (data in {pg.pgdata})", flush=True)
        nats_url = config.nats_url
        if not nats_url:
            nats = EmbeddedNats(root)
            nats_url = nats.start()
            print(f"embedded NATS JetStream: {nats_url}", flush=True)
        applied = asyncio.run(_migrate(dsn, config.database_schema))
        print(f"migrations applied: {', '.join(applied) or 'none pending'}", flush=True)

        ports = {name: base_port + i for i, name in enumerate(("ingest", "classify", "act"))}
        for name in services:
            env = dict(os.environ)
            env.update(
                CIRETRY_DATABASE_URL=dsn,
                CIRETRY_NATS_URL=nats_url,
                CIRETRY_HTTP_PORT=str(ports[name]),
            )
            children[name] = subprocess.Popen(
                [sys.executable, "-m", "ciretry.cli", "serve", name], env=env
            )
        deadline = time.monotonic() + READY_TIMEOUT
        pending = set(services)
        while pending and not stopping:
            for name in list(pending):
                if children[name].poll() is not None:
                    print(f"{name} exited with code {children[name].returncode}", file=sys.stderr)
                    return 1
                if _ready(ports[name]):
                    pending.discard(name)
            if time.monotonic() > deadline:
                print(f"not ready after {READY_TIMEOUT:.0f}s: {sorted(pending)}", file=sys.stderr)
                return 1
            time.sleep(0.1)
        if not stopping:
            urls = ", ".join(f"{n} http://127.0.0.1:{ports[n]}" for n in services)
            print(f"ciretry is ready: {urls}. Ctrl-C stops everything.", flush=True)
        while not stopping:
            for name, proc in children.items():
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
        return 0
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            if nats is not None:
                nats.stop()
        with contextlib.suppress(Exception):
            if pg is not None:
                pg.stop()
        print("ciretry stopped", flush=True)
