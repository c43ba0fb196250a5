"""``prune_width``: attention heads and MLP channels of the language model (torch-pruning).

Not built in this version: the recipe validates, and ``compress apply`` exits 2 naming the
feature before anything is written (``compressor.recipe.features``).
"""

from __future__ import annotations

from pathlib import Path

from compressor.errors import NotBuiltError

PRODUCES_MODEL = True


def data_sections(cfg) -> list[str]:
    return [cfg.calibration.data] if cfg.importance == "taylor" else []


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    raise NotBuiltError("prune_width (width pruning with torch-pruning) is not built yet in this version")
