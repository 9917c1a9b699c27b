"""Predictions: the `predict` CLI on a model file and on a registered model, and the registered
model served by `mlflow models serve` on 127.0.0.1 under 200 real requests, some concurrent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from mulcon.config import load_config
from mulcon.serving import ImageClassifier, encode_image, load_scorer
from tests.conftest import BIN, ROOT, free_port, stop, wait_for


@pytest.fixture
def registered(tiny_params, tiny_data, tmp_path):
    """A tiny model trained through the CLI and registered in a sqlite MLflow store."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run([sys.executable, "-m", "mulcon", "train", "--params", str(tiny_params), "-S",
                             "tracking.enabled=true", "-S", "train.variant=mulcon_bce"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    images = sorted(str(path) for path in (tiny_data / "data" / "demo" / "val2014").glob("*.jpg"))
    return environment, tmp_path / "runs" / "mulcon_bce" / "model.pt", images


def run_predict(environment, cwd, *args):
    return subprocess.run([sys.executable, "-m", "mulcon", "predict", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_predict_cli_on_a_file_and_on_the_registry_agree(registered, tiny_params, tmp_path):
    environment, model_file, images = registered
    from_file = run_predict(environment, tmp_path, "--params", str(tiny_params), *images[:3], "--model",
                            str(model_file), "--threshold", "0.2", "--json")
    from_registry = run_predict(environment, tmp_path, "--params", str(tiny_params), *images[:3], "--model",
                                "models:/mulcon-demo/1", "--threshold", "0.2", "--json")
    assert from_file.returncode == 0 and from_registry.returncode == 0, from_file.stderr + from_registry.stderr
    answers = json.loads(from_file.stdout)
    assert answers == json.loads(from_registry.stdout)
    assert [answer["image"] for answer in answers] == images[:3]
    direct = ImageClassifier(load_scorer(model_file)).scores(images[:3])
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


def test_served_model_answers_like_the_direct_prediction(registered, tmp_path):
    environment, model_file, images = registered
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/mulcon-demo/1", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=tmp_path, env=environment,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ping", server, seconds=180)
        classifier = ImageClassifier(load_scorer(model_file))
        expected = classifier.predict([encode_image(path) for path in images], {"threshold": 0.3})
        payloads = [encode_image(path) for path in images]

        def ask(number: int) -> tuple[int, dict]:
            index = number % len(images)
            answer = requests.post(f"{url}/invocations", timeout=60, json={
                "dataframe_records": [{"image": payloads[index]}], "params": {"threshold": 0.3}})
            return index, answer

        sequential = [ask(number) for number in range(100)]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(ask, range(100, 200)))
        for index, answer in sequential + concurrent:
            assert answer.status_code == 200, answer.text
            [prediction] = answer.json()["predictions"]
            assert prediction["labels"] == expected.labels[index]
            assert prediction["scores"] == pytest.approx(expected.scores[index], abs=1e-5)
        malformed = requests.post(f"{url}/invocations", timeout=60,
                                  json={"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]})
        assert 400 <= malformed.status_code < 500
        assert "not a readable JPEG/PNG image" in malformed.text
        assert ask(0)[1].status_code == 200  # still serving
    finally:
        stop(server)
        log.close()
