from __future__ import annotations

import gzip
import io
import random
from pathlib import Path

import pytest

from ciretry.classify import logtext


def test_clean_removes_ansi_markers_and_carriage_returns_but_keeps_newlines() -> None:
    raw = (
        b"\x1b[0Ksection_start:1700000000:get_sources[collapsed=true]\r\x1b[0K"
        b"\x1b[36;1mGetting source from Git repository\x1b[0;m\r\n"
        b"\x1b]8;;https://x\x07link\x1b]8;;\x07 text\n"
        b"progress 10%\rprogress 100%\n"
        b"section_end:1700000001:get_sources\r\x1b[0K\n"
    )
    out = logtext.clean(raw)
    assert out == (b"Getting source from Git repository\nlink text\nprogress 10%progress 100%\n\n")
    assert out.count(b"\n") == raw.count(b"\n")


def test_strip_prefix_removes_provider_timestamps_only() -> None:
    assert logtext.strip_prefix("2026-07-30T10:33:37.0347135Z ##[error]x") == "##[error]x"
    assert logtext.strip_prefix("[task 2025-02-13T21:45:24.968Z] 21:45:24 INFO - x") == (
        "21:45:24 INFO - x"
    )
    assert logtext.strip_prefix("[taskcluster 2025-02-13 21:39:55.345Z] Task ID: X") == "Task ID: X"
    assert logtext.strip_prefix("2026-07-30 not a timestamp") == "2026-07-30 not a timestamp"


def _log() -> bytes:
    return (
        b"prologue\n"  # 1
        b"section_start:1:prepare_executor\r\x1b[0KPreparing\n"  # 2
        b"using docker\n"  # 3
        b"section_end:2:prepare_executor\r\x1b[0K\n"  # 4
        b"section_start:3:step_script\r\x1b[0KExecuting\n"  # 5
        b"section_start:4:inner[collapsed=true]\r\x1b[0Kinner header\n"  # 6
        b"in inner\n"  # 7
        b"section_end:5:inner\r\x1b[0K\n"  # 8
        b"2024-01-01T00:00:00.0000000Z ##[group]Run make\n"  # 9
        b"2024-01-01T00:00:00.0000000Z make: ok\n"  # 10
        b"2024-01-01T00:00:00.0000000Z ##[endgroup]\n"  # 11
        b"still in script\n"  # 12
        b"section_end:6:step_script\r\x1b[0K\n"  # 13
        b"epilogue"  # 14, unterminated
    )


def test_iter_lines_numbers_and_sections() -> None:
    lines = list(logtext.iter_lines([_log()]))
    assert [ln.number for ln in lines] == list(range(1, 15))
    by = {ln.number: ln for ln in lines}
    assert by[1].sections == ()
    assert by[2].sections == ("prepare_executor",) and by[2].text == "Preparing"
    assert by[4].sections == ("prepare_executor",)  # the end line still belongs to it
    assert by[6].sections == ("step_script", "inner") and by[6].text == "inner header"
    assert by[7].sections == ("step_script", "inner")
    assert by[9].sections == ("step_script", "Run make")
    assert by[10].text == "make: ok"
    assert by[12].sections == ("step_script",)
    assert by[14].sections == () and by[14].text == "epilogue"


def test_sections_are_the_same_however_the_stream_is_split() -> None:
    data = _log()
    whole = [(ln.number, ln.text, ln.sections) for ln in logtext.iter_lines([data])]
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), 6))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert [(ln.number, ln.text, ln.sections) for ln in logtext.iter_lines(parts)] == whole


def test_line_chunks_end_on_newlines_and_lose_nothing() -> None:
    data = b"".join(b"line %d\n" % i for i in range(10000))
    pieces = [data[i : i + 777] for i in range(0, len(data), 777)]
    chunks = list(logtext.line_chunks(pieces, size=4096))
    assert b"".join(chunks) == data
    assert all(c.endswith(b"\n") for c in chunks)
    assert max(len(c) for c in chunks) <= 4096


def test_line_chunks_cut_an_endless_line_to_bound_memory(monkeypatch: object) -> None:
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setattr(logtext, "MAX_LINE", 1000)
    try:
        data = b"x" * 50000 + b"\nend\n"
        chunks = list(logtext.line_chunks([data[i : i + 100] for i in range(0, len(data), 100)],
                                          size=1000))  # fmt: skip
        assert b"".join(chunks) == data
        assert max(len(c) for c in chunks) <= 2000
    finally:
        mp.undo()


