"""The tail a signature is read from, and where the failure report sits in it."""

from __future__ import annotations

import random

import pytest

from ciretry.classify import signatures
from ciretry.classify.logsignals import LogFacts
from ciretry.classify.signatures import tail_lines


@pytest.mark.parametrize("seed", range(6))
def test_numbering_the_tail_from_the_scans_line_count_agrees_with_counting_the_log(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``classify`` passes the scan's line count, so the tail's first line is numbered back
    from the end instead of counting every newline of the log before it: same lines, same
    end of the failure block, however the log was split and whether it ends in a newline."""
    rng = random.Random(seed)
    monkeypatch.setattr(signatures, "TAIL_BYTES", rng.choice([64, 300, 5000]))
    lines = [b"line %d %s" % (i, b"z" * rng.randrange(0, 40)) for i in range(rng.randrange(1, 400))]
    data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
    first_line = rng.choice([1, 1, 501])
    total = first_line - 1 + data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 9))))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        facts = LogFacts(failure_line=rng.randrange(first_line, total + 1))
        counted = tail_lines(pieces, first_line=first_line, facts=facts)
        numbered = tail_lines(pieces, first_line=first_line, facts=facts, total_lines=total)
        assert numbered == counted
        assert counted[0][-1] in ("", lines[-1].decode())
