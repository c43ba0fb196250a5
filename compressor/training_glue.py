"""Glue between a recipe's data, a model family and the shared training loop.

Builds the ``make_batch`` function (images + target texts + prompts → labelled tensors), the
in-training evaluation hook (captions on ``val`` scored by the same metric harness as
``evaluate``), checkpoint savers, and what the training stages (lora_finetune, finetune, heal)
declare alike: the data they read, the parameters they trained, their model-card line.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from compressor.families import family_for_model
from compressor.models.batches import build_prompt, training_batch

log = logging.getLogger(__name__)


class ImageCache:
    """Decoded images by example id, so epochs over small sets do not re-decode (LRU, ``size`` images).

    Args:
        size: images kept.
        load: example → image, or None for an image skipped as undecodable (a Dataset's
            ``load_image`` with ``skip_invalid``); default ``ex.load_image()``.
    """

    def __init__(self, size: int = 4096, load=None):
        self.size = size
        self.load = load or (lambda ex: ex.load_image())
        self._d: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, ex):
        key = (ex.image_id, ex.image_path, ex.render)
        if key not in self._d:
            img = self.load(ex)
            self._d[key] = img
            if len(self._d) > self.size:
                self._d.popitem(last=False)
        else:
            img = self._d[key]
            self._d.move_to_end(key)
        return img


def batch_maker(model, processor, prompt_template: str | None, data=None):
    """``make_batch(pairs) -> dict`` for :func:`compressor.training.train`.

    Args:
        model: the (possibly peft-wrapped) model, for its family.
        processor: its processor.
        prompt_template: the recipe's ``generation.prompt`` (VQA questions fill ``{question}``).
        data: the Dataset the pairs come from: with ``skip_invalid``, a pair whose image cannot be
            decoded leaves its batch (counted in the dataset's ``skipped``) instead of failing.
    """
    from compressor.errors import DataError

    family = family_for_model(model)
    cache = ImageCache(load=data.load_image if data is not None else None)

    def make_batch(pairs: list) -> dict:
        loaded = [(p, cache.get(p[0])) for p in pairs]
        pairs = [p for p, img in loaded if img is not None]
        if not pairs:
            raise DataError("no image of a training batch can be decoded", [str(p[0].image_path) for p, _ in loaded])
        images = [img for _, img in loaded if img is not None]
        targets = [t for _, t in pairs]
        prompts = [build_prompt(prompt_template, ex.question) for ex, _ in pairs]
        batch = training_batch(family, processor, images, targets, prompts)
        dtype = next(model.parameters()).dtype
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return batch

    return make_batch


def eval_hook(ctx, processor, train_spec, metrics: list[str] | None = None):
    """An ``evaluate(model) -> metrics`` for in-training evaluation on ``val``, or None if not asked.

    Scores ``select_best_by`` when set, else BLEU-4 and CIDEr (VQA accuracy for VQA data), with the
    run's shared caption scorer.
    """
    if not train_spec.eval_every:
        return None
    from compressor.evaluation import score_model

    data = ctx.data("val", limit=train_spec.eval_limit)
    # Without a selection metric, the cheap caption metrics (METEOR costs a JVM round trip per call).
    cheap = ["vqa_accuracy"] if data.task == "vqa" else ["bleu_4", "cider"]
    wanted = metrics or ([train_spec.select_best_by] if train_spec.select_best_by else cheap)

    def evaluate(model) -> dict[str, float]:
        result = score_model(
            model, processor, data, ctx.recipe.generation, ctx.device, metrics=wanted, scorer=ctx.scorer(), progress=False
        )
        return result["metrics"]

    return evaluate


def adapter_saver(model, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))


def summary_of(result) -> dict[str, Any]:
    """Manifest summary of a :class:`~compressor.training.TrainResult`."""
    losses = [v for _, v in result.losses]
    k = max(1, len(losses) // 10)
    return {
        "steps": result.steps,
        "loss_first": round(sum(losses[:k]) / k, 4) if losses else None,
        "loss_last": round(sum(losses[-k:]) / k, 4) if losses else None,
        "best_step": result.best_step,
        "train_seconds": round(result.seconds, 2),
    }


def train_data(cfg) -> dict[str, int | None]:
    """The data a training stage reads: its ``train.data`` section, and ``val`` when it evaluates."""
    return {cfg.train.data: None, **({"val": None} if cfg.train.eval_every else {})}


def trainable_of(summary: dict) -> int | None:
    """``params_trainable`` from a training stage's summary (LoRA report, or the count itself)."""
    for path in (("lora", "params_trainable"), ("trainable", "params_trainable"), ("params_trainable",)):
        cur: Any = summary
        for p in path:
            cur = cur.get(p) if isinstance(cur, dict) else None
        if isinstance(cur, int):
            return cur
    return None


def training_card(record: dict):
    """The model card's details of a training stage: steps, loss, the loss curve's ends, LoRA targets."""
    from compressor.stages import StageCard

    summ = record.get("summary") or {}
    bits = []
    if "steps" in summ:
        bits.append(f"{summ['steps']} steps")
    if summ.get("loss"):
        bits.append(f"loss {summ['loss']}")
    if "loss_first" in summ and "loss_last" in summ:
        bits.append(f"training loss {summ['loss_first']} → {summ['loss_last']}")
    lora = summ.get("lora") or {}
    if lora.get("by_part"):
        bits.append("LoRA on " + ", ".join(f"{k} ({n} modules)" for k, n in lora["by_part"].items()))
    return StageCard(details=bits)
