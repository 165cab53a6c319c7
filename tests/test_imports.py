"""The package's import structure: no cycles, the asyncio shim at the top, honest ``__all__``.

Each module must import on its own in a fresh interpreter, and the import graph
(what runs at import time or inside functions; ``if TYPE_CHECKING:`` blocks are
for the type checker only) must have no cycle: a cycle hidden behind a deferred
import still couples the two modules both ways. Only the public namespace
(``conduit/__init__.py``) imports the asyncio shim; feature modules use
``conduit._bridge`` and ``conduit._callbacks``, which the shim depends on.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "conduit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if _is_type_checking_block(child):
                assert isinstance(child, ast.If)
                stack.extend(child.orelse)
            else:
                stack.append(child)
    return found


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports at run time (the implicit parent imports aside)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            submodules = {f"{module}.{alias.name}" for alias in node.names}
            found.update(submodules)
            # ``from . import x`` of a submodule x reaches x, not the package's names.
            if not submodules <= set(MODULES):
                found.add(module)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path back to its start), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            cycle = visit(target, [*path, name])
            if cycle is not None:
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle is not None:
            return cycle
    return None


def test_the_package_has_modules_to_check() -> None:
    assert {"conduit", "conduit.server", "conduit._asyncio", "conduit.protocol"} <= set(MODULES)


def test_no_import_cycles() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checks_see_real_edges_and_cycles() -> None:
    # The graph is built from the imports: known edges are there, and a
    # TYPE_CHECKING-only import (RPCProxy's Handlers annotation) is not.
    assert "conduit._asyncio" in GRAPH["conduit"]
    assert "conduit._callbacks" in GRAPH["conduit._asyncio"]
    assert "conduit._peer" in GRAPH["conduit._rpc"]
    assert "conduit._rpc" not in GRAPH["conduit._rpc_proxy"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_public_namespace_imports_the_asyncio_shim() -> None:
    importers = {name for name, targets in GRAPH.items() if "conduit._asyncio" in targets}
    assert importers == {"conduit"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        env={"PYTHONPATH": str(SRC), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _defined_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _declared_all(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
            and isinstance(node.value, ast.List | ast.Tuple)
        ):
            return [ast.literal_eval(element) for element in node.value.elts]
    return []


PRIVATE = sorted(
    name
    for name, path in MODULES.items()
    if path.stem.startswith("_") and not path.stem.startswith("__")
)


@pytest.mark.parametrize("module", PRIVATE)
def test_private_module_all_lists_only_its_own_names(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    borrowed = set(_declared_all(tree)) - _defined_names(tree)
    assert not borrowed, f"{module}.__all__ lists names it only imports: {sorted(borrowed)}"
