"""A small synthetic multi-label dataset written in the COCO-2014 layout, for demos and tests.

The set goes through the same reader as real COCO (`read_coco_dataset`), so a demo run exercises
the whole pipeline. Design:
- 12 shape classes with non-contiguous category ids (1, 2, 3, 5, ...), so "class index = ascending
  category id" matters. Shapes are drawn in random palette colours, sizes, positions and small
  rotations on noisy gradient backgrounds with distractor strokes (see `shapes.py`).
- 1 to 4 objects per image (the same class may repeat); each object's bbox covers at most 13% of
  the image. Class frequencies are skewed (circle and square are common, heart and hexagon rare).
- Co-occurrence, like "cup" and "table" in COCO: when one member of a pair in `PAIRS` is drawn and
  the image has room for another object, its partner follows with probability `PAIR_PROBABILITY`.
- Two extra train images hold only clutter and no annotation; the reader must skip them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mulcon.data import shapes
from mulcon.data.staging import staged_directory
from mulcon.errors import ConfigError
from mulcon.io import write_json

logger = logging.getLogger(__name__)

# (category id, name, supercategory, sampling weight); ids skip numbers as real COCO ids do.
CATEGORIES = [
    (1, "circle", "round", 2.0), (2, "square", "polygon", 1.6), (3, "triangle", "polygon", 1.0),
    (5, "star", "polygon", 1.0), (7, "cross", "polygon", 0.8), (8, "ring", "round", 1.0),
    (11, "hexagon", "polygon", 0.6), (13, "diamond", "polygon", 1.0), (14, "arrow", "sign", 1.0),
    (17, "heart", "sign", 0.5), (19, "crescent", "round", 0.8), (22, "bar", "polygon", 1.0),
]
# Co-occurring pairs; circle, the commonest class (like "person"), pairs with nothing.
PAIRS = [("cross", "ring"), ("star", "crescent"), ("arrow", "bar")]
PAIR_PROBABILITY = 0.8
OBJECT_COUNT_PROBABILITIES = [0.15, 0.30, 0.30, 0.25]  # for 1, 2, 3, 4 objects
RADIUS_RANGE = (0.10, 0.18)  # object radius as a fraction of the image side: bbox <= (0.36 side)^2
MAX_OVERLAP = 0.3  # largest bbox intersection, as a fraction of the smaller box, before re-placing
NUM_UNANNOTATED = 2
SUMMARY_NAME = "demo.json"  # written last; also marks the folder as replaceable by a later run
SPLIT_CODES = {"train": 0, "val": 1}
FIRST_IMAGE_ID = {"train": 1, "val": 500_001}

_NAMES = [name for _, name, _, _ in CATEGORIES]
_WEIGHTS = np.array([weight for *_, weight in CATEGORIES]) / sum(weight for *_, weight in CATEGORIES)
_PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}


def sample_class_names(rng: np.random.Generator) -> list[str]:
    """Class names of one image's objects (1 to 4; repeats allowed; pairs tend to co-occur)."""
    count = int(rng.choice(4, p=OBJECT_COUNT_PROBABILITIES)) + 1
    names: list[str] = []
    while len(names) < count:
        name = _NAMES[int(rng.choice(len(_NAMES), p=_WEIGHTS))]
        names.append(name)
        if name in _PARTNER and len(names) < count and rng.random() < PAIR_PROBABILITY:
            names.append(_PARTNER[name])
    return names


def _overlap(box: np.ndarray, other: np.ndarray) -> float:
    """Intersection of two (x0, y0, x1, y1) boxes as a fraction of the smaller one."""
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
    return float(width * height / smaller)


def _place(rng: np.random.Generator, name: str, boxes: list[np.ndarray], size: int) -> np.ndarray:
    """Outline points for one object, re-drawn a few times to avoid hiding earlier objects."""
    for _ in range(30):
        radius = rng.uniform(*RADIUS_RANGE) * size
        centre = rng.uniform(radius, size - radius, size=2)
        degrees = rng.uniform(-1, 1) * shapes.MAX_ROTATION_DEGREES
        points = shapes.place_outline(name, tuple(centre), radius, degrees)
        box = np.concatenate([points.min(axis=0), points.max(axis=0)])
        if all(_overlap(box, other) <= MAX_OVERLAP for other in boxes):
            break
    return points


