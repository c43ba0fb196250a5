"""``quantize``: integer weights for the linear layers of chosen parts (RTN; GPTQ through a kept library).

Runs after removal and healing: "remove 4 layers, heal, then 4-bit" is one recipe and one gate.
The maths is in :mod:`compressor.quantization`: round-to-nearest is ours; GPTQ (Frantar et al.
2023) is Intel Neural Compressor's implementation (the ``gptq`` extra); optionally a per-unit
sensitivity (KL of the next-token distribution over caption tokens, each unit quantized alone)
and a mixed-precision choice that keeps the most sensitive units at ``keep_sensitive.bits``.

The model is saved in the compressed-tensors ``pack-quantized`` format (vLLM's native format;
plain ``transformers`` loads it with the ``compressed-tensors`` package, the ``quant`` extra).
After saving, the folder is reloaded and its logits must equal the in-memory quantized model's
within :data:`~compressor.quantization.RELOAD_TOLERANCE` (scaled by max(1, |logits|)), and
every tensor outside the quantized linears must be bit-identical to the input's, or the stage
fails. Later stages see the dequantized weights; ``export`` writes the same integers again.

Output: ``model/``; ``quantization.json`` (scheme per part and per module, bytes before and
after, the KL of the whole quantized model on the calibration batches); with ``sensitivity``,
``sensitivity.json`` (per unit KL, the mixed-precision trials and choice) and ``sensitivity.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from compressor.errors import UserInputError
from compressor.recipe.schema import CalibrationSpec, StageBase, Strict, _check_names
from compressor.stages import Declaration, FieldProblem, StageCard

log = logging.getLogger(__name__)


class KeepSensitive(Strict):
    """Mixed precision: the most sensitive units stay at ``bits``."""

    max_kl: float | None = Field(None, gt=0, description="Keep the fewest units high so the whole model's KL (nats/token) is at most this.")
    fraction: float | None = Field(None, ge=0, le=1, description="Keep this share of the units (most sensitive first).")
    bits: Literal[4, 8] = Field(8, description="The higher precision.")

    @model_validator(mode="after")
    def _one(self) -> KeepSensitive:
        if (self.max_kl is None) == (self.fraction is None):
            raise ValueError("give exactly one of max_kl, fraction")
        return self


class GptqSpec(Strict):
    damp: float = Field(0.01, gt=0, lt=1, description="Hessian dampening: this share of its mean diagonal.")
    act_order: bool = Field(False, description="Quantize columns by decreasing Hessian diagonal (static groups).")
    positions: Literal["text", "all"] = Field(
        "text", description="Language-model positions whose inputs form the Hessian: text (not image tokens, not padding) "
        "or all.")


class QuantizeStage(StageBase):
    """Integer weights (2/3/4/8-bit, grouped) for chosen parts: RTN or GPTQ, optional mixed precision."""

    type: Literal["quantize"]
    parts: list[str] = Field(default_factory=lambda: ["language_model"], description="Parts whose linear layers are quantized.")
    bits: Literal[2, 3, 4, 8] = Field(4, description="Weight bits.")
    group_size: int | None = Field(128, ge=1, description="Input channels per scale (null: one scale per output channel).")
    symmetric: bool = Field(True, description="Symmetric grid (no zero points). `false` is refused: transformers cannot "
                            "reload asymmetric pack-quantized checkpoints yet (llm-compressor#1618).")
    observer: Literal["minmax", "mse"] = Field(
        "minmax", description="How scales are chosen (compressed-tensors' term): minmax, the group's full range; mse, each "
        "group's clipping range searched for the least rounding error (the GPTQ reference's mse search; GPTQ's own option).")
    method: Literal["rtn", "gptq"] = Field("rtn", description="rtn (round to nearest) or gptq (Intel Neural Compressor; the gptq extra).")
    gptq: GptqSpec = Field(default_factory=GptqSpec, description="GPTQ settings.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Batches for gptq and sensitivity.")
    sensitivity: bool = Field(False, description="Measure each unit's KL alone (sensitivity.json, sensitivity.png).")
    granularity: Literal["layer", "module"] = Field("layer", description="Sensitivity unit: a stack layer's linears, or each linear.")
    keep_sensitive: KeepSensitive | None = Field(None, description="Mixed precision (implies sensitivity).")
    lm_head: bool = Field(False, description="Also quantize the output projection (kept by default; must not be tied).")
    ignore: list[str] = Field(default_factory=list, description="Glob patterns over module names left unquantized.")

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: list[str]) -> list[str]:
        from compressor.families import part_names

        if not v:
            raise ValueError("name at least one part")
        return _check_names(v, part_names(), "part")

    @field_validator("symmetric")
    @classmethod
    def _symmetric(cls, v: bool) -> bool:
        if not v:
            raise ValueError(
                "symmetric: false (zero points) is refused: the compressed-tensors pack-quantized format packs the "
                "zero points, and transformers (5.x, with compressed-tensors 0.20) initialises them unpacked, so the "
                "saved model would not reload (upstream: vllm-project/llm-compressor#1618, compressed-tensors#458). "
                "Remove the field (symmetric grid), or keep the most sensitive layers at 8 bits with keep_sensitive")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeStage:
        if self.keep_sensitive is not None and self.keep_sensitive.bits <= self.bits:
            raise ValueError(f"keep_sensitive.bits ({self.keep_sensitive.bits}) must be higher than bits ({self.bits})")
        return self


def _calibrated(cfg) -> bool:
    return cfg.method == "gptq" or cfg.sensitivity or cfg.keep_sensitive is not None


def data(cfg) -> dict[str, int | None]:
    return {cfg.calibration.data: None} if _calibrated(cfg) else {}


def _schemes(cfg):
    from compressor.quantization import Scheme

    clip = cfg.observer == "mse"
    low = Scheme(cfg.bits, cfg.group_size, cfg.symmetric, clip=clip)
    high = Scheme(cfg.keep_sensitive.bits, cfg.group_size, cfg.symmetric, clip=clip) if cfg.keep_sensitive else None
    return low, high


_WIDTH_PRUNED = ("quantize: the model is width-pruned (prune_width); its shape plan and the compressed-tensors format "
                 "are not combined yet. Quantize a model pruned by remove_layers, or export it unquantized")


def _refuse_quantized(folder: Path) -> None:
    from compressor.quantization import quantization_config_of

    q = quantization_config_of(folder)
    if q is not None:
        raise UserInputError(
            f"quantize: {folder} is already quantized ({q.get('quant_method', 'quantized')}); quantizing it again would "
            "round rounded weights. Quantize the full-precision model (the output of the stage before the first quantize)"
        )


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Quantize; see the module docstring.

    Raises:
        UserInputError: an already-quantized input, a part the family lacks, a group size that does
            not divide a layer, a library that is not installed (all before anything is written).
        VerificationError: the saved folder does not reload to the same logits, or a tensor outside
            the quantized linears changed.
    """
    from compressor.families import family_for_model
    from compressor.fileio import atomic_write_json
    from compressor.models.folders import load_working_model, model_dir
    from compressor.quantization import (
        check_group_size,
        choose_high_precision,
        kl_from,
        linear_targets,
        next_token_logprobs,
        plot_sensitivity,
        quantize_modules,
        require_gptq,
        require_storage,
        save_quantized,
        sensitivity,
        unit_of,
    )
    from compressor.stages.merge_adapters import logits_of, probe_batch

    _refuse_quantized(input_dir)
    from compressor.models.shapes import SHAPE_PLAN

    if (Path(input_dir) / SHAPE_PLAN).is_file():
        raise UserInputError(_WIDTH_PRUNED)
    require_storage()
    if cfg.method == "gptq":
        require_gptq()
    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    targets = linear_targets(model, family, cfg.parts, cfg.lm_head, cfg.ignore)
    check_group_size(model, targets, cfg.group_size)
    low, high = _schemes(cfg)
    batches, ref = [], None
    if _calibrated(cfg):
        from compressor.importance import calibration_batches

        batches = calibration_batches(model, processor, ctx.data(cfg.calibration.data), cfg.calibration,
                                      ctx.recipe.generation.prompt, ctx.device)
        ref = next_token_logprobs(model, batches, family.decoder_only)
    assign = {n: low for n in targets}
    sens: dict | None = None
    if cfg.sensitivity or cfg.keep_sensitive is not None:
        scores = sensitivity(model, assign, family, batches, cfg.granularity)
        kept, trials = [], []
        if cfg.keep_sensitive is not None:
            ks = cfg.keep_sensitive
            kept, trials = choose_high_precision(model, assign, high, scores, family, batches, cfg.granularity,
                                                 max_kl=ks.max_kl, fraction=ks.fraction)
            for n in targets:
                if (unit_of(n, family) if cfg.granularity == "layer" else n) in set(kept):
                    assign[n] = high
        sens = {"granularity": cfg.granularity, "bits": cfg.bits, "estimated_with": "rtn", "data": cfg.calibration.data,
                "batches": len(batches), "kl": scores, "ranking": sorted(scores, key=lambda u: -scores[u]),
                "keep_sensitive": cfg.keep_sensitive.model_dump() if cfg.keep_sensitive else None,
                "kept_high": kept, "units": len(scores), "trials": trials}
    done = quantize_modules(model, assign, cfg.method, family, batches, cfg.gptq.damp, cfg.gptq.act_order,
                            cfg.gptq.positions)
    kl = kl_from(ref, model, batches, family.decoder_only) if ref is not None else None
    probe = probe_batch(model, processor)
    want = logits_of(model, probe)
    out_model = save_quantized(model, processor, model_dir(out_dir), done)
    del model
    diff = _verify(input_dir, out_model, ctx, probe, want, set(targets))
    record = _record(cfg, family, targets, assign, done, kl, diff, input_dir, out_model)
    if sens is not None:
        sens["kl_whole_model"] = kl
        sens["met"] = None if cfg.keep_sensitive is None or cfg.keep_sensitive.max_kl is None else (
            kl is not None and kl <= cfg.keep_sensitive.max_kl)
        atomic_write_json(out_dir / "sensitivity.json", sens)
        plot_sensitivity(sens["kl"], sens["kept_high"], out_dir / "sensitivity.png")
    atomic_write_json(out_dir / "quantization.json", record)
    log.info("quantize: %d linears of %s to %s by %s; %.2f → %.2f MB; KL %s", len(done), ", ".join(cfg.parts),
             low.describe(), cfg.method, record["size_mb_before"], record["size_mb_after"], kl)
    return {k: record[k] for k in ("method", "schemes", "modules", "high_precision_modules", "kl", "size_mb_before",
                                   "size_mb_after", "reload_max_abs_diff")}


