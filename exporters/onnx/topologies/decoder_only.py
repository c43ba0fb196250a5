"""Decoder-only topology (``kind: causal``): an image path spliced into a causal language model.

Graphs: ``image_encoder`` (the family's wrapper, any inputs it declares), ``embed_tokens`` and
``decoder``, one graph for prefill (past length 0) and each decode step (stack-facts §5):
``inputs_embeds (batch, seq, hidden)``, ``attention_mask (batch, past + seq)``,
``past.{i}.key/value (batch, kv_heads, past, head_dim)`` → ``logits (batch, vocab)`` of the last
position (float32), ``present.{i}.key/value (batch, kv_heads, past + seq, head_dim)``.

The decoder wrapper works for any transformers causal LM that takes ``inputs_embeds``,
``position_ids``, a ``DynamicCache`` and ``logits_to_keep`` (OPT, Llama and its relatives): a new
decoder-only VLM supplies its image path and its language model (:class:`Parts`) and reuses this
module unchanged. Position ids follow ``GenerationMixin`` (``cumsum(mask) - 1``), so a
left-padded batch gets the same positions as ``model.generate``; the decoder returns the logits
of the last position only (generation needs nothing else, and the head is not run on the prompt).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from exporters.onnx.graphs import (
    ExportPlan,
    GraphDef,
    GraphSpec,
    ImageGraph,
    TensorSpec,
    generation_position_ids,
    kv_heads_meta,
    kv_specs,
    past_names,
)
from exporters.onnx.topologies import image_tokens

log = logging.getLogger(__name__)

NAME = "decoder_only"
KIND = "causal"
DECODER = "decoder"
INT8_GRAPH = DECODER
SINGLE_THREAD_GRAPHS = (image_tokens.EMBED_GRAPH,)
#: Speculative decoding runs on this topology (:func:`extend`, :func:`trim`, :func:`scoring_module`).
SPECULATIVE = True


@dataclass
class Parts:
    """What a decoder-only VLM family supplies.

    Attributes:
        image: the image path (``image_embeds (batch, num_tokens, hidden)`` in the language
            model's embedding dtype).
        language_model: the transformers causal LM the embeddings are fed to.
        text_config: its config: ``num_hidden_layers``, ``num_attention_heads`` and, when
            they differ from the defaults, ``num_key_value_heads`` and ``head_dim``.
        meta: facts for ``export.json``, written after ``hidden_size`` and ``vocab_size``; must
            hold ``image_token_id`` (the placeholder the image embeddings replace).
        kv_heads: key/value heads of each layer when they are not the config's (width pruning
            gives every layer its own), else None.
    """

    image: ImageGraph
    language_model: Any
    text_config: Any
    meta: dict[str, Any] = field(default_factory=dict)
    kv_heads: tuple[int, ...] | None = None


def full_length_cache(config):
    """A ``DynamicCache`` whose every layer keeps every position, even a sliding-window layer's.

    transformers' cache for a config with ``layer_types`` holding ``sliding_attention`` (Qwen2/3
    with ``use_sliding_window``, Gemma 2/3, Mistral) keeps only the last ``sliding_window - 1``
    positions in those layers, so their ``present`` tensors would be shorter than the attention
    mask and than the other layers' (the exported graph's one ``past`` length per call breaks once a
    caption grows past the window). A cache of full layers keeps them all, and the model's own
    sliding-window mask (``masking_utils.create_sliding_window_causal_mask``, built from
    ``config.layer_types`` whatever the cache) limits what each sliding layer attends to: the same
    keys as transformers' generation, at the cost of cache memory beyond the window.

    Args:
        config: the language model's config.

    Returns:
        ``DynamicCache``: built from ``config`` when no layer slides (unchanged), else lazily of full layers.
    """
    from transformers import DynamicCache

    types = getattr(config.get_text_config(decoder=True), "layer_types", None) or ()
    if "sliding_attention" in types:
        return DynamicCache()
    return DynamicCache(config=config)


@functools.cache
def wrappers() -> SimpleNamespace:
    """The decoder wrapper class, built on first use (this module imports without torch)."""
    from torch import nn

    class CausalDecoder(nn.Module):
        """Decoder-only LM with past: one graph for prefill (past 0) and each decode step.

        ``inputs_embeds (batch, seq, hidden)``, ``attention_mask (batch, past + seq)``,
        ``past.{i}.key/value (batch, kv_heads, past, head_dim)`` → ``logits (batch, vocab)`` of the
        last position (float32), ``present.{i}.key/value (batch, kv_heads, past + seq, head_dim)``.
        """

        def __init__(self, lm, layers: int):
            super().__init__()
            self.lm = lm
            self.layers = layers

        def forward(self, inputs_embeds, attention_mask, *past):
            cache = full_length_cache(self.lm.config)
            for i in range(self.layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            pos = generation_position_ids(attention_mask, inputs_embeds.shape[1])
            out = self.lm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            return (out.logits[:, -1, :].float(), *presents)

    class ScoringDecoder(nn.Module):
        """The decoder's scoring form in PyTorch (never exported): the logits of the last
        ``num_logits`` positions, ``(batch, num_logits, vocab)``, as the graph that
        :func:`exporters.onnx.passes.score_last_positions` derives from the exported decoder."""

        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, inputs_embeds, attention_mask, *past, num_logits: int = 1):
            d = self.decoder
            cache = full_length_cache(d.lm.config)
            for i in range(d.layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            pos = generation_position_ids(attention_mask, inputs_embeds.shape[1])
            out = d.lm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=int(num_logits),
            )
            presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            return (out.logits.float(), *presents)

    return SimpleNamespace(CausalDecoder=CausalDecoder, ScoringDecoder=ScoringDecoder)


def build_plan(parts: Parts) -> ExportPlan:
    """``image_encoder``, ``embed_tokens``, ``decoder`` and the facts for ``export.json``."""
    graphs, hidden, vocab = image_tokens.front_graphs(parts.image, parts.language_model)
    text = parts.text_config
    L = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = list(parts.kv_heads) if parts.kv_heads else [int(getattr(text, "num_key_value_heads", None) or heads)] * L
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    dec = GraphSpec(
        DECODER,
        (
            TensorSpec("inputs_embeds", ("batch", "seq", hidden)),
            TensorSpec("attention_mask", ("batch", "total"), "int64"),
            *kv_specs("past", L, kv_heads, head_dim, "past"),
        ),
        (TensorSpec("logits", ("batch", vocab), "float32"), *kv_specs("present", L, kv_heads, head_dim, "total")),
        valid={n: (2, "attention_mask") for n in past_names("present", L)},
    )
    graphs.append(GraphDef(dec, wrappers().CausalDecoder(parts.language_model, L)))
    meta = {"hidden_size": hidden, "vocab_size": vocab, **parts.meta, "num_layers": L, **kv_heads_meta(kv_heads),
            "head_dim": head_dim}
    return ExportPlan(KIND, graphs, meta)


def sample_cases(plan: ExportPlan, ctx) -> dict[str, list]:
    """Front cases, then the decoder's prefill, ``decode_1`` and ``decode_3`` (past from the previous step).

    Row 1 has padding between the image tokens and the text (the processor's layout), row 2 plain
    left padding.
    """
    import torch

    cases, feats, emb, mask = image_tokens.front_cases(plan, ctx)
    nq = mask.shape[1] - image_tokens.PROMPT
    mask[1, nq : nq + 2] = 0  # processor layout: image tokens, padding, text
    mask[2, :3] = 0  # plain left padding
    x = torch.cat([feats, emb(ctx.ids(ctx.batch, image_tokens.PROMPT))], 1)
    past = ctx.empty_past()
    steps = []
    for label, n in (("prefill", None), ("decode_1", 1), ("decode_3", 3)):
        if label != "prefill":
            x = emb(ctx.ids(ctx.batch, n))
            mask = torch.cat([mask, torch.ones((ctx.batch, n), dtype=torch.long)], 1)
        inputs = [x, mask.clone(), *past]
        steps.append((label, inputs))
        past = list(ctx.run(DECODER, inputs)[1:])
    cases[DECODER] = steps
    return cases


def prefill(cap, inputs: dict):
    """The prompt through the decoder with an empty past.

    Returns:
        ``(logits (batch, vocab), state, prompt ids (batch, n))``; the state holds the presents
        and the attention mask.
    """
    import numpy as np

    emb = image_tokens.spliced_embeds(cap, inputs)
    mask = inputs["attention_mask"].astype(np.int64)
    past = cap.empty_past(emb.shape[0])
    out = cap.run(DECODER, {"inputs_embeds": emb, "attention_mask": mask, **cap.past_feed(past)})
    return out[0], {"past": out[1:], "mask": mask}, inputs["input_ids"].astype(np.int64)


def step(cap, tokens, state: dict):
    """One decode step for ``tokens (batch,)``; returns ``(logits, new state)``."""
    import numpy as np

    tok = tokens.astype(np.int64)[:, None]
    mask = np.concatenate([state["mask"], np.ones_like(tok)], axis=1)
    emb = cap.run(image_tokens.EMBED_GRAPH, {"input_ids": tok})[0]
    out = cap.run(DECODER, {"inputs_embeds": emb, "attention_mask": mask, **cap.past_feed(state["past"])})
    return out[0], {"past": out[1:], "mask": mask}


# -------------------------------------------------------------------------- speculative decoding


def scoring_module(plan: ExportPlan):
    """The decoder's scoring form as a PyTorch module (see ``wrappers().ScoringDecoder``)."""
    return wrappers().ScoringDecoder(plan.graph(DECODER).module)


def extend(cap, tokens, valid, state: dict, num_logits: int | None):
    """Several tokens through the decoder in one call (a draft catching up, a target scoring drafts).

    Args:
        cap: the captioner (its decoder session is the scoring graph when ``num_logits`` is given).
        tokens: ``(batch, n)`` int64.
        valid: ``(batch, n)`` 0/1; 0 marks a hole: masked now and in every later call, so a
            row's positions (``cumsum(mask) - 1``) skip it.
        state: ``{"past", "mask"}`` of :func:`prefill` / :func:`step` / :func:`extend`.
        num_logits: the number of last positions to return logits for, or None for the
            exported decoder's ``(batch, vocab)`` of the last position.

    Returns:
        ``(logits, new state)``: ``(batch, num_logits, vocab)`` or ``(batch, vocab)``.
    """
    import numpy as np

    from exporters.onnx.passes import NUM_LOGITS

    tok = tokens.astype(np.int64)
    mask = np.concatenate([state["mask"], valid.astype(np.int64)], axis=1)
    emb = cap.run(image_tokens.EMBED_GRAPH, {"input_ids": tok})[0]
    feed = {"inputs_embeds": emb, "attention_mask": mask, **cap.past_feed(state["past"])}
    if num_logits is not None:
        feed[NUM_LOGITS] = np.array([num_logits], dtype=np.int64)
    out = cap.run(DECODER, feed)
    return out[0], {"past": out[1:], "mask": mask}


def trim(cap, state: dict, keep) -> dict:
    """Mask the newest ``n`` cache slots where ``keep (batch, n)`` is 0, then drop the trailing
    slots that no row keeps (at batch 1 the cache is simply cut back to the accepted length)."""
    import numpy as np

    mask = state["mask"].copy()
    n = keep.shape[1]
    mask[:, mask.shape[1] - n :] *= keep.astype(mask.dtype)
    used = np.flatnonzero(mask.any(0))
    length = int(used[-1]) + 1 if used.size else 0
    if length == mask.shape[1]:
        return {"past": state["past"], "mask": mask}
    return {"past": [np.ascontiguousarray(p[:, :, :length]) for p in state["past"]], "mask": mask[:, :length]}
