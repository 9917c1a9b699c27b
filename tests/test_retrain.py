"""Scheduled retraining through the real `dvc repro` (shrunk: tiny demo, one epoch per step, MLflow in
SQLite): a new data version retrains every training stage, into new models, logged under the new data
version; a rerun with nothing changed trains nothing. A labelled photo folder runs through `dvc repro`
too, and a second folder with other labels never competes for the first one's champion."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml

from mulcon import checkpoint
from mulcon.io import dvc_file_md5
from tests.conftest import dvc, make_repo
from tests.owndata_sets import make_folder
from tests.test_train import _drop_a_third_of_the_training_images

TRAINING = ("pretrain", "finetune", "ablation@mulcon_bce")


def _shrink(repo, stages: tuple[str, ...], variants: list[str]) -> None:
    """dvc.yaml with only `stages` (the ablation over `variants`), no lock of the full-size run."""
    (repo / "dvc.lock").unlink()
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in stages}
    if "ablation" in pipeline["stages"]:
        pipeline["stages"]["ablation"]["foreach"] = variants
    pipeline["plots"] = [plot for plot in pipeline["plots"] if "reports/mulcon/" in json.dumps(plot)]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))


def _weights(repo, variant: str) -> dict[str, torch.Tensor]:
    return checkpoint.load(repo / "runs" / variant / "model.pt")["model"]


def _runs(repo, environment, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(environment["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    return client, ([] if found is None else client.search_runs([found.experiment_id],
                                                                "tags.`mulcon.kind` = 'variant'"))


def test_new_data_retrains_every_training_stage_and_a_rerun_trains_nothing(tmp_path):
    repo, environment = make_repo(tmp_path, ["tracking.system_metrics=false"])
    _shrink(repo, ("prepare", "pretrain", "finetune", "evaluate", "ablation"), ["mulcon_bce"])
    dvc(repo, environment, "repro")
    old_version = dvc_file_md5((repo / "data.dvc").read_text())
    before = {variant: _weights(repo, variant) for variant in ("mulcon", "mulcon_bce")}

    _drop_a_third_of_the_training_images(repo / "data" / "demo")
    dvc(repo, environment, "add", "-q", "data")
    new_version = dvc_file_md5((repo / "data.dvc").read_text())
    assert new_version != old_version
    rerun = dvc(repo, environment, "repro")
    output = rerun.stdout + rerun.stderr
    assert "resuming" not in output
    for variant, stage in (("mulcon", "pretrain"), ("mulcon", "finetune"), ("mulcon_bce", "pretrain")):
        # The cache is on (params.yaml): its index changed with the manifests.
        assert (f"was made on other data (image cache, train images, train.csv, ... changed): {variant}/{stage} "
                "starts over" in output), output
    for variant, weights in before.items():
        after = _weights(repo, variant)
        assert any(not torch.equal(weights[name], after[name]) for name in weights), variant
    info = json.loads((repo / "prepared" / "demo" / "info.json").read_text())
    assert info["counts"]["train"] + info["counts"]["val"] == 16  # 24 generated, a third dropped

    client, runs = _runs(repo, environment, "mulcon-demo")
    latest = {run.data.tags["variant"]: run for run in runs if run.data.tags["data_version"] == new_version}
    assert sorted(latest) == ["mulcon", "mulcon_bce"]
    for run in latest.values():
        assert [entry.dataset.digest for entry in run.inputs.dataset_inputs][:1] == [new_version[:36]]
        assert len(client.get_metric_history(run.info.run_id, "loss_total")) == 2  # both epochs, trained anew
        assert "test_mAP" in run.data.metrics
    assert {run.data.tags["data_version"] for run in runs} == {old_version, new_version}

    again = dvc(repo, environment, "repro")
    assert "epoch 1/" not in again.stdout + again.stderr
    assert "Data and pipelines are up to date" in dvc(repo, environment, "status").stdout


def _promote(repo, environment) -> dict:
    result = subprocess.run([sys.executable, "-m", "mulcon", "promote"], cwd=repo, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_photo_folder_runs_through_dvc_repro_and_never_competes_with_another(tmp_path):
    repo, environment = make_repo(tmp_path, ["data.dataset=folder", "data.name=photos",
                                             "tracking.system_metrics=false"])
    _shrink(repo, ("prepare", "pretrain", "finetune", "evaluate"), [])
    make_folder(repo / "data" / "photos")
    dvc(repo, environment, "add", "-q", "data")
    dvc(repo, environment, "repro")
    assert json.loads((repo / "prepared" / "folder" / "photos" / "classes.json").read_text()) == [
        "beach", "cat", "dog", "snow"]
    assert json.loads((repo / "reports" / "mulcon" / "metrics.json").read_text())["num_images"] == 8
    first = _promote(repo, environment)
    assert first["model"] == "mulcon-folder-photos" and first["promoted"]

    other = repo / "data" / "pets"  # another folder, other labels
    make_folder(other, num_images=30, seed=3)
    (other / "labels.csv").write_text((other / "labels.csv").read_text().replace("beach", "parrot"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["name"] = "pets"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, environment, "add", "-q", "data")
    dvc(repo, environment, "repro")
    assert "parrot" in json.loads((repo / "prepared" / "folder" / "pets" / "classes.json").read_text())
    second = _promote(repo, environment)
    assert second["model"] == "mulcon-folder-pets" and second["promoted"] and second["reason"] == "no champion yet"
    client, runs = _runs(repo, environment, "mulcon-folder-photos")
    assert len(runs) == 1
    assert str(client.get_model_version_by_alias("mulcon-folder-photos", "champion").version) == first["version"]
    assert [str(v.version) for v in client.search_model_versions("name='mulcon-folder-photos'")] == [first["version"]]
