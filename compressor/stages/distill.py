"""``distill``: train a new, smaller student (any family) on an earlier stage's model, the teacher.

Sequence-level knowledge distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"):
the teacher (the model of an earlier stage, by label: a LoRA-tuned ``baseline``) captions every
training image once with the recipe's decoding settings, and the student learns those captions
as targets, mixed with the human captions by a weight::

    loss = (1 − w) · CE(student, teacher captions) + w · CE(student, human captions)

(each term a token-mean over its rows, in expectation over the shuffled batches; ``w`` is
``ground_truth_weight``). With ``token_kd`` it adds Hinton et al.'s (2015) token-level term
``kl_weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the target tokens, as
``heal`` does; that needs the teacher and the student to share one tokenizer (the same
vocabulary: the same id means the same token) and is refused before anything runs otherwise.

The teacher's captions are cached under ``runs/<name>/cache/teacher-captions/`` by the teacher's
key (its stage key: config, input, data, versions), the data's fingerprint and the decoding
settings, so a rerun with another student or other training settings does not caption again.
The student (``student:``: a preset, a folder, ``{config: …}``, ``{assemble: …}``, a Hub id) is
materialised like the recipe's ``model:`` and becomes the model the following stages work on
(heal, quantize, export, evaluate); the gate then compares it with the teacher's evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from compressor.errors import UserInputError
from compressor.recipe.schema import TRAINABLE_PARTS, ModelSpec, StageBase, Strict, TrainSpec, _check_names
from compressor.stages import Declaration, FieldProblem
from compressor.training_glue import train_data, trainable_of, training_card

log = logging.getLogger(__name__)

#: Where the teacher's captions are cached, under the run directory.
CACHE_DIR = Path("cache") / "teacher-captions"
#: Batch keys of the teacher's own layout of the rows (token-level KD).
TEACHER_PREFIX = "teacher."


class TokenKDSpec(Strict):
    """Token-level distillation (Hinton et al. 2015) on top of the sequence-level targets."""

    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL term.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(teacher || student) · T².")


class DistillStage(StageBase):
    """Distil an earlier stage's model (the teacher) into a new student model of any family."""

    type: Literal["distill"]
    teacher: str = Field(description="Label of an earlier stage whose model is the teacher.")
    student: ModelSpec = Field(
        description="The student: a preset, a local folder, {config: FILE, init: random}, {assemble: {…}} or a Hub id; "
        "it replaces the model for the following stages."
    )
    ground_truth_weight: float = Field(
        0.0, ge=0, le=1, description="Weight w of the human captions: (1 − w)·CE(teacher captions) + w·CE(human captions)."
    )
    token_kd: TokenKDSpec | None = Field(
        None, description="Also match the teacher's token distributions (needs the same tokenizer in both models)."
    )
    trainable: Literal["full", "parts"] = Field("full", description="Train the whole student, or only `parts`.")
    parts: list[str] = Field(default_factory=list, description="trainable=parts: the student's parts to train.")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(steps=200), description="Training settings.")

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: list[str]) -> list[str]:
        return _check_names(v, TRAINABLE_PARTS, "part")

    @model_validator(mode="after")
    def _consistent(self) -> DistillStage:
        if self.trainable == "parts" and not self.parts:
            raise ValueError("trainable: parts needs `parts: [...]`")
        if self.ground_truth_weight == 1.0 and self.token_kd is None:
            raise ValueError("ground_truth_weight: 1.0 leaves nothing of the teacher: lower it or add `token_kd`")
        return self


# --------------------------------------------------------------------------------------------
# Teacher captions (generated once, cached by teacher key + data fingerprint + decoding)
# --------------------------------------------------------------------------------------------


def example_key(ex) -> str:
    """One teacher caption per image (captioning) or per question (VQA)."""
    return (ex.question_id or ex.image_id) if ex.question is not None else ex.image_id


