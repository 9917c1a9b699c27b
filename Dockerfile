# The project image: the mulcon package on the CUDA build of the pinned PyTorch. The Kubeflow
# components (components/) and the PyTorchJob pods run in it.
#   make image                       (docker build -t mulcon:<commit> --build-arg GIT_COMMIT=... .)
#   docker run --gpus all mulcon:<commit> python -m mulcon train --help
# The base is PyTorch's own image for the versions pyproject.toml pins: the torch 2.14.1 wheel is
# built for CUDA 13.0 with cuDNN 9 (torch.version.cuda), so pip keeps the base's torch and
# torchvision (the constraints below refuse any other) and adds only the remaining dependencies.
# No credentials are baked in: S3 and MLflow settings come from Kubernetes secrets at run time.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG CUDA_VERSION=13.0
FROM pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn9-runtime

ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG CUDA_VERSION
# The commit the image is built from, for the git_commit tag of MLflow runs (the image has no .git).
ARG GIT_COMMIT=unknown
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MULCON_GIT_COMMIT=${GIT_COMMIT}

# git: DVC clones this repository at the requested data revision (components/data.py).
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 mulcon \
    && useradd --uid 1000 --gid mulcon --create-home --shell /bin/bash mulcon

WORKDIR /opt/mulcon
COPY pyproject.toml README.md ./
COPY mulcon ./mulcon
RUN printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /opt/constraints.txt \
    && python -m pip install --constraint /opt/constraints.txt . \
    && python -c "import sys, torch, torchvision; \
assert sys.version_info[:2] == (3, 11), sys.version; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert torchvision.__version__.split('+')[0] == '${TORCHVISION_VERSION}', torchvision.__version__; \
assert torch.version.cuda == '${CUDA_VERSION}', torch.version.cuda"

# What the components read beside the package: the params files and the pipeline code.
COPY params.yaml data.dvc ./
COPY configs ./configs
COPY components ./components
COPY pipeline ./pipeline
RUN chown -R mulcon:mulcon /opt/mulcon

USER mulcon
ENV HOME=/home/mulcon \
    PYTHONPATH=/opt/mulcon
CMD ["python", "-m", "mulcon", "--help"]
