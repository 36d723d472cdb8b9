"""One pass over a log for all log rules at once, in linear time and bounded memory.

Engine choice: **Hyperscan** (Intel's multi-pattern automaton library) when it imports, else
**RE2 sets** (google-re2 ``re2.Set``).

* Hyperscan compiles every rule into one database and scans a buffer once, reporting
  ``(rule, end offset)`` for each match; its cost is per byte, not per rule, so adding rules
  does not multiply the cost, and it runs at several GB/s on a core with SIMD literal
  prefilters. Like RE2 it never backtracks. Its ``HS_FLAG_PREFILTER`` mode accepts any
  pattern RE2 accepts (reporting a superset of matches), so a rule never depends on which
  engine is installed.
* The RE2 fallback (``re2.Set``) also answers "which rules match this buffer" in one linear
  pass; only rules that did match are then located with their own RE2 regex. Slower than
  Hyperscan (one DFA, no SIMD) but same guarantees.
* Python ``re`` was not an option: it backtracks (``(a+)+$`` hangs) and loops per pattern.

The scan works on big chunks of whole lines (8 MB): markers and escape codes are removed
from the chunk (``logtext.clean``), the engine scans the chunk, and only for the (few)
matches do we find the line, its number and its sections, and confirm the rule on that single
line with RE2 (exact one-line semantics, ``log_not`` guard, section scope). Python never
iterates over lines that match nothing, which is what makes > 1 GB/s possible.

Memory: one chunk plus, per rule, its first and last match and a count, whatever the log size.
A ``Scanner`` holds scratch space: use one per thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2

from . import logtext
from .patterns import line_oriented, prefilter
from .rules import Rule, RuleSet

try:  # hyperscan ships wheels for x86_64 only
    import hyperscan

    HAVE_HYPERSCAN = True
except ImportError:  # pragma: no cover - exercised on platforms without the wheel
    hyperscan = None  # type: ignore[assignment]
    HAVE_HYPERSCAN = False

#: Evidence text is cut to this many characters.
MAX_EVIDENCE_TEXT = 400


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


@dataclass(slots=True)
class ScanResult:
    """Per rule, the first and last matching line in scope, and how many lines matched."""

    hits: dict[str, RuleHits] = field(default_factory=dict)
    total_lines: int = 0
    bytes_scanned: int = 0
    first_line: int = 1
    backend: str = ""

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
#: Past this many dirty lines in one chunk, cleaning the whole chunk at once is cheaper.
MAX_DIRTY_LINES = 20000
#: Past this many candidate matches in one chunk, judge them as they come (bounded memory).
MAX_CANDIDATES = 100000


class _HyperscanBackend:
    name = "hyperscan"

    def __init__(self, patterns: Sequence[str]) -> None:
        assert hyperscan is not None
        self.prefiltered: list[int] = []
        exprs = [p.encode() for p in patterns] + [d.encode() for d in DIRTY_PATTERNS]
        base = hyperscan.HS_FLAG_MULTILINE
        flags = [base] * len(exprs)
        try:
            self.db = self._compile(exprs, flags)
        except hyperscan.error:
            # Some RE2-valid syntax is outside Hyperscan's exact subset; prefilter mode takes
            # it and reports a superset, which the per-line RE2 confirmation then narrows.
            for i, e in enumerate(exprs):
                try:
                    self._compile([e], [base])
                except hyperscan.error:
                    flags[i] = base | hyperscan.HS_FLAG_PREFILTER
                    self.prefiltered.append(i)
            self.db = self._compile(exprs, flags)
        self.scratch = hyperscan.Scratch(self.db)

    @staticmethod
    def _compile(exprs: list[bytes], flags: list[int]) -> Any:
        assert hyperscan is not None
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=exprs, ids=list(range(len(exprs))), elements=len(exprs),
                   flags=flags)  # fmt: skip
        return db

    def scan(self, text: bytes, on_match: OnMatch) -> bool:
        """Scan ``text``; False if ``on_match`` stopped the scan."""

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

    def scan(self, text: bytes, on_match: OnMatch) -> bool:
        for idx in sorted(self.set.Match(text) or ()):
            for m in self.regexes[idx].finditer(text):
                if on_match(idx, m.start(), max(m.end(), m.start() + 1), 0, None):
                    return False
        return True


# --- scanning -------------------------------------------------------------------------------


def _line_bounds(text: bytes, to: int) -> tuple[int, int]:
    """Start and end offsets of the line holding the last byte of a match ending at ``to``."""
    p = max(to - 1, 0)
    if p > 0 and text[p] == 0x0A:
        p -= 1  # the match swallowed the newline: it belongs to the line before
    if text[p : p + 1] == b"\n":
        start = p
    else:
        start = text.rfind(b"\n", 0, p) + 1
    end = text.find(b"\n", p)
    return start, (end if end >= 0 else len(text))


def _lines_in(text: bytes) -> int:
    n = text.count(b"\n")
    return n if text.endswith(b"\n") or not text else n + 1


class Scanner:
    """All log rules of a rule set, compiled once; ``scan`` any number of logs with it."""

    def __init__(
        self,
        ruleset: RuleSet,
        *,
        backend: str | None = None,
        chunk_size: int = logtext.CHUNK_SIZE,
    ) -> None:
        self.rules: tuple[Rule, ...] = ruleset.log_rules
        self.chunk_size = chunk_size
        patterns = [line_oriented(prefilter(r.log or "")) for r in self.rules]
        choice = backend or ("hyperscan" if HAVE_HYPERSCAN else "re2")
        if choice == "hyperscan" and not HAVE_HYPERSCAN:
            raise RuntimeError("hyperscan is not installed")
        self._backend: _HyperscanBackend | _Re2Backend | None = None
        if patterns:
            self._backend = (
                _HyperscanBackend(patterns) if choice == "hyperscan" else _Re2Backend(patterns)
            )
        self.backend = choice

    def scan(self, chunks: Iterable[bytes], *, first_line: int = 1) -> ScanResult:
        """Scan a log given as byte chunks of any size (split anywhere)."""
        result = ScanResult(first_line=first_line, backend=self.backend)
        tracker = logtext.SectionTracker()
        line0 = first_line
        for raw in logtext.line_chunks(chunks, self.chunk_size):
            n = None
            if isinstance(self._backend, _HyperscanBackend):
                n = self._chunk_fast(raw, line0, tracker, result)
            if n is None:
                n = self._chunk_full(raw, line0, tracker, result)
            line0 += n
            result.bytes_scanned += len(raw)
        result.total_lines = line0 - 1
        self._apply_tail_scope(result)
        return result

    def scan_bytes(self, data: bytes, *, first_line: int = 1) -> ScanResult:
        return self.scan([data], first_line=first_line)

    def scan_file(self, path: str | Path, *, max_bytes: int | None = None) -> ScanResult:
        """Scan a (possibly gzipped) log file; with ``max_bytes``, only its tail."""
        if max_bytes is None:
            return self.scan(logtext.file_chunks(path, self.chunk_size))
        tail = logtext.read_log_tail(path, max_bytes)
        return self.scan(tail.chunks, first_line=tail.first_line)

    # --- per chunk ---------------------------------------------------------------------------

    def _chunk_fast(
        self, raw: bytes, line0: int, tracker: logtext.SectionTracker, result: ScanResult
    ) -> int | None:
        """One Hyperscan pass over the raw chunk; only dirty lines are cleaned and rescanned.

        Returns the chunk's line count, or None (nothing recorded) when the chunk is too dirty
        or too noisy for this path.
        """
        assert self._backend is not None
        n_rules = len(self.rules)
        candidates: list[tuple[int, int]] = []
        dirty: list[tuple[int, int]] = []
        dirty_until = -1

        def on_match(idx: int, _from: int, to: int, _flags: int, _ctx: object) -> bool | None:
            nonlocal dirty_until
            if idx < n_rules:
                candidates.append((idx, to))
                return len(candidates) > MAX_CANDIDATES or None
            if to <= dirty_until:
                return None  # a second marker kind on the same line
            dirty_until = to
            dirty.append((raw.rfind(b"\n", 0, to) + 1, to))
            return len(dirty) > MAX_DIRTY_LINES or None

        if not self._backend.scan(raw, on_match):
            return None

        dirty_starts = {s for s, _ in dirty}
        # (rule index, line start, line end) on clean lines; dirty ones are judged cleaned.
        found: dict[tuple[int, int], int] = {}
        for idx, to in candidates:
            start, end = _line_bounds(raw, to)
            if start not in dirty_starts:
                found.setdefault((idx, start), end)

        # Line numbers for every offset of interest, with one linear count over the chunk.
        offsets = sorted({s for _, s in found} | dirty_starts)
        line_at: dict[int, int] = {}
        pos, line = 0, line0
        for off in offsets:
            line += raw.count(b"\n", pos, off)
            pos = off
            line_at[off] = line
        total = line - line0 + raw.count(b"\n", pos)
        if raw and not raw.endswith(b"\n"):
            total += 1

        smap = logtext.SectionMap(initial=tracker.stack)
        for s, e in dirty:
            piece = raw[s:e]
            if b"section_" in piece or b"travis_fold:" in piece or b"##[" in piece:
                sub = tracker.map_chunk(piece, line_at[s])
                smap.keys.extend(sub.keys)
                smap.stacks.extend(sub.stacks)

        for (idx, start), end in found.items():
            self._judge(idx, line_at[start], raw[start:end], smap, result)

        if dirty:
            side = logtext.clean(b"\n".join(raw[s:e] for s, e in dirty))
            side_lines = side.split(b"\n")
            if len(side_lines) == len(dirty):  # always, unless cleaning went wrong: be safe
                side_found: set[tuple[int, int]] = set()
                cursor = [0, 0]  # (offset, line index at offset): counting stays linear

                def on_side(idx: int, _from: int, to: int, _flags: int, _ctx: object) -> None:
                    if idx >= n_rules:
                        return
                    at = max(to - 1, 0)
                    if at >= cursor[0]:
                        cursor[1] += side.count(b"\n", cursor[0], at)
                        cursor[0] = at
                        side_found.add((idx, cursor[1]))
                    else:
                        side_found.add((idx, side.count(b"\n", 0, at)))

                self._backend.scan(side, on_side)
                for idx, k in sorted(side_found):
                    self._judge(idx, line_at[dirty[k][0]], side_lines[k], smap, result)
            else:  # pragma: no cover - defensive
                return None
        return total

    def _chunk_full(
        self, raw: bytes, line0: int, tracker: logtext.SectionTracker, result: ScanResult
    ) -> int:
        """Clean the whole chunk, then scan it: for very dirty chunks and the RE2 backend."""
        smap = tracker.map_chunk(raw, line0)
        text = logtext.clean(raw)
        if self._backend is not None:
            n_rules = len(self.rules)
            done_until: dict[int, int] = {}
            cursor = [0, line0]  # (offset, line at offset): counting stays linear

            def on_match(idx: int, _from: int, to: int, _flags: int, _ctx: object) -> None:
                if idx >= n_rules or to <= done_until.get(idx, -1):
                    return  # a marker, or another end offset on a line already judged
                start, end = _line_bounds(text, to)
                done_until[idx] = end + 1
                if start >= cursor[0]:
                    line = cursor[1] + text.count(b"\n", cursor[0], start)
                    cursor[0], cursor[1] = start, line
                else:  # out-of-order report (rare): count from the chunk start
                    line = line0 + text.count(b"\n", 0, start)
                self._judge(idx, line, text[start:end], smap, result)

            self._backend.scan(text, on_match)
        return _lines_in(text)

    def _judge(
        self, idx: int, line: int, raw_line: bytes, smap: logtext.SectionMap, result: ScanResult
    ) -> None:
        """Confirm rule ``idx`` on one cleaned line and keep it as evidence."""
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
            result.hits[rule.id] = RuleHits(first=m, last=m)
        elif line != h.first.line and line != h.last.line:
            h.count += 1
            if line > h.last.line:
                h.last = m
            elif line < h.first.line:
                h.first = m

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
