"""``heal``: brief retraining after removal; cross-entropy or knowledge distillation.

``loss: distill`` follows Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network"):
``ce_weight · CE(student, caption) + kl_weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T))``
over the caption's target tokens, the teacher being an earlier stage's model named by label
(its cache key is part of this stage's key). ``trainable: lora`` writes an adapter that a
following ``merge_adapters`` merges; ``full`` / ``parts`` write the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from compressor.errors import UserInputError
from compressor.recipe.schema import (
    LORA_PARTS,
    TRAINABLE_PARTS,
    LoraSpec,
    StageBase,
    Strict,
    TrainSpec,
    _check_names,
)
from compressor.stages import Declaration
from compressor.training_glue import train_data, trainable_of, training_card

log = logging.getLogger(__name__)


class DistillSpec(Strict):
    """Knowledge distillation from an earlier stage's model (Hinton et al. 2015)."""

    teacher: str = Field(description="Label of an earlier stage whose model is the teacher.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL term.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(teacher || student) * T^2.")
    ce_weight: float = Field(0.5, ge=0, description="Weight of the caption cross-entropy.")


class HealStage(StageBase):
    """Brief retraining after removal: LoRA, full or per-part; cross-entropy or distillation."""

    type: Literal["heal"]
    trainable: Literal["lora", "full", "parts"] = Field("lora", description="What trains.")
    parts: list[str] = Field(
        default_factory=list,
        description="trainable=lora: LoRA parts (as lora_finetune); trainable=parts: parts to train.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="peft LoraConfig keys (trainable=lora).")
    loss: Literal["ce", "distill"] = Field("ce", description="Cross-entropy on captions, or distillation.")
    distill: DistillSpec | None = Field(None, description="Teacher and weights (loss=distill).")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(steps=100), description="Training settings.")

    @model_validator(mode="after")
    def _consistent(self) -> HealStage:
        if self.loss == "distill" and self.distill is None:
            raise ValueError("loss: distill needs `distill: {teacher: <label>}`")
        if self.loss == "ce" and self.distill is not None:
            raise ValueError("`distill` is set but loss is ce: set `loss: distill` or remove `distill`")
        if self.trainable == "lora":
            _check_names(self.parts, LORA_PARTS, "LoRA part")
        elif self.trainable == "parts":
            if not self.parts:
                raise ValueError("trainable: parts needs `parts: [...]`")
            _check_names(self.parts, TRAINABLE_PARTS, "part")
        return self


