"""The package's layering, as ARCHITECTURE.md draws it: no import cycle between modules, private Dagster
names only in dagster_compat.py, the plain layers free of Dagster, no module too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mapillary_assets"
PLAIN_LAYERS = ("api", "emulator", "pipeline", "storage", "errors.py")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved against `name`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {other for other in _imports(name, path) if other in modules and other != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    graph = {
        name: {other for other in deps if not name.startswith(other + ".")}
        for name, deps in _graph().items()
    }
    assert _cycles(graph) == []


def test_private_dagster_names_only_in_the_compat_module():
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for name, path in _modules().items()
        if name != "mapillary_assets.dagster_compat"
        and any(imported.startswith("dagster._") for imported in _imports(name, path))
    ]
    assert offenders == []


def test_plain_layers_import_no_dagster():
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for name, path in _modules().items()
        if path.relative_to(PACKAGE).parts[0] in PLAIN_LAYERS
        and any(imported.split(".")[0] == "dagster" for imported in _imports(name, path))
    ]
    assert offenders == []


def test_no_module_over_the_length_limit():
    long = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in _modules().values()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
