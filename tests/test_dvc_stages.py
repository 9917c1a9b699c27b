"""dvc.yaml: every stage depends on exactly the mulcon files its commands run (`mulcon.fingerprint`
reads them from the import statements), so a change to code that can change a stage's outputs
reruns it, and a change anywhere else reruns nothing."""

from __future__ import annotations

import functools
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

    def value(match: re.Match, item: str) -> str:
        key = match.group(1)
        if key.startswith("item"):
            return {"item": item, "item.variant": "mulcon", "item.seed": "1"}[key]
        found = params
        for part in key.split("."):
            found = found[part]
        return str(found)

    checked = 0
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, stage in _stages().items():
        item = "1" if raw[name].get("foreach") == "${train.seeds}" else "mulcon"  # seeds_mulcon: one a seed
        for command in _commands(stage):
            words = shlex.split(re.sub(r"\$\{([^}]+)\}", lambda match: value(match, item), command))
            if words[:3] != ["python", "-m", "mulcon"] or "-S" not in words:
                continue
            overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
            load_config(tmp_path / "params.yaml", overrides)  # raises ConfigError on a clash
            checked += 1
    assert checked >= 4


def test_the_variant_list_is_written_once_and_is_the_librarys():
    """dvc.yaml names the variants trained beside the MulCon model once (`vars`), for the ablation
    and the seeds stages; they and the report's inputs are mulcon.config.VARIANTS."""
    from mulcon.config import VARIANTS

    text = (ROOT / "dvc.yaml").read_text(encoding="utf-8")
    pipeline = yaml.safe_load(text)
    [listed] = [entry["ablation_variants"] for entry in pipeline["vars"] if "ablation_variants" in entry]
    assert listed == [variant for variant in VARIANTS if variant != "mulcon"]
    stages = pipeline["stages"]
    assert stages["ablation"]["foreach"] == "${ablation_variants}"
    assert stages["seeds"]["matrix"]["variant"] == "${ablation_variants}"
    reported = [dep.split("/", 1)[1] for dep in stages["report"]["deps"] if dep.startswith("${evaluate.out_root}/")]
    assert sorted(reported) == sorted(VARIANTS)
    assert text.count("mulcon_no_pretrain") == 2  # the list and the report's input, nowhere else


# ---- params: the config keys each stage's code reads, from the source (ast), in both directions ----

@functools.lru_cache(maxsize=None)
def _config_names() -> tuple[dict, dict, dict, dict]:
    """Sections {name: class}, their fields, their properties (`_properties`) and {class name: section}."""
    import dataclasses

    sections = _sections()
    return (sections, {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections.items()},
            {name: _properties(cls) for name, cls in sections.items()},
            {cls.__name__: name for name, cls in sections.items()})


def _sections() -> dict[str, type]:
    import typing

    from mulcon.config import Config
    return typing.get_type_hints(Config)


def _properties(cls: type) -> dict[str, set[str]]:
    """{property: the fields it reads (through other properties too)} of a config dataclass."""
    import ast
    import inspect

    source = ast.parse(inspect.getsource(cls))
    reads = {}
    for node in ast.walk(source):
        if isinstance(node, ast.FunctionDef) and any(getattr(d, "id", "") == "property" for d in node.decorator_list):
            reads[node.name] = {sub.attr for sub in ast.walk(node) if isinstance(sub, ast.Attribute)
                                and isinstance(sub.value, ast.Name) and sub.value.id == "self"}
    fields = {field.name for field in __import__("dataclasses").fields(cls)}
    resolved = {}
    for name in reads:
        todo, found = [name], set()
        while todo:
            for item in reads[todo.pop()]:
                if item in fields:
                    found.add(item)
                elif item in reads and item not in found:
                    todo.append(item)
        resolved[name] = found
    return resolved


