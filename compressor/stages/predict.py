"""``predict``: captions (a COCO results list, as evaluation servers take) or a VQA answers CSV.

Output: ``predictions.json`` (``[{"image_id", "caption"}]``) or ``answers.csv``
(``image_name,question,answer``); ``out`` names the file (``.json`` for VQA gives a VQA results
list ``[{"question_id", "answer"}]``, ``.csv`` for captions ``image_name,caption``). The data need no references.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.evaluation import answers_rows, caption_rows, predict, prompt_fn, write_predictions
from compressor.models.folders import load_working_model
from compressor.recipe.schema import StageBase
from compressor.stages import Declaration
from compressor.stages.evaluate import onnx_dir
from eval.predictions import write_answers_csv, write_captions_csv

log = logging.getLogger(__name__)


class PredictStage(StageBase):
    """Write predictions for unlabelled data: a COCO results list, or an answers CSV for VQA."""

    type: Literal["predict"]
    data: Literal["train", "val", "eval", "test", "calibration"] = Field("test", description="Data section.")
    limit: int | None = Field(None, ge=1, description="Predict for the first N examples.")
    backend: Literal["torch", "onnx"] = Field("torch", description="PyTorch model or the latest ONNX export.")
    out: str | None = Field(None, description="File name (default predictions.json, or answers.csv for VQA).")


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Predict; see the module docstring."""
    data = ctx.data(cfg.data, cfg.limit)
    gen = ctx.recipe.generation
    if cfg.backend == "onnx":
        from compressor.evaluation import EvalTarget

        captioner = EvalTarget.onnx(onnx_dir(ctx), gen, ctx.device).captioner  # its bundled draft, if any
    else:
        from compressor.evaluation import TorchCaptioner

        model, processor = load_working_model(input_dir, ctx)
        captioner = TorchCaptioner(model, processor, gen, ctx.device)
    preds = predict(captioner, data, data.task, prompt_fn(gen), gen.batch_size, ctx.progress)
    name = cfg.out or ("answers.csv" if data.task == "vqa" else "predictions.json")
    if name.lower().endswith(".csv"):
        if data.task == "vqa":
            write_answers_csv(out_dir / name, answers_rows(data.examples, preds))
        else:
            write_captions_csv(out_dir / name, caption_rows(data.examples, preds))
    else:
        write_predictions(out_dir / name, preds, data.task)
    return {"file": name, "predictions": len(preds), "skipped": len(data.skipped)}


STAGE = Declaration(
    config=PredictStage,
    run=run,
    produces_model=False,
    uses_generation=True,
    data=lambda cfg: {cfg.data: cfg.limit},
    reads_export=lambda cfg: cfg.backend == "onnx",
)
