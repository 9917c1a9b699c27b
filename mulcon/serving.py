"""Predictions for new images, and the MLflow model flavour that serves them.

A registered model is a `Scorer` (images to label probabilities) saved with MLflow's PyTorch
flavour, so `mlflow.pytorch.load_model` gives the module back; its `python_function` flavour is
replaced by this module's loader, so `mlflow.pyfunc.load_model` and `mlflow models serve` take
images (base64-encoded JPEG/PNG strings, or file paths, in a column `image`) and answer label
names and scores above a threshold: `params={"threshold": 0.3}`, or `params={"calibrated": true}` for
the per-class thresholds chosen on the validation split at training (MLflow gives each param one
type, so the float `threshold` cannot also take the word "calibrated"; `predict --threshold
calibrated` and `ImageClassifier.predict` take it).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from mulcon.data.transforms import eval_transform
from mulcon.errors import MulconError
from mulcon.inference import load_model
from mulcon.mlflow_client import connect

DEFAULT_THRESHOLD = 0.5
CALIBRATED = "calibrated"


class Scorer(nn.Module):
    """Wraps a trained MulCon or Baseline: images (B, 3, S, S) float32 -> probabilities (B, L).

    MLflow's PyTorch flavour loads it back as this module (`scorer.network` is the trained network).
    `thresholds` are the per-class thresholds saved with the model (chosen on val), or None.
    """

    def __init__(self, network: nn.Module, classes: list[str], image_size: int,
                 thresholds: list[float] | None = None):
        super().__init__()
        self.network, self.classes, self.image_size = network, list(classes), image_size
        self.thresholds = None if thresholds is None else [float(value) for value in thresholds]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(images).logits)


class BadImage(MulconError, ValueError):
    """An input that is neither a readable image file nor a base64-encoded image."""


def decode_image(value: Any, row: int) -> Image.Image:
    """An RGB image from a file path or a base64-encoded JPEG/PNG string (row names the input)."""
    if not isinstance(value, (str, bytes)) or not value:
        raise BadImage(f"row {row}: expected a base64-encoded image or a file path, got {type(value).__name__}")
    is_path = isinstance(value, str) and len(value) < 4096 and os.path.isfile(value)
    where = f"row {row} ({value})" if is_path else f"row {row}"
    try:
        if is_path:
            image = Image.open(value)
        else:
            image = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
        return image.convert("RGB")
    except (binascii.Error, ValueError):
        raise BadImage(f"row {row}: not a file path and not valid base64") from None
    except (UnidentifiedImageError, OSError) as error:
        raise BadImage(f"{where}: not a readable JPEG/PNG image ({error})") from None


def load_scorer(model: str | Path) -> Scorer:
    """A Scorer from a training model file (`runs/<variant>/model.pt`) or an MLflow model URI
    (`models:/mulcon-demo@champion`, `models:/mulcon-demo/3`, `runs:/<id>/model`)."""
    if Path(model).is_file():
        network, state = load_model(model)
        return Scorer(network, state["classes"], state["config"]["data"]["image_size"], state.get("thresholds")).eval()
    mlflow, _ = connect()
    try:
        return mlflow.pytorch.load_model(str(model), map_location="cpu").eval()
    except Exception as error:  # MLflow raises several types for an unknown model or URI
        raise MulconError(f"{model}: not a model file and not a loadable MLflow model ({error})") from None


def encode_image(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


class ImageClassifier:
    """The pyfunc model: images in, label names and scores (those >= threshold) out."""

    def __init__(self, scorer: Scorer, batch_size: int = 32):
        self.scorer = scorer.eval()
        self.transform = eval_transform(scorer.image_size)
        self.batch_size = batch_size

    def scores(self, images: list) -> np.ndarray:
        """(N, L) probabilities of the images (paths or base64 strings); BadImage names a bad row."""
        tensors = [self.transform(decode_image(value, row)) for row, value in enumerate(images)]
        batches = [torch.stack(tensors[i:i + self.batch_size]) for i in range(0, len(tensors), self.batch_size)]
        with torch.no_grad():
            return torch.cat([self.scorer(batch) for batch in batches]).numpy() if batches else np.zeros((0, len(self.scorer.classes)))

    def threshold(self, params: dict[str, Any] | None) -> np.ndarray:
        """(L,) thresholds from the params: `threshold` (a number, or "calibrated") and `calibrated`.

        Raises:
            MulconError: calibrated thresholds are asked for but the model has none (it was
                trained without a val split), or the threshold is neither a number nor "calibrated".
        """
        params = params or {}
        value = params.get("threshold", DEFAULT_THRESHOLD)
        if params.get("calibrated") or value == CALIBRATED:
            thresholds = getattr(self.scorer, "thresholds", None)  # older pickled scorers lack it
            if thresholds is None:
                raise MulconError("this model has no calibrated thresholds (it was trained without a val split)")
            return np.asarray(thresholds)
        try:
            return np.full(len(self.scorer.classes), float(value))
        except (TypeError, ValueError):
            raise MulconError(f"threshold {value!r}: expected a number or {CALIBRATED!r}") from None

    def predict(self, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        threshold = self.threshold(params)
        if isinstance(model_input, pd.DataFrame):
            column = "image" if "image" in model_input.columns else model_input.columns[0]
            images = model_input[column].tolist()
        else:
            images = list(model_input)
        rows = []
        for probabilities in self.scores(images):
            chosen = np.flatnonzero(probabilities >= threshold)
            chosen = chosen[np.argsort(-probabilities[chosen], kind="stable")]
            rows.append({"labels": [self.scorer.classes[i] for i in chosen],
                         "scores": [round(float(probabilities[i]), 6) for i in chosen]})
        return pd.DataFrame(rows, columns=["labels", "scores"])


class _PyfuncModel:
    """What `mlflow.pyfunc.load_model` returns the predictions of: bad images become a 400 answer."""

    def __init__(self, classifier: ImageClassifier):
        self.classifier = classifier

    def predict(self, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.classifier.predict(model_input, params)
        except MulconError as error:  # a bad image or an impossible threshold: the client's fault
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None


def _load_pyfunc(path: str, model_config: dict | None = None) -> _PyfuncModel:
    """MLflow's entry point for the python_function flavour (`path` is the model's data folder)."""
    from mlflow.pytorch import _load_model

    return _PyfuncModel(ImageClassifier(_load_model(path, device="cpu", weights_only=False)))


def save_model(scorer: Scorer, path: str, mlflow_model=None, **kwargs) -> None:
    """Save with the PyTorch flavour, then point the python_function flavour at this module.

    Called by `mlflow.models.Model.log(flavor=mulcon.serving, ...)`; kwargs go to
    `mlflow.pytorch.save_model`.
    """
    import mlflow.pytorch
    from mlflow.models import Model

    mlflow_model = mlflow_model or Model()
    mlflow.pytorch.save_model(scorer, path, mlflow_model=mlflow_model, serialization_format="pickle", **kwargs)
    flavor = mlflow_model.flavors["python_function"]
    flavor["loader_module"] = __name__
    mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(scorer: Scorer, *, name: str, registered_model_name: str | None, metadata: dict | None = None):
    """Log `scorer` (with the mulcon package as code, a signature and an input example)."""
    from mlflow.models import Model, infer_signature

    import mulcon
    import mulcon.serving

    example_image = Image.new("RGB", (scorer.image_size, scorer.image_size), (127, 127, 127))
    buffer = io.BytesIO()
    example_image.save(buffer, format="PNG")
    example = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})
    output = ImageClassifier(scorer).predict(example, {"threshold": 0.0})
    signature = infer_signature(example, output, params={"threshold": DEFAULT_THRESHOLD, "calibrated": False})
    return Model.log(None, mulcon.serving, name=name, registered_model_name=registered_model_name,
                     await_registration_for=60, metadata=metadata, scorer=scorer, signature=signature,
                     input_example=example, code_paths=[str(Path(mulcon.__file__).parent)])