def teacher_captions(teacher_dir: Path, teacher_key: str, data, ctx) -> tuple[dict[str, str], dict]:
    """The teacher's caption of every example of ``data``, from the cache or generated and cached.

    Returns:
        ``({example key: caption}, info)``; info: ``cache`` (path), ``hit`` (bool), ``captions``.
    """
    from compressor.evaluation.captioner import TorchCaptioner, prompt_fn
    from compressor.fileio import atomic_write_json
    from compressor.models.loading import load_model

    gen = ctx.recipe.generation.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps([teacher_key, data.fingerprint, gen, ctx.dtype], sort_keys=True).encode()).hexdigest()
    path = ctx.run_dir / CACHE_DIR / f"{digest[:16]}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        log.info("distill: %d teacher captions from %s", len(cached["captions"]), path)
        return cached["captions"], {"cache": str(path), "hit": True, "captions": len(cached["captions"])}
    teacher, processor = load_model(teacher_dir, dtype=ctx.dtype, device=ctx.device)
    cap = TorchCaptioner(teacher, processor, ctx.recipe.generation, ctx.device)
    prompt = prompt_fn(ctx.recipe.generation)
    todo = list({example_key(ex): ex for ex in data}.items())
    captions: dict[str, str] = {}
    bs = ctx.recipe.generation.batch_size
    for i in range(0, len(todo), bs):
        chunk = todo[i : i + bs]
        out = cap.caption([ex.load_image() for _, ex in chunk], [prompt(ex) for _, ex in chunk])
        captions.update({k: c for (k, _), c in zip(chunk, out)})
    del teacher
    atomic_write_json(path, {"teacher_key": teacher_key, "data": data.fingerprint, "generation": gen, "captions": captions})
    log.info("distill: the teacher captioned %d examples (cached in %s)", len(captions), path)
    return captions, {"cache": str(path), "hit": False, "captions": len(captions)}


def weighted_pairs(data, captions: dict[str, str], w: float) -> list:
    """Training pairs ``(example, (target, row weight))``: teacher captions and (w > 0) human captions.

    Row weights make the token-mean loss over shuffled batches ``(1 − w)·teacher + w·human`` in
    expectation whatever the two counts: ``(1 − w)·N/N_teacher`` and ``w·N/N_human``.
    """
    teacher = [] if w >= 1.0 else [(ex, captions[example_key(ex)]) for ex in {example_key(e): e for e in data}.values()]
    human = data.training_pairs() if w > 0 else []
    n = len(teacher) + len(human)
    out = [(ex, (t, (1 - w) * n / len(teacher))) for ex, t in teacher if t.strip()]
    out += [(ex, (t, w * n / len(human))) for ex, t in human]
    return out


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _target_positions(logits, labels, shift: bool):
    """``(logits, labels)`` aligned so that ``logits[:, t]`` predicts ``labels[:, t]``."""
    logits = logits[:, -labels.shape[1]:, :]
    if shift:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def distill_loss(student_family, teacher=None, teacher_family=None, kd: TokenKDSpec | None = None):
    """``loss_fn(model, batch)``: row-weighted token cross-entropy, plus token-level KL when ``kd``.

    The batch carries ``loss_weight (batch,)`` and, with ``kd``, the same rows laid out for the
    teacher under ``teacher.<key>`` (:data:`TEACHER_PREFIX`); both are removed before the forward pass. The KL pairs the i-th
    target token of a row in the student with the i-th in the teacher (one tokenizer: the same
    target tokens).

    Raises:
        UserInputError: the two models see a different number of target tokens in a row.
    """
    import torch
    import torch.nn.functional as F

    def loss_fn(model, batch):
        weights = batch.pop("loss_weight")
        tbatch = {k[len(TEACHER_PREFIX):]: batch.pop(k) for k in [k for k in batch if k.startswith(TEACHER_PREFIX)]}
        out = model(**batch)
        s, lab = _target_positions(out.logits, batch["labels"], student_family.decoder_only)
        mask = lab != -100
        tok_ce = F.cross_entropy(s.float().transpose(1, 2), lab.clamp(min=0), reduction="none") * mask
        ce = (tok_ce.sum(1) * weights.to(tok_ce)).sum() / mask.sum().clamp(min=1)
        logs = {"ce": float(ce.detach())}
        loss = ce
        if kd is not None and teacher is not None:
            if next(teacher.parameters()).device != lab.device:
                teacher.to(lab.device)
            with torch.no_grad():
                t_out = teacher(**tbatch)
            t, t_lab = _target_positions(t_out.logits, tbatch["labels"], teacher_family.decoder_only)
            t_mask = t_lab != -100
            if not torch.equal(mask.sum(1), t_mask.sum(1)):
                raise UserInputError("distill.token_kd: the teacher and the student see different target tokens")
            T = kd.temperature
            kl = F.kl_div(F.log_softmax(s[mask].float() / T, -1), F.log_softmax(t[t_mask].float() / T, -1),
                          log_target=True, reduction="batchmean")
            loss = loss + kd.kl_weight * T**2 * kl
            logs["kl"] = float(kl.detach())
        return loss, logs

    return loss_fn


