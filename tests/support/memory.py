"""Resident memory, sampled: for tests that bound memory and benchmarks that report it.

``peak_rss_growth`` watches this process; ``PeakRss`` watches another one (a service started
by ``tests/support/chaos/processes.py``), with its children, through psutil.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


def rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_rss_growth(interval: float = 0.005) -> Iterator[list[int]]:
    """Samples this process's RSS every ``interval`` s while the block runs; yields a list
    holding, once the block is done, the peak growth over the start (bytes)."""
    out = [0]
    base = rss()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        done.set()
        t.join()
        out[0] = max(peak, rss()) - base


class PeakRss:
    """The highest RSS of process ``pid`` and its children seen by a sampling thread, from
    ``start()`` to ``stop()``. Sampling is how the kernel's cgroup limit sees it too: the
    total resident memory at each instant."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        total = 0
        for p in [self.process, *self.process.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, self.current())
                self.samples += 1
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak
