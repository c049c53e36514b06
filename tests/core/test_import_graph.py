"""No import circle in the gpu_bridge package: the guard for every module, present and future.

Two modules that import each other at module level work only while the import order happens to
suit them (the GPU server's and the backend's app.py and routes.py did, each through a deferred
import). The graph is read from the source with ``ast``, nothing is imported: an edge is a
module-level ``import`` or ``from ... import`` of another module of the package. Imports inside a
function run late, when both modules are loaded, so they are not edges; neither are those under
``if TYPE_CHECKING:``, which never run. A package's ``__init__`` counts only when a name is taken
from it, not because a submodule of it is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "app" / "src" / "gpu_bridge"


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _module_level(body: list[ast.stmt]):
    """The import statements that run when the module is loaded."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
            if not checking:
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level(node.body)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports at module level."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _module_level(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".")
                # A package's own "." is itself; a module's "." is the package that holds it.
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # "from pkg import sub" imports the submodule; "from pkg import name" runs pkg's __init__.
            targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in modules else base_name
                       for a in node.names]
        for target in targets:
            while target and target not in modules:  # "import a.b.c" where c is a name
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other in a loop (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _explain(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return f"{', '.join(component)}: " + "; ".join(edges)


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT)
    assert len(graph) > 20 and "gpu_bridge.web" in graph, sorted(graph)  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles (module-level imports):\n" + "\n".join(_explain(graph, c) for c in found)


def test_both_apps_import_their_state_and_not_their_factory():
    graph = import_graph(PACKAGE_ROOT)
    for app in ("gpu_bridge.gpu_server", "gpu_bridge.backend"):
        assert f"{app}.state" in graph[f"{app}.routes"]
        assert f"{app}.app" not in graph[f"{app}.routes"]
        assert "gpu_bridge.web" in graph[f"{app}.app"]


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(("files", "expected"), [
    # the shape the apps had: app imports routes, routes takes its state from app
    ({"__init__.py": "", "app.py": "from .routes import bp\n", "routes.py": "from .app import STATE\n"},
     [["pkg.app", "pkg.routes"]]),
    # a longer loop through a subpackage and "from . import module"
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "from .sub.c import x\n", "sub/__init__.py": "",
      "sub/c.py": "import pkg.a\n"}, [["pkg.a", "pkg.b", "pkg.sub.c"]]),
    # a name taken from a package's __init__, which imports the module back
    ({"__init__.py": "from .m import f\n", "m.py": "from . import VERSION\n"}, [["pkg", "pkg.m"]]),
    # lazy (inside a function) and type-checking-only imports are not edges
    ({"__init__.py": "", "app.py": "from .routes import bp\n",
      "routes.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .app import S\n"
                   "def f():\n    from .app import S\n"}, []),
    # a submodule imported through its package's __init__ does not tie the package to itself
    ({"__init__.py": "from .files import read\n", "files.py": "from .paths import p\n", "paths.py": "p = 1\n"}, []),
])
def test_the_checker_finds_cycles_and_only_cycles(tmp_path, files, expected):
    graph = import_graph(_write(tmp_path / "pkg", files))
    assert cycles(graph) == expected
