"""``predict``: captions (a COCO results list, as evaluation servers take) or a VQA answers CSV.

Output: ``predictions.json`` (``[{"image_id", "caption"}]``) or ``answers.csv``
(``image_name,question,answer``).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from compressor.evaluation import prompt_fn
from compressor.pipeline.io import atomic_write_text
from compressor.stages.common import load_working_model
from compressor.stages.evaluate import _onnx_captioner, write_predictions
from eval.harness import example_key, predict

log = logging.getLogger(__name__)

PRODUCES_MODEL = False


def data_sections(cfg) -> list[str]:
    return [cfg.data]


def write_answers_csv(path: Path, examples, preds: dict[str, str]) -> None:
    """``image_name,question,answer`` rows, one per question, atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image_name", "question", "answer"])
    for ex in examples:
        name = Path(ex.image_path).name if ex.image_path else ex.image_id
        w.writerow([name, ex.question, preds[example_key(ex, "vqa")]])
    atomic_write_text(path, buf.getvalue())


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    data = ctx.data(cfg.data, cfg.limit)
    gen = ctx.recipe.generation
    if cfg.backend == "onnx":
        captioner = _onnx_captioner(ctx)
    else:
        from compressor.generation import TorchCaptioner

        model, processor = load_working_model(input_dir, ctx)
        captioner = TorchCaptioner(model, processor, gen, ctx.device)
    preds = predict(captioner, data.examples, data.task, prompt_fn(gen), gen.batch_size, ctx.progress)
    if data.task == "vqa":
        name = cfg.out or "answers.csv"
        write_answers_csv(out_dir / name, data.examples, preds)
    else:
        name = cfg.out or "predictions.json"
        write_predictions(out_dir / name, preds, "caption")
    return {"file": name, "predictions": len(preds)}
