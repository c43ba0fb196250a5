"""heal: the distillation loss (KL to the teacher on caption tokens + weighted CE), ce vs distill
runs, full / per-part training, and the teacher's key in the stage's cache key."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from surgery_helpers import make_recipe, preset, probe_images, run_stage, saved_preset

from compressor.models.batches import training_batch
from compressor.stages.heal import distill_loss
from compressor.surgery import remove_layers

CAPS = ["a red circle on the left", "two blue squares", "a green triangle at the top"]


@pytest.mark.parametrize("name", ["tiny-blip2-opt", "tiny-blip2-t5", "tiny-blip"])
def test_distill_loss_is_ce_when_student_equals_teacher(name):
    model, proc, family = preset(name)
    batch = training_batch(family, proc, probe_images(), CAPS, [""] * 3)
    teacher = copy.deepcopy(model)
    loss_fn = distill_loss(teacher, family, temperature=2.0, kl_weight=1.0, ce_weight=0.5)
    loss, logs = loss_fn(model, batch)
    ce = float(model(**batch).loss.detach())
    assert logs["kl"] == pytest.approx(0.0, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(0.5 * ce, rel=1e-5)
    # A student with a layer less disagrees with its teacher: KL > 0, and the gradient reaches only the student.
    part = "language_model.decoder" if "language_model.decoder" in family.stacks else "language_model"
    remove_layers(model, family, part, [1])
    loss, logs = loss_fn(model, batch)
    assert logs["kl"] > 1e-3
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_loss_counts_only_caption_tokens():
    """Changing the teacher's logits at masked positions (image tokens, padding) does not change the KL."""
    model, proc, family = preset("tiny-blip2-opt")
    batch = training_batch(family, proc, probe_images(), CAPS, [""] * 3)
    teacher = copy.deepcopy(model)
    remove_layers(model, family, "language_model", [2])
    mask = batch["labels"][:, 1:] != -100  # positions whose next token is learnt

    class Shifted(torch.nn.Module):
        def __init__(self, inner, bump_masked):
            super().__init__()
            self.inner, self.bump = inner, bump_masked

        def forward(self, **kw):
            out = self.inner(**kw)
            if self.bump:
                noise = torch.zeros_like(out.logits)
                noise[:, :-1][~mask] = 5.0 * torch.randn_like(noise[:, :-1][~mask])
                out.logits = out.logits + noise
            return out

    a = distill_loss(Shifted(teacher, False), family, 2.0, 1.0, 0.0)(model, batch)[1]["kl"]
    b = distill_loss(Shifted(teacher, True), family, 2.0, 1.0, 0.0)(model, batch)[1]["kl"]
    assert a == pytest.approx(b, rel=1e-6) and a > 0


def _removed_model_folder(tmp_path):
    from compressor.models.folders import save_model

    model, proc, family = preset("tiny-blip2-opt")
    remove_layers(model, family, "language_model", [3, 4])
    return save_model(model, proc, tmp_path / "removed")


@pytest.mark.parametrize("loss", ["ce", "distill"])
def test_heal_with_lora_writes_an_adapter_and_lowers_the_loss(loss, tmp_path):
    from compressor.pipeline.context import StageContext

    removed = _removed_model_folder(tmp_path)
    heal = {"type": "heal", "trainable": "lora", "parts": ["language_model.attention", "language_model.mlp"],
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}, "loss": loss,
            "train": {"steps": 8, "batch_size": 8, "learning_rate": 1e-2}}
    if loss == "distill":
        heal["distill"] = {"teacher": "teacher", "temperature": 2.0, "ce_weight": 0.0}  # pure distillation
    recipe = make_recipe([{"type": "evaluate", "label": "teacher"}, heal])
    ctx = StageContext(recipe=recipe, index=1, run_dir=tmp_path, device="cpu", progress=False,
                       labels={"teacher": saved_preset("tiny-blip2-opt")})
    out = tmp_path / "heal"
    summary = run_stage(recipe, 1, removed, out, ctx)
    assert (out / "model" / "adapter" / "adapter_config.json").is_file()
    assert summary["loss"] == loss and summary["loss_last"] < summary["loss_first"]
    curve = json.loads((out / "loss.json").read_text())
    if loss == "distill":
        kls = [m["kl"] for _, m in curve["parts"]]
        assert len(kls) == 8 and kls[-1] < kls[0]
    else:
        assert "parts" not in curve


def test_heal_parts_trains_only_those_parts(tmp_path):
    from compressor.models.loading import load_model

    removed = _removed_model_folder(tmp_path)
    recipe = make_recipe([{"type": "heal", "trainable": "parts", "parts": ["qformer"], "loss": "ce",
                           "train": {"steps": 2, "batch_size": 4, "learning_rate": 1e-3}}])
    out = tmp_path / "heal"
    summary = run_stage(recipe, 0, removed, out)
    before = load_model(removed)[0].state_dict()
    after = load_model(out / "model")[0].state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"qformer", "query_tokens"}  # the qformer part includes its query tokens
    assert summary["trainable"]["params_trainable"] < summary["trainable"]["params_total"]


def test_teacher_key_is_part_of_the_heal_cache_key(tmp_path):
    """Same heal input, another teacher: the heal stage reruns; the same teacher again: reused."""
    from compressor.pipeline.runner import Runner
    from compressor.recipe.loader import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: heal-key
model: {saved_preset("tiny-blip2-opt")}
data: {{format: synthetic, train: {{size: 8, image_size: 32}}, eval: {{size: 2, image_size: 32}}}}
generation: {{max_new_tokens: 4, batch_size: 4}}
stages:
  - type: evaluate
    label: original
    metrics: [bleu_4]
    characteristics: {{latency: null, gflops: false}}
  - type: lora_finetune
    parts: [language_model.attention]
    train: {{steps: 1, batch_size: 4, learning_rate: 1.0e-3}}
  - type: merge_adapters
    label: tuned
  - type: heal
    loss: distill
    distill: {{teacher: original}}
    parts: [language_model.attention]
    train: {{steps: 1, batch_size: 4}}
""")
    run = tmp_path / "run"

    def apply(teacher):
        loaded = load_recipe(recipe, [f"stages.3.distill.teacher={teacher}"])
        runner = Runner(loaded, run, progress=False)
        runner.run()
        return [(r.status, r.folder) for r in runner.records]

    first = apply("original")
    second = apply("tuned")
    assert [s for s, _ in second] == ["reused", "reused", "reused", "ran"]
    assert second[3][1] != first[3][1]
    third = apply("original")
    assert third == [("reused", f) for _, f in first]
    record = json.loads((run / "stages" / second[3][1] / "stage.json").read_text())
    assert record["key_parts"]["teacher"] != json.loads((run / "stages" / first[3][1] / "stage.json").read_text())["key_parts"]["teacher"]
