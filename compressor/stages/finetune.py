"""``finetune``: train the model's own weights (all, or the named parts) with the shared loop.

Output: ``model/`` (the trained model) and ``loss.json`` / ``loss.png``. The VizWiz study's
BLIP-base recipe is a full finetune; per-part training freezes everything else.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from compressor.recipe.schema import TRAINABLE_PARTS, StageBase, TrainSpec, _check_names
from compressor.stages import Declaration
from compressor.training_glue import train_data, trainable_of, training_card

log = logging.getLogger(__name__)


class FinetuneStage(StageBase):
    """Full (or per-part) finetune of the model's own weights."""

    type: Literal["finetune"]
    parts: list[str] | None = Field(None, description=f"Parts to train (default all): {', '.join(TRAINABLE_PARTS)}.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training settings.")

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_names(v, TRAINABLE_PARTS, "part")


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Finetune; see the module docstring."""
    from compressor.families import family_for_model
    from compressor.lora import freeze_all_but
    from compressor.models.folders import load_working_model, model_dir, save_model
    from compressor.training import train
    from compressor.training_glue import batch_maker, eval_hook, summary_of

    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    trainable = freeze_all_but(model, family, cfg.parts)
    data = ctx.data(cfg.train.data)
    pairs = data.training_pairs()
    result = train(
        model,
        batch_maker(model, processor, ctx.recipe.generation.prompt, data),
        pairs,
        cfg.train,
        seed=ctx.recipe.seed,
        device=ctx.device,
        out_dir=out_dir,
        evaluate=eval_hook(ctx, processor, cfg.train),
        save_checkpoint=lambda m, d: save_model(m, processor, d),
        progress=ctx.progress,
        checkpoint_dir=ctx.checkpoint_dir,
    )
    best = out_dir / "best"
    if result.best_step is not None and best.is_dir():
        shutil.move(str(best), str(model_dir(out_dir)))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        save_model(model, processor, model_dir(out_dir), state_dict=result.extra.get("state_dict"))
    return {**summary_of(result), "params_trainable": trainable, "train_examples": len(pairs)}


def check(cfg, pf) -> None:
    """Pre-flight: every part named exists in this model's family."""
    from compressor.errors import UserInputError, did_you_mean

    bad = [p for p in cfg.parts or [] if p not in pf.family.trainable]
    if bad:
        raise UserInputError(
            f"parts: {', '.join(bad)} not in {pf.family.describe_model()}.{did_you_mean(bad[0], pf.family.trainable)} "
            f"Its parts: {', '.join(pf.family.trainable)}"
        )


def plan(cfg, pc) -> dict:
    from compressor.lora import plan_freeze

    return plan_freeze(pc.model, pc.family, cfg.parts)


STAGE = Declaration(
    config=FinetuneStage,
    run=run,
    produces_model=True,
    trains=True,
    uses_generation=True,
    data=train_data,
    needs_merged=True,
    trainable_params=trainable_of,
    check=check,
    plan=plan,
    card=training_card,
)
