"""Own data through the real CLI: a generated mini PASCAL VOC-2007 (difficult objects ignored) and a
labelled image folder are prepared, trained for one tiny epoch and evaluated; calibrated thresholds
get their own row and drive `predict --threshold calibrated` and the registered model; `export`
writes an ONNX model that onnxruntime runs within 1e-4 of PyTorch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mulcon import checkpoint
from mulcon.data.manifest import read_manifest
from mulcon.export import ExportError, export_onnx
from mulcon.inference import eval_loader, load_model, predict_scores
from tests.conftest import BIN, ROOT, TINY
from tests.owndata_sets import make_folder, make_mini_voc

ONE_EPOCH = ["train.variant=mulcon_bce", "train.pretrain_epochs=1", "train.finetune_epochs=0", "data.cache=false"]


def mulcon(tmp_path: Path, *args: str, settings: list[str], environment: dict | None = None):
    command = [sys.executable, "-m", "mulcon", *args, "--params", str(ROOT / "params.yaml")]
    for setting in [*TINY, *ONE_EPOCH, f"data.root={tmp_path / 'data'}", f"data.prepared_root={tmp_path / 'prepared'}",
                    f"train.out_root={tmp_path / 'runs'}", f"train.checkpoint_root={tmp_path / 'checkpoints'}",
                    f"evaluate.out_root={tmp_path / 'reports'}", *settings]:
        command += ["-S", setting]
    environment = environment or {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    """A mini-VOC prepared and trained for one epoch through the CLI: (folder, ground truth)."""
    tmp_path = tmp_path_factory.mktemp("voc")
    truth = make_mini_voc(tmp_path / "data" / "voc2007")
    for verb in ("prepare", "train"):
        result = mulcon(tmp_path, verb, settings=VOC)
        assert result.returncode == 0, result.stderr
    return tmp_path, truth


VOC = ["data.dataset=voc2007", "evaluate.calibrate=true"]


def test_voc2007_manifests_mark_difficult_only_classes_ignored(voc_run):
    tmp_path, truth = voc_run
    prepared = tmp_path / "prepared" / "voc2007"
    assert (prepared / "test.csv").read_text().startswith("image,labels,ignore\n")
    for split in ("train", "val", "test"):
        paths, targets = read_manifest(prepared, split)
        for path, row in zip(paths, targets):  # difficult-only classes are -1, the rest as annotated
            image_id = Path(path).stem
            assert np.flatnonzero(row == 1).tolist() == truth["labels"][image_id]
            assert np.flatnonzero(row == -1).tolist() == truth["ignored"][image_id]
    assert json.loads((prepared / "classes.json").read_text())[:3] == ["aeroplane", "bicycle", "bird"]
    # The model file carries thresholds chosen on val, one per class.
    assert len(checkpoint.load(tmp_path / "runs" / "mulcon_bce" / "model.pt")["thresholds"]) == 20


def test_voc2007_evaluate_reports_the_calibrated_row(voc_run):
    tmp_path, _ = voc_run
    evaluated = mulcon(tmp_path, "evaluate", settings=VOC)
    assert evaluated.returncode == 0, evaluated.stderr
    assert re.search(r"^\| calibrated on val \| - \|( [\d.]+ \|){6}$", evaluated.stdout, re.M), evaluated.stdout
    reports = tmp_path / "reports" / "mulcon_bce"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert {"CF1", "OF1", "calibrated_CF1", "calibrated_OF1"} <= set(metrics)
    saved = json.loads((reports / "thresholds.json").read_text())
    state = checkpoint.load(tmp_path / "runs" / "mulcon_bce" / "model.pt")
    assert saved["chosen_on"] == "val"
    assert list(saved["thresholds"].values()) == pytest.approx(state["thresholds"], abs=1e-6)
    _, targets = read_manifest(tmp_path / "prepared" / "voc2007", "test")
    positives = [int(line.split(",")[1]) for line in (reports / "per_class_ap.csv").read_text().splitlines()[1:]]
    assert positives == (targets == 1).sum(0).tolist()  # ignored pairs are not positives


def test_voc2007_predict_calibrated_and_onnx_export_within_1e4(voc_run):
    from mulcon.export import _Probabilities, check_onnx
    from mulcon.serving import ImageClassifier, load_scorer

    tmp_path, _ = voc_run
    model_file = tmp_path / "runs" / "mulcon_bce" / "model.pt"
    images = sorted(str(path) for path in (tmp_path / "data" / "voc2007").rglob("*.jpg"))[:3]
    scorer = load_scorer(model_file)
    classifier = ImageClassifier(scorer, local=True)  # file paths of this machine
    answers = classifier.predict(images, {"threshold": "calibrated"})
    for labels, scores in zip(answers.labels, classifier.scores(images)):
        assert set(labels) == {scorer.classes[j] for j in np.flatnonzero(scores >= np.asarray(scorer.thresholds))}

    result = export_onnx(model_file, tmp_path / "model.onnx", images=images)
    assert result["max_abs_difference"] <= 1e-4 and result["checked_images"] == 3
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = scorer(batch).numpy()
    [answer] = session.run(None, {"images": batch.numpy()})  # a batch size the export never saw
    assert np.abs(answer - expected).max() <= 1e-4

    class Shifted(_Probabilities):  # a PyTorch side that differs by 1e-3: the check must fail
        def forward(self, images):
            return super().forward(images) + 1e-3

    with pytest.raises(ExportError, match=r"differs from PyTorch by 0.001 > 0.0001"):
        check_onnx(tmp_path / "model.onnx", Shifted(scorer.network).eval(), [batch])


FOLDER = ["data.dataset=folder", "data.name=photos", "tracking.system_metrics=false"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A labelled folder (spreadsheet-saved labels.csv) prepared, and trained for one epoch through
    the CLI with MLflow tracking: (folder, environment with MLFLOW_TRACKING_URI)."""
    from mulcon.data.preparation import prepare

    tmp_path = tmp_path_factory.mktemp("folder")
    make_folder(tmp_path / "data" / "photos", spreadsheet=True)  # BOM and CRLF, as spreadsheets save
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    settings = FOLDER
    info = prepare("folder", tmp_path / "data" / "photos", tmp_path / "prepared" / "folder" / "photos", val_fraction=0.2)
    assert info["counts"] == {"train": 26, "val": 6, "test": 8}  # 20% test, then 20% of the rest val
    assert json.loads((tmp_path / "prepared" / "folder" / "photos" / "classes.json").read_text()) == ["beach", "cat", "dog", "snow"]
    trained = mulcon(tmp_path, "train", settings=[*settings, "tracking.enabled=true"], environment=environment)
    assert trained.returncode == 0, trained.stderr
    return tmp_path, environment


