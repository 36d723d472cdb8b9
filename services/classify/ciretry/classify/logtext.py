"""Turn raw CI log bytes into the text a person sees, in bounded memory.

CI providers decorate logs: ANSI colour codes, GitLab section markers
(``section_start:1700000000:get_sources\\r\\x1b[0K``), Travis fold markers, GitHub
``##[group]`` lines, carriage-return progress bars. Rules are written against what a person
reads in the job page, so those decorations are removed before matching, while newlines are
kept so line numbers stay those of the raw log.

Everything here works on *chunks of complete lines* (``line_chunks``) so the engine can
scan megabytes at a time instead of looping over lines in Python; ``iter_lines`` is the slow,
simple per-line view used for rule examples and tests.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import io
import queue
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

#: Default size of the chunks handed to the scanner. Large enough that per-chunk Python
#: overhead vanishes, small enough that memory stays a few times this.
CHUNK_SIZE = 4 * 1024 * 1024
#: A "line" longer than this without a newline is cut, so one endless line cannot grow memory.
MAX_LINE = 1024 * 1024
#: Deepest section nesting tracked; deeper markers are ignored (bounded memory on hostile logs).
MAX_SECTION_DEPTH = 32

# GitLab: section_start:<unix ts>:<name>[options]\r\x1b[0K ; Travis: travis_fold:start:<name>\r\x1b[0K.
# Each regex starts with a literal so Python's engine skips ahead fast (no per-byte attempts).
_GITLAB_MARKER_RE = re.compile(
    rb"section_(start|end):\d+:([A-Za-z0-9_.\-]+)(?:\[[^\]\r\n]*\])?\r?(?:\x1b\[0K)?"
)
_TRAVIS_MARKER_RE = re.compile(rb"travis_fold:(start|end):([A-Za-z0-9_.\-]+)\r?(?:\x1b\[0K)?")
# CSI sequences (colours, erase line) are nearly all escapes in CI logs; the full set
# (OSC titles and hyperlinks, two-byte escapes) only runs if an escape byte remains.
_CSI_RE = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")
_ANSI_RE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
#: Prefixes added by the provider, not printed by the job: GitHub's ISO timestamp and the
#: Taskcluster worker's ``[task 2025-...Z]`` tag. Rules anchored with ``^`` see past them.
TIMESTAMP_PREFIX = (
    r"(?:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z "
    r"|\[(?:task|taskcluster|setup|vcs|fetches) \d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?Z\] )"
)
_TIMESTAMP_RE = re.compile(TIMESTAMP_PREFIX)


def clean(data: bytes) -> bytes:
    """Remove markers, escape codes and carriage returns; never removes a newline.

    Carriage returns are dropped rather than emulated: a progress bar's overwritten frames
    become one long line, which still contains every text a person saw at some point.
    """
    if b"section_" in data:
        data = _GITLAB_MARKER_RE.sub(b"", data)
    if b"travis_fold:" in data:
        data = _TRAVIS_MARKER_RE.sub(b"", data)
    if b"\x1b" in data:
        data = _CSI_RE.sub(b"", data)
        if b"\x1b" in data:
            data = _ANSI_RE.sub(b"", data)
    if b"\r" in data:
        data = data.replace(b"\r", b"")
    return data


def strip_prefix(line: str) -> str:
    """The line without a provider-added timestamp prefix."""
    m = _TIMESTAMP_RE.match(line)
    return line[m.end() :] if m else line


def decode(line: bytes | bytearray) -> str:
    return line.decode("utf-8", errors="replace")


# --- sections -------------------------------------------------------------------------------


@dataclass(slots=True)
class SectionMap:
    """Which named sections enclose each line of one chunk.

    Built from the markers of the raw chunk before they are cleaned away. ``at(line)`` gives
    the stack of enclosing section names (outermost first). A section's start line and its
    end line both belong to it.
    """

    initial: tuple[str, ...]
    keys: list[int] = field(default_factory=list)
    stacks: list[tuple[str, ...]] = field(default_factory=list)

    def at(self, line: int) -> tuple[str, ...]:
        i = bisect.bisect_right(self.keys, line)
        return self.stacks[i - 1] if i else self.initial

    @property
    def final(self) -> tuple[str, ...]:
        return self.stacks[-1] if self.stacks else self.initial


class SectionTracker:
    """Follows section markers across chunks (GitLab sections, Travis folds, GitHub groups)."""

    def __init__(self) -> None:
        self.stack: tuple[str, ...] = ()

    def map_chunk(self, raw: bytes, first_line: int) -> SectionMap:
        """Markers of ``raw`` (whose first line is ``first_line``, 1-based) as a SectionMap."""
        smap = SectionMap(initial=self.stack)
        events: list[tuple[int, bool, str]] = []  # (offset, is_start, name)
        # Markers are rare: find them with memchr-speed searches, then parse each one.
        for literal, rx in ((b"section_", _GITLAB_MARKER_RE), (b"travis_fold:", _TRAVIS_MARKER_RE)):
            pos = raw.find(literal)
            while pos >= 0:
                m = rx.match(raw, pos)
                if m:
                    events.append((pos, m.group(1) == b"start", decode(m.group(2))))
                pos = raw.find(literal, pos + 1)
        for literal, is_start in ((b"##[group]", True), (b"##[endgroup]", False)):
            pos = raw.find(literal)
            while pos >= 0:
                line_start = raw.rfind(b"\n", 0, pos) + 1
                # GitHub commands only count at the start of a line (after the timestamp).
                if pos == line_start or _TIMESTAMP_RE.fullmatch(decode(raw[line_start:pos])):
                    end = raw.find(b"\n", pos)
                    title = raw[pos + len(literal) : end if end >= 0 else len(raw)]
                    events.append((pos, is_start, decode(title).strip()))
                pos = raw.find(literal, pos + 1)
        if not events:
            return smap
        events.sort()
        stack = list(self.stack)
        line, pos = first_line, 0
        for offset, is_start, name in events:
            line += raw.count(b"\n", pos, offset)
            pos = offset
            if is_start:
                if len(stack) < MAX_SECTION_DEPTH:
                    stack.append(name)
                key = line
            else:
                # GitHub ##[endgroup] carries no name: it closes the innermost group.
                if name and name in stack:
                    del stack[len(stack) - 1 - stack[::-1].index(name) :]
                elif stack:
                    stack.pop()
                key = line + 1  # the end line still belongs to the section
            if smap.keys and smap.keys[-1] == key:
                smap.stacks[-1] = tuple(stack)
            else:
                smap.keys.append(key)
                smap.stacks.append(tuple(stack))
        self.stack = tuple(stack)
        return smap


# --- chunking -------------------------------------------------------------------------------


def line_chunks(chunks: Iterable[bytes], size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Regroup arbitrary byte chunks into chunks of about ``size`` ending at a newline.

    Memory is bounded by ``size + MAX_LINE`` plus one input chunk: a line with no newline for
    ``MAX_LINE`` bytes is cut there (and so counts as two lines).
    """
    pending: list[bytes] = []
    pending_len = 0
    for chunk in chunks:
        if not chunk:
            continue
        pending.append(chunk)
        pending_len += len(chunk)
        if pending_len < size:
            continue
        data = b"".join(pending) if len(pending) > 1 else pending[0]
        start = 0
        while len(data) - start >= size:
            cut = data.rfind(b"\n", start, start + size)
            if cut < 0:  # a line longer than ``size``: take it whole, up to MAX_LINE more
                cut = data.find(b"\n", start + size, start + size + MAX_LINE)
                if cut < 0:
                    if len(data) - start < size + MAX_LINE:
                        break  # wait for the end of this long line
                    cut = start + size + MAX_LINE - 1  # no end in sight: cut, memory first
            yield data[start : cut + 1]
            start = cut + 1
        rest = data[start:]
        pending = [rest] if rest else []
        pending_len = len(rest)
    if pending:
        yield b"".join(pending)


