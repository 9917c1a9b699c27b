"""Generated datasets for the own-data tests: a mini PASCAL VOC-2007 in the devkit layout, and a
labelled image folder (`data.dataset: folder`). Images are tiny JPEGs whose colour bands depend on
their labels, so one epoch learns something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mulcon.data.voc import CLASSES

VOC_USED = CLASSES[:5]  # aeroplane .. bottle: a few classes keep every one present in both splits


def _image(path: Path, labels: list[int], rng: np.random.Generator, size: int = 32) -> None:
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    band = size // 5
    for label in labels:  # label j paints band j in a colour of its own
        pixels[label * band:(label + 1) * band] = (40 * label + 60, 255 - 40 * label, 128)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _xml(objects: list[tuple[str, bool]]) -> str:
    body = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{int(difficult)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                   f"<xmax>20</xmax><ymax>20</ymax></bndbox></object>" for name, difficult in objects)
    return f"<annotation><folder>VOC2007</folder><size><width>32</width><height>32</height></size>{body}</annotation>"


def make_mini_voc(root: Path, num_trainval: int = 30, num_test: int = 16, seed: int = 0) -> dict:
    """`root/VOCdevkit/VOC2007/` with Annotations, ImageSets/Main/{trainval,test}.txt, JPEGImages.

    Every fourth image also has a difficult-only object of a class it lacks; returns
    {"ignored": {image id: [class index, ...]}, "labels": {image id: [class index, ...]}}.
    """
    rng = np.random.default_rng(seed)
    devkit = root / "VOCdevkit" / "VOC2007"
    (devkit / "Annotations").mkdir(parents=True, exist_ok=True)
    (devkit / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    truth = {"ignored": {}, "labels": {}}
    ids = {"trainval": [], "test": []}
    for number in range(num_trainval + num_test):
        image_id = f"{number + 1:06d}"
        ids["trainval" if number < num_trainval else "test"].append(image_id)
        labels = sorted(rng.choice(len(VOC_USED), size=int(rng.integers(1, 3)), replace=False).tolist())
        objects = [(CLASSES[label], False) for label in labels]
        if labels:
            objects.append((CLASSES[labels[0]], True))  # difficult beside a plain one: still positive
        ignored = []
        if number % 4 == 0:
            ignored = [next(label for label in range(len(VOC_USED)) if label not in labels)]
            objects.append((CLASSES[ignored[0]], True))
        (devkit / "Annotations" / f"{image_id}.xml").write_text(_xml(objects))
        _image(devkit / "JPEGImages" / f"{image_id}.jpg", labels, rng)
        truth["labels"][image_id], truth["ignored"][image_id] = labels, ignored
    for name, listed in ids.items():
        (devkit / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(listed) + "\n")
    return truth


FOLDER_CLASSES = ("beach", "cat", "dog", "snow")


def make_folder(root: Path, num_images: int = 40, seed: int = 0, split_column: bool = False,
                spreadsheet: bool = False) -> Path:
    """`root/images/<sub>/<n>.jpg` and `root/labels.csv` (image,labels[,split], labels joined by |).

    spreadsheet=True writes the csv as spreadsheets do: a UTF-8 byte-order mark and CRLF endings.
    """
    rng = np.random.default_rng(seed)
    lines = ["image,labels" + (",split" if split_column else "")]
    for number in range(num_images):
        labels = sorted(rng.choice(len(FOLDER_CLASSES), size=int(rng.integers(1, 3)), replace=False).tolist())
        image = f"{'holiday' if number % 2 else 'home'}/{number:03d}.jpg"
        _image(root / "images" / image, labels, rng)
        row = f"{image},{'|'.join(FOLDER_CLASSES[label] for label in labels)}"
        if split_column:
            row += "," + ("test" if number % 5 == 0 else "val" if number % 5 == 1 else "train")
        lines.append(row)
    text = ("\r\n" if spreadsheet else "\n").join(lines) + ("\r\n" if spreadsheet else "\n")
    (root / "labels.csv").write_bytes(("\ufeff" if spreadsheet else "").encode() + text.encode("utf-8"))
    return root
