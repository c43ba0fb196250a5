"""Data for training, calibration and evaluation (DESIGN.md "Conventions": data formats).

``load_section(spec, "eval")`` turns the recipe's ``data`` into a :class:`Dataset` of
:class:`Example` objects in a stable order, with a fingerprint that run-directory hashes use.
Formats: ``coco``, ``karpathy``, ``csv``, ``imagefolder`` (see :mod:`compressor.data.formats`)
and the built-in ``synthetic`` shapes set (:mod:`compressor.data.synthetic`). Sections,
fallbacks, splitting, limits, bad-row handling and fingerprints: :mod:`compressor.data.loader`.
"""

from compressor.data.dataset import Dataset, Example, batches, load_images, most_common, natural_key
from compressor.data.loader import (
    FALLBACKS,
    SECTIONS,
    available_sections,
    check_image,
    infer_spec,
    load_section,
    resolve_section,
    section_fingerprint,
    split_image_ids,
)
from compressor.data.synthetic import SYNTHETIC_VERSION, make_scene, render_shapes

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
