"""What the toolchain knows about each language-model architecture inside a BLIP-family model.

One entry per ``text_config.model_type``: where the decoder layers live (relative to
``model.language_model``), which config field counts them, which attention modules carry a
KV-cache ``layer_idx`` to renumber after removal, and the LoRA module names of attention and MLP.
Facts from shared/notes/stack-facts.md §2–4 (transformers 5.x attribute paths).
"""

from __future__ import annotations

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


def _opt(root: str) -> LanguageModelKind:
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


def _llama_like(model_type: str, root: str) -> LanguageModelKind:
    """Llama-architecture decoders (llama, mistral, qwen2, smollm …): ``model.layers``."""
    layers = rf"{root}\.model\.layers\.\d+"
    return LanguageModelKind(
        model_type=model_type,
        decoder_only=True,
        stacks=(
            Stack(
                part="language_model",
                layers=f"{root}.model.layers",
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
        embed_tokens=f"{root}.model.embed_tokens",
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


def _t5(root: str) -> LanguageModelKind:
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


def language_model_kind(model_type: str, root: str = "language_model") -> LanguageModelKind:
    """Look up the language-model knowledge for ``text_config.model_type``.

    Args:
        model_type: e.g. ``opt``, ``llama``, ``t5``.
        root: dotted path of the language model inside the BLIP-family model.

    Raises:
        KeyError: the architecture is not supported (callers turn this into a clear exit 2).
    """
    if model_type == "opt":
        return _opt(root)
    if model_type in LLAMA_LIKE:
        return _llama_like(model_type, root)
    if model_type in ("t5", "mt5", "umt5"):
        return _t5(root)
    raise KeyError(model_type)


SUPPORTED_LANGUAGE_MODELS = ("opt", *LLAMA_LIKE, "t5")
