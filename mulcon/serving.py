"""Predictions for new images, and the registered model that serves them, without pickles.

A registered model is an MLflow `pyfunc` model "from code" (no pickled Python object) whose
artifacts are plain files: `weights.pt`, the network's state dict (tensors only, read with
`torch.load(weights_only=True)`), and `model.json`, the resolved config, the class names, the image
side and the calibrated thresholds. `MulconModel` (an `mlflow.pyfunc.PythonModel`) rebuilds the
network from the config and loads the weights; `load_network(uri)` does the same without running
anything from the artifact store (what `predict`, `export` and `analyze` use), so a crafted
artifact is refused with one line. Versions registered before (a pickled PyTorch module) are
refused with one line saying how to register the model again.

The served model takes images in a column `image`: base64-encoded JPEG/PNG strings. A file path is
read only under the folder named by $MULCON_SERVE_IMAGE_ROOT (unset: no path is opened), relative,
without `..`, and not leaving the folder through a symlink. It answers label names and scores
above a threshold: `params={"threshold": 0.3}`, or `params={"calibrated": true}` for the per-class
thresholds chosen on the validation split at training (MLflow gives each param one type, so the
float `threshold` cannot also take the word "calibrated"; `predict --threshold calibrated` and
`ImageClassifier.predict` take it). A bad row answers 400 naming the row, never a server path.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError
from torch import nn

from mulcon import checkpoint
from mulcon.data.records import check_inside
from mulcon.data.transforms import eval_transform
from mulcon.errors import CheckpointError, DataError, MulconError, redact
from mulcon.inference import load_model, rebuild_network
from mulcon.mlflow_client import connect, tracking_errors

DEFAULT_THRESHOLD = 0.5
CALIBRATED = "calibrated"
IMAGE_ROOT_ENV = "MULCON_SERVE_IMAGE_ROOT"  # the one folder the served model may read image files from
WEIGHTS, METADATA = "weights", "metadata"  # the model's artifacts: weights.pt and model.json
FORMAT = 1  # model.json's "format"
# The code MLflow runs to load the model (models from code: nothing is unpickled).
MODEL_CODE = "from mlflow.models import set_model\n\nfrom mulcon.serving import MulconModel\n\nset_model(MulconModel())\n"
REREGISTER = ("register it again from its model file: python -c \"from mulcon.serving import register_model_file; "
              "register_model_file('runs/<variant>/model.pt', 'mulcon-<dataset>')\"")


class Scorer(nn.Module):
    """Wraps a trained MulCon or Baseline: images (B, 3, S, S) float32 -> probabilities (B, L).

    `scorer.network` is the trained network; `thresholds` are the per-class thresholds saved
    with the model (chosen on val), or None.
    """

    def __init__(self, network: nn.Module, classes: list[str], image_size: int,
                 thresholds: list[float] | None = None):
        super().__init__()
        self.network, self.classes, self.image_size = network, list(classes), image_size
        self.thresholds = None if thresholds is None else [float(value) for value in thresholds]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(images).logits)


class BadImage(MulconError, ValueError):
    """An input that is not a readable image, or a file the server may not read."""


def _open_checked(source, where: str) -> Image.Image:
    """An RGB image from a file or a buffer, refused when over PIL's decompression-bomb limit."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > Image.MAX_IMAGE_PIXELS:  # PIL only warns up to twice the limit
                raise BadImage(f"{where}: image of {width} x {height} pixels is over the limit of "
                               f"{Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?)")
            return image.convert("RGB")
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"{where}: image over PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} "
                       "pixels (refused unread)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadImage(f"{where}: not a readable JPEG/PNG image ({type(error).__name__})") from None


def _served_file(value: str, row: int, image_root: str | None) -> Path:
    """The file under `image_root` that `value` names, or BadImage (paths off, outside, a symlink out)."""
    if not image_root:
        raise BadImage(f"row {row}: not valid base64, and this server reads no file paths (send the image "
                       f"base64-encoded; its operator may allow paths under a folder with ${IMAGE_ROOT_ENV})")
    try:
        check_inside(value, f"row {row}")
    except DataError:
        raise BadImage(f"row {row}: a file path must be relative to the server's image folder, "
                       "without '..'") from None
    root = Path(image_root).resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise BadImage(f"row {row}: the file path leaves the server's image folder (a symlink?)")
    if not path.is_file():
        raise BadImage(f"row {row}: no such file in the server's image folder")
    return path


