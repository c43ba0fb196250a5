"""``tiny-smolvlm`` through every stage that applies, in one ``compress apply`` (in this process):
LoRA on every SmolVLM part name, merge, evaluate, layer removal in both stacks by importance and
by position, width pruning of the language model, heal by distillation, export (safetensors +
ONNX with an int8 decoder: greedy tokens equal PyTorch's with image splitting), evaluation under
ONNX Runtime, predict, then ``distill`` into a
student of another family (a BLIP-2) whose teacher captions are cached; and the bad inputs of
issue 18 exit 2 naming the recipe line before any weight is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.inprocess import run_inprocess

RECIPE = """\
name: smol
model: tiny-smolvlm
seed: 0
data:
  format: synthetic
  train: {size: 12, image_size: 48}
  eval: {size: 4, image_size: 48}
  test: {size: 3, image_size: 48}
generation: {max_new_tokens: 6, batch_size: 4}
stages:
  - type: lora_finetune
    parts: [vision.attention, vision.mlp, connector, language_model.attention, language_model.mlp]
    lora: {r: 4, lora_alpha: 8}
    train: {steps: 2, batch_size: 4, learning_rate: 1.0e-3}
  - type: merge_adapters
  - type: evaluate
    label: baseline
    metrics: [bleu_4, cider, perplexity]
    characteristics: {latency: null}
  - type: remove_layers
    language_model: {count: 2, select: block_influence}
    vision: {layers: [0]}
    calibration: {batches: 1, batch_size: 4, data: train}
  - type: prune_width
    mlp: {ratio: 0.5}
  - type: heal
    parts: [connector, language_model.attention]
    lora: {r: 4, lora_alpha: 8}
    loss: distill
    distill: {teacher: baseline}
    train: {steps: 2, batch_size: 4}
  - type: merge_adapters
  - type: export
    formats: [safetensors, onnx]
    onnx: {exporter: legacy, quantize: int8}
  - type: evaluate
    label: candidate
    backend: onnx
    teacher: baseline
    metrics: [bleu_4, cider, teacher_cider]
    characteristics: {latency: null}
  - type: predict
    backend: onnx
  - type: distill
    label: student
    teacher: baseline
    student: tiny-blip2-llama
    ground_truth_weight: 0.5
    train: {steps: 2, batch_size: 4}
  - type: evaluate
    label: student_eval
    metrics: [bleu_4, cider]
    characteristics: {latency: null}
  - type: distill
    teacher: baseline
    student: tiny-smolvlm
    token_kd: {temperature: 2.0, kl_weight: 1.0}
    train: {steps: 2, batch_size: 4}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    recipe = root / "smol.yaml"
    recipe.write_text(RECIPE)
    r = run_inprocess("apply", str(recipe), "--out", str(root / "run"))
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "run", recipe


def _summary(run_dir: Path, stage_type: str) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return next(s["summary"] for s in manifest["stages"] if s["type"] == stage_type)


def test_every_stage_runs_on_tiny_smolvlm(run):
    run_dir, _ = run
    lora = _summary(run_dir, "lora_finetune")["lora"]["entries"]
    assert lora == {"vision.attention": {"vision": 8}, "vision.mlp": {"vision": 4}, "connector": {"connector": 1},
                    "language_model.attention": {"language_model": 24}, "language_model.mlp": {"language_model": 18}}
    removed = {r["part"]: r["removed"] for r in _summary(run_dir, "remove_layers")["removed"]}
    assert len(removed["language_model"]) == 2 and removed["vision"] == [0]
    report = json.loads((run_dir / "report.json").read_text())
    base, cand = report["evaluations"]["baseline"], report["evaluations"]["candidate"]
    assert cand["characteristics"]["params_total"] < base["characteristics"]["params_total"]
    assert "teacher_cider" in cand["metrics"] and cand["decoding"]["backend"] == "onnxruntime"
    onnx = json.loads((next(run_dir.glob("stages/*-export-*")) / "onnx" / "export.json").read_text())
    assert set(onnx["graphs"]) == {"image_encoder", "embed_tokens", "decoder"} and onnx["graphs"]["decoder"].get("int8")
    preds = json.loads(next(run_dir.glob("stages/*-predict-*/predictions.json")).read_text())
    assert len(preds) == 3 and all(p["caption"] for p in preds)


