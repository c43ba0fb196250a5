"""The ``coco`` format: a COCO captions JSON and the image folder its file names are relative to.

``annotations`` is a COCO captions JSON (``images[]`` with ``id`` and ``file_name``,
``annotations[]`` with ``image_id`` and ``caption``); ``images`` is the folder the file names
are relative to. An image without annotations is an unlabelled example.

``--data FILE.json`` is read as coco unless it looks like a Karpathy file; its images are in
``--images``, else the sibling folder named by the file's last ``_`` part
(``captions_val2017.json`` → ``val2017/``) if it exists, else the file's folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from compressor.data.dataset import Example
from compressor.data.formats import Format
from compressor.data.formats.common import (
    DUPLICATE,
    EMPTY,
    ESCAPE,
    MALFORMED,
    NO_CAPTION_LEFT,
    UNKNOWN_IMAGE,
    Parsed,
    Problem,
    Row,
    clean_text,
    need,
    need_dir,
    need_file,
    read_json,
    resolve_in,
    short,
)
from compressor.errors import DataError, UserInputError

EXAMPLE = "{annotations: captions_val2017.json, images: val2017/}"


def read(src, key: str, task: str, settings: Mapping[str, Any]) -> Parsed:
    """Read a COCO captions file (see the module docstring).

    Args:
        src: the DataSource (``annotations``, ``images``).
        key: its recipe key, e.g. ``"data.train"`` (for messages).
        task: must be ``"caption"``.
        settings: none for this format.

    Returns:
        One row per image of ``images[]``, with all its captions.

    Raises:
        UserInputError: missing keys in the recipe, or task ``vqa``.
        DataError: the file is missing, not JSON, or not a COCO captions file.
    """
    if task != "caption":
        raise UserInputError(
            f"{key}: format coco holds captions; for task vqa use format csv, imagefolder or synthetic"
        )
    ann = need(src.annotations, key, "annotations", EXAMPLE)
    root = need(src.images, key, "images", EXAMPLE)
    need_file(ann, key)
    need_dir(root, key)
    data = read_json(ann, key)
    name = os.path.basename(ann)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        hint = ""
        if (
            isinstance(data, dict)
            and data.get("images")
            and isinstance(data["images"][0], dict)
            and "sentences" in data["images"][0]
        ):
            hint = " It looks like a Karpathy split file: set data.format: karpathy."
        elif isinstance(data, list):
            hint = " It is a list (a results file?); a captions file is an object with images[] and annotations[]."
        raise DataError(
            f"{key}: {ann} is not a COCO captions file: expected an object with 'images' and 'annotations' lists.{hint}"
        )
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{key}: {ann}: 'annotations' must be a list")
    out = Parsed(files=[ann], image_root=root)

    images: dict[str, tuple[int, str]] = {}  # id -> (index, path)
    seen_files: dict[str, str] = {}
    seen_ids: set[str] = set()
    dropped: set[str] = set()
    order: list[str] = []
    for i, im in enumerate(data["images"]):
        where = f"{name} images[{i}]"
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            out.problems.append(Problem(MALFORMED, where, f"needs 'id' and 'file_name', got {short(im)}"))
            continue
        iid = str(im["id"])
        where = f"{name} images[{i}] (id={iid}, file_name={im['file_name']})"
        if iid in seen_ids:
            out.problems.append(Problem(DUPLICATE, where, f"id {iid} appears more than once in images[]"))
            continue
        seen_ids.add(iid)
        path = resolve_in(root, im["file_name"])
        if path is None:
            out.problems.append(Problem(ESCAPE, where, f"resolves outside {root}"))
            dropped.add(iid)
            continue
        if path in seen_files:
            out.problems.append(Problem(DUPLICATE, where, f"same file as image id {seen_files[path]}"))
            dropped.add(iid)
            continue
        seen_files[path] = iid
        images[iid] = (i, path)
        order.append(iid)

    captions: dict[str, list[str]] = {}
    had_annotations: set[str] = set()
    for j, a in enumerate(annotations):
        if not isinstance(a, dict) or "image_id" not in a:
            out.problems.append(
                Problem(
                    MALFORMED, f"{name} annotations[{j}]", f"needs 'image_id' and 'caption', got {short(a)}"
                )
            )
            continue
        iid = str(a["image_id"])
        where = f"{name} annotations[{j}] (id={a.get('id')}, image_id={iid})"
        if iid in dropped:
            continue  # its image was already reported
        if iid not in images:
            out.problems.append(
                Problem(UNKNOWN_IMAGE, where, "add the image to images[] or remove the annotation")
            )
            continue
        had_annotations.add(iid)
        text = clean_text(a.get("caption"))
        if text is None:
            out.problems.append(Problem(EMPTY, where, f"caption={short(a.get('caption'))}"))
            continue
        captions.setdefault(iid, []).append(text)

    for iid in order:
        i, path = images[iid]
        where = f"{name} images[{i}] (id={iid})"
        if iid in had_annotations and iid not in captions:
            out.problems.append(Problem(NO_CAPTION_LEFT, where, "every caption of this image is bad"))
            continue
        out.rows.append(
            Row(Example(image_id=iid, captions=tuple(captions.get(iid, ())), image_path=path), where)
        )
    return out


def detect(path: str) -> int:
    """Any ``.json`` file (1); a Karpathy file outranks it."""
    return 1 if path.lower().endswith(".json") else 0


def path_source(path: str, images: str | None) -> dict:
    """``annotations`` is the file; ``images`` as the module docstring says."""
    folder = images
    if folder is None:
        folder = os.path.dirname(path)
        stem = os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]
        if os.path.isdir(os.path.join(folder, stem)):
            folder = os.path.join(folder, stem)
    return {"annotations": path, "images": folder}


FORMAT = Format(
    name="coco",
    description="a COCO captions JSON (`annotations`) and its image folder (`images`)",
    fields=frozenset({"annotations", "images", "limit"}),
    example=EXAMPLE,
    read=read,
    detect=detect,
    path_source=path_source,
)
