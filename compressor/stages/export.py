"""``export``: write the current model as verified safetensors and/or a split ONNX export.

Output: ``safetensors/`` (save_pretrained folder + processor + ``recipe.resolved.yaml`` +
``SHA256SUMS``) and ``onnx/`` (graphs + ``validation.json``; with ``speculative``, the draft's
export in ``onnx/draft/``, named in ``export.json``, which ONNX Runtime captioning then uses to
give the model's own greedy captions faster). The run directory's ``onnx/`` is hard-linked from
the last export.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from compressor.models.folders import load_working_model
from compressor.recipe.schema import Dtype, StageBase, Strict
from compressor.stages import Declaration
from compressor.stages.evaluate import SpeculativeSpec, draft_spec

log = logging.getLogger(__name__)


class OnnxSpec(Strict):
    """ONNX export settings (split graphs: image_encoder, embed_tokens, decoder with past)."""

    opset: int | None = Field(None, ge=14, description="ONNX opset (default: 23 with the dynamo exporter, whose fused Attention and RMSNormalization need onnxruntime >= 1.23 on CPU, >= 1.26 on CUDA (grouped KV heads with a KV cache); the legacy exporter's own otherwise).")
    exporter: Literal["dynamo", "legacy"] = Field("dynamo", description="torch.onnx exporter.")
    optimize: bool = Field(True, description="Also save an ORT_ENABLE_ALL-optimised copy.")
    quantize: Literal["int8"] | None = Field(None, description="Dynamic int8 quantisation of the decoder (reported; the default variant).")
    variants: list[Literal["fp16", "int8", "int4"]] = Field(
        default_factory=list,
        description="Precision variants beside the fp32 graphs: fp16 (every graph), int8 / int4 (the decoder, ONNX Runtime "
        "MatMulNBits), each validated against PyTorch within `variant_tolerance` and listed in export.json; "
        "`evaluate: {backend: onnx, variant: …}` scores one.",
    )
    int4_block_size: int = Field(32, ge=16, description="Input channels per scale of the int4 variant (a power of 2).")
    variant_tolerance: dict[Literal["fp16", "int8", "int4"], float] | None = Field(
        None, description="Relative RMS error of the first output (logits) each variant may show against PyTorch "
        "(defaults: fp16 0.02, int8 0.15, int4 0.35)."
    )
    tolerance: float | None = Field(None, gt=0, description="Max abs difference ORT vs PyTorch (default 1e-4 fp32).")
    external_data: Literal["auto", "always", "never"] = Field("auto", description="External weights (auto: above 2 GB).")
    twin_check: bool = Field(
        True, description="bf16 exports (not runnable by ORT on CPU): check numbers on an fp32 twin (needs an fp32 copy in memory)."
    )
    isolate_graphs: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Export each graph in a fresh subprocess that memory-maps the model, so peak memory follows the "
        "largest graph, not the model (auto: checkpoint weights above 1 GB).",
    )


class ExportStage(StageBase):
    """Write the model as safetensors and/or ONNX, verified after writing."""

    type: Literal["export"]
    formats: list[Literal["safetensors", "onnx"]] = Field(
        default_factory=lambda: ["safetensors"], description="What to write."
    )
    dtype: Dtype | None = Field(None, description="Weights dtype of the export (default: the recipe's).")
    max_shard_size: str = Field("5GB", description="safetensors shard size, e.g. 500MB, 5GB.")
    onnx: OnnxSpec = Field(default_factory=OnnxSpec, description="ONNX settings.")
    speculative: SpeculativeSpec | None = Field(
        None,
        description="Bundle a draft with the ONNX export (`onnx/draft/`, named in export.json): `{draft: <label or folder>, "
        "num_draft_tokens: 4}`; ONNX Runtime captioning uses it (speculative decoding, the same greedy captions).",
    )

    @model_validator(mode="after")
    def _draft_needs_onnx(self):
        if self.speculative is not None and "onnx" not in self.formats:
            raise ValueError("speculative bundles a draft with the ONNX export: add onnx to formats")
        return self

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)", v.strip(), re.IGNORECASE):
            raise ValueError(f"expected a size such as 500MB or 5GB, got '{v}'")
        return v


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
        from exporters.onnx import OnnxOptions, export_onnx
        from exporters.onnx.export import export_onnx_with_draft

        opts = OnnxOptions.from_stage(cfg)
        opts.dtype = cfg.dtype or ctx.dtype
        extra = {"recipe.resolved.yaml": resolved} if resolved else None
        if cfg.speculative is not None:
            sp = cfg.speculative
            meta = export_onnx_with_draft(
                input_dir, out_dir / "onnx", opts, Path(draft_spec(cfg, ctx).path), sp.num_draft_tokens, sp.variant,
                device=ctx.device, extra_files=extra, min_confidence=sp.min_confidence,
            )
        else:
            meta = export_onnx(input_dir, out_dir / "onnx", opts, device=ctx.device, extra_files=extra)
        summary["onnx"] = {
            "graphs": {k: v["bytes"] for k, v in meta["graphs"].items()},
            "dtype": meta["dtype"],
            "quantized": meta["quantized"],
            "variants": {k: {v: r.get("relative_rms_error") for v, r in g.get("variants", {}).items()}
                         for k, g in meta["graphs"].items() if g.get("variants")},
            "seconds": meta["seconds"]["total"],
        }
        if meta.get("draft"):
            summary["onnx"]["draft"] = meta["draft"]
    return summary


def check_recipe(cfg, recipe) -> None:
    """Pre-flight without the model: a draft folder must be an export or a model folder."""
    from compressor.stages.evaluate import check_draft_path

    if cfg.speculative is not None:
        check_draft_path(cfg.speculative)


def card(record: dict):
    """The model card's line for an export that bundles a draft."""
    from compressor.stages import StageCard

    draft = ((record.get("summary") or {}).get("onnx") or {}).get("draft")
    if not draft:
        return StageCard()
    return StageCard(
        details=[
            f"bundles a speculative-decoding draft ({draft.get('source')}, {draft.get('num_draft_tokens')} tokens per target "
            "call) in onnx/draft/: ONNX Runtime captioning checks the draft's tokens and keeps the model's own greedy captions"
        ],
        tags=["speculative-decoding"],
    )


STAGE = Declaration(
    config=ExportStage,
    run=run,
    produces_model=False,
    needs_merged=True,
    output="export",
    references=lambda cfg: {"draft": (cfg.speculative.draft, ("speculative", "draft"))}
    if cfg.speculative is not None and not cfg.speculative.is_path
    else {},
    folders=lambda cfg: {"draft": cfg.speculative.draft} if cfg.speculative is not None and cfg.speculative.is_path else {},
    check_recipe=check_recipe,
    card=card,
)
