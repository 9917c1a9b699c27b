"""Reading prepared manifests: class names, multi-hot targets and the training `Dataset`.

Targets are the paper's y_ij in {0, 1} (section 3): one row per image, one column per label.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mulcon.data.cache import open_cache
from mulcon.errors import DataError
from mulcon.io import read_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PREPARE_HINT = "run the prepare stage first"


def _read_json(path: Path) -> object:
    return read_json(path, missing=f"{path} not found: {PREPARE_HINT}")


def load_classes(prepared_dir: str | os.PathLike) -> list[str]:
    """Class names in label-index order, from `prepared_dir/classes.json`.

    Raises:
        DataError: the file is missing or is not a non-empty list of strings.
    """
    path = Path(prepared_dir) / "classes.json"
    classes = _read_json(path)
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
        raise DataError(f"{path}: expected a non-empty JSON list of class names")
    return classes


def _parse_labels(text: str, num_labels: int, path: Path, line: int) -> list[int]:
    labels = []
    for token in text.split():
        try:
            label = int(token)
        except ValueError:
            raise DataError(f"{path}:{line}: label {token!r} is not an integer") from None
        if not 0 <= label < num_labels:
            raise DataError(f"{path}:{line}: label {label} is out of range [0, {num_labels})")
        labels.append(label)
    return labels


def read_manifest(prepared_dir: str | os.PathLike, split: str) -> tuple[list[str], np.ndarray]:
    """Image paths and multi-hot targets of one split.

    Args:
        prepared_dir: the folder written by `prepare`.
        split: "train", "val" or "test".

    Returns:
        paths: image paths relative to the raw dataset root, in manifest order.
        targets: float32 array (N, L) with 1 where the image has the label; N may be 0 (an empty
            val split).

    Raises:
        DataError: unknown split, missing manifest, a wrong header, or a row with a bad label
            index (the message names file and 1-based line, the header being line 1).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    num_labels = len(load_classes(prepared_dir))
    path = Path(prepared_dir) / f"{split}.csv"
    if not path.is_file():
        raise DataError(f"{path} not found: {PREPARE_HINT}")
    paths, rows = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        if next(reader, None) != ["image", "labels"]:
            raise DataError(f"{path}:1: expected the header 'image,labels'")
        for fields in reader:
            if len(fields) != 2 or not fields[0]:
                raise DataError(f"{path}:{reader.line_num}: expected 'image,labels', got {fields!r}")
            paths.append(fields[0])
            rows.append(_parse_labels(fields[1], num_labels, path, reader.line_num))
    targets = np.zeros((len(rows), num_labels), dtype=np.float32)
    for row, labels in enumerate(rows):
        targets[row, labels] = 1.0
    return paths, targets


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
            info = _read_json(Path(prepared_dir) / "info.json")
            if not isinstance(info, dict) or "image_root" not in info:
                raise DataError(f"{Path(prepared_dir) / 'info.json'}: key 'image_root' is missing")
            image_root = info["image_root"]
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
