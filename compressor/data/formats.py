"""Readers of the annotation formats (DESIGN.md "Conventions": data formats).

Each reader turns one :class:`~compressor.recipe.schema.DataSource` into :class:`Row` objects
without opening any image, and reports bad rows as :class:`Problem` objects instead of raising,
so that the loader can list all of them at once (or skip them with ``data.skip_invalid``).
Problems with the file itself (not found, not JSON, a CSV without the required columns) are
never skippable and raise :class:`~compressor.errors.DataError` or
:class:`~compressor.errors.UserInputError` at once.

Formats:

* ``coco``: ``annotations`` is a COCO captions JSON (``images[]`` with ``id`` and ``file_name``,
  ``annotations[]`` with ``image_id`` and ``caption``); ``images`` is the folder the file names
  are relative to. An image without annotations is an unlabelled example.
* ``karpathy``: ``annotations`` is the Karpathy split JSON (``dataset_coco.json``,
  ``dataset_rsicd.json``): ``images[]`` with ``filename``, optional ``filepath`` (a sub-folder
  of ``images``), ``split``, ``sentences[].raw`` (or ``tokens``), and ``cocoid`` / ``imgid``
  (the image id is ``cocoid`` when present, so ids match COCO's, else ``imgid``). ``split``
  selects the images: ``train`` means ``train`` *and* ``restval`` (the usual 113k Karpathy
  training set); ``restval``, ``val`` and ``test`` are taken as given; several may be joined with
  ``+`` (``val+test``). Without ``split``, a section reads the split of its own name
  (``eval`` reads ``test``, ``calibration`` reads ``train``) and ``source`` reads every image.
* ``csv``: ``annotations`` is a CSV with a header row. Captioning: ``image_name,caption``, one
  caption per row, several rows per image allowed. VQA: ``image_name,question[,answer]``, one
  question per row; the ``answer`` cell holds one answer or several human answers separated by
  ``|`` (``yes|yes|no``); without an ``answer`` column (or with it empty on every row) the data
  is unlabelled. An optional ``question_id`` column gives question ids (default
  ``<image_id>-<row>``, row counted from 0 after the header). Aliases: ``file_name`` / ``image``
  for ``image_name``, ``text`` for ``caption``, ``answers`` for ``answer``. Other columns are
  ignored. Column names are matched case-insensitively.
* ``imagefolder``: ``path`` is a folder holding the images and ``metadata.jsonl`` (Hugging Face's
  layout), one JSON object per line with ``file_name`` and ``text``, ``caption`` or
  ``captions`` (a list) for captioning, or ``question`` and ``answer`` (a string or a list) /
  ``answers`` (a list of strings or of VQA's ``{"answer": ...}`` objects) for VQA, optional
  ``question_id``. A ``metadata.csv`` is read as the ``csv`` format. Without metadata, every
  image in the folder (recursively) is an unlabelled captioning example.

Image ids of csv and imagefolder rows are the file's path relative to the image folder without
its extension (the file stem for files at the top of the folder). File names must stay inside
the image folder: ``../x.jpg`` or an absolute path elsewhere is a bad row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from compressor.data.dataset import Example
from compressor.errors import DataError, UserInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

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
    """

    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    image_root: str | None = None


# ------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------


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


def _text(value) -> str | None:
    """Stripped text, or None when missing, not a string, or blank."""
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value or None


def _short(value, n: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 1] + "…"


# ------------------------------------------------------------------------------------------
# coco
# ------------------------------------------------------------------------------------------