def render_image(rng: np.random.Generator, names: list[str],
                 size: int) -> tuple[Image.Image, list[list[float]]]:
    """Draw one image holding `names` (may be empty: clutter only).

    Returns:
        The RGB image (size x size) and one COCO bbox [x, y, width, height] per name, in order.
    """
    image = shapes.background(rng, size)
    draw = ImageDraw.Draw(image)
    shapes.draw_distractors(draw, rng, size)
    boxes: list[np.ndarray] = []
    for name in names:
        points = _place(rng, name, boxes, size)
        shapes.draw_object(draw, name, points, shapes.class_colour(rng, name))
        low, high = np.clip(points.min(axis=0), 0, size), np.clip(points.max(axis=0), 0, size)
        boxes.append(np.concatenate([low, high]))
    bboxes = [[round(float(v), 2) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])] for b in boxes]
    return image, bboxes


def _write_split(root: Path, split: str, count: int, size: int, seed: int, progress: tqdm) -> dict:
    """Write `count` annotated images (plus the unannotated ones in train) and the split's JSON."""
    folder = root / f"{split}2014"
    folder.mkdir(parents=True)
    category_ids = {name: cid for cid, name, _, _ in CATEGORIES}
    extra = NUM_UNANNOTATED if split == "train" else 0
    images, annotations = [], []
    for index in range(count + extra):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        names = sample_class_names(rng) if index < count else []
        image, bboxes = render_image(rng, names, size)
        image_id = FIRST_IMAGE_ID[split] + index
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        image.save(folder / file_name, format="JPEG", quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for name, bbox in zip(names, bboxes):
            annotations.append({
                "id": len(annotations) + 1 + 1_000_000 * SPLIT_CODES[split], "image_id": image_id,
                "category_id": category_ids[name], "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
            })
        progress.update()
    write_json(root / "annotations" / f"instances_{split}2014.json", _coco_document(images, annotations))
    return _split_summary(images, annotations, count)


def _coco_document(images: list[dict], annotations: list[dict]) -> dict:
    info = {"description": "mulcon synthetic demo set (COCO-2014 layout)", "version": "1.0",
            "year": 2014, "date_created": "2014-01-01"}
    categories = [{"id": cid, "name": name, "supercategory": group} for cid, name, group, _ in CATEGORIES]
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _split_summary(images: list[dict], annotations: list[dict], count: int) -> dict:
    labels: dict[int, set[int]] = {}
    for annotation in annotations:
        labels.setdefault(annotation["image_id"], set()).add(annotation["category_id"])
    return {
        "images": count,
        "unannotated_images": len(images) - count,
        "objects_per_image": round(len(annotations) / max(count, 1), 4),
        "labels_per_image": round(sum(map(len, labels.values())) / max(count, 1), 4),
    }


def make_demo(out_dir: str | os.PathLike, *, num_train: int = 800, num_val: int = 300,
              image_size: int = 128, seed: int = 0) -> dict:
    """Write the synthetic demo set to `out_dir` in the COCO-2014 layout, all or nothing.

    Writes `train2014/*.jpg`, `val2014/*.jpg`, `annotations/instances_{train,val}2014.json` and
    `demo.json` (the returned summary). Output is byte-identical for a given seed. An existing
    `out_dir` written by an earlier run is replaced; any other non-empty folder is refused.

    Args:
        out_dir: the dataset root to create.
        num_train: annotated train images (train2014 also gets 2 unannotated ones).
        num_val: annotated val images (the "test" split downstream).
        image_size: side of the square images, in pixels (at least 32).
        seed: seeds every image independently, from (seed, split, index).

    Returns:
        A summary: classes, category ids, co-occurring pairs and per-split counts.
    """
    if num_train < 1 or num_val < 1:
        raise ConfigError(f"make_demo: num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if image_size < 32:
        raise ConfigError(f"make_demo: image_size must be >= 32, got {image_size}")
    with staged_directory(out_dir, marker=SUMMARY_NAME) as staging:
        total = num_train + NUM_UNANNOTATED + num_val
        with tqdm(total=total, desc="demo images", unit="img") as progress:
            splits = {split: _write_split(staging, split, count, image_size, seed, progress)
                      for split, count in (("train", num_train), ("val", num_val))}
        summary = {
            "classes": _NAMES, "category_ids": [cid for cid, *_ in CATEGORIES],
            "co_occurring_pairs": [list(pair) for pair in PAIRS], "pair_probability": PAIR_PROBABILITY,
            "image_size": image_size, "seed": seed, "splits": splits,
        }
        write_json(staging / SUMMARY_NAME, summary)
    logger.info("wrote demo set to %s: %d train, %d val images", out_dir, num_train, num_val)
    return summary
