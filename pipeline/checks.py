"""What `python -m pipeline` is given, checked before anything is written or sent: the compiled
package, the pipeline arguments against the pipeline's inputs, the output file of `compile`.

Each check raises `PipelineError`, whose message is the one line the command prints (exit 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from mulcon.data.preparation import DATASETS
from mulcon.errors import MulconError

PACKAGE_SUFFIXES = (".yaml", ".yml")  # what `python -m pipeline compile` writes
# The values a string parameter may take, where the library fixes them.
CHOICES = {"dataset": DATASETS}
# A compiled parameter's type -> the words an error uses, and an example value.
TYPES = {"STRING": ("a string", "v1.2"), "NUMBER_INTEGER": ("an integer", "4"), "NUMBER_DOUBLE": ("a number", "0.5"),
         "BOOLEAN": ("true or false", "true"), "LIST": ("a list", "[train.seed=1]"),
         "STRUCT": ("a mapping", "{key: value}")}
INTEGER = re.compile(r"[+-]?\d+")
# What a cluster run needs and has no default for: the image holds no data, so prepare fetches a
# data version (a git revision) from the repository through DVC.
CLUSTER_ARGUMENTS = {"data_revision": "a git revision (tag, commit, branch) of repo_url whose data.dvc names the data, "
                                      "e.g. -p data_revision=v1.2",
                     "repo_url": "this repository as the cluster can clone it, e.g. "
                                 "-p repo_url=https://git.example/team/mulcon.git"}
MULTINODE_PARAMETERS = ("nodes", "workspace_pvc", "job_timeout_hours")


class PipelineError(MulconError):
    """Bad input to `python -m pipeline`, or a Kubeflow Pipelines API that cannot take the request."""


def read_package(path: str | os.PathLike) -> dict[str, Any]:
    """The pipeline spec (the first YAML document) of the compiled pipeline at `path`.

    Raises:
        PipelineError: no such file, not YAML, or not a pipeline spec kfp can load.
    """
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    where = f"--package {path}"
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{where}: {'is a folder' if path.is_dir() else 'no such file'}; give a pipeline "
                            "compiled by `python -m pipeline compile`, or leave --package out to compile one now")
    if path.suffix not in PACKAGE_SUFFIXES:
        raise PipelineError(f"{where}: not a compiled pipeline (expected a .yaml file from `python -m pipeline compile`)")
    try:
        spec = next(yaml.safe_load_all(path.read_text(encoding="utf-8")), None)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise PipelineError(f"{where}: not YAML ({' '.join(str(error).split())})") from None
    if not isinstance(spec, dict) or not {"pipelineInfo", "root"} <= set(spec):
        raise PipelineError(f"{where}: not a compiled Kubeflow pipeline (no pipelineInfo and root); write one "
                            "with `python -m pipeline compile`")
    try:
        json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    except json_format.ParseError as error:
        raise PipelineError(f"{where}: not a valid Kubeflow pipeline spec: {str(error).splitlines()[0]}") from None
    return spec


def pipeline_inputs(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pipeline's input parameters: name -> {parameterType, defaultValue, ...}, as compiled."""
    return spec["root"].get("inputDefinitions", {}).get("parameters", {})


def _value(text: str, kind: str) -> Any:
    """`text` as a value of the compiled parameter type `kind` (None if it is not one)."""
    if kind == "STRING":
        return text  # as written: data_revision=1.10 stays "1.10"
    if kind == "NUMBER_INTEGER":
        return int(text) if INTEGER.fullmatch(text.strip()) else None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if kind == "NUMBER_DOUBLE":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    expected = {"BOOLEAN": bool, "LIST": list, "STRUCT": dict}.get(kind)
    return value if expected and isinstance(value, expected) else None


def parse_arguments(pairs: list[str], inputs: dict[str, dict[str, Any]], multinode: bool = False) -> dict[str, Any]:
    """`-p name=value` pairs as pipeline arguments, each name one of `inputs` and each value of its type.

    Raises:
        PipelineError: not name=value, a name given twice, an unknown name (the message lists the
            known ones), a value not of the parameter's type or not one of its choices.
    """
    arguments: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise PipelineError(f"-p {pair!r}: a pipeline argument is NAME=VALUE, e.g. -p gpus=4")
        if name in arguments:
            raise PipelineError(f"-p {name}: given twice")
        if name not in inputs:
            hint = " (a parameter of the multi-node pipeline: add --multinode)" if name in MULTINODE_PARAMETERS \
                and not multinode else ""
            raise PipelineError(f"-p {name}={text}: the pipeline has no parameter {name!r}{hint}; its parameters: "
                                f"{', '.join(inputs)}")
        kind = inputs[name]["parameterType"]
        value = _value(text, kind)
        if value is None:
            words, example = TYPES.get(kind, (kind, ""))
            raise PipelineError(f"-p {name}={text}: {name} takes {words}, e.g. -p {name}={example}")
        if name in CHOICES and value not in CHOICES[name]:
            raise PipelineError(f"-p {name}={text}: {name} is one of {', '.join(CHOICES[name])}")
        arguments[name] = value
    return arguments


def require_cluster_arguments(arguments: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> None:
    """A run on a cluster has its data source: `data_revision` and `repo_url` given (or compiled in) and not empty.

    Raises:
        PipelineError: naming the first one missing and what it takes (run-local keeps the
            working directory's data and needs neither).
    """
    for name, what in CLUSTER_ARGUMENTS.items():
        value = arguments.get(name, inputs.get(name, {}).get("defaultValue", ""))
        if not str(value).strip():
            raise PipelineError(f"-p {name}: a cluster run needs {what} (the image holds no data; "
                                "run-local uses the working directory's)")


def output_file(path: str | os.PathLike) -> Path:
    """`path`, once its folder exists and is writable and its name ends in .yaml or .yml.

    Raises:
        PipelineError: naming what is wrong with `path`.
    """
    path = Path(path)
    folder = path.parent
    where = f"--output {path}"
    if path.is_dir():
        raise PipelineError(f"{where}: is a folder; give a file name, e.g. {path / 'mulcon-pipeline.yaml'}")
    if path.suffix not in PACKAGE_SUFFIXES:
        raise PipelineError(f"{where}: the file name must end in .yaml or .yml")
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise PipelineError(f"{where}: the folder {folder} {problem}; create it or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PipelineError(f"{where}: cannot write in {folder} (permission denied); write elsewhere")
    return path
