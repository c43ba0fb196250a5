"""The context a stage runs in: the recipe, its place in it, the run directory, earlier outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import StageError

log = logging.getLogger(__name__)


def _one_process():
    from compressor.pipeline.distributed import Dist

    return Dist()


@dataclass
class StageContext:
    """What a stage may read besides its input folder.

    Attributes:
        recipe: the validated recipe.
        index: this stage's position in ``recipe.stages``.
        run_dir: the run directory.
        device: ``cpu`` or ``cuda`` (resolved).
        labels: label → model folder of earlier stages (a distillation teacher, evaluate teachers).
        label_outputs: label → output folder of the stage that carried the label.
        label_keys: label → the cache key of the model a label names (a distillation teacher's
            captions are cached under it).
        exports: output folders of earlier export stages, in order.
        progress: whether to draw progress bars.
        last_trainable: parameters trained by the latest training stage (reported as
            ``params_trainable``).
        checkpoint_dir: where a training stage saves its training state (and from whose newest
            state ``--resume`` continues it); set by the runner for stages that train, else None.
        dist: this process's place in a multi-process run
            (:class:`~compressor.pipeline.distributed.Dist`; one process by default).
    """

    recipe: Any
    index: int
    run_dir: Path
    device: str
    labels: dict[str, Path] = field(default_factory=dict)
    label_outputs: dict[str, Path] = field(default_factory=dict)
    label_keys: dict[str, str] = field(default_factory=dict)
    exports: list[Path] = field(default_factory=list)
    progress: bool = True
    last_trainable: int = 0
    checkpoint_dir: Path | None = None
    dist: Any = field(default_factory=lambda: _one_process())
    _data_cache: dict = field(default_factory=dict)
    _scorer: Any = None

    def scorer(self):
        """One caption scorer (one METEOR JVM) shared by every evaluation of the run."""
        if self._scorer is None:
            from eval.captioning import CaptionScorer

            self._scorer = CaptionScorer()
        return self._scorer

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def data(self, section: str, limit: int | None = None):
        """The recipe's data section (loaded once per run and cached)."""
        from compressor.data import load_section

        key = (section, limit)
        if key not in self._data_cache:
            if self.recipe.data is None:
                raise StageError(f"stage {self.index} needs `data:` in the recipe")
            self._data_cache[key] = load_section(self.recipe.data, section, limit=limit)
        return self._data_cache[key]

    @property
    def num_workers(self) -> int:
        """Loader worker processes (``data.num_workers``, or the default share of the CPUs)."""
        from compressor.data.workers import resolve_workers

        return resolve_workers(self.recipe.data.num_workers if self.recipe.data is not None else None)

    @property
    def dtype(self) -> str:
        return self.recipe.dtype
