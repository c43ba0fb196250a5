"""What evaluation and prediction write: prediction keys, result files, CSV rows, JSON-ready records."""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def example_key(example, task: str) -> str:
    """Prediction key of an example: the image id (captioning) or the question id (VQA)."""
    return str(example.question_id if task == "vqa" else example.image_id)


def finite(obj):
    """A JSON-ready copy: NaN and infinities become null (a gate then fails closed on them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_predictions(path: Path, preds: dict[str, str], task: str) -> Path:
    """Write predictions: a COCO results list (captions) or a VQA results list (answers).

    Args:
        path: the JSON file.
        preds: ``{image id: caption}`` or ``{question id: answer}``.
        task: ``caption`` or ``vqa``.

    Returns:
        The path written (atomically).
    """
    from eval.predictions import write_coco_results, write_vqa_results

    return (write_coco_results if task == "caption" else write_vqa_results)(path, preds)


def image_name(ex) -> str:
    """The name an output CSV gives an example's image.

    For csv and imagefolder data the image id is the path relative to the image folder without
    its extension, so the id plus the file's extension is the name the input CSV used; COCO and
    Karpathy ids are numbers, so their file name is used; generated images have only their id.
    """
    if not ex.image_path:
        return ex.image_id
    p = Path(ex.image_path)
    if ex.image_id == p.stem or ex.image_id.endswith("/" + p.stem):
        return ex.image_id + p.suffix
    return p.name


def answers_rows(examples, preds: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(image_name, question, answer)`` per VQA example, for an answers CSV (see :func:`image_name`)."""
    return [(image_name(ex), ex.question or "", preds[example_key(ex, "vqa")]) for ex in examples]


def caption_rows(examples, preds: dict[str, str]) -> list[tuple[str, str]]:
    """``(image_name, caption)`` per image, for a captions CSV (see :func:`image_name`)."""
    rows, seen = [], set()
    for ex in examples:
        if ex.image_id not in seen:
            seen.add(ex.image_id)
            rows.append((image_name(ex), preds[example_key(ex, "caption")]))
    return rows
