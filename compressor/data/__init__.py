"""Data for training, calibration and evaluation (DESIGN.md "Conventions": data formats).

``load_section(spec, "eval")`` turns the recipe's ``data`` into a :class:`Dataset` of
:class:`Example` objects in a stable order, with a fingerprint that run-directory hashes use.
Formats: one module each, registered in :mod:`compressor.data.formats` (``coco``, ``karpathy``,
``csv``, ``imagefolder``, and the built-in ``synthetic`` shapes set of :mod:`compressor.data.synthetic`).
Sections, fallbacks and splitting: :mod:`compressor.data.sections`; limits, bad-row handling and
fingerprints: :mod:`compressor.data.loader`; a spec from ``--data PATH``: :mod:`compressor.data.infer`.
"""

from compressor.data.dataset import Dataset, Example, batches, load_images, most_common, natural_key
from compressor.data.infer import infer_spec
from compressor.data.loader import check_image, load_section, section_fingerprint
from compressor.data.sections import FALLBACKS, SECTIONS, available_sections, resolve_section, split_image_ids
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
