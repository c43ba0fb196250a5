"""Resumable training: checkpoints of the training loop's whole state, and its speed (steps/s, ETA).

A training stage saves its state every ``train.save_every`` optimizer steps (or every
``train.save_every_minutes``) through accelerate's ``save_state``: the trainable weights (an
adapter's, or the parts that train; the frozen rest is the stage's input and is not copied), the
optimizer, the learning-rate scheduler, every random generator (Python, NumPy, torch, CUDA) of
every process, the loop's position in the data, its loss curve and in-training evaluations, and
the best checkpoint so far (``select_best_by``).

Each checkpoint is built in ``<checkpoints>/.tmp-step-N`` and renamed to ``step-N`` when complete,
so a kill at any moment leaves either a complete checkpoint or a temporary folder that is never
read; only the last ``keep_checkpoints`` are kept. The checkpoints live in the stage's temporary
folder (``stages/.tmp-NN-<type>-<key>/checkpoints``): ``compress apply --resume`` finds them there
(the folder name holds the stage key, so a changed recipe never resumes from another's state),
continues from the newest, and the stage ends with the same weights, byte for byte, as an
uninterrupted run. A stage that completes deletes its checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
PREFIX = "step-"


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder`` (``step-N`` holding a trainer state), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[len(PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def checkpoint_step(folder: Path) -> int | None:
    """The step of the newest complete checkpoint in ``folder``, or None."""
    done = complete_checkpoints(folder)
    return int(done[-1].name[len(PREFIX):]) if done else None


class Checkpoints:
    """Saving and restoring a training loop's state in one folder (see the module docstring).

    Args:
        folder: the checkpoint folder (the same path in every process).
        acc: the ``Accelerator`` (model and optimizer prepared, scheduler registered).
        train_spec: the recipe's ``TrainSpec`` (``save_every``, ``save_every_minutes``, ``keep_checkpoints``).
        total: the loop's total optimizer steps.
        out_dir: the stage's output folder (its ``best/`` checkpoint travels with each save).
    """

    def __init__(self, folder: Path, acc, train_spec, total: int, out_dir: Path):
        self.folder = Path(folder)
        self.acc = acc
        self.every = train_spec.save_every
        self.every_s = train_spec.save_every_minutes * 60 if train_spec.save_every_minutes else None
        self.keep = train_spec.keep_checkpoints
        self.total = total
        self.out_dir = Path(out_dir)
        self.last_save = time.monotonic()
        self.last_step: int | None = None
        self._handles = [acc.register_save_state_pre_hook(self._save_hook),
                         acc.register_load_state_pre_hook(self._load_hook)]

    # accelerate's hooks: only what trains is written (the frozen rest is the stage's input).
    @staticmethod
    def _trainable_names(model) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    def _save_hook(self, models, weights, output_dir) -> None:
        from safetensors.torch import save_file

        for i, model in enumerate(models):
            if i >= len(weights):  # FSDP / DeepSpeed save their own way
                break
            keep = self._trainable_names(model)
            state = {k: v.detach().contiguous().cpu() for k, v in weights[i].items() if k in keep}
            if self.acc.is_main_process:
                save_file(state, os.path.join(output_dir, WEIGHTS_FILE if i == 0 else f"trainable_{i}.safetensors"))
        weights.clear()  # nothing left for accelerate's own (whole-model) weights file

    def _load_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            path = os.path.join(input_dir, WEIGHTS_FILE if i == 0 else f"trainable_{i}.safetensors")
            state = load_file(path, device=str(next(model.parameters()).device))
            expected = self._trainable_names(model)
            if set(state) != expected:
                raise RuntimeError(f"checkpoint {input_dir} holds other trainable weights than this model "
                                   f"({len(set(state) ^ expected)} names differ); delete it to start the stage over")
            _, unexpected = model.load_state_dict(state, strict=False)
            if unexpected:
                raise RuntimeError(f"checkpoint {input_dir}: unexpected weights {unexpected[:3]}")
        models.clear()  # loaded here; accelerate loads optimizer, scheduler and random states

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    # ------------------------------------------------------------------ save
    def due(self, step: int) -> bool:
        """Whether to save after optimizer step ``step`` (never after the last: the stage then writes its output)."""
        if step >= self.total:
            return False
        due = bool(self.every and step % self.every == 0)
        if not due and self.every_s is not None:
            due = time.monotonic() - self.last_save >= self.every_s
            if self.acc.num_processes > 1:  # every process must save together: one process's clock is enough
                import torch

                flag = torch.tensor([1.0 if due else 0.0], device=self.acc.device)
                due = float(self.acc.reduce(flag, reduction="sum").item()) > 0
        return due

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (every process calls this), atomically; prune to the last ``keep``."""
        from compressor.fileio import atomic_write_json, link_tree

        acc = self.acc
        final = self.folder / f"{PREFIX}{step:08d}"
        tmp = self.folder / f".tmp-{PREFIX}{step:08d}"
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            best = self.out_dir / "best"
            if best.is_dir():  # the best checkpoint so far travels with the state (hard links: best/ is replaced, never edited)
                link_tree(best, tmp / "best")
            atomic_write_json(tmp / STATE_FILE, {**state, "step": step, "total": self.total})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("step %d/%d: training state saved (%s)", step, self.total, final)
        acc.wait_for_everyone()
        self.last_save = time.monotonic()
        self.last_step = step
        return final

    # ------------------------------------------------------------------ restore
    def restore(self) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into the loop (every process); its trainer state, or None."""
        done = complete_checkpoints(self.folder)
        if not done:
            return None
        path = done[-1]
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("total") != self.total:
            log.warning("ignoring checkpoint %s: it was saved for %s steps, this stage runs %d",
                        path, state.get("total"), self.total)
            return None
        self.acc.load_state(str(path))
        if self.acc.is_main_process:
            best = self.out_dir / "best"
            shutil.rmtree(best, ignore_errors=True)
            if (path / "best").is_dir():
                from compressor.fileio import link_tree

                link_tree(path / "best", best)
        self.acc.wait_for_everyone()
        self.last_step = state["step"]
        if self.acc.is_main_process:
            log.info("resuming training at step %d of %d from the checkpoint %s", state["step"], self.total, path)
        return state


def save_best(save_checkpoint, model, out_dir: Path) -> None:
    """``save_checkpoint(model, folder)`` into a fresh folder renamed to ``out_dir/best`` (atomic; files
    are replaced, never rewritten in place, so hard links in saved training states stay valid)."""
    from compressor.fileio import make_tmp_dir, publish_dir

    tmp = make_tmp_dir(out_dir, "best")
    try:
        save_checkpoint(model, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, Path(out_dir) / "best")


class Speed:
    """Steps per second over the recent steps, and the time left (for the log and the progress bar).

    Args:
        start_step: the step the loop starts from (non-zero when resuming).
        total: the loop's total steps.
        window: how many recent steps the rate is measured over.
    """

    def __init__(self, start_step: int, total: int, window: int = 50):
        self.total = total
        self.start = (start_step, time.perf_counter())
        self.recent: deque[tuple[int, float]] = deque([self.start], maxlen=window + 1)

    def tick(self, step: int) -> None:
        self.recent.append((step, time.perf_counter()))

    def rate(self) -> float | None:
        """Steps per second over the recent window (None before the first step)."""
        (s0, t0), (s1, t1) = self.recent[0], self.recent[-1]
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else None

    def overall(self) -> float | None:
        s, t = self.recent[-1]
        return (s - self.start[0]) / (t - self.start[1]) if s > self.start[0] and t > self.start[1] else None

    def eta_s(self, step: int) -> float | None:
        r = self.rate()
        return (self.total - step) / r if r else None

    def text(self, step: int) -> str:
        """``"2.41 steps/s, ETA 3m05s"`` (or ``"0.12 steps/s (8.3 s/step), ETA 1h02m"``)."""
        r = self.rate()
        if r is None:
            return "rate unknown"
        rate = f"{r:.2f} steps/s" + (f" ({1 / r:.1f} s/step)" if r < 1 else "")
        eta = self.eta_s(step)
        return f"{rate}, ETA {format_duration(eta)}" if eta is not None else rate


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
