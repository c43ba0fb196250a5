"""Prediction and reference files: COCO results lists, COCO caption annotations, plain mappings.

Formats read (JSON, UTF-8):

* predictions: a COCO results list ``[{"image_id": 42, "caption": "..."}]`` (what the COCO
  caption evaluation server takes), a VQA results list ``[{"question_id": 7, "answer": "..."}]``,
  or a mapping ``{"42": "..."}``.
* references: a COCO captions annotation file ``{"images": [...], "annotations": [{"image_id":
  42, "caption": "..."}]}``, a VQA annotation file ``{"annotations": [{"question_id": 7,
  "answers": [{"answer": "..."}]}]}``, or a mapping ``{"42": ["...", "..."]}`` (a single string
  counts as one reference).

Ids are normalised to ``str`` everywhere, so ``42`` in one file matches ``"42"`` in the other.
:func:`write_coco_results` writes ids back as integers when every id is a canonical decimal
integer, because the COCO evaluation server and ``pycocotools`` expect integer image ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.errors import DataError
from compressor.fileio import atomic_write_text

logger = logging.getLogger(__name__)

_SHOWN_IDS = 10
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")


def _read_json(path: str | os.PathLike[str], what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    try:
        with p.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{what} file {p} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{what} file {p} is not UTF-8 text: {e}") from e


def _id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: ids must be strings or integers, got {type(value).__name__} {value!r}")
    return str(value)


def load_predictions(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read predictions: one caption (or answer) per image (or question) id.

    Args:
        path: a JSON file holding a COCO results list (``image_id``/``caption``), a VQA results
            list (``question_id``/``answer``) or a mapping ``{id: text}``.

    Returns:
        ``{id: text}`` with ids as ``str``, in file order.

    Raises:
        DataError: missing file, invalid JSON, an unknown layout, a non-string caption, or an id
            given twice (the rows name the offending entries).
    """
    data = _read_json(path, "predictions")
    out: dict[str, str] = {}
    problems: list[str] = []
    if isinstance(data, Mapping):
        items = [(k, v, f"key {k!r}") for k, v in data.items()]
    elif isinstance(data, list):
        items = []
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                problems.append(f"entry {i}: expected an object, got {type(row).__name__}")
                continue
            if "image_id" in row and "caption" in row:
                items.append((row["image_id"], row["caption"], f"entry {i}"))
            elif "question_id" in row and "answer" in row:
                items.append((row["question_id"], row["answer"], f"entry {i}"))
            else:
                problems.append(
                    f"entry {i}: needs 'image_id' and 'caption' (or 'question_id' and 'answer'), has {sorted(row)}"
                )
    else:
        raise DataError(
            f"predictions file {path}: expected a COCO results list or a mapping id -> caption, "
            f"got {type(data).__name__}"
        )
    for raw_id, text, where in items:
        try:
            key = _id(raw_id, where)
        except DataError as e:
            problems.append(str(e))
            continue
        if not isinstance(text, str):
            problems.append(f"{where} (id {key}): the caption must be a string, got {type(text).__name__}")
            continue
        if key in out:
            problems.append(f"{where}: id {key} appears more than once")
            continue
        out[key] = text
    if problems:
        raise DataError(f"predictions file {path} has {len(problems)} bad entries:", problems)
    logger.debug("read %d predictions from %s", len(out), path)
    return out


