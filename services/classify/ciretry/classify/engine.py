"""One pass over a log for all log rules at once, in linear time and bounded memory.

Engine choice: **Hyperscan** (Intel's multi-pattern automaton library) when it imports, else
**RE2 sets** (google-re2 ``re2.Set``).

* Hyperscan compiles every rule into one database and scans a buffer once, reporting
  ``(expression, end offset)`` for each match; its cost is per byte, not per rule, so adding
  rules does not multiply the cost. Like RE2 it never backtracks. What goes into the database
  is not the rule regexes themselves but, per top-level alternative, the literal strings
  every match must contain (``patterns.scan_parts``: ``Killed signal terminated program
  (?:cc1plus|...)`` is scanned for as ``"Killed signal terminated program "``), as ripgrep
  does: a set of plain literals runs about 1.5x faster than the same rules as regexes.
  Alternatives with no literal of ``MIN_LITERAL`` characters (too common to be worth it) stay
  regexes, cut to start at their strongest literal. Its ``HS_FLAG_PREFILTER`` mode accepts
  any pattern RE2 accepts (reporting a superset of matches), so a rule never depends on which
  engine is installed.
* The RE2 fallback (``re2.Set``) also answers "which rules match this buffer" in one linear
  pass; only rules that did match are then located with their own RE2 regex. Slower than
  Hyperscan (one DFA, no SIMD) but same guarantees.
* Python ``re`` was not an option: it backtracks (``(a+)+$`` hangs) and loops per pattern.

The scan works on big chunks of whole lines (4 MB), read into reused buffers
(``logtext.buffered_line_chunks``: the read is the only copy). The same Hyperscan pass finds
"dirty" lines (escape codes, carriage returns, section markers); only those are cleaned
(``logtext.clean``) and scanned again. Only for the (few) hits do we find the line, its
number (a numpy newline count over the chunk) and its sections, and confirm the rule on
that single line with RE2 (exact one-line semantics, ``log_not`` guard, section scope), so a
literal hit on a line the rule does not match costs a little time and never a false verdict.
Python never iterates over lines that match nothing. What is left per byte is the Hyperscan
scan, the newline count and the read (``bench/classify.py`` measures each).

Chunks are independent until their lines are numbered, so a log of several chunks is
*surveyed* (Hyperscan pass, dirty lines, candidate lines, line count) on a shared pool of
threads, several chunks at once: the Hyperscan scan, the numpy count and the file read all
release the GIL. The results are then *recorded* in log order on the caller's thread (line
numbers, sections, RE2 confirmation, evidence), which is cheap: it only sees candidate lines.

The same database also holds ``logsignals.SIGNAL_PATTERNS`` (the runner's exit reports, kill
notices, stage headers); their hits, with the section changes seen on the way, become the
log's ``LogFacts`` (exit code, signal, stage, where the job died) at the end of the scan, and
rules scoped to the failure (``scope = { failure = N }``) keep only the matches near it. The
runner's echoed commands (``$ make``: one line in fifty of a GitLab trace) are the exception:
a callback and a confirmation for each cost more than the scan, and the facts only need one
per span between other signals and section markers, so the scan reports the first of each
chunk and the survey finds the first of each later span (``Scanner._first_commands``).

Memory: a few chunk buffers (one per surveying thread, plus two) plus, per rule, its first and
last match and a count, whatever the log size. Hyperscan scratch space is kept per thread, so
one ``Scanner`` serves any number of threads.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import re2

from . import logtext
from .logsignals import COMMAND, SIGNAL_PATTERNS, STAGE_PREFIX, LogFacts, SignalHit, stack_stage
from .patterns import ScanPart, line_oriented, prefilter, scan_parts
from .rules import Rule, RuleSet

try:  # hyperscan ships wheels for x86_64 only
    import hyperscan

    HAVE_HYPERSCAN = True
except ImportError:  # pragma: no cover - exercised on platforms without the wheel
    hyperscan = None  # type: ignore[assignment]
    HAVE_HYPERSCAN = False

#: A chunk of log: bytes, or the filled start of a reused bytearray.
Chunk = bytes | bytearray
#: What the backends scan.
Buffer = bytes | bytearray | memoryview

#: Evidence text is cut to this many characters.
MAX_EVIDENCE_TEXT = 400
#: Signal hits kept per log (the last ones: where a job dies is near its end).
MAX_SIGNAL_HITS = 512
#: Latest matches kept per rule, for rules scoped to the failure.
RECENT_HITS = 8

_SIGNAL_REGEXES = tuple(re2.compile(p) for _, p in SIGNAL_PATTERNS)


@dataclass(frozen=True, slots=True)
class LogMatch:
    """One line that satisfied one rule's log matcher (1-based line number)."""

    rule: str
    line: int
    text: str
    sections: tuple[str, ...] = ()