def batch_maker(model, processor, prompt_template, teacher=None, teacher_processor=None):
    """``make_batch(pairs)``: the student's batch (+ ``loss_weight``, + ``teacher.<key>`` tensors for token KD)."""
    import torch

    from compressor.families import family_for_model
    from compressor.models.batches import build_prompt, training_batch
    from compressor.training_glue import ImageCache

    family = family_for_model(model)
    t_family = family_for_model(teacher) if teacher is not None else None
    cache = ImageCache()

    def make(fam, proc, m, images, targets, prompts):
        b = training_batch(fam, proc, images, targets, prompts)
        b["pixel_values"] = b["pixel_values"].to(next(m.parameters()).dtype)
        return b

    def make_batch(pairs: list) -> dict:
        images = [cache.get(ex) for ex, _ in pairs]
        targets = [t for _, (t, _) in pairs]
        prompts = [build_prompt(prompt_template, ex.question) for ex, _ in pairs]
        batch = make(family, processor, model, images, targets, prompts)
        batch["loss_weight"] = torch.tensor([w for _, (_, w) in pairs], dtype=torch.float32)
        if teacher is not None:
            tb = make(t_family, teacher_processor, teacher, images, targets, prompts)
            batch.update({TEACHER_PREFIX + k: v for k, v in tb.items()})
        return batch

    return make_batch


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Distil; see the module docstring.

    Raises:
        UserInputError: unknown teacher label, token KD with different tokenizers.
    """
    from compressor.families import family_for_model
    from compressor.lora import freeze_all_but
    from compressor.models.folders import model_dir, save_model
    from compressor.models.loading import load_model, materialize
    from compressor.training import train
    from compressor.training_glue import eval_hook, summary_of

    teacher_dir = ctx.labels.get(cfg.teacher)
    if teacher_dir is None:
        raise UserInputError(f"distill: no model is labelled '{cfg.teacher}' before this stage")
    data = ctx.data(cfg.train.data)
    captions, info = ({}, {"captions": 0})
    if cfg.ground_truth_weight < 1.0:
        captions, info = teacher_captions(teacher_dir, ctx.label_keys[cfg.teacher], data, ctx)
    resolved = materialize(cfg.student, ctx.run_dir / "inputs", ctx.dtype)
    model, processor = load_model(resolved.path, dtype=ctx.dtype, device=ctx.device)
    if processor is None:
        raise UserInputError(f"distill.student: {resolved.path} has no processor (tokenizer + image processor)")
    family = family_for_model(model)
    trainable = freeze_all_but(model, family, None if cfg.trainable == "full" else cfg.parts)
    teacher = t_proc = t_family = None
    if cfg.token_kd is not None:
        teacher, t_proc = load_model(teacher_dir, dtype=ctx.dtype, device=ctx.device)
        check_same_tokenizer(t_proc, processor)
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_family = family_for_model(teacher)
    pairs = weighted_pairs(data, captions, cfg.ground_truth_weight)
    result = train(
        model,
        batch_maker(model, processor, ctx.recipe.generation.prompt, teacher, t_proc),
        pairs,
        cfg.train,
        seed=ctx.recipe.seed,
        device=ctx.device,
        out_dir=out_dir,
        loss_fn=distill_loss(family, teacher, t_family, cfg.token_kd),
        evaluate=eval_hook(ctx, processor, cfg.train),
        save_checkpoint=lambda m, d: save_model(m, processor, d),
        progress=ctx.progress,
    )
    best = out_dir / "best"
    if result.best_step is not None and best.is_dir():  # train.select_best_by on val
        shutil.move(str(best), str(model_dir(out_dir)))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        save_model(model, processor, model_dir(out_dir), state_dict=result.extra.get("state_dict"))
    (out_dir / "teacher_captions.json").write_text(json.dumps(captions, indent=1, sort_keys=True) + "\n")
    teacher_params = _params(teacher_dir)
    student_params = sum(p.numel() for p in model.parameters())
    return {
        **summary_of(result),
        "params_trainable": trainable,
        "train_examples": len(pairs),
        "teacher_captions": info,
        "student": {"model": resolved.key, "family": family.name, "params": student_params},
        "teacher": {"label": cfg.teacher, "params": teacher_params},
        "params_ratio": round(student_params / teacher_params, 4) if teacher_params else None,
    }


def _params(folder: Path) -> int | None:
    """Parameters of a model folder, counted on its meta skeleton (no weights read)."""
    from compressor.models.loading import load_skeleton

    try:
        return sum(p.numel() for p in load_skeleton(folder).parameters())
    except Exception:  # a folder load_skeleton cannot read: the ratio is left out
        return None


# --------------------------------------------------------------------------------------------
# Pre-flight and plan
# --------------------------------------------------------------------------------------------


def student_model(spec):
    """``(config, processor or None, source)`` of a student spec, without loading weights.

    Raises:
        ModelSpecError: not a folder, preset or Hub id; no config there; a Hub id that cannot be
            reached offline; a family this toolchain does not handle.
    """
    from compressor.errors import ModelSpecError
    from compressor.models.loading import KNOWN_HUB_CONFIGS, classify
    from compressor.planning import plan_model

    kind = classify(spec)
    if kind == "hub" and spec not in KNOWN_HUB_CONFIGS:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            raise ModelSpecError(
                f"cannot read the config of '{spec}' ({str(exc).splitlines()[0][:200]}); offline, give a local folder, "
                "a preset or {config: FILE, init: random}"
            ) from None
        return config, None, f"hub {spec}"
    pm = plan_model(spec)
    return pm.config, pm.processor, pm.source


def check_same_tokenizer(teacher_processor, student_processor) -> None:
    """Refuse token-level KD between different tokenizers (exit 2).

    Raises:
        UserInputError: the vocabularies differ (size, or which token an id means).
    """
    a, b = teacher_processor.tokenizer, student_processor.tokenizer
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        diff = sum(1 for t, i in a.get_vocab().items() if b.get_vocab().get(t) != i)
        raise UserInputError(
            f"token_kd needs the teacher and the student to share one tokenizer; theirs differ ({len(a)} vs {len(b)} "
            f"tokens, {diff} of the teacher's tokens have another id or none in the student's). Remove `token_kd` "
            "(sequence-level distillation works across tokenizers) or give a student with the teacher's tokenizer"
        )


def _teacher_spec(cfg, recipe):
    """The model spec whose tokenizer the teacher has: the latest student before the teacher's label, else ``model:``."""
    spec = recipe.model
    for st in recipe.stages:
        if st.label == cfg.teacher:
            break
        if st.type == cfg.type:
            spec = st.student
    return spec