def load_references(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read references: one or more captions (or human answers) per id.

    Args:
        path: a JSON file holding a COCO captions annotation file, a VQA annotation file or a
            mapping ``{id: [text, ...]}``.

    Returns:
        ``{id: [text, ...]}`` with ids as ``str``. COCO images without any annotation are left
        out (there is nothing to score them against).

    Raises:
        DataError: missing file, invalid JSON, an unknown layout, non-string captions or an id
            with an empty reference list.
    """
    data = _read_json(path, "references")
    out: dict[str, list[str]] = {}
    problems: list[str] = []
    if isinstance(data, Mapping) and isinstance(data.get("annotations"), list):
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, Mapping):
                problems.append(f"annotations[{i}]: expected an object, got {type(ann).__name__}")
                continue
            if "image_id" in ann and "caption" in ann:
                raw_id, texts = ann["image_id"], [ann["caption"]]
            elif "question_id" in ann and isinstance(ann.get("answers"), list):
                raw_id = ann["question_id"]
                texts = [a.get("answer") if isinstance(a, Mapping) else a for a in ann["answers"]]
            else:
                problems.append(
                    f"annotations[{i}]: needs 'image_id' and 'caption' (COCO captions) or "
                    f"'question_id' and 'answers' (VQA), has {sorted(ann)}"
                )
                continue
            try:
                key = _id(raw_id, f"annotations[{i}]")
            except DataError as e:
                problems.append(str(e))
                continue
            bad = [t for t in texts if not isinstance(t, str)]
            if bad:
                problems.append(f"annotations[{i}] (id {key}): captions must be strings, got {bad[0]!r}")
                continue
            out.setdefault(key, []).extend(texts)
    elif isinstance(data, Mapping):
        for raw_key, value in data.items():
            key = _id(raw_key, f"key {raw_key!r}")
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                problems.append(f"key {key}: expected a caption or a list of captions, got {value!r:.80}")
                continue
            out[key] = list(texts)
    else:
        raise DataError(
            f"references file {path}: expected a COCO annotation file or a mapping id -> [captions], "
            f"got {type(data).__name__}"
        )
    problems += [f"id {k}: no references" for k, v in out.items() if not v]
    if problems:
        raise DataError(f"references file {path} has {len(problems)} bad entries:", problems)
    logger.debug("read references for %d ids from %s", len(out), path)
    return out


def _ids_line(ids: Sequence[str], what: str) -> str:
    shown = ", ".join(ids[:_SHOWN_IDS])
    more = f", … and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
    return f"{len(ids)} {what}: {shown}{more}"


def match_ids(predictions: Mapping[Any, Any], references: Mapping[Any, Any]) -> list[str]:
    """Check that predictions and references cover the same ids.

    Args:
        predictions: ``{id: prediction}``; ids are compared as ``str``.
        references: ``{id: references}``; ids are compared as ``str``.

    Returns:
        The ids as ``str``, in the order of ``predictions``.

    Raises:
        DataError: when the id sets differ (its rows list the ids in predictions without
            references and the ids in references without predictions, first 10 of each), when
            two keys of one mapping become the same string (``1`` and ``"1"``), or when both are
            empty.
    """
    pred_ids = [str(k) for k in predictions]
    ref_ids = [str(k) for k in references]
    for ids, what in ((pred_ids, "predictions"), (ref_ids, "references")):
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise DataError(f"{what} use the same id twice (once as a number, once as a string):", dup[:20])
    ref_set, pred_set = set(ref_ids), set(pred_ids)
    only_pred = [i for i in pred_ids if i not in ref_set]
    only_ref = [i for i in ref_ids if i not in pred_set]
    if only_pred or only_ref:
        rows = []
        if only_pred:
            rows.append(_ids_line(only_pred, "ids in predictions without references"))
        if only_ref:
            rows.append(_ids_line(only_ref, "ids in references without predictions"))
        raise DataError("predictions and references do not cover the same ids:", rows)
    if not pred_ids:
        raise DataError("nothing to score: predictions and references are empty")
    return pred_ids


def _int_ids(ids: Sequence[str]) -> bool:
    return bool(ids) and all(_CANONICAL_INT.fullmatch(i) for i in ids)


def write_coco_results(path: str | os.PathLike[str], predictions: Mapping[Any, str]) -> Path:
    """Write predictions as a COCO results list ``[{"image_id": ..., "caption": ...}]``, atomically.

    Ids are written as integers when every id is a canonical decimal integer (``"42"``, not
    ``"042"``), which is what the COCO evaluation server and ``pycocotools.COCO.loadRes`` take;
    otherwise all ids stay strings. The file is written to a temporary name in the same folder
    and moved into place with ``os.replace``, so a reader never sees a half-written file.

    Args:
        path: the output file; missing parent folders are created.
        predictions: ``{image_id: caption}``.

    Returns:
        The path written.

    Raises:
        DataError: a caption that is not a string.
    """
    return _write_results(path, predictions, "image_id", "caption")


def write_vqa_results(path: str | os.PathLike[str], predictions: Mapping[Any, str]) -> Path:
    """Write answers as a VQA results list ``[{"question_id": ..., "answer": ...}]``, atomically.

    The layout the VQA evaluation server takes (``vqaEval.py`` reads ``question_id`` and
    ``answer``); ids are integers when every id is a canonical decimal integer, as in
    :func:`write_coco_results`. :func:`load_predictions` reads it back.

    Args:
        path: the output file; missing parent folders are created.
        predictions: ``{question_id: answer}``.

    Returns:
        The path written.

    Raises:
        DataError: an answer that is not a string.
    """
    return _write_results(path, predictions, "question_id", "answer")


def _write_results(path: str | os.PathLike[str], predictions: Mapping[Any, str], id_key: str, text_key: str) -> Path:
    bad = [str(k) for k, v in predictions.items() if not isinstance(v, str)]
    if bad:
        raise DataError(f"{text_key}s must be strings; these ids have something else:", bad)
    ids = [str(k) for k in predictions]
    as_int = _int_ids(ids)
    rows = [{id_key: int(i) if as_int else i, text_key: c} for i, c in zip(ids, predictions.values(), strict=True)]
    out = atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    logger.info("wrote %d predictions to %s", len(rows), out)
    return out


#: Columns of an answers CSV (``compress predict`` on VQA data).
ANSWERS_CSV_COLUMNS = ("image_name", "question", "answer")


def write_answers_csv(path: str | os.PathLike[str], rows: Sequence[tuple[str, str, str]]) -> Path:
    """Write an answers CSV ``image_name,question,answer`` (one row per question), atomically.

    Args:
        path: the output file.
        rows: ``(image file name, question, answer)`` per question, in order.

    Returns:
        The path written.
    """
    return _write_csv(path, ANSWERS_CSV_COLUMNS, rows)


def write_captions_csv(path: str | os.PathLike[str], rows: Sequence[tuple[str, str]]) -> Path:
    """Write a captions CSV ``image_name,caption`` (one row per image), atomically.

    The layout of the ``csv`` data format's captioning files, so the output can be read back as
    data (``--data preds.csv``).

    Args:
        path: the output file.
        rows: ``(image file name, caption)`` per image, in order.

    Returns:
        The path written.
    """
    return _write_csv(path, ("image_name", "caption"), rows)


def _write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(row)
    out = atomic_write_text(path, buf.getvalue())
    logger.info("wrote %d rows to %s", len(rows), out)
    return out


def load_answers_csv(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """Read an answers CSV written by :func:`write_answers_csv` (or by hand).

    Args:
        path: a CSV with the header ``image_name,question,answer`` (other columns are ignored).

    Returns:
        ``(image_name, question, answer)`` rows in file order.

    Raises:
        DataError: missing file, missing columns, or a row without an image name or question.
    """
    import csv

    p = Path(path)
    if not p.is_file():
        raise DataError(f"answers file not found: {p}")
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ANSWERS_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"answers file {p}: needs the columns {','.join(ANSWERS_CSV_COLUMNS)}; missing {', '.join(missing)}"
            )
        rows, problems = [], []
        for n, r in enumerate(reader, start=2):
            name, q, a = (r.get(c) or "" for c in ANSWERS_CSV_COLUMNS)
            if not name.strip() or not q.strip():
                problems.append(f"line {n}: empty image_name or question")
                continue
            rows.append((name, q, a))
    if problems:
        raise DataError(f"answers file {p} has {len(problems)} bad rows:", problems)
    return rows
