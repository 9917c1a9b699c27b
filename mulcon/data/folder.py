"""Any labelled image folder (`data.dataset: folder`): one's own photos, through the same stages as COCO.

Layout, `data/<data.name>/`:
- `images/...`: the photos (JPEG/PNG, any sub-folders).
- `labels.csv`: columns `image,labels[,split]`; `image` is the path under `images/`, `labels` the
  image's label names separated by `|` (empty: none of the labels), `split` one of train, val,
  test. A spreadsheet's export (UTF-8 byte-order mark, Windows line endings) reads as well.
- `classes.txt` (optional): one class name per line, giving the label order; otherwise the sorted
  label names found in labels.csv.
Without a split column, a seeded share of the images (`data.test_fraction`) is the test split and
val is carved from the rest as for COCO; with one, rows marked val are the val split when any is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from mulcon.data.manifest import SPLITS
from mulcon.data.records import DuplicateCheck, Record, check_inside, csv_rows
from mulcon.errors import DataError

logger = logging.getLogger(__name__)

CSV_NAME = "labels.csv"
CLASSES_NAME = "classes.txt"
COLUMNS = ("image", "labels")
SEPARATOR = "|"
LAYOUT_HINT = ("put the photos under {root}/images/ and a file {root}/labels.csv with the columns "
               "image,labels[,split] (labels separated by '|')")


def _read_classes(path: Path) -> list[str] | None:
    """The names of classes.txt in order, or None when there is none."""
    if not path.is_file():
        return None
    names, first_line = [], {}
    for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        name = text.strip()
        if not name:
            continue
        if name in first_line:
            raise DataError(f"{path}:{line}: class {name!r} is listed twice (first at line {first_line[name]})")
        first_line[name] = line
        names.append(name)
    if not names:
        raise DataError(f"{path}: lists no class")
    return names


def _read_rows(csv_file: Path) -> tuple[list[tuple[str, list[str], str | None, int]], bool, int]:
    """(image, label names, split or None, line) per row, whether the file has a split column, and
    how many rows repeated an earlier one (same image, labels and split) and were dropped."""
    rows, duplicates, has_split = [], DuplicateCheck(), None
    for line, row in csv_rows(csv_file, COLUMNS, LAYOUT_HINT.format(root=csv_file.parent)):
        if has_split is None:
            has_split = "split" in row
        if any(row.get(column) is None for column in COLUMNS):
            raise DataError(f"{csv_file}:{line}: expected the columns {','.join(COLUMNS)}, found fewer fields")
        image = check_inside(row["image"].strip(), f"{csv_file}:{line}")
        names = sorted({name.strip() for name in row["labels"].split(SEPARATOR) if name.strip()})
        split = (row.get("split") or "").strip() if has_split else None
        if has_split and split not in SPLITS:
            raise DataError(f"{csv_file}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
        if duplicates.is_new(image, (tuple(names), split), f"{csv_file}:{line}"):
            rows.append((image, names, split, line))
    return rows, bool(has_split), duplicates.repeated


def read_folder(root: str | os.PathLike,
                carve_test: Callable[[list[Record]], tuple[list[Record], list[Record]]]
                ) -> tuple[list[str], dict[str, list[Record]], dict]:
    """Read a labelled folder into class names and records per split.

    Args:
        root: the folder holding `labels.csv`, `images/` and optionally `classes.txt`.
        carve_test: (records) -> (train, test), used when labels.csv has no split column
            (prepare passes a seeded `carve_validation`).

    Returns:
        classes, splits ({"train", "test"}, plus "val" when the split column names val rows;
        a record is ("images/<image>", sorted label indices)) and a report
        {"repeated_rows", "missing_images", "unlabelled_images"}. Rows whose image file is
        missing are skipped and counted.

    Raises:
        DataError: a missing labels.csv (the message gives the layout), a header without image or
            labels, a path outside the folder, an unknown split, a label not in classes.txt, the
            same image twice with different labels (file and line named).
    """
    root = Path(root)
    csv_file = root / CSV_NAME
    rows, has_split, repeated = _read_rows(csv_file)
    classes = _read_classes(root / CLASSES_NAME) or sorted({name for _, names, _, _ in rows for name in names})
    if not classes:
        raise DataError(f"{csv_file}: no row has a label")
    index_of = {name: index for index, name in enumerate(classes)}
    tagged, missing, unlabelled = [], [], 0
    for image, names, split, line in rows:
        unknown = [name for name in names if name not in index_of]
        if unknown:
            raise DataError(f"{csv_file}:{line}: label {unknown[0]!r} is not in {root / CLASSES_NAME}")
        if not (root / "images" / image).is_file():
            missing.append(image)
            continue
        unlabelled += not names
        tagged.append((split, (f"images/{image}", sorted(index_of[name] for name in names))))
    if missing:
        logger.warning("%s: %d listed images are missing under %s and are skipped (first: %s)",
                       csv_file, len(missing), root / "images", ", ".join(missing[:3]))
    if has_split:
        splits = {split: [record for tag, record in tagged if tag == split] for split in SPLITS}
        if not splits["val"]:
            del splits["val"]  # prepare carves val from train, as for the other datasets
    else:
        splits = dict(zip(("train", "test"), carve_test([record for _, record in tagged])))
    report = {"repeated_rows": repeated, "missing_images": len(missing), "missing_examples": missing[:10],
              "unlabelled_images": unlabelled, "split_column": has_split}
    return classes, splits, report
