"""Layer removal (depth pruning) that keeps KV caches, configs and checkpoints consistent.

The recipe (shared/notes/stack-facts.md §3): slice the ``ModuleList``, renumber every
attention's ``layer_idx`` (KV-cache slots), update the config's layer count and per-layer
arrays (``layer_types``), and for T5 move block 0's ``relative_attention_bias`` into the new
block 0. What a stack may lose is the family's rule (:class:`~compressor.families.Stack` ``rule``:
e.g. a Q-Former keeps cross-attention every ``cross_attention_frequency`` layers), checked
before any weight is loaded; which recipe key names which stack is :func:`selections`.

Everything here works on the meta device too (for ``compress plan``).
"""

from __future__ import annotations

import logging

from compressor.errors import UserInputError
from compressor.families import Family, get_config_value, get_module, removal_keys, set_config_value

log = logging.getLogger(__name__)


def stack_size(config, family: Family, part: str) -> int:
    """Number of layers of ``part`` according to the config."""
    st = family.stack(part)
    return int(get_config_value(config, st.count_fields[0]))


def selection_to_removed(selection, n: int, part: str) -> list[int] | None:
    """Indices to remove for a ``LayerSelection`` on a stack of ``n`` layers.

    Returns:
        Sorted indices, or None when the choice needs importance scores (``count`` + ``select``).

    Raises:
        UserInputError: out-of-range indices, or removing every layer.
    """
    if selection.drop_top is not None:
        k = selection.drop_top
        if k >= n:
            raise UserInputError(f"{part}: drop_top {k} would remove all {n} layers; keep at least one (drop_top ≤ {n - 1})")
        return list(range(n - k, n))
    if selection.layers is not None:
        bad = [i for i in selection.layers if not 0 <= i < n]
        if bad:
            raise UserInputError(f"{part}: layer indices {bad} out of range; this model has {n} layers (0..{n - 1})")
        removed = sorted(set(selection.layers))
        if len(removed) >= n:
            raise UserInputError(f"{part}: removing all {n} layers is not possible; keep at least one")
        return removed
    if selection.count == 0:
        return []
    if selection.count >= n:
        raise UserInputError(f"{part}: count {selection.count} would remove all {n} layers (count ≤ {n - 1})")
    return None


def remove_layers(model, family: Family, part: str, removed: list[int]) -> dict:
    """Remove layers of one stack in place.

    Args:
        model: a BLIP-family model (any device, meta included).
        family: its family.
        part: stack name (``language_model``, ``language_model.encoder``, ``vision`` …: the family's stacks).
        removed: indices to remove (0-based, in the current numbering).

    Returns:
        ``{"part", "before", "after", "removed", "kept"}``.

    Raises:
        UserInputError: invalid indices or a removal the stack's rule refuses.
    """
    from torch import nn

    st = family.stack(part)
    layers = get_module(model, st.layers)
    n = len(layers)
    removed = sorted(set(removed))
    if any(not 0 <= i < n for i in removed) or len(removed) >= n:
        raise UserInputError(f"{part}: cannot remove {removed} from {n} layers")
    st.check_removal(n, removed)
    keep = [i for i in range(n) if i not in removed]
    kept_layers = [layers[i] for i in keep]
    if st.relative_bias and 0 in removed:
        _carry_relative_bias(layers[0], kept_layers[0], st.relative_bias)
    parent_path, _, attr = st.layers.rpartition(".")
    setattr(get_module(model, parent_path), attr, nn.ModuleList(kept_layers))
    for new_idx, layer in enumerate(kept_layers):
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
        for rel in st.layer_idx_modules:
            try:
                mod = get_module(layer, rel)
            except (AttributeError, IndexError):
                continue
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    for path in st.count_fields:
        set_config_value(model.config, path, len(keep))
    for path in st.per_layer_fields:
        values = get_config_value(model.config, path)
        if isinstance(values, (list, tuple)) and len(values) == n:
            set_config_value(model.config, path, [values[i] for i in keep])
    if st.stack_config:
        stack_cfg = get_module(model, st.stack_config).config
        for attr_name in ("num_layers", "num_hidden_layers"):
            if hasattr(stack_cfg, attr_name) and getattr(stack_cfg, attr_name) == n:
                setattr(stack_cfg, attr_name, len(keep))
    _sync_mirrored_configs(model, family)
    return {"part": part, "before": n, "after": len(keep), "removed": removed, "kept": keep}


