"""Export a trained model to ONNX (images -> label probabilities), checked against PyTorch.

The ONNX graph takes `images` (B, 3, S, S) float32, normalised as `eval_transform` does, with a
dynamic batch B, and returns `probabilities` (B, L). The class names, the image side and the
calibrated thresholds (when the model has them) travel in the file's metadata. Every export is
run with onnxruntime on a few images in the same call and compared with PyTorch: a largest
absolute difference above the tolerance is an error, and no file is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mulcon.errors import MulconError
from mulcon.io import atomic_path
from mulcon.mlflow_client import connect
from mulcon.serving import ImageClassifier, Scorer, decode_image, load_scorer

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |ONNX - PyTorch| probability accepted
CHECK_BATCHES = (1, 3)  # two batch sizes: the batch dimension must really be dynamic
OPSET = 18


class ExportError(MulconError):
    """The exported model disagrees with PyTorch, or cannot be exported or registered."""


class _Probabilities(nn.Module):
    """The scorer's network without the contrastive projections: images -> probabilities."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(images, need_projections=False).logits.float())  # (B, L)


def _check_images(scorer: Scorer, images: list[str] | None, seed: int = 0) -> list[torch.Tensor]:
    """Batches (B, 3, S, S) to compare on: the given image files, or seeded noise images."""
    if images:
        transform = ImageClassifier(scorer).transform
        return [torch.stack([transform(decode_image(path, row, local=True)) for row, path in enumerate(images)])]
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, scorer.image_size, scorer.image_size, generator=generator) for size in CHECK_BATCHES]


def check_onnx(path: str | Path, module: nn.Module, batches: list[torch.Tensor], tolerance: float = TOLERANCE) -> float:
    """The largest |onnxruntime - PyTorch| over `batches` (each (B, 3, S, S)) for the ONNX file at `path`.

    Raises:
        ExportError: the difference exceeds `tolerance`, or the output shapes differ.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    largest = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = module(batch).numpy()
            [answer] = session.run(["probabilities"], {"images": batch.numpy()})
            if answer.shape != expected.shape:
                raise ExportError(f"{path}: onnxruntime answered shape {answer.shape}, PyTorch {expected.shape}")
            largest = max(largest, float(np.abs(answer - expected).max()))
    if not largest <= tolerance:
        raise ExportError(f"{path}: onnxruntime differs from PyTorch by {largest:.3g} > {tolerance:g}")
    return largest


def export_onnx(model: str | Path, out: str | Path, *, images: list[str] | None = None,
                tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Write `model` (a model.pt or an MLflow model URI) as ONNX to `out`, checked with onnxruntime.

    Args:
        model: as for `mulcon.serving.load_scorer`.
        out: the .onnx file, written atomically: it exists only if the check passed.
        images: image files to compare on; default seeded noise batches of 1 and 3 images.
        tolerance: the largest accepted absolute difference of a probability.

    Returns:
        {"path", "max_abs_difference", "classes", "image_size", "thresholds", "checked_images"}.

    Raises:
        ExportError: the difference exceeds `tolerance` (the message gives it), or export fails.
        MulconError: the model cannot be loaded (see `load_scorer`).
    """
    import onnx

    scorer = load_scorer(model)
    module = _Probabilities(scorer.network.cpu().eval()).eval()
    example = torch.zeros(2, 3, scorer.image_size, scorer.image_size)
    batches = _check_images(scorer, images)
    out = Path(out)
    with atomic_path(out) as temporary:
        # The exporter reports its progress on stdout; the library logs instead.
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(module, (example,), str(temporary), input_names=["images"],
                              output_names=["probabilities"], opset_version=OPSET,
                              dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True,
                              external_data=False)
        graph = onnx.load(str(temporary))
        thresholds = getattr(scorer, "thresholds", None)
        metadata = {"classes": json.dumps(scorer.classes), "image_size": str(scorer.image_size),
                    "thresholds": json.dumps(thresholds)}
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(temporary))
        try:
            difference = check_onnx(temporary, module, batches, tolerance)
        except ExportError as error:
            raise ExportError(f"{out}: {str(error).split(': ', 1)[1]}; nothing written") from None
        logger.info("onnxruntime vs PyTorch on %d images: largest |difference| %.3g",
                    sum(len(batch) for batch in batches), difference)
    return {"path": str(out), "max_abs_difference": difference, "classes": scorer.classes,
            "image_size": scorer.image_size, "thresholds": thresholds,
            "checked_images": sum(len(batch) for batch in batches)}


def register_onnx(model_uri: str, onnx_file: str | Path) -> dict[str, str]:
    """Attach `onnx_file` to the registered model version `model_uri` (models:/name/version or
    models:/name@alias): logged as an artifact `onnx/<file>` of the run that made the version,
    whose URI the version's tag `onnx` then names.

    Raises:
        ExportError: `model_uri` does not name a registered model version.
    """
    _, client = connect()
    name, _, rest = str(model_uri).removeprefix("models:/").partition("/")
    try:
        if "@" in name:
            name, alias = name.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif rest:
            version = client.get_model_version(name, rest)
        else:
            raise ExportError(f"{model_uri}: --register needs a registered model version, "
                              f"such as models:/mulcon-demo/1 or models:/mulcon-demo@champion")
    except ExportError:
        raise
    except Exception as error:  # MLflow raises several types for an unknown name or version
        raise ExportError(f"{model_uri}: not a registered model version ({error})") from None
    client.log_artifact(version.run_id, str(onnx_file), "onnx")
    artifact = f"runs:/{version.run_id}/onnx/{Path(onnx_file).name}"
    client.set_model_version_tag(version.name, version.version, "onnx", artifact)
    return {"model": version.name, "version": str(version.version), "onnx": artifact}
