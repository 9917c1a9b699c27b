"""COCO-2014 reader: instance annotations -> multi-label records (paper section 4, MS-COCO).

Class index = rank of the category id (ascending), as in the field's loaders; an image's labels are
the set of categories of its annotations; images without any annotation are skipped. The val2014
split is our "test" split, as in the paper.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

from mulcon.data.records import DuplicateCheck, Record, check_inside
from mulcon.errors import DataError
from mulcon.io import read_json

logger = logging.getLogger(__name__)

SPLIT_FILES = {
    "train": ("instances_train2014.json", "train2014"),
    "test": ("instances_val2014.json", "val2014"),  # val2014 is the test split, as in the paper
}
DOWNLOAD_HINT = (
    "download COCO-2014 from https://cocodataset.org/#download (2014 Train images, 2014 Val images, "
    "2014 Train/Val annotations) and unpack them so that {root} holds annotations/, train2014/ and val2014/"
)


def _load_json(annotation_file: Path) -> dict:
    """Parse the file and check the top-level COCO keys; errors name the file (and line/column)."""
    document = read_json(annotation_file, missing=f"{annotation_file}: annotation file not found")
    if not isinstance(document, dict):
        raise DataError(f"{annotation_file}: expected a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            problem = "missing" if key not in document else "not a list"
            raise DataError(f"{annotation_file}: key '{key}' is {problem}")
    return document


def _check_references(document: dict, annotation_file: Path) -> None:
    """Every entry has the fields we use, and every annotation names a known image and category."""
    required = {"categories": ("id", "name"), "images": ("id", "file_name"),
                "annotations": ("image_id", "category_id")}
    for key, fields in required.items():
        for position, entry in enumerate(document[key]):
            missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
            if missing:
                raise DataError(f"{annotation_file}: {key}[{position}] lacks '{missing[0]}'")
    category_ids = {category["id"] for category in document["categories"]}
    image_ids = {image["id"] for image in document["images"]}
    for position, annotation in enumerate(document["annotations"]):
        if annotation["category_id"] not in category_ids:
            raise DataError(f"{annotation_file}: annotations[{position}] refers to unknown category id "
                            f"{annotation['category_id']!r}")
        if annotation["image_id"] not in image_ids:
            raise DataError(f"{annotation_file}: annotations[{position}] refers to unknown image id "
                            f"{annotation['image_id']!r}")


def _read(annotation_file: Path, image_dir: Path) -> tuple[list[str], list[Record], int]:
    """`read_coco`, plus the number of images skipped for having no annotation."""
    document = _load_json(annotation_file)
    _check_references(document, annotation_file)
    from pycocotools.coco import COCO  # imported here: only COCO data needs it

    coco = COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco.createIndex()
    category_ids = sorted(coco.getCatIds())
    classes = [coco.loadCats(category_id)[0]["name"] for category_id in category_ids]
    index_of = {category_id: index for index, category_id in enumerate(category_ids)}
    records, unannotated, duplicates = [], 0, DuplicateCheck()
    position_of = {image["id"]: position for position, image in enumerate(document["images"])}
    for image_id in sorted(coco.getImgIds()):
        file_name = coco.loadImgs(image_id)[0]["file_name"]
        where = f"{annotation_file}: images[{position_of[image_id]}]"
        check_inside(str(file_name), where)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        if not annotations:
            unannotated += 1
            continue
        labels = sorted({index_of[annotation["category_id"]] for annotation in annotations})
        if duplicates.is_new(file_name, tuple(labels), where):
            records.append((f"{image_dir.name}/{file_name}", labels))
    if unannotated:
        logger.info("%s: skipped %d of %d images without annotations",
                    annotation_file, unannotated, len(coco.getImgIds()))
    return classes, records, unannotated


def read_coco(annotation_file: str | os.PathLike,
              image_dir: str | os.PathLike) -> tuple[list[str], list[Record]]:
    """Read one COCO instances file into class names and multi-label records.

    Args:
        annotation_file: e.g. `root/annotations/instances_train2014.json`.
        image_dir: the folder holding the split's images, e.g. `root/train2014`; assumed to sit
            directly in the dataset root.

    Returns:
        classes: category names ordered by ascending category id (index = label index).
        records: (image path relative to the dataset root, i.e. "<image_dir name>/<file_name>",
            sorted label indices), ordered by image id. Images without annotations are skipped.

    Raises:
        DataError: the file is missing, is not valid JSON (the message gives line and column),
            lacks images/annotations/categories, or an annotation names an unknown category or image.
    """
    classes, records, _ = _read(Path(annotation_file), Path(image_dir))
    return classes, records


def read_dataset_with_report(root: str | os.PathLike) -> tuple[list[str], dict[str, list[Record]], dict]:
    """`read_coco_dataset`, plus a report: images skipped per split for having no annotation."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found: " + DOWNLOAD_HINT.format(root=root))
    splits, report, class_lists = {}, {"unannotated_images": {}}, {}
    for split, (file_name, folder) in SPLIT_FILES.items():
        annotation_file, image_dir = root / "annotations" / file_name, root / folder
        if not annotation_file.is_file():
            raise DataError(f"expected {annotation_file}: " + DOWNLOAD_HINT.format(root=root))
        if not image_dir.is_dir():
            raise DataError(f"expected image folder {image_dir}: " + DOWNLOAD_HINT.format(root=root))
        classes, splits[split], report["unannotated_images"][split] = _read(annotation_file, image_dir)
        class_lists[split] = classes
    if class_lists["train"] != class_lists["test"]:
        raise DataError(f"{root}: instances_train2014.json and instances_val2014.json list different "
                        f"categories ({len(class_lists['train'])} vs {len(class_lists['test'])})")
    return class_lists["train"], splits, report


def read_coco_dataset(root: str | os.PathLike) -> tuple[list[str], dict[str, list[Record]]]:
    """Read the standard COCO-2014 layout: train2014 is "train", val2014 is "test".

    Args:
        root: folder holding `annotations/instances_{train,val}2014.json`, `train2014/`, `val2014/`.

    Returns:
        classes (ascending category id) and {"train": records, "test": records} as in `read_coco`.

    Raises:
        DataError: the root, an annotation file or an image folder is missing (the message says
            what to put where), a file is malformed, or the two splits list different categories.
    """
    classes, splits, _ = read_dataset_with_report(root)
    return classes, splits
