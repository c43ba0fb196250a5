"""What the toolchain knows about each language-model architecture inside a BLIP-family model.

One entry per ``text_config.model_type``: where the decoder layers live (relative to
``model.language_model``), which config field counts them, which attention modules carry a
KV-cache ``layer_idx`` to renumber after removal, and the LoRA module names of attention and MLP.
Facts from shared/notes/stack-facts.md §2–4 (transformers 5.x attribute paths).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from compressor.errors import UserInputError
from compressor.families.base import Stack, Width


@dataclass(frozen=True)
class LanguageModelKind:
    """Knowledge of one language-model architecture.

    Attributes:
        model_type: ``text_config.model_type`` (opt, llama, t5 …).
        decoder_only: causal LM (True) or encoder-decoder (False).
        stacks: the removable stacks, relative to the BLIP-family model root.
        lora: part-scoped LoRA name → regex of module paths relative to the model root.
        embed_tokens: path of the token-embedding module relative to the model root.
        width: prunable widths per stack (``prune_width``).
        plan_checks: checks of the stacks' depths after a removal (``{stack: layers}``), raising
            ``UserInputError`` for combinations that cannot generate.
    """

    model_type: str
    decoder_only: bool
    stacks: tuple[Stack, ...]
    lora: dict[str, str] = field(default_factory=dict)
    embed_tokens: str = ""
    width: tuple[Width, ...] = ()
    plan_checks: tuple[Callable[[dict[str, int], set[str]], None], ...] = ()


def _opt(root: str, body: str | None = None) -> LanguageModelKind:
    layers = rf"{root}\.model\.decoder\.layers\.\d+"
    return LanguageModelKind(
        model_type="opt",
        decoder_only=True,
        stacks=(
            Stack(
                part="language_model",
                layers=f"{root}.model.decoder.layers",
                count_fields=("text_config.num_hidden_layers",),
                layer_idx_modules=("self_attn",),
                per_layer_fields=("text_config.layer_types",),
                positions="attention_mask",
            ),
        ),
        lora={
            "language_model.attention": rf"{layers}\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
            "language_model.mlp": rf"{layers}\.(fc1|fc2)",
        },
        embed_tokens=f"{root}.model.decoder.embed_tokens",
        width=(
            Width("language_model", ("fc1",), ("fc2",), "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "self_attn", (("num_heads", "heads"),)),
        ),
    )


def _llama_like(model_type: str, root: str, body: str | None = None) -> LanguageModelKind:
    """Llama-architecture decoders (llama, mistral, qwen2, smollm …): ``model.layers``.

    ``body`` is the decoder stack (``LlamaModel``): ``{root}.model`` inside a causal LM, or a
    path of its own when the VLM holds the bare stack (Idefics3's ``model.text_model``).
    """
    body = body or f"{root}.model"
    layers = rf"{re.escape(body)}\.layers\.\d+"
    return LanguageModelKind(
        model_type=model_type,
        decoder_only=True,
        stacks=(
            Stack(
                part="language_model",
                layers=f"{body}.layers",
                count_fields=("text_config.num_hidden_layers",),
                layer_idx_modules=("self_attn",),
                per_layer_fields=("text_config.layer_types",),
                positions="attention_mask",
            ),
        ),
        lora={
            "language_model.attention": rf"{layers}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
            "language_model.mlp": rf"{layers}\.mlp\.(gate_proj|up_proj|down_proj)",
        },
        embed_tokens=f"{body}.embed_tokens",
        width=(
            Width("language_model", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), "self_attn.q_proj",
                  "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn",
                  (("num_heads", "heads"), ("num_key_value_heads", "kv_heads"), ("num_key_value_groups", "kv_groups"))),
        ),
    )


_T5_HEADS = (
    "T5 shares one relative position bias (block 0's, one column per head) across every block of a stack, so "
    "heads cannot be pruned block by block; prune `mlp` only"
)


def check_t5_depths(depths: dict[str, int], changed: set[str]) -> None:
    """Refuse a T5 whose decoder would be deeper than its encoder (exit 2).

    transformers 5.x sizes T5's generation KV cache by ``config.num_hidden_layers``, which T5's
    config aliases to ``num_layers`` (the *encoder* depth): with more decoder than encoder blocks,
    cached generation fails with ``IndexError`` in ``DynamicCache.update`` (reproducible on a fresh
    ``T5ForConditionalGeneration`` with ``num_decoder_layers > num_layers``).

    Args:
        depths: stack → layers after the removal (``language_model.encoder``, ``language_model.decoder``).
        changed: the stacks the removal touches (nothing is checked unless it touches one of these two).

    Raises:
        UserInputError: the decoder would be deeper than the encoder, naming how to fix the selection.
    """
    enc, dec = depths.get("language_model.encoder"), depths.get("language_model.decoder")
    if not changed & {"language_model.encoder", "language_model.decoder"} or enc is None or dec is None or dec <= enc:
        return
    raise UserInputError(
        f"language_model: this removal leaves a T5 with {enc} encoder and {dec} decoder blocks; "
        "transformers sizes T5's generation cache by the encoder depth, so generating with a decoder deeper than "
        f"the encoder fails. Remove at least {dec - enc} more decoder block(s) or fewer encoder blocks."
    )


def _t5(root: str, body: str | None = None) -> LanguageModelKind:
    enc = rf"{root}\.encoder\.block\.\d+"
    dec = rf"{root}\.decoder\.block\.\d+"
    enc_attn = rf"{enc}\.layer\.0\.SelfAttention\.(q|k|v|o)"
    dec_attn = rf"{dec}\.layer\.0\.SelfAttention\.(q|k|v|o)"
    dec_cross = rf"{dec}\.layer\.1\.EncDecAttention\.(q|k|v|o)"
    enc_mlp = rf"{enc}\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)"
    dec_mlp = rf"{dec}\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)"
    return LanguageModelKind(
        model_type="t5",
        decoder_only=False,
        stacks=(
            Stack(
                part="language_model.encoder",
                layers=f"{root}.encoder.block",
                count_fields=("text_config.num_layers",),
                stack_config=f"{root}.encoder",
                layer_idx_modules=("layer.0.SelfAttention",),
                relative_bias="layer.0.SelfAttention",
                positions="attention_mask",
            ),
            Stack(
                part="language_model.decoder",
                layers=f"{root}.decoder.block",
                count_fields=("text_config.num_decoder_layers",),
                stack_config=f"{root}.decoder",
                layer_idx_modules=("layer.0.SelfAttention", "layer.1.EncDecAttention"),
                relative_bias="layer.0.SelfAttention",
                positions="decoder_attention_mask",
            ),
        ),
        lora={
            "language_model.attention": rf"({enc_attn}|{dec_attn}|{dec_cross})",
            "language_model.mlp": rf"({enc_mlp}|{dec_mlp})",
            "language_model.encoder.attention": enc_attn,
            "language_model.encoder.mlp": enc_mlp,
            "language_model.decoder.attention": dec_attn,
            "language_model.decoder.cross_attention": dec_cross,
            "language_model.decoder.mlp": dec_mlp,
        },
        embed_tokens=f"{root}.shared",
        width=(
            Width("language_model.encoder", ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0",
                                             "layer.1.DenseReluDense.wi_1"), ("layer.1.DenseReluDense.wo",),
                  heads_refused=_T5_HEADS),
            Width("language_model.decoder", ("layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wi_0",
                                             "layer.2.DenseReluDense.wi_1"), ("layer.2.DenseReluDense.wo",),
                  heads_refused=_T5_HEADS),
        ),
        plan_checks=(check_t5_depths,),
    )


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")


def language_model_kind(model_type: str, root: str = "language_model", body: str | None = None) -> LanguageModelKind:
    """Look up the language-model knowledge for ``text_config.model_type``.

    Args:
        model_type: e.g. ``opt``, ``llama``, ``t5``.
        root: dotted path of the language model inside the BLIP-family model.
        body: dotted path of the bare decoder stack when the VLM holds it without its causal-LM
            wrapper (Idefics3: ``model.text_model``; Llama-architecture models only); default
            ``{root}.model``.

    Raises:
        KeyError: the architecture is not supported (callers turn this into a clear exit 2).
    """
    if model_type == "opt":
        return _opt(root)
    if model_type in LLAMA_LIKE:
        return _llama_like(model_type, root, body)
    if model_type in ("t5", "mt5", "umt5"):
        return _t5(root)
    raise KeyError(model_type)


SUPPORTED_LANGUAGE_MODELS = ("opt", *LLAMA_LIKE, "t5")


# --------------------------------------------------------------------------------------------
# ONNX: the encoder and decoder wrappers of encoder-decoder language models (T5), placed by
# exporters.onnx.topologies.encoder_decoder; decoder-only models need none (the topology wraps
# any transformers causal LM)
# --------------------------------------------------------------------------------------------

_ONNX_CLASSES: dict = {}


def _t5_onnx_wrappers() -> dict:
    """T5's wrapper classes, built on first use (this module imports without torch)."""
    if _ONNX_CLASSES:
        return _ONNX_CLASSES
    import torch
    from torch import nn

    from exporters.onnx.graphs import cross_cache, cross_kv

    class T5Encoder(nn.Module):
        """T5 encoder over the spliced inputs, plus every decoder layer's cross-attention K/V.

        ``inputs_embeds (batch, seq, d_model)``, ``attention_mask (batch, seq)`` →
        ``encoder_hidden_states (batch, seq, d_model)``, ``cross.{i}.key/value (batch, heads, seq,
        d_kv)`` (``EncDecAttention.k/v`` of each decoder block, as T5Attention computes them).
        """

        #: T5Attention's sdpa path cannot be decomposed by torch.export under dynamic batch and
        #: sequence ("Cannot view a tensor with shape [s59, s29, 4, 8] and strides (32*s29, 8,
        #: 8*s29, 1)", torch 2.13, transformers 5.24); eager gives the same numbers and exports
        export_attention = "eager"

        def __init__(self, lm):
            super().__init__()
            self.encoder = lm.encoder
            self.attn = nn.ModuleList([blk.layer[1].EncDecAttention for blk in lm.decoder.block])
            self.head_dim = lm.config.d_kv

        def forward(self, inputs_embeds, attention_mask):
            h = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
            return (h, *cross_kv(self.attn, h, "k", "v", self.head_dim))

    class T5Decoder(nn.Module):
        """T5 decoder step with self-attention past and precomputed cross-attention K/V.

        ``inputs_embeds (batch, seq, d_model)``, ``encoder_attention_mask (batch, enc)``,
        ``past.{i}.key/value (batch, heads, past, d_kv)``, ``cross.{i}.key/value (batch, heads,
        enc, d_kv)`` → ``logits (batch, vocab)`` (last position), ``present.{i}.key/value``.
        The decoder stack and head as ``T5ForConditionalGeneration.forward`` runs them
        (output scaled by ``d_model ** -0.5`` when the embeddings are tied).
        """

        export_attention = "eager"  # see T5Encoder

        def __init__(self, lm, layers: int):
            super().__init__()
            self.decoder = lm.decoder
            self.lm_head = lm.lm_head
            self.config = lm.config
            self.layers = layers

        def forward(self, inputs_embeds, encoder_attention_mask, *past):
            L = self.layers
            cache = cross_cache(past, L, self.config)
            k0 = past[2 * L]
            # only the shape of the encoder states is read (cross K/V come from the cache)
            dummy = torch.zeros(
                (k0.shape[0], k0.shape[2], self.config.d_model), dtype=inputs_embeds.dtype, device=k0.device
            )
            out = self.decoder(
                inputs_embeds=inputs_embeds,
                cache=cache,
                encoder_hidden_states=dummy,
                encoder_attention_mask=encoder_attention_mask,
                use_cache=True,
            )
            h = out[0][:, -1:, :]
            if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
                h = h * (self.config.d_model**-0.5)
            presents = [t for layer in out.cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
            return (self.lm_head(h)[:, -1, :].float(), *presents)

    _ONNX_CLASSES.update(T5Encoder=T5Encoder, T5Decoder=T5Decoder)
    return _ONNX_CLASSES


def _t5_onnx_text_graphs(lm, text_config):
    from exporters.onnx.topologies.encoder_decoder import TextGraphs

    W = _t5_onnx_wrappers()
    layers = int(getattr(text_config, "num_decoder_layers", None) or text_config.num_layers)
    return TextGraphs(
        encoder=W["T5Encoder"](lm),
        decoder=W["T5Decoder"](lm, layers),
        num_layers=layers,
        num_heads=int(text_config.num_heads),
        head_dim=int(text_config.d_kv),
    )


#: ``LanguageModelKind.model_type`` → its encoder-decoder ONNX wrappers.
_ONNX_TEXT_GRAPHS = {"t5": _t5_onnx_text_graphs}


def onnx_text_graphs(kind: LanguageModelKind, lm, text_config):
    """The ``encoder`` and ``decoder`` wrappers of an encoder-decoder language model.

    Args:
        kind: its :class:`LanguageModelKind`.
        lm: the loaded language model (``T5ForConditionalGeneration``).
        text_config: its config (decoder layers, heads, per-head width).

    Returns:
        :class:`exporters.onnx.topologies.encoder_decoder.TextGraphs`.

    Raises:
        ModelSpecError: no ONNX wrappers for this architecture.
    """
    from compressor.errors import ModelSpecError

    if kind.model_type not in _ONNX_TEXT_GRAPHS:
        raise ModelSpecError(f"no ONNX export for an encoder-decoder '{kind.model_type}' language model")
    return _ONNX_TEXT_GRAPHS[kind.model_type](lm, text_config)
