"""MLflow against a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts on moto's S3
server), a tracking server that is down, and DVC pushing to and pulling from the S3 server."""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mulcon import checkpoint
from mulcon.inference import eval_loader, load_model
from mulcon.config import load_config
from mulcon.errors import redact
from mulcon.mlflow_client import TrackingError, check_server
from mulcon.serving import load_network, register_model_file
from tests.conftest import BIN, ROOT, dvc, free_port, make_bucket, make_repo, run_mlflow_server, wait_for


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


PASSWORD = "s3cret-pw-4242"


def with_credentials(uri: str) -> str:
    """`uri` with a user and PASSWORD in it (the server ignores them; the output must never show them)."""
    return uri.replace("http://", f"http://alice:{PASSWORD}@", 1)


def assert_no_password(*texts) -> None:
    for text in texts:
        assert PASSWORD not in str(text)


def test_training_against_a_real_mlflow_server(mlflow_server, tiny_params, tmp_path):
    """A whole tiny run (train, evaluate, promote) with a password in the tracking URI: it works, and
    no log line, error, param or tag shows the password; then each error path, the same."""
    import mlflow

    uri = with_credentials(mlflow_server)
    overrides = ["-S", "tracking.enabled=true", "-S", "train.variant=mulcon_bce", "-S", "train.pretrain_epochs=2"]
    for verb in ("train", "evaluate", "promote"):
        result = run_cli(verb, "--params", str(tiny_params), *overrides, cwd=tmp_path, uri=uri)
        assert result.returncode == 0, result.stderr
        assert_no_password(result.stdout, result.stderr)
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("mulcon-demo")
    runs = client.search_runs([experiment.experiment_id])
    [run] = [r for r in runs if r.data.tags.get("mulcon.kind") == "variant"]
    for each in runs:
        assert_no_password(each.data.params, each.data.tags)
        assert each.info.status == "FINISHED", each.data.tags.get("mulcon.kind")  # the ablation parent too
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

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        served = load_network(f"models:/mulcon-demo/{version.version}")
        model_file = tmp_path / "runs" / "mulcon_bce" / "model.pt"
        with pytest.raises(TrackingError) as refused:  # a registration the registry refuses
            register_model_file(model_file, "no/slash/allowed")
        assert_no_password(refused.value)
        assert "alice:***@127.0.0.1" in str(refused.value) and "\n" not in str(refused.value)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    network, state = load_model(model_file)
    images, _ = next(iter(eval_loader(load_config(tiny_params), "test", 8)))
    with torch.no_grad():
        expected = torch.sigmoid(network(images).logits)
        assert torch.allclose(served(images), expected, atol=1e-6)
    assert served.classes == state["classes"]

    untrained = run_cli("promote", "--params", str(tiny_params), *overrides, "-S", "train.seed=7", cwd=tmp_path, uri=uri)
    missing = run_cli("export", "--params", str(tiny_params), "--model", "models:/mulcon-demo/99", "--out",
                      str(tmp_path / "m.onnx"), cwd=tmp_path, uri=uri)
    for failed in (untrained, missing):
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        assert_no_password(failed.stdout, failed.stderr)
    assert "alice:***@" in untrained.stderr and "no MLflow run of mulcon_bce" in untrained.stderr
    assert "models:/mulcon-demo/99: not a loadable MLflow model" in missing.stderr


def test_unreachable_tracking_server_fails_within_seconds(tiny_params, tmp_path):
    started = time.monotonic()
    port = free_port()
    result = run_cli("train", "--params", str(tiny_params), "-S", "tracking.enabled=true", cwd=tmp_path,
                     uri=f"http://alice:{PASSWORD}@127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"MLflow tracking server http://alice:***@127.0.0.1:{port} is unreachable" in result.stderr
    assert "unset MLFLOW_TRACKING_URI" in result.stderr
    assert_no_password(result.stdout, result.stderr)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists()


def test_the_kubeflow_health_check_never_shows_the_password():
    from pipeline.checks import PipelineError
    from pipeline.connection import check_endpoint, check_host

    for host in (f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}", f"ftp://alice:{PASSWORD}@127.0.0.1"):
        with pytest.raises(PipelineError) as failed:
            check_endpoint(check_host(host), None, "KF_PIPELINES_TOKEN", timeout=2)
        assert_no_password(failed.value)
        assert "alice:***@127.0.0.1" in str(failed.value)


class _Health(http.server.BaseHTTPRequestHandler):
    """/health that answers 200 only to the expected Authorization header, and records what came."""

    expected: str = ""
    seen: list = []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200 if self.headers.get("Authorization") == self.expected else 401)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("how", ["userinfo", "username", "token", "wrong"])