@dataclass(slots=True)
class RuleHits:
    first: LogMatch
    last: LogMatch
    count: int = 1
    #: The latest matches (a few, by line), so a failure scope can be applied at the end.
    recent: list[LogMatch] = field(default_factory=list)

    def keep_recent(self, m: LogMatch) -> None:
        self.recent.append(m)
        if len(self.recent) > RECENT_HITS:  # drop the earliest, whatever the report order
            self.recent.sort(key=lambda x: x.line)
            del self.recent[0]


@dataclass(slots=True)
class ScanResult:
    """Per rule, the first and last matching line in scope, and how many lines matched."""

    hits: dict[str, RuleHits] = field(default_factory=dict)
    total_lines: int = 0
    bytes_scanned: int = 0
    first_line: int = 1
    backend: str = ""
    #: What the log says about how the job ended (known once the scan is complete).
    facts: LogFacts = field(default_factory=LogFacts)
    signal_hits: deque[SignalHit] = field(default_factory=lambda: deque(maxlen=MAX_SIGNAL_HITS))
    section_stage: str | None = None

    @property
    def rule_ids(self) -> list[str]:
        return list(self.hits)

    def matches(self) -> list[LogMatch]:
        """Evidence lines (first and last of each rule), in log order."""
        out: list[LogMatch] = []
        for h in self.hits.values():
            out.append(h.first)
            if h.last is not h.first:
                out.append(h.last)
        out.sort(key=lambda m: (m.line, m.rule))
        return out


# --- backends -------------------------------------------------------------------------------

#: Hyperscan's callback shape: (pattern index, start (unused), end offset, flags, context);
#: returning True stops the scan. Used directly: no wrapper call per match.
OnMatch = Callable[[int, int, int, int, object], bool | None]

#: Bytes that make a line differ from what a person sees (escape codes, carriage returns,
#: section markers). The Hyperscan pass finds them alongside the rules, so clean lines (nearly
#: all of them) are never copied or rewritten in Python.
DIRTY_PATTERNS = (
    # Each runs to the end of the line: Hyperscan reports one end offset once, so a line
    # with ten escape codes costs one callback, and the offset is the line's end.
    r"\x1b[^\n]*$",
    r"\r[^\n]*$",
    r"section_(?:start|end):\d+:[^\n]*$",
    r"travis_fold:(?:start|end):[^\n]*$",
    r"##\[(?:end)?group\][^\n]*$",
)
#: DIRTY_PATTERNS from this index on are section markers: their lines feed the SectionTracker.
FIRST_MARKER_PATTERN = 2
#: Past this many dirty lines in one chunk, cleaning the whole chunk at once is cheaper.
MAX_DIRTY_LINES = 20000
#: Past this many candidate matches in one chunk, judge them as they come (bounded memory).
MAX_CANDIDATES = 100000


#: Rule alternatives whose required literals are at least this long are scanned for as those
#: literals; shorter ones (too common: a hit on every other line costs more than the regex) as
#: their regex.
MIN_LITERAL = 7


#: The runner's echo of a command (``logsignals.COMMAND``, ``^\\$ \\S`` on a line as rules
#: see it), as Hyperscan looks for it: "$ " and a non-blank at the start of a line or right
#: after a provider prefix (which ends in "Z " or "Z] "). A superset: RE2 confirms each.
#: These report only their first match per scan (see ``Scanner._first_commands``).
COMMAND_EXPRS = (r"^\$ [^\t\n\f\r ]", r"[Z\]] \$ [^\t\n\f\r ]")
_COMMAND_SIGNAL = next(k for k, (kind, _) in enumerate(SIGNAL_PATTERNS) if kind == COMMAND)


def _command_lines(text: Chunk, lo: int, hi: int, skip: Collection[int] = ()) -> Iterator[int]:
    """Start offsets of the runner's command lines among the whole lines of ``text[lo:hi]``,
    in order, but for lines starting at an offset in ``skip``; confirmed with RE2 on the line
    as rules see it. A plain ``find`` of "$ " (it holds the GIL, but a Hyperscan call per span
    would hand it back and forth with the other surveying threads); the caller takes the
    first only, so this reads only up to it."""
    regex = _SIGNAL_REGEXES[_COMMAND_SIGNAL]
    at = text.find(b"$ ", lo, hi)
    while at >= 0:
        if at == lo or text[at - 1] == 0x0A or (at - 2 >= lo and text[at - 1] == 0x20
                                                  and text[at - 2] in b"Z]"):  # fmt: skip
            start = max(lo, text.rfind(b"\n", lo, at) + 1)
            stop = text.find(b"\n", at, hi)
            stop = hi if stop < 0 else stop
            if start not in skip:
                line = logtext.strip_prefix(logtext.decode(text[start:stop]))
                if regex.search(line) is not None:
                    yield start
            at = text.find(b"$ ", stop + 1, hi)  # a line is judged once
        else:
            at = text.find(b"$ ", at + 2, hi)


