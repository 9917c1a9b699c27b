"""Image transforms (paper section 4, implementation details).

Training: resize to a square, random horizontal flip, RandAugment. The authors' public code draws
the two views of an image independently with this same pipeline and no crop, so `ManifestDataset`
simply calls it once per view. Evaluation: resize only. Both take PIL images and end with ImageNet
normalisation, returning plain float32 tensors (3, s, s).
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised_tensor() -> list[Callable]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),  # a plain Tensor, not a tv_tensors.Image, for collate and the model
    ]


def train_transform(image_size: int, randaugment: bool = True) -> Callable:
    """Resize((s, s)) -> random horizontal flip -> RandAugment (optional) -> normalised tensor.

    Args:
        image_size: output side s in pixels (448 in the paper).
        randaugment: apply RandAugment (torchvision defaults: 2 ops, magnitude 9) on the PIL image.

    Returns:
        A callable mapping an RGB PIL image to a float32 tensor (3, s, s).
    """
    steps: list[Callable] = [v2.Resize((image_size, image_size)), v2.RandomHorizontalFlip()]
    if randaugment:
        steps.append(v2.RandAugment())
    return v2.Compose(steps + _to_normalised_tensor())


def eval_transform(image_size: int) -> Callable:
    """Resize((s, s)) -> normalised tensor; deterministic.

    Args:
        image_size: output side s in pixels.

    Returns:
        A callable mapping an RGB PIL image to a float32 tensor (3, s, s).
    """
    return v2.Compose([v2.Resize((image_size, image_size))] + _to_normalised_tensor())
