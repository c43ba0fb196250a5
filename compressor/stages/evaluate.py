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
    Strict,
    _check_names,
)
from compressor.stages import Declaration

log = logging.getLogger(__name__)


class SpeculativeSpec(Strict):
    """Speculative decoding: a draft proposes tokens, the model checks them; its own greedy captions, faster.

    Greedy only (``generation.num_beams: 1``); the draft must share the model's tokenizer
    (:mod:`exporters.onnx.speculative`).
    """

    draft: str = Field(
        description="The draft: the label of an earlier stage (its ONNX export when it wrote one, else its model) "
        "or a folder path with a `/` (an ONNX export or a model folder). It must share the model's tokenizer."
    )
    num_draft_tokens: int = Field(4, ge=1, le=16, description="Draft tokens proposed per target call (k).")
    min_confidence: float | None = Field(
        None, gt=0, lt=1, description="End a round's drafting once the draft's probability of its proposal is below "
        "this (transformers' assistant_confidence_threshold): helps weak drafts, costs strong ones; same captions."
    )
    variant: Literal["plain", "optimized", "fp32", "fp16", "int8", "int4"] | None = Field(
        None, description="The draft export's variant (int8 / int4: its quantised decoder; default: the export's default)."
    )

    @property
    def is_path(self) -> bool:
        """Whether ``draft`` is a folder path (it holds a ``/``), not a label."""
        return "/" in self.draft or self.draft.startswith(("~", "."))


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
    speculative: SpeculativeSpec | None = Field(
        None, description="Caption with speculative decoding: `{draft: <label or folder>, num_draft_tokens: 4}`; "
        "records spec_acceptance and spec_tokens_per_call."
    )

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
    draft = draft_spec(cfg, ctx)
    if cfg.backend == "onnx":
        target = EvalTarget.onnx(onnx_dir(ctx), gen, ctx.device, source=lambda: load_working_model(input_dir, ctx), draft=draft,
                                 variant=cfg.variant)
    else:
        model, processor = load_working_model(input_dir, ctx)
        target = EvalTarget.torch(model, processor, gen, ctx.device, folder=input_dir, draft=draft)
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
        shards=ctx.dist if ctx.dist.enabled else None,
        num_workers=ctx.num_workers,
    )
    if record is None:  # another process of a multi-process run: it captioned its share, the main one writes
        return {}
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


def onnx_dir(ctx) -> Path:
    """The latest ONNX export of the run.

    Raises:
        UserInputError: no earlier export stage wrote ONNX.
    """
    if not ctx.exports:
        raise UserInputError("backend: onnx needs an earlier `export` stage with formats: [onnx]")
    folder = ctx.exports[-1] / "onnx"
    if not folder.is_dir():
        raise UserInputError("backend: onnx needs the latest export stage to write ONNX (formats: [..., onnx])")
    return folder


def draft_spec(cfg, ctx):
    """The ``DraftSpec`` of ``speculative`` (a label resolved to that stage's export or model);
    without ``speculative``, an ONNX export's bundled draft (``export`` with ``speculative``) is
    used when it has one (greedy captions are the same; the record gains ``spec_acceptance``).

    Raises:
        UserInputError: the label names no earlier stage's model.
    """
    from exporters.onnx.speculative import DraftSpec

    sp = cfg.speculative
    if sp is None:
        return DraftSpec()
    if sp.is_path:
        path = sp.draft
    else:
        out = ctx.label_outputs.get(sp.draft)
        if out is not None and (out / "onnx" / "export.json").is_file():
            path = str(out / "onnx")
        elif sp.draft in ctx.labels:
            path = str(ctx.labels[sp.draft])
        else:
            raise UserInputError(f"speculative.draft: no earlier stage is labelled '{sp.draft}'")
    return DraftSpec(path=path, num_draft_tokens=sp.num_draft_tokens, variant=sp.variant, min_confidence=sp.min_confidence)


def check_recipe(cfg, recipe) -> None:
    """Pre-flight without the model: Java, metric model folders, the teacher, the draft (raises UserInputError)."""
    check(cfg, recipe.data.task)
    sp = cfg.speculative
    if sp is None:
        return
    if recipe.generation.num_beams > 1:
        raise UserInputError(
            f"speculative: speculative decoding is greedy only, but generation.num_beams is "
            f"{recipe.generation.num_beams}; set num_beams: 1 or remove `speculative`"
        )
    check_draft_path(sp)


def check_draft_path(sp) -> None:
    """A ``speculative.draft`` folder must exist and be an export or a model folder (pre-flight).

    Raises:
        UserInputError: naming ``speculative.draft`` (or ``.variant`` for a model folder's variant).
    """
    from compressor.models.loading import is_model_dir
    from exporters.onnx.metadata import is_onnx_dir

    if not sp.is_path:
        return
    p = Path(sp.draft).expanduser()
    if not (is_onnx_dir(p) or is_onnx_dir(p / "onnx") or is_model_dir(p)):
        raise UserInputError(
            f"speculative.draft: {sp.draft} is neither an ONNX export (a folder with export.json) nor a model folder; "
            "give a folder, or the label of an earlier stage (no `/`)"
        )
    if sp.variant is not None and not (is_onnx_dir(p) or is_onnx_dir(p / "onnx")):
        raise UserInputError(f"speculative.variant: {sp.draft} is a model folder; variant applies to ONNX exports")


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
    references=lambda cfg: {
        **({"teacher": (cfg.teacher, ("teacher",))} if cfg.teacher else {}),
        **(
            {"draft": (cfg.speculative.draft, ("speculative", "draft"))}
            if cfg.speculative is not None and not cfg.speculative.is_path
            else {}
        ),
    },
    folders=lambda cfg: {"draft": cfg.speculative.draft} if cfg.speculative is not None and cfg.speculative.is_path else {},
    reads_export=lambda cfg: cfg.backend == "onnx",
    output="evaluation",
    check_recipe=check_recipe,
    check_data=check_data,
    sharded=True,
)