def _verify(input_dir: Path, out_model: Path, ctx, probe, want, targets: set[str]) -> float:
    """Reload the saved folder (logits within tolerance) and compare every other tensor bit for bit.

    Raises:
        VerificationError: either check fails.
    """
    import torch

    from compressor.errors import VerificationError
    from compressor.models.loading import load_model
    from compressor.quantization import RELOAD_TOLERANCE, RELOAD_TOLERANCE_16
    from compressor.stages.merge_adapters import logits_of
    from exporters.safetensors_export import saved_tensors

    reloaded, _ = load_model(out_model, dtype=ctx.dtype, device=ctx.device, with_processor=False)
    got = logits_of(reloaded, probe)
    del reloaded
    diff = float((got - want).abs().max())
    tol = RELOAD_TOLERANCE if ctx.dtype in (None, "float32") else RELOAD_TOLERANCE_16
    if not diff <= tol * max(1.0, float(want.abs().max())):
        raise VerificationError(f"quantize: the saved folder reloads with logits off by {diff:.3g} (tolerance {tol:g} scaled)")
    quantized = {f"{t}.{leaf}" for t in targets for leaf in ("weight", "weight_packed", "weight_scale", "weight_shape",
                                                              "weight_zero_point")}
    out = dict(saved_tensors(out_model))
    for k, t in saved_tensors(input_dir):
        if k in quantized:
            continue
        o = out.get(k)
        if o is not None and o.dtype != t.dtype:
            continue  # the working dtype differs from the input's saved dtype: not comparable bit for bit
        if o is None or not torch.equal(o, t):
            raise VerificationError(f"quantize: {k} is not quantized but changed (or is missing) in the saved folder")
    return diff


