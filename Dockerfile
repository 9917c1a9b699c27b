# The project image: the mulcon package on the CUDA build of the pinned PyTorch. The Kubeflow
# components (components/) and the PyTorchJob pods run in it.
#   make image                                  (docker or podman, whichever answers; python -m pipeline.image)
#   make image BASE=local                       (on a Debian 12 base built here: make base-image)
#   docker run --gpus all mulcon:<commit> python -m mulcon train --help
# BASE_IMAGE defaults to PyTorch's own image for the versions pyproject.toml pins (torch 2.14.1 is
# built for CUDA 13.0 with cuDNN 9): the venv sees the base's torch and torchvision and adds the rest.
# Any base with python3 (3.11), python3-venv and git works: the local Debian base gets torch from
# the wheelhouse too.
# Every wheel comes from the build context `wheels` (a folder that `pip download` filled on the host:
# --build-context wheels=DIR), so the build needs no network; the constraints refuse another torch.
# It runs as uid 1000 or any other uid with gid 0 (OpenShift's rule): what it writes (HOME, caches,
# the working directory) is group 0 and group-writable.
# No credentials are baked in: S3 and MLflow settings come from Kubernetes secrets at run time.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG CUDA_VERSION=13.0
ARG BASE_IMAGE=pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG CUDA_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH} \
    HOME=/home/mulcon \
    XDG_CACHE_HOME=/home/mulcon/.cache \
    USER=mulcon \
    LOGNAME=mulcon

# git: DVC clones this repository at the requested data revision (components/data.py); the local
# base has it already (its build has no network). The user's group is 0, as is any uid's on OpenShift;
# USER and LOGNAME name it for getpass (MLflow's user tag) when the uid has no passwd entry.
RUN (command -v git >/dev/null || (apt-get update \
        && apt-get install --yes --no-install-recommends git && rm -rf /var/lib/apt/lists/*)) \
    && python3 -m venv --system-site-packages /opt/venv \
    && echo 'mulcon:x:1000:0:mulcon:/home/mulcon:/bin/bash' >> /etc/passwd \
    && mkdir -p /home/mulcon/.cache /opt/mulcon \
    && chgrp -R 0 /home/mulcon /opt/mulcon && chmod -R g=u /home/mulcon /opt/mulcon

# The dependencies, in a layer that only pyproject.toml changes: the project's and its build
# backend's requirements, read from it, installed from the wheelhouse alone.
WORKDIR /opt/mulcon
COPY pyproject.toml ./
RUN --mount=type=bind,from=wheels,target=/wheels \
    printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /opt/constraints.txt \
    && python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(project['project']['dependencies'] + project['build-system']['requires']))" > /opt/requirements.txt \
    && python -m pip install --no-index --find-links /wheels --constraint /opt/constraints.txt -r /opt/requirements.txt \
    && python -c "import sys, torch, torchvision; \
assert sys.version_info[:2] == (3, 11), sys.version; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert torchvision.__version__.split('+')[0] == '${TORCHVISION_VERSION}', torchvision.__version__; \
assert torch.version.cuda == '${CUDA_VERSION}', torch.version.cuda"

# The package itself, in a cheap late layer: a change of mulcon/ rebuilds only from here.
COPY README.md ./
COPY mulcon ./mulcon
RUN python -m pip install --no-deps --no-index --no-build-isolation . && rm -rf build mulcon.egg-info

# What the components read beside the package: the params files and the pipeline code.
COPY params.yaml data.dvc ./
COPY configs ./configs
COPY components ./components
COPY pipeline ./pipeline
# The commit the image is built from, for the git_commit tag of MLflow runs (the image has no .git);
# last, so that a new commit rebuilds nothing above.
ARG GIT_COMMIT=unknown
ENV MULCON_GIT_COMMIT=${GIT_COMMIT} \
    PYTHONPATH=/opt/mulcon
RUN chgrp -R 0 /opt/mulcon && chmod -R g=u /opt/mulcon

USER 1000
CMD ["python", "-m", "mulcon", "--help"]
