"""Inference shared by training (validation), evaluation, analysis and serving: the evaluation
loader, `predict_scores` and `load_model` (a trained model file back into its network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mulcon import checkpoint
from mulcon.config import Config, config_from_dict
from mulcon.data.dataset import ManifestDataset
from mulcon.data.transforms import eval_transform
from mulcon.errors import CheckpointError
from mulcon.model import build_model
from mulcon.runtime import autocast


def eval_loader(config: Config, split: str, batch_size: int) -> DataLoader:
    dataset = ManifestDataset(config.data.prepared_dir, split, eval_transform(config.data.image_size),
                              image_size=config.data.cache_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=config.data.num_workers,
                      pin_memory=torch.cuda.is_available())


@torch.no_grad()
def predict_scores(model: nn.Module, loader: DataLoader, device: torch.device,
                   precision: str = "fp32", progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and targets of every image of `loader`, in its order.

    Returns:
        scores (N, L) float32 probabilities, targets (N, L) float32 in {0, 1}.
    """
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for images, target in tqdm(loader, desc=progress, disable=progress is None, leave=False):
        with autocast(device, precision):
            logits = model(images.to(device, non_blocking=True), need_projections=False).logits
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(target)
    model.train(was_training)
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


def rebuild_network(config: dict[str, Any], num_labels: int, label_level: bool,
                    weights: dict[str, torch.Tensor]) -> nn.Module:
    """The network of a resolved config (nested dicts, as saved with a model) with `weights` loaded.

    Raises:
        ConfigError: the saved config is not valid under this code.
        RuntimeError: the weights do not fit the network (torch's message names the keys).
    """
    resolved = config_from_dict(config, ["model.pretrained=false", "model.weights_file=''"])  # the weights are given
    model = build_model(resolved.model, num_labels, label_level)
    model.load_state_dict(weights)
    return model.eval()


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network saved by training (`model.pt`, read with `weights_only=True`) and
    return it with its metadata."""
    state = checkpoint.load(path)
    if "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a mulcon model file (no model weights or config)")
    model = rebuild_network(state["config"], len(state["classes"]), state["label_level"], state["model"])
    return model.to(device).eval(), state
