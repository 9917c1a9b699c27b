"""dvc.yaml: every stage depends on exactly the mulcon files its commands run (`mulcon.fingerprint`
reads them from the import statements), so a change to code that can change a stage's outputs
reruns it, and a change anywhere else reruns nothing."""

from __future__ import annotations

import re
import shlex

import yaml

from mulcon.config import load_config
from mulcon.fingerprint import closure, imports, stage_files
from tests.conftest import ROOT


def _stages() -> dict[str, dict]:
    stages = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"].items():
        stages[name] = stage.get("do", stage)  # a foreach or matrix stage: its template
    return stages


def _commands(stage: dict) -> list[str]:
    return stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]


def _code_deps(stage: dict) -> tuple[list[str], list[str]]:
    """The files the stage's commands run, and the files its mulcon/ deps cover (folders expanded)."""
    verbs = [re.search(r"python -m mulcon (\S+)", command).group(1) for command in _commands(stage)]
    needed = sorted({file for verb in verbs for file in stage_files(verb)})
    covered = set()
    for dep in map(str, stage.get("deps", [])):
        if dep.startswith("mulcon"):
            path = ROOT / dep
            covered |= ({file.relative_to(ROOT).as_posix() for file in path.rglob("*.py")} if path.is_dir() else {dep})
    return needed, sorted(covered)


def test_every_stage_depends_on_exactly_the_modules_its_commands_run():
    wrong = {}
    for name, stage in _stages().items():
        needed, covered = _code_deps(stage)
        missing, extra = sorted(set(needed) - set(covered)), sorted(set(covered) - set(needed))
        if missing or extra:
            wrong[name] = {"missing": missing, "not run": extra}
    assert wrong == {}


def test_the_import_reader_sees_function_level_and_relative_imports():
    assert "mulcon.data.cache" in imports("mulcon.cli")  # `from mulcon.data.cache import build_cache` in a function
    assert "mulcon.data.transforms" in closure(["mulcon.data.dataset"])
    assert "mulcon.tracking" not in closure(["mulcon.cli"])


def test_a_missing_and_an_extra_dependency_are_both_found(tmp_path):
    stage = _stages()["report"]
    needed, _ = _code_deps(stage)
    trimmed = {**stage, "deps": [dep for dep in stage["deps"] if dep != "mulcon/report.py"] + ["mulcon/losses.py"]}
    _, covered = _code_deps(trimmed)
    assert "mulcon/report.py" in set(needed) - set(covered)
    assert "mulcon/losses.py" in set(covered) - set(needed)


def test_every_command_loads_its_config_under_the_ablation_seeds(tmp_path):
    """`make ablation` sets train.seeds: [1, 2]; the seeds stage's train.seed=1 must not clash with it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["seeds"] = [1, 2]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key.startswith("item"):
            return {"item": "mulcon", "item.variant": "mulcon", "item.seed": "1"}[key]
        found = params
        for part in key.split("."):
            found = found[part]
        return str(found)

    checked = 0
    for stage in _stages().values():
        for command in _commands(stage):
            words = shlex.split(re.sub(r"\$\{([^}]+)\}", value, command))
            if words[:3] != ["python", "-m", "mulcon"] or "-S" not in words:
                continue
            overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
            load_config(tmp_path / "params.yaml", overrides)  # raises ConfigError on a clash
            checked += 1
    assert checked >= 4
