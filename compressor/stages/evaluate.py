"""``evaluate``: score the current model (or the latest ONNX export) and measure its characteristics.

Output: ``eval.json`` (label, metrics on the 0–100 scale, characteristics, decoding settings,
data section and fingerprint, notes; the record of :func:`compressor.evaluation.evaluate`,
the same one ``compress eval`` writes) and ``predictions.json`` (a COCO results list, or a VQA
results list ``[{question_id, answer}]``). Baseline and candidate go through the same harness.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.errors import UserInputError
from compressor.evaluation import (
    EvalOptions,
    EvalTarget,
    check_metric_requirements,
    evaluate,
    finite,
    resolve_metrics,
    write_predictions,
)
from compressor.fileio import atomic_write_json
from compressor.stages.common import load_working_model

log = logging.getLogger(__name__)

PRODUCES_MODEL = False


def data_sections(cfg) -> list[str]:
    return [cfg.data]


def check(cfg, task: str) -> None:
    """Pre-flight checks of one evaluate stage (Java, metric model folders, teacher).

    Raises:
        UserInputError: see :func:`compressor.evaluation.check_metric_requirements`.
    """
    metrics = resolve_metrics(cfg.metrics, task)
    check_metric_requirements(
        metrics,
        task,
        bertscore_model=cfg.bertscore.model if cfg.bertscore else None,
        clipscore_model=cfg.clipscore.model if cfg.clipscore else None,
        teacher=cfg.teacher is not None,
        teacher_option="teacher: <label of an earlier evaluate stage>",
    )


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Evaluate; see the module docstring.

    Raises:
        UserInputError: a metric needing a model path that is not set, an ONNX backend without
            an earlier export, or a ``teacher`` label without predictions.
    """
    data = ctx.data(cfg.data, cfg.limit)
    check(cfg, data.task)
    gen = ctx.recipe.generation
    if cfg.backend == "onnx":
        captioner, onnx_dir, make = onnx_captioner(ctx)
        target = EvalTarget(captioner, gen, device=ctx.device, folder=onnx_dir, make_captioner=make,
                            source=lambda: load_working_model(input_dir, ctx))
    else:
        model, processor = load_working_model(input_dir, ctx)
        target = EvalTarget.torch(model, processor, gen, ctx.device, folder=input_dir)
    options = EvalOptions(
        bertscore_model=cfg.bertscore.model if cfg.bertscore else None,
        bertscore_layers=cfg.bertscore.num_layers if cfg.bertscore else None,
        clipscore_model=cfg.clipscore.model if cfg.clipscore else None,
        teacher_predictions=_teacher_predictions(cfg, ctx),
    )
    record, preds = evaluate(
        target,
        data,
        metrics=cfg.metrics,
        options=options,
        scorer=ctx.scorer(),
        spec=cfg.characteristics,
        params_trainable=int(ctx.last_trainable or 0),
        progress=ctx.progress,
    )
    record = {"label": cfg.label, **record}
    record["data"] = {"section": cfg.data, **record["data"]}
    atomic_write_json(out_dir / "eval.json", finite(record))
    write_predictions(out_dir / "predictions.json", preds, data.task)
    values = record["metrics"]
    log.info("evaluate[%s]: %s", cfg.label, {k: round(v, 2) for k, v in values.items() if isinstance(v, float)})
    return {"label": cfg.label, "metrics": values, "examples": len(data)}


def _teacher_predictions(cfg, ctx) -> dict[str, str] | None:
    """The captions of the evaluate stage labelled ``cfg.teacher`` (references of teacher_cider)."""
    from eval.predictions import load_predictions

    label = cfg.teacher
    if label is None:
        return None
    if label not in ctx.label_outputs:
        raise UserInputError(f"teacher_cider needs `teacher: <label of an earlier evaluate stage>`; '{label}' is not one")
    path = ctx.label_outputs[label] / "predictions.json"
    if not path.is_file():
        raise UserInputError(f"teacher '{label}' has no predictions.json; label an evaluate stage as the teacher")
    return load_predictions(path)


def onnx_captioner(ctx):
    """``(captioner, onnx folder, batch size → captioner)`` for the latest ONNX export of the run.

    Raises:
        UserInputError: no earlier export stage wrote ONNX.
    """
    if not ctx.exports:
        raise UserInputError("backend: onnx needs an earlier `export` stage with formats: [onnx]")
    onnx_dir = ctx.exports[-1] / "onnx"
    if not onnx_dir.is_dir():
        raise UserInputError("backend: onnx needs the latest export stage to write ONNX (formats: [..., onnx])")
    from exporters.onnx_runtime import OnnxCaptioner

    gen = ctx.recipe.generation
    return (
        OnnxCaptioner(onnx_dir, gen),
        onnx_dir,
        lambda bs: OnnxCaptioner(onnx_dir, gen.model_copy(update={"batch_size": bs})),
    )