def _literal_expr(text: str) -> bytes:
    """A Hyperscan expression matching exactly ``text`` (UTF-8 bytes)."""
    return b"".join(
        bytes([b]) if chr(b).isalnum() and b < 0x80 else b"\\x%02x" % b for b in text.encode()
    )


class _HyperscanBackend:
    """One database for all rules: their literals and regexes, then the dirty-line patterns.

    Expression ``i`` stands for the rules ``rules_of[i]``; ids from ``first_dirty`` on are
    ``DIRTY_PATTERNS``. The expressions of the patterns in ``first_only`` report only their
    first match of each scan (``HS_FLAG_SINGLEMATCH``).
    """

    name = "hyperscan"

    def __init__(
        self, rule_parts: Sequence[Sequence[ScanPart]], first_only: Collection[int] = ()
    ) -> None:
        assert hyperscan is not None
        ids: dict[tuple[bytes, int], int] = {}
        owners: list[list[int]] = []
        for rule, parts in enumerate(rule_parts):
            base = hyperscan.HS_FLAG_MULTILINE
            if rule in first_only:
                base |= hyperscan.HS_FLAG_SINGLEMATCH
            for part in parts:
                if part.regex is not None:
                    keys = [(part.regex.encode(), base)]
                else:
                    flag = base & hyperscan.HS_FLAG_SINGLEMATCH
                    if part.caseless:
                        flag |= hyperscan.HS_FLAG_CASELESS
                    keys = [(_literal_expr(lit), flag) for lit in part.literals]
                for key in keys:
                    i = ids.setdefault(key, len(ids))
                    if i == len(owners):
                        owners.append([])
                    if rule not in owners[i]:
                        owners[i].append(rule)
        self.rules_of: tuple[tuple[int, ...], ...] = tuple(tuple(o) for o in owners)
        self.first_dirty = len(owners)
        exprs = [e for e, _ in ids] + [d.encode() for d in DIRTY_PATTERNS]
        flags = [f for _, f in ids] + [hyperscan.HS_FLAG_MULTILINE] * len(DIRTY_PATTERNS)
        self.prefiltered: list[int] = []
        try:
            self.db = self._compile(exprs, flags)
        except hyperscan.error:
            # Some RE2-valid syntax is outside Hyperscan's exact subset; prefilter mode takes
            # it and reports a superset, which the per-line RE2 confirmation then narrows.
            for i, e in enumerate(exprs):
                try:
                    self._compile([e], [flags[i]])
                except hyperscan.error:
                    flags[i] |= hyperscan.HS_FLAG_PREFILTER
                    self.prefiltered.append(i)
            self.db = self._compile(exprs, flags)
        # Scratch space may not be shared by concurrent scans: one per thread.
        self._local = threading.local()

    @property
    def scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            assert hyperscan is not None
            scratch = self._local.scratch = hyperscan.Scratch(self.db)
        return scratch

    @staticmethod
    def _compile(exprs: list[bytes], flags: list[int]) -> Any:
        assert hyperscan is not None
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=exprs, ids=list(range(len(exprs))), elements=len(exprs),
                   flags=flags)  # fmt: skip
        return db

    def scan(self, text: Buffer, on_match: OnMatch) -> bool:
        """Scan ``text`` (any bytes-like object); False if ``on_match`` stopped the scan."""

        assert hyperscan is not None
        try:
            self.db.scan(text, match_event_handler=on_match, scratch=self.scratch)
        except hyperscan.ScanTerminated:
            return False
        return True


class _Re2Backend:
    name = "re2"

    def __init__(self, patterns: Sequence[str]) -> None:
        opts = re2.Options()
        opts.log_errors = False
        self.set = re2.Set.SearchSet(opts)
        self.regexes = []
        for p in patterns:
            multiline = b"(?m)" + p.encode()
            self.set.Add(multiline)
            self.regexes.append(re2.compile(multiline, opts))
        self.set.Compile()
        self.rules_of = tuple((i,) for i in range(len(patterns)))
        self.first_dirty = len(patterns)

    def scan(self, text: Buffer, on_match: OnMatch) -> bool:
        data = bytes(text)
        for idx in sorted(self.set.Match(data) or ()):
            for m in self.regexes[idx].finditer(data):
                if on_match(idx, m.start(), max(m.end(), m.start() + 1), 0, None):
                    return False
        return True


