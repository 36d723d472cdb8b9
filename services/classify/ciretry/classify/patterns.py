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
from dataclasses import dataclass
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


# --- required literals for the multi-pattern scan ---------------------------------------------

#: Most strings an "exact" set (the finite language of a piece of pattern) may hold.
_MAX_EXACT = 64
#: Shortest literal worth scanning for instead of the pattern itself.
SHORTEST_LITERAL = 3

_CONTROL_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
_ASSERTIONS = {"^", "$", "\\b", "\\B", "\\A", "\\z"}
_ONE_CHAR_CLASSES = {".", "\\d", "\\D", "\\s", "\\S", "\\w", "\\W"}


class _Unsupported(Exception):
    """A construct the literal extraction does not model; the rule keeps its full regex."""


@dataclass(slots=True)
class _Piece:
    """What a piece of pattern guarantees: ``exact`` is its whole (small, finite) language,
    or None; ``factor`` is a set of strings one of which is in every match, or None."""

    exact: frozenset[str] | None
    factor: frozenset[str] | None


def _cross(a: frozenset[str], b: frozenset[str]) -> frozenset[str] | None:
    if len(a) * len(b) > _MAX_EXACT:
        return None
    return frozenset(x + y for x in a for y in b)


def _score(s: frozenset[str]) -> tuple[int, int]:
    return (min(len(x) for x in s), -len(s))


