"""The library is layered: each module imports only modules of its own layer or lower ones, and no
import cycle exists inside `mulcon/` (imports read from the source, function-level ones included)."""

from __future__ import annotations

from mulcon.fingerprint import PACKAGE_ROOT, imports

# Lowest first. A module may import modules of its own layer or of the layers before it.
LAYERS = [
    {"mulcon.errors"},
    {"mulcon.config"},
    {"mulcon.io", "mulcon.checkpoint", "mulcon.runtime", "mulcon.fingerprint", "mulcon.distributed"},
    {"mulcon.data", "mulcon.data.*"},
    {"mulcon.model", "mulcon.backbones", "mulcon.losses", "mulcon.metrics", "mulcon.optim", "mulcon.variants"},
    {"mulcon.inference"},
    {"mulcon.train", "mulcon.evaluate", "mulcon.analysis", "mulcon.report", "mulcon.spread"},
    {"mulcon.study"},
    {"mulcon.mlflow_client"},
    {"mulcon.serving", "mulcon.tracking", "mulcon.registry", "mulcon.export"},
    {"mulcon.cli", "mulcon.launch", "mulcon.__main__"},
]


def _modules() -> list[str]:
    names = []
    for path in sorted((PACKAGE_ROOT / "mulcon").rglob("*.py")):
        parts = path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _layer(module: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if module in layer or any(entry.endswith(".*") and module.startswith(entry[:-1]) for entry in layer):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: give it one")


def _graph() -> dict[str, set[str]]:
    # The bare package `mulcon` holds no code; an import of `mulcon.x` implies it.
    return {module: imports(module) - {module, "mulcon"} for module in _modules() if module != "mulcon"}


def test_every_module_imports_only_its_own_or_lower_layers():
    upward = {module: sorted(name for name in imported if _layer(name) > _layer(module))
              for module, imported in _graph().items()}
    assert {module: names for module, names in upward.items() if names} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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


def test_no_import_cycle_inside_the_library():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_training_does_not_import_evaluation_reports_or_tracking():
    graph, reached, todo = _graph(), set(), ["mulcon.train"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert {"mulcon.evaluate", "mulcon.report", "mulcon.analysis", "mulcon.tracking", "mulcon.cli"}.isdisjoint(reached)
