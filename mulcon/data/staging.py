"""All-or-nothing output folders: build in a temporary sibling, rename into place on success.

`make_demo` and `prepare` write whole folders; an interrupted or failed run must leave either the
previous folder or nothing, never a half-written one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mulcon.errors import DataError

logger = logging.getLogger(__name__)


def check_replaceable(path: Path, marker: str) -> None:
    """Raise DataError unless `path` is absent, an empty folder, or a folder holding `marker`.

    The marker is a file this library writes last into its own outputs, so a folder of someone
    else's files is never deleted by mistake.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise DataError(f"{path} exists and is not a folder; remove it or choose another output")
    if any(path.iterdir()) and not (path / marker).is_file():
        raise DataError(
            f"refusing to replace {path}: it is not empty and holds no {marker} "
            "(it was not written by mulcon); remove it or choose another output folder"
        )


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, *, marker: str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` only if the block succeeds.

    Args:
        path: the final output folder.
        marker: a file name that identifies a folder this library wrote (see `check_replaceable`);
            the block must write it.

    Yields:
        The staging folder to fill. On an exception it is deleted and `path` is left untouched.
    """
    path = Path(path)
    check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
        _swap_into_place(staging, path, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging: Path, path: Path, marker: str) -> None:
    """Rename `staging` onto `path`, moving an older `path` aside first and deleting it after."""
    check_replaceable(path, marker)
    if not path.exists():
        os.rename(staging, path)
        return
    retired = staging.with_name(staging.name + ".old")
    os.rename(path, retired)
    os.rename(staging, path)
    shutil.rmtree(retired, ignore_errors=True)
    logger.info("replaced %s", path)