def _is_base64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def decode_image(value: Any, row: int, *, local: bool = False, image_root: str | None = None) -> Image.Image:
    """An RGB image from a request's value (or, with `local`, from a file the caller names).

    Args:
        value: a base64-encoded JPEG/PNG (str or bytes); with `local`, a file path on this machine too.
        row: the row's number, which every error names.
        local: `value` is a path given by the machine's own user (the CLI): read it, name it in errors.
        image_root: the folder a served request may name files in (relative paths); None: no path.

    Raises:
        BadImage: not decodable, over the decompression-bomb limit, or a path not allowed.
    """
    if local and isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        return _open_checked(value, f"row {row} ({value})")
    if local and isinstance(value, str) and len(value) < 4096 and not _is_base64(value):
        raise BadImage(f"row {row} ({value}): no such image file")
    if not isinstance(value, (str, bytes)) or not value:
        raise BadImage(f"row {row}: expected a base64-encoded JPEG/PNG image, got "
                       f"{'an empty value' if isinstance(value, (str, bytes)) else type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        if isinstance(value, bytes) or len(value) > 4096:
            raise BadImage(f"row {row}: not valid base64") from None
        return _open_checked(_served_file(value, row, image_root), f"row {row}")
    return _open_checked(io.BytesIO(data), f"row {row}")


def encode_image(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


# The registered model: plain artifacts, and the pyfunc model that reads them.

def write_artifacts(scorer: Scorer, folder: Path, *, config: dict[str, Any], label_level: bool,
                    variant: str | None = None) -> dict[str, str]:
    """Write `weights.pt` (state dict) and `model.json` into `folder`; returns MLflow's `artifacts`."""
    torch.save({name: value.detach().cpu().contiguous() for name, value in scorer.network.state_dict().items()},
               folder / "weights.pt")
    metadata = {"format": FORMAT, "classes": scorer.classes, "image_size": scorer.image_size,
                "thresholds": scorer.thresholds, "label_level": bool(label_level), "variant": variant,
                "config": config}
    (folder / "model.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return {WEIGHTS: str(folder / "weights.pt"), METADATA: str(folder / "model.json")}


def scorer_from_artifacts(weights: str | Path, metadata: str | Path, name: str) -> Scorer:
    """Rebuild the Scorer from the two artifact files, reading the weights with `weights_only=True`.

    Raises:
        MulconError: a file is missing, not JSON, or holds anything but tensors (a pickled
            payload is refused before any of its code runs), naming `name` (the model's URI).
    """
    try:
        state = json.loads(Path(metadata).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("unknown format")
        weights = checkpoint.load(weights)
        network = rebuild_network(state["config"], len(state["classes"]), state["label_level"], weights)
    except CheckpointError:
        raise MulconError(f"{name}: weights.pt is not a plain state dict (refused: loading it would run "
                          "code from the artifact store)") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise MulconError(f"{name}: not a mulcon model ({type(error).__name__}: "
                          f"{' '.join(redact(error).split())[:200]})") from None
    return Scorer(network, state["classes"], int(state["image_size"]), state.get("thresholds")).eval()


def _artifact_paths(model_dir: Path, name: str) -> tuple[Path, Path]:
    """The weights and metadata files of a downloaded model folder, from its MLmodel file."""
    try:
        description = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        raise MulconError(f"{name}: not an MLflow model (no readable MLmodel file)") from None
    flavors = description.get("flavors", {}) if isinstance(description, dict) else {}
    artifacts = flavors.get("python_function", {}).get("artifacts") or {}
    if WEIGHTS not in artifacts or METADATA not in artifacts:
        if "pytorch" in flavors:
            raise MulconError(f"{name} was registered as a pickled PyTorch module, which mulcon no longer loads "
                              f"(it could run any code); {REREGISTER}")
        raise MulconError(f"{name}: not a mulcon model (no {WEIGHTS} and {METADATA} artifacts)")
    paths = [model_dir / artifacts[key]["path"] for key in (WEIGHTS, METADATA)]
    if any(not path.resolve().is_relative_to(model_dir.resolve()) for path in paths):
        raise MulconError(f"{name}: an artifact path leaves the model folder")
    return paths[0], paths[1]


def load_network(uri: str) -> Scorer:
    """The registered model at `uri` (`models:/mulcon-demo@champion`, `models:/mulcon-demo/3`,
    `runs:/<id>/model` or a local model folder) as a Scorer: images (B, 3, S, S) -> probabilities
    (B, L); `.network`, `.classes`, `.image_size`, `.thresholds`. Nothing of the model runs as code.

    Raises:
        MulconError: not loadable (one line: unknown URI, an old pickled version, a crafted artifact).
    """
    mlflow, _ = connect()
    with tempfile.TemporaryDirectory(prefix="mulcon-model-") as folder:
        try:
            model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri), dst_path=folder))
        except Exception as error:  # MLflow raises several types for an unknown model or URI
            raise MulconError(f"{redact(uri)}: not a loadable MLflow model "
                              f"({' '.join(redact(error).split())[:300]})") from None
        return scorer_from_artifacts(*_artifact_paths(model_dir, redact(uri)), redact(uri))


def load_scorer(model: str | Path) -> Scorer:
    """A Scorer from a training model file (`runs/<variant>/model.pt`) or an MLflow model URI (`load_network`)."""
    if Path(model).is_file():
        network, state = load_model(model)
        return Scorer(network, state["classes"], state["config"]["data"]["image_size"], state.get("thresholds")).eval()
    return load_network(str(model))


class ImageClassifier:
    """Images in, label names and scores (those >= threshold) out.

    `local=True` reads file paths of this machine (the CLI); otherwise images are base64 strings,
    and file paths only under `image_root`.
    """

    def __init__(self, scorer: Scorer, batch_size: int = 32, *, local: bool = False, image_root: str | None = None):
        self.scorer = scorer.eval()
        self.transform = eval_transform(scorer.image_size)
        self.batch_size, self.local, self.image_root = batch_size, local, image_root

    def scores(self, images: list) -> np.ndarray:
        """(N, L) probabilities of the images; BadImage names a bad row."""
        tensors = [self.transform(decode_image(value, row, local=self.local, image_root=self.image_root))
                   for row, value in enumerate(images)]
        batches = [torch.stack(tensors[i:i + self.batch_size]) for i in range(0, len(tensors), self.batch_size)]
        with torch.no_grad():
            return torch.cat([self.scorer(batch) for batch in batches]).numpy() if batches else np.zeros((0, len(self.scorer.classes)))

    def threshold(self, params: dict[str, Any] | None) -> np.ndarray:
        """(L,) thresholds from the params: `threshold` (a number in [0, 1], or "calibrated") and `calibrated`.

        Raises:
            MulconError: calibrated thresholds are asked for but the model has none (it was
                trained without a val split), or the threshold is neither a probability nor "calibrated".
        """
        params = params or {}
        value = params.get("threshold", DEFAULT_THRESHOLD)
        if params.get("calibrated") or value == CALIBRATED:
            if self.scorer.thresholds is None:
                raise MulconError("this model has no calibrated thresholds (it was trained without a val split)")
            return np.asarray(self.scorer.thresholds)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not 0.0 <= number <= 1.0:
            raise MulconError(f"threshold {value!r}: expected a probability in [0, 1] or {CALIBRATED!r}")
        return np.full(len(self.scorer.classes), number)

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


class MulconModel(PythonModel):
    """The pyfunc model `mlflow models serve` runs: rebuilt from the plain artifacts; bad rows answer 400."""

    def load_context(self, context) -> None:
        scorer = scorer_from_artifacts(context.artifacts[WEIGHTS], context.artifacts[METADATA], "the served model")
        self.classifier = ImageClassifier(scorer, image_root=os.environ.get(IMAGE_ROOT_ENV) or None)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.classifier.predict(model_input, params)
        except MulconError as error:  # a bad image or an impossible threshold: the client's fault
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None


def _load_pyfunc(path: str, model_config: dict | None = None):
    """The loader that versions registered before named: refused, with how to register again."""
    raise MulconError(f"this model was registered as a pickled PyTorch module, which mulcon no longer loads "
                      f"(it could run any code); {REREGISTER}")


def log_model(scorer: Scorer, *, name: str, registered_model_name: str | None, config: dict[str, Any],
              label_level: bool, metadata: dict | None = None):
    """Log `scorer` as plain artifacts with `MulconModel` (the mulcon package as code, a signature
    and an input example) and register it as `registered_model_name`."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    import mulcon

    example_image = Image.new("RGB", (scorer.image_size, scorer.image_size), (127, 127, 127))
    buffer = io.BytesIO()
    example_image.save(buffer, format="PNG")
    example = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})
    output = ImageClassifier(scorer).predict(example, {"threshold": 0.0})
    signature = infer_signature(example, output, params={"threshold": DEFAULT_THRESHOLD, "calibrated": False})
    with tempfile.TemporaryDirectory(prefix="mulcon-log-") as folder:
        artifacts = write_artifacts(scorer, Path(folder), config=config, label_level=label_level,
                                    variant=(metadata or {}).get("variant"))
        code = Path(folder) / "mulcon_model.py"
        code.write_text(MODEL_CODE, encoding="utf-8")
        return mlflow.pyfunc.log_model(name=name, python_model=str(code), artifacts=artifacts,
                                       code_paths=[str(Path(mulcon.__file__).parent)], signature=signature,
                                       input_example=example, registered_model_name=registered_model_name,
                                       await_registration_for=60, metadata=metadata)


def register_model_file(model_file: str | Path, registered_model_name: str) -> str:
    """Log a training model file (`runs/<variant>/model.pt`) in a new MLflow run and register it;
    returns the new version (how a version registered before the pickle-free format is replaced)."""
    network, state = load_model(model_file)
    mlflow, _ = connect()
    scorer = Scorer(network, state["classes"], state["config"]["data"]["image_size"], state.get("thresholds"))
    with tracking_errors("registration"), mlflow.start_run(run_name=f"register-{Path(model_file).parent.name}"):
        info = log_model(scorer, name="model", registered_model_name=registered_model_name, config=state["config"],
                         label_level=state["label_level"], metadata={"classes": scorer.classes,
                                                                      "variant": state.get("variant")})
    return str(info.registered_model_version)