# --- scanning -------------------------------------------------------------------------------


def _line_bounds(text: Chunk, to: int, n: int) -> tuple[int, int]:
    """Start and end offsets of the line holding the last byte of a match ending at ``to``,
    in ``text[:n]``."""
    p = max(to - 1, 0)
    if p > 0 and text[p] == 0x0A:
        p -= 1  # the match swallowed the newline: it belongs to the line before
    if text[p : p + 1] == b"\n":
        start = p
    else:
        start = text.rfind(b"\n", 0, p) + 1
    end = text.find(b"\n", p, n)
    return start, (end if end >= 0 else n)


def _lines_in(text: bytes) -> int:
    n = text.count(b"\n")
    return n if text.endswith(b"\n") or not text else n + 1


#: Bytes counted per numpy call: the comparison buffer each thread keeps is this big.
_COUNT_BLOCK = 1 << 20
#: Below this many bytes ``bytes.count`` (no setup) is the quicker count.
_NUMPY_COUNT_MIN = 1 << 15
_thread_state = threading.local()


def count_newlines(buf: Chunk, start: int, end: int) -> int:
    """Newlines in ``buf[start:end]``. numpy's vectorised compare and count run about four
    times faster than ``bytes.count`` here and, unlike it, without holding the GIL, so chunks
    surveyed on other threads are counted at the same time."""
    if end - start < _NUMPY_COUNT_MIN:
        return buf.count(b"\n", start, end)
    eq: np.ndarray[Any, Any] | None = getattr(_thread_state, "eq", None)
    if eq is None:
        eq = _thread_state.eq = np.empty(_COUNT_BLOCK, dtype=np.bool_)
    data = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
    total = 0
    for at in range(0, len(data), _COUNT_BLOCK):
        part = data[at : at + _COUNT_BLOCK]
        out = eq[: len(part)]
        np.equal(part, 10, out=out)
        total += int(np.count_nonzero(out))
    return total


