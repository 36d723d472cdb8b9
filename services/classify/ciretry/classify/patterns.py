"""The regular-expression dialect of rules: linear-time only, line-oriented.

A rule regex is checked and compiled with RE2 (google-re2), whose matching time is linear in
the input whatever the pattern: there is no backtracking, so ``(a+)+$`` is harmless and
constructs that need backtracking (backreferences, lookaround, atomic groups) do not exist.
We detect those up front to refuse them with a message a rule author understands, instead of
RE2's terse parser error.

Patterns are matched against one line at a time, as a person sees it (see ``logtext``): ``^``
and ``$`` are line anchors and ``^`` also matches after a provider timestamp prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import re2

from .logtext import TIMESTAMP_PREFIX


class PatternError(ValueError):
    """A rule regex that cannot run on a linear-time engine (or does not parse)."""


_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors are raised to the caller, not printed by RE2

_FORBIDDEN_GROUPS = {
    "(?=": "a lookahead (?=...)",
    "(?!": "a negative lookahead (?!...)",
    "(?<=": "a lookbehind (?<=...)",
    "(?<!": "a negative lookbehind (?<!...)",
    "(?>": "an atomic group (?>...)",
    "(?P=": "a named backreference (?P=...)",
}


def _tokens(pattern: str) -> Iterator[tuple[int, str, bool]]:
    """(index, token, inside a character class) for each token; escapes are one token."""
    i, n, in_class = 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            yield i, pattern[i : i + 2], in_class
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            yield i, c, True
            i += 1
            continue
        if c == "[":
            yield i, c, False
            in_class = True
            i += 1
            # A ']' (or '^]') right after '[' is a literal member, not the end of the class.
            if i < n and pattern[i] == "^":
                yield i, "^", True
                i += 1
            if i < n and pattern[i] == "]":
                yield i, "]", True
                i += 1
            continue
        yield i, c, False
        i += 1


def check_linear(pattern: str) -> None:
    """Raise PatternError if the pattern uses a construct that needs backtracking."""
    for i, tok, in_class in _tokens(pattern):
        if in_class:
            continue
        if len(tok) == 2 and tok[0] == "\\" and (tok[1] in "123456789" or tok[1] == "k"):
            raise PatternError(
                f"backreference {tok!r} at offset {i}: backreferences need a backtracking "
                "engine, and rules must run in linear time; rewrite the pattern without it"
            )
        if tok == "(":
            for prefix, what in _FORBIDDEN_GROUPS.items():
                if pattern.startswith(prefix, i):
                    raise PatternError(
                        f"{what} at offset {i}: lookaround and atomic groups need a "
                        "backtracking engine, and rules must run in linear time; match the "
                        "text itself, or use log_not for what must not be on the line"
                    )


def compile_linear(pattern: str) -> Any:
    """Check and compile ``pattern`` with RE2; raises PatternError with a readable message."""
    check_linear(pattern)
    try:
        return re2.compile(pattern, _OPTIONS)
    except Exception as exc:  # re2 raises its own error type; normalise it
        msg = exc.args[0] if exc.args else exc
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        raise PatternError(f"does not compile on RE2: {msg}") from None


def line_oriented(pattern: str) -> str:
    """Rewrite a rule pattern for scanning a whole buffer of lines at once.

    ``^`` becomes "line start, optionally followed by a provider timestamp" (the buffer still
    has them; the per-line check strips them), and ``\\A``/``\\z``/``\\Z`` become line
    anchors, since each rule is about one line.
    """
    out: list[str] = []
    for _, tok, in_class in _tokens(pattern):
        if in_class:
            out.append(tok)
        elif tok in ("^", "\\A"):
            out.append(f"^{TIMESTAMP_PREFIX}?")
        elif tok in ("\\z", "\\Z"):
            out.append("$")
        else:
            out.append(tok)
    return "".join(out)


# --- prefilter for the multi-pattern scan ---------------------------------------------------


def _items(pattern: str) -> list[tuple[str, str]] | None:
    """Top-level (item, quantifier) pairs of a branch-free pattern; None if unparsable."""
    toks = list(_tokens(pattern))
    items: list[tuple[str, str]] = []
    i, n = 0, len(toks)
    while i < n:
        start, tok, in_class = toks[i]
        if tok == "[" and not in_class:
            j = i + 1
            while j < n and toks[j][2]:
                j += 1
            end = toks[j - 1][0] + len(toks[j - 1][1]) if j > i + 1 else start + 1
            item = pattern[start:end]
            i = j
        elif tok == "(":
            depth, j = 0, i
            while j < n:
                t, c = toks[j][1], toks[j][2]
                if not c and t == "(":
                    depth += 1
                elif not c and t == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= n:
                return None
            item = pattern[start : toks[j][0] + 1]
            i = j + 1
        elif tok in ("|", ")"):
            return None
        else:
            item = tok
            i += 1
        quant = ""
        if i < n and toks[i][1] in ("*", "+", "?"):
            quant = toks[i][1]
            i += 1
        elif i < n and toks[i][1] == "{":
            j = i
            while j < n and toks[j][1] != "}":
                j += 1
            quant = "".join(t for _, t, _ in toks[i : j + 1])
            i = j + 1
        if quant and i < n and toks[i][1] == "?":
            quant += "?"
            i += 1
        items.append((item, quant))
    return items


def _split_top(pattern: str) -> list[str]:
    """Split on top-level ``|``."""
    parts, depth, last = [], 0, 0
    for i, tok, in_class in _tokens(pattern):
        if in_class:
            continue
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif tok == "|" and depth == 0:
            parts.append(pattern[last:i])
            last = i + 1
    parts.append(pattern[last:])
    return parts


_CLASS_ESCAPES = set("dDsSwWbBpPAzZ")


def _is_literal(item: str) -> bool:
    if len(item) == 1:
        return item not in ".^$"
    return item[0] == "\\" and len(item) == 2 and item[1] not in _CLASS_ESCAPES


def _optional(quant: str) -> bool:
    return quant.startswith(("*", "?", "{0", "{,"))


def _prefilter_branch(branch: str) -> str:
    items = _items(branch)
    if items is None:
        return branch
    if len(items) == 1 and items[0][0].startswith("(?:") and not items[0][1]:
        return "(?:" + prefilter(items[0][0][3:-1]) + ")"
    first = next(
        (
            k
            for k, (item, quant) in enumerate(items)
            if not _optional(quant) and (_is_literal(item) or item.startswith("("))
        ),
        None,
    )
    if first is None:
        return branch  # nothing literal to start from: keep the pattern as written
    return "".join(it + q for it, q in items[first:])


def prefilter(pattern: str) -> str:
    """A cheaper pattern matching a superset of the lines ``pattern`` matches.

    Hyperscan is slow on a leading unbounded class anchored at line start (``^\\S+\\.java:``):
    it must track every line start. Dropping a leading part of a concatenation only widens
    the match (if ``AB`` matches, ``B`` matches at the same end), and the per-line RE2 check
    restores exact semantics, so each alternative starts at its first required literal or
    group instead.
    """
    flags = ""
    m = pattern.startswith("(?") and pattern.find(")")
    if m and m > 2 and all(c.isalpha() for c in pattern[2:m]):
        flags, pattern = pattern[: m + 1], pattern[m + 1 :]
    branches = [_prefilter_branch(b) for b in _split_top(pattern)]
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return flags + body
