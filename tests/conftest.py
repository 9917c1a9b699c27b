"""Shared fixtures: a tiny demo dataset, prepared once per session, and tiny training params."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from mulcon.config import TINY as TINY_TRAINING, TINY_DEMO

ROOT = Path(__file__).resolve().parents[1]

# The real params.yaml, shrunk: the smallest backbone at 32 px, a few images, one epoch per step.
TINY = [*TINY_TRAINING, "train.device=cpu", "tracking.enabled=false"]


# The slowest tests (minutes each: whole pipelines), collected first, so that `make test`'s two workers
# share them from the start instead of one worker finishing the last of them alone.
SLOWEST_FIRST = (
    "tests/test_pipeline.py::test_dvc_repro_runs_the_pipeline_into_mlflow",
    "tests/test_containers.py::test_the_tiny_pipeline_runs_in_the_project_image_into_mlflow",
    "tests/test_kfp.py::test_run_local_runs_the_whole_pipeline_into_mlflow",
    "tests/test_retrain.py::",
    "tests/test_tracking.py::test_a_tracking_outage_loses_no_epoch",
    "tests/test_tracking.py::test_training_against_a_real_mlflow_server",
)


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        return next((index for index, prefix in enumerate(SLOWEST_FIRST) if item.nodeid.startswith(prefix)),
                    len(SLOWEST_FIRST))
    items.sort(key=rank)  # stable: every other test keeps its place


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared tiny demo set: <root>/data/demo (raw) and <root>/prepared/demo."""
    from mulcon.data import make_demo, prepare

    root = tmp_path_factory.mktemp("tiny")
    make_demo(root / "data" / "demo", num_train=24, num_val=12, image_size=48, seed=1)
    prepare("demo", root / "data" / "demo", root / "prepared" / "demo", val_fraction=0.2, seed=0)
    return root


@pytest.fixture
def tiny_params(tiny_data, tmp_path) -> Path:
    """A params.yaml: the repo's, with the tiny settings and paths into `tiny_data` and `tmp_path`."""
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in TINY:
        key, value = override.split("=")
        section, name = key.split(".")
        values[section][name] = yaml.safe_load(value)
    values["data"]["root"] = str(tiny_data / "data")
    values["data"]["prepared_root"] = str(tiny_data / "prepared")
    values["train"]["out_root"] = str(tmp_path / "runs")
    values["train"]["checkpoint_root"] = str(tmp_path / "checkpoints")
    values["evaluate"]["out_root"] = str(tmp_path / "reports")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _forget_mlflow_tracking_uri():
    """`mulcon.mlflow_client.connect` sets MLflow's process-wide tracking URI; a test's server is gone
    after it, so the next test starts from $MLFLOW_TRACKING_URI again, as a new process would."""
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None  # MLflow's own unset: no public call takes a URI back


def reference_map(config, model_file: Path, split: str = "test") -> float:
    """The model's mAP (percent) on `split`, by scikit-learn: the mean over labels with a positive
    of average_precision_score on the pairs not ignored. The reference the metric tests compare with."""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score

    from mulcon.inference import eval_loader, load_model, predict_scores

    model, _ = load_model(model_file)
    scores, targets = predict_scores(model, eval_loader(config, split, 64), torch.device("cpu"), "fp32")
    values = []
    for label in range(targets.shape[1]):
        kept = targets[:, label] >= 0
        if (targets[kept, label] == 1).any():
            values.append(average_precision_score(targets[kept, label] == 1, scores[kept, label]))
    return 100 * float(np.mean(values))


def _tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()]


def make_repo(tmp_path: Path, overrides: list[str]) -> tuple[Path, dict[str, str]]:
    """A git repository holding this project's files, with the tiny params and a demo dataset."""
    repo = tmp_path / "repo"
    for name in _tracked_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    values = yaml.safe_load((repo / "params.yaml").read_text())
    for override in [*TINY, "tracking.enabled=true", *TINY_DEMO, *overrides]:
        key, value = override.split("=")
        section, name = key.split(".")
        values[section][name] = yaml.safe_load(value)
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo),
                   "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "GIT_AUTHOR_NAME": "test",
                   "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
                   "GIT_COMMITTER_EMAIL": "test@example.com", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"],
                    [sys.executable, "-m", "mulcon", "make-demo"], ["dvc", "add", "-q", "data"]):
        subprocess.run(command, cwd=repo, env=environment, check=True, capture_output=True)
    return repo, environment


def dvc(repo: Path, environment: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], cwd=repo, env=environment, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3-compatible server on 127.0.0.1, stopped after the session; yields its endpoint URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENVIRONMENT})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(endpoint, process)
        yield endpoint
    finally:
        stop(process)
        log.close()


@pytest.fixture
def s3_environment(s3_server, monkeypatch) -> dict[str, str]:
    for key, value in S3_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    return {**S3_ENVIRONMENT, "MLFLOW_S3_ENDPOINT_URL": s3_server}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENVIRONMENT.items()
                                                 if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1").create_bucket(Bucket=name)


@contextlib.contextmanager
def run_mlflow_server(backend: str, artifacts: str, log_path: Path, s3_endpoint: str, workers: int = 1) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1 with its store at `backend` and its artifacts at
    `artifacts` on the S3 server `s3_endpoint`; yields its URI and stops it after."""
    port = free_port()
    environment = {**os.environ, **S3_ENVIRONMENT, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT, env=environment)
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{uri}/health", process, seconds=120)
            yield uri
        finally:
            stop(process)


@pytest.fixture
def postgres_mlflow_server(tmp_path_factory, s3_server):
    """MLflow as teams run it: `mlflow server` on 127.0.0.1 with its store in a fresh PostgreSQL
    database (127.0.0.1:5432, created for the test and dropped after) and its artifacts in a fresh
    bucket of moto's S3 server."""
    import uuid

    import psycopg

    database = f"mulcon_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    make_bucket(s3_server, database.replace("_", "-"))
    try:
        with run_mlflow_server(f"postgresql://postgres@127.0.0.1:5432/{database}", f"s3://{database.replace('_', '-')}/artifacts",
                           tmp_path_factory.mktemp("mlflow-postgres") / "server.log", s3_server, workers=2) as uri:
            yield uri
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()


def check_pipeline_run(uri: str) -> tuple[list, list]:
    """What one run of the tiny Kubeflow pipeline leaves in the MLflow store at `uri`: one ablation parent
    run with a nested run per Table 3 variant, all of one pipeline run, each with test metrics and a
    registered model version; the report on the parent; the MulCon model promoted (champion and
    challenger), a version of mulcon-demo per variant. Returns (every run of mulcon-demo, the nested runs)."""
    import mlflow

    from mulcon.config import VARIANTS

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mulcon-demo").experiment_id])
    [parent] = [run for run in runs if run.data.tags["mulcon.kind"] == "ablation"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["variant"] for run in children) == sorted(VARIANTS)
    assert len({run.data.tags["pipeline_run"] for run in runs}) == 1
    assert all("test_mAP" in run.data.metrics and "model_version" in run.data.tags for run in children)
    assert {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "report")} >= {"report/ablation.md"}
    [mulcon] = [run for run in children if run.data.tags["variant"] == "mulcon"]
    assert mulcon.data.tags["promotion.decision"] == "promoted"  # the first model of mulcon-demo
    for alias in ("champion", "challenger"):
        assert client.get_model_version_by_alias("mulcon-demo", alias).run_id == mulcon.info.run_id
    assert len(client.search_model_versions("name='mulcon-demo'")) == len(VARIANTS)
    return runs, children
