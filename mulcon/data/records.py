"""What every dataset reader shares: the record type, image paths kept inside the dataset folder,
CSV files as spreadsheets write them, and images listed twice.

A record is (image path relative to the dataset root, sorted positive label indices) or, where a
dataset has an ignore state (VOC's difficult objects), (path, positives, ignored label indices).
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator, Union

from mulcon.errors import DataError

Record = Union[tuple[str, list[int]], tuple[str, list[int], list[int]]]


def check_inside(path: str, where: str) -> str:
    """`path` as given, if it is a relative path that stays inside the dataset folder.

    An absolute path, a drive letter or a `..` part would let an annotation file make prepare
    (and training) open any file on the machine; such a path is refused before anything opens it.

    Raises:
        DataError: naming `where` (file and line, or file and entry) and the path.
    """
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if not path or posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise DataError(f"{where}: image path {path!r} points outside the dataset folder "
                        f"(expected a path relative to it, without '..')")
    return path


def csv_rows(csv_file: Path, columns: tuple[str, ...], missing_hint: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row as a dict) for each data row of `csv_file`, whose header must hold `columns`.

    Reads what spreadsheets write: a UTF-8 byte-order mark, Windows line endings, quoted fields.
    The header is line 1; a row's line number is where it starts.

    Raises:
        DataError: the file is missing (with `missing_hint`), the header lacks a column, or a row
            cannot be parsed (file:line).
    """
    try:
        handle = open(csv_file, newline="", encoding="utf-8-sig")  # -sig: drops a byte-order mark
    except FileNotFoundError:
        raise DataError(f"expected {csv_file}: {missing_hint}") from None
    with handle:
        reader = csv.DictReader(handle)
        line = 2
        try:
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [column for column in columns if column not in header]
            if missing:
                raise DataError(f"{csv_file}:1: header lacks column '{missing[0]}' (expected {', '.join(columns)})")
            reader.fieldnames = header
            for row in reader:
                yield line, row
                line = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(f"{csv_file}:{reader.line_num + 1}: cannot parse: {error}") from None


class DuplicateCheck:
    """Remembers where each image was listed: the same image twice with the same labels is
    dropped (and counted), with different labels it is a DataError naming both places."""

    def __init__(self):
        self.first: dict[str, tuple[str, tuple]] = {}
        self.repeated = 0

    def is_new(self, image: str, labels: tuple, where: str, conflict: str = "with different labels") -> bool:
        if image not in self.first:
            self.first[image] = (where, labels)
            return True
        first_where, first_labels = self.first[image]
        if first_labels != labels:
            raise DataError(f"{where}: image {image!r} is listed again {conflict} (first at {first_where})")
        self.repeated += 1
        return False