def distill_loss(teacher, family, temperature: float, kl_weight: float, ce_weight: float):
    """A ``loss_fn(model, batch)`` mixing caption cross-entropy with KL to the teacher's distributions.

    Token positions: those with a label (``labels != -100``); for causal LMs the logits at
    position t predict token t+1, so logits ``[:, :-1]`` pair with labels ``[:, 1:]``.
    """
    import torch
    import torch.nn.functional as F

    shift = family.decoder_only

    def loss_fn(model, batch):
        out = model(**batch)
        labels = batch["labels"]
        s = out.logits[:, -labels.shape[1]:, :]
        if next(teacher.parameters()).device != labels.device:  # one device per process under accelerate
            teacher.to(labels.device)
        with torch.no_grad():
            t = teacher(**batch).logits[:, -labels.shape[1]:, :]
        lab = labels
        if shift:
            s, t, lab = s[:, :-1], t[:, :-1], labels[:, 1:]
        mask = lab != -100
        s_m, t_m = s[mask].float(), t[mask].float()
        if s_m.shape[-1] != t_m.shape[-1]:
            raise UserInputError("distill: teacher and student have different vocabularies")
        kl = F.kl_div(F.log_softmax(s_m / temperature, -1), F.log_softmax(t_m / temperature, -1), log_target=True, reduction="batchmean")
        ce = out.loss
        loss = ce_weight * ce + kl_weight * temperature**2 * kl
        return loss, {"ce": float(ce.detach()), "kl": float(kl.detach())}

    return loss_fn


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Heal; see the module docstring.

    Raises:
        UserInputError: unknown teacher label, LoRA parts matching nothing.
    """
    from compressor.families import family_for_model
    from compressor.lora import apply_lora, freeze_all_but
    from compressor.models.folders import (
        ADAPTER_SUBDIR,
        link_base_model,
        load_working_model,
        model_dir,
        save_model,
    )
    from compressor.training import default_loss, train
    from compressor.training_glue import adapter_saver, batch_maker, eval_hook, summary_of

    model, processor = load_working_model(input_dir, ctx, with_adapter=False)
    family = family_for_model(model)
    report: dict = {}
    if cfg.trainable == "lora" and cfg.train.resume_from:
        from peft import PeftModel

        from compressor.lora import match_report, resolve_adapter

        adapter = resolve_adapter(cfg.train.resume_from)
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        report = {**match_report(model, family, []), "resumed_from": str(adapter)}
    elif cfg.trainable == "lora":
        model, report = apply_lora(model, cfg.lora, cfg.parts)
    elif cfg.train.resume_from:
        raise UserInputError("heal: train.resume_from continues a LoRA adapter; it needs trainable: lora")
    else:
        n = freeze_all_but(model, family, None if cfg.trainable == "full" else cfg.parts)
        report = {"params_trainable": n, "params_total": sum(p.numel() for p in model.parameters())}
    loss_fn = default_loss
    if cfg.loss == "distill":
        teacher_dir = ctx.labels.get(cfg.distill.teacher)
        if teacher_dir is None:
            raise UserInputError(f"heal: no model is labelled '{cfg.distill.teacher}' before this stage")
        from compressor.models.loading import load_model

        teacher, _ = load_model(teacher_dir, dtype=ctx.dtype, device=ctx.device, with_processor=False)
        for p in teacher.parameters():
            p.requires_grad_(False)
        loss_fn = distill_loss(teacher, family, cfg.distill.temperature, cfg.distill.kl_weight, cfg.distill.ce_weight)
    data = ctx.data(cfg.train.data)
    pairs = data.training_pairs()
    saver = adapter_saver if cfg.trainable == "lora" else (lambda m, d: save_model(m, processor, d))
    result = train(
        model,
        batch_maker(model, processor, ctx.recipe.generation.prompt, data),
        pairs,
        cfg.train,
        seed=ctx.recipe.seed,
        device=ctx.device,
        out_dir=out_dir,
        loss_fn=loss_fn,
        evaluate=eval_hook(ctx, processor, cfg.train),
        save_checkpoint=saver,
        progress=ctx.progress,
        checkpoint_dir=ctx.checkpoint_dir,
    )
    best = out_dir / "best"
    use_best = result.best_step is not None and best.is_dir()
    if cfg.trainable == "lora":
        out_model = link_base_model(input_dir, model_dir(out_dir))
        if use_best:
            best.rename(out_model / ADAPTER_SUBDIR)
        else:
            model.save_pretrained(str(out_model / ADAPTER_SUBDIR), state_dict=result.extra.get("state_dict"))
    elif use_best:
        best.rename(model_dir(out_dir))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        save_model(model, processor, model_dir(out_dir), state_dict=result.extra.get("state_dict"))
    return {**summary_of(result), "trainable": report, "loss": cfg.loss, "train_examples": len(pairs)}


def check(cfg, pf) -> None:
    """Pre-flight: LoRA targets (trainable: lora) on the model's config, and ``resume_from``."""
    from compressor.lora import check_lora, resolve_adapter

    if cfg.trainable == "lora":
        check_lora(pf.family, pf.config, cfg.lora, cfg.parts, cfg.train.resume_from)
    elif cfg.train.resume_from:
        resolve_adapter(cfg.train.resume_from)


def plan(cfg, pc) -> dict:
    from compressor.lora import plan_freeze, plan_lora

    if cfg.trainable == "lora":
        return plan_lora(pc.model, cfg.lora, cfg.parts)
    return plan_freeze(pc.model, pc.family, None if cfg.trainable == "full" else cfg.parts)


def card(record: dict):
    c = training_card(record)
    c.tags = ["lora"] + (["distillation"] if (record.get("summary") or {}).get("loss") == "distill" else [])
    return c


STAGE = Declaration(
    config=HealStage,
    run=run,
    produces_model=True,
    trains=True,
    uses_generation=True,
    data=train_data,
    references=lambda cfg: {"teacher": (cfg.distill.teacher, ("distill", "teacher"))} if cfg.distill is not None else {},
    adapter=lambda cfg: "writes" if cfg.trainable == "lora" else None,
    needs_merged=True,
    trainable_params=trainable_of,
    check=check,
    plan=plan,
    card=card,
)
