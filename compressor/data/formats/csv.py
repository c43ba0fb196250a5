"""The ``csv`` format: a CSV of captions or questions with a header row, and an image folder.

``annotations`` is a CSV with a header row; ``images`` the folder its file names are relative
to. Captioning: ``image_name,caption``, one caption per row, several rows per image allowed.
VQA: ``image_name,question[,answer]``, one question per row; the ``answer`` cell holds one answer
or several human answers separated by ``|`` (``yes|yes|no``); without an ``answer`` column (or
with it empty on every row) the data is unlabelled. An optional ``question_id`` column gives
question ids (default ``<image_id>-<row>``, row counted from 0 after the header). Aliases:
``file_name`` / ``image`` for ``image_name``, ``text`` for ``caption``, ``answers`` for
``answer``. Other columns are ignored. Column names are matched case-insensitively.

``--data FILE.csv`` is read as csv (images in ``--images``, else beside the file); its task is
``vqa`` when the header has a question column.
"""

from __future__ import annotations

import csv
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
    Parsed,
    Problem,
    Row,
    clean_text,
    image_id_for,
    images_beside,
    need,
    need_dir,
    need_file,
    resolve_in,
    short,
)
from compressor.errors import DataError

logger = logging.getLogger(__name__)

_ALIASES = {
    "image_name": ("image_name", "file_name", "image"),
    "caption": ("caption", "text"),
    "question": ("question",),
    "answer": ("answer", "answers"),
    "question_id": ("question_id",),
}


def read(src, key: str, task: str, settings: Mapping[str, Any]) -> Parsed:
    """Read the CSV of a DataSource (``annotations``, ``images``): see :func:`read_table`.

    Args:
        src: the DataSource.
        key: its recipe key (for messages).
        task: ``"caption"`` or ``"vqa"``.
        settings: none for this format.

    Raises:
        UserInputError: missing recipe keys.
        DataError: as :func:`read_table`.
    """
    example = "{annotations: questions.csv, images: images/}"
    path = need(src.annotations, key, "annotations", example)
    root = need(src.images, key, "images", example)
    return read_table(path, root, key, task)


def read_table(path: str, root: str, key: str, task: str) -> Parsed:
    """Read a CSV of captions or questions (see the module docstring); imagefolder's ``metadata.csv`` too.

    Args:
        path: the CSV file (absolute).
        root: the image folder its file names are relative to (absolute).
        key: the recipe key (for messages).
        task: ``"caption"`` or ``"vqa"``.

    Returns:
        Captioning: one row per image with the captions of all its CSV rows (file order).
        VQA: one row per question.

    Raises:
        DataError: the file or folder is missing, or the file lacks the required columns
            (never skippable).
    """
    need_file(path, key)
    need_dir(root, key)
    name = os.path.basename(path)
    out = Parsed(files=[path], image_root=root)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{key}: {path} is empty: expected a header row") from None
        cols = {h.strip().lower(): n for n, h in enumerate(header)}
        idx: dict[str, int] = {}
        for canon, aliases in _ALIASES.items():
            for a in aliases:
                if a in cols:
                    idx[canon] = cols[a]
                    break
        text_col = "caption" if task == "caption" else "question"
        required = ["image_name", text_col]
        missing = [c for c in required if c not in idx]
        if missing:
            want = "image_name,caption" if task == "caption" else "image_name,question[,answer]"
            hint = ""
            if task == "caption" and "question" in idx:
                hint = " It has a question column: set data.task: vqa."
            elif task == "vqa" and "caption" in idx:
                hint = " It has a caption column: set data.task: caption."
            raise DataError(
                f"{key}: {path} lacks the column(s) {', '.join(missing)} (task {task} needs a header "
                f"`{want}`; found: {', '.join(h.strip() for h in header) or 'nothing'}).{hint}",
                [f"{name} line 1: {','.join(header)}"],
            )
        ignored = [h for h, n in cols.items() if n not in idx.values()]
        if ignored:
            logger.info("%s: ignoring CSV column(s) %s of %s", key, ", ".join(ignored), path)
        records = []
        for r, row in enumerate(reader):
            if not any(c.strip() for c in row):
                continue
            records.append((r, reader.line_num, row))

    def cell(row: list[str], c: str) -> str:
        n = idx.get(c)
        return row[n] if n is not None and n < len(row) else ""

    labelled = task == "caption" or (
        "answer" in idx and any(cell(row, "answer").strip() for _, _, row in records)
    )
    by_image: dict[
        str, tuple[int, str, list[str], str]
    ] = {}  # image_id -> (first index, path, captions, where)
    file_of_id: dict[str, str] = {}
    seen_qids: set[str] = set()
    for r, line, row in records:
        image_name = cell(row, "image_name").strip()
        where = f"{name} line {line} (image_name={image_name})"
        if not image_name:
            out.problems.append(Problem(EMPTY, f"{name} line {line}", "image_name is empty"))
            continue
        ipath = resolve_in(root, image_name)
        if ipath is None:
            out.problems.append(Problem(ESCAPE, where, f"resolves outside {root}"))
            continue
        iid = image_id_for(root, ipath)
        if file_of_id.setdefault(iid, ipath) != ipath:
            out.problems.append(Problem(DUPLICATE, where, f"image id {iid} is already {file_of_id[iid]}"))
            continue
        text = clean_text(cell(row, text_col))
        if text is None:
            out.problems.append(Problem(EMPTY, where, f"{text_col}={short(cell(row, text_col))}"))
            continue
        if task == "caption":
            entry = by_image.setdefault(iid, (r, ipath, [], where))
            entry[2].append(text)
            continue
        answers: tuple[str, ...] = ()
        if labelled:
            answers = tuple(a for a in (clean_text(x) for x in cell(row, "answer").split("|")) if a)
            if not answers:
                out.problems.append(Problem(EMPTY, where, "answer is empty (other rows have answers)"))
                continue
        qid = cell(row, "question_id").strip() or f"{iid}-{r}"
        if qid in seen_qids:
            out.problems.append(Problem(DUPLICATE, where, f"question_id {qid} appears more than once"))
            continue
        seen_qids.add(qid)
        out.rows.append(
            Row(
                Example(image_id=iid, question=text, answers=answers, question_id=qid, image_path=ipath),
                where,
            )
        )
    for iid, (_, ipath, caps, where) in by_image.items():
        out.rows.append(Row(Example(image_id=iid, captions=tuple(caps), image_path=ipath), where))
    return out


def detect(path: str) -> int:
    """A ``.csv`` file (1)."""
    return 1 if path.lower().endswith(".csv") else 0


def path_source(path: str, images: str | None) -> dict:
    """``annotations`` is the file; ``images`` is ``--images``, else the file's folder."""
    return {"annotations": path, "images": images_beside(path, images)}


def path_task(path: str) -> str:
    """``vqa`` when the header row names a question column, else ``caption``."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline().lower()
    return "vqa" if "question" in header else "caption"


FORMAT = Format(
    name="csv",
    description="a CSV file (`image_name,question[,answer]` or `image_name,caption`) and an image folder",
    fields=frozenset({"annotations", "images", "limit"}),
    example="{annotations: data.csv, images: images/}",
    read=read,
    detect=detect,
    path_source=path_source,
    path_task=path_task,
)
