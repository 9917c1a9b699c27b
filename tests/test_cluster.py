"""What a cluster run needs, tested the way a cluster would hit it without a cluster: the volume
claims and requests in the compiled pipeline, a killed training task that resumes in a new
"pod" from the checkpoint volume, the PyTorchJob launcher against an in-memory Kubernetes API,
the pods' secret check, and a private repository reached through the mulcon-git credentials."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kubernetes.client import ApiException

from components import CHECKPOINT_ROOT, DATA_ROOT
from components.pytorchjob import run_pytorchjob, stage_data, train_on_nodes
from tests.conftest import BIN, ROOT, dvc
from tests.test_kfp import IMAGE, compile_pipeline, git

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")


def mounts(executor: dict) -> dict[str, str]:
    """mount path -> the pipeline parameter naming the claim."""
    return {mount["mountPath"]: mount["pvcNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--")
            for mount in executor.get("pvcMount", [])}


def test_compiled_tasks_mount_the_volume_claims_they_need_and_nothing_else(tmp_path):
    spec, kubernetes = compile_pipeline(tmp_path)
    data, checkpoints = {DATA_ROOT: "data_pvc"}, {CHECKPOINT_ROOT: "checkpoint_pvc"}
    expected = {"exec-prepare": data, "exec-pretrain": {**data, **checkpoints}, "exec-finetune": {**data, **checkpoints},
                "exec-train-variant": {**data, **checkpoints}, "exec-evaluate": data, "exec-evaluate-2": data,
                "exec-report": {}, "exec-promote": {}}  # report and promote read no image
    assert {name: mounts(executor) for name, executor in kubernetes.items()} == expected
    # The training tasks' checkpoints go where the checkpoint volume is mounted (prepare writes the root).
    prepare = spec["root"]["dag"]["tasks"]["prepare"]["inputs"]["parameters"]
    assert prepare["checkpoint_root"]["runtimeValue"]["constant"] == CHECKPOINT_ROOT
    assert prepare["data_root"]["runtimeValue"]["constant"] == DATA_ROOT
    resources = spec["deploymentSpec"]["executors"]["exec-prepare"]["container"]["resources"]
    assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == ("4", "8G")
    git_secret = [entry for entry in kubernetes["exec-prepare"]["secretAsEnv"] if entry["secretName"] == "mulcon-git"]
    assert [(entry["optional"], [pair["envVar"] for pair in entry["keyToEnv"]]) for entry in git_secret] == [
        (True, ["MULCON_GIT_USERNAME", "MULCON_GIT_PASSWORD"])]
    assert not [name for name, executor in kubernetes.items() if name != "exec-prepare" and "mulcon-git" in
                {entry["secretName"] for entry in executor["secretAsEnv"]}]
    for executor in kubernetes.values():  # required keys required, the rest optional
        for entry in executor["secretAsEnv"]:
            keys = {pair["secretKey"] for pair in entry["keyToEnv"]}
            assert entry.get("optional", False) == (not keys & {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID",
                                                                "AWS_SECRET_ACCESS_KEY"}), entry
    # With no -p but data_revision, repo_url (and the claims) every parameter has a usable default.
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert (parameters["data_pvc"]["defaultValue"], parameters["checkpoint_pvc"]["defaultValue"]) == (
        "mulcon-data", "mulcon-checkpoints")
    unset = [name for name, parameter in parameters.items() if parameter.get("defaultValue") in ("", None)
             and parameter["parameterType"] == "STRING"]
    assert sorted(unset) == ["data_revision", "dvc_remote", "repo_url"]  # dvc_remote "": the revision's default


def prepare_locally(tmp_path: Path, run: str, dataset: str = "demo", overrides: tuple[str, ...] = (),
                    data_revision: str = "", repo_url: str = ""):
    """The prepare component (kfp.local) into the volume folders `tmp_path/data-volume` and
    `tmp_path/checkpoint-volume`: the working directory's data, or a data revision; its Dataset output."""
    from kfp import local

    from components.prepare import prepare
    from pipeline.__main__ import TINY

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    task = prepare(dataset=dataset, data_revision=data_revision, repo_url=repo_url, dvc_remote="",
                   params_file=str(ROOT / "params.yaml"),
                   overrides=[*TINY, "tracking.enabled=false", "train.device=cpu", *overrides],
                   pretrain_epochs=8, finetune_epochs=1, pipeline_run=run, data_root=str(tmp_path / "data-volume"),
                   checkpoint_root=str(tmp_path / "checkpoint-volume"))
    return task.outputs["data"]


