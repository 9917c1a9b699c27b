"""The fast data path: the prepared image cache (identical tensors to the raw path, fallbacks,
all-or-nothing builds) and the transforms' own tensor conversion (torchvision's values, bit for bit)."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mulcon.data import ManifestDataset, eval_transform, make_demo, prepare, train_transform
from mulcon.data import cache as cache_module
from mulcon.data.cache import build_cache, cache_dir, open_cache
from mulcon.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mulcon.errors import DataError

SIZE = 40  # the cache's training resolution; the demo images are 48 px (a real downscale)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "demo"
    make_demo(root, num_train=30, num_val=10, image_size=48, seed=3)
    return root


@pytest.fixture
def prepared(raw, tmp_path) -> Path:
    out = tmp_path / "prepared"
    prepare("demo", raw, out, val_fraction=0.2, seed=0)
    return out


def test_cache_gives_the_raw_paths_tensors(prepared):
    content = build_cache(prepared, SIZE, workers=2)
    assert content["image_size"] == SIZE
    assert {split: entry["count"] for split, entry in content["splits"].items()} == {"train": 24, "val": 6, "test": 10}
    assert (cache_dir(prepared, SIZE) / "train.npy").is_file()
    pixels = np.load(cache_dir(prepared, SIZE) / "train.npy", mmap_mode="r")
    assert pixels.shape == (24, SIZE, SIZE, 3) and pixels.dtype == np.uint8
    for split, transform in (("test", eval_transform(SIZE)), ("train", train_transform(SIZE))):
        raw_path = ManifestDataset(prepared, split, transform)
        cached = ManifestDataset(prepared, split, transform, image_size=SIZE)
        assert raw_path.cache is None and cached.cache is not None
        for index in range(len(cached)):
            torch.manual_seed(index)  # the same RandAugment draws for both paths
            expected, target = raw_path[index]
            torch.manual_seed(index)
            image, cached_target = cached[index]
            assert torch.equal(image, expected), (split, index)
            assert torch.equal(target, cached_target)


def test_two_views_and_worker_processes_read_the_cache(prepared):
    build_cache(prepared, SIZE)
    dataset = ManifestDataset(prepared, "train", train_transform(SIZE), views=2, image_size=SIZE)
    loader = DataLoader(dataset, batch_size=4, num_workers=1)
    (first, second), targets = next(iter(loader))
    assert first.shape == second.shape == (4, 3, SIZE, SIZE) and targets.shape == (4, 12)
    dataset[0]  # maps the file in this process
    assert dataset.cache._pixels is not None
    assert pickle.loads(pickle.dumps(dataset)).cache._pixels is None  # a worker maps it, never copies it


def test_other_size_or_no_cache_reads_raw_images(prepared):
    assert open_cache(prepared, "train", SIZE) is None
    build_cache(prepared, SIZE)
    assert open_cache(prepared, "train", 32) is None
    assert ManifestDataset(prepared, "train", eval_transform(32), image_size=32).cache is None


def test_cache_of_other_manifests_is_ignored_with_a_warning(prepared, caplog):
    build_cache(prepared, SIZE)
    manifest = prepared / "train.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one image fewer
    with caplog.at_level(logging.WARNING):
        dataset = ManifestDataset(prepared, "train", eval_transform(SIZE), image_size=SIZE)
    assert dataset.cache is None
    assert "built from another train.csv" in caplog.text
    assert open_cache(prepared, "test", SIZE) is not None  # the other splits still match


def test_image_failing_at_build_is_read_raw(raw, tmp_path, caplog):
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    out = tmp_path / "prepared"
    prepare("demo", copy, out, val_fraction=0.0, seed=0)
    dataset = ManifestDataset(out, "test", eval_transform(SIZE))
    broken = copy / dataset.paths[3]
    healthy = broken.read_bytes()
    broken.write_bytes(healthy[:300])  # truncated after prepare's header check
    with caplog.at_level(logging.WARNING):
        content = build_cache(out, SIZE)
    assert content["splits"]["test"]["failed"] == [3] and content["splits"]["val"]["count"] == 0
    assert dataset.paths[3] in caplog.text
    broken.write_bytes(healthy)  # repaired later: the cache falls back to the raw file for it
    cached = ManifestDataset(out, "test", eval_transform(SIZE), image_size=SIZE)
    assert cached.cache.image(3) is None
    assert torch.equal(cached[3][0], dataset[3][0])


def test_interrupted_build_keeps_the_previous_cache(prepared, monkeypatch):
    build_cache(prepared, SIZE)
    before = (cache_dir(prepared, SIZE) / "cache.json").read_text()
    calls = []

    def failing(path, image_size):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return np.zeros((image_size, image_size, 3), np.uint8)

    monkeypatch.setattr(cache_module, "_resized_pixels", failing)
    with pytest.raises(KeyboardInterrupt):
        build_cache(prepared, SIZE, workers=1)
    assert (cache_dir(prepared, SIZE) / "cache.json").read_text() == before
    assert sorted(path.name for path in (prepared / "cache").iterdir()) == [str(SIZE)]  # no staging left


def test_too_little_disk_space_is_refused_before_writing(prepared, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DataError, match=r"image cache at 40 px needs 0\.19 MB and .* has 0\.00 MB free"):
        build_cache(prepared, SIZE)
    assert not cache_dir(prepared, SIZE).exists()


def test_a_cache_built_under_another_resize_rule_is_refused(prepared, caplog):
    build_cache(prepared, SIZE)
    marker = cache_dir(prepared, SIZE) / "cache.json"
    content = json.loads(marker.read_text())
    assert "Resize" in content["resize"] and "40" in content["resize"]
    assert open_cache(prepared, "test", SIZE) is not None
    content["resize"] = content["resize"].replace("bilinear", "nearest").replace("BILINEAR", "NEAREST")
    assert content["resize"] != json.loads(marker.read_text())["resize"]
    marker.write_text(json.dumps(content))  # as a cache built by an older rule would record it
    with caplog.at_level(logging.WARNING):
        assert open_cache(prepared, "test", SIZE) is None
    assert "was resized by" in caplog.text and "reading raw images (rebuild the cache)" in caplog.text


@pytest.mark.parametrize("size", [32, 45])
def test_transforms_give_torchvisions_values_bit_for_bit(size):
    # The transforms as they were, with torchvision's own tensor conversion and normalisation.
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor()]
    reference_train = v2.Compose([v2.Resize((size, size)), v2.RandomHorizontalFlip(), v2.RandAugment(), *tail])
    reference_eval = v2.Compose([v2.Resize((size, size)), *tail])
    generator = np.random.default_rng(size)
    for seed in range(5):
        image = Image.fromarray(generator.integers(0, 256, (50, 61, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        expected = reference_train(image)
        torch.manual_seed(seed)
        produced = train_transform(size)(image)
        assert torch.equal(produced, expected) and produced.is_contiguous()
        assert torch.equal(eval_transform(size)(image), reference_eval(image))
