"""What the toolchain knows about each language-model architecture inside a BLIP-family model.

One entry per ``text_config.model_type``: where the decoder layers live (relative to
``model.language_model``), which config field counts them, which attention modules carry a
KV-cache ``layer_idx`` to renumber after removal, and the LoRA module names of attention and MLP.
Facts from shared/notes/stack-facts.md §2–4 (transformers 5.x attribute paths).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stack:
    """One removable stack of layers.

    Attributes:
        part: the part name everywhere (``language_model``, ``language_model.encoder`` …).
        layers: dotted path of the ``nn.ModuleList`` relative to the model root.
        count_fields: dotted config paths (relative to the model's config) holding the layer count.
        stack_config: dotted path of a module whose private ``.config`` also holds the count
            (T5 stacks hold deep copies), or None.
        layer_idx_modules: paths, relative to one layer, of modules whose ``layer_idx`` must equal
            the layer's new position (KV-cache slots, stack-facts §3).
        per_layer_fields: config list fields with one entry per layer (e.g. ``layer_types``) to trim.
        relative_bias: T5: the path, relative to a layer, of the attention holding
            ``relative_attention_bias`` in block 0 (must move to the new block 0).
    """

    part: str
    layers: str
    count_fields: tuple[str, ...]
    stack_config: str | None = None
    layer_idx_modules: tuple[str, ...] = ()
    per_layer_fields: tuple[str, ...] = ()
    relative_bias: str | None = None


@dataclass(frozen=True)
class Width:
    """Where the prunable widths of one stack's layers live (``prune_width``), relative to a layer.

    Attributes:
        part: the stack (a key of the family's stacks).
        mlp_in: linears whose *output* channels are the MLP's hidden units (``fc1``; gate and up).
        mlp_out: linears whose *input* channels are those units (``fc2``; down).
        q, k, v, o: the self-attention projections (None: heads cannot be pruned in this stack).
        head_attrs: attention-module attributes to set after head pruning: name → what it
            counts (``heads``, ``kv_heads``, ``kv_groups``, ``width`` = heads × head_dim).
        attention: path of the attention module (relative to a layer) holding ``head_attrs``.
        heads_refused: why heads cannot be pruned here (None when they can).
    """

    part: str
    mlp_in: tuple[str, ...]
    mlp_out: tuple[str, ...]
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    attention: str | None = None
    head_attrs: tuple[tuple[str, str], ...] = ()
    heads_refused: str | None = None


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
    """

    model_type: str
    decoder_only: bool
    stacks: tuple[Stack, ...]
    lora: dict[str, str] = field(default_factory=dict)
    embed_tokens: str = ""
    width: tuple[Width, ...] = ()


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
            ),
            Stack(
                part="language_model.decoder",
                layers=f"{root}.decoder.block",
                count_fields=("text_config.num_decoder_layers",),
                stack_config=f"{root}.decoder",
                layer_idx_modules=("layer.0.SelfAttention", "layer.1.EncDecAttention"),
                relative_bias="layer.0.SelfAttention",
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