def test_prepare_component_reads_a_folder_dataset_from_data_name(tmp_path, monkeypatch):
    from tests.owndata_sets import make_folder

    make_folder(tmp_path / "data" / "my_photos", num_images=20)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    data = prepare_locally(tmp_path, "run-f", "folder", ("data.name=my_photos",))
    [info] = (tmp_path / "data-volume" / "run-f" / "prepared").rglob("info.json")
    assert json.loads(info.read_text())["image_root"] == str(
        tmp_path / "data-volume" / "run-f" / "data" / "my_photos")
    assert data.metadata["dataset"] == "folder" and data.metadata["train"] > 0


def train_in_a_pod(data, pod: Path, model: Path) -> subprocess.Popen:
    """The pretrain component's body, as its container runs it, in a fresh working directory `pod`."""
    pod.mkdir()
    script = ("import sys; from kfp import dsl; from components.train import pretrain\n"
              f"data = dsl.Dataset(uri={data.path!r}, metadata={dict(data.metadata)!r})\n"
              f"pretrain.python_func(data=data, pipeline_run='run-1', gpus=1, model=dsl.Model(uri={str(model)!r}))\n")
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MULCON_PIPELINE_RUN": "run-1"}
    return subprocess.Popen([sys.executable, "-c", script], cwd=pod, env=environment, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_training_task_resumes_in_a_new_pod_from_the_checkpoint_volume(tmp_path, monkeypatch):
    """The first try is killed after an epoch's checkpoint; the retry runs in another working
    directory (a new container has a new file system) and resumes from that epoch."""
    from mulcon.data import make_demo

    make_demo(tmp_path / "data" / "demo", num_train=24, num_val=12, image_size=48, seed=0)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    data = prepare_locally(tmp_path, "run-1")
    checkpoint = tmp_path / "checkpoint-volume" / "run-1" / "mulcon" / "pretrain" / "checkpoint.pt"
    first = train_in_a_pod(data, tmp_path / "pod-1", tmp_path / "model-1")
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    if first.poll() is None:
        os.killpg(first.pid, signal.SIGKILL)
    output = first.communicate()[0]
    assert first.returncode == -signal.SIGKILL, f"no checkpoint at {checkpoint} before the task ended:\n" + output[-3000:]
    assert not list((tmp_path / "pod-1").rglob("checkpoint.pt"))  # nothing in the container's own file system
    retry = train_in_a_pod(data, tmp_path / "pod-2", tmp_path / "model-2")
    output = retry.communicate(timeout=600)[0]
    assert retry.returncode == 0, output[-3000:]
    assert "resuming mulcon/pretrain from epoch " in output, output[-3000:]
    resumed = int(output.split("resuming mulcon/pretrain from epoch ")[1].split()[0])
    history = json.loads((tmp_path / "model-2" / "pretrain" / "history.json").read_text())
    assert resumed >= 1 and len(history) == 8  # the epochs of the first try, then the rest


class FakeJobs:
    """The CustomObjectsApi calls of the launcher, in memory. Each job goes through `states`, one
    per get; a deleted job answers one more get before it is gone (deletion takes a while)."""

    def __init__(self, states=("Running", "Succeeded"), on_create=None):
        self.states, self.on_create = list(states), on_create
        self.jobs: dict[str, dict] = {}
        self.progress: dict[str, list] = {}
        self.calls: list[tuple[str, str]] = []
        self.deleting: dict[str, int] = {}

    def add(self, name: str, state: str) -> None:
        """A job an earlier try of the task left, now in `state`."""
        self.jobs[name], self.progress[name] = {"metadata": {"name": name}, "status": self._status(state)}, []

    @staticmethod
    def _status(state: str) -> dict:
        return {"conditions": [{"type": "Created", "status": "True"},
                               {"type": state, "status": "True", "message": f"job {state.lower()}"}]}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if name in self.jobs:
            raise ApiException(status=409, reason="Conflict")
        self.jobs[name], self.progress[name] = copy.deepcopy(body), list(self.states)
        if self.on_create:
            self.on_create(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        assert len(self.calls) < 1000, "polled without end"
        if name in self.deleting:
            self.deleting[name] -= 1
            if self.deleting[name] < 0:
                del self.deleting[name], self.jobs[name]
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        if self.progress[name] and name not in self.deleting:
            self.jobs[name]["status"] = self._status(self.progress[name].pop(0))
        return copy.deepcopy(self.jobs[name])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self.calls.append(("delete", name))
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        self.deleting[name] = 1


MANIFEST = {"metadata": {"name": "mulcon-run-1", "namespace": "team"}, "spec": {}}


class Clock:
    """A clock that `sleep` moves on: no test waits for real."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def launch(api: FakeJobs, **options) -> Clock:
    clock = Clock()
    run_pytorchjob(MANIFEST, api, poll_seconds=30, clock=clock, sleep=clock.sleep, **options)
    return clock


def test_the_launcher_creates_the_job_and_waits_for_it():
    api = FakeJobs(states=("Running", "Running", "Succeeded"))
    clock = launch(api)
    assert api.calls == [("create", "mulcon-run-1")] + [("get", "mulcon-run-1")] * 3 and clock.sleeps == [30, 30]
    api = FakeJobs(states=("Running", "Failed"))
    with pytest.raises(RuntimeError, match="^PyTorchJob mulcon-run-1 failed: job failed$"):
        launch(api)


def test_a_retry_after_a_failed_job_deletes_it_and_creates_it_again():
    api = FakeJobs(states=("Running", "Succeeded"))
    api.add("mulcon-run-1", "Failed")  # the earlier try's job
    launch(api)
    assert api.calls == [("create", "mulcon-run-1"), ("get", "mulcon-run-1"), ("delete", "mulcon-run-1"),
                         ("get", "mulcon-run-1"), ("get", "mulcon-run-1"),  # still there, then gone
                         ("create", "mulcon-run-1"), ("get", "mulcon-run-1"), ("get", "mulcon-run-1")]
    running = FakeJobs()
    running.add("mulcon-run-1", "Running")  # still running: the retry waits for it, deletes nothing
    running.progress["mulcon-run-1"] = ["Running", "Succeeded"]
    launch(running)
    assert "delete" not in {call for call, _ in running.calls}


def test_the_launcher_stops_waiting_after_its_time_limit_and_deletes_the_job():
    api = FakeJobs(states=["Running"] * 500)
    with pytest.raises(TimeoutError, match=r"^PyTorchJob mulcon-run-1 did not finish within 0.05 h \(state: "
                                           r"Running\); deleted it, a retry of this task starts it again"):
        launch(api, timeout_seconds=180)
    assert api.calls.count(("get", "mulcon-run-1")) <= 10 and ("delete", "mulcon-run-1") in api.calls


def prepared_folder(root: Path) -> Path:
    """A run's data folder as prepare leaves it on the data volume: data/, prepared/."""
    for number in range(6):
        (root / "data" / "demo" / "images" / f"{number}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / "demo" / "images" / f"{number}.jpg").write_bytes(bytes([number]) * 100)
    (root / "prepared" / "demo").mkdir(parents=True)
    (root / "prepared" / "demo" / "info.json").write_text(json.dumps({"image_root": str(root / "data" / "demo")}))
    return root


def test_staging_copies_to_a_temporary_folder_so_a_retry_never_trains_on_half_a_dataset(tmp_path, monkeypatch):
    source = prepared_folder(tmp_path / "volume" / "run-1")
    params = tmp_path / "params.yaml"
    params.write_text("data: {}\n")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    copied, real_copy = [], shutil.copyfile

    def interrupted(src, dst, **kwargs):  # the task's pod is killed after three files
        if len(copied) == 3:
            raise OSError("killed")
        copied.append(src)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", interrupted)
    with pytest.raises(OSError, match="killed"):
        stage_data(str(source), str(params), workspace)
    assert len(copied) == 3 and not (workspace / "data").exists()
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    overrides = stage_data(str(source), str(params), workspace)  # the retry
    staged = sorted(path.relative_to(workspace / "data") for path in (workspace / "data").rglob("*") if path.is_file())
    assert staged == sorted(path.relative_to(source) for path in source.rglob("*") if path.is_file())
    assert not (workspace / "data.partial").exists()
    assert json.loads((workspace / "data/prepared/demo/info.json").read_text())["image_root"] == str(
        workspace / "data" / "data" / "demo")
    assert overrides == [f"data.root={workspace / 'data' / 'data'}", f"data.prepared_root={workspace / 'data' / 'prepared'}"]


def test_train_on_nodes_stages_launches_checked_pods_and_copies_the_model_back(tmp_path):
    source = prepared_folder(tmp_path / "volume" / "run-1")
    params = tmp_path / "params.yaml"
    params.write_text("data: {}\n")
    created = []

    def job_runs(body):  # what the job's Master writes on the workspace
        created.append(body)
        (tmp_path / "workspace" / "run-1" / "model").mkdir(parents=True)
        (tmp_path / "workspace" / "run-1" / "model" / "model.pt").write_bytes(b"weights")

    api = FakeJobs(states=("Running", "Succeeded"), on_create=job_runs)
    train_on_nodes(str(source), str(params), "md5-1", str(tmp_path / "out"), pipeline_run="run-1", image=IMAGE, nodes=2,
                   gpus_per_node=4, workspace_pvc="mulcon-workspace", timeout_hours=1, api=api,
                   workspace_root=str(tmp_path / "workspace"), namespace="team", poll_seconds=0.01)
    assert (tmp_path / "out" / "model.pt").read_bytes() == b"weights"
    [job] = created
    [container] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE and job["metadata"]["namespace"] == "team"
    assert container["command"][:3] == ["python", "-m", "components.entrypoint"]  # the secret check runs first
    command = " ".join(container["command"])
    workspace = tmp_path / "workspace" / "run-1"
    assert f"--params {workspace / 'params.yaml'}" in command and f"--checkpoint-dir {workspace / 'checkpoints'}" in command
    assert {"name": "MULCON_DATA_VERSION", "value": "md5-1"} in container["env"]
    assert (workspace / "params.yaml").read_text() == "data: {}\n"


def test_a_pod_without_a_required_secret_key_fails_at_start_with_one_line():
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("MLFLOW_", "AWS_"))}
    environment.update(PYTHONPATH=str(ROOT), AWS_ACCESS_KEY_ID="id", AWS_SECRET_ACCESS_KEY="secret")
    command = [sys.executable, "-m", "components.entrypoint", sys.executable, "-c", "print('trained')"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == ["error: MLFLOW_TRACKING_URI (secret mulcon-mlflow) not set in this pod; create "
                                          "the secret with that key in the job's namespace (README, What a cluster run "
                                          "needs)"]
    result = subprocess.run(command, env={**environment, "MLFLOW_TRACKING_URI": "http://mlflow.team:5000"},
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "trained\n")


class PrivateGit(BaseHTTPRequestHandler):
    """`git http-backend` over HTTP behind basic authentication: the only credential it takes is
    `user`:`password`; records the Authorization header of each request."""

    root: Path
    user, password = "mulcon-bot", "s3cret-token-42"
    seen: list = []

    def _serve(self) -> None:
        authorization = self.headers.get("Authorization", "")
        self.seen.append(authorization)
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if authorization != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        environment = {**os.environ, "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
                       "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": self.user,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                       "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                       "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}
        answer = subprocess.run(["git", "http-backend"], input=body, env=environment, capture_output=True).stdout
        head, _, content = answer.partition(b"\r\n\r\n")
        headers = [line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line]
        status = next((int(value.split()[0]) for name, value in headers if name.lower() == "status"), 200)
        self.send_response(status)
        for name, value in headers:
            if name.lower() != "status":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = _serve

    def log_message(self, *args):
        pass


@pytest.fixture
def private_repo(tmp_path):
    """A repository with DVC-tracked demo data (tag v1, a local DVC remote), served behind basic auth."""
    from mulcon.data import make_demo

    repo, environment = tmp_path / "repo", {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, environment, "init", "-q")
    dvc(repo, environment, "remote", "add", "-d", "store", str(tmp_path / "dvc-store"))
    make_demo(repo / "data" / "demo", num_train=10, num_val=4, image_size=32, seed=1)
    dvc(repo, environment, "add", "-q", "data")
    dvc(repo, environment, "push", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    git(repo, "tag", "v1")
    served = tmp_path / "served"
    served.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(served / "mulcon.git")], check=True)
    PrivateGit.root, PrivateGit.seen = served, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), PrivateGit)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mulcon.git", repo
    server.shutdown()
    server.server_close()


