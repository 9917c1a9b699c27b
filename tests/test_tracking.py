"""MLflow against a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts on moto's S3
server), a tracking server that is down, and DVC pushing to and pulling from the S3 server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mulcon import checkpoint
from mulcon.inference import eval_loader, load_model
from mulcon.config import load_config
from tests.conftest import ROOT, dvc, free_port, make_bucket, make_repo, run_mlflow_server


@pytest.fixture
def mlflow_server(tmp_path, s3_server, s3_environment):
    make_bucket(s3_server, "mlflow-artifacts")
    with run_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", "s3://mlflow-artifacts/runs",
                           tmp_path / "mlflow-server.log", s3_server) as uri:
        yield uri


def run_cli(*args, cwd, uri):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri,
                   "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    return subprocess.run([sys.executable, "-m", "mulcon", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=600)


def test_training_against_a_real_mlflow_server(mlflow_server, tiny_params, tmp_path):
    import mlflow

    overrides = ["-S", "tracking.enabled=true", "-S", "train.variant=mulcon_bce", "-S", "train.pretrain_epochs=2"]
    for verb in ("train", "evaluate"):
        result = run_cli(verb, "--params", str(tiny_params), *overrides, cwd=tmp_path, uri=mlflow_server)
        assert result.returncode == 0, result.stderr
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("mulcon-demo")
    [run] = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mulcon.kind") == "variant"]
    assert run.data.params["train.variant"] == "mulcon_bce" and run.data.params["loss.temperature"] == "0.2"
    history = client.get_metric_history(run.info.run_id, "loss_total")
    assert [metric.step for metric in history] == [1, 2, 3]  # 3 = 2 + 1 epochs of the budget
    assert len(client.get_metric_history(run.info.run_id, "val_mAP")) == 3
    assert any(name.startswith("system/") for name in run.data.metrics)
    assert "test_mAP" in run.data.metrics
    [version] = client.search_model_versions("name='mulcon-demo'")
    assert version.run_id == run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")}
    assert "evaluation/test/pr_curve.png" in artifacts

    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pytorch.load_model(f"models:/mulcon-demo/{version.version}")
    network, state = load_model(tmp_path / "runs" / "mulcon_bce" / "model.pt")
    images, _ = next(iter(eval_loader(load_config(tiny_params), "test", 8)))
    with torch.no_grad():
        expected = torch.sigmoid(network(images).logits)
        assert torch.allclose(served(images), expected, atol=1e-6)
    assert served.classes == state["classes"]


def test_unreachable_tracking_server_fails_within_seconds(tiny_params, tmp_path):
    started = time.monotonic()
    result = run_cli("train", "--params", str(tiny_params), "-S", "tracking.enabled=true", cwd=tmp_path,
                     uri=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "is unreachable" in result.stderr and "unset MLFLOW_TRACKING_URI" in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists()


def test_dvc_pushes_and_pulls_data_and_outputs_through_s3(s3_server, s3_environment, tmp_path):
    make_bucket(s3_server, "dvc-store")
    repo, environment = make_repo(tmp_path, ["tracking.enabled=false"])
    environment.update(s3_environment)
    dvc(repo, environment, "remote", "add", "-d", "s3", "s3://dvc-store/mulcon")
    dvc(repo, environment, "remote", "modify", "s3", "endpointurl", s3_server)
    dvc(repo, environment, "repro", "prepare")
    dvc(repo, environment, "push", "data.dvc", "prepare")
    manifest = (repo / "prepared" / "demo" / "train.csv").read_text()
    for path in (repo / "data", repo / "prepared", repo / ".dvc" / "cache"):
        shutil.rmtree(path)
    dvc(repo, environment, "pull", "data.dvc", "prepare")
    assert (repo / "prepared" / "demo" / "train.csv").read_text() == manifest
    assert len(list((repo / "data" / "demo" / "train2014").glob("*.jpg"))) == 26  # 24 + 2 unannotated
    assert "up to date" in dvc(repo, environment, "status", "prepare").stdout
