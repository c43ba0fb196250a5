"""``remove_layers``: depth pruning of any removable stack the model's family declares.

By position (``drop_top``, ``layers``) or by importance on calibration batches of the recipe's
data (``count`` + ``select``: ``block_influence``, ShortGPT (Men et al. 2024); ``angular_distance``,
Gromov et al. 2024 "The Unreasonable Ineffectiveness of the Deeper Layers"; see
:mod:`compressor.importance`). The recipe keys (``vision``, ``language_model``, BLIP-2's Q-Former …) are
the stacks the families declare (:func:`compressor.families.removal_keys`); which stack of this
model each names, and what it may lose, is the family's (:mod:`compressor.surgery`). The model is
loaded memory-mapped and saved once: no second copy of the weights is held.

Output: ``model/``; ``removal.json`` (indices removed and kept per part, parameters before and
after); with importance selection, ``importance.json`` (every layer's block influence and every
block's angular distance, per scored part) and ``importance.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, create_model, model_validator

from compressor.families import encoder_decoder_keys, removal_keys
from compressor.recipe.schema import CalibrationSpec, StageBase, Strict
from compressor.stages import Declaration, StageCard

log = logging.getLogger(__name__)


class LayerSelection(Strict):
    """Which layers of one stack to remove: exactly one of drop_top, layers, count."""

    drop_top: int | None = Field(None, ge=0, description="Remove the top k layers (0: none, e.g. one point of a `search:` space).")
    layers: list[int] | None = Field(None, description="Remove these layer indices (0-based).")
    count: int | None = Field(
        None, ge=0, description="Remove k layers chosen by `select` on calibration data (0: none)."
    )
    select: Literal["block_influence", "angular_distance"] | None = Field(
        None,
        description="block_influence (ShortGPT, Men et al. 2024: 1 - cos(in, out), lowest removed) or "
        "angular_distance (Gromov et al. 2024: the contiguous block of `count` layers with the smallest angle).",
    )

    @model_validator(mode="after")
    def _one(self) -> LayerSelection:
        given = [k for k in ("drop_top", "layers", "count") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of drop_top, layers, count (got {', '.join(given) or 'none'})")
        if self.count is not None and self.select is None:
            raise ValueError("`count` needs `select: block_influence` or `select: angular_distance`")
        if self.count is None and self.select is not None:
            raise ValueError("`select` goes with `count`")
        return self


class EncoderDecoderSelection(Strict):
    """Encoder-decoder language models (T5): the encoder and decoder stacks, counted separately."""

    encoder: LayerSelection | None = Field(None, description="Encoder blocks to remove.")
    decoder: LayerSelection | None = Field(None, description="Decoder blocks to remove.")


def _selection_tag(value: Any) -> str:
    if isinstance(value, dict) and ({"encoder", "decoder"} & set(value)):
        return "encoder_decoder"
    return "stack"


StackSelection = Annotated[
    Union[Annotated[LayerSelection, Tag("stack")], Annotated[EncoderDecoderSelection, Tag("encoder_decoder")]],
    Discriminator(_selection_tag),
]


class _RemoveLayersBase(StageBase):
    type: Literal["remove_layers"]

    @model_validator(mode="after")
    def _some(self):
        if all(getattr(self, k) is None for k in removal_keys()):
            raise ValueError(f"name at least one part: {', '.join(removal_keys())}")
        return self


#: One optional selection per stack key the families declare, then the calibration batches.
RemoveLayersStage = create_model(
    "RemoveLayersStage",
    __base__=_RemoveLayersBase,
    __module__=__name__,
    __doc__="Remove whole layers (depth pruning), fixing layer_idx and the config's layer counts.",
    **{
        key: ((StackSelection if key in encoder_decoder_keys() else LayerSelection) | None, Field(None, description=text))
        for key, text in removal_keys().items()
    },
    calibration=(CalibrationSpec, Field(default_factory=CalibrationSpec, description="For `count` + `select`.")),
)


def _by_importance(cfg) -> bool:
    sels = [getattr(cfg, k) for k in removal_keys()]
    flat = [s for sel in sels if sel is not None for s in ([sel.encoder, sel.decoder] if hasattr(sel, "encoder") else [sel])]
    return any(s is not None and s.count for s in flat)


def data(cfg) -> dict[str, int | None]:
    return {cfg.calibration.data: None} if _by_importance(cfg) else {}


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Remove layers; see the module docstring.

    Raises:
        UserInputError: invalid selections (normally caught by pre-flight before loading).
    """
    from compressor.families import family_for_model
    from compressor.fileio import atomic_write_json
    from compressor.models.folders import load_working_model, model_dir, save_model
    from compressor.surgery import plan_removals, remove_layers, selections

    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    plan = plan_removals(model.config, family, cfg)
    by_importance = [part for part, removed in plan.items() if removed is None]
    scores_json: dict[str, dict] = {}
    if by_importance:
        from compressor.importance import calibration_batches, plot_importance, select_layers, stack_scores

        data = ctx.data(cfg.calibration.data)
        batches = calibration_batches(model, processor, data, cfg.calibration, ctx.recipe.generation.prompt, ctx.device,
                                      ctx.num_workers)
        scores = stack_scores(model, family, by_importance, batches)
        chosen = selections(cfg, family)
        for part in by_importance:
            sel = chosen[part]
            plan[part] = select_layers(scores[part], sel.count, sel.select, family)
            scores_json[part] = {**scores[part].to_json(), "select": sel.select, "count": sel.count, "removed": plan[part]}
            log.info("%s: %s chose layers %s", part, sel.select, plan[part])
        atomic_write_json(out_dir / "importance.json", {"data": cfg.calibration.data, "batches": len(batches), "parts": scores_json})
        plot_importance(scores_json, out_dir / "importance.png")
    results = []
    params_before = sum(p.numel() for p in model.parameters())
    # Remove stacks one by one; indices are per stack, so order does not matter.
    for part, removed in plan.items():
        if removed:
            results.append(remove_layers(model, family, part, removed))
    params_after = sum(p.numel() for p in model.parameters())
    save_model(model, processor, model_dir(out_dir))
    record = {"removed": results, "params_before": params_before, "params_after": params_after}
    atomic_write_json(out_dir / "removal.json", record)
    log.info("removed %s; parameters %d → %d", {r["part"]: r["removed"] for r in results}, params_before, params_after)
    return {**record, "selected_by": {p: s["select"] for p, s in scores_json.items()}}


