"""The project image, read from the Dockerfile: a CUDA PyTorch base of the pinned torch by default,
the dependencies from the wheelhouse under the pinned torch and torchvision in a layer that only
pyproject.toml changes, the package in a late layer, a non-root user of group 0, and no secret in
the image or its build context. tests/test_containers.py builds it and runs the pipeline in it."""

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


def resolve(text: str) -> str:
    """`text` with the build arguments' defaults put in for ${NAME}, nested ones included."""
    while "${" in text:
        text = re.sub(r"\$\{(\w+)\}", lambda match: build_args()[match.group(1)], text)
    return text


def test_base_image_is_by_default_pytorchs_cuda_image_of_the_pinned_torch():
    [base] = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    assert base == "${BASE_IMAGE}"  # make image BASE=local builds on the Debian base instead
    resolved = resolve(base)
    # PyTorch's tag format: <torch>-cuda<major.minor>-cudnn<major>-runtime
    match = re.fullmatch(r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn(?P<cudnn>\d+)-runtime", resolved)
    assert match, resolved
    assert match["torch"] == pins()["torch"] == torch.__version__.split("+")[0]
    # the CUDA and cuDNN the pinned wheel is built for (the one these tests run)
    assert match["cuda"] == torch.version.cuda
    assert match["cudnn"] == str(torch.backends.cudnn.version())[0]


def test_installs_the_wheelhouse_under_the_pinned_torch_then_the_package_in_a_late_layer():
    args, steps = build_args(), instructions()
    assert args["TORCH_VERSION"] == pins()["torch"] and args["TORCHVISION_VERSION"] == pins()["torchvision"]
    index = {step: position for position, step in enumerate(steps)}
    [dependencies] = [step for step in steps if step[0] == "RUN" and "-r /opt/requirements.txt" in step[1]]
    install = dependencies[1]
    assert install.startswith("--mount=type=bind,from=wheels,target=/wheels ")  # --build-context wheels=DIR
    assert re.search(r"pip install --no-index --find-links /wheels --constraint (\S+) -r /opt/requirements.txt", install)
    constraints = re.search(r"printf '([^']*)' (\S+) (\S+) > (\S+)", install)
    assert constraints[1] == r"torch==%s\ntorchvision==%s\n"
    assert (constraints[2], constraints[3]) == ('"${TORCH_VERSION}"', '"${TORCHVISION_VERSION}"')
    assert f"--constraint {constraints[4]} -r" in install
    assert "project['project']['dependencies'] + project['build-system']['requires']" in install
    # only pyproject.toml is copied before the dependencies: a code change does not reinstall them
    assert [step for step in steps[:index[dependencies]] if step[0] == "COPY"] == [("COPY", "pyproject.toml ./")]
    [package] = [step for step in steps if step[0] == "RUN" and "pip install --no-deps" in step[1]]
    assert "pip install --no-deps --no-index --no-build-isolation ." in package[1]
    assert index[("COPY", "mulcon ./mulcon")] < index[package] and index[dependencies] < index[("COPY", "mulcon ./mulcon")]
    copied = [arguments for keyword, arguments in steps if keyword == "COPY"]
    assert {"components ./components", "pipeline ./pipeline"} <= set(copied)  # what the components import


def test_runs_as_a_non_root_user():
    users = [arguments for keyword, arguments in instructions() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user = max(index for index, (keyword, _) in enumerate(instructions()) if keyword == "USER")
    assert all(keyword not in ("RUN", "COPY") for keyword, _ in instructions()[last_user:])


def test_what_the_program_writes_is_group_0_and_group_writable_for_any_uid():
    runs = " ".join(arguments for keyword, arguments in instructions() if keyword == "RUN")
    env = " ".join(arguments for keyword, arguments in instructions() if keyword == "ENV")
    assert "HOME=/home/mulcon" in env and "XDG_CACHE_HOME=/home/mulcon/.cache" in env
    assert "chgrp -R 0 /home/mulcon /opt/mulcon && chmod -R g=u /home/mulcon /opt/mulcon" in runs
    assert runs.rstrip().endswith("chgrp -R 0 /opt/mulcon && chmod -R g=u /opt/mulcon")  # after every COPY
    assert "mulcon:x:1000:0:" in runs  # uid 1000's group is 0 too


def test_no_secret_in_the_image_or_its_build_context():
    for keyword, arguments in instructions():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", arguments) or [arguments.split("=")[0]]
            assert not [name for name in names if any(word in name.upper() for word in SECRET_WORDS)], arguments
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "mlflow.db", "mlruns", ".env", ".aws", "dvc-remote"} <= ignored
