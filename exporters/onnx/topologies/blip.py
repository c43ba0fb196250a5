"""BLIP topology (``kind: blip``): a text decoder that cross-attends to the image encoder's states.

Graphs: ``vision_encoder`` (the family's image path: ``image_embeds (batch, tokens,
vision_hidden)`` and every text-decoder layer's cross-attention ``cross.{i}.key/value (batch,
heads, tokens, head_dim)``, computed once per image) and ``text_decoder`` (``input_ids (batch,
seq)``, ``attention_mask (batch, past + seq)``, ``past.{i}.*``, ``cross.{i}.*`` → ``logits
(batch, vocab)`` of the last position, ``present.{i}.*``). Generation follows
``BlipForConditionalGeneration.generate``: the first input column becomes BOS (``[DEC]``) and the
final ``[SEP]`` is dropped; the output repeats the prompt.
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
    kv_heads_meta,
    kv_specs,
    past_names,
)

log = logging.getLogger(__name__)

NAME = "blip"
KIND = "blip"
IMAGE_GRAPH = "vision_encoder"
DECODER = "text_decoder"
INT8_GRAPH = DECODER
SINGLE_THREAD_GRAPHS: tuple[str, ...] = ()


@dataclass
class Parts:
    """What a cross-attending-decoder family supplies.

    Attributes:
        image: the vision wrapper: inputs → ``(image_embeds, cross.0.key, cross.0.value, …)``;
            ``num_tokens`` is the number of image states (patches + 1).
        decoder: the text-decoder wrapper: ``(input_ids, attention_mask, *past, *cross)`` →
            ``(logits (batch, vocab) float32, present.0.key, …)``.
        num_layers: text-decoder layers.
        num_heads: attention heads (of the cross-attention; of the self-attention too unless
            ``layer_heads`` says otherwise).
        head_dim: per-head width.
        image_hidden: width of the image states.
        hidden_size: the text decoder's width.
        vocab_size: the logits' width.
        meta: facts for ``export.json``, written after the topology's own.
        layer_heads: self-attention heads of each layer when width pruning gave them their own
            (past and present follow them), else None.
    """

    image: ImageGraph
    decoder: Any
    num_layers: int
    num_heads: int
    head_dim: int
    image_hidden: int
    hidden_size: int
    vocab_size: int
    meta: dict[str, Any] = field(default_factory=dict)
    layer_heads: tuple[int, ...] | None = None


def build_plan(parts: Parts) -> ExportPlan:
    """``vision_encoder``, ``text_decoder`` and the facts for ``export.json``."""
    L, heads, head_dim, tokens = parts.num_layers, parts.num_heads, parts.head_dim, parts.image.num_tokens
    self_heads = list(parts.layer_heads) if parts.layer_heads else [heads] * L
    vocab = parts.vocab_size
    venc = GraphSpec(
        IMAGE_GRAPH,
        tuple(parts.image.inputs),
        (TensorSpec("image_embeds", ("batch", tokens, parts.image_hidden)), *kv_specs("cross", L, heads, head_dim, tokens)),
    )
    tdec = GraphSpec(
        DECODER,
        (
            TensorSpec("input_ids", ("batch", "seq"), "int64"),
            TensorSpec("attention_mask", ("batch", "total"), "int64"),
            *kv_specs("past", L, self_heads, head_dim, "past"),
            *kv_specs("cross", L, heads, head_dim, tokens),
        ),
        (TensorSpec("logits", ("batch", vocab), "float32"), *kv_specs("present", L, self_heads, head_dim, "total")),
        valid={n: (2, "attention_mask") for n in past_names("present", L)},
    )
    graphs = [GraphDef(venc, parts.image.module, sample=parts.image.sample), GraphDef(tdec, parts.decoder)]
    meta = {
        "hidden_size": parts.hidden_size,
        "vocab_size": vocab,
        "num_layers": L,
        **kv_heads_meta(self_heads),
        "head_dim": head_dim,
        **parts.meta,
    }
    return ExportPlan(KIND, graphs, meta)


def sample_cases(plan: ExportPlan, ctx) -> dict[str, list]:
    """The vision encoder at batch 1 and 3, then the text decoder's ``prefill``, ``decode_1`` and
    ``decode_3`` (left padding in rows 1 and 2; past from the previous step)."""
    import torch

    L = plan.meta["num_layers"]
    image_inputs = ctx.inputs_of(IMAGE_GRAPH)
    cases: dict[str, list] = {IMAGE_GRAPH: ctx.batch_cases(image_inputs)}
    cross = list(ctx.run(IMAGE_GRAPH, image_inputs)[1:])
    b = ctx.batch
    mask = torch.ones((b, 5), dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :1] = 0
    steps = []
    x, past = ctx.ids(b, 5), ctx.empty_past()
    for label, n in (("prefill", 5), ("decode_1", 1), ("decode_3", 3)):
        if label != "prefill":
            x = ctx.ids(b, n)
            mask = torch.cat([mask, torch.ones((b, n), dtype=torch.long)], 1)
        inputs = [x, mask.clone(), *past, *cross]
        steps.append((label, inputs))
        past = list(ctx.run(DECODER, inputs)[1 : 1 + 2 * L])
    cases[DECODER] = steps
    return cases


def prefill(cap, inputs: dict):
    """``[DEC]`` + prompt through the text decoder with an empty past.

    ``BlipForConditionalGeneration.generate`` sets column 0 to BOS and drops the final ``[SEP]``;
    without a prompt it starts from ``[DEC]`` alone.

    Returns:
        ``(logits (batch, vocab), state, prompt ids (batch, n))``; the state holds the presents,
        the cross-attention K/V and the attention mask.
    """
    import numpy as np

    feed = cap.graph_feed(IMAGE_GRAPH, inputs)
    b = next(iter(feed.values())).shape[0]
    bos = int(cap.meta["token_ids"]["bos_token_id"])
    if "input_ids" in inputs:
        ids = inputs["input_ids"].astype(np.int64).copy()
        mask = inputs["attention_mask"].astype(np.int64)[:, :-1]
    else:
        ids = np.array([[bos, cap.eos[0]]] * b, dtype=np.int64)
        mask = np.ones((b, 1), dtype=np.int64)
    ids[:, 0] = bos
    ids = ids[:, :-1]
    cross = cap.run(IMAGE_GRAPH, feed)[1:]
    past = cap.empty_past(b)
    out = cap.run(DECODER, {"input_ids": ids, "attention_mask": mask, **cap.past_feed(past, cross)})
    return out[0], {"past": out[1:], "cross": cross, "mask": mask}, ids


def step(cap, tokens, state: dict):
    """One decode step for ``tokens (batch,)``; returns ``(logits, new state)``."""
    import numpy as np

    tok = tokens.astype(np.int64)[:, None]
    mask = np.concatenate([state["mask"], np.ones_like(tok)], axis=1)
    out = cap.run(DECODER, {"input_ids": tok, "attention_mask": mask, **cap.past_feed(state["past"], state["cross"])})
    return out[0], {**state, "past": out[1:], "mask": mask}
