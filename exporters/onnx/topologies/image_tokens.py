"""The image-token front shared by the decoder-only and encoder-decoder topologies.

Both feed the language model embeddings in which the image path's output replaces the
``<image>`` placeholder tokens of the prompt (BLIP-2's ``masked_scatter`` of the projected query
outputs): an ``image_encoder`` graph (the family's wrapper, with whatever inputs it declares) and
an ``embed_tokens`` graph (the language model's token embedding); the captioner splices the two in
numpy (:func:`spliced_embeds`), the same order as ``masked_scatter`` (stack-facts §5).
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

from compressor.errors import UserInputError
from exporters.onnx.graphs import GraphDef, GraphSpec, ImageGraph, TensorSpec

log = logging.getLogger(__name__)

IMAGE_GRAPH = "image_encoder"
EMBED_GRAPH = "embed_tokens"
#: Prompt tokens after the image tokens in the sample cases.
PROMPT = 4


@functools.cache
def wrappers() -> SimpleNamespace:
    """The front's ``nn.Module`` classes, built on first use (this module imports without torch)."""
    from torch import nn

    class EmbedTokens(nn.Module):
        """``input_ids (batch, seq)`` → ``inputs_embeds (batch, seq, hidden)``."""

        def __init__(self, embed):
            super().__init__()
            self.embed = embed

        def forward(self, input_ids):
            return self.embed(input_ids)

    return SimpleNamespace(EmbedTokens=EmbedTokens)


def front_graphs(image: ImageGraph, language_model) -> tuple[list[GraphDef], int, int]:
    """The ``image_encoder`` and ``embed_tokens`` graphs of a language model fed spliced embeddings.

    Args:
        image: the family's image graph (output ``image_embeds (batch, num_tokens, hidden)``).
        language_model: the transformers language model (``get_input_embeddings`` /
            ``get_output_embeddings``).

    Returns:
        ``(graphs, hidden, vocab)``: the two graphs, the embedding width and the vocabulary size
        (the output embedding's rows, or ``config.vocab_size`` without an output embedding).
    """
    lm = language_model
    hidden = int(lm.get_input_embeddings().weight.shape[1])
    head = lm.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(lm.config.vocab_size)
    graphs = [
        GraphDef(
            GraphSpec(IMAGE_GRAPH, tuple(image.inputs), (TensorSpec("image_embeds", ("batch", image.num_tokens, hidden)),)),
            image.module,
            sample=image.sample,
        ),
        GraphDef(
            GraphSpec(
                EMBED_GRAPH,
                (TensorSpec("input_ids", ("batch", "seq"), "int64"),),
                (TensorSpec("inputs_embeds", ("batch", "seq", hidden)),),
            ),
            wrappers().EmbedTokens(lm.get_input_embeddings()),
        ),
    ]
    return graphs, hidden, vocab


def front_cases(plan, ctx) -> tuple[dict[str, list], Any, Any, Any]:
    """Sample cases of the two front graphs, and what the language-model cases start from.

    An image path may give several rows of features per example (one per image tile, in the
    examples' order): their rows are then joined per example, as the ``<image>`` tokens of one
    prompt take them.

    Returns:
        ``(cases, feats, embed, mask)``: the cases of ``image_encoder`` and ``embed_tokens``; the
        image features ``(batch, image tokens per example, hidden)``; ``embed(ids)``, the token
        embedding; an all-ones mask ``(batch, image tokens + PROMPT)`` for the topology to pad.
    """
    import torch

    image_inputs = ctx.inputs_of(IMAGE_GRAPH)
    cases: dict[str, list] = {IMAGE_GRAPH: ctx.batch_cases(image_inputs)}
    feats = ctx.run(IMAGE_GRAPH, image_inputs)[0]
    if feats.shape[0] != ctx.batch:  # several feature rows per example (tiles): one row per example
        feats = feats.reshape(ctx.batch, -1, feats.shape[-1])
    cases[EMBED_GRAPH] = [("batch_1", [ctx.ids(1, 4)]), (f"batch_{ctx.batch}", [ctx.ids(ctx.batch, 7)])]
    mask = torch.ones((ctx.batch, feats.shape[1] + PROMPT), dtype=torch.long)
    return cases, feats, lambda x: ctx.module(EMBED_GRAPH, x), mask


def spliced_embeds(cap, inputs: dict):
    """Token embeddings with the image features written over the ``<image>`` positions (captioner).

    Args:
        cap: the :class:`~exporters.onnx.captioner.OnnxCaptioner`.
        inputs: the processor's numpy arrays: ``input_ids (batch, seq)`` and the image graph's inputs.

    Returns:
        ``(batch, seq, hidden)`` embeddings in the export dtype.

    Raises:
        UserInputError: the prompt's ``<image>`` tokens do not match the image features.
    """
    import numpy as np

    ids = inputs["input_ids"].astype(np.int64)
    feats = cap.run(IMAGE_GRAPH, cap.graph_feed(IMAGE_GRAPH, inputs))[0]
    emb = cap.run(EMBED_GRAPH, {"input_ids": ids})[0]
    where = ids == int(cap.meta["image_token_id"])
    n = int(where.sum())
    if n != feats.shape[0] * feats.shape[1]:
        raise UserInputError(
            f"the prompt holds {n} image tokens for {feats.shape[0]} feature rows (images or tiles) of "
            f"{feats.shape[1]} tokens; the processor in the ONNX folder does not match the model"
        )
    emb[where] = feats.reshape(-1, feats.shape[-1]).astype(emb.dtype)
    return emb
