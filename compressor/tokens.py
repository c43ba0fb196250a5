"""Token reduction: the family-independent parts (the record in the model folder, CATP's vote, ToMe's merge).

Three mechanisms cut the tokens a vision-language model works on without touching a weight
(stages ``reduce_queries``, ``select_queries``, ``merge_tokens``); what a model's tokens *are*
(learned queries, vision patches, where the cross-attention probabilities come from) is its
family's (``Family.query_scores``, ``Family.apply_token_options`` …). This module holds the
tensor arithmetic they share and the record the inference-time options leave in the model folder:

* **the record**: ``config.json`` carries :data:`RECORD_KEY`, e.g.
  ``{"query_tokens": {"keep": 4, "of": 8, "select": "catp"}, "token_merging": {"r": 2}}``.
  transformers keeps unknown config keys, so every ``save_pretrained`` (every later stage, the
  safetensors export, the ONNX folder's config) carries it, and plain ``from_pretrained`` ignores
  it: a model loaded without this toolchain runs all its queries and all its patches. The
  toolchain's loaders (:func:`compressor.models.loading.load_model`, ``load_skeleton``, the meta
  model of ``compress plan``) apply it with :func:`apply_token_options`.
* **CATP** (Cross-Attention Token Pruning, arXiv 2404.08567): the Q-Former's cross-attention
  probabilities between each query and the image patches decide which queries reach the language
  model, by a vote aggregated over heads and layers (:func:`catp_votes`).
* **ToMe** (Token Merging, Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster"):
  between the attention and the MLP of every vision-encoder layer, bipartite soft matching merges
  the ``r`` most similar token pairs (keys averaged over heads as the similarity), merged tokens
  are size-weighted averages, and attention adds ``log(size)`` to its logits (proportional
  attention) (:func:`bipartite_soft_matching`, :func:`merge_wavg`, :func:`merge_schedule`).
  ``r`` is fixed per layer, so every shape stays static (ONNX exports it as is).

Everything here works on the meta device too (``compress plan``), imports torch lazily and reads
no weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from compressor.errors import UserInputError

log = logging.getLogger(__name__)

#: The config key holding the inference-time token options (see the module docstring).
RECORD_KEY = "vlmc_token_reduction"
#: Query selections the static ``reduce_queries`` stage knows.
QUERY_SELECTIONS = ("first", "catp", "ablation")


# --------------------------------------------------------------------------------------------
# The record in config.json
# --------------------------------------------------------------------------------------------


def token_record(config) -> dict[str, Any]:
    """The inference-time token options recorded in a config (``{}`` when none).

    Args:
        config: a transformers config (or anything carrying :data:`RECORD_KEY` as an attribute or key).
    """
    rec = config.get(RECORD_KEY) if isinstance(config, dict) else getattr(config, RECORD_KEY, None)
    return dict(rec) if isinstance(rec, dict) else {}


def set_token_option(config, name: str, value: dict | None) -> dict[str, Any]:
    """Set (or with ``value=None`` remove) one option of the record; returns the new record.

    Args:
        config: a transformers config (changed in place).
        name: ``query_tokens`` or ``token_merging``.
        value: the option's JSON-able settings.
    """
    rec = token_record(config)
    if value is None:
        rec.pop(name, None)
    else:
        rec[name] = dict(value)
    if rec:
        setattr(config, RECORD_KEY, rec)
    elif hasattr(config, RECORD_KEY):
        delattr(config, RECORD_KEY)
    return rec


def write_with_option(input_dir: Path, out: Path, name: str, value: dict | None) -> dict[str, Any]:
    """A model folder equal to ``input_dir`` but for one token option in its ``config.json``.

    Every other file is hard-linked (no weight is read or copied: real-size models cost nothing);
    ``config.json`` is written anew with the option set.

    Args:
        input_dir: the model folder (no pending LoRA adapter).
        out: the folder to create.
        name, value: see :func:`set_token_option`.

    Returns:
        The new record.

    Raises:
        ModelSpecError: the option does not fit the model (its family refuses the config).
    """
    from transformers import AutoConfig

    from compressor.families import family_for_config
    from compressor.fileio import link_tree

    config = AutoConfig.from_pretrained(str(input_dir))
    rec = set_token_option(config, name, value)
    family_for_config(config)  # the family reads the record: refuses what it cannot run
    Path(out).mkdir(parents=True, exist_ok=True)
    link_tree(Path(input_dir), Path(out), skip=("adapter", "config.json"))
    config.save_pretrained(str(out))
    return rec


def apply_token_options(model) -> dict[str, Any]:
    """Apply the config's record to a loaded model (in place, idempotent) through its family.

    Args:
        model: a model of a registered family (not a peft wrapper), on any device (meta too).

    Returns:
        The record applied (``{}``: nothing to do).

    Raises:
        ModelSpecError: the record asks for an option the model's family does not have.
    """
    from compressor.families import family_for_config

    rec = token_record(model.config)
    family = family_for_config(model.config)
    if rec or getattr(family.impl, "apply_token_options", None) is not None:  # also switches removed options off
        family.apply_token_options(model)
        log.debug("token options applied: %s", rec)
    return rec


def describe_options(family) -> list[str]:
    """Human-readable lines of a family's recorded token options (model card, ``compress inspect``)."""
    rec = family.token_options
    out = []
    q = rec.get("query_tokens")
    if q:
        out.append(f"per image, the {q['keep']} of {family.num_queries} query outputs with the highest CATP "
                   "cross-attention vote reach the language model (in their original order)")
    m = rec.get("token_merging")
    if m:
        out.append(f"token merging (ToMe) in the vision encoder: {m['r']} tokens merged per layer, "
                   f"{family.vision_tokens} → {family.vision_output_tokens} tokens")
    return out


