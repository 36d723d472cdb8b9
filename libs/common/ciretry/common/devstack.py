"""The address book of a running ``ciretry up``, kept in its data directory.

``up`` holds an exclusive lock on ``<data dir>/up.lock`` for as long as it runs (the kernel
drops it when the process dies, however it dies) and writes ``<data dir>/stack.json``: its pid,
the instance id it gave its services, their ports and pids, and the database and NATS URLs. So:

* a second ``up`` on the same data directory is refused, naming the first one's pid;
* an ``up`` that finds ``stack.json`` but can take the lock knows the file is stale, and what
  its processes were, to clear them;
* ``ciretry audit …`` (and the other tools) run next to a dev stack find its database when no
  URL is configured.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

import msgspec

STACK_FILE = "stack.json"
LOCK_FILE = "up.lock"


class ServiceEntry(msgspec.Struct, frozen=True):
    port: int
    pid: int


class StackInfo(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    instance: str
    data_dir: str
    database_url: str
    database_schema: str
    nats_url: str
    http_host: str
    services: dict[str, ServiceEntry] = {}


class StackBusy(Exception):
    """Another ``ciretry up`` holds the data directory."""


class StackLock:
    """The lock of one data directory, held by the ``up`` that uses it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.data_dir / LOCK_FILE, "a+b")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            info = read(self.data_dir)
            who = f"pid {info.pid}" if info else "another process"
            raise StackBusy(
                f"another `ciretry up` ({who}) is running with the data directory "
                f"{self.data_dir}: stop it (Ctrl-C there, or kill {info.pid if info else '<pid>'})"
                ", or give this one its own --data-dir and --base-port"
            ) from None
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                (self.data_dir / STACK_FILE).unlink()
            self._file.close()
            self._file = None


def write(data_dir: Path, info: StackInfo) -> None:
    """Replace ``stack.json`` atomically, readable by the owner only (it holds the DSN)."""
    tmp = data_dir / f".{STACK_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(info)))
    os.replace(tmp, data_dir / STACK_FILE)


def read(data_dir: Path) -> StackInfo | None:
    """What ``stack.json`` says, live or stale; None when there is none (or it is unreadable)."""
    try:
        return msgspec.json.decode((data_dir / STACK_FILE).read_bytes(), type=StackInfo)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def running(data_dir: Path) -> StackInfo | None:
    """The stack of a live ``up`` on ``data_dir`` (its lock is held), else None."""
    info = read(data_dir)
    if info is None:
        return None
    try:
        with open(data_dir / LOCK_FILE, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return info  # held: that up is alive
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None
