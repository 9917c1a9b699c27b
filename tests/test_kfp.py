"""The Kubeflow pipeline: the compiled YAML (GPUs, resources, secrets, retries, no caching of
training, the ParallelFor), the multi-node PyTorchJob, submit and schedule against a stand-in for
the Kubeflow Pipelines API, the prepare component fetching a data revision through DVC from S3,
and the whole pipeline run by the KFP local runner, shrunk, into MLflow."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from components.pytorchjob import pytorchjob_manifest
from tests.conftest import ROOT, check_pipeline_run, make_bucket

# The local runner warns that the project image is not a "python" image: it runs this interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
IMAGE = "registry.example/mulcon:test"
TRAINING = ("exec-pretrain", "exec-finetune", "exec-train-variant")
DATA = ["-p", "data_revision=v1", "-p", "repo_url=https://git.example/team/mulcon.git"]  # what a cluster run needs


def compile_pipeline(tmp_path, *extra: str) -> tuple[dict, dict]:
    output = tmp_path / "pipeline.yaml"
    result = subprocess.run([sys.executable, "-m", "pipeline", "compile", "-o", str(output), "--image", IMAGE, *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    spec, platform = yaml.safe_load_all(output.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_training_tasks_request_gpus_and_get_secrets(tmp_path):
    spec, kubernetes = compile_pipeline(tmp_path)
    executors, tasks = spec["deploymentSpec"]["executors"], spec["root"]["dag"]["tasks"]
    for name in TRAINING:
        resources = executors[name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
        assert (resources["resourceCpuRequest"], resources["resourceMemoryLimit"]) == ("8", "64G")
        assert kubernetes[name]["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"}]
    for name, executor in executors.items():
        assert executor["container"]["image"] == IMAGE
        assert "pip install" not in " ".join(executor["container"]["command"])  # kfp and mulcon are in the image
        secrets = {(entry["secretName"], pair["envVar"]) for entry in kubernetes[name]["secretAsEnv"]
                   for pair in entry["keyToEnv"]}
        assert {("mulcon-s3", "AWS_SECRET_ACCESS_KEY"), ("mulcon-mlflow", "MLFLOW_TRACKING_URI")} <= secrets, name
    for name in ("pretrain", "finetune"):
        assert not tasks[name]["cachingOptions"].get("enableCache") and tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    loop = tasks["for-loop-2"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [
        "backbone_bce", "backbone_bce_scl", "mulcon_bce", "mulcon_no_pretrain", "mulcon_step2_bce"]
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"dataset", "pretrain_epochs", "finetune_epochs", "gpus", "data_revision"} <= set(parameters)
    assert not [name for name in parameters if any(word in name for word in ("secret", "token", "password", "key"))]


def compiled_inputs(**options) -> dict:
    from google.protobuf import json_format

    from pipeline.pipeline import build_pipeline

    spec = json_format.MessageToDict(build_pipeline(IMAGE, **options).pipeline_spec)
    return spec["root"]["inputDefinitions"]["parameters"]


def test_pipeline_defaults_are_those_of_params_yaml_in_both_pipelines(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    expected = {"dataset": params["data"]["dataset"], "pretrain_epochs": params["train"]["pretrain_epochs"],
                "finetune_epochs": params["train"]["finetune_epochs"]}
    single, multi = compiled_inputs(), compiled_inputs(multinode=True)
    for inputs in (single, multi):
        assert {name: inputs[name]["defaultValue"] for name in expected} == expected
    assert set(multi) - set(single) == {"nodes", "workspace_pvc", "job_timeout_hours"} and set(single) < set(multi)
    assert {name: single[name] for name in single} == {name: multi[name] for name in single}
    params["data"]["dataset"], params["train"]["pretrain_epochs"], params["train"]["finetune_epochs"] = "coco2014", 7, 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    other = compiled_inputs(params=tmp_path / "params.yaml")
    assert [other[name]["defaultValue"] for name in expected] == ["coco2014", 7, 2]


def test_multinode_pipeline_launches_a_pytorchjob(tmp_path):
    spec, kubernetes = compile_pipeline(tmp_path, "--multinode")
    assert {"nodes", "workspace_pvc"} <= set(spec["root"]["inputDefinitions"]["parameters"])
    assert "train-multinode" in spec["root"]["dag"]["tasks"] and "pretrain" not in spec["root"]["dag"]["tasks"]
    assert {mount["mountPath"] for mount in kubernetes["exec-train-multinode"]["pvcMount"]} == {"/workspace", "/mnt/data"}
    command = ["python", "-m", "torch.distributed.run", "--nproc_per_node=8", "-m", "mulcon", "train"]
    job = pytorchjob_manifest("mulcon-run", "team", IMAGE, 3, 8, command, "mulcon-workspace", {"MULCON_PIPELINE_RUN": "r"})
    assert (job["apiVersion"], job["kind"], job["spec"]["nprocPerNode"]) == ("kubeflow.org/v1", "PyTorchJob", "8")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    [container] = replicas["Worker"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch" and container["command"] == command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "MULCON_PIPELINE_RUN", "value": "r"} in container["env"]
    # A required key is required in the pods too: a pod whose secret lacks it does not start.
    assert {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {
        "name": "mulcon-mlflow", "key": "MLFLOW_TRACKING_URI", "optional": False}}} in container["env"]
    assert {"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "mulcon-mlflow", "key": "MLFLOW_TRACKING_TOKEN", "optional": True}}} in container["env"]


class KubeflowApi(BaseHTTPRequestHandler):
    """Answers the few Kubeflow Pipelines v2beta1 calls that submit and schedule make; records them.

    `token`: the only bearer token it takes (None: any, or none); `errors`: path -> (status, body)
    it answers instead; `slow`: path -> seconds it waits before answering; a second recurring run of
    one name gets the API's error answer.
    """

    requests: list = []
    token: str | None = None
    errors: dict = {}
    slow: dict = {}
    recurring_names: set = set()

    def _answer(self, body, status: int = 200) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self, path: str) -> bool:
        """Answer an error instead when the token is not the one it takes or the path is in `errors`."""
        time.sleep(self.slow.get(path, 0))
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            self._answer({"error": "Unauthorized", "code": 16, "message": "Unauthorized"}, 401)
        elif path in self.errors:
            self._answer(*reversed(self.errors[path]))
        else:
            return False
        return True

    def do_GET(self):
        path = self.path.split("?")[0]
        self.requests.append(("GET", path, self.headers.get("Authorization"), None))
        if not self._refused(path):
            self._answer({"multi_user": False} if "healthz" in path else {"experiments": []})

    def do_POST(self):
        path = self.path.split("?")[0]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.requests.append(("POST", path, self.headers.get("Authorization"), body))
        if self._refused(path):
            return
        if path == "/apis/v2beta1/recurringruns":
            if body["display_name"] in self.recurring_names:
                return self._answer({"error": "already exists", "code": 6, "message": "Failed to create a recurring "
                                     f"run: a recurring run named '{body['display_name']}' already exists"}, 409)
            self.recurring_names.add(body["display_name"])
        answers = {"/apis/v2beta1/experiments": {"experiment_id": "experiment-1", "display_name": "mulcon"},
                   "/apis/v2beta1/runs": {"run_id": "run-1"},
                   "/apis/v2beta1/recurringruns": {"recurring_run_id": "recurring-1"}}
        self._answer(answers[path])

    def log_message(self, *args):
        pass


@pytest.fixture
def kubeflow_api():
    KubeflowApi.requests, KubeflowApi.token, KubeflowApi.recurring_names = [], None, set()
    KubeflowApi.errors, KubeflowApi.slow = {}, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), KubeflowApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", KubeflowApi.requests
    server.shutdown()
    server.server_close()


def fails(capsys, *argv: str) -> str:
    """The one error line of `python -m pipeline *argv`, which must exit 2 without a traceback."""
    from pipeline.__main__ import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_submit_and_schedule_send_the_pipeline_with_the_token_from_the_environment(kubeflow_api, monkeypatch, capsys):
    from pipeline.__main__ import main

    host, requests = kubeflow_api
    monkeypatch.setenv("KFP_TOKEN", "token-from-env")
    monkeypatch.setenv("MULCON_IMAGE", IMAGE)
    KubeflowApi.token = "token-from-env"
    repo = "-p", "repo_url=https://git.example/team/mulcon.git"
    assert main(["submit", "--host", host, "-p", "data_revision=1.10", *repo, "-p", "gpus=4"]) == 0
    [run] = [body for method, path, _, body in requests if path == "/apis/v2beta1/runs"]
    assert run["runtime_config"]["parameters"] == {"data_revision": "1.10", "gpus": 4,  # a string stays as written
                                                   "repo_url": "https://git.example/team/mulcon.git"}
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "mulcon"
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-pretrain"]["secretAsEnv"][0]["secretName"] == "mulcon-s3"
    assert {executor["container"]["image"] for executor in run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"][
        "executors"].values()} == {IMAGE}  # from $MULCON_IMAGE
    assert main(["schedule", "--host", host, "--cron", "0 0 3 * * *", "-p", "dataset=coco2014", *DATA]) == 0
    [recurring] = [body for method, path, _, body in requests if path == "/apis/v2beta1/recurringruns"]
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert recurring["display_name"] == "mulcon-retraining" and int(recurring["max_concurrency"]) == 1
    assert recurring["runtime_config"]["parameters"] == {"dataset": "coco2014", "data_revision": "v1",
                                                         "repo_url": "https://git.example/team/mulcon.git"}
    assert recurring["experiment_id"] == "experiment-1"
    assert {authorization for _, _, authorization, _ in requests} == {"Bearer token-from-env"}
    assert "recurring run recurring-1 (0 0 3 * * *)" in capsys.readouterr().out
    # The API's own error answers, on one line each.
    error = fails(capsys, "schedule", "--host", host, "--cron", "0 0 3 * * *", *DATA)
    assert error == (f"error: the Kubeflow Pipelines API at {host} answered 409 Conflict: Failed to create a "
                     "recurring run: a recurring run named 'mulcon-retraining' already exists")
    KubeflowApi.errors = {"/apis/v2beta1/runs": (404, {"code": 5, "message": "Failed to create a run: experiment "
                                                                               "experiment-1 not found"})}
    assert fails(capsys, "submit", "--host", host, "--experiment", "gone", *DATA).endswith(
        "answered 404 Not Found: Failed to create a run: experiment experiment-1 not found")


def test_mistakes_are_one_line_found_before_anything_is_sent(kubeflow_api, tmp_path, monkeypatch, capsys):
    host, requests = kubeflow_api
    monkeypatch.delenv("MULCON_IMAGE", raising=False)
    package = tmp_path / "pipeline.yaml"
    assert fails(capsys, "compile", "-o", "/nonexistent/dir/p.yaml") == (
        "error: --output /nonexistent/dir/p.yaml: the folder /nonexistent/dir does not exist; create it or write elsewhere")
    (tmp_path / "file").write_text("")
    assert fails(capsys, "compile", "-o", str(tmp_path / "file" / "p.yaml")).endswith(
        f"the folder {tmp_path / 'file'} is a file, not a folder; create it or write elsewhere")
    assert "is a folder; give a file name" in fails(capsys, "compile", "-o", str(tmp_path))
    assert "must end in .yaml or .yml" in fails(capsys, "compile", "-o", str(tmp_path / "p.json"))
    # No image, no pipeline: no default names an image that nothing builds.
    for command in (["compile", "-o", str(package)], ["submit", "--host", host, *DATA],
                    ["schedule", "--host", host, "--cron", "0 0 3 * * *", *DATA]):
        assert fails(capsys, *command) == (
            "error: give --image (or set MULCON_IMAGE): the project image the cluster pulls, as `make image` tags it "
            "and you push it, e.g. --image registry.example/mulcon:3f2a1c9")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]  # nothing written
    monkeypatch.setenv("MULCON_IMAGE", IMAGE)
    error = fails(capsys, "submit", "--host", host, "-p", "nosuch=1")  # the pipeline compiled now, then checked
    assert error.startswith("error: -p nosuch=1: the pipeline has no parameter 'nosuch'; its parameters: ")
    assert {"dataset", "data_revision", "gpus", "pretrain_epochs", "overrides"} <= set(error.split(": ")[-1].split(", "))
    assert main_ok(["compile", "-o", str(package)])
    given = ["submit", "--host", host, "--package", str(package)]
    # The image holds no data: a cluster run names a data version (run-local uses the working directory's).
    assert fails(capsys, *given, "-p", "repo_url=https://git.example/team/mulcon.git") == (
        "error: -p data_revision: a cluster run needs a git revision (tag, commit, branch) of repo_url whose data.dvc "
        "names the data, e.g. -p data_revision=v1.2 (the image holds no data; run-local uses the working directory's)")
    assert fails(capsys, "schedule", "--host", host, "--package", str(package), "--cron", "0 0 3 * * *",
                 "-p", "data_revision=v1", "-p", "repo_url= ").startswith(
        "error: -p repo_url: a cluster run needs this repository as the cluster can clone it, e.g. ")
    assert fails(capsys, *given, "--image", "other:1", *DATA).startswith(
        "error: --image other:1 with --package: the package names its image already; ")
    assert fails(capsys, *given, "-p", "gpus=two") == "error: -p gpus=two: gpus takes an integer, e.g. -p gpus=4"
    assert fails(capsys, *given, "-p", "promote_margin=half").endswith("promote_margin takes a number, e.g. "
                                                                        "-p promote_margin=0.5")
    assert fails(capsys, *given, "-p", "overrides=train.seed=1").endswith("overrides takes a list, e.g. "
                                                                         "-p overrides=[train.seed=1]")
    assert fails(capsys, *given, "-p", "dataset=coco").endswith("dataset is one of demo, coco2014, nuswide, voc2007, folder")
    assert "add --multinode" in fails(capsys, *given, "-p", "nodes=3")
    assert fails(capsys, *given, "-p", "gpus") == "error: -p 'gpus': a pipeline argument is NAME=VALUE, e.g. -p gpus=4"
    assert fails(capsys, "submit", "--host", host, "--package", "/nonexistent.yaml").startswith(
        "error: --package /nonexistent.yaml: no such file; ")
    assert "not a compiled Kubeflow pipeline" in fails(capsys, "submit", "--host", host, "--package",
                                                       str(ROOT / "params.yaml"))
    (tmp_path / "broken.yaml").write_text("pipelineInfo: [\n")
    assert "not YAML" in fails(capsys, "submit", "--host", host, "--package", str(tmp_path / "broken.yaml"))
    (tmp_path / "wrong.yaml").write_text("pipelineInfo: {name: x}\nroot: {}\nnosuchfield: 1\n")
    assert "not a valid Kubeflow pipeline spec" in fails(capsys, "submit", "--host", host, "--package",
                                                         str(tmp_path / "wrong.yaml"))
    assert "not an http(s) URL" in fails(capsys, "submit", "--host", host.removeprefix("http://"), "--package",
                                         str(package))
    assert "Kubeflow wants 6 fields" in fails(capsys, "schedule", "--host", host, "--cron", "every monday")
    assert requests == []


def main_ok(argv: list[str]) -> bool:
    from pipeline.__main__ import main

    return main(argv) == 0


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once it is closed


def test_unreachable_refusing_and_unauthorized_endpoints_name_the_host_within_10_seconds(kubeflow_api, tmp_path,
                                                                                          monkeypatch, capsys):
    host, requests = kubeflow_api
    package = tmp_path / "pipeline.yaml"
    assert main_ok(["compile", "-o", str(package), "--image", IMAGE])
    capsys.readouterr()

    def timed(*argv: str) -> str:
        start = time.monotonic()
        error = fails(capsys, *argv, "--package", str(package), *DATA)
        assert time.monotonic() - start < 10, argv
        return error

    closed = f"http://127.0.0.1:{closed_port()}"
    for command in (["submit"], ["schedule", "--cron", "0 0 3 * * 1"]):
        assert timed(*command, "--host", closed).startswith(
            f"error: cannot reach the Kubeflow Pipelines API at {closed}: connection refused; start it")
    with socket.socket() as silent:  # takes connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        quiet = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert timed("submit", "--host", quiet).startswith(
            f"error: no answer from the Kubeflow Pipelines API at {quiet} within 5 s; ")
    tls = host.replace("http://", "https://")
    assert timed("submit", "--host", tls).startswith(f"error: TLS failure talking to {tls} (")
    KubeflowApi.token = "the-right-token"
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    assert timed("submit", "--host", host) == (
        f"error: the Kubeflow Pipelines API at {host} answered 401 Unauthorized; $KFP_TOKEN is not set: set KFP_TOKEN "
        "to a bearer token with access to the namespace (--token-env names another variable)")
    monkeypatch.setenv("MY_TOKEN", "a-wrong-token")
    assert "the token in $MY_TOKEN was refused: set MY_TOKEN" in timed("submit", "--host", host, "--token-env", "MY_TOKEN")
    KubeflowApi.token, KubeflowApi.errors = None, {"/apis/v2beta1/healthz": (403, "RBAC: access denied")}
    assert timed("submit", "--host", host).startswith(
        f"error: the Kubeflow Pipelines API at {host} answered 403 Forbidden: RBAC: access denied; $KFP_TOKEN")
    KubeflowApi.errors = {"/apis/v2beta1/healthz": (200, "<html>Log in</html>")}
    assert "did not answer as the Kubeflow Pipelines API (a login page?)" in timed("submit", "--host", host)
    KubeflowApi.errors = {"/apis/v2beta1/healthz": (404, "")}
    assert timed("submit", "--host", host) == (f"error: {host}/apis/v2beta1/healthz answered 404 Not Found: not a "
                                               "Kubeflow Pipelines v2 API; check --host or KF_PIPELINES_ENDPOINT")
    assert [path for _, path, _, _ in requests] == ["/apis/v2beta1/healthz"] * 5  # nothing else was sent
    KubeflowApi.errors, KubeflowApi.slow = {}, {"/apis/v2beta1/runs": 3}  # up, then silent on the run itself
    assert timed("submit", "--host", host, "--timeout", "1").startswith(
        f"error: no answer from the Kubeflow Pipelines API at {host} within 1 s; ")


def test_the_command_exits_2_with_one_line_on_a_closed_port():
    closed = f"http://127.0.0.1:{closed_port()}"
    result = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--host", closed, "--image", IMAGE, *DATA,
                             "-p", "gpus=2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"error: cannot reach the Kubeflow Pipelines API at {closed}")
    assert "Traceback" not in result.stderr


def git(repo, *args):
    environment = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                   "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    subprocess.run(["git", *args], cwd=repo, env=environment, check=True, capture_output=True)


def test_prepare_component_fetches_the_data_of_a_revision_through_dvc_from_s3(s3_server, s3_environment, tmp_path,
                                                                             monkeypatch):
    from kfp import local

    from components.prepare import prepare
    from mulcon.data import make_demo
    from tests.conftest import BIN, dvc

    make_bucket(s3_server, "dvc-versions")
    repo, environment = tmp_path / "repo", {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, environment, "init", "-q")
    dvc(repo, environment, "remote", "add", "-d", "s3", "s3://dvc-versions/store")
    dvc(repo, environment, "remote", "modify", "s3", "endpointurl", s3_server)
    for version, seed in (("v1", 1), ("v2", 2)):  # v2 replaces the images and labels of v1
        shutil.rmtree(repo / "data", ignore_errors=True)
        make_demo(repo / "data" / "demo", num_train=10, num_val=4, image_size=32, seed=seed)
        if version == "v1":
            shutil.copytree(repo / "data" / "demo", tmp_path / "v1")
        dvc(repo, environment, "add", "-q", "data")
        dvc(repo, environment, "push", "-q")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", version)
        git(repo, "tag", version)
    shutil.rmtree(repo / ".dvc" / "cache")  # the data can only come from the S3 remote
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    volume = tmp_path / "volume"  # the data volume
    task = prepare(dataset="demo", data_revision="v1", repo_url=str(repo), dvc_remote="", params_file=str(ROOT / "params.yaml"),
                   overrides=["data.val_fraction=0.2"], pretrain_epochs=1, finetune_epochs=1, pipeline_run="run-1",
                   data_root=str(volume), checkpoint_root="/mnt/checkpoints")
    data = task.outputs["data"]
    raw = volume / "run-1" / "data" / "demo"
    fetched = sorted(path.relative_to(raw) for path in raw.rglob("*"))
    assert fetched == sorted(path.relative_to(tmp_path / "v1") for path in (tmp_path / "v1").rglob("*"))
    assert (raw / "annotations/instances_train2014.json").read_bytes() == (
        tmp_path / "v1/annotations/instances_train2014.json").read_bytes()
    v1_md5 = yaml.safe_load(subprocess.run(["git", "show", "v1:data.dvc"], cwd=repo, capture_output=True,
                                           text=True, check=True).stdout)["outs"][0]["md5"]
    assert data.metadata["data_version"] == v1_md5 and data.metadata["revision"] == "v1"
    assert data.metadata["data_dir"] == str(volume / "run-1")
    params = yaml.safe_load(open(os.path.join(data.path, "params.yaml")))
    assert params["data"]["prepared_root"] == str(volume / "run-1" / "prepared")
    assert params["train"]["checkpoint_root"] == "/mnt/checkpoints"
    assert (params["train"]["pretrain_epochs"], params["data"]["val_fraction"]) == (1, 0.2)
    assert (volume / "run-1" / "prepared" / "demo" / "train.csv").exists()
    assert sorted(os.listdir(data.path)) == ["params.yaml"]  # what every later task downloads: no image, no cache
    assert sorted(os.listdir(volume / "run-1")) == ["data", "prepared"]  # DVC's clone went, on the volume


def test_run_local_runs_the_whole_pipeline_into_mlflow(tmp_path, postgres_mlflow_server):
    """The KFP local runner, ablation parallelism 4, against an MLflow server on PostgreSQL and S3."""
    uri = postgres_mlflow_server
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run([sys.executable, "-m", "pipeline", "run-local", "--tiny", "--parallelism", "4",
                             "--params", str(ROOT / "params.yaml"),
                             "-S", "train.device=cpu", "-S", "tracking.system_metrics=false"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| MulCon without pretraining |" in result.stdout and "| MulCon |" in result.stdout
    assert len(list((tmp_path / "data" / "demo" / "train2014").glob("*.jpg"))) == 26  # generated: 24 + 2 unannotated
    [root] = (tmp_path / "kfp-local").glob("mulcon-*")
    assert (root / "report" / "tables" / "ablation.csv").exists()

    check_pipeline_run(uri)