def read_coco(src, key: str, task: str) -> Parsed:
    """Read a COCO captions file (see the module docstring).

    Args:
        src: the DataSource (``annotations``, ``images``).
        key: its recipe key, e.g. ``"data.train"`` (for messages).
        task: must be ``"caption"``.

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
    ann = need(src.annotations, key, "annotations", "{annotations: captions_val2017.json, images: val2017/}")
    root = need(src.images, key, "images", "{annotations: captions_val2017.json, images: val2017/}")
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
            out.problems.append(Problem(MALFORMED, where, f"needs 'id' and 'file_name', got {_short(im)}"))
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
                    MALFORMED, f"{name} annotations[{j}]", f"needs 'image_id' and 'caption', got {_short(a)}"
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
        text = _text(a.get("caption"))
        if text is None:
            out.problems.append(Problem(EMPTY, where, f"caption={_short(a.get('caption'))}"))
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


# ------------------------------------------------------------------------------------------
# karpathy
# ------------------------------------------------------------------------------------------

#: The split a section reads from a Karpathy file when its `split` is not given.
KARPATHY_DEFAULT_SPLIT = {
    "train": "train",
    "calibration": "train",
    "val": "val",
    "eval": "test",
    "test": "test",
}


def karpathy_splits(split: str) -> set[str]:
    """The file splits a ``split`` value selects: ``train`` adds ``restval``; ``a+b`` is a union."""
    names = {s.strip() for s in split.split("+") if s.strip()}
    if "train" in names:
        names.add("restval")
    return names


def read_karpathy(src, key: str, task: str, split: str | None) -> Parsed:
    """Read a Karpathy split file (see the module docstring).

    Args:
        src: the DataSource (``annotations``, ``images``).
        key: its recipe key (for messages).
        task: must be ``"caption"``.
        split: the split(s) to read (``train`` includes ``restval``), or None for every image.

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
    example = "{annotations: dataset_coco.json, images: coco/, split: test}"
    ann = need(src.annotations, key, "annotations", example)
    root = need(src.images, key, "images", example)
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
    wanted = karpathy_splits(split) if split is not None else None
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
                Problem(MALFORMED, f"{name} images[{i}]", f"needs 'filename', got {_short(im)}")
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
            text = _text(raw)
            if text is None:
                out.problems.append(Problem(EMPTY, f"{where} sentences[{k}]", f"raw={_short(raw)}"))
                continue
            caps.append(text)
        if sentences and not caps:
            out.problems.append(Problem(NO_CAPTION_LEFT, where, "every sentence of this image is bad"))
            continue
        out.rows.append(Row(Example(image_id=iid, captions=tuple(caps), image_path=path), where))
    return out


# ------------------------------------------------------------------------------------------
# csv
# ------------------------------------------------------------------------------------------

_CSV_ALIASES = {
    "image_name": ("image_name", "file_name", "image"),
    "caption": ("caption", "text"),
    "question": ("question",),
    "answer": ("answer", "answers"),
    "question_id": ("question_id",),
}


def read_csv(src, key: str, task: str, *, path: str | None = None, root: str | None = None) -> Parsed:
    """Read a CSV of captions or questions (see the module docstring).

    Args:
        src: the DataSource (``annotations``, ``images``); ignored when ``path`` is given.
        key: its recipe key (for messages).
        task: ``"caption"`` or ``"vqa"``.
        path: read this CSV instead (imagefolder's ``metadata.csv``).
        root: image folder when ``path`` is given.

    Returns:
        Captioning: one row per image with the captions of all its CSV rows (file order).
        VQA: one row per question.

    Raises:
        UserInputError: missing recipe keys.
        DataError: the file is missing, or lacks the required columns (never skippable).
    """
    example = "{annotations: questions.csv, images: images/}"
    if path is None:
        path = need(src.annotations, key, "annotations", example)
        root = need(src.images, key, "images", example)
    assert root is not None
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
        for canon, aliases in _CSV_ALIASES.items():
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
        text = _text(cell(row, text_col))
        if text is None:
            out.problems.append(Problem(EMPTY, where, f"{text_col}={_short(cell(row, text_col))}"))
            continue
        if task == "caption":
            entry = by_image.setdefault(iid, (r, ipath, [], where))
            entry[2].append(text)
            continue
        answers: tuple[str, ...] = ()
        if labelled:
            answers = tuple(a for a in (_text(x) for x in cell(row, "answer").split("|")) if a)
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


# ------------------------------------------------------------------------------------------
# imagefolder
# ------------------------------------------------------------------------------------------


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
        t = _text(a)
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
            texts = [_text(v) for v in items]
            if not texts or any(t is None for t in texts):
                return None
            return tuple(texts)  # type: ignore[arg-type]
    return ()


def read_imagefolder(src, key: str, task: str) -> Parsed:
    """Read a Hugging Face imagefolder (see the module docstring).

    Args:
        src: the DataSource (``path``).
        key: its recipe key (for messages).
        task: ``"caption"`` or ``"vqa"``.

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
            return read_csv(src, key, task, path=meta_csv, root=root)
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
                Problem(MALFORMED, f"{name} line {n}", f"needs 'file_name', got {_short(obj)}")
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
            q = _text(obj.get("question"))
            if q is None:
                out.problems.append(Problem(EMPTY, where, f"question={_short(obj.get('question'))}"))
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
