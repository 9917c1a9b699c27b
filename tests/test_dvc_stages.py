"""dvc.yaml: every stage depends on the mulcon modules its commands import (so that a change to
any code that can change a stage's outputs reruns it), found by reading the import statements."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from tests.conftest import ROOT

# The module each CLI verb runs; the CLI itself only dispatches.
VERB_MODULES = {"prepare": ["mulcon.data.prepare", "mulcon.data.cache"], "train": ["mulcon.train"],
                "evaluate": ["mulcon.evaluate"], "report": ["mulcon.report"], "analyze": ["mulcon.analysis"]}
# Modules that cannot change a stage's outputs: dispatch, MLflow logging and serving, the registry,
# the error classes. Their imports are not followed either.
NOT_OUTPUT = {"mulcon", "mulcon.cli", "mulcon.__main__", "mulcon.tracking", "mulcon.serving", "mulcon.registry",
              "mulcon.errors"}


def _file(module: str) -> Path | None:
    path = ROOT / Path(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(module: str) -> set[str]:
    """The mulcon modules `module` imports anywhere in its body (function-level imports included)."""
    path = _file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if _file(f"{base}.{alias.name}")}
    return {name for name in found if name.split(".")[0] == "mulcon" and _file(name)}


def _closure(modules: list[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_OUTPUT:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:end]) for end in range(2, len(parts))]  # parent packages run first
        todo += _imports(module)
    return seen


def _stages() -> dict[str, dict]:
    stages = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"].items():
        stages[name] = stage.get("do", stage)  # a foreach stage: its template
    return stages


def test_every_stage_depends_on_the_modules_its_commands_import():
    missing = {}
    for name, stage in _stages().items():
        commands = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        verbs = [re.search(r"python -m mulcon (\S+)", command).group(1) for command in commands]
        deps = [str(dep) for dep in stage.get("deps", [])]
        needed = _closure([module for verb in verbs for module in VERB_MODULES[verb]])
        files = sorted(str(_file(module).relative_to(ROOT)) for module in needed)
        uncovered = [file for file in files
                     if not any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)]
        if uncovered:
            missing[name] = uncovered
    assert missing == {}


def test_the_import_reader_sees_function_level_and_relative_imports():
    assert "mulcon.data.cache" in _imports("mulcon.cli")  # `from mulcon.data.cache import build_cache` in a function
    assert "mulcon.data.transforms" in _closure(["mulcon.data.dataset"])
    assert "mulcon.tracking" not in _closure(["mulcon.cli"])
