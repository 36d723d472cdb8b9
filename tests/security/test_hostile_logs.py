"""Hostile logs and rule files for classify: one enormous line, binary garbage, a log far larger
than the cap (streamed, tail kept, memory bounded), and catastrophic-backtracking regexes (refused
or linear, never a hang). Sizes are CI-sized stand-ins for the issue's 2 GB / 500 MB: the code
paths are the same, the bounds are what is checked.

Nothing here is timed: a hang is caught by the test's timeout (on a backtracking engine the evil
patterns below would not finish in a lifetime), and how fast these inputs are scanned is
measured by ``bench/hostile.py``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ciretry.classify.engine import Scanner
from ciretry.classify.logsource import LogSource, ProviderEndpoints
from ciretry.classify.rules import RuleFileError, load_ruleset, ruleset_from_texts
from ciretry.common.events import JobFinished, LogLocator
from ciretry.common.http import AiohttpTransport
from tests.support.memory import peak_rss_growth

MB = 1024 * 1024


@pytest.fixture(scope="module")
def scanner() -> Scanner:
    return Scanner(load_ruleset())


def one_long_line(total: int, chunk: int = MB) -> Iterator[bytes]:
    block = b"x" * chunk
    for _ in range(total // chunk):
        yield block
    yield b" Could not resolve host: gitlab.example\n"


@pytest.mark.timeout(120)
def test_one_long_line_is_scanned_in_bounded_memory(scanner: Scanner) -> None:
    total = 300 * MB
    with peak_rss_growth() as growth:
        result = scanner.scan(one_long_line(total))
    # The line is cut every CHUNK_SIZE + MAX_LINE bytes (memory first): a few tens of MB.
    assert growth[0] < 96 * MB, f"RSS grew {growth[0] / MB:.0f} MB"
    # The error at the end of the 300 MB line is still found, in the line's last piece.
    assert result.rule_ids == ["dns-resolution-failure"]
    assert result.total_lines > 1  # cut into pieces, never held whole


def garbage(total: int, seed: int = 7) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(total // MB):
        yield rng.randbytes(MB)


@pytest.mark.timeout(120)
def test_binary_garbage_is_scanned_without_crash(scanner: Scanner) -> None:
    with peak_rss_growth() as growth:
        result = scanner.scan(garbage(64 * MB))
    assert growth[0] < 96 * MB, f"RSS grew {growth[0] / MB:.0f} MB"
    # Random bytes are no failure: no rule fires, and every one of its lines was counted.
    assert result.rule_ids == []
    newlines = sum(chunk.count(b"\n") for chunk in garbage(64 * MB))
    assert result.total_lines in (newlines, newlines + 1)
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
    quiet = scanner.scan(lines)
    assert (quiet.rule_ids, quiet.total_lines) == ([], len(lines))
    # An error after them is found, on its own line number: they did not derail the scan.
    error = b"fatal: unable to access 'https://x/': Could not resolve host: x\n"
    found = scanner.scan([*lines, error])
    assert "dns-resolution-failure" in found.rule_ids
    assert {h.first.line for h in found.hits.values()} == {len(lines) + 1}
    # The evidence is text a verdict can carry: no NUL, valid UTF-8.
    for h in found.hits.values():
        assert "\x00" not in h.first.text and h.first.text.encode()


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
        source = LogSource(
            AiohttpTransport(session), ProviderEndpoints(gitlab_url=url), cap_bytes=cap
        )
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

#: (pattern, a line it matches, a hostile line it must not match: exponential or polynomial for
#: a backtracking engine, linear for RE2 / Hyperscan).
EVIL = [
    (r"(a+)+$", "aaaa", "a" * 50_000 + "!"),
    (r"(a|aa)+$", "aa", "a" * 50_000 + "!"),
    (r"(a|a?)+b", "aab", "a" * 50_000 + "!"),
    (r"(.*a){20}", "a" * 20, "a" * 19 + "b" * 50_000),
    (r"(x+x+)+y", "xxy", "x" * 50_000 + "!"),
    (r"([a-zA-Z]+)*@", "a@", "a" * 50_000 + "!"),
]
#: Matches the empty line, so it would fire on every log: refused at load, whatever its shape.
EVIL_EMPTY = r"^(\w+\s?)*$"
NEEDS_BACKTRACKING = [r"(a+)\1", r"(?=a)a", r"(?<!x)y", r"(?P<n>a)(?P=n)", r"(?>a+)b"]


def _rule(rule_id: str, pattern: str, match: str, no_match: str) -> str:
    return (
        f'[[rule]]\nid = "{rule_id}"\ncategory = "infra_network"\nbudget = "system"\n'
        f"log = '{pattern}'\n"
        f'[rule.examples]\nmatch = ["{match}"]\nno_match = ["{no_match}"]\n'
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["hyperscan", "re2"])
@pytest.mark.parametrize(("pattern", "match", "hostile"), EVIL, ids=[e[0] for e in EVIL])
def test_catastrophic_regex_is_accepted_and_scans_a_hostile_log(
    pattern: str, match: str, hostile: str, backend: str
) -> None:
    """Loaded (its examples, the hostile line among them, are checked on RE2) and scanned on a
    linear-time engine: a backtracking one would still be running when the timeout fires."""
    rules = ruleset_from_texts([("evil.toml", _rule("evil", pattern, match, hostile))])
    scanner = Scanner(rules, backend=backend)
    assert scanner.backend == backend
    assert scanner.scan([f"ok\n{match}\n".encode()]).rule_ids == ["evil"]
    result = scanner.scan([(hostile + "\n").encode() * 4])
    assert (result.rule_ids, result.total_lines) == ([], 4)


def test_a_pattern_matching_the_empty_line_is_refused_however_evil() -> None:
    with pytest.raises(RuleFileError, match="empty line"):
        ruleset_from_texts([("evil.toml", _rule("evil", EVIL_EMPTY, "aaaa", "!"))])


@pytest.mark.parametrize("pattern", NEEDS_BACKTRACKING)
def test_patterns_that_need_backtracking_are_refused(pattern: str) -> None:
    toml = _rule("evil", pattern, "aa", "fine")
    with pytest.raises(RuleFileError, match="linear time"):
        ruleset_from_texts([("evil.toml", toml)])


@pytest.mark.timeout(60)
def test_a_rule_file_of_evil_patterns_with_long_examples_loads() -> None:
    """Loading compiles every pattern and checks every example (50 kB hostile ones here) on
    RE2: it must finish (the timeout is the hang guard) and give every rule."""
    body = "\n".join(_rule(f"evil{i}", p, m, h) for i, (p, m, h) in enumerate(EVIL))
    rules = ruleset_from_texts([("evil.toml", body)])
    assert [r.id for r in rules.log_rules] == [f"evil{i}" for i in range(len(EVIL))]
