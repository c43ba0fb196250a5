"""Encoder-decoder topology (``kind: seq2seq``): an image path spliced into an encoder-decoder LM (T5).

Graphs: ``image_encoder``, ``embed_tokens``, ``encoder`` (``inputs_embeds (batch, enc_seq,
hidden)``, ``attention_mask (batch, enc_seq)`` → ``encoder_hidden_states`` and every decoder
layer's cross-attention ``cross.{i}.key/value (batch, heads, enc_seq, head_dim)``, computed once
per image) and ``decoder`` (``inputs_embeds (batch, seq, hidden)``, ``encoder_attention_mask``,
self-attention ``past.{i}.*`` and ``cross.{i}.*`` → ``logits (batch, vocab)`` of the last
position, ``present.{i}.*``). The encoder and decoder wrappers are the language model's own
(:class:`TextGraphs`, supplied by its language-model kind: T5's walk T5's module paths); this
module only places them. Generation starts from the decoder start token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from exporters.onnx.graphs import (
    ExportPlan,
    GraphDef,
    GraphSpec,
    ImageGraph,
    TensorSpec,
    kv_specs,
    past_names,
)
from exporters.onnx.topologies import image_tokens

log = logging.getLogger(__name__)

NAME = "encoder_decoder"
KIND = "seq2seq"
ENCODER = "encoder"
DECODER = "decoder"
INT8_GRAPH = DECODER
SINGLE_THREAD_GRAPHS = (image_tokens.EMBED_GRAPH,)


@dataclass
class TextGraphs:
    """An encoder-decoder language model's two wrappers and the decoder's cache dimensions.

    Attributes:
        encoder: ``(inputs_embeds, attention_mask)`` → ``(encoder_hidden_states, cross.0.key,
            cross.0.value, …)``.
        decoder: ``(inputs_embeds, encoder_attention_mask, *past, *cross)`` → ``(logits (batch,
            vocab) float32, present.0.key, …)``.
        num_layers: decoder layers.
        num_heads: attention heads (keys and values).
        head_dim: per-head width.
    """

    encoder: Any
    decoder: Any
    num_layers: int
    num_heads: int
    head_dim: int


@dataclass
class Parts:
    """What an encoder-decoder VLM family supplies.

    Attributes:
        image: the image path (``image_embeds (batch, num_tokens, hidden)``).
        language_model: the transformers encoder-decoder LM (its token embedding and head).
        text: its :class:`TextGraphs`.
        meta: facts for ``export.json``, written after ``hidden_size`` and ``vocab_size``; must
            hold ``image_token_id``.
    """

    image: ImageGraph
    language_model: Any
    text: TextGraphs
    meta: dict[str, Any] = field(default_factory=dict)


def build_plan(parts: Parts) -> ExportPlan:
    """``image_encoder``, ``embed_tokens``, ``encoder``, ``decoder`` and the facts for ``export.json``."""
    graphs, hidden, vocab = image_tokens.front_graphs(parts.image, parts.language_model)
    t = parts.text
    L, heads, d_kv = int(t.num_layers), int(t.num_heads), int(t.head_dim)
    enc = GraphSpec(
        ENCODER,
        (TensorSpec("inputs_embeds", ("batch", "enc_seq", hidden)), TensorSpec("attention_mask", ("batch", "enc_seq"), "int64")),
        (TensorSpec("encoder_hidden_states", ("batch", "enc_seq", hidden)), *kv_specs("cross", L, heads, d_kv, "enc_seq")),
        valid={"encoder_hidden_states": (1, "attention_mask"), **{n: (2, "attention_mask") for n in past_names("cross", L)}},
    )
    dec = GraphSpec(
        DECODER,
        (
            TensorSpec("inputs_embeds", ("batch", "seq", hidden)),
            TensorSpec("encoder_attention_mask", ("batch", "enc_seq"), "int64"),
            *kv_specs("past", L, heads, d_kv, "past"),
            *kv_specs("cross", L, heads, d_kv, "enc_seq"),
        ),
        (TensorSpec("logits", ("batch", vocab), "float32"), *kv_specs("present", L, heads, d_kv, "total")),
    )
    graphs += [GraphDef(enc, t.encoder), GraphDef(dec, t.decoder)]
    meta = {"hidden_size": hidden, "vocab_size": vocab, **parts.meta, "num_layers": L, "num_kv_heads": heads, "head_dim": d_kv}
    return ExportPlan(KIND, graphs, meta)


def sample_cases(plan: ExportPlan, ctx) -> dict[str, list]:
    """Front cases, the encoder (right-padded, as T5 tokenizers pad), then the decoder's ``start``,
    ``decode_1`` and ``decode_3`` steps (past from the previous step)."""
    import torch

    cases, feats, emb, mask = image_tokens.front_cases(plan, ctx)
    mask[1, -2:] = 0
    mask[2, -1:] = 0
    enc_in = [torch.cat([feats, emb(ctx.ids(ctx.batch, image_tokens.PROMPT))], 1), mask]
    cases[ENCODER] = ctx.batch_cases(enc_in)
    cross = list(ctx.run(ENCODER, enc_in)[1:])
    L = plan.meta["num_layers"]
    past = ctx.empty_past()
    steps = []
    for label, n in (("start", 1), ("decode_1", 1), ("decode_3", 3)):
        inputs = [emb(ctx.ids(ctx.batch, n)), mask, *past, *cross]
        steps.append((label, inputs))
        past = list(ctx.run(DECODER, inputs)[1 : 1 + 2 * L])
    cases[DECODER] = steps
    return cases


def prefill(cap, inputs: dict):
    """The encoder over the spliced prompt, then the decoder's first step from the start token.

    Returns:
        ``(logits (batch, vocab), state, start ids (batch, 1))``; the state holds the decoder's
        presents, the cross-attention K/V and the encoder mask.
    """
    import numpy as np

    emb = image_tokens.spliced_embeds(cap, inputs)
    mask = inputs["attention_mask"].astype(np.int64)
    b = emb.shape[0]
    cross = cap.run(ENCODER, {"inputs_embeds": emb, "attention_mask": mask})[1:]
    start = np.full((b, 1), int(cap.meta["token_ids"]["decoder_start_token_id"]), dtype=np.int64)
    state = {"past": cap.empty_past(b), "cross": cross, "mask": mask}
    logits, state = step(cap, start[:, 0], state)
    return logits, state, start


def step(cap, tokens, state: dict):
    """One decode step for ``tokens (batch,)``; returns ``(logits, new state)``."""
    import numpy as np

    tok = tokens.astype(np.int64)[:, None]
    emb = cap.run(image_tokens.EMBED_GRAPH, {"input_ids": tok})[0]
    feed = {"inputs_embeds": emb, "encoder_attention_mask": state["mask"], **cap.past_feed(state["past"], state["cross"])}
    out = cap.run(DECODER, feed)
    return out[0], {**state, "past": out[1:]}
