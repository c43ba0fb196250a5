"""``export``: write the current model as verified safetensors and/or a split ONNX export.

Output: ``safetensors/`` (save_pretrained folder + processor + ``recipe.resolved.yaml`` +
``SHA256SUMS``) and ``onnx/`` (graphs + ``validation.json``). The run directory's ``onnx/``
is hard-linked from the last export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.stages.common import load_working_model

log = logging.getLogger(__name__)

PRODUCES_MODEL = False


def data_sections(cfg) -> list[str]:
    return []


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Export; see the module docstring.

    Raises:
        VerificationError: a written artifact failed its check.
    """
    from exporters.safetensors_export import export_safetensors

    summary: dict = {}
    resolved = (ctx.run_dir / "recipe.resolved.yaml").read_text() if (ctx.run_dir / "recipe.resolved.yaml").is_file() else ""
    if "safetensors" in cfg.formats:
        model, processor = load_working_model(input_dir, ctx, with_adapter=False)
        info = export_safetensors(
            model,
            processor,
            out_dir / "safetensors",
            dtype=cfg.dtype,
            max_shard_size=cfg.max_shard_size,
            extra_files={"recipe.resolved.yaml": resolved} if resolved else None,
        )
        summary["safetensors"] = {k: v for k, v in info.items() if k != "files"}
    if "onnx" in cfg.formats:
        from exporters.onnx_export import OnnxOptions, export_onnx

        opts = OnnxOptions.from_stage(cfg)
        opts.dtype = cfg.dtype or ctx.dtype
        meta = export_onnx(
            input_dir,
            out_dir / "onnx",
            opts,
            device=ctx.device,
            extra_files={"recipe.resolved.yaml": resolved} if resolved else None,
        )
        summary["onnx"] = {
            "graphs": {k: v["bytes"] for k, v in meta["graphs"].items()},
            "dtype": meta["dtype"],
            "quantized": meta["quantized"],
            "seconds": meta["seconds"]["total"],
        }
    return summary
