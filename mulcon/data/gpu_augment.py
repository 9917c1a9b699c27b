"""Flip and RandAugment on the training device (`data.augment_device: cuda`), batched.

The training transform (`mulcon.data.transforms.train_transform`) flips and augments each PIL image
in a loader worker: at 448 px that CPU work, not the GPU, bounds an H100's training rate. Here the
work is split. In the worker, `SampledAugmentation` only resizes (a no-op on an image-cache image)
and draws the augmentation parameters from the sample's seeded RNG (`mulcon.data.sampling`), in
the order torchvision's RandomHorizontalFlip and RandAugment draw them (defaults: 2 operations,
magnitude 9 of 31 bins), and returns the uint8 pixels with them: every sample stays a pure function
of (seed, epoch, index). In the training loop, `to_device` copies the uint8 batch to the device
and `augment_batch` applies the flips and the operations there with torchvision.transforms.v2's
functionals, one call per (operation, signed magnitude) group of the batch, then ImageNet-normalises.

`augment_sample` is the per-sample reference: on CPU tensors `augment_batch` gives exactly its
images (tested), and it gives exactly what torchvision's own v2 RandomHorizontalFlip + RandAugment
give on the same uint8 tensor under the same seed (tested). The tensor kernels are not PIL's, so the
images differ from `augment_device: cpu` (PIL) ones: the key changes results.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from mulcon.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize

NUM_OPS = 2  # torchvision RandAugment defaults
MAGNITUDE = 9
NUM_MAGNITUDE_BINS = 31
# torchvision.transforms.v2.RandAugment's augmentation space, in its order (the sampled index is
# an index into this tuple): name -> (magnitude of bin MAGNITUDE for side S, or None; signed).
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def magnitude(name: str, image_size: int) -> float:
    """The unsigned magnitude torchvision's RandAugment uses for operation `name` (0 if it has none)."""
    bins, index = NUM_MAGNITUDE_BINS, MAGNITUDE
    if name in ("ShearX", "ShearY"):
        return float(torch.linspace(0.0, 0.3, bins)[index])
    if name in ("TranslateX", "TranslateY"):
        return float(torch.linspace(0.0, 150.0 / 331.0 * image_size, bins)[index])
    if name == "Rotate":
        return float(torch.linspace(0.0, 30.0, bins)[index])
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return float(torch.linspace(0.0, 0.9, bins)[index])
    if name == "Posterize":
        return float((8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int()[index])
    if name == "Solarize":
        return float(torch.linspace(1.0, 0.0, bins)[index])
    return 0.0


class AugmentedView(NamedTuple):
    """One view as the worker returns it (collated: a batch of them).

    pixels: uint8 (3, S, S), resized, not yet flipped or augmented ((B, 3, S, S) collated).
    params: int64 (1 + 2 NUM_OPS,): flip (0/1), then per operation its index in OPS and whether
        its magnitude is negated (0/1) ((B, 1 + 2 NUM_OPS) collated).
    """

    pixels: torch.Tensor
    params: torch.Tensor


def sample_parameters(randaugment: bool = True) -> torch.Tensor:
    """Draw a view's parameters from torch's default RNG, as v2.RandomHorizontalFlip then
    v2.RandAugment draw them. Without RandAugment the operations are Identity (nothing drawn)."""
    values = [int(torch.rand(1) < 0.5)]
    for _ in range(NUM_OPS):
        if not randaugment:
            values += [0, 0]
            continue
        op = int(torch.randint(len(OPS), ()))
        negative = OPS[op] in SIGNED and bool(torch.rand(()) <= 0.5)
        values += [op, int(negative)]
    return torch.tensor(values, dtype=torch.int64)


class SampledAugmentation:
    """The worker's side of `augment_device: cuda`: RGB PIL image -> AugmentedView (resized pixels
    and the sampled parameters). An image already at S x S (from the image cache) is not resized."""

    def __init__(self, image_size: int, randaugment: bool = True):
        self.resize, self.randaugment = resize(image_size), randaugment

    def __call__(self, image: Image.Image) -> AugmentedView:
        pixels = torch.from_numpy(np.array(self.resize(image))).permute(2, 0, 1)  # (3, S, S) uint8
        return AugmentedView(pixels, sample_parameters(self.randaugment))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize!r}, randaugment={self.randaugment})"


