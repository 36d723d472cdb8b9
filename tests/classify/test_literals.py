"""The literals the Hyperscan pass scans for instead of the rule regexes.

They only have to be *necessary*: every line a rule matches must contain one of its literals
(or match its remaining regex); the per-line RE2 check does the rest. These tests hold the
extraction to that, on hand-written cases, on every shipped rule's examples, and end to end
against the RE2 backend (which scans for the full regexes).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import re2

from ciretry.classify import logtext
from ciretry.classify.engine import MIN_LITERAL, Scanner
from ciretry.classify.patterns import ScanPart, required_literals, scan_parts
from ciretry.classify.rules import RuleSet


@pytest.mark.parametrize(
    ("pattern", "literals", "caseless"),
    [
        (r"Killed signal (?:cc1plus|ld)\b", ["Killed signal cc1plus", "Killed signal ld"], False),
        (r"^!{5,} KeyboardInterrupt !{5,}$", ["!!!!! KeyboardInterrupt !!!!!"], False),
        (r"(?i)no space left|ENOSPC", ["ENOSPC", "no space left"], True),
        (r"fo[oO]bar", ["foObar", "foobar"], False),
        (r"ERROR:? (?:foo|bar)baz", ["ERROR barbaz", "ERROR foobaz", "ERROR: barbaz", "ERROR: foobaz"], False),
        (r"(?:abc)?defg", ["defg"], False),  # "abcdefg" holds "defg": the shorter is enough
        (r"(?P<x>hello) world", ["hello world"], False),
        (r"x(?:ab){2,}c", ["xabab"], False),
        (r"abc\d+defgh", ["defgh"], False),
    ],
)  # fmt: skip
def test_required_literals(pattern: str, literals: list[str], caseless: bool) -> None:
    assert required_literals(pattern) == (tuple(literals), caseless)


@pytest.mark.parametrize(
    "pattern",
    [
        r"a+b",  # nothing of 3 characters is certain
        r"abc|de",  # one alternative has none
        r"\x41BCDEF",  # escapes not modelled are never guessed at
        r"abc(?i)defgh",  # flags changing the rest of the pattern
        r"(?i)straße",  # RE2 folds Unicode case, Hyperscan only ASCII
        r"[a-z]+\d+",
    ],
)
def test_no_literals_when_unsure(pattern: str) -> None:
    assert required_literals(pattern) is None


def _part_hits(parts: list[ScanPart], line: str) -> bool:
    for p in parts:
        if p.regex is not None:
            if re2.search("(?m)" + p.regex, line):
                return True
        elif p.caseless:
            if any(lit.lower() in line.lower() for lit in p.literals):
                return True
        elif any(lit in line for lit in p.literals):
            return True
    return False


def test_every_matching_example_line_holds_a_scanned_literal(ruleset: RuleSet) -> None:
    for rule in ruleset.log_rules:
        parts = scan_parts(rule.log or "", MIN_LITERAL)
        for ex in rule.examples_match:
            if ex.log is None:
                continue
            for ln in logtext.iter_lines([ex.log.encode()]):
                if rule.line_matches(ln.text):
                    assert _part_hits(parts, ln.text), (rule.id, ln.text, parts)


def test_literal_scan_finds_what_the_full_regexes_find(ruleset: RuleSet, tmp_path: Path) -> None:
    """Hyperscan (literals) and RE2 (full regexes) backends agree on a noisy, dirty log."""
    examples = [
        ex.log
        for r in ruleset.rules
        for ex in (*r.examples_match, *r.examples_no_match)
        if ex.log is not None
    ]
    rng = random.Random(11)
    lines = []
    for i in range(4000):
        x = rng.random()
        ex = rng.choice(examples)
        if x < 0.3:
            lines.append(ex)
        elif x < 0.4:  # colour codes inside what a rule looks for
            cut = rng.randrange(len(ex) + 1)
            lines.append(f"\x1b[31m{ex[:cut]}\x1b[0m{ex[cut:]}")
        elif x < 0.45:
            lines.append(f"section_start:{i}:s{i % 4}\r\x1b[0K{ex}")
        elif x < 0.5:
            lines.append(f"section_end:{i}:s{(i - 1) % 4}\r\x1b[0K")
        elif x < 0.55:
            lines.append(f"2024-05-01T00:00:00.0000000Z {ex}")
        elif x < 0.6:
            lines.append(ex + "\r")
        else:
            lines.append(f"noise {i} {rng.choice(['ok', 'error', 'FAILED', '.py:', 'Killed'])}")
    log = "\n".join(lines).encode()

    def key(s: Scanner) -> object:
        r = s.scan_bytes(log)
        return r.total_lines, {
            k: (h.first.line, h.first.text, h.last.line, h.count, h.first.sections)
            for k, h in r.hits.items()
        }

    expected = key(Scanner(ruleset, backend="re2", chunk_size=4096))
    assert key(Scanner(ruleset, backend="hyperscan", chunk_size=4096, threads=1)) == expected
    assert key(Scanner(ruleset, backend="hyperscan")) == expected
    # Chunks surveyed on several threads at once, from memory and from a file read into a
    # pool of reused buffers, put together in log order: the same result.
    assert key(Scanner(ruleset, backend="hyperscan", chunk_size=4096, threads=3)) == expected
    path = tmp_path / "dirty.log"
    path.write_bytes(log)
    for threads in (1, 3):
        s = Scanner(ruleset, backend="hyperscan", chunk_size=4096, threads=threads)
        r = s.scan_file(path)
        got = r.total_lines, {
            k: (h.first.line, h.first.text, h.last.line, h.count, h.first.sections)
            for k, h in r.hits.items()
        }
        assert got == expected and r.bytes_scanned == len(log)
