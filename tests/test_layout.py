"""The import graph of policies/, workers/ and tasks/, built from the source with `ast`.

Dependencies point one way (`tasks -> workers -> policies`), there is no import
circle, `policies` imports no framework, and every import inside a function
says why it is there (`# lazy: <reason>` on its line or the line above).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kit import ROOT

PACKAGES = ("policies", "workers", "tasks")
#: Who may import whom: a package may import itself and what is listed.
ALLOWED = {
    "policies": {"policies"},
    "workers": {"workers", "policies"},
    "tasks": {"tasks", "workers", "policies"},
}
#: What `policies` never imports: it is framework-agnostic and reports events instead.
POLICIES_NEVER = ("celery", "kombu", "prometheus_client", "opentelemetry", "flower")


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a project module, or a third-party top-level name)
    line: int
    top_level: bool
    lazy_reason: bool  # a `# lazy:` comment on the line or the one above


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def _in_type_checking(node: ast.AST, parents: Mapping[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> Iterator[Import]:
    """Every import statement of every module, resolved to module names."""
    known = modules(root, packages)
    for name, path in known.items():
        text = path.read_text("utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if _in_type_checking(node, parents):
                continue
            top_level = parents.get(node) is tree
            here = lines[node.lineno - 1]
            above = lines[node.lineno - 2] if node.lineno > 1 else ""
            lazy = "# lazy:" in here or above.strip().startswith("# lazy:")
            for target in _targets(node, name, is_package, known):
                yield Import(name, target, node.lineno, top_level, lazy)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: Mapping[str, Path]
) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    # `from a import b` imports module `a.b` when there is one, else names of `a`.
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    if len(found) < len(node.names):
        found.append(base)
    return found


def project_edges(found: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in found:
        if imp.target.split(".")[0] in PACKAGES and imp.target != imp.source:
            graph.setdefault(imp.source, set()).add(imp.target)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
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
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def problems(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Everything wrong with the layout under `root`, one line each."""
    found = list(imports(root, packages))
    out = []
    for imp in found:
        source_pkg, target_pkg = imp.source.split(".")[0], imp.target.split(".")[0]
        if target_pkg in PACKAGES and target_pkg not in ALLOWED[source_pkg]:
            out.append(
                f"{imp.source}:{imp.line} imports {imp.target} ({source_pkg} -> {target_pkg})"
            )
        if source_pkg == "policies" and target_pkg in POLICIES_NEVER:
            out.append(f"{imp.source}:{imp.line} imports {imp.target}: policies use no framework")
        if not imp.top_level and not imp.lazy_reason:
            out.append(
                f"{imp.source}:{imp.line} imports {imp.target} inside a function "
                "without a `# lazy: <reason>` comment"
            )
    for component in cycles(project_edges(found)):
        out.append("import circle: " + " <-> ".join(component))
    return sorted(set(out))


class TestLayout:
    """The real tree has no circle, no import against the grain and no unexplained lazy import."""

    def test_the_source_tree_is_clean(self) -> None:
        assert problems(ROOT) == []

    def test_the_graph_sees_the_packages(self) -> None:
        graph = project_edges(list(imports(ROOT)))
        assert "workers.fleet" in graph["workers.telemetry.health"]
        assert "workers.guard" in graph["workers.task"]
        assert "workers.app" not in graph.get("workers.guard", set())


def write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


class TestTheCheckBites:
    """Each rule fails on a small tree that breaks it."""

    @pytest.fixture
    def tree(self, tmp_path: Path) -> Path:
        return write(
            tmp_path,
            {
                "policies/__init__.py": "",
                "policies/a.py": "from policies import b\n",
                "policies/b.py": "import json\n",
                "workers/__init__.py": "",
                "workers/x.py": "from workers import y\nfrom policies.a import thing\n",
                "workers/y.py": "import os\n",
                "tasks/__init__.py": "",
                "tasks/t.py": "from workers.x import z\n",
            },
        )

    def test_a_clean_tree_passes(self, tree: Path) -> None:
        assert problems(tree) == []

    def test_a_circle_through_a_function_level_import(self, tree: Path) -> None:
        write(tree, {"workers/y.py": "def f():\n    # lazy: start-up cost\n    import workers.x\n"})
        assert problems(tree) == ["import circle: workers.x <-> workers.y"]

    def test_policies_importing_workers_or_a_framework(self, tree: Path) -> None:
        write(tree, {"policies/b.py": "from workers import y\nimport celery\n"})
        found = problems(tree)
        assert "policies.b:1 imports workers.y (policies -> workers)" in found
        assert "policies.b:2 imports celery: policies use no framework" in found

    def test_workers_importing_tasks(self, tree: Path) -> None:
        write(tree, {"workers/z.py": "from tasks import t\n"})
        assert problems(tree) == ["workers.z:1 imports tasks.t (workers -> tasks)"]

    def test_an_unexplained_import_inside_a_function(self, tree: Path) -> None:
        write(tree, {"workers/y.py": "def f():\n    import json\n"})
        assert problems(tree) == [
            "workers.y:2 imports json inside a function without a `# lazy: <reason>` comment"
        ]

    def test_type_checking_imports_are_not_edges(self, tree: Path) -> None:
        text = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from workers import x\n"
        write(tree, {"workers/y.py": text})
        assert problems(tree) == []