def test_a_private_repository_is_fetched_with_the_mulcon_git_secret_never_in_a_url_or_log(
        private_repo, tmp_path, monkeypatch, capfd):
    """The prepare component, as its pod runs it with the mulcon-git keys in its environment."""
    from components.gitauth import git_credentials

    url, repo = private_repo
    monkeypatch.delenv("GIT_ASKPASS", raising=False)
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")
    monkeypatch.setenv("HOME", str(tmp_path))  # no credential helper of this machine's user
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="prepare"):  # no secret: the server refuses
        prepare_locally(tmp_path, "refused", data_revision="v1", repo_url=url)
    assert PrivateGit.seen and set(PrivateGit.seen) == {""}  # asked without credentials, refused
    monkeypatch.setenv("MULCON_GIT_USERNAME", PrivateGit.user)
    monkeypatch.setenv("MULCON_GIT_PASSWORD", PrivateGit.password)
    data = prepare_locally(tmp_path, "granted", data_revision="v1", repo_url=url)
    assert data.metadata["data_version"] == yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    fetched = tmp_path / "data-volume" / "granted" / "data" / "demo" / "train2014"
    assert sorted(path.name for path in fetched.iterdir()) == sorted(
        path.name for path in (repo / "data" / "demo" / "train2014").iterdir())
    granted = "Basic " + base64.b64encode(f"{PrivateGit.user}:{PrivateGit.password}".encode()).decode()
    assert granted in PrivateGit.seen
    with git_credentials():  # git itself takes the same way
        listed = subprocess.run(["git", "ls-remote", url, "v1"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "refs/tags/v1" in listed.stdout, listed.stderr
        assert PrivateGit.password not in Path(os.environ["GIT_ASKPASS"]).read_text()
    assert "GIT_ASKPASS" not in os.environ
    out, err = capfd.readouterr()
    assert PrivateGit.password not in out + err  # the task's log
    written = [path for path in (tmp_path / "kfp").rglob("*") if path.is_file()]  # parameters, outputs, metadata
    assert written and not [path for path in written if PrivateGit.password.encode() in path.read_bytes()]


def test_a_failed_fetch_never_shows_the_repository_password(tmp_path):
    from components.data import fetch_dataset

    with pytest.raises(RuntimeError) as raised:
        fetch_dataset("data/demo", tmp_path / "out", repo_url="https://alice:s3cret-pw@127.0.0.1:9/team/mulcon.git",
                      revision="v1")
    assert "s3cret-pw" not in str(raised.value) and "alice:***@127.0.0.1" in str(raised.value)
