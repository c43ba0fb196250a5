"""``reduce_queries``: keep k of the N learned query tokens for good (static query reduction).

A BLIP-2 / InstructBLIP feeds its language model one token per learned query (32 on the
published models); fewer queries shorten every prefill and the Q-Former's work, without touching
another weight. Which queries stay (``select``):

* ``first``: queries ``0 … k-1`` (Matryoshka Query Transformer style: Hu et al. 2024, which
  trains the Q-Former so that its first queries carry the most; on a model not trained that way
  it is the positional baseline);
* ``catp``: the k queries with the highest CATP vote on the calibration batches (Cross-Attention
  Token Pruning, arXiv 2404.08567: the Q-Former's cross-attention probabilities between each
  query and the image patches, aggregated over heads and layers; :func:`compressor.tokens.catp_votes`),
  averaged over the calibration images;
* ``ablation``: the k queries whose removal raises the caption loss most: each query's image
  token is masked out of the language model's input in turn (N extra forward passes per batch;
  slower, the reference the other two are judged against).

The stage slices ``query_tokens`` (in the original order), sets ``num_query_tokens`` in the
config and in the processor (prompts then carry k ``<image>`` tokens), so the saved folder loads
and generates with plain transformers (``AutoProcessor`` + ``from_pretrained``, no missing key).
Output: ``model/``, ``queries.json`` (kept and removed queries, parameters before and after) and,
for ``catp`` / ``ablation``, ``importance.json`` (every query's score) and ``importance.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.recipe.schema import CalibrationSpec, StageBase
from compressor.stages import Declaration, FieldProblem, StageCard

log = logging.getLogger(__name__)


class ReduceQueriesStage(StageBase):
    """Keep k of the learned query tokens for good (fewer image tokens per prompt): first, CATP or ablation."""

    type: Literal["reduce_queries"]
    keep: int = Field(ge=1, description="Queries kept (at most the model's num_query_tokens).")
    select: Literal["first", "catp", "ablation"] = Field(
        "first",
        description="first: queries 0..k-1 (Matryoshka Query Transformer style); catp: highest mean CATP "
        "cross-attention vote on the calibration batches (arXiv 2404.08567); ablation: largest rise of the caption "
        "loss when the query is masked (N forward passes per batch).",
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="For `catp` and `ablation`.")


def data(cfg) -> dict[str, int | None]:
    return {cfg.calibration.data: None} if cfg.select != "first" else {}


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Reduce the queries; see the module docstring.

    Raises:
        UserInputError: ``keep`` above the model's queries, a model without learned queries, or
            one that already selects queries per image (normally caught by pre-flight).
    """
    from compressor.families import family_for_model
    from compressor.fileio import atomic_write_json
    from compressor.models.folders import load_working_model, model_dir, save_model
    from compressor.tokens import calibration_query_scores, check_keep, plot_query_scores, top_queries

    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    _refuse(family)
    n = family.num_queries
    check_keep(cfg.keep, n)
    if cfg.select == "first":
        kept = list(range(cfg.keep))
    else:
        from compressor.importance import calibration_batches

        batches = calibration_batches(model, processor, ctx.data(cfg.calibration.data), cfg.calibration,
                                      ctx.recipe.generation.prompt, ctx.device)
        scores = calibration_query_scores(model, family, batches, cfg.select)
        kept = top_queries(scores, cfg.keep)
        what = {"catp": "mean CATP vote per image", "ablation": "rise of the caption loss when masked"}[cfg.select]
        atomic_write_json(out_dir / "importance.json", {
            "data": cfg.calibration.data, "batches": len(batches), "select": cfg.select, "score": what,
            "scores": [round(s, 8) for s in scores], "kept": kept,
        })
        plot_query_scores(scores, kept, f"queries: {what}", out_dir / "importance.png")
    params_before = sum(p.numel() for p in model.parameters())
    family.reduce_queries(model, processor, kept)
    params_after = sum(p.numel() for p in model.parameters())
    save_model(model, processor, model_dir(out_dir))
    record = {"select": cfg.select, "keep": cfg.keep, "of": n, "kept": kept,
              "removed": [i for i in range(n) if i not in set(kept)],
              "params_before": params_before, "params_after": params_after}
    atomic_write_json(out_dir / "queries.json", record)
    log.info("queries %d → %d (%s): kept %s", n, cfg.keep, cfg.select, kept)
    return record


def _refuse(family) -> None:
    from compressor.errors import UserInputError

    if not family.num_queries:
        raise UserInputError(f"{family.describe_model()} has no learned query tokens to reduce")
    if family.token_options.get("query_tokens"):
        raise UserInputError(
            "this model already selects its queries per image (select_queries); reduce the queries before "
            "selecting them, or select fewer per image instead"
        )


def check(cfg, pf) -> None:
    """Pre-flight on the config: the model has learned queries and ``keep`` ≤ their number; the
    simulated config then has ``keep`` queries (later stages are checked against it)."""
    from compressor.errors import UserInputError
    from compressor.families import family_for_config
    from compressor.tokens import check_keep

    family = family_for_config(pf.config)
    try:
        _refuse(family)
        check_keep(cfg.keep, family.num_queries)
    except UserInputError as exc:
        raise FieldProblem(("keep",), str(exc)) from None
    pf.config.num_query_tokens = cfg.keep


def plan(cfg, pc) -> dict:
    """The reduction on the meta model; ``catp`` / ``ablation`` choices (made on data) are counted as
    the first k (exact: every query costs the same)."""
    from compressor.families import family_for_config

    family = family_for_config(pc.model.config)
    n = family.num_queries
    family.reduce_queries(pc.model, None, list(range(cfg.keep)))
    return {"effect": f"queries {n} → {cfg.keep} ({cfg.select})"}


def card(record: dict) -> StageCard:
    s = record.get("summary") or {}
    if not s.get("keep"):
        return StageCard(tags=["token-reduction"])
    line = f"learned queries: kept {s['keep']} of {s.get('of')} ({s.get('select')}): {s.get('kept')}"
    return StageCard(
        details=[line],
        tags=["token-reduction"],
        limitations=[
            f"The model reads {s['keep']} instead of {s.get('of')} query tokens per image: {line}. What the removed "
            "queries carried is gone unless healing recovered it; the saving is in the Q-Former and the language "
            "model's prefill (each generated token still costs the same)."
        ],
    )


STAGE = Declaration(
    config=ReduceQueriesStage,
    run=run,
    produces_model=True,
    data=data,
    needs_merged=True,
    reshapes=True,
    check=check,
    plan=plan,
    card=card,
)
