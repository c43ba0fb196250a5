"""The ``karpathy`` format: the split JSON of the COCO and RSICD captioning papers.

``annotations`` is the Karpathy split file (``dataset_coco.json``, ``dataset_rsicd.json``):
``images[]`` with ``filename``, optional ``filepath`` (a sub-folder of ``images``), ``split``,
``sentences[].raw`` (or ``tokens``), and ``cocoid`` / ``imgid`` (the image id is ``cocoid`` when
present, so ids match COCO's, else ``imgid``). ``split`` selects the images: ``train`` means
``train`` *and* ``restval`` (the usual 113k Karpathy training set); ``restval``, ``val`` and
``test`` are taken as given; several may be joined with ``+`` (``val+test``). Without ``split``,
a section reads the split of its own name (``eval`` reads ``test``, ``calibration`` reads
``train``) and ``source`` reads every image.

``--data FILE.json`` is read as karpathy when its ``images[]`` carry ``sentences`` (its images
in ``--images``, else the file's folder).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from compressor.data.dataset import Example
from compressor.data.formats import Format
from compressor.data.formats.common import (
    DUPLICATE,
    EMPTY,
    ESCAPE,
    MALFORMED,
    NO_CAPTION_LEFT,
    Parsed,
    Problem,
    Row,
    clean_text,
    images_beside,
    need,
    need_dir,
    need_file,
    read_json,
    resolve_in,
    short,
)
from compressor.errors import DataError, UserInputError

EXAMPLE = "{annotations: dataset_coco.json, images: coco/, split: test}"

#: The split a section reads from a Karpathy file when its `split` is not given.
DEFAULT_SPLIT = {
    "train": "train",
    "calibration": "train",
    "val": "val",
    "eval": "test",
    "test": "test",
}


def splits(split: str) -> set[str]:
    """The file splits a ``split`` value selects: ``train`` adds ``restval``; ``a+b`` is a union."""
    names = {s.strip() for s in split.split("+") if s.strip()}
    if "train" in names:
        names.add("restval")
    return names


def read(src, key: str, task: str, settings: Mapping[str, Any]) -> Parsed:
    """Read a Karpathy split file (see the module docstring).

    Args:
        src: the DataSource (``annotations``, ``images``).
        key: its recipe key (for messages).
        task: must be ``"caption"``.
        settings: ``{"karpathy_split": ...}`` from :func:`settings`: the split(s) to read
            (``train`` includes ``restval``), or None for every image.

    Returns:
        One row per selected image with all its sentences.

    Raises:
        UserInputError: missing keys, task ``vqa``, or a split the file does not have.
        DataError: the file is missing, not JSON, or not a Karpathy file.
    """
    if task != "caption":
        raise UserInputError(
            f"{key}: format karpathy holds captions; for task vqa use format csv, imagefolder or synthetic"
        )
    split = settings["karpathy_split"]
    ann = need(src.annotations, key, "annotations", EXAMPLE)
    root = need(src.images, key, "images", EXAMPLE)
    need_file(ann, key)
    need_dir(root, key)
    data = read_json(ann, key)
    name = os.path.basename(ann)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(
            f"{key}: {ann} is not a Karpathy split file: expected an object with an 'images' list"
        )
    out = Parsed(files=[ann], image_root=root)
    present = {im.get("split") for im in data["images"] if isinstance(im, dict)}
    wanted = splits(split) if split is not None else None
    if wanted is not None and not (wanted & present):
        from compressor.errors import did_you_mean

        shown = ", ".join(sorted(str(p) for p in present))
        raise UserInputError(
            f"{key}.split: no image of {ann} has split '{split}' (the file has: {shown}).{did_you_mean(split, [str(p) for p in present])}"
        )
    seen_ids: set[str] = set()
    seen_paths: dict[str, str] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            out.problems.append(
                Problem(MALFORMED, f"{name} images[{i}]", f"needs 'filename', got {short(im)}")
            )
            continue
        if wanted is not None and im.get("split") not in wanted:
            continue
        fname = im["filename"]
        rel = os.path.join(im["filepath"], fname) if isinstance(im.get("filepath"), str) else fname
        if im.get("cocoid") is not None:
            iid = str(im["cocoid"])
        elif im.get("imgid") is not None:
            iid = str(im["imgid"])
        else:
            iid = str(PurePosixPath(fname).with_suffix(""))
        where = f"{name} images[{i}] (id={iid}, filename={rel})"
        path = resolve_in(root, rel)
        if path is None:
            out.problems.append(Problem(ESCAPE, where, f"resolves outside {root}"))
            continue
        if iid in seen_ids:
            out.problems.append(Problem(DUPLICATE, where, f"image id {iid} appears more than once"))
            continue
        if path in seen_paths:
            out.problems.append(Problem(DUPLICATE, where, f"same file as image id {seen_paths[path]}"))
            continue
        seen_ids.add(iid)
        seen_paths[path] = iid
        caps: list[str] = []
        sentences = im.get("sentences") or []
        for k, s in enumerate(sentences if isinstance(sentences, list) else []):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(str(t) for t in s["tokens"])
            text = clean_text(raw)
            if text is None:
                out.problems.append(Problem(EMPTY, f"{where} sentences[{k}]", f"raw={short(raw)}"))
                continue
            caps.append(text)
        if sentences and not caps:
            out.problems.append(Problem(NO_CAPTION_LEFT, where, "every sentence of this image is bad"))
            continue
        out.rows.append(Row(Example(image_id=iid, captions=tuple(caps), image_path=path), where))
    return out


def settings(resolved) -> dict:
    """``karpathy_split``: the section's ``split``, else its default (``source`` reads every image)."""
    src = resolved.src
    return {
        "karpathy_split": src.split
        if src.split is not None
        else (None if resolved.part else DEFAULT_SPLIT[resolved.name])
    }


def detect(path: str) -> int:
    """A ``.json`` whose ``images[]`` carry ``sentences`` (2, ahead of coco's 1).

    Raises:
        DataError: a ``.json`` that is not valid JSON.
    """
    if not path.lower().endswith(".json"):
        return 0
    head = read_json(path, "--data")
    ims = head.get("images") if isinstance(head, dict) else None
    return 2 if ims and isinstance(ims[0], dict) and "sentences" in ims[0] else 0


def path_source(path: str, images: str | None) -> dict:
    """``annotations`` is the file; ``images`` is ``--images``, else the file's folder."""
    return {"annotations": path, "images": images_beside(path, images)}


FORMAT = Format(
    name="karpathy",
    description="the Karpathy split JSON of the COCO and RSICD papers (`dataset_coco.json`), one `split` of it",
    fields=frozenset({"annotations", "images", "split", "limit"}),
    example=EXAMPLE,
    read=read,
    settings=settings,
    detect=detect,
    path_source=path_source,
)
