"""Width pruning of the language model: attention heads and MLP units, layer by layer.

Structured pruning as Torch-Pruning defines it (Fang et al. 2023, "DepGraph: Towards Any
Structural Pruning"): a *group* is every weight slice that must go together — an MLP unit is a
row of ``fc1`` (of gate *and* up for gated MLPs) plus a column of ``fc2`` (down); an attention
head is its rows of q, k, v plus its columns of the output projection. The slices are removed
with Torch-Pruning's pruning functions (``tp.prune_linear_out_channels`` /
``tp.prune_linear_in_channels``). The groups here are derived from the family's knowledge
(:class:`compressor.families.Width`) rather than by tracing the whole BLIP-2 graph: tracing the
Llama attention (rotary embeddings, ``repeat_kv``) couples q, k and v channel-for-channel, which is
wrong for grouped KV heads (torch-pruning 1.6.1 then skips the heads altogether).

Grouped KV heads (Llama / SmolLM2: ``G = heads / kv_heads`` query heads share one key/value head)
are removed in whole KV groups — a key/value head with its ``G`` query heads — so every kept
query head keeps its own key/value head and ``G`` is unchanged; ``heads.ratio`` must then be a
multiple of ``1 / kv_heads`` (within :data:`HEADS_RATIO_TOLERANCE`): a ratio that whole groups cannot
meet is refused naming the nearest ratios they can (:func:`heads_to_remove`), and a rounded one is
reported (log, ``pruning.json``), never silently changed.

Importance, ranked within each layer (every layer loses the same share, as Torch-Pruning's local
pruning does):

* ``magnitude``: the group's squared L2 norm, summed over its slices (Torch-Pruning's
  ``GroupMagnitudeImportance(p=2)`` with sum reduction);
* ``taylor``: ``sum |w · ∂L/∂w|`` over the group's slices, gradients of the captioning loss summed
  over calibration batches (Molchanov et al. 2019, "Importance Estimation for Neural Network
  Pruning"; Torch-Pruning's ``GroupTaylorImportance``).

After pruning, each attention module's head counts are set (``num_heads`` …): transformers reads
them in ``forward`` and a stale value silently computes the wrong thing (stack-facts §8). The new
counts are recorded on the module for :mod:`compressor.models.shapes`, which saves a shape plan.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import UserInputError
from compressor.families import Family, Width, get_module
from compressor.models.shapes import MARKER

log = logging.getLogger(__name__)

#: How far (as a share of heads) the heads removed may be from ``heads.ratio``: 32 heads round any
#: ratio within 1/64; 2 key/value groups (4 heads sharing 2) meet only 0.5.
HEADS_RATIO_TOLERANCE = 0.025


def heads_to_remove(ratio: float, heads: int, kv_heads: int, where: str = "") -> int:
    """How many key/value groups ``heads.ratio`` removes from a layer, or a refusal.

    Grouped heads go in whole key/value groups (``heads / kv_heads`` query heads each), so the share
    removed is a multiple of ``1 / kv_heads``; the nearest one is used when it is within
    :data:`HEADS_RATIO_TOLERANCE` of ``ratio``.

    Args:
        ratio: the recipe's ``heads.ratio``.
        heads: query heads of the layer.
        kv_heads: key/value heads (= groups) of the layer.
        where: where, for messages (``" of layer 3"``).

    Returns:
        The number of groups to remove, ``1 ≤ n < kv_heads``.

    Raises:
        UserInputError: no multiple of ``1 / kv_heads`` is close enough (naming the nearest allowed
            ratios), or the layer has a single key/value head.
    """
    group = heads // kv_heads
    if kv_heads < 2:
        raise UserInputError(
            f"prune_width heads: the {heads} heads{where} share one key/value head, which cannot be removed; prune `mlp` only"
        )
    n = min(max(math.floor(ratio * kv_heads + 0.5), 1), kv_heads - 1)
    if abs(n / kv_heads - ratio) > HEADS_RATIO_TOLERANCE + 1e-12:
        allowed = [k / kv_heads for k in range(1, kv_heads)]
        near = sorted(sorted(allowed, key=lambda a: (abs(a - ratio), a))[:2])
        layout = f"{kv_heads} key/value groups of {group}" if group > 1 else f"{kv_heads} heads"
        raise UserInputError(
            f"prune_width heads.ratio {ratio} cannot be met{where}: its {heads} heads form {layout}, removed whole, so "
            f"the share removed is a multiple of 1/{kv_heads}; nearest allowed: "
            + " or ".join(f"{a:.4g} ({round(a * kv_heads) * group} heads)" for a in near)
        )
    return n


@dataclass
class LayerPlan:
    """What to remove from one layer.

    Attributes:
        part: the stack.
        index: the layer's index in the stack.
        heads: KV-group (or head) indices to remove.
        units: MLP unit indices to remove.
    """

    part: str
    index: int
    heads: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)


def _opt(layer, path: str | None):
    if path is None:
        return None
    try:
        return get_module(layer, path)
    except (AttributeError, IndexError):
        return None


def _mlp(layer, w: Width):
    ins = [m for m in (_opt(layer, p) for p in w.mlp_in) if m is not None]
    outs = [m for m in (_opt(layer, p) for p in w.mlp_out) if m is not None]
    return ins, outs


def head_layout(layer, w: Width) -> dict[str, int]:
    """``{"heads", "kv_heads", "head_dim", "group"}`` of a layer's self-attention, from its shapes."""
    attn = get_module(layer, w.attention)
    q, k = get_module(layer, w.q), get_module(layer, w.k)
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
    if head_dim is None:
        heads = attn.num_heads
        head_dim = q.out_features // heads
    heads = q.out_features // head_dim
    kv = k.out_features // head_dim
    return {"heads": heads, "kv_heads": kv, "head_dim": head_dim, "group": heads // kv}


def _head_slices(layout: dict[str, int], g: int) -> tuple[list[int], list[int]]:
    """Channel indices of KV group ``g``: (query/output channels, key/value channels)."""
    d, gsize = layout["head_dim"], layout["group"]
    q_idx = list(range(g * gsize * d, (g + 1) * gsize * d))
    kv_idx = list(range(g * d, (g + 1) * d))
    return q_idx, kv_idx


def _unit_scores(layer, w: Width, score) -> list[float]:
    import torch

    ins, outs = _mlp(layer, w)
    total = None
    for m in ins:
        s = score(m.weight).sum(dim=1) + (score(m.bias) if m.bias is not None else 0)
        total = s if total is None else total + s
    for m in outs:
        total = total + score(m.weight).sum(dim=0)
    return total.to(torch.float64).tolist()


def _head_scores(layer, w: Width, score) -> list[float]:
    layout = head_layout(layer, w)
    q, k, v, o = (get_module(layer, p) for p in (w.q, w.k, w.v, w.o))
    out = []
    for g in range(layout["kv_heads"]):
        qi, ki = _head_slices(layout, g)
        s = float(score(q.weight)[qi].sum() + score(o.weight)[:, qi].sum())
        s += float(score(k.weight)[ki].sum() + score(v.weight)[ki].sum())
        for m, idx in ((q, qi), (k, ki), (v, ki)):
            if m.bias is not None:
                s += float(score(m.bias)[idx].sum())
        out.append(s)
    return out


def _ignored(names: list[str], patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def check_width_on_config(config, family: Family, stage) -> None:
    """Pre-flight (no weights): refuse what :func:`plan_width` would refuse, from the config's counts.

    Raises:
        UserInputError: width pruning unavailable for the family, heads on a T5, or a heads ratio
            that whole KV groups cannot meet (:func:`heads_to_remove`).
    """
    if not family.width:
        raise UserInputError(f"width pruning is not available for a {family.name} model with a {family.lm_model_type} language model")
    if stage.heads is None:
        return
    for w in family.width:
        if w.heads_refused:
            raise UserInputError(f"prune_width heads: {w.heads_refused}")
    text = getattr(config, "text_config", config)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    if kv:
        heads_to_remove(stage.heads.ratio, heads, kv)


def plan_width(model, family: Family, heads_ratio: float | None, mlp_ratio: float | None, importance: str,
               ignored_layers: list[str], grads: dict[int, Any] | None = None) -> list[LayerPlan]:
    """Choose the heads and MLP units to remove in every layer of the language model.

    Args:
        model: the BLIP-family model.
        family: its family.
        heads_ratio: fraction of heads (whole KV groups) to remove per layer, or None.
        mlp_ratio: fraction of MLP units to remove per layer, or None.
        importance: ``magnitude`` or ``taylor``.
        ignored_layers: fnmatch patterns over module names (``*layers.0.*``, ``*fc1``): a layer's
            heads (MLP) stay untouched when a name of its attention projections (MLP linears) matches.
        grads: ``id(parameter) → gradient`` for ``taylor``.

    Returns:
        One :class:`LayerPlan` per layer that loses something.

    Raises:
        UserInputError: heads asked where they cannot be pruned (T5), a heads ratio whole KV
            groups cannot meet, an MLP ratio that removes nothing or everything.
    """
    import torch

    if importance == "taylor":
        if grads is None:
            raise UserInputError("taylor importance needs gradients from calibration batches")

        def score(t):  # elementwise importance of a whole parameter; callers slice it
            g = grads.get(id(t))
            if g is None:
                raise UserInputError("taylor importance: a pruned weight got no gradient on the calibration batches")
            return (t.detach() * g).abs().double()
    else:

        def score(t):
            return t.detach().double().pow(2)

    if not family.width:
        raise UserInputError(f"width pruning is not available for a {family.name} model with a {family.lm_model_type} language model")
    plans: list[LayerPlan] = []
    names = {id(m): n for n, m in model.named_modules()}
    for w in family.width:
        if heads_ratio is not None and w.heads_refused:
            raise UserInputError(f"prune_width heads: {w.heads_refused}")
        layers = get_module(model, family.stack(w.part).layers)
        for i, layer in enumerate(layers):
            plan = LayerPlan(w.part, i)
            if heads_ratio is not None:
                attn_names = [names[id(get_module(layer, p))] for p in (w.q, w.k, w.v, w.o)]
                if not _ignored(attn_names, ignored_layers):
                    layout = head_layout(layer, w)
                    n_rm = heads_to_remove(heads_ratio, layout["heads"], layout["kv_heads"], f" in layer {i}")
                    if n_rm / layout["kv_heads"] != heads_ratio:
                        log.info("prune_width heads.ratio %s: layer %d loses %d of %d heads (%.4g, the nearest whole "
                                 "key/value groups allow)", heads_ratio, i, n_rm * layout["group"], layout["heads"],
                                 n_rm / layout["kv_heads"])
                    s = torch.tensor(_head_scores(layer, w, score))
                    plan.heads = sorted(torch.argsort(s, stable=True)[:n_rm].tolist())
            if mlp_ratio is not None:
                ins, outs = _mlp(layer, w)
                mlp_names = [names[id(m)] for m in ins + outs]
                if not _ignored(mlp_names, ignored_layers):
                    n_units = ins[0].out_features
                    n_rm = int(round(mlp_ratio * n_units))
                    if not 0 < n_rm < n_units:
                        raise UserInputError(f"prune_width mlp.ratio {mlp_ratio} removes {n_rm} of {n_units} units of layer {i}")
                    s = torch.tensor(_unit_scores(layer, w, score))
                    plan.units = sorted(torch.argsort(s, stable=True)[:n_rm].tolist())
            if plan.heads or plan.units:
                plans.append(plan)
    return plans


def apply_width(model, family: Family, plans: list[LayerPlan]) -> dict[str, Any]:
    """Remove the planned heads and units in place (Torch-Pruning's pruning functions) and fix head counts.

    Returns:
        ``{"layers": [...per layer: part, index, heads before/after, units before/after], "params_before",
        "params_after"}``.
    """
    import torch_pruning as tp

    before = sum(p.numel() for p in model.parameters())
    report = []
    widths = {w.part: w for w in family.width}
    for plan in plans:
        w = widths[plan.part]
        layer = get_module(model, family.stack(plan.part).layers)[plan.index]
        row: dict[str, Any] = {"part": plan.part, "layer": plan.index}
        if plan.heads:
            layout = head_layout(layer, w)
            q_rm, kv_rm = [], []
            for g in plan.heads:
                qi, ki = _head_slices(layout, g)
                q_rm += qi
                kv_rm += ki
            tp.prune_linear_out_channels(get_module(layer, w.q), q_rm)
            tp.prune_linear_out_channels(get_module(layer, w.k), kv_rm)
            tp.prune_linear_out_channels(get_module(layer, w.v), kv_rm)
            tp.prune_linear_in_channels(get_module(layer, w.o), q_rm)
            new = head_layout(layer, w)
            attn = get_module(layer, w.attention)
            values = {"heads": new["heads"], "kv_heads": new["kv_heads"], "kv_groups": new["group"],
                      "width": new["heads"] * new["head_dim"]}
            attrs = {name: values[what] for name, what in w.head_attrs}
            for name, value in attrs.items():
                setattr(attn, name, value)
            setattr(attn, MARKER, {**getattr(attn, MARKER, {}), **attrs})
            row.update(heads_before=layout["heads"], heads_after=new["heads"], kv_heads_after=new["kv_heads"])
        if plan.units:
            ins, outs = _mlp(layer, w)
            n = ins[0].out_features
            for m in ins:
                tp.prune_linear_out_channels(m, plan.units)
            for m in outs:
                tp.prune_linear_in_channels(m, plan.units)
            row.update(units_before=n, units_after=ins[0].out_features)
        report.append(row)
    return {"layers": report, "params_before": before, "params_after": sum(p.numel() for p in model.parameters())}


def calibration_gradients(model, batches: list[dict]) -> dict[int, Any]:
    """``id(parameter) → summed gradient`` of the captioning loss over ``batches`` (for ``taylor``)."""
    import torch

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for batch in batches:
                model(**batch).loss.backward()
        grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags.items():
            p.requires_grad_(f)
    return grads