def check(cfg, pf) -> None:
    """Pre-flight: the student loads (config and processor, no weights), its family is one this
    toolchain handles, token KD has one tokenizer on both sides; later stages are then checked
    against the student (``pf.config`` / ``pf.family`` become its)."""
    import copy

    from compressor.errors import CompressError
    from compressor.families import family_for_config
    from compressor.planning import plan_model

    try:
        config, processor, _ = student_model(cfg.student)
        family = family_for_config(config)
    except CompressError as exc:
        raise FieldProblem(("student",), str(exc)) from None
    if cfg.trainable == "parts":
        bad = [p for p in cfg.parts if p not in family.trainable]
        if bad:
            raise FieldProblem(("parts",), f"{', '.join(bad)} not in the student ({family.describe_model()}); its parts: "
                               f"{', '.join(family.trainable)}")
    if cfg.token_kd is not None:
        try:
            teacher_proc = plan_model(_teacher_spec(cfg, pf.recipe)).processor
        except CompressError:
            teacher_proc = None
        if teacher_proc is None or processor is None:
            raise FieldProblem(("token_kd",), "token_kd: the teacher's or the student's tokenizer cannot be read offline to "
                               "check that they are the same; remove `token_kd` or give local folders")
        try:
            check_same_tokenizer(teacher_proc, processor)
        except UserInputError as exc:
            raise FieldProblem(("token_kd",), str(exc)) from None
    pf.config, pf.family = copy.deepcopy(config), family


def plan(cfg, pc) -> dict:
    """``compress plan``: the student's meta model replaces the model (its parameters from here on)."""
    from compressor.lora import plan_freeze
    from compressor.planning import meta_model

    config, processor, source = student_model(cfg.student)
    teacher_params = sum(p.numel() for p in pc.model.parameters())
    pc.model, pc.family = meta_model(config)
    pc.processor = processor
    student_params = sum(p.numel() for p in pc.model.parameters())
    pc.notes.append(f"stage {pc.index} distill: the student ({source}, {pc.family.describe_model()}) replaces the model: "
                    f"{student_params:,} parameters, {student_params / teacher_params:.3f}× the model before it")
    row = plan_freeze(pc.model, pc.family, None if cfg.trainable == "full" else cfg.parts)
    return {**row, "student": source}


def card(record: dict):
    c = training_card(record)
    summ = record.get("summary") or {}
    st = summ.get("student") or {}
    if st:
        c.details.append(f"student {st.get('model')} ({st.get('params', 0):,} parameters) distilled from "
                         f"'{(summ.get('teacher') or {}).get('label')}'")
    c.tags = ["distillation", "sequence-level-kd"]
    return c


STAGE = Declaration(
    config=DistillStage,
    run=run,
    produces_model=True,
    trains=True,
    uses_generation=True,
    data=train_data,
    references=lambda cfg: {"teacher": (cfg.teacher, ("teacher",))},
    needs_merged=True,
    reshapes=True,
    trainable_params=trainable_of,
    check=check,
    plan=plan,
    card=card,
)
