"""The prepare stage: raw dataset -> checked manifests (train / val / test) in one folder.

Output folder (written all or nothing):
- `classes.json`: class names in label-index order.
- `train.csv`, `val.csv`, `test.csv`: columns `image,labels`; image path relative to the raw dataset
  root, labels = space-separated label indices. A dataset with an ignore state (VOC-2007's
  difficult objects) adds a third column `ignore`: the space-separated indices of labels that are
  neither positive nor negative for the image; manifests without it read as before. val is carved
  from train (the paper reports on the official test split: val2014 for COCO, "val" rows for
  NUS-WIDE, `test` for VOC-2007) unless the reader gives one (a folder dataset's split column).
- `info.json`: dataset, image_root, counts and labels per image per split, skipped files with reasons,
  and per split a SHA-256 of its images' paths and bytes (`images_sha256`: part of a result's data identity).
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mulcon.data.coco import read_dataset_with_report
from mulcon.data.folder import read_folder
from mulcon.data.manifest import SPLITS
from mulcon.data.nuswide import read_nuswide
from mulcon.data.records import Record
from mulcon.data.voc import read_voc
from mulcon.data.staging import check_replaceable, staged_directory
from mulcon.errors import ConfigError, DataError
from mulcon.io import file_digest, write_json, write_text

logger = logging.getLogger(__name__)

DATASETS = ("demo", "coco2014", "nuswide", "voc2007", "folder")
INFO_NAME = "info.json"  # written last; also marks the folder as replaceable by a later run
MANIFEST_HEADER = ("image", "labels")
CHECK_WORKERS = 16  # opening images is I/O bound: threads hide disk and network-filesystem latency


def _read_raw(dataset: str, raw_dir: Path, test_fraction: float,
              seed: int) -> tuple[list[str], dict[str, list[Record]], dict]:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if dataset == "nuswide":
        return read_nuswide(raw_dir)
    if dataset == "voc2007":
        return read_voc(raw_dir)
    if dataset == "folder":
        return read_folder(raw_dir, lambda records: carve_validation(records, test_fraction, seed))
    if dataset == "demo" and not (raw_dir / "annotations").is_dir():
        raise DataError(f"{raw_dir} holds no demo set (no annotations/): create it with make_demo first")
    return read_dataset_with_report(raw_dir)  # the demo set uses the COCO-2014 layout


def check_image(path: Path) -> str | None:
    """Why `path` is unusable ("missing" or "corrupt: ..."), or None if it opens and verifies.

    Only the header and structure are checked (fast); a truncated JPEG body can still fail at
    training time, where `ManifestDataset` substitutes another image.
    """
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return f"corrupt: {type(error).__name__}: {error}"
    return None


def _checked(path: Path) -> tuple[str | None, str | None]:
    """(why `path` is unusable or None, the SHA-256 of its bytes when usable)."""
    reason = check_image(path)
    return reason, (file_digest(path) if reason is None else None)


def _filter_images(raw_dir: Path, splits: dict[str, list[Record]]) -> tuple[dict[str, list[Record]], list[dict],
                                                                              dict[str, str]]:
    """Drop records whose image is missing or does not decode; list them with reasons. Also returns
    the SHA-256 of each kept image's bytes, by path."""
    tagged = [(split, record) for split, records in splits.items() for record in records]
    with concurrent.futures.ThreadPoolExecutor(CHECK_WORKERS) as pool:
        checked = list(tqdm(pool.map(lambda item: _checked(raw_dir / item[1][0]), tagged),
                            total=len(tagged), desc="checking images", unit="img"))
    kept: dict[str, list[Record]] = {split: [] for split in splits}
    skipped, digests = [], {}
    for (split, record), (reason, digest) in zip(tagged, checked):
        if reason is None:
            kept[split].append(record)
            digests[record[0]] = digest
        else:
            skipped.append({"image": record[0], "split": split, "reason": reason})
    for entry in skipped[:5]:
        logger.warning("skipping %s (%s split): %s",
                       raw_dir / entry["image"], entry["split"], entry["reason"])
    if len(skipped) > 5:
        logger.warning("skipping %d more unusable images; all are listed in %s", len(skipped) - 5, INFO_NAME)
    return kept, skipped, digests


def images_digest(records: list[Record], digests: dict[str, str]) -> str:
    """One SHA-256 over a split's image paths and contents, in manifest order: what a result trained
    on the raw images saw (`mulcon.data.identity`)."""
    combined = hashlib.sha256()
    for record in records:
        combined.update(f"{record[0]}\0{digests[record[0]]}\n".encode())
    return combined.hexdigest()


