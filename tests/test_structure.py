"""The package's layering: no module imports (at import time) a module that imports it back."""

from __future__ import annotations

import ast

from tests.helpers import ROOT


PACKAGE = ROOT / "peft_mazo"


def module_imports() -> dict[str, set[str]]:
    """{module: the package modules it imports at module level} (imports inside functions and TYPE_CHECKING blocks
    run later, or never, and are left out)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules.keys()
            for imported in submodules or {target}:
                if imported in modules and imported != name:
                    graph[name].add(imported)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if not state.get(nxt):
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if not state.get(node):
            found = visit(node)
            if found:
                return found
    return []


def test_no_module_imports_a_module_that_imports_it_back():
    graph = module_imports()
    assert {"peft_mazo.layer", "peft_mazo.importance.search", "peft_mazo.runner.loop"} <= graph.keys()
    assert "peft_mazo.layer" in graph["peft_mazo.importance.search"]  # the walk sees relative imports
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
