"""The training loop shared by lora_finetune, finetune and heal, on Hugging Face accelerate.

One loop for every trainable setup (LoRA through peft, full or per-part finetune): AdamW,
transformers' ``get_scheduler`` with warm-up, gradient accumulation and clipping through
``accelerate.Accelerator`` (DDP / FSDP / DeepSpeed when started with ``accelerate launch``),
seeded shuffling, optional evaluation every N steps with best-checkpoint selection, and a loss
curve written beside the stage output (``loss.json``, ``loss.png``). With a checkpoint folder it
saves its whole state every ``save_every`` steps / ``save_every_minutes`` and continues from the
newest saved state (:mod:`compressor.training_state`); the log and the progress bar show steps per
second and the time left.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: loss_fn(model, batch) -> (loss tensor, {name: float}) — the default is the model's own loss.
LossFn = Callable[[Any, dict], tuple[Any, dict[str, float]]]


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: optimizer steps taken.
        losses: ``(step, loss)`` per optimizer step (mean over its micro-batches).
        evals: ``(step, metrics)`` of in-training evaluations.
        best_step: the step whose checkpoint was kept (``select_best_by``), or None.
        seconds: wall time of the loop.
        extra: ``state_dict`` under FSDP / DeepSpeed (the gathered full state dict; stages pass it
            to ``save_pretrained``).
        parts: ``(step, {name: value})`` of the loss function's own logs (distillation: ``ce``,
            ``kl``), means over the step's micro-batches on the main process.
    """

    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    best_step: int | None = None
    seconds: float = 0.0
    parts: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def default_loss(model, batch: dict) -> tuple[Any, dict[str, float]]:
    out = model(**batch)
    return out.loss, {}


def count_steps(n_examples: int, train) -> int:
    """Optimizer steps for a TrainSpec: ``steps`` if set, else ``ceil(epochs · n / (batch · accum))``."""
    if train.steps is not None:
        return int(train.steps)
    epochs = train.epochs if train.epochs is not None else 1.0
    per_step = train.batch_size * train.gradient_accumulation_steps
    return max(1, math.ceil(epochs * n_examples / per_step))


