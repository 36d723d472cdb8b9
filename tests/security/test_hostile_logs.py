"""Hostile logs and rule files for classify: one enormous line, binary garbage, a log far larger
than the cap (streamed, tail kept, memory bounded), and catastrophic-backtracking regexes (refused
or linear, never a hang). Sizes are CI-sized stand-ins for the issue's 2 GB / 500 MB: the code
paths are the same, the bounds are what is checked.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ciretry.classify.engine import Scanner
from ciretry.classify.logsource import LogSource, ProviderEndpoints
from ciretry.classify.rules import RuleFileError, load_ruleset, ruleset_from_texts
from ciretry.common.events import JobFinished, LogLocator

MB = 1024 * 1024


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Samples RSS every 5 ms while the block runs; yields a list holding the growth (bytes)."""
    out = [0]
    base = rss()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        done.set()
        t.join()
        out[0] = max(peak, rss()) - base


@pytest.fixture(scope="module")
def scanner() -> Scanner:
    return Scanner(load_ruleset())


def one_long_line(total: int, chunk: int = MB) -> Iterator[bytes]:
    block = b"x" * chunk
    for _ in range(total // chunk):
        yield block
    yield b" Could not resolve host: gitlab.example\n"


def test_one_long_line_is_scanned_in_bounded_memory(scanner: Scanner) -> None:
    total = 300 * MB
    started = time.monotonic()
    with peak_rss_growth() as growth:
        result = scanner.scan(one_long_line(total))
    elapsed = time.monotonic() - started
    # The line is cut every CHUNK_SIZE + MAX_LINE bytes (memory first): a few tens of MB.
    assert growth[0] < 96 * MB, f"RSS grew {growth[0] / MB:.0f} MB"
    assert elapsed < 60, elapsed
    assert result is not None


def garbage(total: int, seed: int = 7) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(total // MB):
        yield rng.randbytes(MB)


def test_binary_garbage_is_scanned_without_crash(scanner: Scanner) -> None:
    with peak_rss_growth() as growth:
        result = scanner.scan(garbage(64 * MB))
    assert growth[0] < 96 * MB, f"RSS grew {growth[0] / MB:.0f} MB"
    assert result is not None
    # Garbage with a real error at its end still classifies that error.
    tail = (
        b"\n\x00\xff\xfe" * 1000
        + b"fatal: unable to access 'https://x/': Could not resolve host: x\n"
    )
    hit = scanner.scan([*garbage(4 * MB), tail])
    assert hit.rule_ids, "the error after the garbage was not found"


def test_nul_and_invalid_utf8_lines(scanner: Scanner) -> None:
    lines = [
        b"\x00" * 10_000 + b"\n",
        b"\xc3\x28\xa0\xa1\xe2\x28\xa1\n",
        b"\xed\xa0\x80 surrogate in utf-8\n",
        b"\x1b[31m" * 5000 + b"\n",
        b"\r" * 100_000 + b"\n",
        "💥".encode() * 100_000 + b"\n",
    ]
    scanner.scan(lines)


# --- the tail-read path: a log much larger than the cap, streamed over HTTP ---------------------


@pytest.fixture
async def big_log_server() -> AsyncIterator[tuple[str, int, bytes]]:
    total = 200 * MB
    line = b"2024-01-01T00:00:00Z some build output that goes on and on " + b"." * 40 + b"\n"
    block = line * (MB // len(line))
    last = b"fatal: unable to access 'https://x/': Could not resolve host: x\n"

    async def trace(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        sent = 0
        while sent + len(block) <= total:
            await resp.write(block)
            sent += len(block)
        await resp.write(last)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/api/v4/projects/{p}/jobs/{j}/trace", trace)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield (
            str(server.make_url("")).rstrip("/"),
            (total // len(block)) * len(block) + len(last),
            last,
        )
    finally:
        await server.close()


async def test_log_larger_than_the_cap_keeps_the_tail_in_bounded_memory(
    big_log_server: tuple[str, int, bytes],
) -> None:
    url, size, last = big_log_server
    cap = 8 * MB
    job = JobFinished(
        source="gitlab",
        project="p",
        pipeline_id="1",
        job_id="2",
        job_name="build",
        status="failed",
        log=LogLocator(kind="gitlab", project="p", job_id="2"),
    )
    async with aiohttp.ClientSession() as session:
        source = LogSource(session, ProviderEndpoints(gitlab_url=url), cap_bytes=cap)
        with peak_rss_growth() as growth:
            fetched = await source.fetch(job)
    assert fetched.available, fetched.note
    assert fetched.truncated and fetched.size == size
    assert fetched.data is not None and len(fetched.data) <= cap
    assert fetched.data.endswith(last)
    assert fetched.first_line > 1  # line numbers stay those of the whole log
    # cap, plus one copy when joining, plus chunks in flight: far below the 200 MB streamed.
    assert growth[0] < 6 * cap, f"RSS grew {growth[0] / MB:.0f} MB for a {size / MB:.0f} MB log"


# --- rule files with catastrophic regexes -------------------------------------------------------

EVIL = [
    r"(a+)+$",
    r"(a|aa)+$",
    r"(a|a?)+b",
    r"(.*a){20}",
    r"^(\w+\s?)*$",
    r"(x+x+)+y",
    r"([a-zA-Z]+)*@",
]
NEEDS_BACKTRACKING = [r"(a+)\1", r"(?=a)a", r"(?<!x)y", r"(?P<n>a)(?P=n)", r"(?>a+)b"]


@pytest.mark.parametrize("pattern", EVIL)
def test_catastrophic_regex_runs_in_linear_time(pattern: str) -> None:
    """Accepted (RE2 is linear) or refused at load; when accepted, a hostile line takes time
    proportional to its length: doubling it must not multiply the time."""
    toml = (
        '[[rule]]\nid = "evil"\ncategory = "infra_network"\nbudget = "system"\n'
        f"log = '{pattern}'\n"
        '[rule.examples]\nmatch = []\nno_match = ["fine"]\n'
    )
    try:
        rules = ruleset_from_texts([("evil.toml", toml)])
    except RuleFileError:
        return  # refused: fine
    scanner = Scanner(rules)

    def timed(n: int) -> float:
        line = ("a" * n + "!\n").encode()
        t = time.monotonic()
        scanner.scan([line * 4])
        return time.monotonic() - t

    small, big = timed(20_000), timed(80_000)
    assert big < 5.0, big
    assert big < 40 * max(small, 0.002), (small, big)


@pytest.mark.parametrize("pattern", NEEDS_BACKTRACKING)
def test_patterns_that_need_backtracking_are_refused(pattern: str) -> None:
    toml = (
        '[[rule]]\nid = "evil"\ncategory = "infra_network"\nbudget = "system"\n'
        f"log = '{pattern}'\n"
        '[rule.examples]\nmatch = []\nno_match = ["fine"]\n'
    )
    with pytest.raises(RuleFileError):
        ruleset_from_texts([("evil.toml", toml)])


def test_loading_a_rule_file_of_evil_patterns_is_time_bounded() -> None:
    """Loading (compiling and checking examples) must not hang either: every evil pattern in one
    file, with long examples."""
    body = []
    for i, p in enumerate(EVIL):
        body.append(
            f'[[rule]]\nid = "evil{i}"\ncategory = "infra_network"\nbudget = "system"\n'
            f"log = '{p}'\n[rule.examples]\nmatch = []\n"
            f'no_match = ["{"a" * 50_000}!"]\n'
        )
    t = time.monotonic()
    try:
        ruleset_from_texts([("evil.toml", "\n".join(body))])
    except RuleFileError:
        pass
    assert time.monotonic() - t < 10