#: Threads surveying the chunks of one log at once (the default of ``Scanner(threads=)``).
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _scan_pool() -> ThreadPoolExecutor:
    """One pool for every scanner of the process, so concurrent scans share the cores
    instead of each bringing threads of its own."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DEFAULT_THREADS, thread_name_prefix="ciretry-scan")
        return _pool


@dataclass(slots=True)
class _Survey:
    """One chunk, surveyed without knowing where in the log it sits (so several chunks can be
    surveyed at once): its line count, the lines that may match a rule and the section-marker
    lines, numbered from 0 within the chunk and copied out of the (reused) buffer."""

    size: int
    lines: int = 0
    #: (rule index, line within the chunk, the line as rules see it: cleaned if it was dirty)
    candidates: list[tuple[int, int, bytes]] = field(default_factory=list)
    #: (line within the chunk, the raw marker line)
    markers: list[tuple[int, bytes]] = field(default_factory=list)
    #: The whole chunk, when it is too dirty or too noisy for the fast path (or the backend
    #: is RE2): it is then cleaned and scanned as a whole, in order.
    whole: bytes | None = None


class Scanner:
    """All log rules of a rule set, compiled once; ``scan`` any number of logs with it, from
    any number of threads.

    A log of several chunks is surveyed on up to ``threads`` threads of a shared pool (the
    Hyperscan pass and the newline count release the GIL); what needs the order of the log
    (line numbers, sections, evidence) is then put together chunk by chunk on the caller's
    thread. ``threads=1`` keeps everything on the caller's thread.
    """

    def __init__(
        self,
        ruleset: RuleSet,
        *,
        backend: str | None = None,
        chunk_size: int = logtext.CHUNK_SIZE,
        threads: int | None = None,
    ) -> None:
        self.rules: tuple[Rule, ...] = ruleset.log_rules
        self._signal_base = len(self.rules)
        self.chunk_size = chunk_size
        self.threads = max(1, DEFAULT_THREADS if threads is None else threads)
        choice = backend or ("hyperscan" if HAVE_HYPERSCAN else "re2")
        if choice == "hyperscan" and not HAVE_HYPERSCAN:
            raise RuntimeError("hyperscan is not installed")
        self._backend: _HyperscanBackend | _Re2Backend | None = None
        # Rules first, then the signal patterns: an index past the rules is a signal.
        sources = [r.log or "" for r in self.rules] + [p for _, p in SIGNAL_PATTERNS]
        self._command = self._signal_base + _COMMAND_SIGNAL
        #: Hyperscan expressions of the command lines (first match per scan only).
        self._command_eids: frozenset[int] = frozenset()
        if choice == "hyperscan":
            parts = [scan_parts(p, MIN_LITERAL) for p in sources]
            parts[self._command] = [ScanPart(regex=e) for e in COMMAND_EXPRS]
            hs = self._backend = _HyperscanBackend(parts, first_only={self._command})
            self._command_eids = frozenset(
                eid for eid, owners in enumerate(hs.rules_of) if self._command in owners
            )
        else:
            self._backend = _Re2Backend([line_oriented(prefilter(p)) for p in sources])
        self.backend = choice

    @property
    def _parallel(self) -> bool:
        return self.threads > 1 and isinstance(self._backend, _HyperscanBackend)

    def scan(self, chunks: Iterable[bytes], *, first_line: int = 1) -> ScanResult:
        """Scan a log given as byte chunks of any size (split anywhere), held in memory."""
        held = chunks if isinstance(chunks, list | tuple) else list(chunks)
        if sum(map(len, held)) <= self.chunk_size:
            # A log of one chunk (most logs) is surveyed here: handing it to another thread
            # and waiting for it would only add the hand-over.
            data = held[0] if len(held) == 1 else b"".join(held)
            return self._scan([(data, len(data))] if data else [], first_line)
        # Regrouped into chunks of whole lines as a file is read (one copy, into reused
        # buffers), not by joining and slicing the pieces.
        buffers = self._buffers() if self._parallel else None
        pieces = logtext.buffered_line_chunks(logtext.ChunkStream(held), self.chunk_size, buffers)
        return self._scan(pieces, first_line, parallel=self._parallel, buffers=buffers)

    def scan_bytes(self, data: bytes, *, first_line: int = 1) -> ScanResult:
        return self.scan([data], first_line=first_line)

    def scan_file(self, path: str | Path, *, max_bytes: int | None = None) -> ScanResult:
        """Scan a (possibly gzipped) log file; with ``max_bytes``, only its tail."""
        if max_bytes is not None:
            tail = logtext.read_log_tail(path, max_bytes)
            return self.scan(tail.chunks, first_line=tail.first_line)
        parallel = self._parallel and Path(path).stat().st_size > self.chunk_size // 8
        buffers = self._buffers() if parallel else None
        with logtext.open_log(path) as f:
            pieces = logtext.buffered_line_chunks(f, self.chunk_size, buffers)
            return self._scan(pieces, 1, parallel=parallel, buffers=buffers)

    def _buffers(self) -> logtext.BufferPool:
        """Chunk buffers for a parallel scan. In flight: a chunk per surveying thread, one
        queued, the one being read, one spare."""
        return logtext.BufferPool(self.threads + 3, self.chunk_size + logtext.MAX_LINE)

    def _scan(
        self,
        chunks: Iterable[tuple[Chunk, int]],
        first_line: int,
        *,
        parallel: bool = False,
        buffers: logtext.BufferPool | None = None,
    ) -> ScanResult:
        """Scan chunks of whole lines, each given as ``(buffer, n)``: its first ``n`` bytes."""
        result = ScanResult(first_line=first_line, backend=self.backend)
        tracker = logtext.SectionTracker()
        line0 = first_line
        surveys = self._surveys_parallel(chunks, buffers) if parallel else self._surveys(chunks)
        for survey in surveys:
            line0 += self._record(survey, line0, tracker, result)
            result.bytes_scanned += survey.size
        result.total_lines = line0 - 1
        result.facts = LogFacts.from_hits(result.signal_hits, result.total_lines)
        self._apply_tail_scope(result)
        self._apply_failure_scope(result)
        return result

    def _surveys(self, chunks: Iterable[tuple[Chunk, int]]) -> Iterator[_Survey]:
        for raw, size in chunks:
            yield self._survey(raw, size)

    def _surveys_parallel(
        self, chunks: Iterable[tuple[Chunk, int]], buffers: logtext.BufferPool | None
    ) -> Iterator[_Survey]:
        """Surveys in log order, ``threads`` of them under way at once and one queued. A chunk's buffer
        goes back to ``buffers`` as soon as its survey is done (the survey copies what it
        keeps), so reading the next chunks overlaps with surveying these."""
        pool = _scan_pool()
        pending: deque[Future[_Survey]] = deque()

        def survey(raw: Chunk, size: int) -> _Survey:
            try:
                return self._survey(raw, size)
            finally:
                if buffers is not None and isinstance(raw, bytearray):
                    buffers.give(raw)

        try:
            for raw, size in chunks:
                pending.append(pool.submit(survey, raw, size))
                if len(pending) > self.threads:  # one queued: no thread waits for the reader
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:  # the caller stopped early (an error): let the rest finish
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    f.exception()

    # --- per chunk ---------------------------------------------------------------------------

    def _survey(self, raw: Chunk, size: int) -> _Survey:
        """One Hyperscan pass over ``raw[:size]``; only dirty lines are cleaned and rescanned.
        Thread-safe: reads ``raw`` and the compiled rules, writes nothing shared."""
        backend = self._backend
        if not isinstance(backend, _HyperscanBackend):
            return _Survey(size, whole=bytes(raw[:size]))
        first_dirty = backend.first_dirty
        first_marker = first_dirty + FIRST_MARKER_PATTERN
        candidates: list[tuple[int, int]] = []
        dirty_ends: list[int] = []
        marker_ends: list[int] = []
        add_candidate = candidates.append
        add_dirty = dirty_ends.append

        # Called for every match: kept minimal (no line work, no lookups), as Python callbacks
        # are the per-match cost. Several dirty patterns on one line report the same end.
        def on_match(idx: int, _from: int, to: int, _flags: int, _ctx: object) -> bool | None:
            if idx < first_dirty:
                add_candidate((idx, to))
                return len(candidates) > MAX_CANDIDATES or None
            add_dirty(to)
            if idx >= first_marker:
                marker_ends.append(to)
            return len(dirty_ends) > 2 * MAX_DIRTY_LINES or None

        view = memoryview(raw)
        try:
            if not backend.scan(view[:size] if size < len(raw) else view, on_match):
                return _Survey(size, whole=bytes(raw[:size]))
        finally:
            view.release()

        ends = sorted(set(dirty_ends))
        if len(ends) > MAX_DIRTY_LINES:
            return _Survey(size, whole=bytes(raw[:size]))
        dirty = [(raw.rfind(b"\n", 0, e) + 1, e) for e in ends]
        dirty_starts = {s for s, _ in dirty}
        # (rule index, line start) -> line end, on clean lines; dirty ones are judged cleaned.
        found: dict[tuple[int, int], int] = {}
        rules_of = backend.rules_of
        for eid, to in candidates:
            start, end = _line_bounds(raw, to, size)
            if start not in dirty_starts:
                for idx in rules_of[eid]:
                    found.setdefault((idx, start), end)

        # Dirty lines: cleaned together into a side buffer, scanned again. Most (colour codes
        # on ordinary output) match nothing and never need a line number.
        side_found: set[tuple[int, int]] = set()
        side_lines: list[bytes] = []
        side = b""
        if dirty:
            side = logtext.clean(b"\n".join(raw[s:e] for s, e in dirty))
            side_lines = side.split(b"\n")
            if len(side_lines) != len(dirty):  # pragma: no cover - cleaning never drops "\n"
                return _Survey(size, whole=bytes(raw[:size]))
            cursor = [0, 0]  # (offset, line index at offset): counting stays linear

            def on_side(eid: int, _from: int, to: int, _flags: int, _ctx: object) -> None:
                if eid >= first_dirty:
                    return
                at = max(to - 1, 0)
                if at >= cursor[0]:
                    cursor[1] += side.count(b"\n", cursor[0], at)
                    cursor[0] = at
                    k = cursor[1]
                else:
                    k = side.count(b"\n", 0, at)
                for idx in rules_of[eid]:
                    side_found.add((idx, k))

            backend.scan(side, on_side)
        markers = [raw.rfind(b"\n", 0, e) + 1 for e in sorted(set(marker_ends))]
        raw_from = min(
            (_line_bounds(raw, to, size)[0] for eid, to in candidates if eid in self._command_eids),
            default=None,
        )
        if raw_from is not None or any(idx == self._command for idx, _ in side_found):
            self._first_commands(
                raw, size, raw_from, found, (dirty, dirty_starts), (side, side_lines), side_found,
                markers,
            )  # fmt: skip

        # Line numbers (from 0 in this chunk) for every offset of interest, with one linear
        # count over the chunk.
        offsets = sorted({s for _, s in found} | {dirty[k][0] for _, k in side_found})
        offsets = sorted(set(offsets).union(markers)) if markers else offsets
        line_at: dict[int, int] = {}
        pos = line = 0
        for off in offsets:
            line += count_newlines(raw, pos, off)
            pos = off
            line_at[off] = line
        lines = line + count_newlines(raw, pos, size)
        if size and raw[size - 1] != 0x0A:
            lines += 1

        out = _Survey(size, lines)
        for s in markers:
            e = raw.find(b"\n", s, size)
            out.markers.append((line_at[s], bytes(raw[s : e if e >= 0 else size])))
        for (idx, start), end in found.items():
            out.candidates.append((idx, line_at[start], bytes(raw[start:end])))
        for idx, k in sorted(side_found):
            out.candidates.append((idx, line_at[dirty[k][0]], side_lines[k]))
        return out

    def _first_commands(
        self,
        raw: Chunk,
        size: int,
        raw_from: int | None,
        found: dict[tuple[int, int], int],
        dirty_lines: tuple[list[tuple[int, int]], set[int]],
        side_buffer: tuple[bytes, list[bytes]],
        side_found: set[tuple[int, int]],
        markers: list[int],
    ) -> None:
        """Of the runner's command lines in this chunk, keep one per span between the other
        signal lines and the section markers: the first that RE2 confirms.

        A command line only tells ``LogFacts`` that the job's own script is running: the stage
        is that of the last stage event at or before where the job died, and where it died is
        itself a signal line. So within a span (no other signal, no section change) one
        command says all the others would, and the facts are exactly those of keeping all of
        them. The scan reported only the first command line of the chunk's clean lines and
        of its dirty ones (``HS_FLAG_SINGLEMATCH``: a GitLab trace echoes a command every fifty
        lines, and a callback per line would cost more than the scan); ``_command_lines``
        finds the first of each span from there on, reading only until it has it.
        """
        cmd = self._command
        dirty, skip = dirty_lines  # dirty lines are judged cleaned, from the side buffer
        side, side_lines = side_buffer
        side_from = min((k for i, k in side_found if i == cmd), default=None)
        for key in [key for key in found if key[0] == cmd]:
            del found[key]
        side_found.difference_update([key for key in side_found if key[0] == cmd])
        base = self._signal_base
        bounds = {s for i, s in found if i >= base}
        bounds.update(dirty[k][0] for i, k in side_found if i >= base)
        bounds.update(markers)
        bounds.update((0, size))
        edges = sorted(bounds)
        dirty_starts = [s for s, _ in dirty]
        side_at: list[int] = []
        if side_from is not None:
            side_at = list(accumulate((len(x) + 1 for x in side_lines), initial=0))
        for lo, hi in zip(edges, edges[1:], strict=False):
            first = None
            if raw_from is not None and hi > raw_from:
                first = next(_command_lines(raw, max(lo, raw_from), hi, skip), None)
            if side_from is not None:
                k0 = max(bisect_left(dirty_starts, lo), side_from)
                k1 = bisect_left(dirty_starts, hi if first is None else first)
                if k0 < k1:
                    at = next(_command_lines(side, side_at[k0], side_at[k1] - 1), None)
                    if at is not None:
                        side_found.add((cmd, bisect_right(side_at, at) - 1))
                        continue
            if first is not None:
                end = raw.find(b"\n", first, size)
                found[(cmd, first)] = size if end < 0 else end

    def _record(
        self, survey: _Survey, line0: int, tracker: logtext.SectionTracker, result: ScanResult
    ) -> int:
        """Put one surveyed chunk, starting at line ``line0``, into ``result``: sections, rule
        confirmation, evidence. Returns the chunk's line count."""
        if survey.whole is not None:
            return self._chunk_full(survey.whole, line0, tracker, result)
        smap = logtext.SectionMap(initial=tracker.stack)
        for rel, text in survey.markers:
            sub = tracker.map_chunk(text, line0 + rel)
            smap.keys.extend(sub.keys)
            smap.stacks.extend(sub.stacks)
        self._note_stages(smap, result)
        for idx, rel, text in survey.candidates:
            self._judge(idx, line0 + rel, text, smap, result)
        return survey.lines

    def _chunk_full(
        self, raw: bytes, line0: int, tracker: logtext.SectionTracker, result: ScanResult
    ) -> int:
        """Clean the whole chunk, then scan it: for very dirty chunks and the RE2 backend."""
        smap = tracker.map_chunk(raw, line0)
        self._note_stages(smap, result)
        text = logtext.clean(raw)
        backend = self._backend
        if backend is not None:
            first_dirty, rules_of = backend.first_dirty, backend.rules_of
            skip = self._command if self._command_eids else -1
            done_until: dict[int, int] = {}
            cursor = [0, line0]  # (offset, line at offset): counting stays linear

            def on_match(eid: int, _from: int, to: int, _flags: int, _ctx: object) -> None:
                if eid >= first_dirty:
                    return  # a marker
                start, end = _line_bounds(text, to, len(text))
                line = -1
                for idx in rules_of[eid]:
                    if idx == skip:
                        continue
                    if to <= done_until.get(idx, -1):
                        continue  # another end offset on a line already judged
                    done_until[idx] = end + 1
                    if line < 0:
                        if start >= cursor[0]:
                            line = cursor[1] + text.count(b"\n", cursor[0], start)
                            cursor[0], cursor[1] = start, line
                        else:  # out-of-order report (rare): count from the chunk start
                            line = line0 + text.count(b"\n", 0, start)
                    self._judge(idx, line, text[start:end], smap, result)

            backend.scan(text, on_match)
            if self._command_eids:  # Hyperscan reported only the first command line
                pos, line = 0, line0
                for start in _command_lines(text, 0, len(text)):
                    line += text.count(b"\n", pos, start)
                    pos = start
                    end = text.find(b"\n", start)
                    self._judge(self._command, line, text[start : end if end >= 0 else None],
                                smap, result)  # fmt: skip
        return _lines_in(text)

    def _judge(
        self, idx: int, line: int, raw_line: Chunk, smap: logtext.SectionMap, result: ScanResult
    ) -> None:
        """Confirm rule ``idx`` on one cleaned line and keep it as evidence."""
        if idx >= self._signal_base:
            self._judge_signal(idx - self._signal_base, line, raw_line, smap, result)
            return
        rule = self.rules[idx]
        sections = smap.at(line)
        if not rule.in_section(sections):
            return
        text = logtext.strip_prefix(logtext.decode(raw_line))
        if not rule.line_matches(text):
            return
        if len(text) > MAX_EVIDENCE_TEXT:
            text = text[: MAX_EVIDENCE_TEXT - 3] + "..."
        m = LogMatch(rule.id, line, text, sections)
        h = result.hits.get(rule.id)
        if h is None:
            h = result.hits[rule.id] = RuleHits(first=m, last=m)
            if rule.scope_failure is not None:
                h.keep_recent(m)
        elif line != h.first.line and line != h.last.line:
            h.count += 1
            if line > h.last.line:
                h.last = m
            elif line < h.first.line:
                h.first = m
            if rule.scope_failure is not None:
                h.keep_recent(m)

    @staticmethod
    def _judge_signal(
        k: int, line: int, raw_line: Chunk, smap: logtext.SectionMap, result: ScanResult
    ) -> None:
        """Confirm signal pattern ``k`` on one cleaned line and keep it for the facts."""
        text = logtext.strip_prefix(logtext.decode(raw_line))
        m = _SIGNAL_REGEXES[k].search(text)
        if m is None:
            return
        kind = SIGNAL_PATTERNS[k][0]
        if kind == COMMAND and stack_stage(smap.at(line)) is not None:
            return  # a command inside a runner-owned section (Travis git.checkout)
        code = None
        if m.groups() and m.group(1) is not None:
            code = int(m.group(1))
        result.signal_hits.append(SignalHit(line, kind, code))

    @staticmethod
    def _note_stages(smap: logtext.SectionMap, result: ScanResult) -> None:
        """Stage changes at section markers (GitLab sections, Travis folds, GitHub groups)."""
        for key, stack in zip(smap.keys, smap.stacks, strict=True):
            stage = stack_stage(stack)
            if stage is not None and stage != result.section_stage:
                result.signal_hits.append(SignalHit(key, STAGE_PREFIX + stage))
            result.section_stage = stage

    def _apply_failure_scope(self, result: ScanResult) -> None:
        """Rules scoped to the failure keep only matches near where the job died."""
        facts = result.facts
        for rule in self.rules:
            h = result.hits.get(rule.id)
            if h is None or rule.scope_failure is None:
                continue
            near = sorted(
                (m for m in h.recent if rule.in_failure_scope(m.line, facts, result.total_lines)),
                key=lambda m: m.line,
            )
            if not near:
                del result.hits[rule.id]
            else:
                h.first, h.last, h.count = near[0], near[-1], len(near)

    def _apply_tail_scope(self, result: ScanResult) -> None:
        # The total line count is only known at the end; the last match decides.
        for rule in self.rules:
            h = result.hits.get(rule.id)
            if h is None or rule.scope_last_lines is None:
                continue
            if not rule.in_tail(h.last.line, result.total_lines):
                del result.hits[rule.id]
            elif not rule.in_tail(h.first.line, result.total_lines):
                h.first = h.last
                h.count = 1  # only lines in scope are counted, and only the last is known


def scan_log_file(ruleset: RuleSet, path: str | Path) -> ScanResult:
    """Convenience for one-off use; services keep a Scanner."""
    return Scanner(ruleset).scan_file(path)
