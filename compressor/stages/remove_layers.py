"""``remove_layers``: depth pruning of the Q-Former, the language model and the vision encoder.

By position (``drop_top``, ``layers``) or by importance on calibration batches (``count`` +
``select``: ``block_influence``, ShortGPT (Men et al. 2024); ``angular_distance``, Gromov et al.
2024 "The Unreasonable Ineffectiveness of the Deeper Layers"). Surgery in
:mod:`compressor.surgery`. The model is loaded memory-mapped and saved once: no second copy of
the weights is held.

Output: ``model/`` and ``removal.json`` (indices removed per part, and importance scores).
"""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.families import family_for_model
from compressor.pipeline.io import atomic_write_json
from compressor.stages.common import load_working_model, model_dir, save_model
from compressor.surgery import plan_removals, remove_layers

log = logging.getLogger(__name__)

PRODUCES_MODEL = True


def data_sections(cfg) -> list[str]:
    parts = [cfg.vision, cfg.qformer]
    lm = cfg.language_model
    if lm is not None:
        parts += [lm.encoder, lm.decoder] if hasattr(lm, "encoder") else [lm]
    needs = any(p is not None and p.count is not None for p in parts)
    return [cfg.calibration.data] if needs else []


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Remove layers; see the module docstring.

    Raises:
        UserInputError: invalid selections (normally caught by pre-flight before loading).
    """
    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    plan = plan_removals(model.config, family, cfg)
    scores: dict[str, list[float]] = {}
    for part, removed in list(plan.items()):
        if removed is None:
            from compressor.importance import choose_layers

            sel = _selection(cfg, part)
            removed, part_scores = choose_layers(model, processor, family, part, sel, ctx, cfg.calibration)
            plan[part] = removed
            scores[part] = part_scores
    results = []
    params_before = sum(p.numel() for p in model.parameters())
    # Remove stacks one by one; indices are per stack, so order does not matter.
    for part, removed in plan.items():
        if removed:
            results.append(remove_layers(model, family, part, removed))
    params_after = sum(p.numel() for p in model.parameters())
    save_model(model, processor, model_dir(out_dir))
    record = {"removed": results, "scores": scores, "params_before": params_before, "params_after": params_after}
    atomic_write_json(out_dir / "removal.json", record)
    log.info("removed %s; parameters %d → %d", {r["part"]: r["removed"] for r in results}, params_before, params_after)
    return record


def _selection(cfg, part: str):
    if part == "qformer":
        return cfg.qformer
    if part == "vision":
        return cfg.vision
    lm = cfg.language_model
    if hasattr(lm, "encoder"):
        return lm.encoder if part.endswith("encoder") else lm.decoder
    return lm