def _better(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None or "" in a:
        return None if b is None or "" in b else b
    if b is None or "" in b:
        return a
    return b if _score(b) > _score(a) else a


def _class_members(item: str) -> frozenset[str] | None:
    """Members of a small, plain character class like ``[Aa]`` or ``[-_ ]``; else None."""
    body = item[1:-1]
    if not body or body.startswith("^") or "[" in body:
        return None
    members: set[str] = set()
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 >= len(body) or body[i + 1].isalnum():
                return None
            c = body[i + 1]
            i += 2
        else:
            i += 1
        if i < len(body) - 1 and body[i] == "-":
            return None  # a range: usually large, not worth enumerating
        members.add(c)
    return frozenset(members) if len(members) <= 8 else None


def _atom(item: str) -> _Piece:
    """One item (no quantifier): a character, escape, class or group."""
    if item in _ASSERTIONS:
        return _Piece(frozenset({""}), None)
    if item in _ONE_CHAR_CLASSES:
        return _Piece(None, None)
    if item.startswith("\\"):
        c = item[1:]
        if len(c) != 1:
            raise _Unsupported(item)
        if c in _CONTROL_ESCAPES:
            return _Piece(frozenset({_CONTROL_ESCAPES[c]}), None)
        if c.isalnum() or not c.isascii():
            raise _Unsupported(item)  # \x41, \pL, \Q, \1 ...: not modelled
        return _Piece(frozenset({c}), None)
    if item.startswith("["):
        return _Piece(_class_members(item), None)
    if item.startswith("("):
        inner = item[1:-1]
        if inner.startswith("?"):
            if inner.startswith("?:"):
                inner = inner[2:]
            elif inner.startswith(("?P<", "?<")) and ">" in inner:
                inner = inner[inner.index(">") + 1 :]
            elif ":" in inner:
                return _Piece(None, None)  # (?i:...): scoped flags, treated as unknown
            else:
                raise _Unsupported(item)  # (?i) in the middle changes what follows
        return _alternation(inner)
    if len(item) != 1 or item in "()|*+?":
        raise _Unsupported(item)
    return _Piece(frozenset({item}), None)


def _repeat(s: frozenset[str], n: int) -> frozenset[str] | None:
    out: frozenset[str] | None = frozenset({""})
    for _ in range(n):
        if out is None:
            return None
        out = _cross(out, s)
    return out


def _quantifier(quant: str) -> tuple[int, int | None]:
    """(min, max) repetitions; max None for unbounded."""
    q = quant.rstrip("?") if len(quant) > 1 else quant
    if q == "":
        return 1, 1
    if q == "?":
        return 0, 1
    if q == "*":
        return 0, None
    if q == "+":
        return 1, None
    body = q[1:-1] if q.startswith("{") and q.endswith("}") else None
    if body is None:
        raise _Unsupported(quant)
    lo, _, hi = body.partition(",")
    if not lo.isdigit() or (hi and not hi.isdigit()):
        raise _Unsupported(quant)
    if "," not in body:
        return int(lo), int(lo)
    return int(lo), (int(hi) if hi else None)


def _concatenation(branch: str) -> _Piece:
    items = _items(branch)
    if items is None:
        raise _Unsupported(branch)
    run: frozenset[str] | None = frozenset({""})
    closed = False
    best: frozenset[str] | None = None
    for item, quant in items:
        piece = _atom(item)
        lo, hi = _quantifier(quant)
        if lo >= 1:
            best = _better(best, piece.factor)
        step: frozenset[str] | None = None
        if piece.exact is not None:
            if lo == hi:
                step = _repeat(piece.exact, lo)
            elif lo == 0 and hi == 1:
                step = piece.exact | {""}
        if step is not None and run is not None:
            joined = _cross(run, step)
            if joined is not None:
                run = joined
                continue
        # The run ends here: keep it, then start again after this item.
        head = _repeat(piece.exact, lo) if piece.exact is not None and lo >= 1 else None
        # The first ``lo`` repetitions follow the run, the last ``lo`` precede what follows:
        # "x(?:ab){2,}c" contains "xabab" and "ababc".
        joined = _cross(run, head) if head is not None and run is not None else None
        best = _better(best, joined if joined is not None else run)
        closed = True
        run = head if head is not None else frozenset({""})
    best = _better(best, run)
    return _Piece(None if closed else run, best)


def _alternation(pattern: str) -> _Piece:
    pieces = [_concatenation(b) for b in _split_top(pattern)]
    exact: frozenset[str] | None = frozenset()
    factor: frozenset[str] | None = frozenset()
    for p in pieces:
        exact = exact | p.exact if exact is not None and p.exact is not None else None
        if exact is not None and len(exact) > _MAX_EXACT:
            exact = None
        f = _better(p.factor, p.exact)
        factor = factor | f if factor is not None and f is not None else None
    return _Piece(exact, factor)


def required_literals(pattern: str) -> tuple[tuple[str, ...], bool] | None:
    """Strings one of which every match of ``pattern`` contains, and whether caselessly.

    None when no such set of strings of at least ``SHORTEST_LITERAL`` characters is found (or the
    pattern uses a construct this does not model): the pattern must then be scanned for as
    is. Scanning for literals and confirming each hit's line with the real regex is how
    ripgrep is fast; Hyperscan also runs a set of plain literals faster than the
    same number of regexes.
    """
    flags = ""
    m = pattern.startswith("(?") and pattern.find(")")
    if m and m > 2 and all(c.isalpha() for c in pattern[2:m]):
        flags, pattern = pattern[2:m], pattern[m + 1 :]
    caseless = "i" in flags
    try:
        piece = _alternation(pattern)
    except _Unsupported:
        return None
    lits = _better(piece.factor, piece.exact)
    if lits is None or min(len(x) for x in lits) < SHORTEST_LITERAL:
        return None
    if caseless and not all(x.isascii() for x in lits):
        return None  # RE2 folds Unicode case; Hyperscan only ASCII
    if any("\ufffd" in x for x in lits):
        return None  # undecodable bytes become U+FFFD in the checked line, not in the raw log
    # A line holding "abcd" holds "bc": keep only the shortest of nested literals.
    if caseless:
        folded = {x: x.lower() for x in lits}
        kept = [x for x in lits if not any(y != x and folded[y] in folded[x] for y in lits)]
    else:
        kept = [x for x in lits if not any(y != x and y in x for y in lits)]
    return tuple(sorted(kept)), caseless


def _top_branches(pattern: str) -> list[str]:
    """Top-level alternatives, looking through a pattern that is one plain ``(?:...)``."""
    items = _items(pattern)
    if items and len(items) == 1 and items[0][0].startswith("(?:") and not items[0][1]:
        return _top_branches(items[0][0][3:-1])
    return _split_top(pattern)


@dataclass(frozen=True, slots=True)
class ScanPart:
    """Something to scan for, such that every line a rule pattern matches contains one: a set
    of literals (ASCII-caseless or not), or a Hyperscan-ready regex."""

    literals: tuple[str, ...] = ()
    caseless: bool = False
    regex: str | None = None


def scan_parts(pattern: str, min_literal: int) -> list[ScanPart]:
    """Split a rule pattern into what the multi-pattern scan looks for.

    Each top-level alternative with required literals of at least ``min_literal`` characters
    is scanned for as those literals; the other alternatives together as one regex
    (``line_oriented(prefilter(...))``). Every hit is confirmed on its line with the rule's
    own RE2 regex, so this only has to report a superset of the matching lines.
    """
    flags = ""
    m = pattern.startswith("(?") and pattern.find(")")
    if m and m > 2 and all(c.isalpha() for c in pattern[2:m]):
        flags, body = pattern[: m + 1], pattern[m + 1 :]
    else:
        body = pattern
    parts: list[ScanPart] = []
    rest: list[str] = []
    for branch in _top_branches(body):
        found = required_literals(flags + branch)
        if found is not None and min(len(x) for x in found[0]) >= min_literal:
            parts.append(ScanPart(literals=found[0], caseless=found[1]))
        else:
            rest.append(branch)
    if rest:
        rest = [_from_strongest_literal(flags, b) for b in rest]
        parts.append(ScanPart(regex=line_oriented(prefilter(flags + "|".join(rest)))))
    return parts


def _from_strongest_literal(flags: str, branch: str) -> str:
    """``branch`` without what precedes its longest run of literal text.

    Like ``prefilter`` (dropping a leading part of a concatenation only widens the match), but
    cutting before the strongest literal rather than the first: Hyperscan then anchors its
    search on it (``\\.py::\\S+ (?:FAILED|ERROR)`` becomes `` (?:FAILED|ERROR)``, which is
    rare, where ``.py::`` is on every line of a pytest log).
    """
    items = _items(branch)
    if not items:
        return branch
    best_k, best_score = 0, 0
    for k in range(len(items)):
        lits = _leading_run(items[k:])
        if lits is not None and min(len(x) for x in lits) > best_score:
            best_k, best_score = k, min(len(x) for x in lits)
    return "".join(i + q for i, q in items[best_k:])


def _leading_run(items: list[tuple[str, str]]) -> frozenset[str] | None:
    """The literal strings a concatenation of ``items`` starts with, if it starts with any."""
    run: frozenset[str] | None = frozenset({""})
    for item, quant in items:
        try:
            piece = _atom(item)
            lo, hi = _quantifier(quant)
        except _Unsupported:
            return None
        if piece.exact is None or run is None or (lo == 0 and hi != 1):
            break
        step = piece.exact | {""} if lo == 0 else _repeat(piece.exact, lo)
        joined = _cross(run, step) if step is not None else None
        if joined is None:
            break
        run = joined
        if hi != lo and lo != 0:
            break  # "x{2,}": more copies may follow, so what follows is not adjacent
    return run if run is not None and "" not in run else None
