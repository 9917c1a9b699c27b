"""Predictions: the `predict` CLI on a model file and on a registered model; the registered model
(plain artifacts, no pickle) loaded by `load_network` and by MLflow, a crafted one refused; and the
model served by `mlflow models serve` on 127.0.0.1 under real requests, some concurrent, some
malformed (a shortened soak, `benchmarks/bench_serving.py`), file paths only under its image folder."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
import torch
import yaml
from PIL import Image

from benchmarks.bench_serving import answered_error, bomb_png, expected_labels, serve, soak
from mulcon.errors import MulconError
from mulcon.inference import load_model
from mulcon.serving import IMAGE_ROOT_ENV, ImageClassifier, encode_image, load_network, load_scorer
from tests.conftest import BIN, ROOT, TINY


@pytest.fixture(scope="module")
def registered(tiny_data, tmp_path_factory):
    """A tiny model trained through the CLI (the TINY params) and registered in a sqlite MLflow
    store, once for the module: (environment, model file, validation images, params file)."""
    root = tmp_path_factory.mktemp("registered")
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in TINY:
        key, value = override.split("=")
        section, name = key.split(".")
        values[section][name] = yaml.safe_load(value)
    values["data"].update(root=str(tiny_data / "data"), prepared_root=str(tiny_data / "prepared"))
    values["train"].update(out_root=str(root / "runs"), checkpoint_root=str(root / "checkpoints"))
    values["evaluate"]["out_root"] = str(root / "reports")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    environment.pop(IMAGE_ROOT_ENV, None)
    result = subprocess.run([sys.executable, "-m", "mulcon", "train", "--params", str(params), "-S",
                             "tracking.enabled=true", "-S", "train.variant=mulcon_bce"], cwd=root, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    images = sorted(str(path) for path in (tiny_data / "data" / "demo" / "val2014").glob("*.jpg"))
    return environment, root / "runs" / "mulcon_bce" / "model.pt", images, params


def run_predict(environment, cwd, *args):
    return subprocess.run([sys.executable, "-m", "mulcon", "predict", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_predict_cli_on_a_file_and_on_the_registry_agree(registered, tmp_path):
    environment, model_file, images, tiny_params = registered
    from_file = run_predict(environment, tmp_path, "--params", str(tiny_params), *images[:3], "--model",
                            str(model_file), "--threshold", "0.2", "--json")
    from_registry = run_predict(environment, tmp_path, "--params", str(tiny_params), *images[:3], "--model",
                                "models:/mulcon-demo/1", "--threshold", "0.2", "--json")
    assert from_file.returncode == 0 and from_registry.returncode == 0, from_file.stderr + from_registry.stderr
    answers = json.loads(from_file.stdout)
    assert answers == json.loads(from_registry.stdout)
    assert [answer["image"] for answer in answers] == images[:3]
    direct = ImageClassifier(load_scorer(model_file), local=True).scores(images[:3])
    for answer, scores in zip(answers, direct):
        classes = load_scorer(model_file).classes
        assert answer["labels"] == sorted((c for c, s in zip(classes, scores) if s >= 0.2),
                                          key=lambda c: -scores[classes.index(c)])
    text = run_predict(environment, tmp_path, "--params", str(tiny_params), images[0], "--model", str(model_file),
                       "--threshold", "0")
    assert text.stdout.startswith(images[0]) and len(text.stdout.splitlines()) == 13  # the path + 12 labels
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    failed = run_predict(environment, tmp_path, "--params", str(tiny_params), str(bad), "--model", str(model_file))
    assert failed.returncode == 2 and "bad.jpg): not a readable JPEG/PNG image" in failed.stderr
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    failed = run_predict(environment, tmp_path, "--params", str(tiny_params), str(bomb), "--model", str(model_file))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    [line] = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert "bomb.png" in line and "decompression-bomb limit" in line


@pytest.mark.parametrize("threshold", ["1.7", "-0.1", "nan"])
def test_predict_refuses_a_threshold_outside_0_1_before_loading_anything(tiny_params, tmp_path, threshold):
    # Neither the model nor the image exists: refusing the threshold first is the only way to this message.
    result = run_predict({**os.environ, "PYTHONPATH": str(ROOT)}, tmp_path, "--params", str(tiny_params),
                         str(tmp_path / "missing.jpg"), "--model", str(tmp_path / "missing.pt"), "--threshold", threshold)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --threshold {float(threshold):g}: expected a probability in [0, 1] or 'calibrated'"]


def test_the_registered_model_holds_no_pickle_and_loads_as_the_model_file(registered, tmp_path, monkeypatch):
    import mlflow

    environment, model_file, images, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", environment["MLFLOW_TRACKING_URI"])
    folder = Path(mlflow.artifacts.download_artifacts("models:/mulcon-demo/1", dst_path=str(tmp_path / "model")))
    files = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert {"MLmodel", "artifacts/weights.pt", "artifacts/model.json", "mulcon_model.py"} <= files
    assert not [name for name in files if name.endswith((".pkl", ".pth", ".pickle"))]
    flavors = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]
    assert list(flavors) == ["python_function"]  # no pickled PyTorch flavour
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code
    assert "python_model" not in flavors["python_function"]  # the key of a cloudpickled PythonModel
    assert torch.load(folder / "artifacts" / "weights.pt", weights_only=True)  # tensors only
    served, (network, _) = load_network("models:/mulcon-demo/1"), load_model(model_file)
    batch = torch.randn(2, 3, served.image_size, served.image_size)
    with torch.no_grad():
        assert torch.allclose(served(batch), torch.sigmoid(network(batch).logits), atol=1e-6)
    metadata = json.loads((folder / "artifacts" / "model.json").read_text())
    assert served.classes == metadata["classes"] and served.thresholds == metadata["thresholds"]
    pyfunc = mlflow.pyfunc.load_model("models:/mulcon-demo/1")  # what `mlflow models serve` runs
    answer = pyfunc.predict(pd.DataFrame({"image": [encode_image(images[0])]}), params={"threshold": 0.0})
    assert list(answer["labels"][0]) and len(answer["labels"][0]) == len(served.classes)


class _Payload:
    """Pickled, it runs `touch <marker>` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_or_old_registered_model_is_refused_and_runs_nothing(registered, tmp_path, monkeypatch):
    import mlflow

    environment, _, _, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", environment["MLFLOW_TRACKING_URI"])
    folder = Path(mlflow.artifacts.download_artifacts("models:/mulcon-demo/1", dst_path=str(tmp_path / "model")))
    marker = tmp_path / "code-ran"
    torch.save({"weight": _Payload(marker)}, folder / "artifacts" / "weights.pt")
    with pytest.raises(MulconError) as refused:
        load_network(str(folder))
    assert "\n" not in str(refused.value) and "refused" in str(refused.value)
    assert "weights_only" not in str(refused.value)  # torch's advice to turn it off is not passed on
    with pytest.raises(Exception) as served:
        mlflow.pyfunc.load_model(str(folder))  # the served path refuses it too
    assert "refused" in str(served.value)
    assert not marker.exists()
    # A version registered before this format: MLmodel with the pickled PyTorch flavour.
    old = tmp_path / "old"
    old.mkdir()
    (old / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mulcon.serving\n    data: data\n"
                                 "  pytorch:\n    model_data: data\n    pickle_module_name: mlflow.pytorch.pickle_module\n")
    with pytest.raises(MulconError) as legacy:
        load_network(str(old))
    assert "pickled PyTorch module" in str(legacy.value) and "register_model_file" in str(legacy.value)
    assert "\n" not in str(legacy.value)


