"""Champion/challenger promotion against a real `mlflow server` on 127.0.0.1: the first model becomes
champion, a worse one does not, a better one does, a margin holds a slightly better one back, and
a champion validated on another split is not compared."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from mulcon.registry import CHALLENGER, CHAMPION, RegistryError, promote
from mulcon.model import build_model
from tests.conftest import BIN, free_port, stop, wait_for


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("mlflow-registry")
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", process, seconds=120)
        yield mlflow.MlflowClient(uri)
    finally:
        stop(process)
        log.close()


def register(client, name: str, val_maps: list[float], saved: float | None = None, **params: str) -> str:
    """A training run with one val_mAP per epoch (over both stages) and, as track_training logs it, the
    val mAP of the model it saved (`saved`: default its final epoch's), registered as a new version."""
    experiment = client.get_experiment_by_name("registry") or client.get_experiment(client.create_experiment("registry"))
    run = client.create_run(experiment.experiment_id)
    for epoch, value in enumerate(val_maps, start=1):
        client.log_metric(run.info.run_id, "val_mAP", value, step=epoch)
    if val_maps:
        client.log_metric(run.info.run_id, "model_val_mAP", val_maps[-1] if saved is None else saved)
    for key, value in {"data.dataset": "demo", "data.val_fraction": "0.1", "data.split_seed": "0", "train.seed": "0",
                       "train.select_on_val": "False", **params}.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version


def alias(client, name: str, which: str) -> str:
    return str(client.get_model_version_by_alias(name, which).version)


def test_first_becomes_champion_worse_does_not_better_does(mlflow_client):
    client, name = mlflow_client, f"mulcon-{uuid.uuid4().hex[:8]}"
    first = register(client, name, [30.0, 50.0])
    decision = promote(name, first, client=client)
    assert decision["promoted"] and decision["reason"] == "no champion yet" and decision["challenger_value"] == 50.0
    assert alias(client, name, CHAMPION) == alias(client, name, CHALLENGER) == str(first)

    worse = register(client, name, [60.0, 45.0])  # the final epoch counts, not the best one
    decision = promote(name, worse, client=client)
    assert not decision["promoted"]
    assert (decision["challenger_value"], decision["champion_value"], decision["champion_version"]) == (45.0, 50.0, str(first))
    assert alias(client, name, CHAMPION) == str(first) and alias(client, name, CHALLENGER) == str(worse)
    run = client.get_run(client.get_model_version(name, worse).run_id)
    assert run.data.tags["promotion.decision"] == "kept champion"
    assert "45 does not beat the champion's 50" in run.data.tags["promotion.reason"]
    assert run.data.metrics["promotion/challenger_model_val_mAP"] == 45.0
    assert run.data.metrics["promotion/champion_model_val_mAP"] == 50.0
    assert client.get_model_version(name, worse).tags["promotion"] == "kept champion"

    better = register(client, name, [55.0])
    decision = promote(name, better, client=client)
    assert decision["promoted"] and decision["champion_version"] == str(first)
    assert alias(client, name, CHAMPION) == alias(client, name, CHALLENGER) == str(better)
    assert client.get_model_version(name, better).tags["promotion"] == "promoted"


def test_margin_and_select_on_val(mlflow_client):
    client, name = mlflow_client, f"mulcon-{uuid.uuid4().hex[:8]}"
    promote(name, register(client, name, [50.0, 50.0]), client=client)
    slightly = register(client, name, [48.0, 50.5])
    assert not promote(name, slightly, margin=1.0, client=client)["promoted"]
    # Two stages (pretrain epochs 1-2, finetune 3-4) kept on val: the best val mAP, 70, is a pretrain
    # epoch; the model saved is finetune's best, 52. Promotion compares 52, not the history's best.
    selected = register(client, name, [60.0, 70.0, 52.0, 40.0], saved=52.0, **{"train.select_on_val": "True"})
    decision = promote(name, selected, margin=1.0, client=client)
    assert decision["promoted"] and decision["challenger_value"] == 52.0
    assert client.get_run(client.get_model_version(name, selected).run_id).data.metrics[
        "promotion/challenger_model_val_mAP"] == 52.0
    assert not promote(name, selected, client=client)["promoted"]  # already the champion: nothing moves
    beaten = register(client, name, [75.0, 51.0, 51.5], saved=51.5, **{"train.select_on_val": "True"})
    decision = promote(name, beaten, client=client)
    assert not decision["promoted"] and decision["challenger_value"] == 51.5


def test_promotion_compares_models_across_training_seeds_not_splits(mlflow_client):
    client, name = mlflow_client, f"mulcon-{uuid.uuid4().hex[:8]}"
    promote(name, register(client, name, [40.0]), client=client)
    other_seed = register(client, name, [45.0], **{"train.seed": "1"})  # the same val split (data.split_seed 0)
    assert promote(name, other_seed, client=client)["promoted"]
    other_split = register(client, name, [90.0], **{"data.split_seed": "1"})
    decision = promote(name, other_split, client=client)
    assert not decision["promoted"] and "validation split differs in data.split_seed" in decision["reason"]


def test_track_training_logs_the_val_map_of_the_model_it_saved(tiny_params, tmp_path, monkeypatch):
    """The model file of a two-stage run kept on val: its best epoch is in step 1 (val mAP 0.9 there);
    the saved model is step 2's selected epoch. model_val_mAP is the saved one's."""
    import mlflow

    from mulcon import checkpoint
    from mulcon.config import load_config, to_dict
    from mulcon.tracking import track_training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = load_config(tiny_params, ["tracking.enabled=true", "tracking.register_model=false",
                                       "tracking.system_metrics=false", "train.select_on_val=true"])
    final = tmp_path / "runs" / "mulcon" / "model.pt"
    network = build_model(config.model, 12, label_level=True)

    def train(callback):
        for stage, epoch, value in (("pretrain", 1, 0.9), ("finetune", 1, 0.4), ("finetune", 2, 0.6)):
            callback({"stage": stage, "epoch": epoch, "val_mAP": value})
        checkpoint.save(final, {"model": network.state_dict(), "config": to_dict(config), "classes": [str(c) for c in range(12)],
                                "label_level": True, "variant": "mulcon", "stage": "finetune", "epoch": 2,
                                "selected_on": "val", "val": {"val_mAP": 0.6}, "thresholds": None})
        return final

    track_training(config, "all", train)
    [run] = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("mulcon-demo").experiment_id],
                                              filter_string="tags.`mulcon.kind` = 'variant'")
    assert run.data.metrics["model_val_mAP"] == 0.6
    assert max(point.value for point in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_mAP")) == 0.9


def test_champion_of_another_split_is_not_compared(mlflow_client):
    client, name = mlflow_client, f"mulcon-{uuid.uuid4().hex[:8]}"
    champion = register(client, name, [40.0])
    promote(name, champion, client=client)
    other_split = register(client, name, [90.0], **{"data.val_fraction": "0.2"})
    decision = promote(name, other_split, client=client)
    assert not decision["promoted"] and "validation split differs in data.val_fraction" in decision["reason"]
    assert alias(client, name, CHAMPION) == str(champion)


def test_run_without_val_metric_is_an_error(mlflow_client):
    client, name = mlflow_client, f"mulcon-{uuid.uuid4().hex[:8]}"
    version = register(client, name, [])
    with pytest.raises(RegistryError, match="has no metric model_val_mAP; train with a validation split"):
        promote(name, version, client=client)


def test_promote_trained_finds_the_run_of_an_earlier_commit_and_never_writes_a_run(mlflow_client, tiny_params,
                                                                                   monkeypatch):
    from mulcon.config import load_config
    from mulcon.registry import promote_trained
    from mulcon.tracking import TrackingError, _keys

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_client.tracking_uri)
    config = load_config(tiny_params, ["tracking.enabled=true"])
    assert mlflow_client.get_experiment_by_name("mulcon-demo") is None
    with pytest.raises(TrackingError, match="no MLflow run of mulcon on demo trained under this config"):
        promote_trained(config)
    assert mlflow_client.get_experiment_by_name("mulcon-demo") is None
    experiment = mlflow_client.create_experiment("mulcon-demo")
    with pytest.raises(TrackingError, match="train it first"):
        promote_trained(config)
    assert mlflow_client.search_runs([experiment]) == []
    # Trained at an earlier commit: another run key, the same config key.
    tags = {"mulcon.kind": "variant", "variant": "mulcon", "mulcon.key": "0" * 16, "mulcon.config_key": _keys(config)[2]}
    run = mlflow_client.create_run(experiment, tags=tags).info.run_id
    mlflow_client.log_metric(run, "val_mAP", 40.0, step=1)
    mlflow_client.log_metric(run, "model_val_mAP", 40.0)
    for key, value in {"data.dataset": "demo", "data.val_fraction": "0.2", "data.split_seed": "0", "train.seed": "0",
                       "train.select_on_val": "False", "train.variant": "mulcon"}.items():
        mlflow_client.log_param(run, key, value)
    mlflow_client.create_registered_model("mulcon-demo")
    version = mlflow_client.create_model_version("mulcon-demo", f"runs:/{run}/model", run_id=run).version
    mlflow_client.set_tag(run, "model_version", str(version))
    # An evaluation logged at the current commit: the run key matches, but it trained nothing.
    evaluated = mlflow_client.create_run(experiment, tags={**tags, "mulcon.key": _keys(config)[1]}).info.run_id
    decision = promote_trained(config)
    assert decision["promoted"] and decision["version"] == str(version)
    assert alias(mlflow_client, "mulcon-demo", CHAMPION) == str(version)
    assert sorted(found.info.run_id for found in mlflow_client.search_runs([experiment])) == sorted([run, evaluated])
