"""Tests for mulcon.data: the demo generator, the COCO and NUS-WIDE readers, prepare, manifests."""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mulcon.data import (
    ManifestDataset, eval_transform, load_classes, make_demo, prepare, read_coco, read_coco_dataset,
    read_manifest, read_nuswide, train_transform,
)
from mulcon.data import demo as demo_module
from mulcon.errors import ConfigError, DataError

SIZE = 64
prepare_module = importlib.import_module("mulcon.data.preparation")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """200 train + 40 val demo images at 64 px (read-only: copy it before changing files)."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    make_demo(root, num_train=200, num_val=40, image_size=SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def prepared(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "demo"
    prepare("demo", demo_root, out, val_fraction=0.1, seed=0)
    return out


def load_annotations(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2014.json").read_text())


def leftovers(folder: Path) -> list[str]:
    """Hidden staging folders left beside an output (there must be none)."""
    return [path.name for path in folder.iterdir() if path.name.startswith(".")]


# ---------------------------------------------------------------- make_demo


def test_make_demo_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_demo(tmp_path / name, num_train=24, num_val=12, image_size=SIZE, seed=seed)
    for split in ("train", "val"):
        files = [tmp_path / name / "annotations" / f"instances_{split}2014.json" for name in "abc"]
        assert files[0].read_bytes() == files[1].read_bytes()
        assert files[0].read_bytes() != files[2].read_bytes()
    images = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").glob("*2014/*.jpg"))
    assert len(images) == 24 + 2 + 12
    pixels = {name: [np.asarray(Image.open(tmp_path / name / path)) for path in images] for name in "abc"}
    assert all(np.array_equal(x, y) for x, y in zip(pixels["a"], pixels["b"]))
    assert not all(np.array_equal(x, y) for x, y in zip(pixels["a"], pixels["c"]))


def test_make_demo_statistics(demo_root):
    document = load_annotations(demo_root)
    category_ids = [category["id"] for category in document["categories"]]
    assert len(category_ids) >= 10 and category_ids != list(range(1, len(category_ids) + 1))
    objects: dict[int, list[int]] = {image["id"]: [] for image in document["images"]}
    for annotation in document["annotations"]:
        objects[annotation["image_id"]].append(annotation["category_id"])
        x, y, width, height = annotation["bbox"]
        assert 0 < width * height <= 0.15 * SIZE * SIZE
        assert x >= 0 and y >= 0 and x + width <= SIZE and y + height <= SIZE
    annotated = [ids for ids in objects.values() if ids]
    assert len(annotated) == 200 and len(objects) == 202  # two clutter-only images
    assert all(1 <= len(ids) <= 4 for ids in annotated)
    assert np.mean([len(set(ids)) for ids in annotated]) >= 2.0
    assert any(len(set(ids)) < len(ids) for ids in annotated)  # a class can repeat
    names = {category["id"]: category["name"] for category in document["categories"]}
    present = np.array([[name in {names[i] for i in ids} for name in demo_module._NAMES]
                        for ids in annotated])
    for first, second in demo_module.PAIRS:
        a, b = present[:, demo_module._NAMES.index(first)], present[:, demo_module._NAMES.index(second)]
        lift = (a & b).mean() / (a.mean() * b.mean())
        assert lift > 2.0, (first, second, lift)


def test_make_demo_replaces_its_own_output_and_refuses_foreign_folders(tmp_path):
    target = tmp_path / "demo"
    make_demo(target, num_train=4, num_val=2, image_size=SIZE, seed=0)
    summary = make_demo(target, num_train=6, num_val=2, image_size=SIZE, seed=1)
    assert summary["splits"]["train"]["images"] == 6
    assert len(list((target / "train2014").glob("*.jpg"))) == 6 + 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to replace"):
        make_demo(foreign, num_train=4, num_val=2, image_size=SIZE)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_interrupted_make_demo_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_render(rng, names, size):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(rng, names, size)

    original = demo_module.render_image
    monkeypatch.setattr(demo_module, "render_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        make_demo(tmp_path / "demo", num_train=10, num_val=2, image_size=SIZE)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- read_coco


def write_coco(path: Path, document: dict | str) -> Path:
    path.write_text(document if isinstance(document, str) else json.dumps(document, indent=1))
    return path


def small_coco() -> dict:
    return {
        "images": [{"id": 9, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"},
                   {"id": 5, "file_name": "empty.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 40, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 2, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 40, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
            {"id": 4, "image_id": 3, "category_id": 7, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 1},
        ],
        "categories": [{"id": 40, "name": "zebra"}, {"id": 2, "name": "bicycle"}, {"id": 7, "name": "train"}],
    }


def test_read_coco_orders_classes_by_category_id_and_skips_unannotated(tmp_path, caplog):
    annotation_file = write_coco(tmp_path / "instances.json", small_coco())
    with caplog.at_level(logging.INFO):
        classes, records = read_coco(annotation_file, tmp_path / "train2014")
    assert classes == ["bicycle", "train", "zebra"]
    assert records == [("train2014/b.jpg", [1]), ("train2014/a.jpg", [0, 2])]
    assert "skipped 1 of 3 images" in caplog.text


def test_read_coco_dataset_on_demo_layout(demo_root):
    classes, splits = read_coco_dataset(demo_root)
    assert classes[:3] == ["circle", "square", "triangle"] and len(classes) == 12
    assert len(splits["train"]) == 200 and len(splits["test"]) == 40  # clutter-only images skipped
    assert splits["train"][0][0].startswith("train2014/COCO_train2014_")
    for path, labels in splits["test"]:
        assert (demo_root / path).is_file() and labels == sorted(set(labels))


def test_read_coco_invalid_json_names_file_and_line(tmp_path):
    annotation_file = write_coco(tmp_path / "broken.json", '{\n "images": [],\n "annotations": [,]\n}')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 3, column"):
        read_coco(annotation_file, tmp_path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_read_coco_missing_key_is_named(tmp_path, key):
    document = small_coco()
    del document[key]
    annotation_file = write_coco(tmp_path / "instances.json", document)
    with pytest.raises(DataError, match=rf"instances\.json: key '{key}' is missing"):
        read_coco(annotation_file, tmp_path)


def test_read_coco_unknown_category_and_missing_file(tmp_path):
    document = small_coco()
    document["annotations"][1]["category_id"] = 99
    annotation_file = write_coco(tmp_path / "instances.json", document)
    with pytest.raises(DataError, match=r"annotations\[1\] refers to unknown category id 99"):
        read_coco(annotation_file, tmp_path)
    with pytest.raises(DataError, match=r"nothere\.json: annotation file not found"):
        read_coco(tmp_path / "nothere.json", tmp_path)


def test_read_coco_dataset_says_what_to_put_where(tmp_path, demo_root):
    with pytest.raises(DataError, match=r"not found: download COCO-2014"):
        read_coco_dataset(tmp_path / "absent")
    (tmp_path / "coco").mkdir()
    with pytest.raises(DataError, match=r"expected .*annotations/instances_train2014\.json: download"):
        read_coco_dataset(tmp_path / "coco")
    root = tmp_path / "mismatch"
    shutil.copytree(demo_root / "annotations", root / "annotations")
    (root / "train2014").mkdir()
    (root / "val2014").mkdir()
    document = load_annotations(root, "val")
    document["categories"] = document["categories"][:-1]
    document["annotations"] = [a for a in document["annotations"] if a["category_id"] != 22]
    write_coco(root / "annotations" / "instances_val2014.json", document)
    with pytest.raises(DataError, match="different categories"):
        read_coco_dataset(root)


# ---------------------------------------------------------------- read_nuswide


def nuswide_root(tmp_path: Path, rows: list[str], images: list[str]) -> Path:
    root = tmp_path / "nuswide"
    (root / "images").mkdir(parents=True)
    for name in images:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "images" / name)
    (root / "nus_wid_data.csv").write_text("filename,label,split\n" + "\n".join(rows) + "\n")
    return root


NUS_ROWS = [
    "a.jpg,\"['sky', 'clouds']\",train",
    "b.jpg,\"['water']\",val",
    "gone.jpg,\"['zebra']\",train",
    "c.jpg,\"['clouds', 'water', 'clouds']\",train",
]


def test_read_nuswide_sorts_classes_and_reports_missing_images(tmp_path, caplog):
    root = nuswide_root(tmp_path, NUS_ROWS, ["a.jpg", "b.jpg", "c.jpg"])
    classes, splits, report = read_nuswide(root)
    assert classes == ["clouds", "sky", "water", "zebra"]  # from the whole file, missing images included
    assert splits == {"train": [("images/a.jpg", [0, 1]), ("images/c.jpg", [0, 2])],
                      "test": [("images/b.jpg", [2])]}
    assert report["missing_images"] == 1 and report["missing_examples"] == ["gone.jpg"]
    assert "1 of 4 images are missing" in caplog.text


@pytest.mark.parametrize("bad_row, message", [
    ("d.jpg,\"['sky', \",train", r"nus_wid_data\.csv:4: label .* is not a Python list literal"),
    ("d.jpg,\"[1, 2]\",train", r"nus_wid_data\.csv:4: label .* must be a list of strings"),
    ("d.jpg,\"['sky']\",validation", r"nus_wid_data\.csv:4: unknown split 'validation'"),
])
def test_read_nuswide_malformed_rows_name_file_and_line(tmp_path, bad_row, message):
    root = nuswide_root(tmp_path, NUS_ROWS[:2] + [bad_row] + NUS_ROWS[2:], ["a.jpg"])
    with pytest.raises(DataError, match=message):
        read_nuswide(root)


def test_read_nuswide_missing_csv_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"expected .*nus_wid_data\.csv: put .*images/"):
        read_nuswide(tmp_path)


# ---------------------------------------------------------------- prepare


def read_csv_rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_prepare_writes_manifests_and_info(prepared, demo_root):
    assert load_classes(prepared)[:2] == ["circle", "square"]
    info = json.loads((prepared / "info.json").read_text())
    assert info["counts"] == {"train": 180, "val": 20, "test": 40}
    assert info["image_root"] == str(demo_root) and info["skipped"] == []
    assert info["reader_report"]["unannotated_images"] == {"train": 2, "test": 0}
    assert info["labels_per_image"]["train"] >= 2
    rows = read_csv_rows(prepared / "train.csv")
    assert rows[0] == "image,labels" and len(rows) == 181
    image, labels = rows[1].split(",")
    assert (demo_root / image).is_file() and all(0 <= int(label) < 12 for label in labels.split())
    train = {row.split(",")[0] for row in rows[1:]}
    val = {row.split(",")[0] for row in read_csv_rows(prepared / "val.csv")[1:]}
    assert not train & val and len(train | val) == 200


def test_prepare_carves_val_deterministically(prepared, demo_root, tmp_path):
    prepare("demo", demo_root, tmp_path / "same", val_fraction=0.1, seed=0)
    prepare("demo", demo_root, tmp_path / "other", val_fraction=0.1, seed=1)
    prepare("demo", demo_root, tmp_path / "none", val_fraction=0.0)
    assert (tmp_path / "same" / "val.csv").read_bytes() == (prepared / "val.csv").read_bytes()
    assert (tmp_path / "other" / "val.csv").read_bytes() != (prepared / "val.csv").read_bytes()
    assert read_csv_rows(tmp_path / "none" / "val.csv") == ["image,labels"]
    assert len(read_csv_rows(tmp_path / "none" / "train.csv")) == 201


def test_prepare_filters_corrupt_and_missing_images(demo_root, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(demo_root, raw)
    _, splits = read_coco_dataset(raw)
    corrupt, missing = splits["train"][3][0], splits["test"][0][0]
    (raw / corrupt).write_bytes(b"this is not a jpeg" * 10)
    (raw / missing).unlink()
    info = prepare("demo", raw, tmp_path / "out", val_fraction=0.1)
    reasons = {entry["image"]: entry["reason"] for entry in info["skipped"]}
    assert reasons[missing] == "missing" and reasons[corrupt].startswith("corrupt")
    assert info["skipped_counts"] == {"corrupt": 1, "missing": 1}
    assert info["counts"]["train"] + info["counts"]["val"] == 199 and info["counts"]["test"] == 39
    manifests = "".join((tmp_path / "out" / f"{split}.csv").read_text() for split in ("train", "val", "test"))
    assert corrupt not in manifests and missing not in manifests


def test_prepare_nuswide_maps_val_to_test(tmp_path):
    root = nuswide_root(tmp_path, NUS_ROWS, ["a.jpg", "b.jpg", "c.jpg"])
    info = prepare("nuswide", root, tmp_path / "out", val_fraction=0.0)
    assert info["counts"] == {"train": 2, "val": 0, "test": 1}
    assert info["reader_report"]["missing_images"] == 1
    assert read_csv_rows(tmp_path / "out" / "test.csv") == ["image,labels", "images/b.jpg,2"]


def test_prepare_empty_split_raises_and_leaves_nothing(tmp_path):
    root = nuswide_root(tmp_path, ["b.jpg,\"['water']\",val", "a.jpg,\"['sky']\",train"], ["b.jpg"])
    with pytest.raises(DataError, match=r"nuswide: no usable train images under .*nuswide"):
        prepare("nuswide", root, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_prepare_failure_leaves_existing_output_untouched(prepared, demo_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    empty = nuswide_root(tmp_path, ["b.jpg,\"['water']\",val"], ["b.jpg"])
    with pytest.raises(DataError):
        prepare("nuswide", empty, out)

    def failing_manifest(records, with_ignore):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "_manifest_text", failing_manifest)
    with pytest.raises(OSError, match="disk full"):
        prepare("demo", demo_root, out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_prepare_rejects_bad_arguments(demo_root, tmp_path):
    expected = "unknown dataset 'imagenet'; expected one of demo, coco2014, nuswide, voc2007, folder"
    with pytest.raises(DataError, match=expected):
        prepare("imagenet", demo_root, tmp_path / "out")
    with pytest.raises(DataError, match=r"holds no demo set .*make_demo"):
        prepare("demo", tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\)"):
        prepare("demo", demo_root, tmp_path / "out", val_fraction=1.0)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- manifests and the Dataset


def write_prepared(folder: Path, rows: list[str]) -> Path:
    folder.mkdir()
    (folder / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    (folder / "train.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    return folder


def test_read_manifest_builds_multi_hot_targets(tmp_path):
    folder = write_prepared(tmp_path / "p", ["x.jpg,0 2", "y.jpg,1"])
    paths, targets = read_manifest(folder, "train")
    assert paths == ["x.jpg", "y.jpg"] and targets.dtype == np.float32
    np.testing.assert_array_equal(targets, [[1, 0, 1], [0, 1, 0]])


@pytest.mark.parametrize("bad_row, message", [
    ("z.jpg,0 3", r"train\.csv:3: label 3 is out of range \[0, 3\)"),
    ("z.jpg,1 x", r"train\.csv:3: label 'x' is not an integer"),
    ("z.jpg", r"train\.csv:3: expected 'image,labels'"),
])
def test_read_manifest_bad_rows_name_file_and_line(tmp_path, bad_row, message):
    folder = write_prepared(tmp_path / "p", ["x.jpg,0 2", bad_row])
    with pytest.raises(DataError, match=message):
        read_manifest(folder, "train")


def test_read_manifest_missing_file_is_named(tmp_path):
    folder = write_prepared(tmp_path / "p", ["x.jpg,0"])
    with pytest.raises(DataError, match=r"val\.csv not found"):
        read_manifest(folder, "val")


def test_manifest_dataset_single_view(prepared):
    dataset = ManifestDataset(prepared, "test", eval_transform(32))
    assert len(dataset) == 40 and dataset.num_labels == 12 and dataset.targets.shape == (40, 12)
    image, target = dataset[5]
    assert type(image) is torch.Tensor and image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target.dtype == torch.float32 and torch.equal(target, torch.from_numpy(dataset.targets[5]))
    assert torch.equal(dataset[5][0], image)  # eval transform is deterministic


def test_manifest_dataset_two_views_differ_but_share_the_target(prepared):
    torch.manual_seed(0)
    dataset = ManifestDataset(prepared, "train", train_transform(32), views=2)
    for index in range(3):
        (first, second), target = dataset[index]
        assert first.shape == second.shape == (3, 32, 32)
        assert not torch.equal(first, second)
        assert torch.equal(target, torch.from_numpy(dataset.targets[index]))


def test_manifest_dataset_substitutes_an_unreadable_image(prepared, demo_root, tmp_path, caplog):
    raw = tmp_path / "raw"
    shutil.copytree(demo_root, raw)
    dataset = ManifestDataset(prepared, "train", eval_transform(32), image_root=raw)
    broken = dataset.paths[7]
    (raw / broken).write_bytes((raw / broken).read_bytes()[:300])  # truncated after prepare's check
    with caplog.at_level(logging.WARNING):
        image, target = dataset[7]
    assert broken in caplog.text and "using the next image" in caplog.text
    assert torch.equal(target, torch.from_numpy(dataset.targets[8]))
    assert torch.equal(image, dataset[8][0])
    for path in dataset.paths:
        (raw / path).unlink()
    with pytest.raises(DataError, match="could be loaded"):
        dataset[0]


def test_read_manifest_reads_the_ignore_column(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    (folder / "train.csv").write_text("image,labels,ignore\nx.jpg,0,2\ny.jpg,1,\nz.jpg,1,1\n")
    with pytest.raises(DataError, match=r"train\.csv:4: label 1 is both positive and ignored"):
        read_manifest(folder, "train")
    (folder / "train.csv").write_text("image,labels,ignore\nx.jpg,0,2\ny.jpg,1,\n")
    np.testing.assert_array_equal(read_manifest(folder, "train")[1], [[1, 0, -1], [0, 1, 0]])


# ---------------------------------------------------------------- VOC-2007, folders, bad input by trying

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from mulcon.data.folder import read_folder  # noqa: E402
from mulcon.data.voc import read_voc  # noqa: E402
from tests.conftest import BIN, ROOT  # noqa: E402
from tests.owndata_sets import make_folder, make_mini_voc  # noqa: E402


def cli_error(tmp_path: Path, *args: str) -> str:
    """Run the CLI, expect exit 2, return its one error line (without the 'error: ' prefix)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "mulcon", *args, "--params", str(ROOT / "params.yaml"),
                             "-S", "tracking.enabled=false", "-S", f"data.prepared_root={tmp_path / 'prepared'}"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0].removeprefix("error: ")


