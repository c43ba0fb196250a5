"""``merge_tokens``: token merging (ToMe) in the vision encoder, r tokens per layer, at inference.

ToMe (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster"): between the attention and
the MLP of every vision-encoder layer, bipartite soft matching merges the ``r`` most similar
token pairs (keys averaged over heads as the similarity; merged tokens are size-weighted
averages; attention adds ``log(size)`` to its logits: proportional attention; the class token is
never merged). ``r`` is fixed per layer, so a ViT of ``L`` layers over ``T`` tokens ends with
``T - L·r`` tokens and every shape stays static; what reads the vision output (BLIP-2's Q-Former
cross-attention, BLIP's text decoder) then attends to fewer tokens.

The option is recorded in the model folder (``config.json``'s ``vlmc_token_reduction``:
``{"token_merging": {"r": r}}``; weights and processor are hard links of the input): the
toolchain's loaders apply it (:func:`compressor.families.blip.vit_token_merging`), and the ONNX
export holds it inside the image graph. Plain ``from_pretrained`` ignores the record. ``r`` is
checked against the model's token count before any weight is read: each layer can merge at most
half of its tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.recipe.schema import StageBase
from compressor.stages import Declaration, FieldProblem, StageCard

log = logging.getLogger(__name__)

OPTION = "token_merging"


class MergeTokensStage(StageBase):
    """Token merging (ToMe) in the vision encoder: r tokens merged per layer, applied at inference."""

    type: Literal["merge_tokens"]
    r: int = Field(ge=1, description="Tokens merged in every vision-encoder layer (bipartite soft matching).")


def _schedule(family, config, r: int) -> list[int]:
    """Vision tokens entering each layer and leaving the last (raises UserInputError when r is too large)."""
    from compressor.errors import UserInputError
    from compressor.families import get_config_value
    from compressor.tokens import merge_schedule

    if not family.vision_tokens or "vision" not in family.stacks:
        raise UserInputError(f"{family.describe_model()} has no vision encoder whose tokens can be merged")
    layers = int(get_config_value(config, family.stack("vision").count_fields[0]))
    return merge_schedule(family.vision_tokens, layers, r)


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Record the merging; see the module docstring.

    Raises:
        UserInputError: ``r`` too large for the vision encoder's tokens (normally caught by pre-flight).
    """
    from transformers import AutoConfig

    from compressor.families import family_for_config
    from compressor.models.folders import model_dir
    from compressor.tokens import write_with_option

    config = AutoConfig.from_pretrained(str(input_dir))
    tokens = _schedule(family_for_config(config), config, cfg.r)
    rec = write_with_option(input_dir, model_dir(out_dir), OPTION, {"r": cfg.r})
    log.info("token merging: %d per layer, vision tokens %d → %d", cfg.r, tokens[0], tokens[-1])
    return {"r": cfg.r, "tokens": tokens, "record": rec}


def check(cfg, pf) -> None:
    """Pre-flight on the config: ``r`` fits the vision encoder's tokens at every layer; the
    simulated config then carries the record."""
    from compressor.errors import UserInputError
    from compressor.families import family_for_config
    from compressor.tokens import set_token_option

    try:
        _schedule(family_for_config(pf.config), pf.config, cfg.r)
    except UserInputError as exc:
        raise FieldProblem(("r",), str(exc)) from None
    set_token_option(pf.config, OPTION, {"r": cfg.r})


def plan(cfg, pc) -> dict:
    """The merging on the meta model: GFLOPs count the vision encoder over fewer tokens (and the matching)."""
    from compressor.families import family_for_config
    from compressor.tokens import apply_token_options, set_token_option

    tokens = _schedule(family_for_config(pc.model.config), pc.model.config, cfg.r)
    set_token_option(pc.model.config, OPTION, {"r": cfg.r})
    apply_token_options(pc.model)
    return {"effect": f"vision tokens {tokens[0]} → {tokens[-1]} (ToMe r={cfg.r})"}


def card(record: dict) -> StageCard:
    s = record.get("summary") or {}
    tokens = s.get("tokens") or []
    if not tokens:
        return StageCard(tags=["token-merging"])
    line = (f"token merging (ToMe, Bolya et al. 2023) in the vision encoder: {s.get('r')} tokens merged per layer, "
            f"{tokens[0]} → {tokens[-1]} tokens (recorded in config.json, run by vlm-compress's loaders and its ONNX export)")
    return StageCard(
        details=[line],
        tags=["token-merging", "tome"],
        limitations=[
            f"{line}. Loaded with plain transformers `from_pretrained`, the model merges nothing (the record is "
            "ignored). The saving is in the vision encoder (and what cross-attends to it); generated tokens cost the same."
        ],
    )


STAGE = Declaration(
    config=MergeTokensStage,
    run=run,
    produces_model=True,
    needs_merged=True,
    check=check,
    plan=plan,
    card=card,
)
