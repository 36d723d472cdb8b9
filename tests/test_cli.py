"""The ``ciretry`` command, including the fresh-machine path: ``ciretry up`` with no URLs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

from tests.support.commands import CIRETRY, free_base_port, processes_using


def test_help_lists_the_core_commands() -> None:
    out = subprocess.run([*CIRETRY, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("up", "serve", "migrate"):
        assert f"    {command}" in out


def test_serve_without_urls_explains_itself() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRETRY_")}
    res = subprocess.run([*CIRETRY, "serve", "act"], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert "CIRETRY_DATABASE_URL" in res.stderr


def test_bad_config_value_names_the_variable() -> None:
    env = dict(
        os.environ,
        CIRETRY_HTTP_PORT="eighty",
        CIRETRY_DATABASE_URL="postgresql://x/y",
        CIRETRY_NATS_URL="nats://127.0.0.1:1",
    )
    res = subprocess.run([*CIRETRY, "serve", "act"], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert "CIRETRY_HTTP_PORT" in res.stderr


def _ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status)
    except OSError as exc:
        return getattr(exc, "code", 0) or 0


@pytest.mark.needs_servers
def test_up_with_no_urls_uses_embedded_servers_and_stops_clean() -> None:
    # Under /tmp with 0755 so that, when root, the unprivileged PostgreSQL user reaches it.
    root = Path(tempfile.mkdtemp(prefix="ciretry-up-"))
    os.chmod(root, 0o755)
    try:
        _up_and_stop(root / "data")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _up_and_stop(data: Path) -> None:
    base = free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRETRY_")}
    proc = subprocess.Popen(
        [*CIRETRY, "up", "--data-dir", str(data), "--base-port", str(base)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        # `up` prints this line once every service's /readyz answered 200 (it gives up at 60 s).
        for line in proc.stdout:
            lines.append(line)
            if "ciretry is ready" in line or "not ready" in line:
                break
        assert any("ciretry is ready" in line for line in lines), lines
        assert any("embedded PostgreSQL" in line for line in lines)
        assert [_ready(base + i) for i in range(3)] == [200, 200, 200]
        assert processes_using(data), "embedded servers should be running"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert processes_using(data) == []
    assert [_ready(base + i) for i in range(3)] == [0, 0, 0]
