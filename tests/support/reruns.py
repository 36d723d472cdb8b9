"""A failed job's log as a rerun of the same failure would print it (tests and bench/learning).

Reruns of one failure differ in what the signature must mask: timestamps, durations, ids,
hashes, temporary paths, ports and addresses, and in the order parallel output interleaves.
``rerun_log`` applies all of that to a real log, deterministically for a given ``rng``.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable

import re2

_ISO = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")
_CLOCK = re.compile(rb"\b\d\d:\d\d:\d\d\b")
_DURATION = re.compile(rb"\b\d+(?:\.\d+)?(ms|s)\b")
_UUID = re.compile(rb"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_HEX = re.compile(rb"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")
_TMP = re.compile(rb"/tmp/[A-Za-z0-9_.-]+")
_PORT = re.compile(rb"(localhost|127\.0\.0\.1):\d{2,5}\b")
_IP = re.compile(rb"\b10\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
_ID = re.compile(rb"\b\d{5,}\b")
#: The same patterns in RE2 (linear scans; Python's re tries every position of a many-MB log),
#: for those where that is faster. RE2 finds the same matches: leftmost-first, ASCII \d and \b
#: on bytes, none can be empty. ``_HEX`` has lookaheads, which RE2 lacks.
_FAST = {rx: re2.compile(rx.pattern) for rx in (_DURATION, _UUID, _PORT, _IP, _ID)}


def _sub(rx: re.Pattern[bytes], repl: Callable[[re.Match[bytes]], bytes], data: bytes) -> bytes:
    """``rx.sub(repl, data)``: the same matches, in the same order (so the same draws of rng)."""
    fast = _FAST.get(rx)
    if fast is None:
        return rx.sub(repl, data)
    parts: list[bytes] = []
    end = 0
    for m in fast.finditer(data):
        start, stop = m.span()
        parts += (data[end:start], repl(m))
        end = stop
    parts.append(data[end:])
    return b"".join(parts)


CHATTER = (
    b"Downloading %d of %d layers (%d%%)",
    b"progress: %d/%d files, %d%% done",
    b"[worker %d] heartbeat %d ok %d",
)


def rerun_log(data: bytes, rng: random.Random) -> bytes:
    """``data`` as a rerun of the same failure prints it."""

    def hexes(m: re.Match[bytes]) -> bytes:
        return "".join(rng.choice("0123456789abcdef") for _ in m.group(0)).encode()

    day = rng.randrange(1, 28)
    data = _ISO.sub(
        lambda m: (
            b"2026-11-%02dT%02d:%02d:%02d.%07dZ"
            % (day, rng.randrange(24), rng.randrange(60), rng.randrange(60), rng.randrange(10**7))
        ),
        data,
    )
    data = _CLOCK.sub(
        lambda m: b"%02d:%02d:%02d" % (rng.randrange(24), rng.randrange(60), rng.randrange(60)),
        data,
    )
    data = _sub(_DURATION, lambda m: b"%.2f%s" % (rng.uniform(0.01, 900), m.group(1)), data)
    data = _sub(_UUID, lambda m: str(uuid.UUID(int=rng.getrandbits(128))).encode(), data)
    data = _HEX.sub(hexes, data)
    data = _TMP.sub(lambda m: b"/tmp/tmp%08x" % rng.getrandbits(32), data)
    data = _sub(_PORT, lambda m: m.group(1) + b":%d" % rng.randrange(1024, 65535), data)
    data = _sub(
        _IP,
        lambda m: b"10.%d.%d.%d" % (rng.randrange(256), rng.randrange(256), rng.randrange(256)),
        data,
    )
    data = _sub(
        _ID,
        lambda m: str(rng.randrange(10 ** (len(m.group(0)) - 1), 10 ** len(m.group(0)))).encode(),
        data,
    )
    lines = data.split(b"\n")
    # Parallel output interleaves differently: neighbours near the end swap, chatter appears.
    n = len(lines)
    for _ in range(3):
        if n > 8:
            i = rng.randrange(max(0, n - 60), n - 5)
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(max(0, n - 80), max(1, n - 3))
        line = rng.choice(CHATTER) % (
            rng.randrange(100),
            rng.randrange(100, 999),
            rng.randrange(100),
        )
        lines.insert(at, line)
    return b"\n".join(lines)
