"""Layer removal (depth pruning) that keeps KV caches, configs and checkpoints consistent.

The recipe (shared/notes/stack-facts.md §3): slice the ``ModuleList``, renumber every
attention's ``layer_idx`` (KV-cache slots), update the config's layer count and per-layer
arrays (``layer_types``), and for T5 move block 0's ``relative_attention_bias`` into the new
block 0. A Q-Former keeps cross-attention where ``index % cross_attention_frequency == 0``
(``Blip2QFormerLayer.__init__``); removals that break that pattern cannot be expressed by
``Blip2QFormerConfig`` and are refused before any weight is loaded.

Everything here works on the meta device too (for ``compress plan``).
"""

from __future__ import annotations

import itertools
import logging

from compressor.errors import UserInputError
from compressor.families import Family, get_config_value, get_module, set_config_value

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
    if selection.count >= n:
        raise UserInputError(f"{part}: count {selection.count} would remove all {n} layers (count ≤ {n - 1})")
    return None


def qformer_pattern_ok(keep: list[int], freq: int) -> bool:
    """Whether keeping these Q-Former layers preserves ``has_cross_attention == (new_idx % freq == 0)``."""
    return all((old % freq == 0) == (new % freq == 0) for new, old in enumerate(keep))


def nearest_valid_qformer_removals(n: int, removed: list[int], freq: int, limit: int = 3) -> list[list[int]]:
    """Valid removal sets of the same size closest to ``removed`` (fewest differing indices)."""
    want = set(removed)
    out = []
    for cand in itertools.combinations(range(n), len(removed)):
        keep = [i for i in range(n) if i not in cand]
        if keep and qformer_pattern_ok(keep, freq):
            out.append((len(want.symmetric_difference(cand)), list(cand)))
    out.sort()
    return [c for _, c in out[:limit]]


def check_qformer_removal(n: int, removed: list[int], freq: int) -> None:
    """Refuse a Q-Former removal that breaks the cross-attention pattern (exit 2).

    Raises:
        UserInputError: naming the nearest valid choices (e.g. ``drop_top``).
    """
    keep = [i for i in range(n) if i not in removed]
    if qformer_pattern_ok(keep, freq):
        return
    hints = nearest_valid_qformer_removals(n, removed, freq)
    hint = ", ".join(f"layers: {h}" for h in hints) if hints else "a drop_top removal"
    pattern = "".join("X" if i % freq == 0 else "-" for i in keep)
    raise UserInputError(
        f"qformer: removing layers {removed} leaves cross-attention at kept positions {pattern!r} (X = has "
        f"cross-attention), but a Q-Former config can only express cross-attention every {freq} layers starting "
        f"at 0; the saved model would reload with random cross-attention weights. Nearest valid choice: {hint} "
        f"(removing the top k layers always works)."
    )


def check_t5_depths(family: Family, encoder_layers: int, decoder_layers: int) -> None:
    """Refuse a T5 whose decoder would be deeper than its encoder (exit 2).

    transformers 5.x sizes T5's generation KV cache by ``config.num_hidden_layers``, which T5's
    config aliases to ``num_layers`` (the *encoder* depth): with more decoder than encoder blocks,
    cached generation fails with ``IndexError`` in ``DynamicCache.update`` (reproducible on a fresh
    ``T5ForConditionalGeneration`` with ``num_decoder_layers > num_layers``).

    Raises:
        UserInputError: ``decoder_layers > encoder_layers``, naming how to fix the selection.
    """
    if family.lm is None or family.lm.model_type not in ("t5", "mt5", "umt5"):
        return
    if decoder_layers > encoder_layers:
        raise UserInputError(
            f"language_model: this removal leaves a T5 with {encoder_layers} encoder and {decoder_layers} decoder blocks; "
            "transformers sizes T5's generation cache by the encoder depth, so generating with a decoder deeper than "
            f"the encoder fails. Remove at least {decoder_layers - encoder_layers} more decoder block(s) or fewer encoder blocks."
        )


def remove_layers(model, family: Family, part: str, removed: list[int]) -> dict:
    """Remove layers of one stack in place.

    Args:
        model: a BLIP-family model (any device, meta included).
        family: its family.
        part: stack name (``qformer``, ``language_model``, ``language_model.encoder`` …, ``vision``).
        removed: indices to remove (0-based, in the current numbering).

    Returns:
        ``{"part", "before", "after", "removed", "kept"}``.

    Raises:
        UserInputError: invalid indices or a Q-Former pattern break.
    """
    from torch import nn

    st = family.stack(part)
    layers = get_module(model, st.layers)
    n = len(layers)
    removed = sorted(set(removed))
    if any(not 0 <= i < n for i in removed) or len(removed) >= n:
        raise UserInputError(f"{part}: cannot remove {removed} from {n} layers")
    if part == "qformer":
        check_qformer_removal(n, removed, family.cross_attention_frequency)
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
    _sync_language_model_config(model, family)
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


def _sync_language_model_config(model, family: Family) -> None:
    """Keep ``model.language_model.config`` equal to ``model.config.text_config`` where they are copies."""
    if family.lm is None:
        return
    lm = getattr(model, "language_model", None)
    cfg = getattr(lm, "config", None)
    text = getattr(model.config, "text_config", None)
    if cfg is None or text is None or cfg is text:
        return
    for key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "layer_types"):
        if hasattr(text, key):
            setattr(cfg, key, getattr(text, key))


def plan_removals(config, family: Family, stage) -> dict[str, list[int] | None]:
    """Indices to remove per part for a ``remove_layers`` stage config (None: chosen by importance).

    Raises:
        UserInputError: a part the model does not have, out-of-range layers, or a Q-Former
            removal that breaks the cross-attention pattern — all before any weight is loaded.
    """
    out: dict[str, list[int] | None] = {}
    selections = []
    if stage.vision is not None:
        selections.append(("vision", stage.vision))
    if stage.qformer is not None:
        selections.append(("qformer", stage.qformer))
    lm = stage.language_model
    if lm is not None:
        if hasattr(lm, "encoder"):
            if family.lm is not None and family.lm.decoder_only and family.name != "blip":
                raise UserInputError(
                    f"language_model: this model's {family.lm_model_type} language model is decoder-only; use "
                    "`language_model: {drop_top: k}` instead of encoder/decoder"
                )
            if lm.encoder is not None:
                selections.append(("language_model.encoder", lm.encoder))
            if lm.decoder is not None:
                part = "language_model.decoder" if "language_model.decoder" in family.stacks else "language_model"
                selections.append((part, lm.decoder))
        else:
            if "language_model" not in family.stacks:
                raise UserInputError(
                    f"language_model: a {family.lm_model_type} language model has an encoder and a decoder; write "
                    "`language_model: {encoder: {drop_top: k}, decoder: {drop_top: k}}`"
                )
            selections.append(("language_model", lm))
    after: dict[str, int] = {}
    for part, sel in selections:
        n = stack_size(config, family, part)
        removed = selection_to_removed(sel, n, part)
        if removed is not None and part == "qformer":
            check_qformer_removal(n, removed, family.cross_attention_frequency)
        out[part] = removed
        after[part] = n - (len(removed) if removed is not None else sel.count)
    if "language_model.encoder" in family.stacks and ({"language_model.encoder", "language_model.decoder"} & set(after)):
        enc = after.get("language_model.encoder", stack_size(config, family, "language_model.encoder"))
        dec = after.get("language_model.decoder", stack_size(config, family, "language_model.decoder"))
        check_t5_depths(family, enc, dec)
    return out
