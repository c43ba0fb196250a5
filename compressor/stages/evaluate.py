"""``evaluate``: score the current model (or the latest ONNX export) and measure its characteristics.

Output: ``eval.json`` (label, metrics on the 0–100 scale, characteristics, decoding settings,
data section and fingerprint, notes) and ``predictions.json`` (a COCO results list, or
``{question_id: answer}`` for VQA). Baseline and candidate go through the same harness.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from compressor.errors import UserInputError
from compressor.evaluation import perplexity, prompt_fn, torch_characteristics
from compressor.pipeline.io import atomic_write_json
from compressor.stages.common import load_working_model
from eval.harness import DEFAULT_CAPTION_METRICS, DEFAULT_VQA_METRICS, predict, score_predictions

log = logging.getLogger(__name__)

PRODUCES_MODEL = False
MODEL_METRICS = ("perplexity", "bertscore_f1", "clipscore", "teacher_cider")


def data_sections(cfg) -> list[str]:
    return [cfg.data]


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Evaluate; see the module docstring.

    Raises:
        UserInputError: a metric needing a model path that is not set, an ONNX backend without
            an earlier export, or a ``teacher`` label without predictions.
    """
    from eval.characteristics import PeakMemory

    data = ctx.data(cfg.data, cfg.limit)
    task = data.task
    metrics = list(cfg.metrics or (DEFAULT_CAPTION_METRICS if task == "caption" else DEFAULT_VQA_METRICS))
    gen = ctx.recipe.generation
    notes: list[str] = []
    with PeakMemory() as mem:
        if cfg.backend == "onnx":
            captioner, model, processor = _onnx_captioner(ctx), None, None
        else:
            from compressor.generation import TorchCaptioner

            model, processor = load_working_model(input_dir, ctx)
            captioner = TorchCaptioner(model, processor, gen, ctx.device)
        preds = predict(captioner, data.examples, task, prompt_fn(gen), gen.batch_size, ctx.progress)
        scored = score_predictions(preds, data, [m for m in metrics if m not in MODEL_METRICS], ctx.scorer())
        values = dict(scored["metrics"])
        notes += scored["notes"]
        if "teacher_cider" in metrics or cfg.teacher:
            values["teacher_cider"] = _teacher_cider(cfg, ctx, preds, data)
        if "perplexity" in metrics:
            if model is None:
                notes.append("perplexity needs the PyTorch model; skipped for the ONNX backend")
            else:
                values["perplexity"] = perplexity(model, processor, data, gen, ctx.device)
        if "bertscore_f1" in metrics:
            from eval.embedding_metrics import bertscore_f1

            if cfg.bertscore is None or not cfg.bertscore.model:
                raise UserInputError("bertscore_f1 needs a local model: set evaluate.bertscore.model: <folder>")
            keys = list(preds)
            refs = data.references()
            values["bertscore_f1"] = bertscore_f1(
                [preds[k] for k in keys], [list(refs[k]) for k in keys], cfg.bertscore.model, cfg.bertscore.num_layers
            )
        if "clipscore" in metrics:
            from eval.embedding_metrics import clip_score

            if cfg.clipscore is None or not cfg.clipscore.model:
                raise UserInputError("clipscore needs a local CLIP model: set evaluate.clipscore.model: <folder>")
            from eval.harness import example_key

            values["clipscore"] = clip_score(
                [ex.load_image() for ex in data.examples], [preds[example_key(ex, task)] for ex in data.examples], cfg.clipscore.model
            )
        if model is not None:
            chars = torch_characteristics(model, processor, data, gen, ctx.device, cfg.characteristics, model_dir=input_dir)
        else:
            chars = _onnx_characteristics(captioner, data, gen, cfg, ctx)
        chars["params_trainable"] = int(ctx.last_trainable or 0)
    chars["peak_rss_mb"] = mem.rss_mb
    if mem.cuda_mb is not None:
        chars["peak_cuda_mb"] = mem.cuda_mb
    result = {
        "label": cfg.label,
        "task": task,
        "metrics": values,
        "characteristics": chars,
        "decoding": captioner.settings,
        "data": {
            "section": cfg.data,
            "resolved": getattr(data, "resolved", cfg.data),
            "examples": len(data),
            "fingerprint": data.fingerprint,
            "skipped": len(data.skipped),
        },
        "notes": notes,
    }
    atomic_write_json(out_dir / "eval.json", _finite(result))
    write_predictions(out_dir / "predictions.json", preds, task)
    log.info("evaluate[%s]: %s", cfg.label, {k: round(v, 2) for k, v in values.items() if isinstance(v, float)})
    return {"label": cfg.label, "metrics": values, "examples": len(data)}


def write_predictions(path: Path, preds: dict[str, str], task: str) -> None:
    """A COCO results list (int ids when numeric) for captioning, ``{question_id: answer}`` for VQA."""
    if task == "caption":
        rows = [{"image_id": int(k) if str(k).isdigit() else k, "caption": v} for k, v in preds.items()]
        atomic_write_json(path, rows)
    else:
        atomic_write_json(path, preds)


def _teacher_cider(cfg, ctx, preds: dict[str, str], data) -> float:
    """CIDEr of these captions against the teacher label's captions on the same images."""
    label = cfg.teacher
    if label is None or label not in ctx.label_outputs:
        raise UserInputError("teacher_cider needs `teacher: <label of an earlier evaluate stage>`")
    path = ctx.label_outputs[label] / "predictions.json"
    if not path.is_file():
        raise UserInputError(f"teacher '{label}' has no predictions.json; label an evaluate stage as the teacher")
    rows = json.loads(path.read_text())
    teacher = {str(r["image_id"]): r["caption"] for r in rows} if isinstance(rows, list) else {str(k): v for k, v in rows.items()}
    common = [k for k in preds if k in teacher]
    if not common:
        raise UserInputError(f"teacher '{label}' scored other images than this evaluation; use the same data section")
    res = ctx.scorer().score({k: preds[k] for k in common}, {k: [teacher[k]] for k in common}, ["cider"])
    return res.metrics["cider"]


def _onnx_captioner(ctx):
    if not ctx.exports:
        raise UserInputError("backend: onnx needs an earlier `export` stage with formats: [onnx]")
    onnx_dir = ctx.exports[-1] / "onnx"
    if not onnx_dir.is_dir():
        raise UserInputError("backend: onnx needs the latest export stage to write ONNX (formats: [..., onnx])")
    from exporters.onnx_runtime import OnnxCaptioner

    return OnnxCaptioner(onnx_dir, ctx.recipe.generation)


def _onnx_characteristics(captioner, data, gen, cfg, ctx) -> dict:
    from eval.characteristics import measure_latency, size_on_disk_mb

    out: dict = {}
    spec = cfg.characteristics
    images = [ex.load_image() for ex in data.examples[:8]]
    if spec.latency is not None and images:
        out.update(
            measure_latency(
                lambda imgs: captioner.caption(imgs, [gen.prompt or ""] * len(imgs)),
                images,
                spec.latency.batch_sizes,
                spec.latency.warmup,
                spec.latency.repeats,
            )
        )
    out["size_mb"] = size_on_disk_mb(ctx.exports[-1] / "onnx")
    meta = json.loads((ctx.exports[-1] / "onnx" / "export.json").read_text()) if (ctx.exports[-1] / "onnx" / "export.json").is_file() else {}
    out.update({k: v for k, v in meta.get("characteristics", {}).items() if k.startswith("params_") or k == "gflops"})
    return out


def _finite(obj):
    """JSON cannot hold NaN: write null instead (a gate then fails closed on it)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
