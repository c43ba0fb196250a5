"""``prune_width``: attention heads and MLP units of the language model (Torch-Pruning).

See :mod:`compressor.pruning` for the groups, the grouped-KV rule and the importance criteria.
The pruned model's shapes are saved as a shape plan beside its weights
(:mod:`compressor.models.shapes`); after saving, the folder is reloaded and its logits must equal
the in-memory model's exactly, or the stage fails.

Output: ``model/`` (weights + ``shape_plan.json``) and ``pruning.json`` (per layer: heads and
units before and after, which groups were removed; parameters before and after).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from compressor.errors import VerificationError
from compressor.families import family_for_model
from compressor.fileio import atomic_write_json
from compressor.models.folders import load_working_model, model_dir, save_model
from compressor.recipe.schema import CalibrationSpec, StageBase, Strict
from compressor.stages import Declaration, StageCard

log = logging.getLogger(__name__)


class WidthRatio(Strict):
    ratio: float = Field(gt=0, lt=1, description="Fraction to remove.")


class PruneWidthStage(StageBase):
    """Remove attention heads and MLP channels of the language model with torch-pruning."""

    type: Literal["prune_width"]
    part: Literal["language_model"] = Field("language_model", description="The part to prune.")
    heads: WidthRatio | None = Field(
        None, description="`{ratio: r}`: share of attention heads removed per layer (not T5); grouped KV heads go in "
        "whole groups, so r must be within 0.025 of a multiple of 1/kv_heads (the nearest is used; others are refused "
        "naming the nearest allowed).",
    )
    mlp: WidthRatio | None = Field(None, description="`{ratio: r}`: share of MLP hidden units removed per layer (rounded to whole units).")
    importance: Literal["magnitude", "taylor"] = Field("magnitude", description="torch-pruning importance criterion.")
    ignored_layers: list[str] = Field(
        default_factory=list,
        description="Glob patterns over module names (e.g. `*.layers.0.*`, `*.fc1`): matching attentions / MLPs stay untouched.",
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Batches for `taylor`.")

    @model_validator(mode="after")
    def _some(self) -> PruneWidthStage:
        if self.heads is None and self.mlp is None:
            raise ValueError("give `heads: {ratio: …}` and/or `mlp: {ratio: …}`")
        return self


def data(cfg) -> dict[str, int | None]:
    return {cfg.calibration.data: None} if cfg.importance == "taylor" else {}


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Prune heads and/or MLP units; see the module docstring.

    Raises:
        UserInputError: heads on a T5, a ratio that removes nothing or everything.
        VerificationError: the saved model does not reload to the same logits.
    """
    from compressor.models.loading import load_model
    from compressor.pruning import apply_width, calibration_gradients, plan_width
    from compressor.stages.merge_adapters import logits_of, probe_batch

    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    grads = None
    if cfg.importance == "taylor":
        from compressor.importance import calibration_batches

        data = ctx.data(cfg.calibration.data)
        batches = calibration_batches(model, processor, data, cfg.calibration, ctx.recipe.generation.prompt, ctx.device)
        grads = calibration_gradients(model, batches)
    plans = plan_width(
        model,
        family,
        cfg.heads.ratio if cfg.heads else None,
        cfg.mlp.ratio if cfg.mlp else None,
        cfg.importance,
        cfg.ignored_layers,
        grads,
    )
    report = apply_width(model, family, plans)
    out_model = save_model(model, processor, model_dir(out_dir))
    batch = probe_batch(model, processor)
    reloaded, _ = load_model(out_model, dtype=ctx.dtype, device=ctx.device, with_processor=False)
    diff = float((logits_of(reloaded, batch) - logits_of(model, batch)).abs().max())
    if diff != 0.0:
        raise VerificationError(f"prune_width: the saved model reloads with logits off by {diff:.3g}")
    del reloaded
    record = {
        "importance": cfg.importance,
        "ignored_layers": cfg.ignored_layers,
        "plans": [{"part": p.part, "layer": p.index, "removed_kv_groups": p.heads, "removed_units": p.units} for p in plans],
        **report,
    }
    heads = [r for r in report["layers"] if "heads_before" in r]
    summary = {"layers_pruned": len(plans), "params_before": report["params_before"], "params_after": report["params_after"]}
    if heads:  # what whole key/value groups made of heads.ratio
        removed = 1 - sum(r["heads_after"] for r in heads) / sum(r["heads_before"] for r in heads)
        record["heads_ratio"] = summary["heads_ratio"] = {"asked": cfg.heads.ratio, "removed": round(removed, 4)}
        log.info("prune_width: heads.ratio %s removed %.4g of the heads of %d layers", cfg.heads.ratio, removed, len(heads))
    atomic_write_json(out_dir / "pruning.json", record)
    log.info("prune_width: %d layers pruned; parameters %d → %d", len(plans), report["params_before"], report["params_after"])
    return summary


def check(cfg, pf) -> None:
    """Pre-flight: width pruning exists for this family, heads can be pruned where asked, the ratio removes something."""
    from compressor.pruning import check_width_on_config

    check_width_on_config(pf.config, pf.family, cfg)


def plan(cfg, pc) -> dict:
    pc.notes.append(f"stage {pc.index}: prune_width is not planned (width pruning changes shapes the plan does not model)")
    return {}


def card(record: dict) -> StageCard:
    from compressor.models.shapes import LOADING

    return StageCard(
        limitations=[f"Width pruning changed layer shapes (stage {record.get('index')}); the model needs vlm-compress's "
                     "shape plan to load."],
        loading=LOADING,
    )


STAGE = Declaration(
    config=PruneWidthStage,
    run=run,
    produces_model=True,
    data=data,
    needs_merged=True,
    reshapes=True,
    check=check,
    plan=plan,
    card=card,
)
