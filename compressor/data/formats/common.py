"""What every format reader shares: the row and problem types and the file helpers.

Each reader (one module per format, registered in :mod:`compressor.data.formats`) turns one
:class:`~compressor.recipe.schema.DataSource` into :class:`Row` objects without opening any
image, and reports bad rows as :class:`Problem` objects instead of raising, so that the loader
can list all of them at once (or skip them with ``data.skip_invalid``). Problems with the file
itself (not found, not JSON, a CSV without the required columns) are never skippable and raise
:class:`~compressor.errors.DataError` or :class:`~compressor.errors.UserInputError` at once.

Image ids of csv and imagefolder rows are the file's path relative to the image folder without
its extension (the file stem for files at the top of the folder). File names must stay inside
the image folder: ``../x.jpg`` or an absolute path elsewhere is a bad row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from compressor.data.dataset import Example
from compressor.errors import DataError, UserInputError

#: Problem kinds (the error message groups rows by kind).
ESCAPE = "image path outside the image folder"
EMPTY = "empty or whitespace-only text"
UNKNOWN_IMAGE = "annotation for an image id not in images[]"
DUPLICATE = "duplicate image entry"
MALFORMED = "malformed row"
MISSING_IMAGE = "image file not found"
CORRUPT_IMAGE = "image file cannot be read"
NO_CAPTION_LEFT = "image left without any valid caption"


@dataclass
class Problem:
    """One bad row.

    Attributes:
        kind: one of the kind constants of this module.
        where: file and row, e.g. ``"captions.json annotations[12] (id=34, image_id=999)"``.
        detail: what exactly is wrong with it.
    """

    kind: str
    where: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Row:
    """A parsed example and where it came from (for messages)."""

    example: Example
    where: str


@dataclass
class Parsed:
    """What a reader found.

    Attributes:
        rows: good examples, in file order.
        problems: bad rows (skippable).
        files: annotation files read (their bytes enter the fingerprint).
        image_root: the folder image paths are relative to (for the fingerprint), or None.
        stamps: anything else that identifies the data read, in the fingerprint as given (a
            dataset's own fingerprint, a large data file's name, size and mtime).
    """

    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    image_root: str | None = None
    stamps: list[str] = field(default_factory=list)


def resolve_in(root: str, name: str) -> str | None:
    """Absolute path of ``name`` inside ``root``, or None if it escapes ``root``.

    The check is lexical (``..`` and absolute paths), so symbolic links inside the folder are
    followed as the user set them up.

    Args:
        root: absolute image folder.
        name: file name from the annotations (relative, or absolute inside ``root``).

    Returns:
        The normalised absolute path, or None.
    """
    candidate = os.path.normpath(os.path.join(root, name))
    if candidate == root or not candidate.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return candidate


def image_id_for(root: str, path: str) -> str:
    """The id of a csv/imagefolder image: its relative path without extension, with ``/``."""
    rel = PurePosixPath(*os.path.relpath(path, root).split(os.sep))
    return str(rel.with_suffix(""))


def need(value: str | None, key: str, what: str, example: str) -> str:
    """Return the path ``value`` made absolute, or raise when the recipe did not give it.

    Raises:
        UserInputError: ``value`` is None.
    """
    if not value:
        raise UserInputError(f"{key}.{what} is required for this format: set `{key}: {example}`")
    return os.path.abspath(os.path.expanduser(value))


def need_file(path: str, key: str) -> None:
    """Raises: DataError: ``path`` is not an existing file."""
    if not os.path.isfile(path):
        raise DataError(
            f"{key}: annotation file not found: {path} (relative paths resolve against {os.getcwd()})"
        )


def need_dir(path: str, key: str) -> None:
    """Raises: DataError: ``path`` is not an existing folder."""
    if not os.path.isdir(path):
        raise DataError(
            f"{key}: image folder not found: {path} (relative paths resolve against {os.getcwd()})"
        )


def read_json(path: str, key: str):
    """Parse a JSON file.

    Raises:
        DataError: the file is not valid JSON (the message names line and column).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{key}: {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: {path} is not UTF-8 text: {e}") from e


def clean_text(value) -> str | None:
    """Stripped text, or None when missing, not a string, or blank."""
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value or None


def short(value, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters (for messages)."""
    s = repr(value)
    return s if len(s) <= n else s[: n - 1] + "…"


def images_beside(path: str, images: str | None) -> str:
    """The image folder of an annotation file given as ``--data PATH``: ``images``, else the file's folder."""
    return images if images is not None else os.path.dirname(path)
