"""``finetune``: train the model's own weights (all, or the named parts) with the shared loop.

Output: ``model/`` (the trained model) and ``loss.json`` / ``loss.png``. The VizWiz study's
BLIP-base recipe is a full finetune; per-part training freezes everything else.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from compressor.families import family_for_model
from compressor.lora import freeze_all_but
from compressor.stages.common import load_working_model, model_dir, save_model
from compressor.stages.trainer_glue import batch_maker, eval_hook, summary_of
from compressor.training import train

log = logging.getLogger(__name__)

PRODUCES_MODEL = True


def data_sections(cfg) -> list[str]:
    return [cfg.train.data] + (["val"] if cfg.train.eval_every else [])


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Finetune; see the module docstring."""
    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    trainable = freeze_all_but(model, family, cfg.parts)
    data = ctx.data(cfg.train.data)
    pairs = data.training_pairs()
    result = train(
        model,
        batch_maker(model, processor, ctx.recipe.generation.prompt),
        pairs,
        cfg.train,
        seed=ctx.recipe.seed,
        device=ctx.device,
        out_dir=out_dir,
        evaluate=eval_hook(ctx, processor, cfg.train),
        save_checkpoint=lambda m, d: save_model(m, processor, d),
        progress=ctx.progress,
    )
    best = out_dir / "best"
    if result.best_step is not None and best.is_dir():
        shutil.move(str(best), str(model_dir(out_dir)))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        save_model(model, processor, model_dir(out_dir), state_dict=result.extra.get("state_dict"))
    return {**summary_of(result), "params_trainable": trainable, "train_examples": len(pairs)}
