"""Text that PostgreSQL can hold: in a ``text`` column and inside ``jsonb``.

PostgreSQL refuses U+0000 in ``text`` (``invalid byte sequence for encoding "UTF8": 0x00``) and
in ``jsonb`` (``unsupported Unicode escape sequence``), and UTF-8 cannot encode a lone surrogate
(U+D800..U+DFFF without its pair), which Python strings can hold when a JSON parser accepted a
``"\\ud800"`` escape. An event body holding either is stored (it is bytea) but breaks every
reader that puts it in a column or casts it to ``jsonb``: one such event stalls a read model.

``safe_text`` is the one rule: both become U+FFFD (what a UTF-8 decoder yields for bytes it cannot
decode), and a value longer than its cap is cut, the cut marked with "…", so the stored text says
it is not whole. Everything else (other control characters, right-to-left marks, astral
characters) is valid in PostgreSQL and kept as sent.
"""

from __future__ import annotations

import re
from typing import Final

REPLACEMENT: Final = "\ufffd"
CUT_MARK: Final = "\u2026"

_UNSAFE = re.compile("[\x00\ud800-\udfff]")


def is_safe_text(value: str) -> bool:
    """True when ``value`` can go into a PostgreSQL text column and a jsonb value as it is."""
    return _UNSAFE.search(value) is None


def safe_text(value: str, cap: int) -> str:
    """``value`` with U+0000 and lone surrogates replaced by U+FFFD, cut to at most ``cap``
    characters (the last one then "…")."""
    if len(value) > cap:
        value = value[: cap - 1] + CUT_MARK
    if value.isascii() and "\x00" not in value:
        return value  # the common case, without the regex
    return _UNSAFE.sub(REPLACEMENT, value)