def apply_operation(images: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """RandAugment operation `name` with signed magnitude `value` on uint8 images (..., 3, H, W),
    exactly as torchvision's v2.RandAugment applies it to a tensor (nearest interpolation, fill 0)."""
    if name == "Identity":
        return images
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(value))
        return F.affine(images, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                        shear=[shear, 0.0] if name == "ShearX" else [0.0, shear])
    if name in ("TranslateX", "TranslateY"):
        translate = [int(value), 0] if name == "TranslateX" else [0, int(value)]
        return F.affine(images, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0])
    if name == "Rotate":
        return F.rotate(images, angle=value)
    if name == "Brightness":
        return F.adjust_brightness(images, brightness_factor=1.0 + value)
    if name == "Color":
        return F.adjust_saturation(images, saturation_factor=1.0 + value)
    if name == "Contrast":
        return F.adjust_contrast(images, contrast_factor=1.0 + value)
    if name == "Sharpness":
        return F.adjust_sharpness(images, sharpness_factor=1.0 + value)
    if name == "Posterize":
        return F.posterize(images, bits=int(value))
    if name == "Solarize":
        return F.solarize(images, threshold=255.0 * value)
    if name == "AutoContrast":
        return F.autocontrast(images)
    if name == "Equalize":
        return F.equalize(images)
    raise ValueError(f"unknown RandAugment operation {name!r}")


def _operation(params: torch.Tensor, step: int, image_size: int) -> tuple[str, float]:
    name = OPS[int(params[1 + 2 * step])]
    value = magnitude(name, image_size)
    return name, -value if int(params[2 + 2 * step]) else value


def augment_sample(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The reference path: flip and RandAugment one view. uint8 (3, S, S), int64 params -> uint8 (3, S, S)."""
    if int(params[0]):
        pixels = F.horizontal_flip(pixels)
    for step in range(NUM_OPS):
        pixels = apply_operation(pixels, *_operation(params, step, pixels.shape[-1]))
    return pixels


def augment_batch(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """`augment_sample` on every view of a batch, one functional call per group of views that
    share an (operation, signed magnitude) at each step.

    Args:
        pixels: uint8 (B, 3, S, S), on any device.
        params: int64 (B, 1 + 2 NUM_OPS), on the CPU: grouping reads it without a device sync.

    Returns:
        uint8 (B, 3, S, S) on pixels' device; the input is not modified.
    """
    params = params.cpu()
    pixels = pixels.clone()
    columns = [params[:, :1]] + [params[:, 1 + 2 * step:3 + 2 * step] for step in range(NUM_OPS)]
    for step, keys in enumerate(columns):
        for key in torch.unique(keys, dim=0):
            rows = (keys == key).all(dim=1).nonzero().flatten()
            if step == 0:
                if not int(key[0]):
                    continue
                function = F.horizontal_flip
            else:
                name, value = _operation(params[rows[0]], step - 1, pixels.shape[-1])
                if name == "Identity":
                    continue
                function = functools.partial(apply_operation, name=name, value=value)
            if pixels.is_cuda:  # pinned: the copy is asynchronous (no wait for the device)
                rows = rows.pin_memory()
            rows = rows.to(pixels.device, non_blocking=True)
            pixels[rows] = function(pixels[rows])
    return pixels


_STATISTICS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> ImageNet-normalised float32, with ToNormalisedTensor's arithmetic."""
    if pixels.device not in _STATISTICS:  # copied to the device once
        _STATISTICS[pixels.device] = (torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1),
                                      torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1))
    mean, std = _STATISTICS[pixels.device]
    return pixels.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def to_device(images, device: torch.device):
    """A collated `images` field on `device`: float tensors are copied (non-blocking from pinned
    memory); AugmentedView batches are copied as uint8, augmented and normalised there. Lists (the
    views of a contrastive step) map element-wise."""
    if isinstance(images, AugmentedView):
        return normalise(augment_batch(images.pixels.to(device, non_blocking=True), images.params))
    if isinstance(images, (list, tuple)):
        return [to_device(view, device) for view in images]
    return images.to(device, non_blocking=True)


def prefetch(batches: Iterable, load: Callable, device: torch.device) -> Iterator:
    """`load(batch)` for each batch; on CUDA, the next batch is loaded on a side stream while the
    caller works on the current one (copies and augmentation overlap the training step)."""
    if device.type != "cuda":
        yield from (load(batch) for batch in batches)
        return
    stream, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    iterator = iter(batches)

    def upcoming():
        batch = next(iterator, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return load(batch)

    loaded = upcoming()
    while loaded is not None:
        main.wait_stream(stream)
        for tensor in torch.utils._pytree.tree_leaves(loaded):
            if isinstance(tensor, torch.Tensor):
                tensor.record_stream(main)  # allocated on the side stream, used on the main one
        current, loaded = loaded, upcoming()
        yield current
