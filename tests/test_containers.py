"""The pipeline in its container: the project image built here (docker, else podman; reused while
its inputs do not change) and `python -m pipeline run-local --runner docker`, every task in that
image as uid 1000 and as an arbitrary uid of group 0, against an MLflow server on PostgreSQL, with
the data of a revision fetched by DVC from moto's S3 and the repository served by `git daemon`,
all on 127.0.0.1 over the host network. kfp.local.DockerRunner may call a failed task a success:
the checks read MLflow and the outputs, never the task status. A training task's container killed
after an epoch, and its retry in a new container resuming from the checkpoint volume."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT, S3_ENVIRONMENT, check_pipeline_run, dvc, free_port, make_bucket, make_repo, stop

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")


def _answers(*command: str) -> bool:
    try:
        return shutil.which(command[0]) is not None and subprocess.run(command, capture_output=True,
                                                                       timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def docker_api(tmp_path_factory):
    """(engine, DOCKER_HOST) of a Docker API: $DOCKER_HOST, the Docker daemon, or podman's API
    service on a socket of this session (stopped after); skips where neither engine answers."""
    if _answers("docker", "info"):
        yield "docker", os.environ.get("DOCKER_HOST", "")
        return
    if not _answers("podman", "info"):
        pytest.skip("neither docker nor podman answers here (docker info, podman info): .ci/run installs podman")
    socket_path = tmp_path_factory.mktemp("podman") / "docker.sock"
    log = open(socket_path.parent / "service.log", "w")
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            assert service.poll() is None and time.monotonic() < deadline, (socket_path.parent / "service.log").read_text()
            time.sleep(0.2)
        yield "podman", f"unix://{socket_path}"
    finally:
        stop(service)
        log.close()


@pytest.fixture(scope="session")
def project_image(docker_api) -> str:
    """The project image on the local Debian base (no registry needed), built once per change of its inputs."""
    from pipeline.image import build_image

    return build_image("local", engine=docker_api[0])


def _serve(folder: Path, port: int) -> subprocess.Popen:
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={folder}",
                               "--listen=127.0.0.1", f"--port={port}", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while subprocess.run(["git", "ls-remote", f"git://127.0.0.1:{port}/repo"], capture_output=True).returncode:
        assert daemon.poll() is None and time.monotonic() < deadline, "git daemon did not serve the repository"
        time.sleep(0.2)
    return daemon


@pytest.fixture(scope="session")
def data_revision(tmp_path_factory, s3_server):
    """(repository URL, revision, data md5): a copy of this project with the demo data at tag v1,
    pushed to a DVC remote on moto's S3 and served by git daemon on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("served")
    repo, environment = make_repo(folder, [])
    environment.update(S3_ENVIRONMENT)
    make_bucket(s3_server, "containers-data")
    dvc(repo, environment, "remote", "add", "-d", "s3", "s3://containers-data/store")
    dvc(repo, environment, "remote", "modify", "s3", "endpointurl", s3_server)
    dvc(repo, environment, "push", "-q")
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "data v1"], ["git", "tag", "v1"]):
        subprocess.run(command, cwd=repo, env=environment, check=True, capture_output=True)
    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    port = free_port()
    daemon = _serve(folder, port)
    try:
        yield f"git://127.0.0.1:{port}/repo", "v1", md5
    finally:
        stop(daemon)


