"""Prepared manifests: class names, the per-split image lists with multi-hot targets, info.json.

Targets are the paper's y_ij in {0, 1} (section 3): one row per image, one column per label, and
-1 where a manifest's optional third column `ignore` marks a label as neither positive nor
negative for the image (VOC-2007's difficult objects; see `mulcon.metrics`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from mulcon.errors import DataError
from mulcon.io import read_json

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
        targets: float32 array (N, L) with 1 where the image has the label, -1 where the label is
            ignored for it (the `ignore` column), 0 elsewhere; N may be 0 (an empty val split).

    Raises:
        DataError: unknown split, missing manifest, a wrong header, or a row with a bad label
            index or a label both positive and ignored (the message names file and 1-based line,
            the header being line 1).
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
        header = next(reader, None)
        if header not in (["image", "labels"], ["image", "labels", "ignore"]):
            raise DataError(f"{path}:1: expected the header 'image,labels' or 'image,labels,ignore'")
        for fields in reader:
            if len(fields) != len(header) or not fields[0]:
                raise DataError(f"{path}:{reader.line_num}: expected '{','.join(header)}', got {fields!r}")
            paths.append(fields[0])
            labels = _parse_labels(fields[1], num_labels, path, reader.line_num)
            ignored = _parse_labels(fields[2], num_labels, path, reader.line_num) if len(fields) > 2 else []
            if set(labels) & set(ignored):
                raise DataError(f"{path}:{reader.line_num}: label {sorted(set(labels) & set(ignored))[0]} "
                                f"is both positive and ignored")
            rows.append((labels, ignored))
    targets = np.zeros((len(rows), num_labels), dtype=np.float32)
    for row, (labels, ignored) in enumerate(rows):
        targets[row, labels] = 1.0
        targets[row, ignored] = -1.0
    return paths, targets


def read_info(prepared_dir: str | os.PathLike) -> dict[str, Any]:
    """`prepared_dir/info.json` (dataset, image_root, counts, ...).

    Raises:
        DataError: the file is missing, or has no `image_root`.
    """
    path = Path(prepared_dir) / "info.json"
    info = _read_json(path)
    if not isinstance(info, dict) or "image_root" not in info:
        raise DataError(f"{path}: key 'image_root' is missing")
    return info
