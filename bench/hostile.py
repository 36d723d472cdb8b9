"""Benchmark of classify on hostile input: the timings tests/security/test_hostile_logs.py used
to assert (tests assert bounds and results; how long things take is measured here).

Run with no arguments: ``.venv/bin/python bench/hostile.py``. It measures

1. catastrophic-backtracking patterns loaded as rules (RE2 checks their examples) and scanned
   by each engine (Hyperscan when installed, RE2) on hostile lines of n and 4n characters: the
   time ratio t(4n) / t(n) is about 4 on a linear-time engine. Python's ``re`` (backtracking) is
   shown beside it on the same pattern at tiny sizes, where each extra character doubles its time;
2. one 300 MB line (no newline until the end, an error there) through ``Scanner.scan``: time,
   MB/s and RSS growth (sampled every 5 ms);
3. 64 MB of random bytes: time and MB/s;
4. loading a rule file of those patterns with 50,000-character examples: time.

Everything runs in this process; nothing else is needed. The last line is ``BENCH {json}``, its
headline ``ratio`` the worst t(4n) / t(n) of any pattern on any engine (linear: about 4).
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ciretry.classify.engine import HAVE_HYPERSCAN, Scanner  # noqa: E402
from ciretry.classify.rules import load_ruleset, ruleset_from_texts  # noqa: E402
from tests.support.memory import peak_rss_growth  # noqa: E402

MB = 1024 * 1024
N = 50_000
ROUNDS = 3

#: (pattern, a line it matches, the hostile line of n characters it must not match)
PATTERNS: list[tuple[str, str, Callable[[int], str]]] = [
    (r"(a+)+$", "aaaa", lambda n: "a" * n + "!"),
    (r"(a|aa)+$", "aa", lambda n: "a" * n + "!"),
    (r"(a|a?)+b", "aab", lambda n: "a" * n + "!"),
    (r"(.*a){20}", "a" * 20, lambda n: "a" * 19 + "b" * n),
    (r"(x+x+)+y", "xxy", lambda n: "x" * n + "!"),
    (r"([a-zA-Z]+)*@", "a@", lambda n: "a" * n + "!"),
]


def rule_text(rule_id: str, pattern: str, match: str, no_match: str) -> str:
    return (
        f'[[rule]]\nid = "{rule_id}"\ncategory = "infra_network"\nbudget = "system"\n'
        f"log = '{pattern}'\n"
        f'[rule.examples]\nmatch = ["{match}"]\nno_match = ["{no_match}"]\n'
    )


def best(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def scan_seconds(scanner: Scanner, data: bytes) -> float:
    return best(lambda: scanner.scan([data]))


def peak_rss_growth_of(fn: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak RSS growth in bytes) of ``fn``."""
    with peak_rss_growth() as growth:
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
    return elapsed, growth[0]


def one_long_line(total: int) -> Iterator[bytes]:
    block = b"x" * MB
    for _ in range(total // MB):
        yield block
    yield b" Could not resolve host: gitlab.example\n"


def garbage(total: int, seed: int = 7) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(total // MB):
        yield rng.randbytes(MB)


def python_re_seconds(pattern: str, line: str) -> float:
    return best(lambda: re.search(pattern, line), rounds=1)


def main() -> int:
    backends = ["hyperscan", "re2"] if HAVE_HYPERSCAN else ["re2"]
    print(f"1. catastrophic patterns, hostile lines of {N:,} and {4 * N:,} characters (x4 lines)")
    print(f"   {'pattern':<16}" + "".join(f"{b:>26}" for b in backends))
    ratios: dict[str, float] = {}
    for pattern, match, hostile in PATTERNS:
        rules = ruleset_from_texts([("evil.toml", rule_text("evil", pattern, match, hostile(8)))])
        cells = []
        for backend in backends:
            scanner = Scanner(rules, backend=backend)
            small = (hostile(N) + "\n").encode() * 4
            large = (hostile(4 * N) + "\n").encode() * 4
            assert scanner.scan([small]).rule_ids == [] == scanner.scan([large]).rule_ids
            t_small, t_large = scan_seconds(scanner, small), scan_seconds(scanner, large)
            ratio = t_large / max(t_small, 1e-6)
            ratios[f"{pattern} {backend}"] = ratio
            cells.append(f"{t_small * 1e3:7.2f} / {t_large * 1e3:7.2f} ms x{ratio:4.1f}")
        print(f"   {pattern:<16}" + "".join(f"{c:>26}" for c in cells))
    nested = PATTERNS[0]
    backtracking = [(n, python_re_seconds(nested[0], nested[2](n))) for n in (16, 18, 20, 22)]
    print(
        f"   Python re (backtracking) on {nested[0]!r}: "
        + ", ".join(f"n={n}: {s * 1e3:.0f} ms" for n, s in backtracking)
        + f" (x{backtracking[-1][1] / max(backtracking[0][1], 1e-9):.0f} for 6 more characters)"
    )

    scanner = Scanner(load_ruleset())
    total = 300 * MB
    found: list[str] = []
    long_s, long_growth = peak_rss_growth_of(
        lambda: found.extend(scanner.scan(one_long_line(total)).rule_ids)
    )
    print(
        f"2. one 300 MB line ({scanner.backend}): {long_s:.2f} s, {total / MB / long_s:,.0f} MB/s, "
        f"RSS +{long_growth / MB:.0f} MB, found {found}"
    )

    garbage_s = best(lambda: scanner.scan(garbage(64 * MB)), rounds=1)
    print(f"3. 64 MB of random bytes: {garbage_s:.2f} s, {64 / garbage_s:,.0f} MB/s")

    body = "\n".join(rule_text(f"evil{i}", p, m, h(N)) for i, (p, m, h) in enumerate(PATTERNS))
    load_s = best(lambda: ruleset_from_texts([("evil.toml", body)]))
    print(f"4. rule file of {len(PATTERNS)} evil patterns, {N:,}-character examples: "
          f"loaded in {load_s * 1e3:.0f} ms")  # fmt: skip

    worst = max(ratios, key=lambda k: ratios[k])
    print(f"worst t(4n)/t(n): {ratios[worst]:.1f} ({worst}); linear is about 4")
    print("BENCH " + json.dumps({
        "ratio": round(ratios[worst], 2),
        "worst_pattern": worst,
        "scan_ratio_4n_over_n": {k: round(v, 2) for k, v in ratios.items()},
        "python_re_nested_ms": {str(n): round(s * 1e3, 1) for n, s in backtracking},
        "long_line_300mb_s": round(long_s, 3),
        "long_line_rss_growth_mb": round(long_growth / MB, 1),
        "garbage_64mb_s": round(garbage_s, 3),
        "evil_rule_file_load_ms": round(load_s * 1e3, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
