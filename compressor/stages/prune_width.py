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

from compressor.errors import VerificationError
from compressor.families import family_for_model
from compressor.fileio import atomic_write_json
from compressor.stages.common import load_working_model, model_dir, save_model

log = logging.getLogger(__name__)

PRODUCES_MODEL = True


def data_sections(cfg) -> list[str]:
    return [cfg.calibration.data] if cfg.importance == "taylor" else []


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
    atomic_write_json(out_dir / "pruning.json", record)
    log.info("prune_width: %d layers pruned; parameters %d → %d", len(plans), report["params_before"], report["params_after"])
    return {"layers_pruned": len(plans), "params_before": report["params_before"], "params_after": report["params_after"]}