def _keys_read(source: str) -> tuple[set[str], set[str]]:
    """(dotted keys read field by field, sections passed on whole) in one module's source: chains
    `<anything>.<section>.<field or property>`, and `<name>.<field>` where `name` is a parameter
    annotated with the section's config class (`train: TrainConfig`)."""
    import ast

    sections, fields, properties, classes = _config_names()

    def keys(section: str, attribute: str) -> set[str]:
        if attribute in fields[section]:
            return {f"{section}.{attribute}"}
        return {f"{section}.{field}" for field in properties[section].get(attribute, set())}

    read, whole = set(), set()
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            typed = {arg.arg: classes[getattr(arg.annotation, "id", "")] for arg in node.args.args + node.args.kwonlyargs
                     if getattr(arg.annotation, "id", "") in classes}
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in typed:
                    read |= keys(typed[sub.value.id], sub.attr)
        if isinstance(node, ast.Attribute) and node.attr in sections:
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.value is node:
                read |= keys(node.attr, parent.attr)
            elif not isinstance(node.value, ast.Name) or node.value.id != "self":
                whole.add(node.attr)
    return read, whole


def _cli_source(verb: str) -> str:
    """The body of the CLI function of `verb` (it picks the config values the library call gets)."""
    import inspect

    from mulcon import cli
    return inspect.getsource(cli.COMMANDS[verb][0])


# Keys a stage's code reads that its part of the work never uses. The pretrain stage trains MulCon's
# step 1 only (`mulcon.train.same_result_config`: the finetune section cannot change it). evaluate and
# analyze rebuild each network from the config saved in its model file, not from params.
NOT_IN_STEP = {"pretrain": {"finetune.", "loss.contrastive_weight", "loss.temperature", "train.finetune_epochs"},
               "evaluate": {"model."}, "analyze": {"model."}}


def _params_needed(name: str, stage: dict) -> tuple[set[str], set[str]]:
    """(keys the stage's commands read that can change its outputs, keys they may read at all)."""
    from mulcon.config import RESULT_INDEPENDENT
    from mulcon.fingerprint import STAGE_MODULES, module_file

    read, whole = set(), set()
    set_by_command = set()
    for command in _commands(stage):
        verb = re.search(r"python -m mulcon (\S+)", command).group(1)
        set_by_command |= {match.split("=")[0] for match in re.findall(r"-S '?([\w.]+=)", command)}
        modules = closure(STAGE_MODULES[verb]) - {"mulcon.config"}  # its checks read keys, its properties count
        for source in [_cli_source(verb)] + [module_file(module).read_text(encoding="utf-8") for module in modules]:
            found, passed = _keys_read(source)
            read, whole = read | found, whole | passed
    # Paths in the stage's own deps and outs, and data.name through the prepared folder's content.
    covered = RESULT_INDEPENDENT | {key.rstrip("=") for key in set_by_command} | {
        "data.dataset", "data.name", "data.root", "data.prepared_root", "train.out_root", "evaluate.out_root"}
    skipped = NOT_IN_STEP.get(name, set())
    needed = {key for key in read if key not in covered and not any(key.startswith(prefix) for prefix in skipped)}
    return needed, read | {f"{section}." for section in whole}


def _listed(stage: dict) -> set[str]:
    return {str(param) for param in stage.get("params", [])}


def _covers(listed: set[str], key: str) -> bool:
    return key in listed or key.split(".")[0] in listed


def test_every_stage_lists_exactly_the_params_its_commands_read():
    wrong = {}
    for name, stage in _stages().items():
        needed, readable = _params_needed(name, stage)
        listed = _listed(stage)
        missing = sorted(key for key in needed if not _covers(listed, key))
        unread = sorted(param for param in listed if not any(
            key == param or key.startswith(f"{param}.") or param.startswith(key) for key in readable))
        if missing or unread:
            wrong[name] = {"missing": missing, "not read": unread}
    assert wrong == {}


def test_a_missing_and_an_unread_param_are_both_found():
    stage = _stages()["prepare"]
    needed, readable = _params_needed("prepare", stage)
    assert "data.split_seed" in needed and "data.val_fraction" in needed
    assert not any(key == "train.seed" for key in readable)  # prepare's val carve no longer uses it
    needed, _ = _params_needed("pretrain", _stages()["pretrain"])
    assert "train.grad_clip" in needed and "loss.bce_reduction" in needed and "loss.temperature" not in needed
    needed, readable = _params_needed("evaluate", _stages()["evaluate"])
    assert "train.precision" in needed  # autocast on CUDA: the scores depend on it
    _, readable = _params_needed("report", _stages()["report"])
    assert "train.seeds" in readable and not any(key.startswith("model") for key in readable)
