"""The identity of the data a result is computed on, recorded with every checkpoint and stage model.

A training stage reads the class names, the manifests of its splits (train, and val when there is
one) and the images of those splits, raw or from the image cache. Its data identity is a digest of
each of these, so a result made on other data (a new data version, a changed split, a cache built
under another resize rule) is never resumed or skipped: `mulcon.train` starts the stage over and
names the part that changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mulcon.data.cache import cache_identity
from mulcon.io import file_digest

CACHE_KEY = "image cache"


def data_identity(prepared_dir: str | os.PathLike, splits: tuple[str, ...], cache_size: int | None) -> dict[str, str]:
    """{part: digest} of what a stage reading `splits` of `prepared_dir` sees.

    Args:
        prepared_dir: the folder written by `prepare`.
        splits: the splits the stage reads, e.g. ("train", "val").
        cache_size: the image-cache side the loaders ask for (`data.cache_size`); None: raw images.

    Returns:
        classes.json and <split>.csv mapped to the SHA-256 of the file (16 hex digits; "missing"
        when absent), "<split> images" to the digest of the split's image files that `prepare`
        recorded in info.json (their bytes: a photo replaced under its old name counts), and
        "image cache" to `mulcon.data.cache.cache_identity`.
    """
    prepared_dir = Path(prepared_dir)

    def digest(name: str) -> str:
        path = prepared_dir / name
        return file_digest(path)[:16] if path.is_file() else "missing"

    identity = {name: digest(name) for name in ("classes.json", *(f"{split}.csv" for split in splits))}
    images = _images_digests(prepared_dir)
    identity.update({f"{split} images": images.get(split, "unrecorded")[:16] for split in splits})
    identity[CACHE_KEY] = cache_identity(prepared_dir, splits, cache_size)
    return identity


def _images_digests(prepared_dir: Path) -> dict[str, str]:
    """info.json's per-split digest of image paths and bytes (`prepare` records it), or {}."""
    try:
        return json.loads((prepared_dir / "info.json").read_text(encoding="utf-8")).get("images_sha256") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def identity_changes(saved: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The parts that differ between two data identities (all of them when `saved` is None: a
    result from before data identities were recorded)."""
    if not isinstance(saved, dict):
        return sorted(current)
    return sorted(name for name in saved.keys() | current.keys() if saved.get(name) != current.get(name))
