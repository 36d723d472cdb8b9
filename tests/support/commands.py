"""Running ``ciretry`` commands (``up``, ``serve``) as a user would, and reading what they say.

The output is read by a thread into a queue, so a test waits for a line with a deadline (a hang
guard, not a speed assertion) instead of blocking forever on a command that went wrong.
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

CIRETRY = [sys.executable, "-m", "ciretry.cli"]


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without CIRETRY_* settings (no configured servers), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRETRY_")}
    env.update(settings)
    return env


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems: a guess, as before


def free_base_port(count: int = 3) -> int:
    """The first of ``count`` consecutive free ports (``up --base-port``), below the kernel's
    ephemeral range: a port in it can be taken, between this check and ``up``'s bind, by any
    outgoing connection or port-0 server of the tests running beside this one."""
    top = _ephemeral_low() - count
    for _ in range(100):
        base = random.randint(min(20000, top), top)
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def processes_using(path: Path) -> list[psutil.Process]:
    """Running processes with ``path`` in their command line (servers of a data directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def closed_port() -> int:
    """A port nothing listens on (bound and released: refused until someone takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Command:
    """A running command whose stdout and stderr lines are collected, tagged by stream."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.lines: list[tuple[str, str]] = []
        self._ended = 0
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(name, pipe), daemon=True)
            for name, pipe in (("out", self.proc.stdout), ("err", self.proc.stderr))
        ]
        for t in self._readers:
            t.start()

    def _read(self, name: str, pipe: object) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            self._queue.put((name, line.rstrip("\n")))
        self._queue.put(None)

    def _pump(self, block_for: float) -> None:
        """Move what arrived into ``lines`` (waiting up to ``block_for`` for the first)."""
        try:
            item = self._queue.get(timeout=block_for)
        except queue.Empty:
            return
        while True:
            if item is None:
                self._ended += 1
            else:
                self.lines.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def wait_for_line(self, pattern: str, within: float = 120.0) -> str:
        """The first line (either stream) matching ``pattern``; fails with everything said if
        the command ends or ``within`` passes first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + within
        while True:
            for _, line in self.lines:
                if rx.search(line):
                    return line
            if self._ended == 2:
                raise AssertionError(
                    f"ended ({self.proc.wait()}) without a line matching {pattern!r}:\n"
                    + self.text()
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} in:\n{self.text()}")
            self._pump(0.2)

    def finish(self, within: float = 120.0) -> int:
        """Wait for the exit (hang guard ``within``) and collect the remaining output."""
        code = self.proc.wait(within)
        for t in self._readers:
            t.join(10)
        while self._ended < 2:
            self._pump(1.0)
        return code

    def signal(self, sig: int = signal.SIGINT) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def text(self, stream: str | None = None) -> str:
        return "\n".join(line for name, line in self.lines if stream in (None, name))


def run(
    argv: Sequence[str], env: Mapping[str, str], *, within: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), env=dict(env), capture_output=True, text=True, timeout=within, cwd=cwd
    )
