"""Model-family knowledge, in one place per family, looked up (never re-derived) by every stage.

A :class:`Family` says, for one loaded config: which class builds the model, which module
prefixes make up each part (``vision``, ``qformer``, ``projection``, ``language_model``), which
layer stacks can be removed and which config fields count them, the anchored LoRA patterns of
the part-scoped names, and the Q-Former cross-attention frequency. Paths follow transformers 5.x
(shared/notes/stack-facts.md §2).

Families: ``blip2`` (Blip2ForConditionalGeneration with an OPT, Llama-architecture or T5
language model), ``instructblip`` (InstructBlipForConditionalGeneration) and ``blip``
(BlipForConditionalGeneration: vision encoder + BERT text decoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compressor.errors import ModelSpecError
from compressor.families.language_models import (
    SUPPORTED_LANGUAGE_MODELS,
    LanguageModelKind,
    Stack,
    Width,
    language_model_kind,
)

__all__ = [
    "Family",
    "Stack",
    "Width",
    "family_for_config",
    "family_for_model",
    "get_module",
    "get_config_value",
    "set_config_value",
]

_VISION_LORA = {
    "vision.attention": r"vision_model\.encoder\.layers\.\d+\.self_attn\.(qkv|projection)",
    "vision.mlp": r"vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)",
}
_QFORMER_LORA = {
    "qformer.self_attention": r"qformer\.encoder\.layer\.\d+\.attention\.attention\.(query|key|value)",
    "qformer.cross_attention": r"qformer\.encoder\.layer\.\d+\.crossattention\.attention\.(query|key|value)",
    "qformer.mlp": r"qformer\.encoder\.layer\.\d+\.(intermediate_query|output_query|intermediate|output)\.dense",
    "projection": r"language_projection",
}
_BLIP_TEXT = r"text_decoder\.bert\.encoder\.layer\.\d+"
_BLIP_LORA = {
    "language_model.attention": rf"{_BLIP_TEXT}\.attention\.self\.(query|key|value)",
    "language_model.decoder.attention": rf"{_BLIP_TEXT}\.attention\.self\.(query|key|value)",
    "language_model.decoder.cross_attention": rf"{_BLIP_TEXT}\.crossattention\.self\.(query|key|value)",
    "language_model.mlp": rf"{_BLIP_TEXT}\.(intermediate|output)\.dense",
}


@dataclass(frozen=True)
class Family:
    """Knowledge of one model family, specialised to one config.

    Attributes:
        name: ``blip2``, ``instructblip`` or ``blip``.
        model_type: the top-level ``config.model_type`` (``blip-2``, ``instructblip``, ``blip``).
        model_class: the transformers class name that loads it.
        config_class: the transformers config class name.
        parts: part name → module/parameter name prefixes (relative to the model root).
        stacks: removable layer stacks, by part name.
        lora: part-scoped LoRA name → regex (full match, peft semantics) over module names.
        lm: language-model knowledge (None for BLIP, whose text decoder is BERT).
        decoder_only: whether generation output repeats the prompt (causal LM).
        cross_attention_frequency: Q-Former cross-attention every N layers (None: no Q-Former).
        has_qformer_text: the Q-Former also reads the instruction (InstructBLIP).
        width: prunable widths (heads, MLP units) of the language model's stacks (``prune_width``).
    """

    name: str
    model_type: str
    model_class: str
    config_class: str
    parts: dict[str, tuple[str, ...]]
    stacks: dict[str, Stack]
    lora: dict[str, str]
    lm: LanguageModelKind | None
    decoder_only: bool
    cross_attention_frequency: int | None = None
    has_qformer_text: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    width: tuple[Width, ...] = ()

    @property
    def lm_model_type(self) -> str:
        return self.lm.model_type if self.lm is not None else "bert"

    def stack(self, part: str) -> Stack:
        """The stack of ``part``; raises ModelSpecError naming the valid parts."""
        try:
            return self.stacks[part]
        except KeyError:
            raise ModelSpecError(
                f"a {self.name} model with a {self.lm_model_type} language model has no removable part "
                f"'{part}'; its parts are: {', '.join(self.stacks)}"
            ) from None

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def config_cls(self):
        import transformers

        return getattr(transformers, self.config_class)


def _blip2_like(name: str, model_type: str, model_class: str, config_class: str, config) -> Family:
    text_type = config.text_config.model_type
    try:
        lm = language_model_kind(text_type)
    except KeyError:
        raise ModelSpecError(
            f"{model_type} with a '{text_type}' language model is not supported; supported language models: "
            f"{', '.join(SUPPORTED_LANGUAGE_MODELS)}"
        ) from None
    stacks = {
        "vision": Stack("vision", "vision_model.encoder.layers", ("vision_config.num_hidden_layers",)),
        "qformer": Stack("qformer", "qformer.encoder.layer", ("qformer_config.num_hidden_layers",)),
    }
    for st in lm.stacks:
        stacks[st.part] = st
    return Family(
        name=name,
        model_type=model_type,
        model_class=model_class,
        config_class=config_class,
        parts={
            "vision": ("vision_model",),
            "qformer": ("qformer", "query_tokens"),
            "projection": ("language_projection",),
            "language_model": ("language_model",),
        },
        stacks=stacks,
        lora={**_VISION_LORA, **_QFORMER_LORA, **lm.lora},
        lm=lm,
        decoder_only=lm.decoder_only,
        cross_attention_frequency=int(config.qformer_config.cross_attention_frequency),
        has_qformer_text=name == "instructblip",
        width=lm.width,
    )


def _blip(config) -> Family:
    return Family(
        name="blip",
        model_type="blip",
        model_class="BlipForConditionalGeneration",
        config_class="BlipConfig",
        parts={"vision": ("vision_model",), "language_model": ("text_decoder",)},
        stacks={
            "vision": Stack("vision", "vision_model.encoder.layers", ("vision_config.num_hidden_layers",)),
            "language_model": Stack(
                "language_model",
                "text_decoder.bert.encoder.layer",
                ("text_config.num_hidden_layers",),
                layer_idx_modules=("attention.self", "crossattention.self"),
            ),
        },
        lora={**_VISION_LORA, **_BLIP_LORA},
        lm=None,
        decoder_only=True,
        width=(
            Width("language_model", ("intermediate.dense",), ("output.dense",), "attention.self.query",
                  "attention.self.key", "attention.self.value", "attention.output.dense", "attention.self",
                  (("num_attention_heads", "heads"), ("all_head_size", "width"))),
        ),
    )


FAMILY_MODEL_TYPES = ("blip-2", "instructblip", "blip")


def family_for_config(config) -> Family:
    """The family of a loaded transformers config.

    Args:
        config: a ``Blip2Config``, ``InstructBlipConfig`` or ``BlipConfig`` (or anything with
            the same ``model_type``).

    Raises:
        ModelSpecError: the model type is not a BLIP family (exit 2).
    """
    mt = getattr(config, "model_type", None)
    if mt == "blip-2":
        return _blip2_like("blip2", "blip-2", "Blip2ForConditionalGeneration", "Blip2Config", config)
    if mt == "instructblip":
        return _blip2_like(
            "instructblip", "instructblip", "InstructBlipForConditionalGeneration", "InstructBlipConfig", config
        )
    if mt == "blip":
        return _blip(config)
    raise ModelSpecError(
        f"model_type '{mt}' is not a BLIP-family model; vlm-compress handles {', '.join(FAMILY_MODEL_TYPES)}"
    )


def family_for_model(model) -> Family:
    """The family of a loaded model (unwrapping a peft model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_for_config(base.config)


# --------------------------------------------------------------------------------------------
# Dotted-path helpers shared by every stage
# --------------------------------------------------------------------------------------------


def get_module(root, path: str):
    """``root.a.b.0.c`` for ``path='a.b.0.c'`` (integers index ModuleLists)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def set_module(root, path: str, value) -> None:
    """Set the attribute or list item at a dotted path."""
    parent_path, _, last = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    if last.isdigit():
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


def get_config_value(config, path: str, default=None):
    """A value at a dotted path of a (nested) config; ``default`` when absent."""
    obj = config
    for part in path.split("."):
        if obj is None:
            return default
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return default if obj is None else obj


def set_config_value(config, path: str, value) -> None:
    """Set a value at a dotted path of a (nested) config."""
    parent_path, _, last = path.rpartition(".")
    parent = get_config_value(config, parent_path) if parent_path else config
    if isinstance(parent, dict):
        parent[last] = value
    else:
        setattr(parent, last, value)