def _record(cfg, family, targets, assign, done, kl, diff, input_dir: Path, out_model: Path) -> dict:
    from compressor.fileio import dir_size_mb

    per_part: dict[str, dict[str, int]] = {}
    for n, part in targets.items():
        d = per_part.setdefault(part, {})
        key = assign[n].describe()
        d[key] = d.get(key, 0) + 1
    weights = lambda p: sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) / 1e6  # noqa: E731
    return {
        "method": cfg.method,
        "observer": cfg.observer,
        "library": _library(cfg.method),
        "format": "compressed-tensors pack-quantized",
        "schemes": {part: ", ".join(f"{c} × {k}" for k, c in d.items()) for part, d in per_part.items()},
        "modules": len(done),
        "high_precision_modules": sum(1 for n in targets if assign[n].bits != cfg.bits),
        "per_module": {n: {"part": targets[n], "bits": assign[n].bits, "group_size": assign[n].group_size,
                           "symmetric": assign[n].symmetric} for n in targets},
        "kept": {"lm_head": cfg.lm_head, "ignore": cfg.ignore, "embeddings": "kept (not linear layers)"},
        "kl": kl,
        "reload_max_abs_diff": diff,
        "size_mb_before": round(weights(input_dir), 4),
        "size_mb_after": round(weights(out_model), 4),
        "folder_mb_after": round(dir_size_mb(out_model), 4),
    }


