"""The real `dvc repro` on a temporary copy of the repository, shrunk: every stage runs, the
ablation lands in MLflow as one parent run with a nested run per variant, `dvc status` is clean after,
and a repro killed mid-training resumes from its checkpoint without redoing finished stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from mulcon.config import VARIANTS
from tests.conftest import dvc, make_repo

def terminal_output(command: list[str], cwd, environment: dict[str, str], columns: int) -> list[str]:
    """The lines `command` prints to a terminal `columns` wide (a pseudo-terminal, so DVC renders its table as
    for a person, through a pager: here `cat`, where a person's `less -S` would show the first `columns`)."""
    import pty
    import re

    leader, follower = pty.openpty()
    process = subprocess.Popen(command, cwd=cwd, env={**environment, "COLUMNS": str(columns), "DVC_PAGER": "cat"},
                               stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower closed: the command ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=120)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    return text.replace("\r", "").splitlines()


def test_dvc_repro_runs_the_pipeline_into_mlflow(tmp_path, postgres_mlflow_server):
    """Against an MLflow server backed by PostgreSQL, artifacts on S3 (sqlite:///mlflow.db, the
    embedded default, is what the other tests and `make demo` use)."""
    import mlflow

    repo, environment = make_repo(tmp_path, [])
    environment["MLFLOW_TRACKING_URI"] = postgres_mlflow_server
    dvc(repo, environment, "repro")
    table = (repo / "reports" / "ablation.md").read_text()
    for method in ("Backbone with BCE |", "Backbone with BCE + SCL", "MulCon with BCE only", "MulCon without pretraining",
                   "MulCon, step 2 without L_con", "| MulCon |"):
        assert method in table
    results = (repo / "reports" / "metrics.md").read_text()
    assert "## Table 1: COCO-2014" in results and "## This run: demo" in results and "| MulCon (ours) |" in results
    assert "Data and pipelines are up to date" in dvc(repo, environment, "status").stdout
    metrics = dvc(repo, environment, "metrics", "show").stdout
    header = metrics.splitlines()[0].split()
    assert {"mAP", "CF1", "OF1"} <= set(header) and len(header) <= 25, header  # fits a terminal
    assert "reports/mulcon/summary.json" in metrics and "reports/ablation.json" in metrics
    assert {f"mAP_diff.{variant}" for variant in VARIANTS} <= set(header)
    # Plain `dvc exp show` in a 200-column terminal: every variant's mAP on the first screen.
    screen = [line[:200] for line in terminal_output(["dvc", "exp", "show"], repo, environment, columns=200)]
    headline = json.loads((repo / "reports" / "ablation.json").read_text())["mAP"]
    header = next(line for line in screen if "Experiment" in line)
    workspace = next(line for line in screen if line.strip().startswith("workspace"))
    for variant, value in headline.items():
        assert f"mAP.{variant}" in header and f"{value:.5g}" in workspace, (variant, screen)
    for figure in ("tsne.png", "retrieval_single.png", "retrieval_multi.png", "attention.png"):
        assert (repo / "reports" / "analysis" / figure).stat().st_size > 1000
    dvc(repo, environment, "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").exists()

    client = mlflow.MlflowClient(environment["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mulcon-demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("mulcon.kind") == "ablation"]
    assert len(parents) == 1
    parent = parents[0]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["variant"] for run in children) == sorted(
        ["backbone_bce", "backbone_bce_scl", "mulcon_bce", "mulcon_no_pretrain", "mulcon_step2_bce", "mulcon"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/ablation.md"}
    versions = client.search_model_versions("name='mulcon-demo'")
    assert len(versions) == 6
    for run in children:
        assert run.data.params["train.variant"] == run.data.tags["variant"]
        assert run.data.params["model.embed_dim"] == "32"
        assert len(client.get_metric_history(run.info.run_id, "loss_total")) == 2
        assert "test_mAP" in run.data.metrics and "val_mAP" in run.data.metrics
        assert run.data.tags["git_commit"] != "unknown" and run.data.tags["data_version"] != "untracked"
        version = next(v for v in versions if str(v.version) == run.data.tags["model_version"])
        assert version.run_id == run.info.run_id and version.tags["variant"] == run.data.tags["variant"]
        assert [dataset.dataset.digest for dataset in run.inputs.dataset_inputs][:1] == [run.data.tags["data_version"]]
        paths = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")}
        assert "evaluation/test/pr_curve.png" in paths and "evaluation/test/per_class_ap.csv" in paths
    [main] = [run for run in children if run.data.tags["variant"] == "mulcon"]
    assert "precision_at_10_mulcon" in main.data.metrics
    assert "analysis/tsne.png" in {a.path for a in client.list_artifacts(main.info.run_id, "analysis")}


def test_killed_repro_resumes_without_redoing_finished_stages(tmp_path):
    repo, environment = make_repo(tmp_path, ["train.pretrain_epochs=4", "tracking.enabled=false"])
    process = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=repo, env=environment, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = repo / "runs" / "mulcon" / "pretrain" / "history.json"
    deadline = time.monotonic() + 300
    while not history.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    prepared = repo / "prepared" / "demo" / "train.csv"
    stamp = prepared.stat().st_mtime_ns
    result = dvc(repo, environment, "repro", "pretrain")
    assert "Stage 'prepare' didn't change, skipping" in result.stdout
    assert prepared.stat().st_mtime_ns == stamp
    assert "resuming mulcon/pretrain from epoch" in result.stderr + result.stdout
    assert "Data and pipelines are up to date" in dvc(repo, environment, "status", "pretrain").stdout


def test_repro_on_a_missing_dataset_says_what_to_put_where(tmp_path):
    repo, environment = make_repo(tmp_path, ["data.dataset=nuswide", "tracking.enabled=false"])
    result = dvc(repo, environment, "repro", "prepare", check=False)
    assert result.returncode != 0
    assert "nus_wid_data.csv" in result.stderr and "images under" in result.stderr
    assert not (repo / "prepared" / "nuswide").exists()