class BufferPool:
    """Up to ``count`` reusable chunk buffers, made on first need: ``take`` waits for one to
    be given back when all are out. Bounds the memory of a reader that runs ahead of the
    threads consuming its chunks."""

    def __init__(self, count: int, size: int = CHUNK_SIZE + MAX_LINE) -> None:
        self.count = count
        self.size = size
        self._made = 0
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()

    def take(self) -> bytearray:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < self.count:
                self._made += 1
                return bytearray(self.size)
        return self._free.get()

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


class ChunkStream(io.RawIOBase):
    """Byte chunks held in memory (a fetched log's pieces) read as one stream: ``readinto``
    copies straight from the pieces into the caller's buffer, so ``buffered_line_chunks`` over
    it regroups them into chunks of whole lines with one copy and no allocation, where
    ``line_chunks`` joins, slices and re-joins them (three copies of most bytes, each a new
    ``bytes``)."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._index = 0
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as out:
            want = len(out)
            done = 0
            chunks = self._chunks
            while done < want and self._index < len(chunks):
                chunk = chunks[self._index]
                take = min(want - done, len(chunk) - self._offset)
                with memoryview(chunk) as piece:
                    out[done : done + take] = piece[self._offset : self._offset + take]
                done += take
                self._offset += take
                if self._offset == len(chunk):
                    self._index += 1
                    self._offset = 0
            return done


def buffered_line_chunks(
    stream: io.RawIOBase | io.BufferedIOBase,
    size: int = CHUNK_SIZE,
    buffers: BufferPool | None = None,
) -> Iterator[tuple[bytearray, int]]:
    """``line_chunks(read_chunks(stream), size)`` without allocating: the same chunks, each
    given as ``(buffer, n)``, the chunk being ``buffer[:n]``.

    Reading straight into a buffer (``readinto``) is the only copy of the data: no per-chunk
    ``bytes``, no joining of leftovers, no slicing, which at a gigabyte per second is a large
    part of the cost. Without ``buffers`` one buffer is reused, so a chunk is only valid until
    the next one is asked for, and memory is ``size + MAX_LINE``. With ``buffers`` (made with
    at least that size), each chunk comes in a buffer of the pool that belongs to the consumer
    until it ``give``s it back, and the next chunk is read into another one.
    """
    if buffers is not None and buffers.size < size + MAX_LINE:
        raise ValueError(f"buffers of {buffers.size} bytes cannot hold chunks of {size}")
    buf = buffers.take() if buffers is not None else bytearray(size + MAX_LINE)
    have = 0
    eof = False

    def fill(want: int) -> None:
        nonlocal have, eof
        with memoryview(buf) as view:
            while have < want and not eof:
                got = stream.readinto(view[have:want])
                if got:
                    have += got
                else:
                    eof = True

    while True:
        fill(size)
        if have < size:  # the end of the stream
            if have:
                yield buf, have
            elif buffers is not None:
                buffers.give(buf)
            return
        cut = buf.rfind(b"\n", 0, size)
        if cut < 0:  # a line longer than ``size``: take it whole, up to MAX_LINE more
            fill(size + MAX_LINE)
            cut = buf.find(b"\n", size, have)
            if cut < 0:
                if have < size + MAX_LINE:
                    yield buf, have  # the stream ends inside this long line
                    return
                cut = size + MAX_LINE - 1  # no end in sight: cut, memory first
        yield buf, cut + 1
        rest = have - cut - 1
        # The consumer only reads ``buf[:cut + 1]``; the rest starts the next buffer.
        nxt = buffers.take() if buffers is not None else buf
        nxt[:rest] = buf[cut + 1 : have]
        buf, have = nxt, rest


@dataclass(slots=True)
class Line:
    number: int
    text: str
    sections: tuple[str, ...]


def iter_lines(chunks: Iterable[bytes], *, first_line: int = 1) -> Iterator[Line]:
    """Each line as a person sees it, with its 1-based number and enclosing sections."""
    tracker = SectionTracker()
    number = first_line
    for raw in line_chunks(chunks, size=256 * 1024):
        smap = tracker.map_chunk(raw, number)
        text = clean(raw)
        if text.endswith(b"\n"):
            text = text[:-1]
        for part in text.split(b"\n"):
            yield Line(number, strip_prefix(decode(part)), smap.at(number))
            number += 1


# --- size cap keeping the tail --------------------------------------------------------------


@dataclass(slots=True)
class TailCapped:
    """The last ``cap`` bytes of a log (from a line start) and what was dropped before them."""

    chunks: list[bytes]
    skipped_bytes: int
    skipped_lines: int

    @property
    def first_line(self) -> int:
        return self.skipped_lines + 1


class TailKeeper:
    """Incremental form of ``tail_cap``: feed chunks as they arrive (a download), read the
    result at the end. Memory is ``cap`` plus one chunk."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept: collections.deque[bytes] = collections.deque()
        self.kept_size = 0
        self.skipped_bytes = 0
        self.skipped_lines = 0
        #: Whether what was dropped ended a line (the kept text then starts one).
        self._skipped_whole_lines = True

    @property
    def total(self) -> int:
        return self.skipped_bytes + self.kept_size

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        kept = self.kept
        kept.append(chunk)
        self.kept_size += len(chunk)
        while self.kept_size - len(kept[0]) >= self.cap:
            old = kept.popleft()
            self.kept_size -= len(old)
            self.skipped_bytes += len(old)
            self.skipped_lines += old.count(b"\n")
            self._skipped_whole_lines = old.endswith(b"\n")

    def result(self) -> TailCapped:
        kept = list(self.kept)
        skipped_bytes, skipped_lines = self.skipped_bytes, self.skipped_lines
        drop = self.kept_size - self.cap
        if drop <= 0 and self._skipped_whole_lines:
            return TailCapped(kept, skipped_bytes, skipped_lines)
        # Start at a line boundary so no rule sees half a line: just past the first newline at
        # or after the cut, which lies in a later chunk when chunks are shorter than lines.
        cut = _line_start(kept, max(drop, 0))
        if cut >= self.kept_size:
            cut = max(drop, 0)  # the tail is all one line: keep its end rather than nothing
        while kept and len(kept[0]) <= cut:
            head = kept.pop(0)
            cut -= len(head)
            skipped_bytes += len(head)
            skipped_lines += head.count(b"\n")
        if cut:
            skipped_bytes += cut
            skipped_lines += kept[0].count(b"\n", 0, cut)
            kept[0] = kept[0][cut:]
        return TailCapped(kept, skipped_bytes, skipped_lines)