def test_tail_cap_keeps_whole_lines_and_counts_what_it_dropped() -> None:
    data = b"".join(b"line %05d\n" % i for i in range(1, 1001))  # 11 bytes per line
    capped = logtext.tail_cap([data[i : i + 37] for i in range(0, len(data), 37)], cap=110)
    kept = b"".join(capped.chunks)
    assert kept == b"".join(b"line %05d\n" % i for i in range(991, 1001))
    assert capped.skipped_lines == 990 and capped.first_line == 991
    assert capped.skipped_bytes + len(kept) == len(data)


@pytest.mark.parametrize("size", [1, 3, 7, 10, 11, 12, 37, 200])
def test_tail_cap_starts_at_a_line_whatever_the_chunks(size: int) -> None:
    """Chunks shorter than a line (a provider dribbling its log) still give a tail of whole
    lines: the line start may lie chunks after the cut."""
    data = b"".join(b"line %05d\n" % i for i in range(1, 1001))  # 11 bytes per line
    capped = logtext.tail_cap([data[i : i + size] for i in range(0, len(data), size)], cap=105)
    kept = b"".join(capped.chunks)
    assert kept == b"".join(b"line %05d\n" % i for i in range(992, 1001))
    assert capped.first_line == 992 and capped.skipped_bytes + len(kept) == len(data)


def test_tail_cap_of_one_long_line_keeps_the_cap() -> None:
    data = b"x" * 1000 + b"\n"
    capped = logtext.tail_cap([data[i : i + 64] for i in range(0, len(data), 64)], cap=100)
    assert b"".join(capped.chunks) == b"x" * 99 + b"\n" and capped.first_line == 1


def test_read_log_tail_plain_and_gzip_agree(tmp_path: Path) -> None:
    data = b"".join(b"row %d of the log\n" % i for i in range(1, 5001))
    plain, gz = tmp_path / "a.log", tmp_path / "a.log.gz"
    plain.write_bytes(data)
    gz.write_bytes(gzip.compress(data))
    a, b = logtext.read_log_tail(plain, 1000), logtext.read_log_tail(gz, 1000)
    assert b"".join(a.chunks) == b"".join(b.chunks)
    assert a.first_line == b.first_line
    first = b"".join(a.chunks).split(b"\n", 1)[0]
    assert first == b"row %d of the log" % a.first_line
    assert len(b"".join(a.chunks)) <= 1000


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    p = tmp_path / "no-suffix"
    p.write_bytes(gzip.compress(b"hello\n"))
    assert b"".join(logtext.file_chunks(p)) == b"hello\n"


def test_buffered_line_chunks_cut_exactly_like_line_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logtext, "MAX_LINE", 50)  # exercise the cut of endless lines too
    rng = random.Random(5)
    for _ in range(40):
        parts = []
        for _ in range(rng.randrange(0, 60)):
            parts.append(b"x" * rng.choice([0, 1, 5, 20, 70, 130, 300]))
            parts.append(b"\n" if rng.random() < 0.8 else b"")
        data = b"".join(parts)
        for size in (1, 7, 64, 100):
            expected = list(logtext.line_chunks(logtext.read_chunks(io.BytesIO(data), size), size))
            got = [
                bytes(buf[:n]) for buf, n in logtext.buffered_line_chunks(io.BytesIO(data), size)
            ]
            assert got == expected, (data, size)


def test_chunk_stream_reads_pieces_as_one_stream_and_cuts_like_line_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The in-memory path of ``Scanner.scan``: the pieces a log was fetched in, read through
    ``ChunkStream`` into reused buffers, give the chunks ``line_chunks`` gives."""
    monkeypatch.setattr(logtext, "MAX_LINE", 50)
    rng = random.Random(11)
    for _ in range(40):
        data = b"".join(
            b"y" * rng.choice([0, 1, 5, 20, 70, 130]) + (b"\n" if rng.random() < 0.8 else b"")
            for _ in range(rng.randrange(0, 60))
        )
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randrange(0, 12))))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        stream = logtext.ChunkStream(pieces)
        read = []
        while piece := stream.read(rng.randrange(1, 40)):
            read.append(piece)
        assert b"".join(read) == data
        for size in (1, 7, 64, 100):
            expected = list(logtext.line_chunks(pieces, size))
            got = [
                bytes(buf[:n])
                for buf, n in logtext.buffered_line_chunks(logtext.ChunkStream(pieces), size)
            ]
            assert got == expected, (pieces, size)