def _batches(pairs: Sequence, batch_size: int, seed: int):
    """Endless seeded epochs of shuffled batches (the last partial batch of an epoch is kept)."""
    epoch = 0
    while True:
        order = list(range(len(pairs)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [pairs[j] for j in order[i : i + batch_size]]
        epoch += 1


def train(
    model,
    make_batch: Callable[[list], dict],
    pairs: Sequence,
    train_spec,
    *,
    seed: int,
    device: str,
    out_dir: Path,
    loss_fn: LossFn = default_loss,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    save_checkpoint: Callable[[Any, Path], None] | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters in place.

    Args:
        model: a ``torch.nn.Module`` whose ``requires_grad`` flags say what trains.
        make_batch: list of training pairs → model inputs with ``labels`` (CPU tensors).
        pairs: training pairs ``(example, target_text)``.
        train_spec: the recipe's ``TrainSpec``.
        seed: seed for shuffling and dropout.
        device: ``cpu`` or ``cuda`` (accelerate decides under ``accelerate launch``).
        out_dir: where ``loss.json`` / ``loss.png`` and best checkpoints go.
        loss_fn: ``(model, batch) -> (loss, logs)``; default: the model's own cross-entropy.
        evaluate: ``model -> metrics`` run every ``train_spec.eval_every`` steps.
        save_checkpoint: ``(model, folder)`` saving what trains (adapter or weights), used for
            best-checkpoint selection by ``train_spec.select_best_by``.
        progress: show a tqdm bar.
        checkpoint_dir: where the loop saves its state (``train_spec.save_every`` /
            ``save_every_minutes``) and from whose newest complete state it continues; None: no
            checkpoints. The same path in every process.

    Returns:
        A :class:`TrainResult`; with ``select_best_by`` the best checkpoint is in
        ``out_dir/best`` and ``best_step`` says which step it was.

    Raises:
        ValueError: no training pairs, or no trainable parameter.
    """
    import time

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if not pairs:
        raise ValueError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter has requires_grad=True")
    seed = train_spec.seed if train_spec.seed is not None else seed
    set_seed(seed)
    mixed = train_spec.mixed_precision
    if device != "cuda" and mixed != "no":
        log.info("mixed_precision=%s needs CUDA; training in full precision on %s", mixed, device)
        mixed = "no"
    from accelerate.utils import DistributedDataParallelKwargs

    acc = Accelerator(
        gradient_accumulation_steps=train_spec.gradient_accumulation_steps,
        mixed_precision=mixed,
        cpu=device == "cpu",
        # Frozen or unused parameters (a part not in the forward path) must not stall DDP's reduction.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    total = count_steps(len(pairs), train_spec)
    warmup = train_spec.warmup_steps or int(round(train_spec.warmup_ratio * total))
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_spec.learning_rate,
    )
    sched = get_scheduler(train_spec.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=total)
    if train_spec.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    # The scheduler is stepped by hand once per optimizer step: accelerate's prepared scheduler
    # steps num_processes times per step (it assumes a sharded dataloader, which this loop does not use).
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    model.train()

    from compressor.training_state import Checkpoints, Speed, format_duration, save_best

    result = TrainResult()
    best_value: float | None = None
    higher_is_better = train_spec.select_best_by not in (None, "perplexity")
    world = acc.num_processes
    batches = _batches(pairs, train_spec.batch_size * world, seed)
    step, seconds_before = 0, 0.0
    ckpt = Checkpoints(checkpoint_dir, acc, train_spec, total, out_dir) if checkpoint_dir is not None else None
    saved = ckpt.restore() if ckpt is not None else None
    if saved is not None:  # continue where the saved state left off: same weights, optimizer, schedule, RNG, data
        step, seconds_before = saved["step"], saved.get("seconds", 0.0)
        result.losses = [tuple(x) for x in saved["losses"]]
        result.parts = [tuple(x) for x in saved.get("parts", [])]
        result.evals = [tuple(x) for x in saved.get("evals", [])]
        result.best_step, best_value = saved.get("best_step"), saved.get("best_value")
        for _ in range(saved["batches"]):
            next(batches)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress or not acc.is_main_process,
               leave=False)
    speed = Speed(step, total)
    t0 = time.perf_counter()
    last_log = t0
    while step < total:
        micro_losses = []
        micro_logs: dict[str, list[float]] = {}
        for _ in range(train_spec.gradient_accumulation_steps):
            group = next(batches)
            mine = group[acc.process_index :: world] or group[:1]
            batch = {k: v.to(acc.device) for k, v in make_batch(mine).items()}
            with acc.accumulate(model):
                loss, logs = loss_fn(model, batch)
                acc.backward(loss)
                if acc.sync_gradients and train_spec.max_grad_norm:
                    acc.clip_grad_norm_(params, train_spec.max_grad_norm)
                opt.step()
                if acc.sync_gradients:
                    sched.step()
                opt.zero_grad()
            micro_losses.append(float(loss.detach()))
            for k, v in logs.items():
                micro_logs.setdefault(k, []).append(float(v))
        step += 1
        if micro_logs:
            result.parts.append((step, {k: sum(v) / len(v) for k, v in micro_logs.items()}))
        mean = float(acc.gather(torch.tensor([sum(micro_losses) / len(micro_losses)], device=acc.device)).mean())
        if not math.isfinite(mean):
            raise FloatingPointError(f"the training loss became {mean} at step {step}; lower learning_rate")
        result.losses.append((step, mean))
        speed.tick(step)
        bar.update(1)
        bar.set_postfix(loss=f"{mean:.3f}")
        # Every log_every steps, and at least once a minute when steps are slow.
        if step % train_spec.log_every == 0 or step == total or time.perf_counter() - last_log >= 60:
            log.info("step %d/%d loss %.4f lr %.2e, %s", step, total, mean, sched.get_last_lr()[0], speed.text(step))
            last_log = time.perf_counter()
        if evaluate is not None and train_spec.eval_every and (step % train_spec.eval_every == 0 or step == total):
            model.eval()
            metrics = evaluate(acc.unwrap_model(model))
            model.train()
            result.evals.append((step, metrics))
            log.info("step %d eval %s", step, {k: round(v, 3) for k, v in metrics.items()})
            key = train_spec.select_best_by
            if key is not None and save_checkpoint is not None and acc.is_main_process:
                value = metrics.get(key)
                if value is not None and math.isfinite(value) and (
                    best_value is None or (value > best_value if higher_is_better else value < best_value)
                ):
                    best_value = value
                    result.best_step = step
                    save_best(save_checkpoint, acc.unwrap_model(model), out_dir)
        if ckpt is not None and ckpt.due(step):
            ckpt.save(step, {
                "batches": step * train_spec.gradient_accumulation_steps,
                "seconds": round(seconds_before + time.perf_counter() - t0, 3),
                "losses": result.losses, "parts": result.parts, "evals": result.evals,
                "best_step": result.best_step, "best_value": best_value,
            })
    bar.close()
    if ckpt is not None:
        ckpt.close()
    result.steps = step
    result.seconds = seconds_before + time.perf_counter() - t0
    rate = speed.overall()
    log.info("trained %d steps in %s%s", total, format_duration(result.seconds),
             f" ({rate:.2f} steps/s)" if rate else "")
    model.eval()
    acc.wait_for_everyone()
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Sharded parameters: the full state dict (gathered on the main process) is what stages save.
        result.extra["state_dict"] = acc.get_state_dict(model)
    if acc.is_main_process:
        write_loss_curve(out_dir, result)
    acc.free_memory()
    return result


def write_loss_curve(out_dir: Path, result: TrainResult) -> None:
    """``loss.json`` (steps, losses, evaluations) and ``loss.png`` (matplotlib, Agg backend)."""
    from compressor.fileio import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "steps": result.steps,
        "loss": [[s, v] for s, v in result.losses],
        "evals": [[s, m] for s, m in result.evals],
        "best_step": result.best_step,
        "seconds": round(result.seconds, 3),
    }
    if result.parts:
        data["parts"] = [[s, m] for s, m in result.parts]
    atomic_write_text(out_dir / "loss.json", json.dumps(data, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        ax.plot([s for s, _ in result.losses], [v for _, v in result.losses], lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = out_dir / ".loss.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(out_dir / "loss.png")
    except Exception as exc:  # plotting must never fail a training stage
        log.warning("could not draw loss.png: %s", exc)
