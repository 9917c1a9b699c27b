"""Image transforms (paper section 4, implementation details).

Training: resize to a square (or, in step 1 of the authors' recipe, a RandomResizedCrop of area
`crop_scale`), random horizontal flip, RandAugment. The authors' public code draws
the two views of an image independently with this same pipeline and no crop, so `ManifestDataset`
simply calls it once per view. Evaluation: resize only. Both take PIL images and end with ImageNet
normalisation, returning plain, contiguous float32 tensors (3, s, s).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ToNormalisedTensor:
    """RGB PIL image -> ImageNet-normalised float32 tensor (3, H, W), contiguous.

    The arithmetic of v2.ToImage, ToDtype(float32, scale=True) and Normalize (x * (1/255), minus
    the mean, divided by the std), so the values are the same bit for bit (tested); but it converts
    to float straight into a contiguous (3, H, W) buffer and works in place there, where v2 keeps
    the PIL layout's strides and allocates per step: about 0.5 ms against 1.5 ms for a 448 px
    image, 14% more training images per second from raw JPEGs (benchmarks/bench_input.py).
    """

    def __init__(self):
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB PIL image, got mode {image.mode!r}")
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8 view of (H, W, 3)
        normalised = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        return normalised.mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={IMAGENET_MEAN}, std={IMAGENET_STD})"


def resize(image_size: int) -> Callable:
    """Resize((s, s)), bilinear and antialiased (PIL's resize), as the transforms below resize.

    The image cache (`mulcon.data.cache`) resizes with this same transform once, at prepare time;
    on an image already at (s, s) it returns the image itself, so a cached image goes through the
    transforms exactly as the raw path's resized image does.
    """
    return v2.Resize((image_size, image_size))


def train_transform(image_size: int, randaugment: bool = True,
                    crop_scale: tuple[float, float] = (1.0, 1.0)) -> Callable:
    """Resize((s, s)) or RandomResizedCrop -> random horizontal flip -> RandAugment -> normalised tensor.

    Args:
        image_size: output side s in pixels (448 in the paper).
        randaugment: apply RandAugment (torchvision defaults: 2 ops, magnitude 9) on the PIL image.
        crop_scale: (low, high) area fraction of RandomResizedCrop (default aspect ratios 3/4-4/3);
            (1.0, 1.0), the paper's choice, is the plain resize (no crop at all).

    Returns:
        A callable mapping an RGB PIL image to a float32 tensor (3, s, s).
    """
    if tuple(crop_scale) == (1.0, 1.0):
        first: Callable = resize(image_size)
    else:
        first = v2.RandomResizedCrop((image_size, image_size), scale=tuple(crop_scale))
    steps: list[Callable] = [first, v2.RandomHorizontalFlip()]
    if randaugment:
        steps.append(v2.RandAugment())
    return v2.Compose(steps + [ToNormalisedTensor()])


def eval_transform(image_size: int) -> Callable:
    """Resize((s, s)) -> normalised tensor; deterministic.

    Args:
        image_size: output side s in pixels.

    Returns:
        A callable mapping an RGB PIL image to a float32 tensor (3, s, s).
    """
    return v2.Compose([resize(image_size), ToNormalisedTensor()])