def check(cfg, pf) -> None:
    """Pre-flight on the config: the parts exist, indices are in range, stack rules hold; then the
    simulated config loses the layers, so later stages are checked against the smaller model."""
    from compressor.families import get_config_value, set_config_value
    from compressor.surgery import plan_removals, removal_count

    plan = plan_removals(pf.config, pf.family, cfg)
    pf.removals[pf.index] = plan
    for part, removed in plan.items():
        st = pf.family.stack(part)
        n = int(get_config_value(pf.config, st.count_fields[0]))
        k = len(removed) if removed is not None else removal_count(cfg, pf.family, part)
        for path in st.count_fields:
            set_config_value(pf.config, path, n - k)


def plan(cfg, pc) -> dict:
    """The removal on the meta model; importance choices (made on data at run time) are counted as the top layers."""
    from compressor.surgery import plan_removals, removal_count, remove_layers, stack_size

    done = []
    for part, removed in plan_removals(pc.model.config, pc.family, cfg).items():
        if removed is None:
            n, k = stack_size(pc.model.config, pc.family, part), removal_count(cfg, pc.family, part)
            removed = list(range(n - k, n))
            uneven = getattr(pc.family.stack(part).rule, "uneven_layers", None)
            pc.notes.append(
                f"stage {pc.index}: {part} removes {k} layers chosen on calibration data at run time; counted as the top "
                f"{k} (exact when the stack's layers are the same size" + (f", which {uneven} are not)" if uneven else ")")
            )
        done.append(remove_layers(pc.model, pc.family, part, removed))
    return {"removed": {r["part"]: r["removed"] for r in done}}


def _removal_text(r: dict) -> str:
    return f"{r.get('part')}: removed layers {r.get('removed', [])} of {r.get('before')} ({r.get('after')} kept)"


def card(record: dict) -> StageCard:
    removed = [r for r in (record.get("summary") or {}).get("removed", []) if isinstance(r, dict)]
    return StageCard(
        details=[_removal_text(r) for r in removed],
        tags=["layer-pruning"],
        limitations=[
            f"Removed: {_removal_text(r)}. What those layers knew is gone unless healing recovered it; check the "
            "metrics on your own data."
            for r in removed
            if r.get("removed")
        ],
    )


STAGE = Declaration(
    config=RemoveLayersStage,
    run=run,
    produces_model=True,
    data=data,
    needs_merged=True,
    reshapes=True,
    check=check,
    plan=plan,
    card=card,
)
