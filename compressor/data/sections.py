"""Where a section of the recipe's data comes from: fallbacks and the split of ``data.source``.

A section (``train``, ``val``, ``eval``, ``test``, ``calibration``) is read from, in order:

1. its own key, ``data.<section>``;
2. for ``train`` / ``val`` / ``test``: its share of ``data.source`` divided by ``data.split``
   (by image, so all captions and questions of an image land on one side; seeded; the image
   ids are sorted before shuffling, so the split depends only on the ids and the seed);
3. a fallback: ``eval`` → ``test`` → ``val``, ``calibration`` → ``train`` (each through 1-2).

Loading, validation and fingerprints: :mod:`compressor.data.loader`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compressor.data.dataset import natural_key
from compressor.data.formats import get_format
from compressor.errors import UserInputError

if TYPE_CHECKING:
    from compressor.recipe.schema import DataSource, DataSpec

logger = logging.getLogger(__name__)

SECTIONS = ("train", "val", "eval", "test", "calibration")
#: Where a section looks for its data, in order.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val",),
    "eval": ("eval", "test", "val"),
    "test": ("test",),
    "calibration": ("calibration", "train"),
}


@dataclass(frozen=True)
class Resolved:
    """Where a section's data comes from.

    Attributes:
        name: the section key read (``test`` when ``eval`` fell back to it).
        src: the DataSource.
        part: ``train`` / ``val`` / ``test`` when the data is a share of ``data.source``, else None.
        spec: the whole ``data:`` (settings given once for every section, such as ``columns``).
    """

    name: str
    src: DataSource
    part: str | None
    spec: DataSpec | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """The recipe key, e.g. ``data.test`` or ``data.source``."""
        return "data.source" if self.part else f"data.{self.name}"

    @property
    def label(self) -> str:
        """Human-readable origin, e.g. ``data.test`` or ``data.source[val]``."""
        return f"data.source[{self.part}]" if self.part else f"data.{self.name}"


def _direct(spec: DataSpec, name: str) -> Resolved | None:
    src = getattr(spec, name, None)
    if src is not None:
        return Resolved(name, src, None, spec)
    if spec.source is not None and spec.split is not None and name in ("train", "val", "test"):
        if getattr(spec.split, name) > 0:
            return Resolved(name, spec.source, name, spec)
    return None


def resolve_section(spec: DataSpec, section: str) -> Resolved:
    """Find the data a section reads, following the fallbacks.

    Args:
        spec: the recipe's ``data``.
        section: ``train``, ``val``, ``eval``, ``test`` or ``calibration``.

    Returns:
        The resolved source.

    Raises:
        UserInputError: an unknown section name, or no data for it (the message names the
            recipe key to add).
    """
    if section not in FALLBACKS:
        from compressor.errors import did_you_mean

        raise UserInputError(
            f"unknown data section '{section}'.{did_you_mean(section, SECTIONS)} Valid: {', '.join(SECTIONS)}"
        )
    for name in FALLBACKS[section]:
        r = _direct(spec, name)
        if r is not None:
            if name != section:
                logger.info("data.%s is not set; using %s", section, r.label)
            return r
    looked = ", ".join(f"data.{n}" for n in FALLBACKS[section])
    extra = (
        " (or a share of data.source via data.split)" if section in ("train", "val", "test", "eval") else ""
    )
    raise UserInputError(
        f"the recipe has no data for section '{section}': looked for {looked}{extra}. "
        f"Add `data.{section}: {get_format(spec.format).example}` to the recipe."
    )


def available_sections(spec: DataSpec) -> list[str]:
    """The sections :func:`~compressor.data.loader.load_section` can load, fallbacks included.

    Args:
        spec: the recipe's ``data``.

    Returns:
        Section names in the order ``train, val, eval, test, calibration``; e.g. a spec with only
        ``train`` gives ``["train", "calibration"]``.
    """
    return [s for s in SECTIONS if any(_direct(spec, n) is not None for n in FALLBACKS[s])]


def split_image_ids(image_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, set[str]]:
    """Divide image ids into train/val/test, seeded and deterministic.

    The ids are sorted (natural order) and de-duplicated, shuffled with ``random.Random(seed)``,
    then cut at ``round(n * train)`` and ``round(n * (train + val))``; test takes the rest.

    Args:
        image_ids: ids (repeats allowed).
        fractions: ``{"train": f, "val": f, "test": f}`` summing to 1.
        seed: shuffle seed.

    Returns:
        ``{"train": ids, "val": ids, "test": ids}``, disjoint, covering every id.
    """
    ids = sorted(set(image_ids), key=natural_key)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    b1 = round(n * fractions["train"])
    b2 = max(b1, min(n, round(n * (fractions["train"] + fractions["val"]))))
    return {"train": set(ids[:b1]), "val": set(ids[b1:b2]), "test": set(ids[b2:])}