def carve_validation(records: list[Record], val_fraction: float,
                     seed: int) -> tuple[list[Record], list[Record]]:
    """Split `records` into (train, val) with round(val_fraction * N) val records, chosen by `seed`.

    Both parts keep the input order, so the result depends only on the records, fraction and seed.
    """
    order = np.random.default_rng(seed).permutation(len(records))
    chosen = set(order[: int(round(val_fraction * len(records)))].tolist())
    train = [record for index, record in enumerate(records) if index not in chosen]
    val = [record for index, record in enumerate(records) if index in chosen]
    return train, val


def _manifest_text(records: list[Record], with_ignore: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_HEADER + (("ignore",) if with_ignore else ()))
    for image, labels, *ignored in records:
        row = [image, " ".join(map(str, labels))]
        writer.writerow(row + [" ".join(map(str, ignored[0] if ignored else []))] if with_ignore else row)
    return buffer.getvalue()


def _info(dataset: str, raw_dir: Path, splits: dict, skipped: list[dict], reader_report: dict,
          num_classes: int, val_fraction: float, seed: int) -> dict:
    def labels_per_image(records: list[Record]) -> float | None:
        return round(sum(len(record[1]) for record in records) / len(records), 4) if records else None

    return {
        "dataset": dataset, "image_root": str(raw_dir), "num_classes": num_classes,
        "val_fraction": val_fraction, "seed": seed,
        "counts": {split: len(splits[split]) for split in SPLITS},
        "labels_per_image": {split: labels_per_image(splits[split]) for split in SPLITS},
        "skipped_counts": dict(Counter(entry["reason"].split(":")[0] for entry in skipped)),
        "skipped": skipped, "reader_report": reader_report,
    }


def prepare(dataset: str, raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
            val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.2) -> dict:
    """Read a raw dataset, drop unusable images, carve a val split and write manifests to `out_dir`.

    Args:
        dataset: "demo" (the `make_demo` output, read as COCO-2014), "coco2014", "nuswide",
            "voc2007" (the devkit layout under `raw_dir/VOCdevkit/VOC2007`) or "folder"
            (`raw_dir/labels.csv` and `raw_dir/images/`, see `mulcon.data.folder`).
        raw_dir: the raw dataset root; manifest image paths are relative to it.
        out_dir: the prepared folder; replaced only if everything succeeds.
        val_fraction: share of the (filtered) train images moved to val, in [0, 1); 0 gives an
            empty val split.
        seed: seeds the choice of val images (and of a folder dataset's test images).
        test_fraction: share of a folder dataset's images carved as test when its labels.csv has
            no split column; unused otherwise.

    Returns:
        The `info.json` content: counts and labels per image per split, skipped images with reasons.

    Raises:
        DataError: unknown dataset, missing or malformed raw data, or no usable train or test image
            (no output is written, and an existing `out_dir` is left as it was).
        ConfigError: val_fraction outside [0, 1).
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    raw_dir = Path(raw_dir)
    check_replaceable(Path(out_dir), INFO_NAME)  # fail before the long image check, not after
    classes, raw_splits, reader_report = _read_raw(dataset, raw_dir, test_fraction, seed)
    kept, skipped, digests = _filter_images(raw_dir, raw_splits)
    if "val" in kept:  # the reader's own val split (a folder dataset's split column)
        splits = dict(kept)
    else:
        splits = dict(zip(("train", "val"), carve_validation(kept["train"], val_fraction, seed)))
        splits["test"] = kept["test"]
    for split in ("train", "test"):
        if not splits[split]:
            missing = reader_report.get("missing_images", 0)  # files the reader already left out
            raise DataError(f"{dataset}: no usable {split} images under {raw_dir} "
                            f"({len(raw_splits[split])} listed, {len(raw_splits[split]) - len(kept[split])} "
                            f"missing or corrupt{f'; {missing} listed files missing in all splits' if missing else ''})")
    info = _info(dataset, raw_dir, splits, skipped, reader_report, len(classes), val_fraction, seed)
    info["images_sha256"] = {split: images_digest(splits[split], digests) for split in SPLITS}
    with staged_directory(out_dir, marker=INFO_NAME) as staging:
        write_json(staging / "classes.json", classes)
        with_ignore = any(len(record) > 2 and record[2] for records in splits.values() for record in records)
        for split in SPLITS:
            write_text(staging / f"{split}.csv", _manifest_text(splits[split], with_ignore))
        write_json(staging / INFO_NAME, info)
    logger.info("prepared %s in %s: %s", dataset, out_dir, info["counts"])
    return info