# --------------------------------------------------------------------------------------------
# ToMe: the token count per layer, bipartite soft matching, size-weighted merging
# --------------------------------------------------------------------------------------------


def max_merge(tokens: int, layers: int, protected: int = 1) -> int:
    """The largest ``r`` that :func:`merge_schedule` accepts for ``layers`` layers over ``tokens`` tokens."""
    r = 0
    while layers > 0 and _schedule_ok(tokens, layers, r + 1, protected):
        r += 1
    return r


def _schedule_ok(tokens: int, layers: int, r: int, protected: int) -> bool:
    t = tokens
    for _ in range(layers):
        if r > (t - protected) // 2:
            return False
        t -= r
    return True


def merge_schedule(tokens: int, layers: int, r: int, protected: int = 1) -> list[int]:
    """Tokens entering each layer and leaving the last: ``[tokens, tokens - r, …, tokens - layers·r]``.

    Bipartite matching splits a layer's ``t`` tokens into two alternating sets (A: even
    positions, B: odd ones) and merges ``r`` tokens of A into B; the ``protected`` tokens (the
    class token) are never merged, so ``r ≤ (t - protected) // 2`` must hold at every layer.

    Args:
        tokens: tokens entering the first layer (patches + class token).
        layers: vision-encoder layers.
        r: tokens merged per layer (0: none).
        protected: tokens never merged.

    Returns:
        ``layers + 1`` counts.

    Raises:
        UserInputError: ``r`` too large for some layer (names the largest valid ``r``).
    """
    if r < 0:
        raise UserInputError(f"r must be ≥ 0, got {r}")
    if not _schedule_ok(tokens, layers, r, protected):
        raise UserInputError(
            f"r = {r} merges more tokens than the vision encoder has: {tokens} tokens over {layers} layers allow at most "
            f"r = {max_merge(tokens, layers, protected)} (each layer can merge at most half of its tokens, the class token "
            "kept)"
        )
    return [tokens - i * r for i in range(layers + 1)]


def bipartite_soft_matching(metric, r: int, class_token: bool = True):
    """ToMe's bipartite soft matching (Bolya et al. 2023, Algorithm 1): which tokens merge into which.

    Tokens are split into A (even positions) and B (odd positions); each A token's most similar B
    token (cosine of ``metric``) is its edge; the ``r`` A tokens with the most similar edges merge
    into their B tokens. The class token (position 0) never merges.

    Args:
        metric: ``(batch, tokens, dim)`` similarity features (the keys, averaged over heads).
        r: tokens to merge (``≤ (tokens - 1) // 2``, checked by :func:`merge_schedule`).
        class_token: protect position 0.

    Returns:
        ``merge(x, reduce) -> (batch, tokens - r, channels)``: applies the matching to any
        ``(batch, tokens, channels)`` tensor (``reduce``: ``sum`` or ``mean``); unmerged A tokens
        come first in their original order, then the B tokens.
    """
    import torch

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            first = (torch.arange(scores.shape[-2], device=scores.device) == 0)[:, None]
            scores = scores.masked_fill(first, -math.inf)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = torch.topk(node_max, node_max.shape[-1], dim=-1).indices[..., None]  # most similar first
        unm_idx = torch.sort(edge_idx[..., r:, :], dim=1)[0]  # unmerged A tokens keep their order
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, reduce: str = "sum"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        moved = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), moved, reduce=reduce)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge, x, size):
    """Size-weighted average merge (ToMe's ``merge_wavg``).

    Args:
        merge: from :func:`bipartite_soft_matching`.
        x: ``(batch, tokens, channels)``.
        size: ``(batch, tokens, 1)`` how many original patches each token stands for.

    Returns:
        ``(x, size)`` with ``tokens - r`` tokens.
    """
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


# --------------------------------------------------------------------------------------------
# CATP: the cross-attention vote and the per-image selection
# --------------------------------------------------------------------------------------------


