"""The signature's fast paths give exactly what the plain definitions give.

``normalize_line`` skips a mask when the line lacks what the mask needs (a digit, a ``-``, a
path prefix), and the error test lowercases ASCII lines instead of folding case in the regular
expression. A signature id is what learned state is keyed by (``sig-v2``): any difference
would be a silent new algorithm. So both are checked against the definitions written out
plainly here, on every tail line of the real logs in the repository and the shared fixtures,
and on generated lines made of what the masks look for.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ciretry.common import signature
from ciretry.common.signature import MAX_LINE_CHARS, normalize_line

ROOTS = (
    Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "logs",
    Path(__file__).resolve().parents[1] / "corpus",
)


def plain_normalize(line: str) -> str:
    """``normalize_line`` as defined: every mask in order, no shortcut."""
    text = signature._PROVIDER_PREFIX.sub("", line.strip())
    for rx, repl in signature._MASKS:
        text = rx.sub(repl, text)
    text = signature._REPEATS.sub(r"\1", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:MAX_LINE_CHARS]


def plain_errorish(line: str) -> bool:
    return signature._ERRORISH.search(line) is not None


def plain_unprefixed(line: str) -> str:
    return signature._PROVIDER_PREFIX.sub("", line.strip())


def plain_is_progress(text: str) -> bool:
    if signature._PERCENT.search(text) is not None:
        return True
    numbers = len(signature._NUMBER.findall(text))
    return numbers >= 2 and numbers >= len(signature._WORD.findall(text))


def plain_is_error(text: str) -> bool:
    """Not runner boilerplate, and error-looking or a runner report (naming a reason)."""
    if signature._RUNNER_NOISE.search(text) is not None:
        return False
    report = signature._RUNNER_REPORT.search(text)
    if report is not None:
        rest = signature._REPORT_FILLER.sub(" ", normalize_line(text[report.end() :]))
        if not any(len(word) >= 3 for word in rest.split()):
            return False
    return plain_errorish(text) or report is not None


def agree_line_by_line(line: str) -> None:
    """The walk's per-line tests, fast and plain, on the line as the walk sees it."""
    text = signature._unprefixed(line)
    assert text == plain_unprefixed(line)
    assert signature.is_progress(text) == plain_is_progress(text)
    assert signature._is_error(text) == plain_is_error(text)


def _tail_lines() -> list[str]:
    lines: list[str] = []
    for root in ROOTS:
        for path in sorted(root.rglob("*")):
            if path.suffix not in (".log", ".gz"):
                continue
            raw = path.read_bytes()
            data = gzip.decompress(raw) if path.suffix == ".gz" else raw
            text = data[-64 * 1024 :].decode("utf-8", "replace")
            lines.extend(text.splitlines()[-120:])
    return lines


def test_the_fast_paths_agree_with_the_definitions_on_every_real_tail_line() -> None:
    lines = _tail_lines()
    assert len(lines) > 10_000  # the corpus is there: this is not a vacuous pass
    normalized = [normalize_line(x) for x in lines]
    assert normalized == [plain_normalize(x) for x in lines]
    assert [signature._errorish(x) for x in lines] == [plain_errorish(x) for x in lines]
    for x in lines:
        agree_line_by_line(x)
    texts = [signature._unprefixed(x) for x in lines]
    # Each outcome of the per-line tests occurs on these lines.
    assert sum(map(signature._is_error, texts)) > 200 and sum(map(signature.is_progress, texts)) > 50
    assert sum(t != x.strip() for t, x in zip(texts, lines, strict=True)) > 100  # prefixes cut
    # The masks did work on these lines (the comparison covers lines they change).
    assert sum(n != " ".join(x.split()) for n, x in zip(normalized, lines, strict=True)) > 500


#: What the masks and the error words are made of, and characters that fold case oddly.
_PIECES = st.sampled_from(
    [
        "2026-11-30", "T", "10:11:12", ".123", "Z", "+02:00", " ", "  ", "\t", "-", ":", ".",
        ",", "/", "/tmp/", "/var/folders/x", "C:\\Users\\me\\AppData\\Local\\Temp\\a",
        "pytest-of-root/p0", "0x", "0X1F", "deadbeef", "1234567", "abcdef0", "Mon", "Tue, ",
        " Dec ", "3", "12", "2024", "192.168.0.1", ":8080", "[::1]", "[fe80::1]:443", "12.5s",
        "300 ms", "2m", "<n>", "ERROR", "error", "Failed", "TIMED OUT", "timed out", "İ",
        "ſ", "K", "Error:", "nvalid", "İnvalid", "exception", "errors", "_", "é", "ß",
        "a" * 30 + "1", "aGVsbG8td29ybGQtMTIzNDU2Nzg5MA", "é1", "\u00a0", "\u2003",
        "\x1c", "Traceback", "ABORT", "can't", "could not", "%", "50%", "٣", "[info ",
        "2026-11-30T10:11:12Z ", "##[error]", "Process completed with exit code 1",
        "ERROR: Job failed: ", "Cleaning up", " (system failure)",
    ]
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_the_fast_paths_agree_with_the_definitions_on_generated_lines(line: str) -> None:
    assert normalize_line(line) == plain_normalize(line)
    assert signature._errorish(line) == plain_errorish(line)
    agree_line_by_line(line)
