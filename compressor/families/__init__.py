"""Model families: one module each, registered by ``config.model_type`` (torchtune's one folder per model).

Every stage, the planner, the exporters and the captioners look a model's knowledge up here and
never re-derive it: ``family_for_config(config)`` returns a :class:`Family` (parts, removable
stacks and their rules, LoRA patterns, widths, batch layout, token ids, GFLOPs replay, ONNX
topology), built by the family module registered for the config's ``model_type``.

Families: ``blip2`` (BLIP-2 with an OPT, Llama-architecture or T5 language model),
``instructblip``, ``blip``, ``smolvlm`` (Idefics3 / SmolVLM). Adding a family is one module plus
one line in :data:`FAMILIES` (and its presets); a family module defines ``MODEL_CLASS``, ``MODEL_TYPES``, ``REMOVAL_KEYS``,
``ENCODER_DECODER_KEYS``, ``LORA_NAMES``, ``PARTS``, ``TRAINABLE_NAMES``, ``describe(config) -> Family`` and the behaviour functions that
:class:`~compressor.families.base.Family` dispatches to. Paths follow transformers 5.x
(shared/notes/stack-facts.md §2).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from compressor.errors import ModelSpecError
from compressor.families.base import Family, Stack, Width

__all__ = [
    "FAMILIES",
    "Family",
    "Stack",
    "Width",
    "family_for_config",
    "family_for_model",
    "encoder_decoder_keys",
    "family_modules",
    "get_config_value",
    "get_module",
    "lora_names",
    "part_labels",
    "part_names",
    "removal_keys",
    "set_config_value",
    "set_module",
    "trainable_names",
]

#: Registered families: module path, in the order the reference lists them.
FAMILIES: dict[str, str] = {
    "blip2": "compressor.families.blip2",
    "instructblip": "compressor.families.instructblip",
    "blip": "compressor.families.blip",
    "smolvlm": "compressor.families.smolvlm",
}


def family_modules() -> list[ModuleType]:
    """The registered family modules, imported (they import no torch at module level)."""
    return [importlib.import_module(path) for path in FAMILIES.values()]


def _by_model_type() -> dict[str, ModuleType]:
    return {mt: mod for mod in family_modules() for mt in mod.MODEL_TYPES}


def model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` some family handles."""
    return tuple(_by_model_type())


def family_for_config(config) -> Family:
    """The family of a loaded transformers config.

    Args:
        config: a transformers config (``Blip2Config`` …) or anything with its ``model_type``.

    Raises:
        ModelSpecError: no registered family handles this model type (exit 2).
    """
    mt = getattr(config, "model_type", None)
    mod = _by_model_type().get(mt)
    if mod is None:
        raise ModelSpecError(f"model_type '{mt}' is not a model family vlm-compress handles; it handles {', '.join(model_types())}")
    return mod.describe(config)


def family_for_model(model) -> Family:
    """The family of a loaded model (unwrapping a peft model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_for_config(base.config)


def model_class_for(model_type: str) -> str | None:
    """The transformers class name a ``model_type`` loads with (None when no family handles it)."""
    mod = _by_model_type().get(model_type)
    return getattr(mod, "MODEL_CLASS", None) if mod is not None else None


# --------------------------------------------------------------------------------------------
# The vocabularies every family contributes to (the recipe schema validates names against them)
# --------------------------------------------------------------------------------------------


def _union(attr: str) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for mod in family_modules():
        out.update(dict.fromkeys(getattr(mod, attr)))
    return tuple(out)


@functools.cache
def part_names() -> tuple[str, ...]:
    """Every part name of every family (``params_<part>`` keys), in registration order."""
    return _union("PARTS")


@functools.cache
def part_labels() -> dict[str, str]:
    """Part name → display label, where a family declares one (``PART_LABELS``: BLIP-2's ``Q-Former``)."""
    out: dict[str, str] = {}
    for mod in family_modules():
        for part, label in getattr(mod, "PART_LABELS", {}).items():
            out.setdefault(part, label)
    return out


@functools.cache
def lora_names() -> tuple[str, ...]:
    """Every part-scoped LoRA name any family accepts (``parts:`` of lora_finetune / heal)."""
    return _union("LORA_NAMES")


@functools.cache
def trainable_names() -> tuple[str, ...]:
    """Every name ``finetune.parts`` / ``heal: {trainable: parts}`` may use in some family."""
    return _union("TRAINABLE_NAMES")


@functools.cache
def removal_keys() -> dict[str, str]:
    """``remove_layers`` recipe key → its reference text, over every family (first description wins)."""
    out: dict[str, str] = {}
    for mod in family_modules():
        for key, text in mod.REMOVAL_KEYS.items():
            out.setdefault(key, text)
    return out


@functools.cache
def encoder_decoder_keys() -> tuple[str, ...]:
    """``remove_layers`` keys that also take ``{encoder: …, decoder: …}`` in some family."""
    return _union("ENCODER_DECODER_KEYS")


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
