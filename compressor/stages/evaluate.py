"""``evaluate``: score the current model (or the latest ONNX export) and measure its characteristics.

Output: ``eval.json`` (label, metrics on the 0–100 scale, characteristics, decoding settings,
data section and fingerprint, notes; the record of :func:`compressor.evaluation.evaluate`,
the same one ``compress eval`` writes) and ``predictions.json`` (a COCO results list, or a VQA
results list ``[{question_id, answer}]``). Baseline and candidate go through the same harness.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

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
from compressor.models.folders import load_working_model
from compressor.recipe.schema import (
    METRIC_KEYS,
    CharacteristicsSpec,
    MetricModelSpec,
    StageBase,
    _check_names,
)
from compressor.stages import Declaration

log = logging.getLogger(__name__)


class EvaluateStage(StageBase):
    """Score the current model (or its ONNX export) with the same harness for every label."""

    type: Literal["evaluate"]
    label: str = Field(description="Name of this evaluation (the gate's candidate / baseline).")
    data: Literal["train", "val", "eval", "test", "calibration"] = Field("eval", description="Data section.")
    limit: int | None = Field(None, ge=1, description="Score the first N examples.")
    metrics: list[str] | None = Field(
        None, description="Metric keys (default: BLEU-1..4, METEOR, ROUGE-L, CIDEr for captions; vqa_accuracy for VQA)."
    )
    backend: Literal["torch", "onnx"] = Field("torch", description="Score the PyTorch model or the latest ONNX export.")
    variant: Literal["plain", "optimized", "fp32", "fp16", "int8", "int4"] | None = Field(
        None, description="backend onnx: the export's variant to run (default: the export's default_variant)."
    )
    characteristics: CharacteristicsSpec = Field(default_factory=CharacteristicsSpec, description="Params, GFLOPs, latency.")
    bertscore: MetricModelSpec | None = Field(None, description="bert-score model (needed for bertscore_f1).")
    clipscore: MetricModelSpec | None = Field(None, description="CLIP model (needed for clipscore).")
    teacher: str | None = Field(None, description="Label whose captions are references for `teacher_cider`.")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_names(v, METRIC_KEYS, "metric")

    @model_validator(mode="after")
    def _variant(self) -> EvaluateStage:
        if self.variant is not None and self.backend != "onnx":
            raise ValueError("`variant` picks an ONNX variant: it needs backend: onnx")
        return self


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
        captioner, onnx_dir, make = onnx_captioner(ctx, cfg.variant)
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


def onnx_captioner(ctx, variant: str | None = None):
    """``(captioner, onnx folder, batch size → captioner)`` for the latest ONNX export of the run
    (``variant``: the export's variant to run, None for its default).

    Raises:
        UserInputError: no earlier export stage wrote ONNX.
    """
    if not ctx.exports:
        raise UserInputError("backend: onnx needs an earlier `export` stage with formats: [onnx]")
    onnx_dir = ctx.exports[-1] / "onnx"
    if not onnx_dir.is_dir():
        raise UserInputError("backend: onnx needs the latest export stage to write ONNX (formats: [..., onnx])")
    from exporters.onnx import OnnxCaptioner

    gen = ctx.recipe.generation
    return (
        OnnxCaptioner(onnx_dir, gen, variant=variant),
        onnx_dir,
        lambda bs: OnnxCaptioner(onnx_dir, gen.model_copy(update={"batch_size": bs}), variant=variant),
    )


def check_recipe(cfg, recipe) -> None:
    """Pre-flight without the model: Java, metric model folders, the teacher (raises UserInputError)."""
    check(cfg, recipe.data.task)


def check_data(cfg, recipe, datasets: dict) -> None:
    """Pre-flight with the data loaded: what the metrics need of it (references, yes/no answers)."""
    from compressor.evaluation import check_data_for_metrics

    if (cfg.data, cfg.limit) in datasets:
        check_data_for_metrics(resolve_metrics(cfg.metrics, recipe.data.task), datasets[(cfg.data, cfg.limit)])


STAGE = Declaration(
    config=EvaluateStage,
    run=run,
    produces_model=False,
    uses_generation=True,
    data=lambda cfg: {cfg.data: cfg.limit},
    references=lambda cfg: {"teacher": (cfg.teacher, ("teacher",))} if cfg.teacher else {},
    reads_export=lambda cfg: cfg.backend == "onnx",
    output="evaluation",
    check_recipe=check_recipe,
    check_data=check_data,
)
