"""The packages are layered: no import cycles, no reaching into another module's private names.

The layers, bottom first (docs/architecture.md draws them):
`compendium.paths`, `compendium.artifacts` (plumbing) -> `data_synth.sites`, `data_synth.vocabulary`,
`data_synth.features` (facts) -> `compendium.params` (the profile schema) -> `data_synth` -> `fl` ->
`compendium.stages` and the command line -> `report`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compendium", "data_synth", "fl", "report", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """Return (project module, imported names) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in PACKAGES:
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in modules]
            found += [(module, []) for module in submodules]
            found.append((node.module, [name for name in names if f"{node.module}.{name}" not in modules]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {module for module, _ in _imports(path, modules)}
        # `import a.b.c` loads a and a.b too, but those are packages whose __init__ imports are their own edges.
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_there_are_no_import_cycles_between_project_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_planted_cycle():
    graph = _graph()
    graph["compendium.paths"] = graph["compendium.paths"] | {"compendium.params"}
    assert any({"compendium.paths", "compendium.params"} <= set(cycle) for cycle in _cycles(graph))


@pytest.mark.parametrize("module", ["compendium.paths", "compendium.artifacts", "data_synth.sites",
                                    "data_synth.vocabulary", "data_synth.features"])
def test_the_bottom_layers_import_only_what_lies_below_them(module):
    below = {"compendium.paths", "compendium.artifacts", "data_synth", "data_synth.sites", "data_synth.vocabulary",
             "data_synth.features"}
    assert _graph()[module] <= below, f"{module} imports {sorted(_graph()[module] - below)}"


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = [f"{name}: from {module} import {imported}" for name, path in modules.items()
               for module, names in _imports(path, modules) for imported in names
               if imported.startswith("_") and not imported.startswith("__")]
    assert private == []