def test_folder_dataset_evaluates_with_calibration(folder_run):
    from mulcon.config import load_config
    from mulcon.evaluate import evaluate_model

    tmp_path, _ = folder_run
    settings = FOLDER
    config = load_config(ROOT / "params.yaml", [*TINY, *ONE_EPOCH, *settings, f"data.root={tmp_path / 'data'}",
                                                f"data.prepared_root={tmp_path / 'prepared'}", "evaluate.calibrate=true"])
    model_file = tmp_path / "runs" / "mulcon_bce" / "model.pt"
    metrics = evaluate_model(config, model_file, tmp_path / "reports")
    assert metrics["num_images"] == 8
    # The reference: thresholds found by trying every val score of each class (F1 by hand), then
    # OF1 on test counted by hand at them.
    model, _ = load_model(model_file)
    val_scores, val_targets = predict_scores(model, eval_loader(config, "val", 64), torch.device("cpu"), "fp32")
    thresholds = []
    for label in range(val_scores.shape[1]):
        positives = val_targets[:, label] == 1
        best = (0.0, config.evaluate.threshold)
        for candidate in sorted(set(val_scores[:, label].tolist()), reverse=True):
            predicted = val_scores[:, label] >= candidate
            f1 = 2 * (predicted & positives).sum() / (predicted.sum() + positives.sum()) if positives.any() else 0.0
            if f1 > best[0]:
                best = (f1, candidate)
        thresholds.append(best[1])
    test_scores, test_targets = predict_scores(model, eval_loader(config, "test", 64), torch.device("cpu"), "fp32")
    predicted, positives = test_scores >= np.asarray(thresholds), test_targets == 1
    correct = (predicted & positives).sum()
    precision, recall = correct / max(predicted.sum(), 1), correct / positives.sum()
    expected = 100 * 2 * precision * recall / (precision + recall) if correct else 0.0
    assert metrics["calibrated_OF1"] == pytest.approx(expected, abs=1e-3)
    assert json.loads((tmp_path / "reports" / "thresholds.json").read_text())["thresholds"] == pytest.approx(
        dict(zip(["beach", "cat", "dog", "snow"], thresholds)))


def test_folder_model_exported_registered_and_served_with_calibrated_thresholds(folder_run):
    tmp_path, environment = folder_run
    settings = FOLDER
    model_file = tmp_path / "runs" / "mulcon_bce" / "model.pt"
    exported = mulcon(tmp_path, "export", "--model", "models:/mulcon-folder-photos/1", "--format", "onnx", "--out",
                      str(tmp_path / "m.onnx"), "--register", settings=[*settings, "tracking.enabled=true"],
                      environment=environment)
    assert exported.returncode == 0, exported.stderr
    difference = float(re.search(r"largest \|difference\| (\S+) \(limit 1e-04\)", exported.stdout).group(1))
    assert difference <= 1e-4 and "attached to mulcon-folder-photos version 1" in exported.stdout
    os.environ["MLFLOW_TRACKING_URI"] = environment["MLFLOW_TRACKING_URI"]
    try:
        import mlflow
        import pandas as pd

        from mulcon.serving import ImageClassifier, encode_image, load_scorer

        artifact = mlflow.MlflowClient().get_model_version("mulcon-folder-photos", "1").tags["onnx"]
        downloaded = mlflow.artifacts.download_artifacts(artifact, dst_path=str(tmp_path / "download"))
        assert Path(downloaded).read_bytes() == (tmp_path / "m.onnx").read_bytes()
        served = mlflow.pyfunc.load_model("models:/mulcon-folder-photos/1")
        images = sorted(str(path) for path in (tmp_path / "data" / "photos" / "images").rglob("*.jpg"))[:4]
        answer = served.predict(pd.DataFrame({"image": [encode_image(path) for path in images]}),
                                params={"calibrated": True})
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    thresholds = np.asarray(checkpoint.load(model_file)["thresholds"])
    scorer = load_scorer(model_file)
    for labels, scores in zip(answer["labels"], ImageClassifier(scorer, local=True).scores(images)):
        assert set(labels) == {scorer.classes[j] for j in np.flatnonzero(scores >= thresholds)}
