"""The failure signature of a classified job (pure): its log's tail as a person reads it, the
lines its fired rules matched and its signals, through ``ciretry.common.signature``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ciretry.common.events import FailureSignature, VerdictReached
from ciretry.common.signature import SIGNATURE_TAIL_LINES, signature_of

from . import logtext
from .logsignals import AFTER_FAILURE_LINES, LogFacts

#: Bytes of the log's end read for the last error block (the block is in the last few hundred
#: lines; a line is rarely longer than a few hundred bytes).
TAIL_BYTES: Final = 128 * 1024
#: Bytes a line takes on average, at most in most logs: where to start looking for the lines.
LINE_GUESS: Final = 64
#: Verdicts that are not failures to learn from.
NO_SIGNATURE: Final = frozenset({"cancelled"})


def tail_lines(
    chunks: Sequence[bytes] | None,
    *,
    first_line: int = 1,
    facts: LogFacts | None = None,
    total_lines: int | None = None,
) -> tuple[list[str], int | None]:
    """The lines at the log's end that the signature reads (cleaned, decoded), and the index
    just after the runner's failure report among them (None when the log does not say where
    the job died).

    They are the last ``SIGNATURE_TAIL_LINES`` before that index (or before the end) among the
    lines of the last ``TAIL_BYTES``, and only they are split, cleaned and decoded, found from
    the end: splitting and decoding the whole 128 KiB (two thousand lines of a 1 MB log) to
    read four hundred cost its verdict 0.4 ms. Cleaning and decoding never add or remove a
    newline, so the lines of the bytes are the lines of the text.

    ``total_lines``: the number of the log's last line, as the scan counted it. With it, the
    failure report is found back from the end; without it, by counting the newlines of the
    whole log (a pass over every byte: at a gigabyte per second, a tenth of what the scan
    itself costs)."""
    if not chunks:
        return [], None
    # The last chunks, at most four, only as many as hold the last TAIL_BYTES (a 1 MB log
    # arrives in 256 KiB chunks: joining four to cut 128 KiB off the end copied a megabyte).
    taken, held = 0, 0
    while taken < min(4, len(chunks)) and held <= TAIL_BYTES:
        taken += 1
        held += len(chunks[-taken])
    head = chunks[:-taken]
    data = b"".join(chunks[-taken:])
    cut = 0
    if len(data) > TAIL_BYTES:
        cut = data.find(b"\n", len(data) - TAIL_BYTES)
        cut = cut + 1 if cut >= 0 else len(data) - TAIL_BYTES
    # The tail is data[cut:], its lines what splitting it at each newline gives (after a final
    # newline, an empty one): ``after`` of them, at its end, come after the index returned.
    report = facts.failure_line if facts is not None else None
    after = 0
    if report is not None:
        if total_lines is None:
            before = first_line - 1 + sum(c.count(b"\n") for c in head)
            total_lines = before + data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        ends_line = cut == len(data) or data.endswith(b"\n")  # the empty line after it
        # Up to AFTER_FAILURE_LINES past the report: what the runner prints right after it
        # (its own lines are left out as boilerplate), so a line printed a moment earlier or
        # later in a rerun does not move the block's end.
        after = ends_line + total_lines - report - AFTER_FAILURE_LINES
    # The last ``after + SIGNATURE_TAIL_LINES`` lines of the tail: split from a guess at where
    # they start, further back until they are all there. A tail that short is read whole.
    want = max(0, after) + SIGNATURE_TAIL_LINES
    size = LINE_GUESS * want
    start = max(cut, len(data) - size)
    raw: list[bytes] | None = None
    while start > cut:
        raw = data[start:].split(b"\n")
        if len(raw) > want:  # the first piece may be the end of a longer line: not one
            raw = raw[-want:]
            break
        raw, size = None, size * 4
        start = max(cut, len(data) - size)
    if raw is None:
        lines = logtext.decode(logtext.clean(data[cut:])).split("\n")
    count = len(raw if raw is not None else lines)
    # The report before the tail (end <= 0): as if the log did not say.
    end = count - after if report is not None and count > after else None
    stop = count if end is None else min(end, count)
    first = max(0, stop - SIGNATURE_TAIL_LINES)
    if raw is not None:
        lines = logtext.decode(logtext.clean(b"\n".join(raw[first:stop]))).split("\n")
    else:
        lines = lines[first:stop]
    return lines, None if end is None else len(lines)


def signature_for(
    verdict: VerdictReached,
    chunks: Sequence[bytes] | None,
    *,
    first_line: int = 1,
    facts: LogFacts | None = None,
    total_lines: int | None = None,
) -> FailureSignature | None:
    """The signature of a failed job's verdict; None for a cancel (not a failure).
    ``total_lines``: as for ``tail_lines``."""
    if verdict.category in NO_SIGNATURE:
        return None
    lines, end = tail_lines(chunks, first_line=first_line, facts=facts, total_lines=total_lines)
    signals = verdict.signals
    exit_code = signals.get("exit_code")
    pods = signals.get("pod_reasons")
    reason = signals.get("failure_reason")
    return signature_of(
        lines,
        end=end,
        matched=[e.text for e in verdict.evidence if e.text],
        failure_reason=reason if isinstance(reason, str) else None,
        exit_code=exit_code if isinstance(exit_code, int) else None,
        pod_reasons=pods.split(",") if isinstance(pods, str) and pods else (),
    )
