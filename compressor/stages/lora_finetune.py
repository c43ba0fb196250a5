"""``lora_finetune``: LoRA (Hu et al. 2021) through peft, trained on accelerate.

Output: ``model/`` = the input model (hard links) + ``model/adapter/`` (peft adapter), merged
later by ``merge_adapters``; ``matches.json`` (modules matched per ``parts`` entry and part);
``loss.json`` / ``loss.png``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from compressor.errors import UserInputError
from compressor.fileio import atomic_write_json
from compressor.lora import apply_lora
from compressor.stages.common import ADAPTER_SUBDIR, link_base_model, load_working_model, model_dir
from compressor.stages.trainer_glue import adapter_saver, batch_maker, eval_hook, summary_of
from compressor.training import train

log = logging.getLogger(__name__)

PRODUCES_MODEL = True


def data_sections(cfg) -> list[str]:
    return [cfg.train.data] + (["val"] if cfg.train.eval_every else [])


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


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder to resume from: ``path`` itself, or its ``adapter/`` (a stage's ``model/``).

    Raises:
        UserInputError: no ``adapter_config.json`` there.
    """
    p = Path(path).expanduser()
    for cand in (p, p / ADAPTER_SUBDIR, p / "model" / ADAPTER_SUBDIR):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise UserInputError(
        f"train.resume_from: {path} holds no LoRA adapter (adapter_config.json); point it at an adapter folder or "
        "at a lora_finetune stage's model/ folder"
    )


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Train a LoRA adapter on ``input_dir``'s model; see the module docstring for outputs.

    Raises:
        UserInputError: a ``parts`` entry matching no module, QLoRA without CUDA.
    """
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
        batch_maker(model, processor, ctx.recipe.generation.prompt),
        data.training_pairs(),
        cfg.train,
        seed=ctx.recipe.seed,
        device=ctx.device,
        out_dir=out_dir,
        evaluate=eval_hook(ctx, processor, cfg.train),
        save_checkpoint=adapter_saver,
        progress=ctx.progress,
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
