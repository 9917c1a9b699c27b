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


def test_voc2007_prepare_train_evaluate_calibrate_predict_export(tmp_path):
    truth = make_mini_voc(tmp_path / "data" / "voc2007")
    settings = ["data.dataset=voc2007", "evaluate.calibrate=true"]
    for verb in ("prepare", "train"):
        result = mulcon(tmp_path, verb, settings=settings)
        assert result.returncode == 0, result.stderr
    prepared = tmp_path / "prepared" / "voc2007"
    paths, targets = read_manifest(prepared, "test")
    for path, row in zip(paths, targets):  # difficult-only classes are -1, the rest as annotated
        image_id = Path(path).stem
        assert np.flatnonzero(row == 1).tolist() == truth["labels"][image_id]
        assert np.flatnonzero(row == -1).tolist() == truth["ignored"][image_id]
    assert json.loads((prepared / "classes.json").read_text())[:3] == ["aeroplane", "bicycle", "bird"]

    evaluated = mulcon(tmp_path, "evaluate", settings=settings)
    assert evaluated.returncode == 0, evaluated.stderr
    assert re.search(r"^\| calibrated on val \| - \|( [\d.]+ \|){6}$", evaluated.stdout, re.M), evaluated.stdout
    metrics = json.loads((tmp_path / "reports" / "mulcon_bce" / "metrics.json").read_text())
    assert {"CF1", "OF1", "calibrated_CF1", "calibrated_OF1"} <= set(metrics)
    saved = json.loads((tmp_path / "reports" / "mulcon_bce" / "thresholds.json").read_text())
    model_file = tmp_path / "runs" / "mulcon_bce" / "model.pt"
    state = checkpoint.load(model_file)
    assert saved["chosen_on"] == "val" and len(state["thresholds"]) == 20
    assert list(saved["thresholds"].values()) == pytest.approx(state["thresholds"], abs=1e-6)
    positives = [int(line.split(",")[1]) for line in
                 (tmp_path / "reports" / "mulcon_bce" / "per_class_ap.csv").read_text().splitlines()[1:]]
    assert positives == (targets == 1).sum(0).tolist()  # ignored pairs are not positives

    images = sorted(str(path) for path in (tmp_path / "data" / "voc2007").rglob("*.jpg"))[:3]
    predicted = mulcon(tmp_path, "predict", *images, "--model", str(model_file), "--threshold", "calibrated",
                       "--json", settings=settings)
    assert predicted.returncode == 0, predicted.stderr
    from mulcon.serving import ImageClassifier, load_scorer

    scorer = load_scorer(model_file)
    for answer, scores in zip(json.loads(predicted.stdout), ImageClassifier(scorer).scores(images)):
        chosen = {scorer.classes[j] for j in np.flatnonzero(scores >= np.asarray(state["thresholds"]))}
        assert set(answer["labels"]) == chosen

    exported = mulcon(tmp_path, "export", "--model", str(model_file), "--format", "onnx", "--out",
                      str(tmp_path / "model.onnx"), settings=settings)
    assert exported.returncode == 0, exported.stderr
    difference = float(re.search(r"largest \|difference\| (\S+)", exported.stdout).group(1))
    assert difference <= 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = scorer(batch).numpy()
    [answer] = session.run(None, {"images": batch.numpy()})  # a batch size the export never saw
    assert np.abs(answer - expected).max() <= 1e-4
    with pytest.raises(ExportError, match="differs from PyTorch by"):  # the check can fail
        export_onnx(model_file, tmp_path / "strict.onnx", tolerance=-1.0)
    assert not (tmp_path / "strict.onnx").exists()


def test_folder_dataset_trains_registers_and_serves_calibrated_thresholds(tmp_path):
    make_folder(tmp_path / "data" / "photos", spreadsheet=True)  # BOM and CRLF, as spreadsheets save
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    settings = ["data.dataset=folder", "data.name=photos", "tracking.system_metrics=false"]
    prepared = mulcon(tmp_path, "prepare", settings=settings)
    assert prepared.returncode == 0, prepared.stderr
    info = json.loads((tmp_path / "prepared" / "photos" / "info.json").read_text())
    assert info["counts"] == {"train": 26, "val": 6, "test": 8}  # 20% test, then 20% of the rest val
    assert json.loads((tmp_path / "prepared" / "photos" / "classes.json").read_text()) == ["beach", "cat", "dog", "snow"]
    trained = mulcon(tmp_path, "train", settings=[*settings, "tracking.enabled=true"], environment=environment)
    assert trained.returncode == 0, trained.stderr
    evaluated = mulcon(tmp_path, "evaluate", settings=[*settings, "evaluate.calibrate=true"])
    assert evaluated.returncode == 0 and "| calibrated on val |" in evaluated.stdout, evaluated.stderr

    exported = mulcon(tmp_path, "export", "--model", "models:/mulcon-folder/1", "--out", str(tmp_path / "m.onnx"),
                      "--register", settings=[*settings, "tracking.enabled=true"], environment=environment)
    assert exported.returncode == 0, exported.stderr
    assert "attached to mulcon-folder version 1" in exported.stdout
    os.environ["MLFLOW_TRACKING_URI"] = environment["MLFLOW_TRACKING_URI"]
    try:
        import mlflow

        client = mlflow.MlflowClient()
        artifact = client.get_model_version("mulcon-folder", "1").tags["onnx"]
        downloaded = mlflow.artifacts.download_artifacts(artifact, dst_path=str(tmp_path / "download"))
        assert Path(downloaded).read_bytes() == (tmp_path / "m.onnx").read_bytes()
        import pandas as pd

        from mulcon.serving import encode_image

        served = mlflow.pyfunc.load_model("models:/mulcon-folder/1")
        images = sorted((tmp_path / "data" / "photos" / "images").rglob("*.jpg"))[:4]
        frame = pd.DataFrame({"image": [encode_image(path) for path in images]})
        answer = served.predict(frame, params={"calibrated": True})
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    from mulcon.serving import ImageClassifier, load_scorer

    model_file = tmp_path / "runs" / "mulcon_bce" / "model.pt"
    thresholds = np.asarray(checkpoint.load(model_file)["thresholds"])
    scorer = load_scorer(model_file)
    for labels, scores in zip(answer["labels"], ImageClassifier(scorer).scores([str(path) for path in images])):
        assert set(labels) == {scorer.classes[j] for j in np.flatnonzero(scores >= thresholds)}
