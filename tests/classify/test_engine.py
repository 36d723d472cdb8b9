from __future__ import annotations

import gzip
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ciretry.classify import engine as E
from ciretry.classify import logtext
from ciretry.classify.engine import Scanner, count_newlines

from .helpers import rule_toml, rules_from

RULES = (
    rule_toml("boom", r"^boom: \w+", match='["boom: x"]', no_match='["no boom: x"]')
    + rule_toml(
        "net",
        "connection reset",
        match='["read: connection reset"]',
        no_match='["connection ok"]',
        extra="log_not = 'expected'",
    )  # fmt: skip
    + rule_toml(
        "tail",
        "^FINAL ERROR",
        match='["FINAL ERROR"]',
        no_match='["x"]',
        extra="scope = { last_lines = 3 }",
    )  # fmt: skip
    + rule_toml(
        "clone",
        "^fatal: unable to access",
        match='["section_start:1:get_sources\\r\\u001b[0K\\nfatal: unable to access x"]',
        no_match='["fatal: unable to access x"]',
        extra='scope = { section = "get_*" }',
    )  # fmt: skip
)


@pytest.fixture(scope="module", params=["hyperscan", "re2"])
def scanner(request: pytest.FixtureRequest) -> Scanner:
    return Scanner(rules_from(RULES), backend=request.param)


LOG = (
    (
        b"2024-01-01T00:00:00.0000000Z start\n"  # 1
        b"section_start:1700000000:get_sources\r\x1b[0K\x1b[32;1mFetching\x1b[0;m\n"  # 2
        b"fatal: unable to access 'https://x/': Could not resolve host\n"  # 3
        b"section_end:1700000001:get_sources\r\x1b[0K\n"  # 4
        b"fatal: unable to access 'https://y/' outside the section\n"  # 5
        b"2024-01-01T00:00:00.0000000Z boom: first\n"  # 6  (^ after a timestamp)
        b"\x1b[31mboom:\x1b[0m split by colour codes\n"  # 7  (dirty line)
        b"read: connection reset (expected by test_net)\n"  # 8  (log_not guard)
        b"read: connection reset by peer\r\n"  # 9  (CRLF)
        b"FINAL ERROR early\n"  # 10 (not in the last 3 lines)
    )
    + b"filler\n" * 5
    + b"boom: last\n"
)  # 11..15, 16


def test_evidence_line_numbers_text_and_sections(scanner: Scanner) -> None:
    r = scanner.scan_bytes(LOG)
    assert r.total_lines == 16
    assert set(r.hits) == {"boom", "net", "clone"}
    boom = r.hits["boom"]
    assert (boom.first.line, boom.first.text) == (6, "boom: first")
    assert (boom.last.line, boom.last.text) == (16, "boom: last")
    assert boom.count == 3  # line 7 matches once its colour codes are removed
    net = r.hits["net"]
    assert (net.first.line, net.count) == (9, 1)
    assert net.first.text == "read: connection reset by peer"
    clone = r.hits["clone"]
    assert (clone.first.line, clone.count) == (3, 1)
    assert clone.first.sections == ("get_sources",)
    assert [m.line for m in r.matches()] == [3, 6, 9, 16]


def test_tail_scope(scanner: Scanner) -> None:
    assert "tail" in scanner.scan_bytes(b"x\ny\nFINAL ERROR now\nz\n").hits
    assert "tail" not in scanner.scan_bytes(b"FINAL ERROR then\nx\ny\nz\n").hits


def test_any_split_of_the_stream_gives_the_same_result(scanner: Scanner) -> None:
    expected = scanner.scan_bytes(LOG)
    small = Scanner(rules_from(RULES), backend=scanner.backend, chunk_size=64)
    rng = random.Random(3)
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(LOG)), 9))
        parts = [LOG[a:b] for a, b in zip([0, *cuts], [*cuts, len(LOG)], strict=True)]
        got = small.scan(parts)
        assert got.total_lines == expected.total_lines
        assert got.matches() == expected.matches()


