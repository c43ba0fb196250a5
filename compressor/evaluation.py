"""Glue from a PyTorch model to the evaluation harness and the characteristics.

Used by the ``evaluate`` stage, by in-training evaluation, and by ``compress eval`` on a model
folder; an ONNX export goes through the same harness with the ONNX Runtime captioner.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from compressor.families import family_for_model
from compressor.generation import TorchCaptioner
from compressor.models.batches import build_prompt, training_batch
from eval.harness import predict, score_predictions

log = logging.getLogger(__name__)


def prompt_fn(generation):
    return lambda ex: build_prompt(generation.prompt, ex.question)


def score_model(model, processor, dataset, generation, device: str, metrics=None, scorer=None, progress=False) -> dict:
    """Caption ``dataset`` with the model and score it.

    Returns:
        ``{"metrics", "notes", "predictions", "settings"}``.
    """
    captioner = TorchCaptioner(model, processor, generation, device)
    preds = predict(captioner, dataset.examples, dataset.task, prompt_fn(generation), generation.batch_size, progress)
    scored = score_predictions(preds, dataset, metrics, scorer)
    return {"metrics": scored["metrics"], "notes": scored["notes"], "predictions": preds, "settings": captioner.settings}


def perplexity(model, processor, dataset, generation, device: str, batch_size: int = 8, max_examples: int = 256) -> float:
    """Perplexity of the reference captions (answers for VQA) under the model, given the image.

    exp(mean token negative log-likelihood) over all target tokens (the model's own labelled
    loss, weighted by token count); the prompt and image tokens are not scored.
    """
    import torch

    family = family_for_model(model)
    pairs = dataset.training_pairs()[:max_examples]
    total_nll, total_tokens = 0.0, 0
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            batch = training_batch(
                family,
                processor,
                [ex.load_image() for ex, _ in chunk],
                [t for _, t in chunk],
                [build_prompt(generation.prompt, ex.question) for ex, _ in chunk],
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            labels = batch["labels"]
            out = model(**batch)
            logits = out.logits[:, -labels.shape[1]:, :].float()
            if family.decoder_only:
                logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            nll = torch.nn.functional.cross_entropy(
                logits[mask], labels[mask], reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += int(mask.sum())
    return math.exp(total_nll / total_tokens) if total_tokens else math.nan


def torch_characteristics(model, processor, dataset, generation, device: str, spec, model_dir=None) -> dict[str, Any]:
    """Parameters (per part), GFLOPs, latency, tokens/s and size on disk of a PyTorch model.

    Args:
        spec: the evaluate stage's ``CharacteristicsSpec``.
        model_dir: the folder whose size is reported (``size_mb``).
    """
    from compressor.models.batches import generation_inputs
    from eval.characteristics import count_gflops, count_parameters, measure_latency, size_on_disk_mb

    family = family_for_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, Any] = count_parameters(base, family.parts)
    images = [ex.load_image() for ex in dataset.examples[: max(8, max(spec.latency.batch_sizes) if spec.latency else 8)]]
    prompts_of = prompt_fn(generation)
    if spec.gflops and images:
        n = spec.gflops_new_tokens
        kw = {"max_new_tokens": n, "min_new_tokens": n, "num_beams": generation.num_beams, "do_sample": False}
        inputs = generation_inputs(family, processor, images[:1], [prompts_of(dataset.examples[0])], device)
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        out["gflops"] = count_gflops(lambda: model.generate(**inputs, **kw), model)
        out["gflops_new_tokens"] = n
    if spec.latency is not None and images:
        captioner = TorchCaptioner(model, processor, generation, device)
        tok = processor.tokenizer
        lat = measure_latency(
            lambda imgs: captioner.caption(imgs, [generation.prompt or ""] * len(imgs)),
            images,
            spec.latency.batch_sizes,
            spec.latency.warmup,
            spec.latency.repeats,
            count_tokens=lambda caps: sum(len(tok(c, add_special_tokens=False).input_ids) for c in caps),
        )
        out.update(lat)
    if model_dir is not None:
        out["size_mb"] = size_on_disk_mb(model_dir)
    return out