# As an arbitrary uid with group 0 (how OpenShift-like clusters run pods): every component writes only
# where such a user may. The image's own user (1000) runs prepare and training in the test after this.
@pytest.mark.timeout(2400)  # a cold build (wheelhouse, base, image) takes 5 to 9 minutes here
@pytest.mark.parametrize("user", ["4242:0"])
def test_the_tiny_pipeline_runs_in_the_project_image_into_mlflow(user, docker_api, project_image, data_revision,
                                                                 postgres_mlflow_server, tmp_path):
    url, revision, md5 = data_revision
    environment = {**os.environ, **S3_ENVIRONMENT, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                   "MLFLOW_TRACKING_URI": postgres_mlflow_server, "DOCKER_HOST": docker_api[1]}
    pipeline_root = tmp_path / "kfp"
    result = subprocess.run([sys.executable, "-m", "pipeline", "run-local", "--runner", "docker", "--image", project_image,
                             "--user", user, "--tiny", "--parallelism", "4", "--params", str(ROOT / "params.yaml"),
                             "--pipeline-root", str(pipeline_root), "-S", "train.device=cpu",
                             "-S", "tracking.system_metrics=false", "-p", f"data_revision={revision}", "-p", f"repo_url={url}"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "| MulCon without pretraining |" in result.stdout and "| MulCon |" in result.stdout
    [root] = pipeline_root.glob("mulcon-*")
    table = root / "report" / "tables" / "ablation.csv"
    assert table.exists() and table.stat().st_uid == int(user.split(":")[0])  # written in the container, as `user`
    # The data of the revision, fetched from S3 in the prepare container onto the data volume (here a
    # folder of the pipeline root), and no image in any task's artifacts.
    [fetched] = (pipeline_root / "volumes" / "data").glob("*/data/demo/train2014")
    assert any(fetched.iterdir()) and fetched.stat().st_uid == int(user.split(":")[0])
    assert not any(root.rglob("*.jpg")) and not any(root.rglob("*.npy"))

    runs, children = check_pipeline_run(postgres_mlflow_server)
    assert {run.data.tags["data_version"] for run in runs} == {md5}
    for run in children:
        assert {"test_mAP", "test_CF1", "test_OF1"} <= set(run.data.metrics)
        assert run.data.metrics["test_mAP"] > 0


def component_command(component, task_root: Path, parameters: dict, inputs: dict, outputs: tuple[str, ...]) -> list:
    """The command a pod's container runs for `component`: its own command and args with the
    executor input of `parameters`, the input artifacts `inputs` (name -> the entry the task that
    wrote it left in its executor_output.json) and the output artifacts `outputs` under `task_root`."""
    spec = component.component_spec
    produced = {name: {"artifacts": [{"name": name, "uri": str(task_root / name), "metadata": {},
                                      "type": {"schemaTitle": spec.outputs[name].type.split("@")[0]}}]}
                for name in outputs}
    executor_input = {
        "inputs": {"parameterValues": parameters,
                   "artifacts": {name: {"artifacts": [artifact]} for name, artifact in inputs.items()}},
        "outputs": {"artifacts": produced, "outputFile": str(task_root / "executor_output.json")}}
    container = spec.implementation.container
    return [*container.command, *(json.dumps(executor_input) if arg == "{{$}}" else arg for arg in container.args)]


@pytest.fixture
def start_task(docker_api, project_image, monkeypatch):
    """start_task(component, task_root, mounts, inputs, outputs, **parameters): the container a pod
    runs for `component` (component_command) in the project image, as the image's user, with no
    network and `mounts` (host folder -> mount path). Every container is removed after the test."""
    import docker

    from pipeline.containers import docker_client, local_image

    if docker_api[1]:
        monkeypatch.setenv("DOCKER_HOST", docker_api[1])
    client = docker_client()
    image, started = local_image(client, project_image), []

    def start(component, task_root: Path, mounts: dict[Path, str], inputs: dict, outputs: tuple[str, ...],
              **parameters):
        volumes = {str(source): {"bind": target, "mode": "rw"} for source, target in mounts.items()}
        command = component_command(component, task_root, parameters, inputs, outputs)
        started.append(client.containers.run(image, command, detach=True, network_mode="none", volumes=volumes))
        return started[-1]

    yield start
    for container in started:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def finish(container) -> tuple[int, str]:
    """(exit status, log) of `container`, once it has ended."""
    status = container.wait(timeout=600)["StatusCode"]
    return status, container.logs().decode(errors="replace")


def kill_after(container, path: Path, seconds: float = 300) -> tuple[int, str]:
    """SIGKILL `container` (as a lost node or the OOM killer does) once `path` exists; its (exit
    status, log), 137 when it was killed."""
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        container.reload()
        if container.status != "running":
            break
        time.sleep(0.1)
    if path.exists():
        container.kill(signal="SIGKILL")
    return finish(container)


@pytest.mark.timeout(2400)  # a cold build of the image, as above
def test_a_killed_training_container_resumes_in_a_new_container_from_the_checkpoint_volume(start_task, tmp_path):
    """The pretrain task's command in the project image, with the volumes its pod mounts, killed
    once an epoch's checkpoint is on the checkpoint volume; its retry, a new container (a fresh
    file system) on the same volumes, resumes from that epoch. Without the checkpoint volume at
    checkpoint_root (none mounted there, or a relative checkpoint_root: the container's own file
    system) no checkpoint reaches the volume and a retry starts from epoch 0: this test fails."""
    from components import CHECKPOINT_ROOT, DATA_ROOT
    from components.prepare import prepare
    from components.train import pretrain
    from mulcon import checkpoint
    from mulcon.data import make_demo
    from tests.conftest import TINY

    epochs, kfp, working_data = 4, tmp_path / "kfp", tmp_path / "working-tree-data"
    data_volume, checkpoint_volume = tmp_path / "data-volume", tmp_path / "checkpoint-volume"
    make_demo(working_data / "demo", num_train=24, num_val=12, image_size=48, seed=0)
    for folder in (data_volume, checkpoint_volume, kfp):
        folder.mkdir()
    for path in (data_volume, checkpoint_volume, kfp, working_data, *working_data.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o644)  # the image's user is not this one
    # The claims mounted as the compiled tasks mount them (test_cluster.py::test_compiled_tasks_mount_
    # the_volume_claims_they_need_and_nothing_else); the artifacts at their own path, as kfp.local
    # mounts its pipeline root. prepare takes the working directory's data (data_revision ""), here
    # mounted as the image's data/ folder.
    prepared = start_task(prepare, kfp / "prepare", {data_volume: DATA_ROOT, working_data: "/opt/mulcon/data",
                                                     kfp: str(kfp)}, {}, ("data",),
                          dataset="demo", data_revision="", repo_url="", dvc_remote="", params_file="params.yaml",
                          overrides=TINY, pretrain_epochs=epochs, finetune_epochs=1, pipeline_run="run-1",
                          data_root=DATA_ROOT, checkpoint_root=CHECKPOINT_ROOT)
    status, log = finish(prepared)
    assert status == 0, log[-3000:]
    [data] = json.loads((kfp / "prepare" / "executor_output.json").read_text())["artifacts"]["data"]["artifacts"]
    inputs = {"data": {**data, "type": {"schemaTitle": "system.Dataset"}}}
    mounts = {data_volume: DATA_ROOT, checkpoint_volume: CHECKPOINT_ROOT, kfp: str(kfp)}

    def train(attempt: str):
        return start_task(pretrain, kfp / attempt, mounts, inputs, ("model",), pipeline_run="run-1", gpus=1)

    saved = checkpoint_volume / "run-1" / "mulcon" / "pretrain" / "checkpoint.pt"
    status, log = kill_after(train("pretrain-1"), saved)
    assert status == 137, f"not killed after a checkpoint at {saved} (exit status {status}):\n{log[-3000:]}"
    checkpointed = checkpoint.load(saved)["epoch"]
    assert 1 <= checkpointed < epochs, log[-3000:]
    status, log = finish(train("pretrain-2"))  # the retry: a new container
    assert status == 0, log[-3000:]
    assert f"resuming mulcon/pretrain from epoch {checkpointed}\n" in log, log[-3000:]
    trained = [int(line.split("mulcon/pretrain epoch ")[1].split("/")[0]) for line in log.splitlines()
               if "mulcon/pretrain epoch " in line]
    assert trained == list(range(checkpointed + 1, epochs + 1)), log[-3000:]
    history = json.loads((kfp / "pretrain-2" / "model" / "pretrain" / "history.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, epochs + 1))


def fails(*argv: str, **environment: str) -> str:
    """The last stderr line of `python -m pipeline run-local --runner docker ...`, which must exit 2."""
    result = subprocess.run([sys.executable, "-m", "pipeline", "run-local", "--runner", "docker", "--tiny", *argv],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "", **environment})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_run_the_containers_cannot_reach_is_refused_with_one_line(tmp_path):
    from pipeline.checks import PipelineError
    from pipeline.containers import check_data_source, image_params

    assert "the containers need an MLflow tracking server they reach" in fails(MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    closed = f"unix://{tmp_path / 'none.sock'}"
    assert fails(MLFLOW_TRACKING_URI="http://127.0.0.1:5000", DOCKER_HOST=closed).startswith(
        f"error: --runner docker: no Docker API at {closed} ")
    with pytest.raises(PipelineError, match="see nothing of this checkout: give the data version as -p data_revision"):
        check_data_source({"data_revision": "v1", "repo_url": ""})
    with pytest.raises(PipelineError, match="repo_url=/srv/mulcon: a local path, which the containers do not see"):
        check_data_source({"data_revision": "v1", "repo_url": "/srv/mulcon"})
    outside = tmp_path / "params.yaml"
    with pytest.raises(PipelineError, match=f"--params {outside}: with --runner docker, a params file of the project"):
        image_params(outside)
    assert image_params(ROOT / "configs" / "paper-coco2014.yaml") == "configs/paper-coco2014.yaml"
    result = subprocess.run([sys.executable, "-m", "pipeline", "run-local", "--user", "4242:0"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --image and --user are for --runner docker: the subprocess runner runs every task here")
    assert not (tmp_path / "kfp-local").exists() and not (ROOT / "kfp-local").exists()


def test_an_image_the_engine_does_not_hold_is_refused_with_one_line(docker_api):
    assert fails("--image", "localhost/mulcon:no-such-tag", MLFLOW_TRACKING_URI="http://127.0.0.1:5000",
                 DOCKER_HOST=docker_api[1]) == ("error: --runner docker: no image localhost/mulcon:no-such-tag here: build "
                                                "it (make image, or make image BASE=local without a registry) and give "
                                                "--image with the tag it printed")


def test_without_an_engine_the_build_says_so_in_one_line(monkeypatch):
    from pipeline import image

    monkeypatch.setattr(image, "ENGINES", ("no-such-engine",))
    with pytest.raises(image.ImageError, match=r"neither docker nor podman answers here \(`docker info`, `podman info`\)"):
        image.find_engine()


def test_the_image_tag_follows_the_contents_of_its_inputs_not_their_times(tmp_path, monkeypatch):
    from pipeline import image

    copy = tmp_path / "checkout"  # no .git: the files are listed from the folders
    copy.mkdir()
    for name in ("Dockerfile", ".dockerignore", *image.BUILD_INPUTS):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / name)
    monkeypatch.setattr(image, "ROOT", copy)
    monkeypatch.setattr(image, "CACHE", tmp_path / "cache")
    tag = image.image_tag("local-base")
    assert tag.startswith("localhost/mulcon:") and image.image_tag("another-base") != tag
    os.utime(copy / "pyproject.toml", (1, 1))
    assert image.image_tag("local-base") == tag
    with open(copy / "mulcon" / "metrics.py", "a") as handle:
        handle.write("# changed\n")
    changed = image.image_tag("local-base")
    assert changed != tag
    (tmp_path / "cache").mkdir()
    with image._build_context() as context:
        files = sorted(path.relative_to(context) for path in context.rglob("*") if path.is_file())
        assert files == sorted(path.relative_to(copy) for path in copy.rglob("*") if path.is_file())
        assert {path.stat().st_mtime for path in context.rglob("*")} == {image.FIXED_TIME}
