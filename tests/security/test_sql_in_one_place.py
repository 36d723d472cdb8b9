"""Architecture: SQL lives in the stores, nowhere else.

Under ``libs/`` and ``services/``, only the modules in ``SQL_HOMES`` may hold SQL text, borrow a
connection (``.connection()``, the event log's one escape hatch for the read-model stores beside
it) or use asyncpg beyond its exception classes (which the error handling everywhere needs to tell
a transient failure from bad data). Everything else reaches PostgreSQL through a store's methods,
so a query is found in one place and a store can be replaced by an in-memory twin.

Docstrings are not code and may name SQL (``FOR UPDATE SKIP LOCKED`` explains the outbox).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Final

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("libs", "services") for p in (ROOT / d).rglob("*.py"))

#: The modules that may hold SQL (repository-relative paths). One constant: a new store is added
#: here, with its reason.
SQL_HOMES: Final = frozenset(
    {
        # The event log's PostgreSQL adapter (the EventLog port).
        "libs/common/ciretry/common/eventstore.py",
        # The audit read models beside the log (over EventStore.connection()).
        "libs/audit/ciretry/audit/store.py",
    }
)

SQL: Final = re.compile(
    r"\bSELECT\b|\bINSERT\s+INTO\b|\bUPDATE\s+\S+\s+SET\b|\bDELETE\s+FROM\b|\bCREATE\s+"
    r"(TABLE|SCHEMA|INDEX|TRIGGER|FUNCTION)\b|\bDROP\s+(TABLE|SCHEMA|INDEX)\b|\bALTER\s+TABLE\b|"
    r"\bTRUNCATE\b|\bSET\s+(LOCAL|TRANSACTION|SESSION)\b|\bWHERE\b|\bVALUES\s*\(|\bFOR\s+UPDATE\b|"
    r"\bpg_\w+\s*\("
)


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
        # A string statement anywhere (attribute docstrings) is documentation, not code.
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            out.add(id(node.value))
    return out


def findings(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if SQL.search(node.value):
                out.append(f"{where}: SQL text {node.value.strip()[:60]!r}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "connection"
        ):
            out.append(f"{where}: borrows a connection: {ast.unparse(node)[:60]}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "asyncpg" and not node.attr.endswith("Error"):
                out.append(f"{where}: uses asyncpg.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "asyncpg":
            names = [a.name for a in node.names if not a.name.endswith("Error")]
            if names or node.module != "asyncpg":
                out.append(f"{where}: imports {node.module}: {', '.join(names)}")
    return out


def test_sql_homes_exist() -> None:
    for rel in SQL_HOMES:
        assert (ROOT / rel).is_file(), rel


def test_no_sql_outside_the_stores() -> None:
    assert SOURCES
    found = [
        f
        for path in SOURCES
        if (rel := str(path.relative_to(ROOT))) not in SQL_HOMES
        for f in findings(path, rel)
    ]
    assert not found, "SQL outside the stores (SQL_HOMES):\n" + "\n".join(found)


def test_the_stores_are_where_the_sql_is() -> None:
    """The check would pass vacuously if it recognised no SQL at all."""
    for rel in SQL_HOMES:
        assert findings(ROOT / rel, rel), rel


PROBES: Final = [
    ('Q = "SELECT 1"\n', True),
    ('def f(x):\n    return f"DELETE FROM t WHERE a = {x}"\n', True),
    ("async def f(store):\n    async with store.connection() as conn:\n        pass\n", True),
    ("import asyncpg\nasync def f():\n    return await asyncpg.connect('x')\n", True),
    ("from asyncpg import Record\n", True),
    ("from asyncpg.pool import Pool\n", True),
    ('Q = ("INSERT INTO t (a) "\n     "VALUES ($1)")\n', True),
    # Docstrings may name SQL; asyncpg's exception classes are for telling failures apart.
    ('"""Claims rows with SELECT ... FOR UPDATE SKIP LOCKED."""\n', False),
    ('def f():\n    """Where the rows are."""\n', False),
    (
        "import asyncpg\nfrom asyncpg import DataError\nE = (asyncpg.PostgresConnectionError,)\n",
        False,
    ),
    ('MESSAGE = "select a project, update it, then where to?"\n', False),
]


@pytest.mark.parametrize(("code", "flagged"), PROBES)
def test_the_scanner(tmp_path: Path, code: str, flagged: bool) -> None:
    path = tmp_path / "probe.py"
    path.write_text(code)
    assert bool(findings(path, "probe.py")) is flagged, code
