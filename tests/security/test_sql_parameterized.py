"""Security review: SQL is only parameterized.

Every string built at run time (f-string, ``%``, ``.format``, ``+``) under ``libs/`` and
``services/`` whose literal text looks like SQL may only interpolate values that are constants of
the code itself: module constants (column lists, table names from a constant tuple or dict),
comprehension variables over such constants, a local bound to one of those. Anything else is a
finding, unless allow-listed below with the reason it is safe; each allow-listed identifier must be
validated by code, which the tests at the end prove.

Also flagged: a call of execute/fetch*/executemany/prepare whose query argument is a local variable
bound to a string built from non-constants.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("libs", "services") for p in (ROOT / d).rglob("*.py"))

SQL = re.compile(
    r"\bSELECT\b|\bINSERT\s+INTO\b|\bUPDATE\s+\S+\s+SET\b|\bDELETE\s+FROM\b|\bCREATE\s+"
    r"(TABLE|SCHEMA|INDEX|TRIGGER|FUNCTION)\b|\bDROP\s+\w+|\bALTER\s+TABLE\b|\bTRUNCATE\b|"
    r"\bSET\s+(LOCAL|TRANSACTION|SESSION)\b|\bWHERE\b|\bVALUES\b"
)
QUERY_METHODS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor"}

#: (file relative to the repo, interpolated expression) -> why it is safe.
ALLOWED: dict[tuple[str, str], str] = {
    ("libs/common/ciretry/common/eventstore.py", "schema"): (
        "identifiers cannot be bind parameters; migrate() calls check_schema_name(schema) first "
        "(^[a-z_][a-z0-9_]*$), see test_schema_names_are_validated"
    ),
    ("libs/common/ciretry/common/eventstore.py", "snapshot"): (
        "SET TRANSACTION SNAPSHOT takes no parameter; the value is what pg_export_snapshot() "
        "returned on our own connection, not input"
    ),
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


class _Module:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        self.tree = ast.parse(path.read_text(), str(path))
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.globals: dict[str, ast.expr] = {}
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name):
                    self.globals[target.id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.value is not None:
                    self.globals[node.target.id] = node.value

    def imported(self, name: str) -> _Module | None:
        """The module of this code base ``name`` is imported from, if it defines it."""
        for node in self.tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            if not any((a.asname or a.name) == name and a.name == name for a in node.names):
                continue
            if node.level:
                base = self.path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                parts = (node.module or "").split(".") if node.module else []
            else:
                mod = node.module or ""
                if not mod.startswith("ciretry."):
                    return None
                pkg = mod.split(".")[1]
                roots = [ROOT / "libs" / pkg, ROOT / "services" / pkg]
                base = next((r for r in roots if r.exists()), roots[0])
                parts = mod.split(".")
            candidate = base.joinpath(*parts).with_suffix(".py")
            if candidate.exists():
                other = _load(candidate)
                return other if name in other.globals else None
        return None

    # --- scopes -------------------------------------------------------------------------

    def _enclosing(self, node: ast.AST, kinds: tuple[type, ...]) -> list[ast.AST]:
        out = []
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, kinds):
                out.append(node)
        return out

    def _local_values(self, name: str, at: ast.AST) -> list[ast.expr] | None:
        """Values assigned to ``name`` in the function around ``at`` (None: a parameter or not
        assigned there)."""
        funcs = self._enclosing(at, (ast.FunctionDef, ast.AsyncFunctionDef))
        if not funcs:
            return None
        func = funcs[0]
        assert isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        values: list[ast.expr] = []
        for node in ast.walk(func):
            if isinstance(node, ast.For | ast.AsyncFor):
                if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node.target)):
                    values.append(node.iter)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("append", "extend", "insert", "add", "update")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == name
            ):
                # Mutations count as assignments: parts.append(x) makes x part of parts.
                values.extend(node.args)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id == name:
                        values.append(node.value)
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                if isinstance(node.target, ast.Name) and node.target.id == name and node.value:
                    values.append(node.value)
        return values or None

    def _comprehension_iter(self, name: str, at: ast.AST) -> ast.expr | None:
        for comp in self._enclosing(
            at, (ast.DictComp, ast.ListComp, ast.SetComp, ast.GeneratorExp)
        ):
            assert isinstance(comp, ast.DictComp | ast.ListComp | ast.SetComp | ast.GeneratorExp)
            for gen in comp.generators:
                if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(gen.target)):
                    return gen.iter
        return None

    # --- constant-ness ------------------------------------------------------------------

    def constant(self, e: ast.expr, depth: int = 0) -> bool:
        """Is ``e`` built only from constants of the code (no input can reach it)?"""
        if depth > 20:
            return False
        d = depth + 1
        if isinstance(e, ast.Constant):
            return True
        if isinstance(e, ast.JoinedStr):
            return all(self.constant(v, d) for v in e.values)
        if isinstance(e, ast.FormattedValue):
            return self.constant(e.value, d)
        if isinstance(e, ast.Tuple | ast.List | ast.Set):
            return all(self.constant(x, d) for x in e.elts)
        if isinstance(e, ast.Dict):
            return all(self.constant(x, d) for x in [*e.keys, *e.values] if x is not None)
        if isinstance(e, ast.BinOp):
            return self.constant(e.left, d) and self.constant(e.right, d)
        if isinstance(e, ast.IfExp):
            return self.constant(e.body, d) and self.constant(e.orelse, d)
        if isinstance(e, ast.Subscript):
            # One of a constant container's values, whichever the index.
            return self.constant(e.value, d)
        if isinstance(e, ast.DictComp):
            parts = [e.key, e.value]
            return all(self.constant(g.iter, d) for g in e.generators) and all(
                self.constant(x, d) for x in parts
            )
        if isinstance(e, ast.ListComp | ast.SetComp | ast.GeneratorExp):
            return all(self.constant(g.iter, d) for g in e.generators) and self.constant(e.elt, d)
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name):
            # list(CONST), enumerate(CONST), range(3), ...: nothing from outside
            return e.func.id in _PURE_BUILTINS and all(self.constant(a, d) for a in e.args)
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute):
            # "sep".join(CONST), CONST.items(), CONST_TEXT.format(k=CONST), ...
            if e.func.attr in ("join", "format", "items", "values", "keys", "upper", "lower"):
                return (
                    self.constant(e.func.value, d)
                    and all(self.constant(a, d) for a in e.args)
                    and all(self.constant(k.value, d) for k in e.keywords)
                )
            return False
        if isinstance(e, ast.Name):
            it = self._comprehension_iter(e.id, e)
            if it is not None:
                return self.constant(it, d)
            local = self._local_values(e.id, e)
            if local is not None:
                return all(self.constant(v, d) for v in local)
            if e.id in self.globals:
                return self.constant(self.globals[e.id], d)
            imported = self.imported(e.id)
            if imported is not None:
                return imported.constant(imported.globals[e.id], d)
            return False
        return False

    def text_of(self, e: ast.expr, depth: int = 0) -> str:
        """The literal text of a string expression (interpolations left out)."""
        if depth > 20:
            return ""
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return e.value
        if isinstance(e, ast.JoinedStr):
            return " ".join(self.text_of(v, depth + 1) for v in e.values)
        if isinstance(e, ast.BinOp):
            return self.text_of(e.left, depth + 1) + " " + self.text_of(e.right, depth + 1)
        if isinstance(e, ast.Name) and e.id in self.globals:
            return self.text_of(self.globals[e.id], depth + 1)
        return ""

    # --- findings -----------------------------------------------------------------------

    def _interpolated(self, e: ast.expr) -> list[ast.expr]:
        if isinstance(e, ast.JoinedStr):
            return [v.value for v in e.values if isinstance(v, ast.FormattedValue)]
        if isinstance(e, ast.BinOp):
            if isinstance(e.op, ast.Mod):
                return [e.right]
            return [x for side in (e.left, e.right) for x in self._interpolated_side(side)]
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute):
            return [*e.args, *(k.value for k in e.keywords)]
        return []

    def _interpolated_side(self, e: ast.expr) -> list[ast.expr]:
        if isinstance(e, ast.Constant):
            return []
        if isinstance(e, ast.JoinedStr | ast.BinOp):
            return self._interpolated(e)
        return [e]

    def built_strings(self) -> list[tuple[ast.expr, str]]:
        """String-building expressions and their literal text."""
        out = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.JoinedStr):
                if isinstance(self.parents.get(node), ast.JoinedStr):
                    continue  # a format spec inside another f-string
                out.append((node, self.text_of(node)))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
                text = self.text_of(node.left)
                if isinstance(node.op, ast.Add):
                    text += " " + self.text_of(node.right)
                if isinstance(self.parents.get(node), ast.BinOp):
                    continue  # the outermost concatenation reports
                out.append((node, text))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "format"
            ):
                out.append((node, self.text_of(node.func.value)))
        return out

    def findings(self) -> list[Finding]:
        found = []
        for node, text in self.built_strings():
            if not SQL.search(text):
                continue
            for value in self._interpolated(node):
                source = ast.unparse(value)
                if self.constant(value) or (self.rel, source) in ALLOWED:
                    continue
                found.append(
                    Finding(self.rel, node.lineno, f"SQL built with {source!r}: {text[:60]!r}")
                )
        for node in ast.walk(self.tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in QUERY_METHODS
                and node.args
                and isinstance(node.args[0], ast.Name)
            ):
                values = self._local_values(node.args[0].id, node) or []
                for v in values:
                    if isinstance(v, ast.JoinedStr | ast.BinOp) and not self.constant(v):
                        found.append(
                            Finding(
                                self.rel,
                                node.lineno,
                                f"query from built string {ast.unparse(v)[:60]!r}",
                            )
                        )
        return found


_PURE_BUILTINS = {"list", "tuple", "sorted", "enumerate", "range", "len", "str", "int", "zip"}
_CACHE: dict[Path, _Module] = {}


def _load(path: Path) -> _Module:
    if path not in _CACHE:
        _CACHE[path] = _Module(path)
    return _CACHE[path]


def scan(paths: list[Path]) -> list[Finding]:
    return [f for p in paths for f in _load(p).findings()]


def test_no_string_built_sql_in_libs_and_services() -> None:
    assert SOURCES, "no sources found"
    findings = scan(SOURCES)
    assert not findings, "string-built SQL:\n" + "\n".join(map(str, findings))


def test_allow_list_entries_are_still_used() -> None:
    """An allow-list entry whose code is gone must go too (it would silently cover new code)."""
    used = set()
    for path in SOURCES:
        m = _load(path)
        for node, text in m.built_strings():
            if SQL.search(text):
                used |= {(m.rel, ast.unparse(v)) for v in m._interpolated(node)}
    assert set(ALLOWED) <= used, set(ALLOWED) - used


@pytest.mark.parametrize(
    "code",
    [
        "async def f(conn, name):\n    await conn.execute(f\"SELECT * FROM t WHERE n = '{name}'\")\n",
        "async def f(conn, name):\n    await conn.fetch(\"SELECT * FROM t WHERE n = '%s'\" % name)\n",
        'async def f(conn, name):\n    await conn.fetch("DELETE FROM t WHERE n = {}".format(name))\n',
        'async def f(conn, name):\n    q = "SELECT * FROM t WHERE n = " + name\n    await conn.fetch(q)\n',
        'def f(name):\n    return f"UPDATE t SET a = 1 WHERE b = {name}"\n',
    ],
)
def test_the_scanner_catches_string_built_sql(tmp_path: Path, code: str) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text(code)
    assert scan([bad]), code


def test_the_scanner_accepts_constants(tmp_path: Path) -> None:
    code = (
        'COLS = "a, b"\nTABLES = {"h": "t_hour", "d": "t_day"}\n'
        'SQL = {k: "INSERT INTO {t} VALUES ($1)".format(t=t) for k, t in TABLES.items()}\n'
        "async def f(conn, unit, x):\n"
        '    table = TABLES["h" if unit else "d"]\n'
        '    await conn.fetch(f"SELECT {COLS} FROM {table} WHERE x = $1", x)\n'
    )
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    assert scan([probe]) == []


@pytest.mark.parametrize(
    "name", ['x"; DROP TABLE events; --', "Public", "a-b", "", "1abc", 'a"b', "a b", "ü"]
)
def test_schema_names_are_validated(name: str) -> None:
    """The allow-listed identifier: anything but a plain lower-case name is refused before it can
    reach SQL text."""
    from ciretry.common.eventstore import check_schema_name

    with pytest.raises(ValueError):
        check_schema_name(name)
