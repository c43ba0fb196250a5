"""Data for training, calibration and evaluation (DESIGN.md "Conventions": data formats).

``load_section(spec, "eval")`` turns the recipe's ``data`` into a :class:`Dataset` of
:class:`Example` objects in a stable order, with a fingerprint that run-directory hashes use.

Modules: :mod:`~compressor.data.dataset` (the in-memory types), :mod:`~compressor.data.formats`
(the format registry; one module per format: ``coco``, ``karpathy``, ``csv``, ``imagefolder``,
and the built-in ``synthetic`` shapes set in :mod:`~compressor.data.synthetic`),
:mod:`~compressor.data.sections` (sections, fallbacks, splitting), :mod:`~compressor.data.loader`
(reading, limits, bad-row handling, fingerprints) and :mod:`~compressor.data.infer` (a spec from
``--data PATH``).

The names below are imported on first use, so that ``compressor.data.formats`` (which the recipe
schema reads) can be imported without PIL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compressor.data.dataset import Dataset, Example, batches, load_images, most_common, natural_key
    from compressor.data.infer import infer_spec
    from compressor.data.loader import check_image, load_section, section_fingerprint
    from compressor.data.sections import (
        FALLBACKS,
        SECTIONS,
        available_sections,
        resolve_section,
        split_image_ids,
    )
    from compressor.data.synthetic import SYNTHETIC_VERSION, make_scene, render_shapes

#: Public name -> the module defining it.
_EXPORTS = {
    "Dataset": "compressor.data.dataset",
    "Example": "compressor.data.dataset",
    "batches": "compressor.data.dataset",
    "load_images": "compressor.data.dataset",
    "most_common": "compressor.data.dataset",
    "natural_key": "compressor.data.dataset",
    "FALLBACKS": "compressor.data.sections",
    "SECTIONS": "compressor.data.sections",
    "available_sections": "compressor.data.sections",
    "resolve_section": "compressor.data.sections",
    "split_image_ids": "compressor.data.sections",
    "check_image": "compressor.data.loader",
    "load_section": "compressor.data.loader",
    "section_fingerprint": "compressor.data.loader",
    "infer_spec": "compressor.data.infer",
    "SYNTHETIC_VERSION": "compressor.data.synthetic",
    "make_scene": "compressor.data.synthetic",
    "render_shapes": "compressor.data.synthetic",
}

__all__ = [
    "FALLBACKS",
    "SECTIONS",
    "SYNTHETIC_VERSION",
    "Dataset",
    "Example",
    "available_sections",
    "batches",
    "check_image",
    "infer_spec",
    "load_images",
    "load_section",
    "make_scene",
    "most_common",
    "natural_key",
    "render_shapes",
    "resolve_section",
    "section_fingerprint",
    "split_image_ids",
]


def __getattr__(name: str):
    """Import a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the not yet imported public ones included."""
    return sorted({*globals(), *_EXPORTS})