def test_check_server_sends_the_credentials_as_mlflow_does(how, monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    _Health.expected, _Health.seen = basic, []
    try:
        if how == "userinfo":
            check_server(with_credentials(uri))
        elif how == "username":
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
            check_server(uri)
        elif how == "token":
            _Health.expected = f"Bearer {PASSWORD}"
            monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", PASSWORD)
            check_server(uri)
        else:
            with pytest.raises(TrackingError) as refused:
                check_server(uri.replace("http://", "http://alice:not-it@"))
            assert str(refused.value).startswith(f"MLflow tracking server http://alice:***@127.0.0.1:"
                                                 f"{server.server_address[1]} refused the credentials (401")
    finally:
        server.shutdown()
        server.server_close()
    assert [path for path, _ in _Health.seen] == ["/health"]


def test_redact_hides_every_password_and_token(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    assert redact("postgresql://user:pass@host/db") == "postgresql://user:***@host/db"
    assert redact("at https://user:token@example.org/x and s3://b/k?sig=abc&x=1") == \
        "at https://user:***@example.org/x and s3://b/k?sig=***&x=1"
    assert redact("https://ghp_abc@github.com/org/repo.git") == "https://***@github.com/org/repo.git"
    assert redact("sent tok-123456") == "sent ***"
    assert redact("sqlite:///mlflow.db http://127.0.0.1:5000 mail@example.org") == \
        "sqlite:///mlflow.db http://127.0.0.1:5000 mail@example.org"


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


def _sqlite_server(root, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`, its store in root/server.db, artifacts in root/artifacts
    (the same store each time it is started), in its own process group so it can be killed whole."""
    log = open(root / f"server-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_a_tracking_outage_loses_no_epoch(tiny_params, tmp_path):
    """The server killed mid-run: the command ends within seconds with one line naming the server
    (redacted), the checkpoint intact; restarted, `train --resume` logs the epochs the run missed, so
    every epoch is in the run exactly once, and no run is left RUNNING."""
    import mlflow

    port = free_port()
    uri, plain = with_credentials(f"http://127.0.0.1:{port}"), f"http://127.0.0.1:{port}"
    overrides = ["-S", "tracking.enabled=true", "-S", "train.variant=mulcon", "-S", "train.pretrain_epochs=3",
                 "-S", "train.finetune_epochs=3", "-S", "tracking.register_model=false"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri,
                   "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    server = _sqlite_server(tmp_path, port)
    try:
        wait_for(f"{plain}/health", server, seconds=120)
        client = mlflow.MlflowClient(plain)
        training = subprocess.Popen([sys.executable, "-m", "mulcon", "train", "--params", str(tiny_params), *overrides],
                                    cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def variant_run():
            experiment = client.get_experiment_by_name("mulcon-demo")
            found = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mulcon.kind") == "variant"] \
                if experiment else []
            return found[0] if found else None

        deadline = time.monotonic() + 300
        while not ((run := variant_run()) and client.get_metric_history(run.info.run_id, "loss_total")):
            assert training.poll() is None and time.monotonic() < deadline, training.stderr.read()
            time.sleep(0.2)
        _kill(server)  # after epoch 1 was logged
        killed = time.monotonic()
        out, err = training.communicate(timeout=300)
        assert time.monotonic() - killed < 90  # MLflow's retries are bounded: seconds, not 8 minutes
        assert training.returncode == 2 and "Traceback" not in err, err
        [line] = [text for text in err.splitlines() if text.startswith("error:")]
        assert line.startswith(f"error: MLflow tracking server http://alice:***@127.0.0.1:{port} failed during training")
        assert "rerun with --resume" in line
        assert_no_password(out, err)
        checkpoints = sorted((tmp_path / "checkpoints" / "mulcon").glob("*/checkpoint.pt"))
        trained = sum(len(checkpoint.load(path)["history"]) for path in checkpoints)  # intact: it loads
        assert 1 <= trained < 6

        server = _sqlite_server(tmp_path, port)
        wait_for(f"{plain}/health", server, seconds=120)
        logged = [point.step for point in client.get_metric_history(run.info.run_id, "loss_total")]
        assert len(logged) < trained  # the epoch whose logging failed is in the checkpoint only
        resumed = subprocess.run([sys.executable, "-m", "mulcon", "train", "--params", str(tiny_params), *overrides,
                                  "--resume"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        assert_no_password(resumed.stdout, resumed.stderr)
        assert variant_run().info.run_id == run.info.run_id  # the same MLflow run
        for metric in ("loss_total", "val_mAP", "lr"):
            steps = sorted(point.step for point in client.get_metric_history(run.info.run_id, metric))
            assert steps == [1, 2, 3, 4, 5, 6], metric  # every epoch exactly once
        experiment = client.get_experiment_by_name("mulcon-demo")
        assert {r.info.status for r in client.search_runs([experiment.experiment_id])} == {"FINISHED"}
    finally:
        _kill(server)
