"""The failure signature of a classified job (pure): its log's tail as a person reads it, the
lines its fired rules matched and its signals, through ``ciretry.common.signature``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ciretry.common.events import FailureSignature, VerdictReached
from ciretry.common.signature import signature_of

from . import logtext
from .logsignals import AFTER_FAILURE_LINES, LogFacts

#: Bytes of the log's end read for the last error block (the block is in the last few hundred
#: lines; a line is rarely longer than a few hundred bytes).
TAIL_BYTES: Final = 128 * 1024
#: Verdicts that are not failures to learn from.
NO_SIGNATURE: Final = frozenset({"cancelled"})


def tail_lines(
    chunks: Sequence[bytes] | None,
    *,
    first_line: int = 1,
    facts: LogFacts | None = None,
    total_lines: int | None = None,
) -> tuple[list[str], int | None]:
    """The last lines of the log (cleaned, decoded) and the index just after the runner's
    failure report among them (None when the log does not say where the job died).

    ``total_lines``: the number of the log's last line, as the scan counted it. With it, the
    tail's first line is numbered back from the end; without it, by counting the newlines of
    the whole log before the tail (a pass over every byte: at a gigabyte per second, a tenth of
    what the scan itself costs)."""
    if not chunks:
        return [], None
    head = chunks[:-4] if len(chunks) > 4 else ()
    data = b"".join(chunks[-4:]) if head else b"".join(chunks)
    cut = 0
    if len(data) > TAIL_BYTES:
        cut = data.find(b"\n", len(data) - TAIL_BYTES)
        cut = cut + 1 if cut >= 0 else len(data) - TAIL_BYTES
    tail = data[cut:]
    lines = logtext.decode(logtext.clean(tail)).split("\n")
    end: int | None = None
    if facts is not None and facts.failure_line is not None:
        if total_lines is not None:
            in_tail = tail.count(b"\n") + (1 if tail and not tail.endswith(b"\n") else 0)
            start = total_lines - in_tail + 1
        else:
            start = first_line + sum(c.count(b"\n") for c in head) + data.count(b"\n", 0, cut)
        # failure_line is 1-based in the whole log; lines[0] is line ``start``.
        # Up to AFTER_FAILURE_LINES past it: what the runner prints right after the report
        # (its own lines are left out as boilerplate), so a line printed a moment earlier or
        # later in a rerun does not move the block's end.
        end = facts.failure_line - start + 1 + AFTER_FAILURE_LINES
        if end <= 0:
            end = None
    return lines, end


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
