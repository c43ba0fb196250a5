"""``model: {assemble: {…}}``: one builder per family, chosen by the spec's ``family`` key.

A family module that can be assembled from pretrained parts names its builder module
(``ASSEMBLY = "compressor.models.assemble_<name>"``); that module defines ``Parts`` (the pydantic
model of its ``assemble:`` keys, with ``family: Literal["<name>"]``), ``assembled_config(parts)
-> (config, processor, sources)`` (no weights: pre-flight and ``compress plan``) and
``assemble(parts, out_dir, dtype) -> Path``. A spec without ``family`` is BLIP-2's
(:mod:`compressor.models.assemble`), so recipes written before other families existed keep
their meaning (and their cache keys: BLIP-2's ``family`` is never serialised).

Builders: ``blip2`` (:mod:`compressor.models.assemble`: a causal LM, a BERT for the Q-Former, a
vision encoder), ``smolvlm`` (:mod:`compressor.models.assemble_smolvlm`: the published
SmolVLM-256M architecture and a language model of its shape).
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

#: The family a spec without ``family`` means.
DEFAULT_FAMILY = "blip2"


@functools.cache
def builders() -> dict[str, str]:
    """Family name → its assembly module, from the registered families' ``ASSEMBLY``."""
    from compressor.families import FAMILIES, family_modules

    return {name: mod.ASSEMBLY for name, mod in zip(FAMILIES, family_modules()) if getattr(mod, "ASSEMBLY", None)}


def builder(family: str) -> ModuleType:
    """The assembly module of ``family`` (imported; its module imports no torch)."""
    return importlib.import_module(builders()[family])


def parts_classes() -> dict[str, type]:
    """Family name → the pydantic model of its ``assemble:`` keys."""
    return {name: builder(name).Parts for name in builders()}


def _tag(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("family") or DEFAULT_FAMILY
    return getattr(value, "family", DEFAULT_FAMILY)


@functools.cache
def parts_type():
    """The schema type of ``assemble:``: a union of every family's ``Parts``, discriminated by ``family``."""
    members = tuple(Annotated[cls, Tag(name)] for name, cls in parts_classes().items())
    names = ", ".join(parts_classes())
    return Annotated[
        Union[members],  # noqa: UP007 - a runtime tuple of classes
        Discriminator(
            _tag,
            custom_error_type="assemble_family",
            custom_error_message=f"`family` must be one of: {names} (default {DEFAULT_FAMILY})",
        ),
    ]


def family_of(parts) -> str:
    """The family an ``assemble:`` spec builds."""
    return _tag(parts)


def assembled_config(parts):
    """``(config, processor, sources)`` of an ``assemble:`` spec, without weights (its family's builder)."""
    return builder(family_of(parts)).assembled_config(parts)


def assemble(parts, out_dir: Path, dtype: str = "float32") -> Path:
    """Build and save the model of an ``assemble:`` spec into ``out_dir`` (its family's builder)."""
    return builder(family_of(parts)).assemble(parts, out_dir, dtype)
