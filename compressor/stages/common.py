"""Plain functions and the context every stage shares (no base classes: torchtune style)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import StageError

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
ADAPTER_SUBDIR = "adapter"


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
        exports: output folders of earlier export stages, in order.
        progress: whether to draw progress bars.
        last_trainable: parameters trained by the latest training stage (reported as
            ``params_trainable``).
    """

    recipe: Any
    index: int
    run_dir: Path
    device: str
    labels: dict[str, Path] = field(default_factory=dict)
    label_outputs: dict[str, Path] = field(default_factory=dict)
    exports: list[Path] = field(default_factory=list)
    progress: bool = True
    last_trainable: int = 0
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
    def dtype(self) -> str:
        return self.recipe.dtype


def model_dir(stage_out: Path) -> Path:
    """The model folder inside a model-producing stage's output folder."""
    return Path(stage_out) / MODEL_SUBDIR


def load_working_model(input_dir: Path, ctx: StageContext, *, with_adapter: bool = True, trainable: bool = False):
    """Load the current model (and its LoRA adapter, if the folder carries one).

    Args:
        input_dir: a model folder (``save_pretrained`` + processor, optionally ``adapter/``).
        ctx: the stage context (dtype, device).
        with_adapter: wrap with the adapter in ``input_dir/adapter`` when present.
        trainable: load the adapter trainable (continuing training).

    Returns:
        ``(model, processor)``: a BLIP-family model, or a ``PeftModel`` around one.
    """
    from compressor.models.loading import load_model

    model, processor = load_model(input_dir, dtype=ctx.dtype, device=ctx.device)
    adapter = Path(input_dir) / ADAPTER_SUBDIR
    if with_adapter and adapter.is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
        model.to(ctx.device)
    return model, processor


def save_model(model, processor, out: Path, extra_files: dict[str, str] | None = None, state_dict=None) -> Path:
    """``save_pretrained`` model (safetensors) and processor into ``out``; a width-pruned model also
    gets its ``shape_plan.json`` (:mod:`compressor.models.shapes`).

    Args:
        model: a BLIP-family model (not a peft wrapper).
        processor: its processor, or None.
        out: the folder (created).
        extra_files: name → text written beside (e.g. the resolved recipe).
        state_dict: the weights to save instead of ``model.state_dict()`` (the gathered full state
            dict after FSDP / DeepSpeed training).
    """
    from compressor.models.shapes import write_shape_plan

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    write_shape_plan(model, out)
    if processor is not None:
        processor.save_pretrained(out)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out


def link_base_model(input_dir: Path, out: Path) -> Path:
    """Make ``out`` the same model as ``input_dir`` by hard links (no copy), without its adapter."""
    from compressor.fileio import link_tree

    link_tree(input_dir, out, skip=(ADAPTER_SUBDIR,))
    return out


def has_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_SUBDIR / "adapter_config.json").is_file()
