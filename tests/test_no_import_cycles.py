"""Architecture: no import cycles between the modules of ``libs/`` and ``services/``.

Imports inside functions count too: a cycle hidden in a function (as ``audit/dashboard.py``
once imported ``audit/api.py`` inside ``add_routes``) is still two modules that cannot be
understood, tested or moved one without the other. ``from . import x`` is an import of module
``x``, not of the package around it (which Python imports first anyway).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("libs", "services"):
        for path in (ROOT / top).glob("*/ciretry/**/*.py"):
            parts = path.relative_to(ROOT / top).parts[1:]  # drop the distribution folder
            name = ".".join(parts)[: -len(".py")]
            out[name.removesuffix(".__init__")] = path
    return out


def _targets(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names} & set(modules)
            found |= subs
            if len(subs) < len(node.names):  # some names are attributes of the module itself
                found.add(module)
    resolved = set()
    for target in found:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    modules = _modules()
    assert "ciretry.audit.api" in modules and "ciretry.common.eventstore" in modules
    graph = {name: _targets(name, path, modules) for name, path in modules.items()}
    assert "ciretry.audit.access" in graph["ciretry.audit.api"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a.api": {"a.dashboard"}, "a.dashboard": {"a.api", "a.pages"}, "a.pages": set()}
    assert cycles(graph) == [["a.api", "a.dashboard"]]
