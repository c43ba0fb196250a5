"""Model folders as stages read and write them: ``model/`` (+ ``adapter/``), loaded and saved.

Plain functions (no base classes: torchtune style). A model-producing stage writes its model to
``<stage folder>/model`` (``save_pretrained`` + processor, a width-pruned model's shape plan),
and a LoRA stage adds ``model/adapter`` beside hard links of its input.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
ADAPTER_SUBDIR = "adapter"


def model_dir(stage_out: Path) -> Path:
    """The model folder inside a model-producing stage's output folder."""
    return Path(stage_out) / MODEL_SUBDIR


def load_working_model(input_dir: Path, ctx, *, with_adapter: bool = True, trainable: bool = False):
    """Load the current model (and its LoRA adapter, if the folder carries one).

    Args:
        input_dir: a model folder (``save_pretrained`` + processor, optionally ``adapter/``).
        ctx: the stage context (its ``dtype`` and ``device``).
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