def test_onnx_greedy_equals_pytorch_with_image_splitting(run):
    """The pipeline's export (after LoRA, removal, width pruning, heal): ONNX Runtime's greedy tokens
    equal PyTorch's on 3 images of different tile counts (padding tiles in the batch); the int8
    decoder runs."""
    import numpy as np
    from PIL import Image

    from compressor.evaluation.captioner import TorchCaptioner
    from compressor.models.loading import load_model
    from compressor.recipe.schema import GenerationSpec
    from exporters.onnx import OnnxCaptioner

    run_dir, _ = run
    export = next(run_dir.glob("stages/*-export-*"))
    model, proc = load_model(json.loads((export / "stage.json").read_text())["input_dir"])
    meta = json.loads((export / "onnx" / "export.json").read_text())
    assert [t["name"] for t in meta["graphs"]["image_encoder"]["signature"]["inputs"]] == ["pixel_values", "pixel_attention_mask"]
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (32, 64), (48, 16))]
    gen = GenerationSpec(max_new_tokens=10, batch_size=3)
    ref = TorchCaptioner(model, proc, gen).caption(images)
    assert len(set(ref)) == 3 and all(len(set(proc.tokenizer(c).input_ids)) >= 3 for c in ref), ref  # teeth
    assert OnnxCaptioner(export / "onnx", gen, variant="plain").caption(images) == ref
    assert all(OnnxCaptioner(export / "onnx", gen, variant="int8").caption(images))


def test_distill_into_a_student_of_another_family(run):
    run_dir, recipe = run
    s = _summary(run_dir, "distill")
    assert s["student"]["family"] == "blip2" and s["teacher_captions"]["hit"] is False and s["teacher_captions"]["captions"] == 12
    assert s["params_ratio"] == pytest.approx(s["student"]["params"] / s["teacher"]["params"], rel=1e-3)
    folder = sorted(run_dir.glob("stages/*-distill-*"))[0]
    captions = json.loads((folder / "teacher_captions.json").read_text())
    assert len(captions) == 12 and all(captions.values())
    assert json.loads((run_dir / "final" / "config.json").read_text())["model_type"] == "idefics3"
    student_eval = json.loads((run_dir / "report.json").read_text())["evaluations"]["student_eval"]
    assert student_eval["characteristics"]["params_qformer"] > 0  # the BLIP-2 student continued down the recipe
    # One tokenizer on both sides (a SmolVLM teaching a SmolVLM): token-level KD runs with the sequence-level loss.
    kd = sorted(run_dir.glob("stages/*-distill-*"))[-1]
    parts = json.loads((kd / "loss.json").read_text())["parts"]
    assert all({"ce", "kl"} <= set(p) for _, p in parts) and parts[0][1]["kl"] > 0
    # Another student: the teacher's captions come from the cache (teacher key + data fingerprint).
    again = run_inprocess("apply", str(recipe), "--out", str(run_dir), "--set", "stages.10.ground_truth_weight=0.25")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _summary(run_dir, "distill")["teacher_captions"]["hit"] is True


BAD = {
    "teacher label missing": ("  - type: distill\n    teacher: nobody\n    student: tiny-blip2-llama\n",
                              "no earlier stage is labelled 'nobody'"),
    "teacher label later": ("  - type: distill\n    teacher: late\n    student: tiny-blip2-llama\n"
                            "  - type: evaluate\n    label: late\n", "no earlier stage is labelled 'late'"),
    "student cannot load": ("  - type: evaluate\n    label: t\n  - type: distill\n    teacher: t\n    student: no-such-preset\n",
                            "student: model 'no-such-preset' is not a folder, a preset or a Hub id"),
    "token KD, other tokenizer": ("  - type: evaluate\n    label: t\n  - type: distill\n    teacher: t\n"
                                  "    student: tiny-blip2-llama\n    token_kd: {temperature: 2.0}\n",
                                  "token_kd needs the teacher and the student to share one tokenizer"),
    "SmolVLM part on a BLIP-2": ("  - type: lora_finetune\n    parts: [connector]\n",
                                 "LoRA part 'connector' does not exist in a blip2 model"),
    "BLIP-2 parts on a SmolVLM": ("  - type: remove_layers\n    qformer: {drop_top: 1}\n"
                                  "  - type: lora_finetune\n    parts: [qformer.self_attention]\n",
                                  "bad.yaml:5: stages.0: a smolvlm model with a llama language model has no removable part 'qformer'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_naming_the_line(case, tmp_path):
    model = "tiny-blip2-opt" if case == "SmolVLM part on a BLIP-2" else "tiny-smolvlm"
    stages, message = BAD[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: bad\nmodel: {model}\ndata: {{format: synthetic, train: {{size: 4}}}}\nstages:\n{stages}")
    r = run_inprocess("apply", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "bad.yaml:" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
    if case == "BLIP-2 parts on a SmolVLM":  # every problem at once, each at its line
        assert "bad.yaml:7: stages.1: LoRA part 'qformer.self_attention' does not exist in a smolvlm model" in r.stderr
