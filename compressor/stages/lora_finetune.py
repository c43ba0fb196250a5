"""``lora_finetune``: LoRA (Hu et al. 2021) through peft, trained on accelerate.

Output: ``model/`` = the input model (hard links) + ``model/adapter/`` (peft adapter), merged
later by ``merge_adapters``; ``matches.json`` (modules matched per ``parts`` entry and part);
``loss.json`` / ``loss.png``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from compressor.errors import UserInputError
from compressor.recipe.schema import LORA_PARTS, Dtype, LoraSpec, StageBase, Strict, TrainSpec, _check_names
from compressor.stages import Declaration, FieldProblem
from compressor.training_glue import train_data, trainable_of, training_card

log = logging.getLogger(__name__)


class QuantizationSpec(Strict):
    """A k-bit base for QLoRA (bitsandbytes; CUDA only)."""

    bits: Literal[4, 8] = Field(description="Load the base in 4 or 8 bits.")
    compute_dtype: Dtype = Field("bfloat16", description="Compute dtype of 4-bit layers.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit quantisation type.")


class LoraFinetuneStage(StageBase):
    """LoRA finetune with peft on accelerate; writes the adapter (merged by `merge_adapters`)."""

    type: Literal["lora_finetune"]
    parts: list[str] = Field(
        default_factory=list,
        description=f"Part-scoped targets, expanded to anchored module patterns: {', '.join(LORA_PARTS)}.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="peft LoraConfig keys.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training settings.")
    quantization: QuantizationSpec | None = Field(None, description="QLoRA: a 4/8-bit base (CUDA only).")

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: list[str]) -> list[str]:
        return _check_names(v, LORA_PARTS, "LoRA part")


def check_quantization(cfg, device: str) -> None:
    """QLoRA needs CUDA and bitsandbytes; exit 2 with a clear message otherwise."""
    if cfg.quantization is None:
        return
    if device != "cuda":
        raise UserInputError(
            f"QLoRA on {'an' if cfg.quantization.bits == 8 else 'a'} {cfg.quantization.bits}-bit base (bitsandbytes) needs a CUDA GPU and this run is "
            "on the CPU; remove `quantization:` (e.g. --set stages.N.quantization=null) to train LoRA on a full-precision base"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserInputError("QLoRA needs bitsandbytes, which is not installed: pip install bitsandbytes") from None


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Train a LoRA adapter on ``input_dir``'s model; see the module docstring for outputs.

    Raises:
        UserInputError: a ``parts`` entry matching no module, QLoRA without CUDA.
    """
    from compressor.fileio import atomic_write_json
    from compressor.lora import apply_lora, resolve_adapter
    from compressor.models.folders import ADAPTER_SUBDIR, link_base_model, load_working_model, model_dir
    from compressor.training import train
    from compressor.training_glue import adapter_saver, batch_maker, eval_hook, summary_of

    check_quantization(cfg, ctx.device)
    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    if cfg.quantization is not None:  # pragma: no cover - CUDA only
        model = _load_quantized(input_dir, cfg, ctx)
    if cfg.train.resume_from:
        from peft import PeftModel

        from compressor.families import family_for_model
        from compressor.lora import match_report

        family = family_for_model(model)
        adapter = resolve_adapter(cfg.train.resume_from)
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        report = {**match_report(model, family, []), "resumed_from": str(adapter)}
    else:
        model, report = apply_lora(model, cfg.lora, cfg.parts)
    log.info("LoRA matched %s; trainable %s of %s parameters", report.get("entries"), report.get("params_trainable"), report.get("params_total"))
    data = ctx.data(cfg.train.data)
    result = train(
        model,
        batch_maker(model, processor, ctx.recipe.generation.prompt, data),
        data.training_pairs(),
        cfg.train,
        seed=ctx.recipe.seed,
        device=ctx.device,
        out_dir=out_dir,
        evaluate=eval_hook(ctx, processor, cfg.train),
        save_checkpoint=adapter_saver,
        progress=ctx.progress,
        checkpoint_dir=ctx.checkpoint_dir,
    )
    out_model = link_base_model(input_dir, model_dir(out_dir))
    best = out_dir / "best"
    if result.best_step is not None and best.is_dir():
        shutil.move(str(best), str(out_model / ADAPTER_SUBDIR))
    else:
        model.save_pretrained(str(out_model / ADAPTER_SUBDIR), state_dict=result.extra.get("state_dict"))
    atomic_write_json(out_dir / "matches.json", report)
    return {**summary_of(result), "lora": report, "train_examples": len(data.training_pairs())}


def _load_quantized(input_dir, cfg, ctx):  # pragma: no cover - needs CUDA + bitsandbytes
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig, BitsAndBytesConfig

    from compressor.families import family_for_config

    q = cfg.quantization
    bnb = BitsAndBytesConfig(
        load_in_8bit=q.bits == 8,
        load_in_4bit=q.bits == 4,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_type=q.quant_type,
    )
    family = family_for_config(AutoConfig.from_pretrained(str(input_dir)))
    model = family.model_cls().from_pretrained(str(input_dir), quantization_config=bnb, device_map={"": 0})
    return prepare_model_for_kbit_training(model)


def check(cfg, pf) -> None:
    """Pre-flight: LoRA targets on the model's config, ``resume_from``, QLoRA's needs."""
    from compressor.lora import check_lora

    check_lora(pf.family, pf.config, cfg.lora, cfg.parts, cfg.train.resume_from)
    if cfg.quantization is not None:
        try:
            check_quantization(cfg, pf.device)
        except UserInputError as exc:
            raise FieldProblem(("quantization",), str(exc)) from None


def plan(cfg, pc) -> dict:
    from compressor.lora import plan_lora

    return plan_lora(pc.model, cfg.lora, cfg.parts)


STAGE = Declaration(
    config=LoraFinetuneStage,
    run=run,
    produces_model=True,
    trains=True,
    uses_generation=True,
    data=train_data,
    adapter=lambda cfg: "writes",
    needs_merged=True,
    trainable_params=trainable_of,
    check=check,
    plan=plan,
    card=training_card,
)