def _library(method: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    lib = {"compressed-tensors": v("compressed-tensors")}
    if method == "gptq":
        lib["neural-compressor-pt"] = v("neural-compressor-pt")
    return lib


def check(cfg, pf) -> None:
    """Pre-flight: nothing quantized before it, no model-changing stage after it, the parts exist,
    the group size divides every targeted layer, the libraries are installed."""
    from compressor.quantization import check_group_size, linear_targets, require_gptq, require_storage
    from compressor.stages import declaration

    stages = list(getattr(pf.recipe, "stages", []) or [])
    if any(st.type == "quantize" for st in stages[: pf.index]):
        raise UserInputError("quantize: an earlier stage already quantizes the model; quantizing it again would round "
                             "rounded weights. Use one quantize stage (mixed precision: keep_sensitive)")
    if any(st.type == "prune_width" for st in stages[: pf.index]):
        raise UserInputError(_WIDTH_PRUNED)
    later = [(i, st.type) for i, st in enumerate(stages) if i > pf.index and declaration(st.type).produces_model]
    if later:
        i, t = later[0]
        raise UserInputError(
            f"quantize: stage {i} ({t}) after it would change the quantized model and save it in full precision; "
            "quantize must be the last stage that changes the model (put it after removal, healing and merging)"
        )
    q = getattr(pf.config, "quantization_config", None) if pf.config is not None else None
    if q:
        raise UserInputError("quantize: the model is already quantized (its config has a quantization_config); "
                             "start from the full-precision model")
    try:
        require_storage()
    except UserInputError as exc:
        raise FieldProblem(("type",), str(exc)) from None
    if cfg.method == "gptq":
        try:
            require_gptq()
        except UserInputError as exc:
            raise FieldProblem(("method",), str(exc)) from None
    if pf.config is None or pf.family is None:
        return
    from compressor.models.shapes import meta_skeleton

    model = meta_skeleton(pf.config)
    try:
        targets = linear_targets(model, pf.family, cfg.parts, cfg.lm_head, cfg.ignore)
    except UserInputError as exc:
        raise FieldProblem(("parts",), str(exc)) from None
    try:
        check_group_size(model, targets, cfg.group_size)
    except UserInputError as exc:
        raise FieldProblem(("group_size",), str(exc)) from None
    if cfg.lm_head and getattr(pf.config, "tie_word_embeddings", False) or (
        cfg.lm_head and getattr(getattr(pf.config, "text_config", None), "tie_word_embeddings", False)
    ):
        raise FieldProblem(("lm_head",), "quantize: the output projection is tied to the input embeddings; quantizing "
                           "it would untie them (and the embeddings stay full precision). Leave lm_head: false")


def plan(cfg, pc) -> dict:
    """Bytes of the quantized linears (bits × parameters + scales and zero points) for ``size_mb``."""
    from compressor.quantization import check_group_size, linear_targets, quantized_bytes

    targets = linear_targets(pc.model, pc.family, cfg.parts, cfg.lm_head, cfg.ignore)
    check_group_size(pc.model, targets, cfg.group_size)
    low, high = _schemes(cfg)
    for n in targets:
        m = pc.model.get_submodule(n)
        pc.weight_bytes[n] = quantized_bytes(m.out_features, m.in_features, low, pc.dtype_bytes)
    if cfg.keep_sensitive is not None:
        pc.notes.append(
            f"stage {pc.index}: quantize counts every targeted linear at {cfg.bits} bits; keep_sensitive keeps the most "
            f"sensitive at {high.bits} bits, chosen on calibration data at run time"
        )
    return {"quantized": {p: low.describe() for p in cfg.parts}, "modules": len(targets)}


def card(record: dict) -> StageCard:
    s = record.get("summary") or {}
    schemes = s.get("schemes") or {}
    return StageCard(
        details=[f"{p}: {d} ({s.get('method')})" for p, d in schemes.items()],
        tags=["quantized", "compressed-tensors"],
        limitations=[
            f"Weights quantized ({s.get('method')}): " + "; ".join(f"{p}: {d}" for p, d in schemes.items())
            + ". Stored in the compressed-tensors pack-quantized format: loading with transformers needs the "
            "compressed-tensors package; vLLM serves this format. Quantization error is not recovered by training."
        ],
    )


STAGE = Declaration(
    config=QuantizeStage,
    run=run,
    produces_model=True,
    data=data,
    needs_merged=True,
    check=check,
    plan=plan,
    card=card,
)
