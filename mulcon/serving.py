"""What a registered model serves: a module mapping normalised images to label probabilities."""

from __future__ import annotations

import torch
from torch import nn


class Scorer(nn.Module):
    """Wraps a trained MulCon or Baseline: images (B, 3, S, S) float32 -> probabilities (B, L).

    MLflow's PyTorch flavour loads it back as this module (`scorer.network` is the trained network)
    and its pyfunc flavour serves it on numpy arrays of normalised images.
    """

    def __init__(self, network: nn.Module, classes: list[str], image_size: int):
        super().__init__()
        self.network, self.classes, self.image_size = network, list(classes), image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(images).logits)
