"""Failure signatures: the decisive lines of a failed job, normalized so reruns of one failure
agree and different failures do not, and a stable cluster id (issue 15).

Pure and line-oriented. A signature is made of

* the job's **last error block**: the last run of error-looking lines of the log before the
  runner's own failure report (or, when no line looks like an error, the last few lines with
  text), as a sorted set, so that output interleaved differently by parallel processes still
  gives the same signature. Progress and heartbeat lines (``is_progress``) are never part of
  it and do not separate its lines; the runner's failure report is, when it names a reason
  ("Job failed (system failure): ... timed out waiting for pod to start") rather than only an
  exit code;
* the lines the **fired rules matched** (``Evidence.text``);
* the **provider's failure reason**, the **exit code** and the **pod reasons**.

Every line is masked the way LUCI Analysis' ``reason-v6`` clustering masks failure reasons, and
a little further for CI logs: timestamps, UUIDs, hexadecimal ids and hashes, IP addresses and
ports, temporary paths, durations and every remaining number become placeholders (``<ts>``,
``<uuid>``, ``<hex>``, ``<ip>``, ``<port>``, ``<tmp>``, ``<n>``). The cluster id is a hash of the
normalized text, prefixed with the algorithm's version (``ALGORITHM``): a change of the masking
is a new version, whose ids never collide with an older one's.

Versions: ``sig-v1`` (issue 15's first cut) left every runner report out and took chatter for
decisive lines when a log had no error-looking line; ``sig-v2`` is the selection above. What
was learned is keyed by the id, version included: learned states of ``sig-v1`` ids stay in the
log (replay folds them) but match no new verdict, so each failure is learned again under
``sig-v2`` (docs/learning.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from .events import FailureSignature

#: Version of the masking and selection; part of every cluster id (a change is a new version).
ALGORITHM: Final = "sig-v2"
#: Distinct error lines kept from the last error block.
MAX_BLOCK_LINES: Final = 24
#: Lines with text but no error between two lines of one block, at most (progress lines
#: not counted).
BLOCK_GAP: Final = 20
#: Lines kept when no line looks like an error.
FALLBACK_LINES: Final = 3
#: Only this many lines at the end of the log are looked at for the last error block.
SIGNATURE_TAIL_LINES: Final = 400
#: A normalized line longer than this is cut (the event must stay small).
MAX_LINE_CHARS: Final = 240
#: Lines of the block (as logged, not masked) kept on the signature: for people to read, and
#: for `ciretry rules backtest` to judge candidate rules on.
MAX_EXAMPLES: Final = 8

# --- masking (order matters: the specific before the general) ---------------------------------

_PROVIDER_PREFIX = re.compile(
    r"^(?:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z |\[[a-z]+ \d{4}-\d\d-\d\d[T ][\d:.]+Z\] )"
)
_MASKS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # ISO-8601 and common log timestamps, with optional fraction and zone.
    (
        re.compile(
            r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d)?(?:[.,]\d+)?)?(?:Z|[+-]\d\d:?\d\d)?\b"
        ),
        "<ts>",
    ),
    (re.compile(r"\b\d\d:\d\d:\d\d(?:[.,]\d+)?\b"), "<ts>"),
    (
        re.compile(
            r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),? \d{1,2} "
            r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]* \d{4}\b"
        ),
        "<ts>",
    ),
    (
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
        "<uuid>",
    ),
    # Temporary paths: the random part differs on every run.
    (
        re.compile(
            r"(?:/private)?(?:/tmp|/var/tmp|/var/folders|/dev/shm|/run/user/\d+)(?:/[^\s'\":;,)\]]*)?"
            r"|[A-Za-z]:\\(?:Users\\[^\\\s]+\\AppData\\Local\\)?Temp(?:\\[^\s'\":;,)\]]*)?"
            r"|\bpytest-of-[^\s/]+(?:/[^\s'\":;,)\]]*)?"
        ),
        "<tmp>",
    ),
    # IPv4 with an optional port, IPv6 in brackets (a host's port is a number: masked below).
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b"), "<ip>"),
    (re.compile(r"\[[0-9a-fA-F:]*:[0-9a-fA-F:]+\](?::\d{1,5})?"), "<ip>"),
    # Hexadecimal: 0x pointers, and hashes / ids of 7+ hex digits with at least one digit.
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,}\b"), "<hex>"),
    # Long base64-like tokens (request ids, signed URLs' signatures).
    (re.compile(r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{24,}\b"), "<id>"),
    # Durations (1.5s, 300ms, 2m13s, 0.52 seconds) then every remaining number.
    (
        re.compile(
            r"\b\d+(?:\.\d+)?\s?(?:ns|us|µs|ms|s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)\b"
            r"(?:\s?\d+(?:\.\d+)?\s?(?:ms|s|sec|secs|seconds?))?"
        ),
        "<dur>",
    ),
    (re.compile(r"\d+(?:[.,]\d+)*"), "<n>"),
)
#: Runs of the same placeholder (``<n>.<n>.<n>``, ``<n> <n>``) count as one.
_REPEATS = re.compile(r"(<(?:n|hex|id)>)(?:[\s.,:/_-]*<(?:n|hex|id)>)+")


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


def _maybe_tmp(text: str) -> bool:
    return any(part in text for part in _TMP_PARTS)


def _maybe_weekday(text: str) -> bool:
    return any(day in text for day in _WEEKDAYS)


_DIGIT = re.compile(r"\d")
_TMP_PARTS: Final = ("/tmp", "/var/", "/dev/shm", "/run/user/", "Temp", "pytest-of-")
_WEEKDAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
#: For each mask in ``_MASKS``, what a line must contain for it to match at all: a regular
#: expression costs ~10 µs a line in Python's ``re`` even when it matches nothing, and most
#: lines hold no timestamp, path or address. A mask can only remove digits, so a line
#: without any skips every numeric mask. Needed conditions only: the result is the same.
_MASK_NEEDS: Final[tuple[Callable[[str], bool], ...]] = (
    lambda t: "-" in t,  # ISO date
    lambda t: ":" in t,  # hh:mm:ss
    _maybe_weekday,
    lambda t: "-" in t,  # uuid
    _maybe_tmp,
    lambda t: "." in t,  # IPv4
    lambda t: "[" in t and ":" in t,  # IPv6
    lambda t: "0x" in t or "0X" in t,
    lambda t: True,  # hex ids
    lambda t: True,  # base64-like ids
    lambda t: True,  # durations
    lambda t: True,  # numbers
)
#: Masks that match nothing without a digit (every one but the temporary paths, IPv6 and uuid).
_NUMERIC: Final = frozenset({0, 1, 2, 5, 7, 8, 9, 10, 11})


def _unprefixed(line: str) -> str:
    """The line without surrounding space and the provider's timestamp prefix, which starts
    with a digit or ``[`` (the check skips the regular expression on every other line)."""
    text = line.strip()
    first = text[:1]
    if first == "[" or first.isdecimal():  # what ``\d`` matches
        return _PROVIDER_PREFIX.sub("", text)
    return text


def normalize_line(line: str) -> str:
    """One log line with everything that differs between reruns masked (pure)."""
    text = _unprefixed(line)
    digits = _has_digit(text)
    for at, (rx, repl) in enumerate(_MASKS):
        if (digits or at not in _NUMERIC) and _MASK_NEEDS[at](text):
            text = rx.sub(repl, text)
    if "<" in text:
        text = _REPEATS.sub(r"\1", text)
    # str.split() and re's \s agree on what whitespace is (Py_UNICODE_ISSPACE).
    text = " ".join(text.split())
    return text[:MAX_LINE_CHARS]


# --- selecting the decisive lines --------------------------------------------------------------

#: A line that reads as an error.
_ERRORISH = re.compile(
    r"(?i)\b(?:error|errors|fatal|fail|failed|failure|failures|exception|traceback|panic|"
    r"killed|denied|refused|unreachable|timed? ?out|timeout|cannot|can't|could not|couldn't|"
    r"unable to|no such|not found|segmentation fault|core dumped|aborted|abort|assert\w*|"
    r"undefined reference|unresolved|missing|invalid|unexpected|broken|oom|out of memory|"
    r"no space left|reset by peer)\b"
)
#: The runner's report that the job failed. Every failed job has one, so it says nothing by
#: itself ("ERROR: Job failed: exit code 1", "Process completed with exit code 2."), unless
#: what follows the report's stem names a reason ("ERROR: Job failed (system failure): prepare
#: environment: waiting for pod running: timed out", "[taskcluster:error] Task timeout after
#: 3600 seconds"): then that line is the most decisive line the log has.
_RUNNER_REPORT = re.compile(
    r"(?i)^(?:##\[error\])?(?:process completed with exit code|"
    r"error: job failed|job failed|the command \".*\" exited with|"
    r"done\. your build exited with|exited with code|finished: failure|"
    r"script returned exit code|build step '.*' marked build as failure|"
    r"\[taskcluster:error\]|unsuccessful task run with exit code|"
    r"error: process completed with exit code)"
)
#: What else the runner prints around the job's end (no discrimination either).
_RUNNER_NOISE = re.compile(
    r"(?i)^(?:##\[error\])?(?:cleaning up|uploading artifacts|saving cache|"
    r"##\[error\]the operation was canceled|\[taskcluster\] |post job cleanup|"
    r"section_end|##\[endgroup\])"
)
#: Words of a report that name no reason: what remains after them is the reason, if any.
_REPORT_FILLER = re.compile(
    r"(?i)\b(?:exit|exited|code|status|with|signal|failed|failure|error|the|job|step|"
    r"command|script|returned|build|process|completed|completing|task|run|in|after)\b|<\w+>|"
    r"[^a-z\s]"
)
#: Counters of progress and heartbeat lines ("Downloading 3 of 12 layers (25%)", "[worker 2]
#: heartbeat 41 ok 7", "Receiving objects: 45% (123/456)"): output of parallel processes that
#: lands anywhere in a rerun, and never says why a job failed.
#: A number standing alone (a counter), not part of a name or a version ("python3",
#: "black==22.1b0", "-1").
_NUMBER = re.compile(r"(?<![\w.=-])\d+(?:[.,:]\d+)*(?!\w)")
_WORD = re.compile(r"[A-Za-z]{2,}")
_PERCENT = re.compile(r"\d(?:\.\d+)?\s?%")


def _is_boilerplate(text: str) -> bool:
    """A runner line that says nothing about why the job failed: noise, or a failure report
    without a reason (pure)."""
    return _boilerplate_or_report(text) is not False


def _boilerplate_or_report(text: str) -> bool | None:
    """True: boilerplate (``_is_boilerplate``); None: a runner report that names a reason;
    False: neither (one search of each runner pattern, for ``_is_error``)."""
    if _RUNNER_NOISE.search(text) is not None:
        return True
    report = _RUNNER_REPORT.search(text)
    if report is None:
        return False
    rest = _REPORT_FILLER.sub(" ", normalize_line(text[report.end() :]))
    return True if not any(len(word) >= 3 for word in rest.split()) else None


def is_progress(text: str) -> bool:
    """A progress or heartbeat line: a percentage, or at least as many numbers as words (pure).
    Such lines are interleaved differently in every rerun; they are never decisive and do not
    separate the lines of one error block."""
    if "%" in text and _PERCENT.search(text) is not None:
        return True
    if not _has_digit(text):
        return False  # no number at all (both patterns need a digit)
    numbers = len(_NUMBER.findall(text))
    return numbers >= 2 and numbers >= len(_WORD.findall(text))


#: ``_ERRORISH`` without ``(?i)``, for lowercased ASCII text: the same matches (ASCII case
#: folding is all ``(?i)`` does there) at a third of the cost. Python's ``re`` folds case at
#: every position of every alternative, and this search runs on every line of a log's tail.
_ERRORISH_ASCII = re.compile(_ERRORISH.pattern.removeprefix("(?i)"))


def _errorish(text: str) -> bool:
    if text.isascii():
        return _ERRORISH_ASCII.search(text.lower()) is not None
    # Outside ASCII, (?i) folds a few characters that ``lower`` does not ("İ", "ſ").
    return _ERRORISH.search(text) is not None


def _is_error(text: str) -> bool:
    kind = _boilerplate_or_report(text)
    if kind is None:
        return True  # a runner report naming a reason
    return not kind and _errorish(text)


def last_error_block(lines: Sequence[str], *, end: int | None = None) -> list[str]:
    """The decisive lines of a log's tail, as logged (not masked), in log order.

    The block is the last run of error-looking lines before ``end`` (the index just after the
    runner's failure report, when known): from the last such line back, as long as the next
    one up is at most ``BLOCK_GAP`` lines away, up to ``MAX_BLOCK_LINES`` distinct lines. A gap
    rather than a fixed window, so that chatter interleaved by parallel processes or lines in
    another order do not move the block's edges; progress lines do not count in the gap. When
    no line looks like an error: the last ``FALLBACK_LINES`` lines with text that are neither
    runner boilerplate nor progress."""
    return [text for text, _ in _error_block(lines, end)]


def _error_block(lines: Sequence[str], end: int | None) -> list[tuple[str, str | None]]:
    """``last_error_block``'s lines, each with its ``normalize_line`` when the walk made it
    (the error lines: it dedupes by it), so the signature does not mask them again."""
    stop = len(lines) if end is None else max(0, min(end, len(lines)))
    start = max(0, stop - SIGNATURE_TAIL_LINES)
    picked: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    gap: int | None = None  # lines with text since the last error line (None: none yet)
    for at in range(stop - 1, start - 1, -1):
        text = _unprefixed(lines[at])
        if not text:
            continue
        if not _is_error(text):
            if is_progress(text):
                continue
            if gap is not None:
                gap += 1
                if gap > BLOCK_GAP:
                    break
            continue
        gap = 0
        norm = normalize_line(text)
        if norm in seen:
            continue
        seen.add(norm)
        picked.append((text, norm))
        if len(picked) >= MAX_BLOCK_LINES:
            break
    if not picked:
        for at in range(stop - 1, start - 1, -1):
            text = _unprefixed(lines[at])
            if (
                text
                and any(c.isalpha() for c in text)
                and not _is_boilerplate(text)
                and not is_progress(text)
            ):
                picked.append((text, None))
                if len(picked) >= FALLBACK_LINES:
                    break
    picked.reverse()
    return picked


def signature_text(
    block: Iterable[str],
    matched: Iterable[str] = (),
    *,
    failure_reason: str | None = None,
    exit_code: int | None = None,
    pod_reasons: Iterable[str] = (),
) -> str:
    """The normalized text a cluster id is the hash of: the masked lines as a sorted set (order
    and repetition do not matter), then the signals, one per line."""
    return _signature_text(
        (*block, *matched), {}, failure_reason=failure_reason, exit_code=exit_code,
        pod_reasons=pod_reasons,
    )  # fmt: skip


def _signature_text(
    raw: Iterable[str],
    known: dict[str, str],
    *,
    failure_reason: str | None,
    exit_code: int | None,
    pod_reasons: Iterable[str],
) -> str:
    """``signature_text`` of the ``raw`` lines, ``known`` holding some of their normalized
    forms already (each line is masked once: a matched line is often a block line too)."""
    normalized = set()
    for x in raw:
        n = known.get(x)
        if n is None:
            n = known[x] = normalize_line(x)
        normalized.add(n)
    lines = sorted(n for n in normalized if n)
    signals = []
    if failure_reason:
        signals.append(f"reason={failure_reason}")
    if exit_code is not None:
        signals.append(f"exit={exit_code}")
    reasons = sorted(set(pod_reasons))
    if reasons:
        signals.append("pod=" + ",".join(reasons))
    return "\n".join([*lines, *signals])


def cluster_id(text: str, algorithm: str = ALGORITHM) -> str:
    """Stable id of a normalized text: ``<algorithm>:<16 hex digits of its SHA-256>``."""
    digest = hashlib.sha256(f"{algorithm}\n{text}".encode()).hexdigest()[:16]
    return f"{algorithm}:{digest}"


def signature_of(
    lines: Sequence[str],
    *,
    end: int | None = None,
    matched: Iterable[str] = (),
    failure_reason: str | None = None,
    exit_code: int | None = None,
    pod_reasons: Iterable[str] = (),
) -> FailureSignature:
    """The signature of one failed job from its log's tail lines (as a person reads them),
    the lines its fired rules matched and its signals (pure)."""
    pairs = _error_block(lines, end)
    block = [x for x, _ in pairs]
    matched = tuple(matched)
    text = _signature_text(
        (*block, *matched),
        {x: n for x, n in pairs if n is not None},
        failure_reason=failure_reason,
        exit_code=exit_code,
        pod_reasons=pod_reasons,
    )
    examples = tuple(x[:MAX_LINE_CHARS] for x in (block[-MAX_EXAMPLES:] or matched[:MAX_EXAMPLES]))
    return FailureSignature(id=cluster_id(text), algorithm=ALGORITHM, text=text, examples=examples)


__all__ = [
    "ALGORITHM",
    "SIGNATURE_TAIL_LINES",
    "cluster_id",
    "is_progress",
    "last_error_block",
    "normalize_line",
    "signature_of",
    "signature_text",
]
