"""``select_queries``: per image, at inference, only the k query outputs with the best CATP vote reach the LM.

CATP at inference (Cross-Attention Token Pruning, arXiv 2404.08567): the Q-Former still runs all
N learned queries; for each image, its cross-attention probabilities between each query and the
image patches, aggregated over heads and layers (:func:`compressor.tokens.catp_votes`), choose
the k query outputs that are projected into the language model, in their original order. Unlike
``reduce_queries`` the choice follows the image, and no weight changes.

The option is recorded in the model folder (``config.json``'s ``vlmc_token_reduction``:
``{"query_tokens": {"keep": k, "select": "catp"}}``; weights and processor are hard links of the
input). The toolchain's loaders apply it (the Q-Former's forward returns the k selected outputs:
:func:`compressor.families.blip2.apply_token_options`), its batches carry k ``<image>`` tokens,
and the ONNX export holds the selection (TopK + Gather) inside ``image_encoder`` (output
``(batch, k, hidden)``). Plain ``from_pretrained`` ignores the record and runs all N queries.
Later stages (heal, export, evaluate) work on the selecting model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.recipe.schema import StageBase
from compressor.stages import Declaration, FieldProblem, StageCard

log = logging.getLogger(__name__)

OPTION = "query_tokens"


class SelectQueriesStage(StageBase):
    """Per image at inference, only the k query outputs with the highest CATP vote reach the language model."""

    type: Literal["select_queries"]
    keep: int = Field(ge=1, description="Query outputs per image that reach the language model (at most num_query_tokens).")
    select: Literal["catp"] = Field(
        "catp", description="catp: the Q-Former's cross-attention vote of each image (arXiv 2404.08567)."
    )


def _value(cfg, n: int) -> dict | None:
    return {"keep": cfg.keep, "select": cfg.select} if cfg.keep < n else None  # keep = N: nothing to select


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Record the selection; see the module docstring.

    Raises:
        UserInputError: ``keep`` above the model's queries, or a model without learned queries.
    """
    from transformers import AutoConfig

    from compressor.families import family_for_config
    from compressor.models.folders import model_dir
    from compressor.tokens import check_keep, write_with_option

    family = family_for_config(AutoConfig.from_pretrained(str(input_dir)))
    _refuse(family)
    check_keep(cfg.keep, family.num_queries)
    rec = write_with_option(input_dir, model_dir(out_dir), OPTION, _value(cfg, family.num_queries))
    log.info("per image, %d of %d query outputs reach the language model (%s)", cfg.keep, family.num_queries, cfg.select)
    return {"keep": cfg.keep, "of": family.num_queries, "select": cfg.select, "record": rec}


def _refuse(family) -> None:
    from compressor.errors import UserInputError

    if not family.num_queries:
        raise UserInputError(f"{family.describe_model()} has no learned query tokens to select from")


def check(cfg, pf) -> None:
    """Pre-flight on the config: learned queries exist and ``keep`` ≤ their number; the simulated
    config then carries the record."""
    from compressor.errors import UserInputError
    from compressor.families import family_for_config
    from compressor.tokens import check_keep, set_token_option

    family = family_for_config(pf.config)
    try:
        _refuse(family)
        check_keep(cfg.keep, family.num_queries)
    except UserInputError as exc:
        raise FieldProblem(("keep",), str(exc)) from None
    set_token_option(pf.config, OPTION, _value(cfg, family.num_queries))


def plan(cfg, pc) -> dict:
    """The selection on the meta model: GFLOPs count the vote, and the language model reads k tokens per image."""
    from compressor.families import family_for_config
    from compressor.tokens import apply_token_options, set_token_option

    n = family_for_config(pc.model.config).num_queries
    set_token_option(pc.model.config, OPTION, _value(cfg, n))
    apply_token_options(pc.model)
    return {"effect": f"{cfg.keep} of {n} query outputs per image ({cfg.select}, at inference)"}


def card(record: dict) -> StageCard:
    s = record.get("summary") or {}
    if not s.get("keep"):
        return StageCard(tags=["token-reduction"])
    line = (f"per image, the {s['keep']} of {s.get('of')} query outputs with the highest CATP cross-attention vote "
            "reach the language model (selection recorded in config.json, run by vlm-compress's loaders and its ONNX export)")
    return StageCard(
        details=[line],
        tags=["token-reduction", "catp"],
        limitations=[
            f"Query selection at inference: {line}. Loaded with plain transformers `from_pretrained`, the model runs "
            f"all {s.get('of')} queries (the record is ignored); the saving is in the language model's prefill only."
        ],
    )


STAGE = Declaration(
    config=SelectQueriesStage,
    run=run,
    produces_model=True,
    needs_merged=True,
    check=check,
    plan=plan,
    card=card,
)