def test_no_model_is_loaded_with_weights_only_false():
    """No file of the library, the components or the pipeline unpickles a model: the only loads are
    `torch.load(..., weights_only=True)`, and MLflow's pickle-based PyTorch loader is not called."""
    offenders = []
    for folder in ("mulcon", "components", "pipeline"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for pattern in (r"weights_only\s*=\s*False", r"mlflow\.pytorch\.load_model", r"pickle\.loads?\(",
                            r"serialization_format\s*=\s*\"pickle\"", r"torch\.load\((?![^)]*weights_only\s*=\s*True)"):
                offenders += [f"{path.relative_to(ROOT)}: {pattern}" for _ in re.finditer(pattern, text)]
    assert offenders == []


def test_served_model_soak_paths_and_malformed_requests(registered, tmp_path):
    environment, _, images, tiny_params = registered
    root = tmp_path / "served-images"
    root.mkdir()
    shutil.copy(images[0], root / "allowed.jpg")
    (root / "escape.jpg").symlink_to(images[1])  # a symlink that leaves the folder
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening it would block: an answer proves the server never opened it
    labels = expected_labels("models:/mulcon-demo/1", str(tiny_params), images, 0.3, environment)
    with serve("models:/mulcon-demo/1", tmp_path / "serve.log", {**environment, IMAGE_ROOT_ENV: str(root)}) as (url, server):
        result = soak(url, server, images, labels, threshold=0.3, requests=40, clients=4, malformed_fraction=0.25,
                      server_path=str(fifo), request_timeout=60, max_seconds=300)
        assert result["failures"] == [] and result["valid_ok"] == result["valid"] == 30
        assert all(count == 2 for count in result["malformed"].values())
        assert result["server_alive"]

        answer = requests.post(f"{url}/invocations", timeout=30, json={"dataframe_records": [{"image": "allowed.jpg"}],
                                                                      "params": {"threshold": 0.3}})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["labels"] == labels[0]
        with ThreadPoolExecutor(4) as pool:
            refused = dict(zip(["../fifo.jpg", str(fifo), "escape.jpg", "missing.jpg"],
                               pool.map(lambda image: requests.post(f"{url}/invocations", timeout=30, json={
                                   "dataframe_records": [{"image": image}]}), ["../fifo.jpg", str(fifo), "escape.jpg",
                                                                              "missing.jpg"])))
        for image, response in refused.items():
            assert response.status_code == 400, (image, response.text)
            message = answered_error(response.text)  # MLflow's prefix echoes the client's own input
            assert message.startswith("row 0: ") and str(tmp_path) not in message, (image, response.text)
            assert images[1] not in response.text and str(root) not in response.text  # a symlink's target, the folder
        bomb = requests.post(f"{url}/invocations", timeout=30, json={"dataframe_records": [
            {"image": encode_image(images[0])}, {"image": base64.b64encode(bomb_png()).decode()}]})
        assert bomb.status_code == 400 and answered_error(bomb.text).startswith("row 1: image over PIL's decompression-bomb limit")


def test_a_server_without_an_image_folder_opens_no_path(registered, tmp_path, monkeypatch):
    """$MULCON_SERVE_IMAGE_ROOT unset (the default): the pyfunc model `mlflow models serve` loads
    refuses every path, naming the row and not the path, and never opens it (a FIFO would block)."""
    import mlflow

    environment, _, images, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", environment["MLFLOW_TRACKING_URI"])
    monkeypatch.delenv(IMAGE_ROOT_ENV, raising=False)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    model = mlflow.pyfunc.load_model("models:/mulcon-demo/1")
    for image in (str(fifo), images[0], "fifo.jpg"):
        with pytest.raises(Exception) as refused:
            model.predict(pd.DataFrame({"image": [image]}))
        assert str(refused.value).startswith("row 0: not valid base64, and this server reads no file paths")
        assert image not in str(refused.value)


def test_analyze_takes_a_registered_model(registered, tmp_path):
    """`analyze --model models:/...` loads the registered model through `load_network`: the same
    network as its model file, so both slots (the file and the registered copy) score the same."""
    environment, model_file, _, params = registered
    result = subprocess.run([sys.executable, "-m", "mulcon", "analyze", "--params", str(params), "--model",
                             "models:/mulcon-demo/1", "--bce-model", str(model_file), "--out-dir", str(tmp_path / "a"),
                             "-S", "analysis.tsne_images=12", "-S", "analysis.precision_k=3"], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["precision_at_3_mulcon"] == metrics["precision_at_3_bce_only"]


def test_images_over_the_pixel_limit_are_refused_naming_the_row():
    from mulcon.serving import BadImage, decode_image

    def png(side: int) -> str:
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    with pytest.raises(BadImage, match=r"^row 3: image of 10000 x 10000 pixels is over the limit of 89478485 pixels"):
        decode_image(png(10_000), 3)  # PIL itself only warns below twice its limit
    with pytest.raises(BadImage, match=r"^row 0: image over PIL's decompression-bomb limit of 178956970 pixels"):
        decode_image(base64.b64encode(bomb_png()).decode(), 0)
    assert decode_image(png(64), 0).size == (64, 64)


def test_mlflow_serving_an_old_pickled_version_is_refused_with_how_to_register_again():
    """Versions registered before name `mulcon.serving` as their loader: it refuses, in one line."""
    from mulcon.serving import _load_pyfunc

    with pytest.raises(MulconError) as refused:
        _load_pyfunc("data")
    assert "pickled PyTorch module" in str(refused.value) and "register_model_file(" in str(refused.value)
    assert "\n" not in str(refused.value)