def catp_votes(layers: list[tuple[Any, Any, float]], heads: int):
    """CATP's query importance from the Q-Former's cross-attention (arXiv 2404.08567).

    For every cross-attention layer and head, ``P = softmax(q kᵀ · scale)`` over the image
    tokens holds each query's attention to each image patch. Every (layer, head, patch) casts one
    vote, split among the queries in proportion to their probabilities for that patch
    (``P / Σ_queries P``): a query that attends to a patch more than the other queries do gets
    more of its vote. A query's score is its total vote over patches, heads and layers (the sum
    over patches of ``P`` alone would be 1 for every query: softmax runs over the patches).

    Args:
        layers: per cross-attention layer, ``(q (batch, queries, heads·d), k (batch, patches,
            heads·d), scale)``: the projected queries and image keys and the logit scale.
        heads: attention heads.

    Returns:
        ``(batch, queries)`` float32 votes (they sum to ``layers × heads × patches`` per image).
    """
    import torch

    total = None
    for q, k, scale in layers:
        b, n, width = q.shape
        d = width // heads
        qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
        kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
        probs = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)  # (b, heads, n, patches)
        share = probs / probs.sum(dim=-2, keepdim=True).clamp_min(1e-12)
        votes = share.sum(dim=(1, 3))
        total = votes if total is None else total + votes
    if total is None:
        raise UserInputError("CATP needs at least one cross-attention layer")
    return total


def select_top(scores, k: int):
    """Indices of the ``k`` largest scores per row, in ascending (original) order: ``(batch, k)`` int64."""
    import torch

    idx = torch.topk(scores, k, dim=-1).indices
    return torch.sort(idx, dim=-1)[0]


def gather_tokens(x, idx):
    """Rows of ``x (batch, n, hidden)`` at ``idx (batch, k)``: ``(batch, k, hidden)``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def top_queries(scores: list[float], keep: int) -> list[int]:
    """The ``keep`` highest-scoring queries (ties: the lower index), in ascending order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def check_keep(keep: int, n: int, what: str = "queries") -> None:
    """``1 ≤ keep ≤ n``, else ``UserInputError`` naming the model's count.

    Raises:
        UserInputError: ``keep`` outside ``[1, n]``.
    """
    if not 1 <= keep <= n:
        raise UserInputError(f"keep: {keep} is more than the {n} {what} this model has (keep ≤ {n})" if keep > n
                             else f"keep: {keep} must be at least 1")


# --------------------------------------------------------------------------------------------
# Scores on calibration batches (static selection) and their plot
# --------------------------------------------------------------------------------------------


def calibration_query_scores(model, family, batches: list[dict], select: str, progress=None) -> list[float]:
    """Per-query importance of a model's learned queries on calibration batches.

    Args:
        model: the model (not a peft wrapper), eval mode, on the batches' device.
        family: its family.
        batches: labelled batches (:func:`compressor.importance.calibration_batches`).
        select: ``catp`` (mean CATP vote per image) or ``ablation`` (mean rise of the caption
            loss when that one query's image token is masked out of the language model's input).
        progress: optional callable ``progress(done, total)``.

    Returns:
        One score per query (higher: more important).

    Raises:
        UserInputError: no batches, or an unknown selection.
    """
    import torch

    if not batches:
        raise UserInputError("query scores need at least one calibration batch")
    n = family.num_queries
    if select == "catp":
        total, images = torch.zeros(n, dtype=torch.float64), 0
        with torch.inference_mode():
            for batch in batches:
                v = family.query_scores(model, batch)
                total += v.double().sum(0).cpu()
                images += v.shape[0]
        return (total / max(images, 1)).tolist()
    if select == "ablation":
        rise = torch.zeros(n, dtype=torch.float64)
        with torch.inference_mode():
            for b, batch in enumerate(batches):
                base = float(model(**batch).loss)
                for q in range(n):
                    rise[q] += float(model(**family.mask_query(model, batch, q)).loss) - base
                    if progress is not None:
                        progress(b * n + q + 1, len(batches) * n)
        return (rise / len(batches)).tolist()
    raise UserInputError(f"unknown query selection '{select}'; expected one of {', '.join(QUERY_SELECTIONS)}")


def plot_query_scores(scores: list[float], kept: list[int], title: str, out_png: Path) -> bool:
    """Bar chart of every query's score, kept queries highlighted (like ``remove_layers``' plot).

    Returns:
        True when written; False when matplotlib failed (logged, never raised).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keep = set(kept)
        fig, ax = plt.subplots(1, 1, figsize=(max(6, 0.2 * len(scores)), 2.4), dpi=100)
        ax.bar(range(len(scores)), scores, color=["tab:blue" if i in keep else "tab:red" for i in range(len(scores))])
        ax.set_title(title + "; blue = kept, red = removed", fontsize=9)
        ax.set_xlabel("query")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        from eval.plots import save_png

        try:
            save_png(fig, Path(out_png))
        finally:
            plt.close(fig)
        return True
    except Exception as exc:  # plotting must never fail a stage
        log.warning("could not draw %s: %s", out_png, exc)
        return False
