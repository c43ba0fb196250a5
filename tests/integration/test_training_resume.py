"""Resuming inside a training stage (issue 20, item 9) and the loop's speed in the log (item 10).

Ctrl-C during a LoRA finetune keeps the run's lock and the stage's saved training state and says
how to continue; a plain rerun is refused (exit 2, naming --resume); ``--resume`` continues from the
newest saved step (the log says which) and the stage ends with the same adapter, byte for byte, as
an uninterrupted run. (A kill -9 during ``heal``: tests/integration/test_cli_apply.py.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.integration.inprocess import run_inprocess

RECIPE = """\
name: resume
model: tiny-blip2-opt
seed: 0
data:
  format: synthetic
  train: {size: 24, image_size: 32}
generation: {max_new_tokens: 6, batch_size: 8}
stages:
  - type: lora_finetune
    parts: [qformer.self_attention, language_model.attention]
    lora: {r: 4, lora_alpha: 8, lora_dropout: 0.1}
    train: {steps: 12, batch_size: 4, learning_rate: 1.0e-3, save_every: 3, keep_checkpoints: 2, log_every: 4}
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adapter(run: Path) -> Path:
    return run / "final" / "adapter" / "adapter_model.safetensors"


@pytest.fixture
def interrupt_at(monkeypatch):
    """Make the training loop raise KeyboardInterrupt when it takes its ``n``-th batch (as Ctrl-C would)."""
    import compressor.data.workers as workers  # the training loop imports ordered_loader when it starts

    original = workers.ordered_loader

    def arm(n: int):
        def loader(make, count, *args, **kwargs):
            monkeypatch.setattr(workers, "ordered_loader", original)  # once
            for i, batch in enumerate(original(make, count, *args, **kwargs), start=1):
                if i == n:
                    raise KeyboardInterrupt
                yield batch

        monkeypatch.setattr(workers, "ordered_loader", loader)

    return arm


def test_ctrl_c_then_resume_continues_from_the_saved_step_and_equals_an_uninterrupted_run(tmp_path, interrupt_at):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    interrupt_at(9)  # during step 9: steps 3 and 6 were saved, only the newest two are kept
    res = run_inprocess("apply", str(recipe), "--out", str(run))
    assert res.returncode == 130
    assert "interrupted during stage 0 lora_finetune (its training state at step 6 is saved)" in res.stderr
    assert f"compress apply {recipe} --out {run} --resume" in res.stderr
    tmp = next((run / "stages").glob(".tmp-00-lora_finetune-*"))
    assert sorted(p.name for p in (tmp / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    saved = tmp / "checkpoints" / "step-00000006"
    # Only what trains is saved (the adapter), with the optimizer, scheduler and random states.
    assert {"trainable.safetensors", "optimizer.bin", "trainer_state.json", "random_states_0.pkl"} <= {
        p.name for p in saved.iterdir()}
    assert not (saved / "model.safetensors").exists()
    assert (run / ".lock").is_file(), "an interrupted run keeps its lock: a plain rerun must not start over silently"
    other = tmp_path / "other"
    shutil.copytree(run, other)

    res = run_inprocess("apply", str(recipe), "--out", str(run))
    assert res.returncode == 2 and "--resume" in res.stderr
    res = run_inprocess("apply", str(recipe), "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming training at step 6 of 12" in res.stderr
    assert "steps/s, ETA" in res.stderr  # item 10: the log shows the speed and the time left
    assert not list((run / "stages").glob(".tmp-*")), "a completed stage keeps no training state"

    # A run whose lock was released (a failure, not a kill) and is started without --resume starts the
    # stage over, saying what it discards: the uninterrupted reference.
    (other / ".lock").unlink()
    res = run_inprocess("apply", str(recipe), "--out", str(other))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming training" not in res.stderr and "discarding its training state saved at step 6" in res.stderr
    assert _sha(_adapter(run)) == _sha(_adapter(other))
    curves = [json.loads(next((r / "stages").glob("00-lora_finetune-*/loss.json")).read_text()) for r in (run, other)]
    assert curves[0]["steps"] == 12 and curves[0]["loss"] == curves[1]["loss"], "the loss curve continues where it stopped"


def test_save_settings_are_not_part_of_the_stage_key():
    """How often a training state is saved changes no result: the stage key ignores it."""
    from compressor.pipeline.runner import key_config
    from compressor.stages.lora_finetune import LoraFinetuneStage

    a = LoraFinetuneStage(type="lora_finetune", train={"steps": 5})
    b = LoraFinetuneStage(type="lora_finetune", train={"steps": 5, "save_every": 2, "save_every_minutes": None,
                                                       "keep_checkpoints": 5}, label="x")
    c = LoraFinetuneStage(type="lora_finetune", train={"steps": 6})
    assert key_config(a) == key_config(b) != key_config(c)
    assert "save_every" not in key_config(a)["train"]
