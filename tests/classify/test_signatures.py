"""The tail a signature is read from, and where the failure report sits in it."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import pytest

from ciretry.classify import logtext, signatures
from ciretry.classify.logsignals import AFTER_FAILURE_LINES, LogFacts
from ciretry.classify.signatures import tail_lines
from ciretry.common import signature


def every_tail_line(
    chunks: Sequence[bytes], *, first_line: int, facts: LogFacts
) -> tuple[list[str], int | None]:
    """The reference: every line of the last TAIL_BYTES decoded, the failure report found by
    counting every newline of the log (how ``tail_lines`` worked before it read only the lines
    the signature reads)."""
    head = chunks[:-4] if len(chunks) > 4 else ()
    data = b"".join(chunks[-4:]) if head else b"".join(chunks)
    cut = 0
    if len(data) > signatures.TAIL_BYTES:
        cut = data.find(b"\n", len(data) - signatures.TAIL_BYTES)
        cut = cut + 1 if cut >= 0 else len(data) - signatures.TAIL_BYTES
    lines = logtext.decode(logtext.clean(data[cut:])).split("\n")
    assert facts.failure_line is not None
    start = first_line + sum(c.count(b"\n") for c in head) + data.count(b"\n", 0, cut)
    end: int | None = facts.failure_line - start + 1 + AFTER_FAILURE_LINES
    return lines, None if end is None or end <= 0 else end


def read(lines: list[str], end: int | None) -> list[str]:
    """The lines the signature's walk reads (``signature._error_block``)."""
    stop = len(lines) if end is None else max(0, min(end, len(lines)))
    return lines[max(0, stop - signature.SIGNATURE_TAIL_LINES) : stop]


def a_log(rng: random.Random) -> tuple[bytes, list[bytes]]:
    lines = [
        b"line %d %s%s" % (i, b"z" * rng.randrange(0, 40), rng.choice([b"", b"\r", b"\x1b[31m"]))
        for i in range(rng.randrange(1, 400))
    ]
    return b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b""), lines


def split_anywhere(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 9))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def logs_cut_anywhere(
    rng: random.Random, times: int
) -> Iterator[tuple[list[bytes], int, int, LogFacts, bytes]]:
    """One log, ``times`` ways: its pieces, the number of its first line and of its last, a
    failure report anywhere in it, and its last line."""
    data, lines = a_log(rng)
    first_line = rng.choice([1, 1, 501])
    total = first_line - 1 + data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    for _ in range(times):
        facts = LogFacts(failure_line=rng.randrange(first_line, total + 1))
        yield split_anywhere(data, rng), first_line, total, facts, lines[-1]


@pytest.mark.parametrize("seed", range(6))
def test_numbering_the_tail_from_the_scans_line_count_agrees_with_counting_the_log(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``classify`` passes the scan's line count, so the failure report is found back from the
    end instead of counting every newline of the log before it: same lines, same end of the
    failure block, however the log was split and whether it ends in a newline."""
    rng = random.Random(seed)
    monkeypatch.setattr(signatures, "TAIL_BYTES", rng.choice([64, 300, 5000]))
    for pieces, first_line, total, facts, _ in logs_cut_anywhere(rng, 20):
        counted = tail_lines(pieces, first_line=first_line, facts=facts)
        numbered = tail_lines(pieces, first_line=first_line, facts=facts, total_lines=total)
        assert numbered == counted


@pytest.mark.parametrize("seed", range(12))
def test_the_lines_read_are_those_of_the_whole_tail_decoded(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the lines the signature reads are split and decoded: they are the ones it read
    when every line of the tail was, wherever the failure report is (before the tail, in it,
    at its end), with few or many lines, long or short, and a first guess at where the lines
    start that falls short."""
    rng = random.Random(seed)
    monkeypatch.setattr(signatures, "TAIL_BYTES", rng.choice([64, 300, 5000, 1 << 20]))
    monkeypatch.setattr(signatures, "LINE_GUESS", rng.choice([1, 4, 64]))
    window = rng.choice([3, 20, 400])
    monkeypatch.setattr(signature, "SIGNATURE_TAIL_LINES", window)
    monkeypatch.setattr(signatures, "SIGNATURE_TAIL_LINES", window)
    for pieces, first_line, total, facts, last in logs_cut_anywhere(rng, 30):
        got, end = tail_lines(pieces, first_line=first_line, facts=facts, total_lines=total)
        assert read(got, end) == read(*every_tail_line(pieces, first_line=first_line, facts=facts))
        assert len(got) <= window
        without, no_end = tail_lines(pieces, first_line=first_line, total_lines=total)
        assert no_end is None
        assert without[-1] in ("", logtext.decode(logtext.clean(last)))
        assert read(without, None) == read(
            every_tail_line(pieces, first_line=first_line, facts=facts)[0], None
        )


def test_a_line_cut_by_the_guess_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve lines wanted, the guess 9 bytes a line, the lines 10: the guessed start falls
    inside a line, with exactly twelve pieces after it. The cut line is not one of them: the
    guess goes further back."""
    monkeypatch.setattr(signatures, "LINE_GUESS", 9)
    monkeypatch.setattr(signature, "SIGNATURE_TAIL_LINES", 12)
    monkeypatch.setattr(signatures, "SIGNATURE_TAIL_LINES", 12)
    data = b"".join(b"line %04d\n" % i for i in range(40))
    got, end = tail_lines([data], total_lines=40)
    assert end is None
    assert got == [f"line {i:04d}" for i in range(29, 40)] + [""]