def _line_start(chunks: list[bytes], at: int) -> int:
    """The first line start at or after offset ``at`` of the chunks joined (offset 0 counts
    only after a newline: the caller knows the text before it did not end a line); the end
    when there is none."""
    offset = 0
    for chunk in chunks:
        if offset + len(chunk) >= at:
            nl = chunk.find(b"\n", max(0, at - 1 - offset))
            if nl >= 0:
                return offset + nl + 1
        offset += len(chunk)
    return offset


def tail_cap(chunks: Iterable[bytes], cap: int) -> TailCapped:
    """Keep at most ``cap`` bytes from the end of a stream, counting what is dropped.

    Dropped newlines are counted so line numbers of the kept tail stay those of the full log.
    Memory is ``cap`` plus one input chunk.
    """
    keeper = TailKeeper(cap)
    for chunk in chunks:
        keeper.write(chunk)
    return keeper.result()


# --- files ----------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"


def open_log(path: str | Path) -> io.BufferedIOBase:
    """Open a log file, transparently decompressing gzip (detected by content, not name)."""
    f = open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    if magic == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def read_chunks(stream: BinaryIO | io.BufferedIOBase, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    while True:
        data = stream.read(size)
        if not data:
            return
        yield data


def file_chunks(path: str | Path, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Stream a (possibly gzipped) log file as byte chunks."""
    with open_log(path) as f:
        yield from read_chunks(f, size)


def read_log_tail(path: str | Path, cap: int) -> TailCapped:
    """A log file capped to its last ``cap`` bytes.

    A plain file is read from ``size - cap`` (its head is only counted for newlines, never
    held); a gzip file has to be decompressed through, keeping the tail.
    """
    with open_log(path) as f:
        if isinstance(f, gzip.GzipFile):
            return tail_cap(read_chunks(f), cap)
        total = f.seek(0, io.SEEK_END)
        f.seek(0)
        if total <= cap:
            return TailCapped(list(read_chunks(f)), 0, 0)
        head_len = total - cap
        skipped_lines = 0
        remaining = head_len
        while remaining:
            data = f.read(min(CHUNK_SIZE, remaining))
            if not data:
                break
            skipped_lines += data.count(b"\n")
            remaining -= len(data)
        # Advance to the next line start so the tail begins with a whole line.
        last = b""
        if head_len:
            f.seek(head_len - 1)
            last = f.read(1)
        skipped = head_len
        if last != b"\n":
            rest = f.readline(MAX_LINE)
            skipped += len(rest)
            skipped_lines += rest.count(b"\n")
        return TailCapped(list(read_chunks(f)), skipped, skipped_lines)
