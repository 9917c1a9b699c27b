"""PASCAL VOC-2007 reader: the devkit's object annotations -> multi-label records with an ignore state.

Layout (the devkit's): `root/VOCdevkit/VOC2007/` holds `Annotations/<id>.xml`,
`ImageSets/Main/{trainval,test}.txt` (one image id per line) and `JPEGImages/<id>.jpg`. `trainval`
is our train split (val is carved from it by prepare, as for COCO); `test` is the test split.

Classes are the devkit's 20 in its order (VOCdevkit's `VOCinit.m`). An image is positive for a
class when it has a non-difficult object of it. An image whose only objects of a class are marked
`<difficult>1</difficult>` is neither positive nor negative for it: the devkit leaves such images
out of that class's AP, so the record lists the class as ignored (see `mulcon.metrics`).
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from mulcon.data.records import DuplicateCheck, Record, check_inside
from mulcon.errors import DataError

logger = logging.getLogger(__name__)

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
           "train", "tvmonitor")
DEVKIT = Path("VOCdevkit") / "VOC2007"
SPLIT_FILES = {"train": "trainval.txt", "test": "test.txt"}
DOWNLOAD_HINT = (
    "download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (PASCAL VOC-2007) and unpack "
    "both in {root}, so that {root}/VOCdevkit/VOC2007 holds Annotations/, ImageSets/Main/ and JPEGImages/"
)


def read_annotation(xml_file: Path) -> tuple[list[int], list[int]]:
    """(positive class indices, ignored class indices) of one image, both sorted.

    Raises:
        DataError: the file is missing or not XML (file, line and column), or an object has no
            name or an unknown class name.
    """
    try:
        root = ElementTree.parse(xml_file).getroot()
    except FileNotFoundError:
        raise DataError(f"{xml_file}: annotation file not found") from None
    except ElementTree.ParseError as error:
        line, column = error.position
        raise DataError(f"{xml_file}:{line}: not valid XML (column {column + 1})") from None
    positive, difficult = set(), set()
    for number, element in enumerate(root.iter("object"), start=1):
        name = (element.findtext("name") or "").strip()
        if name not in CLASSES:
            raise DataError(f"{xml_file}: object {number} has {'class ' + repr(name) if name else 'no name'}; "
                            f"expected one of the 20 VOC classes")
        is_difficult = (element.findtext("difficult") or "0").strip() == "1"
        (difficult if is_difficult else positive).add(CLASSES.index(name))
    return sorted(positive), sorted(difficult - positive)


def _image_ids(list_file: Path) -> list[tuple[str, int]]:
    """(image id, line) of an ImageSets file; a blank line is skipped, a path-like id refused."""
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"expected {list_file}: " + DOWNLOAD_HINT.format(root=list_file.parents[4])) from None
    ids = []
    for line, text in enumerate(lines, start=1):
        image_id = text.strip()
        if image_id:
            ids.append((check_inside(image_id, f"{list_file}:{line}"), line))
    return ids


def read_voc(root: str | os.PathLike) -> tuple[list[str], dict[str, list[Record]], dict]:
    """Read VOC-2007 into class names and records per split.

    Args:
        root: the folder holding `VOCdevkit/VOC2007/` (e.g. `data/voc2007`).

    Returns:
        classes: the 20 class names in the devkit's order.
        splits: {"train": records (trainval), "test": records}; a record is
            ("VOCdevkit/VOC2007/JPEGImages/<id>.jpg", positive indices, ignored indices).
            An id listed twice in one file is read once.
        report: {"ignored_pairs": {split: number of (image, class) pairs that are difficult only},
            "repeated_ids": count}.

    Raises:
        DataError: a missing folder or list (the message says what to download and where), an id
            that is a path, an id in both trainval and test (both places named), or a bad annotation.
    """
    root = Path(root)
    devkit = root / DEVKIT
    for folder in ("Annotations", "ImageSets/Main", "JPEGImages"):
        if not (devkit / folder).is_dir():
            raise DataError(f"expected folder {devkit / folder}: " + DOWNLOAD_HINT.format(root=root))
    splits: dict[str, list[Record]] = {}
    report = {"ignored_pairs": {}, "repeated_ids": 0}
    seen = DuplicateCheck()
    for split, file_name in SPLIT_FILES.items():
        list_file = devkit / "ImageSets" / "Main" / file_name
        records = []
        for image_id, line in _image_ids(list_file):
            # The split is part of the "labels" compared: an id in trainval and test is an error.
            if not seen.is_new(image_id, (split,), f"{list_file}:{line}", conflict="in another split"):
                continue
            positive, ignored = read_annotation(devkit / "Annotations" / f"{image_id}.xml")
            records.append((f"{DEVKIT.as_posix()}/JPEGImages/{image_id}.jpg", positive, ignored))
        splits[split] = records
        report["ignored_pairs"][split] = sum(len(record[2]) for record in records)
    report["repeated_ids"] = seen.repeated
    logger.info("%s: %s images, difficult-only (ignored) pairs %s", devkit,
                {split: len(records) for split, records in splits.items()}, report["ignored_pairs"])
    return list(CLASSES), splits, report
