"""The package's layout rules (docs/design.md, "Layout"): imports only go down, so the
modules of ``mtrl_ntk/`` import each other without a circle, and no module imports
another module's ``_private`` name. Read from the source with ``ast`` (nothing is run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtrl_ntk"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.AST, importer: str) -> list[tuple[str, str | None]]:
    """(module, name) for every import of a ``mtrl_ntk`` module anywhere in ``tree``
    (functions included); name is None for ``import x``. ``from package import module``
    counts as an import of that module."""
    found: list[tuple[str, str | None]] = []
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (base, alias.name))
    return [(module, name) for module, name in found if module in MODULES]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {module for module, _ in imported(tree, name) if module != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, once each (depth-first search; a back edge closes one)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_package_has_no_import_circle() -> None:
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_modules_private_names() -> None:
    offences = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for module, imported_name in imported(tree, name):
            if imported_name and imported_name.startswith("_") and not imported_name.startswith(
                "__"
            ) and module != name:
                offences.append(f"{name} imports {module}.{imported_name}")
    assert not offences, offences


def test_the_graph_sees_the_imports_it_must() -> None:
    graph = import_graph()
    assert "mtrl_ntk.trainer.loop" in graph["mtrl_ntk.trainer.entry"]
    assert "mtrl_ntk.envs.interface" in graph["mtrl_ntk.envs.metaworld_env"]
    assert "mtrl_ntk.errors" in graph["mtrl_ntk.checkpoint"]
