"""The project image, read from the Dockerfile (no Docker engine here): a CUDA PyTorch base of the
pinned torch, this package installed under the pinned torch and torchvision, a non-root user, and
no secret in the image or its build context."""

from __future__ import annotations

import re
import tomllib

import torch

from tests.conftest import ROOT

SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL", "API_KEY")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def pins() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(dependency.split("==") for dependency in dependencies if "==" in dependency)


def build_args() -> dict[str, str]:
    return dict(arguments.split("=", 1) for keyword, arguments in instructions() if keyword == "ARG" and "=" in arguments)


def test_base_image_is_pytorchs_cuda_image_of_the_pinned_torch():
    [base] = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    resolved = re.sub(r"\$\{(\w+)\}", lambda match: build_args()[match.group(1)], base)
    # PyTorch's tag format: <torch>-cuda<major.minor>-cudnn<major>-runtime
    match = re.fullmatch(r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn(?P<cudnn>\d+)-runtime", resolved)
    assert match, resolved
    assert match["torch"] == pins()["torch"] == torch.__version__.split("+")[0]
    # the CUDA and cuDNN the pinned wheel is built for (the one these tests run)
    assert match["cuda"] == torch.version.cuda
    assert match["cudnn"] == str(torch.backends.cudnn.version())[0]


def test_installs_this_package_under_the_pinned_torch_and_torchvision():
    args, runs = build_args(), [arguments for keyword, arguments in instructions() if keyword == "RUN"]
    assert args["TORCH_VERSION"] == pins()["torch"] and args["TORCHVISION_VERSION"] == pins()["torchvision"]
    [install] = [run for run in runs if "pip install" in run]
    assert re.search(r"pip install --constraint (\S+) \.(\s|$)", install), install
    constraints = re.search(r"printf '([^']*)' (\S+) (\S+) > (\S+)", install)
    assert constraints[1] == r"torch==%s\ntorchvision==%s\n"
    assert (constraints[2], constraints[3]) == ('"${TORCH_VERSION}"', '"${TORCHVISION_VERSION}"')
    assert f"--constraint {constraints[4]} ." in install
    copied = [arguments for keyword, arguments in instructions() if keyword == "COPY"]
    assert "pyproject.toml README.md ./" in copied and "mulcon ./mulcon" in copied
    assert {"components ./components", "pipeline ./pipeline"} <= set(copied)  # what the components import


def test_runs_as_a_non_root_user():
    users = [arguments for keyword, arguments in instructions() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(index for index, (keyword, _) in enumerate(instructions()) if keyword == "USER")
    assert all(keyword not in ("RUN", "COPY") for keyword, _ in instructions()[last_user:])


def test_no_secret_in_the_image_or_its_build_context():
    for keyword, arguments in instructions():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", arguments) or [arguments.split("=")[0]]
            assert not [name for name in names if any(word in name.upper() for word in SECRET_WORDS)], arguments
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "mlflow.db", "mlruns", ".env", ".aws", "dvc-remote"} <= ignored
