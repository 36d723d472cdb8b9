"""Time-ordered identifiers (UUIDv7, RFC 9562): event ids sort by creation time."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0
#: Random bits are drawn from the OS 4 KiB at a time: one ``getrandom`` call per id was a
#: measurable part of ingest's CPU per webhook (system calls are dear in sandboxes).
_POOL_BYTES = 4096
_pool = b""
_pool_at = _POOL_BYTES


def _forget_pool() -> None:
    # A forked child must not hand out the random bits its parent will use too.
    global _pool_at
    _pool_at = _POOL_BYTES


os.register_at_fork(after_in_child=_forget_pool)


def uuid7() -> uuid.UUID:
    """A UUIDv7: 48-bit Unix milliseconds, then a 12-bit counter (monotonic within a
    millisecond in this process), then 62 random bits."""
    global _last_ms, _counter, _pool, _pool_at
    with _lock:
        if _pool_at >= _POOL_BYTES:
            _pool, _pool_at = os.urandom(_POOL_BYTES), 0
        rand_bytes = _pool[_pool_at : _pool_at + 8]
        _pool_at += 8
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # Same (or earlier: clock step back) millisecond: keep ordering with the counter.
            _counter += 1
            if _counter > 0xFFF:
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        else:
            _last_ms = ms
            _counter = 0
        counter = _counter
    rand = int.from_bytes(rand_bytes, "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand
    return uuid.UUID(int=value)
