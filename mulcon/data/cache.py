"""The prepared image cache: every image of a prepared folder decoded and resized once, to the
training resolution, and kept as uint8 pixels, so that training and evaluation skip the JPEG decode
and the resize of every image in every epoch (benchmarks/bench_input.py measures the gain).

Layout, beside the manifests: `<prepared_dir>/cache/<S>/{train,val,test}.npy`, one uint8 array
(N, S, S, 3) per split in manifest order, read through a memory map, and `cache.json` (written
last: image size, the digest of each manifest, images that failed to decode).

Images are resized with the transforms' own Resize (`transforms.resize`), so a cached image is,
bit for bit, the image the raw path resizes; Resize returns an image already at (S, S) unchanged,
so the transforms then give identical tensors (tested). Raw pixels rather than JPEG files at the
training size, by measurement (benchmark 4, 448 px): re-encoded JPEGs (quality 95) change the
pixels (mean error 2.5 grey levels, up to 48) and make the training path 1.9x faster than the raw
JPEGs where the raw pixels make it 3.1x. The price is disk space, 3 S^2 bytes per image (602 KB at
448 px: 49 GB for COCO's 82k training images, 73 GB with val2014); build_cache checks for it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mulcon.data.manifest import SPLITS, read_info, read_manifest
from mulcon.data.staging import staged_directory
from mulcon.data.transforms import resize
from mulcon.errors import DataError
from mulcon.io import file_digest, read_json, usable_cpus, write_json

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
MARKER = "cache.json"  # written last; marks a complete cache (and a folder mulcon may replace)
FORMAT = "uint8 (N, S, S, 3) RGB .npy per split, manifest order"


def cache_dir(prepared_dir: str | os.PathLike, image_size: int) -> Path:
    return Path(prepared_dir) / CACHE_DIR / str(image_size)


def _manifest_digest(prepared_dir: Path, split: str) -> str:
    return file_digest(prepared_dir / f"{split}.csv")


def _resized_pixels(path: Path, image_size: int) -> np.ndarray | None:
    """(S, S, 3) uint8 pixels of the image at `path` as the transforms resize it; None if unreadable."""
    try:
        with Image.open(path) as image:
            return np.asarray(resize(image_size)(image.convert("RGB")))
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        logger.warning("cannot cache %s (%s: %s); it will be read from the raw file", path,
                       type(error).__name__, error)
        return None


def _write_split(path: Path, image_root: Path, paths: list[str], image_size: int,
                 workers: int) -> tuple[list[int], str]:
    """Write the split's pixels to the .npy at `path`; returns the indices that failed to decode and
    the SHA-256 of the pixels in manifest order (what a result trained on the cache saw)."""
    shape = (len(paths), image_size, image_size, 3)
    digest = hashlib.sha256()
    if not paths:  # a memory map cannot be empty
        np.save(path, np.zeros(shape, dtype=np.uint8))
        return [], digest.hexdigest()
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    failed = []
    # PIL releases the GIL while it decodes and resizes: threads use every core. Chunks bound the
    # images held in memory and the work left queued when the build is interrupted.
    chunk = 64 * workers
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(paths), desc=f"caching {path.stem}", unit="img") as progress:
        for start in range(0, len(paths), chunk):
            names = paths[start:start + chunk]
            for index, image in enumerate(pool.map(lambda name: _resized_pixels(image_root / name, image_size),
                                                   names), start):
                if image is None:
                    failed.append(index)
                else:
                    pixels[index] = image
                progress.update()
            digest.update(pixels[start:start + chunk].tobytes())
    pixels.flush()
    del pixels
    return failed, digest.hexdigest()


def build_cache(prepared_dir: str | os.PathLike, image_size: int, image_root: str | os.PathLike | None = None,
                *, workers: int | None = None) -> dict:
    """Decode and resize every image of every split of `prepared_dir` once, into the image cache.

    Args:
        prepared_dir: the folder written by `prepare`.
        image_size: S, the training and evaluation resolution (`data.image_size`).
        image_root: where manifest paths are rooted; defaults to info.json's image_root.
        workers: decoding threads; defaults to the usable cores.

    Returns:
        The content of `cache.json`: image size, format, and per split the image count, the
        manifest's SHA-256 and the indices of images that failed to decode (read raw later).

    Raises:
        DataError: missing manifests, or too little free disk space (checked before writing).
        The cache folder is written all or nothing: an interrupted build leaves the previous one.
    """
    prepared_dir = Path(prepared_dir)
    if image_root is None:
        image_root = read_info(prepared_dir)["image_root"]
    manifests = {split: read_manifest(prepared_dir, split)[0] for split in SPLITS}
    needed = sum(len(paths) for paths in manifests.values()) * 3 * image_size ** 2
    target = cache_dir(prepared_dir, image_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if needed > free:
        raise DataError(f"the image cache at {image_size} px needs {needed / 1e6:.2f} MB and {target.parent} "
                        f"has {free / 1e6:.2f} MB free; free space or leave the cache off")
    workers = workers or usable_cpus()
    content = {"image_size": image_size, "format": FORMAT, "resize": repr(resize(image_size)), "splits": {}}
    with staged_directory(target, marker=MARKER) as staging:
        for split, paths in manifests.items():
            failed, pixels = _write_split(staging / f"{split}.npy", Path(image_root), paths, image_size, workers)
            content["splits"][split] = {"count": len(paths), "manifest_sha256": _manifest_digest(prepared_dir, split),
                                        "pixels_sha256": pixels, "failed": failed}
        write_json(staging / MARKER, content)
    logger.info("cached %d images at %d px in %s (%.1f GB)", needed // (3 * image_size ** 2), image_size,
                target, needed / 1e9)
    return content


class ImageCache:
    """The cached pixels of one split; opens its memory map on first use, in each worker process."""

    def __init__(self, path: Path, failed: list[int]):
        self.path, self.failed = path, frozenset(failed)
        self._pixels: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # a worker maps the file itself, never copies it

    def image(self, index: int) -> Image.Image | None:
        """The RGB image (S x S) at manifest `index`, or None if it failed to decode at build time."""
        if index in self.failed:
            return None
        if self._pixels is None:
            self._pixels = np.load(self.path, mmap_mode="r")
        return Image.fromarray(np.array(self._pixels[index]))


def _usable_entry(prepared_dir: Path, split: str, image_size: int) -> tuple[dict, dict] | None:
    """(cache.json, its entry for `split`) when the cache at `image_size` can stand for the raw
    images of `split`, else None: no cache, another size or resize rule (a warning), or built from
    another manifest (a warning)."""
    folder = cache_dir(prepared_dir, image_size)
    if not (folder / MARKER).is_file():
        return None
    content = read_json(folder / MARKER, missing=f"{folder / MARKER} not found")
    entry = content.get("splits", {}).get(split)
    if content.get("image_size") != image_size or entry is None:
        return None
    if content.get("resize") != repr(resize(image_size)):
        logger.warning("%s was resized by %s, the transforms now resize by %s; reading raw images (rebuild "
                       "the cache)", folder, content.get("resize"), repr(resize(image_size)))
        return None
    if entry["manifest_sha256"] != _manifest_digest(Path(prepared_dir), split):
        logger.warning("%s was built from another %s.csv; reading raw images (rebuild the cache)", folder, split)
        return None
    return content, entry


def open_cache(prepared_dir: str | os.PathLike, split: str, image_size: int) -> ImageCache | None:
    """The cache of `split` at `image_size`, or None (the raw images are read) when there is none,
    or it was built from other manifests or under another resize rule than the current ones."""
    usable = _usable_entry(Path(prepared_dir), split, image_size)
    if usable is None:
        return None
    return ImageCache(cache_dir(prepared_dir, image_size) / f"{split}.npy", usable[1]["failed"])


def cache_identity(prepared_dir: str | os.PathLike, splits: tuple[str, ...], image_size: int | None) -> str:
    """What the loaders of `splits` read images from: "raw images", or a digest of the cache's size,
    resize rule and index (per split: count, manifest and pixel digests, failed images; "raw" for a
    split the cache cannot stand for)."""
    if image_size is None:
        return "raw images"
    usable = {split: _usable_entry(Path(prepared_dir), split, image_size) for split in splits}
    if all(entry is None for entry in usable.values()):
        return "raw images"
    index = {"image_size": image_size, "resize": repr(resize(image_size)),
             "splits": {split: entry[1] if entry else "raw" for split, entry in usable.items()}}
    return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]
