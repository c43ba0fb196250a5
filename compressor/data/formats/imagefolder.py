"""The ``imagefolder`` format: Hugging Face's image folder layout with ``metadata.jsonl``.

``path`` is a folder holding the images and ``metadata.jsonl``, one JSON object per line with
``file_name`` and ``text``, ``caption`` or ``captions`` (a list) for captioning, or ``question``
and ``answer`` (a string or a list) / ``answers`` (a list of strings or of VQA's
``{"answer": ...}`` objects) for VQA, optional ``question_id``. A ``metadata.csv`` is read as
the ``csv`` format. Without metadata, every image in the folder (recursively) is an unlabelled
captioning example.

``--data FOLDER`` is read as imagefolder; its task is ``vqa`` when the first line of
``metadata.jsonl`` has a ``question`` key.
"""

from __future__ import annotations

import json
import logging
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
    Parsed,
    Problem,
    Row,
    clean_text,
    image_id_for,
    need,
    need_dir,
    resolve_in,
    short,
)
from compressor.data.formats.csv import read_table
from compressor.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _answers(obj: dict) -> tuple[str, ...] | None:
    """VQA answers of a metadata line: ``answer`` (str or list) or ``answers`` (strs or dicts)."""
    value = obj.get("answers", obj.get("answer"))
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for a in items:
        if isinstance(a, dict):
            a = a.get("answer")
        t = clean_text(a)
        if t is None:
            return None
        out.append(t)
    return tuple(out) if out else None


def _captions(obj: dict) -> tuple[str, ...] | None:
    """Captions of a metadata line: ``captions`` (list or str), ``caption`` or ``text``; None if bad."""
    for k in ("captions", "caption", "text"):
        if k in obj:
            value = obj[k]
            items = value if isinstance(value, list) else [value]
            texts = [clean_text(v) for v in items]
            if not texts or any(t is None for t in texts):
                return None
            return tuple(texts)  # type: ignore[arg-type]
    return ()


def read(src, key: str, task: str, settings: Mapping[str, Any]) -> Parsed:
    """Read a Hugging Face imagefolder (see the module docstring).

    Args:
        src: the DataSource (``path``).
        key: its recipe key (for messages).
        task: ``"caption"`` or ``"vqa"``.
        settings: none for this format.

    Returns:
        Captioning: one row per image. VQA: one row per metadata line.

    Raises:
        UserInputError: ``path`` missing from the recipe, or VQA without metadata.
        DataError: the folder is missing.
    """
    root = need(src.path, key, "path", "{path: my_images/}")
    need_dir(root, key)
    meta = os.path.join(root, "metadata.jsonl")
    if not os.path.isfile(meta):
        meta_csv = os.path.join(root, "metadata.csv")
        if os.path.isfile(meta_csv):
            return read_table(meta_csv, root, key, task)
        if task == "vqa":
            raise DataError(
                f'{key}: {root} has no metadata.jsonl: VQA needs lines {{"file_name", "question", "answer"}}'
            )
        logger.info("%s: %s has no metadata.jsonl; reading its images as unlabelled data", key, root)
        out = Parsed(image_root=root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    p = os.path.join(dirpath, fn)
                    out.rows.append(
                        Row(Example(image_id=image_id_for(root, p), image_path=p), os.path.relpath(p, root))
                    )
        ids: dict[str, str] = {}
        rows = []
        for row in out.rows:
            if row.example.image_id in ids:
                out.problems.append(
                    Problem(DUPLICATE, row.where, f"same image id as {ids[row.example.image_id]}")
                )
                continue
            ids[row.example.image_id] = row.where
            rows.append(row)
        out.rows = rows
        return out

    out = Parsed(files=[meta], image_root=root)
    name = "metadata.jsonl"
    seen: dict[str, str] = {}
    seen_qids: set[str] = set()
    with open(meta, encoding="utf-8") as f:
        lines = f.read().splitlines()
    r = -1
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        r += 1
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            out.problems.append(Problem(MALFORMED, f"{name} line {n}", f"not JSON: {e.msg}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
            out.problems.append(
                Problem(MALFORMED, f"{name} line {n}", f"needs 'file_name', got {short(obj)}")
            )
            continue
        where = f"{name} line {n} (file_name={obj['file_name']})"
        ipath = resolve_in(root, obj["file_name"])
        if ipath is None:
            out.problems.append(Problem(ESCAPE, where, f"resolves outside {root}"))
            continue
        iid = image_id_for(root, ipath)
        if task == "caption":
            if iid in seen:
                out.problems.append(
                    Problem(
                        DUPLICATE,
                        where,
                        f'image id {iid} already on {seen[iid]}; give several captions as "captions": [...]',
                    )
                )
                continue
            caps = _captions(obj)
            if caps is None:
                out.problems.append(Problem(EMPTY, where, "a caption is empty or not a string"))
                continue
            seen[iid] = where
            out.rows.append(Row(Example(image_id=iid, captions=caps, image_path=ipath), where))
        else:
            if seen.setdefault(iid, ipath) != ipath:
                out.problems.append(Problem(DUPLICATE, where, f"image id {iid} is already {seen[iid]}"))
                continue
            q = clean_text(obj.get("question"))
            if q is None:
                out.problems.append(Problem(EMPTY, where, f"question={short(obj.get('question'))}"))
                continue
            answers = _answers(obj)
            if answers is None:
                out.problems.append(Problem(EMPTY, where, "an answer is empty or not a string"))
                continue
            qid = str(obj["question_id"]) if obj.get("question_id") is not None else f"{iid}-{r}"
            if qid in seen_qids:
                out.problems.append(Problem(DUPLICATE, where, f"question_id {qid} appears more than once"))
                continue
            seen_qids.add(qid)
            out.rows.append(
                Row(
                    Example(image_id=iid, question=q, answers=answers, question_id=qid, image_path=ipath),
                    where,
                )
            )
    return out


def detect(path: str) -> int:
    """A folder (1)."""
    return 1 if os.path.isdir(path) else 0


def path_source(path: str, images: str | None) -> dict:
    """``path`` is the folder (``--images`` does not apply)."""
    return {"path": path}


def path_task(path: str) -> str:
    """``vqa`` when the first line of ``metadata.jsonl`` has a ``question`` key, else ``caption``."""
    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        return "caption"
    with open(meta, encoding="utf-8") as f:
        first = next((ln for ln in f if ln.strip()), "")
    return "vqa" if '"question"' in first else "caption"


FORMAT = Format(
    name="imagefolder",
    description="Hugging Face's image-folder layout: images with `metadata.jsonl` (or `metadata.csv`) in `path`",
    fields=frozenset({"path", "limit"}),
    example="{path: images/}",
    read=read,
    detect=detect,
    path_source=path_source,
    path_task=path_task,
)
