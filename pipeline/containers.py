"""`run-local --runner docker`: every task of the pipeline in the project image, as on a cluster.

kfp.local.DockerRunner starts one container per task through the Docker API ($DOCKER_HOST: a
Docker daemon, or `podman system service --time=0 unix:///PATH`). The container sees nothing of
this checkout but kfp's pipeline root (mounted at its own path): the data come from a data
revision of a repository the container can reach (e.g. `git daemon` on 127.0.0.1), fetched by
DVC from the revision's remote; MLflow is a tracking server; both reached over the host network.
The credentials travel as environment variables, the names the cluster's secrets hold
(components.SECRETS), copied from this process's environment.

kfp.local.DockerRunner reports a task whose container is gone before it is waited for as a success
(kfp 2.x): `check_outputs` looks at what the run wrote instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from components import SECRETS
from pipeline.checks import PipelineError

ROOT = Path(__file__).resolve().parents[1]
# Beside the secrets' keys: what boto3 (DVC's S3) and the training read from the environment.
FORWARDED = ("AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")


def forwarded_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a task gets: the secrets' keys and FORWARDED, where `environ` sets them.

    Raises:
        PipelineError: no MLFLOW_TRACKING_URI, or one the containers cannot share (not http(s)).
    """
    environ = os.environ if environ is None else environ
    names = [name for required, optional in SECRETS.values() for name in (*required, *optional)] + list(FORWARDED)
    environment = {name: environ[name] for name in names if environ.get(name)}
    uri = environment.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise PipelineError(f"--runner docker: MLFLOW_TRACKING_URI={uri!r}: the containers need an MLflow tracking "
                            "server they reach (host network), e.g. MLFLOW_TRACKING_URI=http://127.0.0.1:5000")
    return environment


def check_data_source(given: dict) -> None:
    """The containers see no checkout: the data must come from a revision of a repository URL.

    Raises:
        PipelineError: no data_revision or repo_url, or a repository given as a local path.
    """
    revision, url = given.get("data_revision", ""), given.get("repo_url", "")
    if not revision or not url:
        raise PipelineError("--runner docker: the containers see nothing of this checkout: give the data version "
                            "as -p data_revision=REV -p repo_url=URL (a git URL they reach, e.g. git://127.0.0.1/mulcon)")
    if "://" not in url:
        raise PipelineError(f"--runner docker: -p repo_url={url}: a local path, which the containers do not see; "
                            "serve the repository (e.g. git daemon on 127.0.0.1) and give its URL")


def image_params(params: str | Path) -> str:
    """The image's copy of the params file `params`: its path in the project (the image's working
    directory holds the project's params files).

    Raises:
        PipelineError: `params` is not a file of this project.
    """
    path = Path(params).resolve()
    if not path.is_relative_to(ROOT):
        raise PipelineError(f"--params {params}: with --runner docker, a params file of the project, which the image "
                            "holds (e.g. params.yaml, configs/paper-coco2014.yaml); change it with -S KEY=VALUE")
    return str(path.relative_to(ROOT))


def docker_client():
    """A client of the Docker API at $DOCKER_HOST (default: the Docker daemon's socket) that answered."""
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as error:
        where = os.environ.get("DOCKER_HOST", "the Docker daemon's socket")
        raise PipelineError(f"--runner docker: no Docker API at {where} ({type(error).__name__}): start the Docker "
                            "daemon, or `podman system service --time=0 unix:///PATH` and set DOCKER_HOST=unix:///PATH") from None
    return client


def local_image(client, image: str) -> str:
    """`image` as the engine lists it (podman's `localhost/` prefix included): kfp.local pulls any
    image whose name it does not find among the tags, and no registry holds the local build.

    Raises:
        PipelineError: the engine has no such image.
    """
    import docker

    try:
        tags = client.images.get(image).tags
    except docker.errors.ImageNotFound:
        raise PipelineError(f"--runner docker: no image {image} here: build it (make image, or make image BASE=local "
                            "without a registry) and give --image with the tag it printed") from None
    named = [tag for tag in tags if tag == image or tag.endswith("/" + image)]
    return (named or tags or [image])[0]


def docker_runner(environment: dict[str, str], user: str | None):
    """The kfp.local.DockerRunner of a run: host network, `environment`, `user` (UID[:GID];
    default the image's)."""
    from kfp import local

    return local.DockerRunner(network_mode="host", environment=environment, **({"user": user} if user else {}))


def shared_root(pipeline_root: str | Path) -> str:
    """`pipeline_root` created and writable for any uid (the image's user is not this one), as an
    absolute path (kfp mounts it at the same path in the containers)."""
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o777)
    return str(root)


def check_outputs(pipeline_root: str | Path) -> Path:
    """The last run's Table 3 under `pipeline_root`, once its promote task has written its decision;
    a PipelineError saying that a task failed otherwise (kfp.local.DockerRunner may have called it a
    success)."""
    runs = sorted(Path(pipeline_root).glob("mulcon-*"), key=os.path.getmtime)
    where = runs[-1] if runs else Path(pipeline_root)
    table, decision = where / "report" / "ablation", where / "promote" / "executor_output.json"
    try:
        decided = "Output" in json.loads(decision.read_text()).get("parameterValues", {})
    except (OSError, ValueError):
        decided = False
    if not (table.exists() and decided):
        missing = " and ".join(str(path.relative_to(where)) for path, done in ((table, table.exists()),
                                                                              (decision, decided)) if not done)
        raise PipelineError(f"{where}: no {missing}: a task failed in its container (its log is above), "
                            "whatever status kfp.local printed")
    return table
