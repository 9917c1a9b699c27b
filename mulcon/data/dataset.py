"""The `Dataset` of a prepared split: images (raw, or from the image cache) and multi-hot targets."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from mulcon.data.cache import open_cache
from mulcon.data.manifest import load_classes, read_info, read_manifest
from mulcon.errors import DataError

logger = logging.getLogger(__name__)

class ManifestDataset(Dataset):
    """Images and multi-hot targets of one prepared split; optionally several augmented views.

    Attributes:
        classes: class names; `num_labels` = len(classes) = L.
        paths: image paths relative to `image_root`.
        targets: float32 array (N, L).
    """

    def __init__(self, prepared_dir: str | os.PathLike, split: str, transform: Callable, *,
                 views: int = 1, image_root: str | os.PathLike | None = None, image_size: int | None = None):
        """Args:
            prepared_dir: the folder written by `prepare`.
            split: "train", "val" or "test".
            transform: maps an RGB PIL image to a tensor (C, H, W); called once per view.
            views: number of independently transformed views per image (2 for the contrastive step).
            image_root: where manifest paths are rooted; defaults to info.json's image_root (a
                relative path there is relative to the working directory).
            image_size: the side the transform resizes to; when `prepared_dir` holds an image
                cache at this size (`mulcon.data.cache.build_cache`), images are read from it,
                already resized, with identical results. None, or no such cache: raw images.
        """
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.classes = load_classes(prepared_dir)
        self.paths, self.targets = read_manifest(prepared_dir, split)
        if image_root is None:
            image_root = read_info(prepared_dir)["image_root"]
        self.image_root = Path(image_root)
        self.transform = transform
        self.views = views
        self.cache = open_cache(prepared_dir, split, image_size) if image_size else None

    @property
    def num_labels(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, index: int) -> Image.Image | None:
        """The RGB image at `index`, or None (with a warning) if it cannot be read."""
        if self.cache is not None:
            image = self.cache.image(index)
            if image is not None:  # None: the image failed to decode when the cache was built
                return image
        path = self.image_root / self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # forces a full decode, so truncated files fail here
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            logger.warning("cannot load %s (%s: %s); using the next image instead",
                           path, type(error).__name__, error)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """Returns:
            image: tensor (C, H, W) if views == 1, else a tuple of `views` tensors (C, H, W).
            target: float32 tensor (L,) of the image actually returned.

        An image that fails to load is replaced by the next index (cyclically) that loads, so one
        bad file does not end an epoch; if none loads, DataError.
        """
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            image = self._open(candidate)
            if image is not None:
                break
        else:
            raise DataError(f"no image of {len(self)} under {self.image_root} could be loaded")
        if self.views == 1:
            views = self.transform(image)
        else:
            views = tuple(self.transform(image) for _ in range(self.views))
        return views, torch.from_numpy(self.targets[candidate].copy())
