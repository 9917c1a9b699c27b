"""Which library code computes a stage's result, and a fingerprint of it.

A stage's code is the closure of the `mulcon` modules its entry module imports anywhere in its body
(function-level imports and parent packages included), read from the source with `ast`, without
importing anything. The modules that cannot change a result (dispatch, MLflow logging, serving, the
registry, error classes) are neither counted nor followed. `dvc.yaml` lists exactly these files as
each stage's dependencies (tests/test_dvc_stages.py), and every checkpoint and stage model records
their fingerprint, so a run is resumed or skipped only under the code that made it.

Beside the code, a result records the versions of the libraries whose kernels compute it
(`library_versions`): a checkpoint made under another torch is not resumed either.

The fingerprint of a file is a hash of its syntax tree without docstrings: an edit to a comment,
a docstring or the layout keeps it; any edit to what the code does changes it.
"""

from __future__ import annotations

import ast
import hashlib
from importlib import metadata
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the `mulcon` package

# The library module each result-producing CLI verb runs (the CLI itself only dispatches).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "prepare": ("mulcon.data.preparation", "mulcon.data.cache"),
    "train": ("mulcon.train",),
    "evaluate": ("mulcon.evaluate",),
    "report": ("mulcon.report",),
    "analyze": ("mulcon.analysis",),
}
# The distributions whose kernels compute a training result (convolutions, RandAugment, resizing).
RESULT_LIBRARIES = ("torch", "torchvision", "timm", "pillow", "numpy")
# Modules whose edits cannot change a stage's outputs; their imports are not followed either.
NOT_RESULT = frozenset({"mulcon", "mulcon.__main__", "mulcon.cli", "mulcon.launch", "mulcon.errors",
                        "mulcon.mlflow_client", "mulcon.tracking", "mulcon.serving", "mulcon.registry"})


def module_file(module: str, root: Path = PACKAGE_ROOT) -> Path | None:
    """The source file of a dotted module name under `root` (a package's `__init__.py`), or None."""
    path = root / Path(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imports(module: str, root: Path = PACKAGE_ROOT) -> set[str]:
    """The `mulcon` modules that `module` imports anywhere in its body (function-level too).

    `from package import name` counts `package.name` when that is a module, and `package` itself.
    """
    path = module_file(module, root)
    if path is None:
        raise ModuleNotFoundError(f"no source file for {module} under {root}")
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
            found |= {f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}", root)}
    return {name for name in found if name.split(".")[0] == "mulcon" and module_file(name, root)}


def closure(modules: tuple[str, ...] | list[str], root: Path = PACKAGE_ROOT) -> set[str]:
    """`modules` and every module they import, transitively (parent packages included), less NOT_RESULT."""
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_RESULT:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:end]) for end in range(2, len(parts))]  # a parent package runs first
        todo += imports(module, root)
    return seen


def stage_files(stage: str, root: Path = PACKAGE_ROOT) -> list[str]:
    """The source files (relative to `root`, POSIX) whose code computes `stage`'s outputs, sorted."""
    return sorted(module_file(module, root).relative_to(root).as_posix() for module in closure(STAGE_MODULES[stage], root))


@lru_cache(maxsize=None)
def _file_digest(path: Path, modified: float) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def code_fingerprint(stage: str, root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """{source file: digest} for every file of `stage_files(stage)`: what a checkpoint records."""
    return {name: _file_digest(root / name, (root / name).stat().st_mtime) for name in stage_files(stage, root)}


def code_changes(saved: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The files whose code differs between two fingerprints (all of them when `saved` is None:
    a checkpoint from before fingerprints existed)."""
    if not isinstance(saved, dict):
        return sorted(current)
    return sorted(name for name in saved.keys() | current.keys() if saved.get(name) != current.get(name))


def library_versions() -> dict[str, str]:
    """{distribution: installed version} for RESULT_LIBRARIES ("absent" for one not installed)."""
    versions = {}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
