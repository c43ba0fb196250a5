"""The evaluation harness: one function scores any :class:`~eval.captioner.Captioner` on a dataset.

Baseline and candidate, PyTorch folder and ONNX export, all go through :func:`predict` and
:func:`score_predictions`, so their numbers are comparable (llm-compressor's "same harness"
principle). Captioning scores per image (every reference caption of the image); VQA scores per
question.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
DEFAULT_VQA_METRICS = ("vqa_accuracy",)
PYCOCO_METRICS = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "rouge_1", "rouge_2", "spice"}


def example_key(example, task: str) -> str:
    """Prediction key of an example: the image id (captioning) or the question id (VQA)."""
    return str(example.question_id if task == "vqa" else example.image_id)


def predict(
    captioner,
    examples: Sequence,
    task: str,
    prompt_for: Callable[[Any], str],
    batch_size: int,
    progress: bool = False,
    load_image: Callable[[Any], Any] | None = None,
) -> dict[str, str]:
    """Run ``captioner`` over ``examples``.

    Args:
        captioner: a Captioner.
        examples: data examples (``image_id``, ``question_id``, ``load_image()``).
        task: ``caption`` or ``vqa``.
        prompt_for: example → prompt text (``""`` for none).
        batch_size: examples per call.
        progress: show a tqdm bar.
        load_image: example → image (default ``example.load_image()``).

    Returns:
        key → caption (see :func:`example_key`), in dataset order.
    """
    from tqdm.auto import tqdm

    load = load_image or (lambda ex: ex.load_image())
    out: dict[str, str] = {}
    bar = tqdm(total=len(examples), desc="caption", unit="img", disable=not progress, leave=False)
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        caps = captioner.caption([load(ex) for ex in chunk], [prompt_for(ex) for ex in chunk])
        for ex, cap in zip(chunk, caps):
            out[example_key(ex, task)] = cap
        bar.update(len(chunk))
    bar.close()
    return out


def score_predictions(
    predictions: dict[str, str],
    dataset,
    metrics: Sequence[str] | None = None,
    scorer=None,
) -> dict[str, Any]:
    """Score predictions against a dataset's references.

    Args:
        predictions: key → text (image id for captioning, question id for VQA).
        dataset: a ``compressor.data.Dataset`` (``task``, ``references()``, ``examples``).
        metrics: metric keys (default by task). Model-based metrics (perplexity, bertscore_f1,
            clipscore, teacher_cider) are computed by the caller and skipped here.
        scorer: an open ``eval.captioning.CaptionScorer`` to reuse (one METEOR process).

    Returns:
        ``{"metrics": {key: value}, "notes": [...], "per_image": {...}}`` (0–100 scale).
    """
    task = dataset.task
    metrics = list(metrics) if metrics else list(DEFAULT_CAPTION_METRICS if task == "caption" else DEFAULT_VQA_METRICS)
    refs = dataset.references()
    out: dict[str, Any] = {"metrics": {}, "notes": [], "per_image": {}}
    if task == "caption":
        wanted = [m for m in metrics if m in PYCOCO_METRICS]
        if wanted:
            from eval.captioning import CaptionScorer

            own = scorer is None
            sc = scorer or CaptionScorer()
            try:
                res = sc.score(predictions, refs, wanted)
            finally:
                if own:
                    sc.close()
            out["metrics"].update(res.metrics)
            out["notes"] += list(res.notes)
            out["per_image"] = res.per_image
    else:
        from eval.vqa import mme_scores, vqa_accuracy

        if "vqa_accuracy" in metrics:
            out["metrics"]["vqa_accuracy"] = vqa_accuracy(predictions, refs)
        if "mme_acc" in metrics or "mme_acc_plus" in metrics:
            image_ids = {example_key(ex, task): ex.image_id for ex in dataset.examples}
            out["metrics"].update(mme_scores(predictions, refs, image_ids))
        cap_metrics = [m for m in metrics if m in PYCOCO_METRICS]
        if cap_metrics:
            out["notes"].append(f"{', '.join(cap_metrics)} skipped: VQA answers are scored by accuracy")
    for k, v in list(out["metrics"].items()):
        if isinstance(v, float) and math.isnan(v):
            out["notes"].append(f"{k} is NaN")
    return out