def prepare_error(tmp_path: Path, dataset: str, *settings: str) -> str:
    extra = [item for setting in settings for item in ("-S", setting)]
    message = cli_error(tmp_path, "prepare", "-S", f"data.dataset={dataset}", "-S", f"data.root={tmp_path / 'data'}",
                        *extra)
    assert not (tmp_path / "prepared").exists()  # no partial output
    return message


def test_read_voc_keeps_devkit_order_and_ignores_difficult_only_classes(tmp_path):
    truth = make_mini_voc(tmp_path, num_trainval=8, num_test=4)
    classes, splits, report = read_voc(tmp_path)
    assert len(classes) == 20 and classes[-1] == "tvmonitor" and classes[14] == "person"
    for path, positive, ignored in splits["train"] + splits["test"]:
        assert (positive, ignored) == (truth["labels"][Path(path).stem], truth["ignored"][Path(path).stem])
    assert report["ignored_pairs"] == {"train": 2, "test": 1}


def test_read_voc_bad_annotations_name_the_file(tmp_path):
    make_mini_voc(tmp_path, num_trainval=4, num_test=2)
    annotation = tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    annotation.write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(DataError, match=r"000002\.xml: object 1 has class 'unicorn'"):
        read_voc(tmp_path)
    annotation.write_text("<annotation>\n<object>")
    with pytest.raises(DataError, match=r"000002\.xml:2: not valid XML"):
        read_voc(tmp_path)
    with pytest.raises(DataError, match=r"expected folder .*JPEGImages: download VOCtrainval_06-Nov-2007\.tar"):
        shutil.rmtree(tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages")
        read_voc(tmp_path)


def test_voc_id_in_both_splits_and_outside_paths_are_refused_through_the_cli(tmp_path):
    make_mini_voc(tmp_path / "data" / "voc2007", num_trainval=4, num_test=2)
    lists = tmp_path / "data" / "voc2007" / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    (lists / "test.txt").write_text("000005\n000002\n")
    assert re.search(r"test\.txt:2: image '000002' is listed again in another split \(first at .*trainval\.txt:2\)",
                     prepare_error(tmp_path, "voc2007"))
    (lists / "test.txt").write_text("000005\n../../../../etc/hostname\n")
    assert re.search(r"test\.txt:2: image path '\.\./\.\./\.\./\.\./etc/hostname' points outside the dataset folder",
                     prepare_error(tmp_path, "voc2007"))


def test_read_folder_classes_txt_and_split_column(tmp_path):
    make_folder(tmp_path, num_images=10, split_column=True)
    (tmp_path / "classes.txt").write_text("snow\ndog\ncat\nbeach\nzebra\n")
    classes, splits, report = read_folder(tmp_path, carve_test=None)
    assert classes == ["snow", "dog", "cat", "beach", "zebra"]  # classes.txt's order, unused ones kept
    assert {split: len(records) for split, records in splits.items()} == {"train": 6, "val": 2, "test": 2}
    (tmp_path / "classes.txt").write_text("snow\ndog\n")
    with pytest.raises(DataError, match=r"labels\.csv:\d+: label '(beach|cat)' is not in .*classes\.txt"):
        read_folder(tmp_path, carve_test=None)


def test_folder_test_split_is_carved_by_seed(tmp_path):
    make_folder(tmp_path / "photos", num_images=20)
    first = prepare("folder", tmp_path / "photos", tmp_path / "a", seed=3, test_fraction=0.25)
    again = prepare("folder", tmp_path / "photos", tmp_path / "b", seed=3, test_fraction=0.25)
    other = prepare("folder", tmp_path / "photos", tmp_path / "c", seed=4, test_fraction=0.25)
    assert first["counts"]["test"] == 5
    assert (tmp_path / "a" / "test.csv").read_text() == (tmp_path / "b" / "test.csv").read_text()
    assert (tmp_path / "a" / "test.csv").read_text() != (tmp_path / "c" / "test.csv").read_text()
    assert other["counts"] == first["counts"]


@pytest.mark.parametrize("row, message", [
    ("../secret.jpg,cat", r"labels\.csv:3: image path '\.\./secret\.jpg' points outside the dataset folder"),
    ("/etc/hostname,cat", r"labels\.csv:3: image path '/etc/hostname' points outside the dataset folder"),
    ("home/000.jpg,dog", r"labels\.csv:3: image 'home/000\.jpg' is listed again with different labels "
                         r"\(first at .*labels\.csv:2\)"),
])
def test_folder_bad_rows_exit_2_through_the_cli(tmp_path, row, message):
    root = make_folder(tmp_path / "data" / "photos", num_images=3, spreadsheet=True)
    lines = (root / "labels.csv").read_bytes().decode("utf-8").split("\r\n")
    lines[1] = "home/000.jpg,cat"  # a known first row
    lines.insert(2, row)
    (root / "labels.csv").write_bytes("\r\n".join(lines).encode("utf-8"))
    assert re.search(message, prepare_error(tmp_path, "folder", "data.name=photos"))


def test_data_name_is_required_for_a_folder_dataset(tmp_path):
    assert "data.name: dataset folder needs the name of a folder under data.root" in prepare_error(tmp_path, "folder")


def test_nuswide_reads_spreadsheet_csv_and_refuses_bad_rows_through_the_cli(tmp_path):
    root = nuswide_root(tmp_path / "data", NUS_ROWS, ["a.jpg", "b.jpg", "c.jpg"])
    text = (root / "nus_wid_data.csv").read_text()
    (root / "nus_wid_data.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    classes, splits, _ = read_nuswide(root)  # a byte-order mark and CRLF line endings
    assert classes == ["clouds", "sky", "water", "zebra"] and len(splits["train"]) == 2
    (root / "nus_wid_data.csv").write_text(text + "/etc/hostname,\"['sky']\",train\n")
    assert re.search(r"nus_wid_data\.csv:6: image path '/etc/hostname' points outside the dataset folder",
                     prepare_error(tmp_path, "nuswide"))
    (root / "nus_wid_data.csv").write_text(text + "a.jpg,\"['water']\",train\n")
    assert re.search(r"nus_wid_data\.csv:6: image 'a\.jpg' is listed again with different labels "
                     r"\(first at .*nus_wid_data\.csv:2\)", prepare_error(tmp_path, "nuswide"))


def test_coco_outside_paths_and_conflicting_duplicates_are_refused(tmp_path):
    document = small_coco()
    document["images"][1]["file_name"] = "../../b.jpg"
    annotation_file = write_coco(tmp_path / "instances.json", document)
    with pytest.raises(DataError, match=r"instances\.json: images\[1\]: image path '\.\./\.\./b\.jpg' points outside"):
        read_coco(annotation_file, tmp_path / "train2014")
    document = small_coco()
    document["images"][1]["file_name"] = "a.jpg"  # image 3 (category 7) reuses image 9's file
    write_coco(annotation_file, document)
    with pytest.raises(DataError, match=r"images\[0\]: image 'a\.jpg' is listed again with different labels "
                                        r"\(first at .*images\[1\]\)"):
        read_coco(annotation_file, tmp_path / "train2014")


@pytest.mark.parametrize("content", ["bytes", "pickle"])
def test_a_file_that_is_no_model_gives_one_short_line(tmp_path, content):
    import argparse

    path = tmp_path / "model.pt"
    if content == "bytes":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        torch.save({"model": argparse.Namespace(a=1)}, path)  # weights_only refuses the pickled class
    message = cli_error(tmp_path, "evaluate", "--model", str(path))
    assert message.startswith(f"{path}: not a mulcon model or checkpoint file")
    assert "weights_only" not in message and len(message) < 200
