"""``remove_layers``: depth pruning of the Q-Former, the language model and the vision encoder.

By position (``drop_top``, ``layers``) or by importance on calibration batches of the recipe's
data (``count`` + ``select``: ``block_influence``, ShortGPT (Men et al. 2024); ``angular_distance``,
Gromov et al. 2024 "The Unreasonable Ineffectiveness of the Deeper Layers"; see
:mod:`compressor.importance`). Surgery in :mod:`compressor.surgery`. The model is loaded
memory-mapped and saved once: no second copy of the weights is held.

Output: ``model/``; ``removal.json`` (indices removed and kept per part, parameters before and
after); with importance selection, ``importance.json`` (every layer's block influence and every
block's angular distance, per scored part) and ``importance.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.families import family_for_model
from compressor.fileio import atomic_write_json
from compressor.stages.common import load_working_model, model_dir, save_model
from compressor.surgery import plan_removals, remove_layers

log = logging.getLogger(__name__)

PRODUCES_MODEL = True


def _selections(cfg) -> list:
    parts = [cfg.vision, cfg.qformer]
    lm = cfg.language_model
    if lm is not None:
        parts += [lm.encoder, lm.decoder] if hasattr(lm, "encoder") else [lm]
    return [p for p in parts if p is not None]


def data_sections(cfg) -> list[str]:
    needs = any(p.count is not None for p in _selections(cfg))
    return [cfg.calibration.data] if needs else []


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Remove layers; see the module docstring.

    Raises:
        UserInputError: invalid selections (normally caught by pre-flight before loading).
    """
    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    plan = plan_removals(model.config, family, cfg)
    by_importance = [part for part, removed in plan.items() if removed is None]
    scores_json: dict[str, dict] = {}
    if by_importance:
        from compressor.importance import calibration_batches, plot_importance, select_layers, stack_scores

        data = ctx.data(cfg.calibration.data)
        batches = calibration_batches(model, processor, data, cfg.calibration, ctx.recipe.generation.prompt, ctx.device)
        scores = stack_scores(model, family, by_importance, batches)
        for part in by_importance:
            sel = _selection(cfg, part)
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


def _selection(cfg, part: str):
    if part == "qformer":
        return cfg.qformer
    if part == "vision":
        return cfg.vision
    lm = cfg.language_model
    if hasattr(lm, "encoder"):
        return lm.encoder if part.endswith("encoder") else lm.decoder
    return lm