def _carry_relative_bias(old_first, new_first, rel_path: str) -> None:
    """T5: only block 0 owns ``relative_attention_bias``; give it to the new block 0."""
    old_attn = get_module(old_first, rel_path)
    new_attn = get_module(new_first, rel_path)
    if getattr(new_attn, "has_relative_attention_bias", False):
        return
    new_attn.relative_attention_bias = old_attn.relative_attention_bias
    new_attn.has_relative_attention_bias = True
    log.info("moved T5 relative_attention_bias from the removed block 0 to the new block 0")


def _sync_mirrored_configs(model, family: Family) -> None:
    """Copy layer counts to modules whose own ``config`` is a copy of a sub-config (``Family.config_mirrors``)."""
    for module_path, config_path in family.config_mirrors.items():
        try:
            cfg = get_module(model, module_path).config
        except AttributeError:
            continue
        src = get_config_value(model.config, config_path)
        if src is None or cfg is src:
            continue
        for key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "layer_types"):
            if hasattr(src, key):
                setattr(cfg, key, getattr(src, key))


def selections(stage, family: Family) -> dict[str, object]:
    """The stacks a ``remove_layers`` stage names, mapped to their layer selections.

    A recipe key (``vision``, ``language_model`` …, declared by the families) names a
    stack; ``{encoder: …, decoder: …}`` names the key's encoder and decoder stacks (an alias such
    as BLIP's ``language_model.decoder`` → ``language_model`` resolves to the stack it means).

    Returns:
        ``{stack part: LayerSelection}`` in the family's stack order.

    Raises:
        UserInputError: the form does not fit this model's stacks (encoder/decoder on a
            decoder-only language model, a plain selection on an encoder-decoder one).
        ModelSpecError: a key naming a stack this family lacks.
    """
    out: dict[str, object] = {}
    for key in removal_keys():
        sel = getattr(stage, key, None)
        if sel is None:
            continue
        if hasattr(sel, "encoder"):  # {encoder: …, decoder: …}
            subs = {f"{key}.{s}": getattr(sel, s) for s in ("encoder", "decoder") if getattr(sel, s) is not None}
            known = [p for p in (f"{key}.encoder", f"{key}.decoder") if p in family.stacks or p in family.aliases]
            if not known and key in family.stacks:
                raise UserInputError(
                    f"{key}: this model's {family.lm_model_type} language model is decoder-only; use "
                    f"`{key}: {{drop_top: k}}` instead of encoder/decoder"
                )
            for sub, s in subs.items():
                out[family.aliases.get(sub, sub)] = s
        else:
            if key not in family.stacks and f"{key}.encoder" in family.stacks:
                raise UserInputError(
                    f"{key}: a {family.lm_model_type} language model has an encoder and a decoder; write "
                    f"`{key}: {{encoder: {{drop_top: k}}, decoder: {{drop_top: k}}}}`"
                )
            out[key] = sel
    order = list(family.stacks)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def plan_removals(config, family: Family, stage) -> dict[str, list[int] | None]:
    """Indices to remove per stack for a ``remove_layers`` stage config (None: chosen by importance).

    Raises:
        UserInputError: out-of-range layers, a removal a stack's rule refuses, or depths the
            family cannot generate with (e.g. a T5 decoder deeper than its encoder) — all
            before any weight is loaded.
        ModelSpecError: a part the model does not have.
    """
    out: dict[str, list[int] | None] = {}
    after: dict[str, int] = {}
    for part, sel in selections(stage, family).items():
        n = stack_size(config, family, part)
        removed = selection_to_removed(sel, n, part)
        if removed is not None:
            family.stack(part).check_removal(n, removed)
        out[part] = removed
        after[part] = n - (len(removed) if removed is not None else sel.count)
    if after:
        depths = {p: after.get(p, stack_size(config, family, p)) for p in family.stacks}
        for check in family.plan_checks:
            check(depths, set(after))
    return out


def removal_count(stage, family: Family, part: str) -> int:
    """How many layers a stage removes from ``part`` (its ``count``, ``drop_top`` or ``layers``)."""
    sel = selections(stage, family)[part]
    if sel.count is not None:
        return sel.count
    return sel.drop_top if sel.drop_top is not None else len(set(sel.layers))