def test_very_dirty_chunks_fall_back_to_whole_chunk_cleaning(
    scanner: Scanner, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = scanner.scan_bytes(LOG)
    monkeypatch.setattr(E, "MAX_DIRTY_LINES", 1)
    assert scanner.scan_bytes(LOG).matches() == expected.matches()


def test_first_line_offsets_numbers(scanner: Scanner) -> None:
    r = scanner.scan_bytes(b"x\nboom: y\n", first_line=1001)
    assert r.hits["boom"].first.line == 1002 and r.total_lines == 1002


def test_long_lines_are_truncated_in_evidence(scanner: Scanner) -> None:
    r = scanner.scan_bytes(b"boom: " + b"x" * 5000 + b"\n")
    text = r.hits["boom"].first.text
    assert len(text) == E.MAX_EVIDENCE_TEXT and text.endswith("...")


def test_scan_file_gzip_and_tail_cap(scanner: Scanner, tmp_path: Path) -> None:
    body = b"".join(b"line %d\n" % i for i in range(1, 20001)) + b"boom: at the end\n"
    p = tmp_path / "job.log.gz"
    p.write_bytes(gzip.compress(body))
    full = scanner.scan_file(p)
    assert full.hits["boom"].first.line == 20001
    capped = scanner.scan_file(p, max_bytes=4096)
    assert capped.hits["boom"].first.line == 20001  # numbers stay those of the whole log
    assert capped.bytes_scanned <= 4096


def test_adding_rules_does_not_multiply_callbacks() -> None:
    """Rules that match nothing cost no Python work: only matches reach Python."""
    many = RULES + "".join(
        rule_toml(
            f"g{i}",
            f"generated-{i:03d} failed",
            match=f'["generated-{i:03d} failed"]',
            no_match='["x"]',
        )  # fmt: skip
        for i in range(200)
    )
    calls = 0
    scanner = Scanner(rules_from(many))
    original = scanner._judge

    def counting(*args: object) -> None:
        nonlocal calls
        calls += 1
        original(*args)  # type: ignore[arg-type]

    scanner._judge = counting  # type: ignore[method-assign]
    scanner.scan_bytes(b"nothing to see here\n" * 50000 + b"boom: x\n")
    assert calls == 1


@pytest.mark.parametrize("size", [0, 1, 100, 40_000, (1 << 20) + 7, 3 << 20])
def test_newline_count_matches_bytes_count(size: int) -> None:
    rng = random.Random(size)
    data = bytearray(rng.choice(b"ab\n\r") for _ in range(min(size, 5000))) * (size // 5000 + 1)
    data = data[:size]
    for start, end in ((0, size), (size // 3, size), (7, max(7, size - 11))):
        assert count_newlines(data, start, end) == data.count(b"\n", start, end)


def test_pooled_reader_hands_out_each_chunk_in_a_buffer_of_its_own(tmp_path: Path) -> None:
    lines = [b"line %d %s" % (i, b"x" * (i % 300)) for i in range(20000)]
    path = tmp_path / "log"
    path.write_bytes(b"\n".join(lines))
    pool = logtext.BufferPool(3, 4096 + logtext.MAX_LINE)
    seen: list[bytes] = []
    held: list[bytearray] = []
    with path.open("rb") as f:
        for buf, n in logtext.buffered_line_chunks(f, 4096, pool):
            assert all(buf is not h for h in held)  # never one a consumer still holds
            seen.append(bytes(buf[:n]))
            held.append(buf)
            if len(held) == 2:  # the consumer gives buffers back late, out of order
                pool.give(held.pop(1))
    assert b"".join(seen) == path.read_bytes()
    assert all(c.endswith(b"\n") for c in seen[:-1]) and len(seen) > 100


def test_one_scanner_serves_concurrent_threads(scanner: Scanner) -> None:
    logs = [LOG * (200 * (i + 1)) + b"boom: %d\n" % i for i in range(6)]
    expected = [scanner.scan_bytes(log).matches() for log in logs]
    many = Scanner(rules_from(RULES), backend=scanner.backend, chunk_size=4096, threads=3)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda log: many.scan_bytes(log).matches(), logs * 3))
    assert got == expected * 3
