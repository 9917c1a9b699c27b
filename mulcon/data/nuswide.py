"""NUS-WIDE reader for the 200k subset used by the ASL authors (paper section 4.2).

`root/nus_wid_data.csv` has columns filename, label (a Python-list string such as
"['clouds', 'sky']") and split ("train" or "val"); images live in `root/images/<filename>`.
Classes are the sorted concept names found in the file (81 in the real data). Many images are no
longer downloadable from Flickr, so missing files are counted, reported and skipped.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

from mulcon.data.records import DuplicateCheck, Record, check_inside, csv_rows
from mulcon.errors import DataError

logger = logging.getLogger(__name__)

CSV_NAME = "nus_wid_data.csv"
SPLITS = {"train": "train", "val": "test"}  # csv split value -> our split
COLUMNS = ("filename", "label", "split")
MAX_EXAMPLES = 10
DOWNLOAD_HINT = (
    "put the ASL authors' NUS-WIDE subset there: {root}/nus_wid_data.csv (columns filename, label, "
    "split) and the images under {root}/images/"
)


def _parse_label(text: str, csv_file: Path, line: int) -> list[str]:
    """Parse "['clouds', 'sky']" into a list of names; anything else is a DataError at file:line."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise DataError(f"{csv_file}:{line}: label {text!r} is not a Python list literal") from None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise DataError(f"{csv_file}:{line}: label {text!r} must be a list of strings")
    return value


def _read_rows(csv_file: Path) -> list[tuple[str, list[str], str, int]]:
    """Rows as (filename, concept names, our split, line); errors name the file and 1-based line.

    A filename listed twice with the same labels is read once; with different labels it is an error.
    """
    rows, duplicates = [], DuplicateCheck()
    for line, row in csv_rows(csv_file, COLUMNS, DOWNLOAD_HINT.format(root=csv_file.parent)):
        filename, names, split = _parse_row(row, csv_file, line)
        check_inside(filename, f"{csv_file}:{line}")
        if duplicates.is_new(filename, (tuple(sorted(set(names))), split), f"{csv_file}:{line}"):
            rows.append((filename, names, split, line))
    return rows


def _parse_row(row: dict, csv_file: Path, line: int) -> tuple[str, list[str], str]:
    if any(row.get(column) is None for column in COLUMNS):
        raise DataError(f"{csv_file}:{line}: expected the columns {', '.join(COLUMNS)}, found fewer fields")
    if row["split"] not in SPLITS:
        raise DataError(f"{csv_file}:{line}: unknown split {row['split']!r} (expected train or val)")
    return row["filename"], _parse_label(row["label"], csv_file, line), SPLITS[row["split"]]


def read_nuswide(root: str | os.PathLike) -> tuple[list[str], dict[str, list[Record]], dict]:
    """Read the NUS-WIDE subset into class names and multi-label records per split.

    Args:
        root: folder holding `nus_wid_data.csv` and `images/`.

    Returns:
        classes: sorted concept names appearing in the csv (index = label index).
        splits: {"train": records, "test": records}; a record is ("images/<filename>", sorted label
            indices); csv split "val" is our "test". Rows whose image is missing, or whose label
            list is empty, are skipped.
        report: {"missing_images": count, "missing_examples": first few filenames,
            "unlabelled_images": count of rows with an empty label list}.

    Raises:
        DataError: the csv is missing (the message says what to put where), lacks a column, or a
            row has a malformed label or an unknown split (the message names file and line).
    """
    root = Path(root)
    csv_file = root / CSV_NAME
    rows = _read_rows(csv_file)
    classes = sorted({name for _, names, _, _ in rows for name in names})
    index_of = {name: index for index, name in enumerate(classes)}
    splits: dict[str, list[Record]] = {split: [] for split in SPLITS.values()}
    missing, unlabelled = [], 0
    for filename, names, split, _ in rows:
        if not names:
            unlabelled += 1
            continue
        if not (root / "images" / filename).is_file():
            missing.append(filename)
            continue
        splits[split].append((f"images/{filename}", sorted({index_of[name] for name in names})))
    if missing:
        logger.warning("%s: %d of %d images are missing under %s and are skipped (first: %s)",
                       csv_file, len(missing), len(rows), root / "images", ", ".join(missing[:3]))
    if unlabelled:
        logger.info("%s: skipped %d rows with an empty label list", csv_file, unlabelled)
    report = {"missing_images": len(missing), "missing_examples": missing[:MAX_EXAMPLES],
              "unlabelled_images": unlabelled}
    return classes, splits, report
