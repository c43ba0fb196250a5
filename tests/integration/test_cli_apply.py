"""`compress apply` end to end on a tiny preset: run directory, report, gate, push dry run, caching,
kill-and-resume, and cache invalidation by model path and data files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

RECIPE = """\
name: tiny
model: {model}
seed: 0
data:
  format: {fmt}
{data}
generation: {{max_new_tokens: 8, batch_size: 8}}
stages:
  - type: lora_finetune
    parts: [qformer.self_attention, language_model.attention]
    lora: {{r: 4, lora_alpha: 8}}
    train: {{steps: 3, batch_size: 8, learning_rate: 1.0e-3}}
  - type: merge_adapters
  - type: evaluate
    label: baseline
    metrics: [bleu_4, cider]
    characteristics: {{latency: {{batch_sizes: [1, 2], repeats: 1}}}}
  - type: remove_layers
    qformer: {{drop_top: 2}}
    language_model: {{drop_top: 2}}
  - type: heal
    loss: distill
    distill: {{teacher: baseline}}
    parts: [language_model.attention]
    train: {{steps: {heal_steps}, batch_size: 8, learning_rate: 1.0e-3{heal_extra}}}
  - type: merge_adapters
  - type: export
  - type: evaluate
    label: candidate
    metrics: [bleu_4, cider]
    characteristics: {{latency: {{batch_sizes: [1, 2], repeats: 1}}}}
gate:
  candidate: candidate
  baseline: baseline
  rules: {gate}
push: {{repo_id: me/tiny-compressed, dry_run: true}}
"""
SYNTHETIC = "  train: {size: 16}\n  eval: {size: 8}"


def write_recipe(tmp_path: Path, model="tiny-blip2-opt", gate="{params_total: {max_ratio: 0.95}}", heal_steps=3,
                 fmt="synthetic", data=SYNTHETIC, name="r.yaml", heal_extra="") -> Path:
    p = tmp_path / name
    p.write_text(RECIPE.format(model=model, gate=gate, heal_steps=heal_steps, fmt=fmt, data=data, heal_extra=heal_extra))
    return p


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def statuses(run: Path) -> list[str]:
    return [s["status"] for s in manifest(run)["stages"]]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apply")
    recipe = write_recipe(tmp)
    res = run_cli("apply", str(recipe), "--out", str(tmp / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, recipe, tmp / "run", res


def test_run_directory_layout(finished_run):
    _, _, run, res = finished_run
    for name in ("recipe.resolved.yaml", "manifest.json", "report.json", "report.md", "gate.json", "gate.xml"):
        assert (run / name).is_file(), name
    stages = sorted(p.name for p in (run / "stages").iterdir())
    assert [s.split("-")[1] for s in stages] == [
        "lora_finetune", "merge_adapters", "evaluate", "remove_layers", "heal", "merge_adapters", "export", "evaluate",
    ]
    assert not list((run / "stages").glob(".tmp-*"))
    assert statuses(run) == ["ran"] * 8
    assert (run / "final" / "recipe.resolved.yaml").is_file()
    assert "baseline" in res.stdout and "candidate" in res.stdout and "gate: PASSED" in res.stdout


def test_final_is_hardlinked_and_reloads_exactly(finished_run):
    from transformers import Blip2ForConditionalGeneration

    _, _, run, _ = finished_run
    final = run / "final" / "model.safetensors"
    last_model = sorted((run / "stages").glob("05-merge_adapters-*"))[0] / "model" / "model.safetensors"
    assert os.stat(final).st_ino == os.stat(last_model).st_ino  # a hard link, not a copy
    model, info = Blip2ForConditionalGeneration.from_pretrained(str(run / "final"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.num_hidden_layers == 4 and len(model.language_model.model.decoder.layers) == 4
    assert model.config.qformer_config.num_hidden_layers == 2


def test_report_has_both_labels_and_characteristics(finished_run):
    _, _, run, _ = finished_run
    report = json.loads((run / "report.json").read_text())
    base, cand = report["evaluations"]["baseline"], report["evaluations"]["candidate"]
    for ev in (base, cand):
        assert set(ev["metrics"]) == {"bleu_4", "cider"}
        for key in ("params_total", "params_trainable", "gflops", "latency_p50_s", "size_mb"):
            assert ev["characteristics"][key] is not None, key
    assert cand["characteristics"]["params_total"] < base["characteristics"]["params_total"]
    assert cand["characteristics"]["gflops"] < base["characteristics"]["gflops"]
    assert report["gate"]["passed"] is True
    md = (run / "report.md").read_text()
    assert "| cider |" in md and "## Gate" in md


def test_push_dry_run_writes_the_upload_folder(finished_run):
    _, _, run, _ = finished_run
    files = {p.name for p in (run / "push").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "recipe.resolved.yaml"} <= files
    assert json.loads((run / "report.json").read_text())["push"]["dry_run"] is True


def test_rerun_reuses_every_stage(finished_run):
    _, recipe, run, _ = finished_run
    before = sha(run / "final" / "model.safetensors")
    res = run_cli("apply", str(recipe), "--out", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    assert statuses(run) == ["reused"] * 8
    assert sha(run / "final" / "model.safetensors") == before


def test_changed_stage_output_is_not_trusted(finished_run):
    """A stage folder whose files no longer match their recorded hashes reruns."""
    tmp, recipe, run, _ = finished_run
    removal = sorted((run / "stages").glob("03-remove_layers-*"))[0] / "removal.json"
    removal.write_text(removal.read_text() + " ")
    res = run_cli("apply", str(recipe), "--out", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    st = statuses(run)
    assert st[:3] == ["reused"] * 3 and st[3] == "ran" and st[4:] == ["reused"] * 4


def test_gate_failure_exits_1_writes_report_and_skips_push(tmp_path):
    recipe = write_recipe(tmp_path, gate="{cider: {min: 1000}}")
    res = run_cli("apply", str(recipe), "--out", str(tmp_path / "run"))
    assert res.returncode == 1, res.stderr[-2000:]
    assert "gate failed" in res.stderr and "cider" in res.stderr
    gate = json.loads((tmp_path / "run" / "gate.json").read_text())
    assert gate["passed"] is False and gate["verdicts"][0]["key"] == "cider"
    assert (tmp_path / "run" / "report.md").is_file()
    assert not (tmp_path / "run" / "push").exists()
    assert "<failure" in (tmp_path / "run" / "gate.xml").read_text()


def test_misspelt_key_exits_2_and_writes_nothing(tmp_path):
    recipe = write_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("    qformer: {drop_top: 2}", "    qformer: {drop_tpo: 2}"))
    res = run_cli("apply", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2
    assert f"{recipe}:20: stages.3.qformer.drop_tpo" in res.stderr
    assert "Did you mean 'drop_top'?" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_qformer_pattern_break_exits_2_before_loading(tmp_path):
    recipe = write_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("qformer: {drop_top: 2}", "qformer: {layers: [1]}"))
    res = run_cli("apply", str(recipe), "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert "cross-attention" in res.stderr and "Nearest valid choice" in res.stderr
    assert not (tmp_path / "run").exists()


def test_model_path_change_reruns_stages(tmp_path):
    from compressor.models.presets import save_preset

    a = save_preset("tiny-blip2-opt", tmp_path / "model_a")
    b = tmp_path / "model_b"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())  # same weights, another path
    run = tmp_path / "run"
    res = run_cli("apply", str(write_recipe(tmp_path, model=str(a), name="a.yaml")), "--out", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    first = {s["folder"] for s in manifest(run)["stages"]}
    res = run_cli("apply", str(write_recipe(tmp_path, model=str(b), name="b.yaml")), "--out", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    assert statuses(run) == ["ran"] * 8
    assert not first & {s["folder"] for s in manifest(run)["stages"]}


def test_data_file_change_reruns_stages(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    anns = {"images": [], "annotations": []}
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 90)).save(images / f"{i}.png")
        anns["images"].append({"id": i, "file_name": f"{i}.png"})
        anns["annotations"].append({"id": i, "image_id": i, "caption": f"a square of colour number {i}"})
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(anns))
    data = f"  train: {{annotations: {ann}, images: {images}}}\n  eval: {{annotations: {ann}, images: {images}}}"
    recipe = write_recipe(tmp_path, fmt="coco", data=data)
    run = tmp_path / "run"
    assert run_cli("apply", str(recipe), "--out", str(run)).returncode == 0
    anns["annotations"][0]["caption"] = "a different caption"
    ann.write_text(json.dumps(anns))
    res = run_cli("apply", str(recipe), "--out", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    assert statuses(run) == ["ran"] * 8


def test_killed_run_resumes_and_equals_uninterrupted_run(tmp_path):
    """SIGKILL during the heal stage after it saved its training state; --resume redoes only unfinished
    stages and continues the heal from its newest saved step (not step 0); results are identical."""
    recipe = write_recipe(tmp_path, heal_steps=300, heal_extra=", save_every: 20")
    ref = run_cli("apply", str(recipe), "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "compressor.cli", "-q", "apply", str(recipe), "--out", str(run)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((run / "stages").glob(".tmp-04-heal-*/checkpoints/step-*")):
        assert proc.poll() is None, "the run ended before the heal stage saved its training state"
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((run / "stages").glob(".tmp-04-heal-*")), "killed outside the heal stage"
    assert not list((run / "stages").glob("04-heal-*")), "a half-written stage looks complete"

    res = run_cli("apply", str(recipe), "--out", str(run))
    assert res.returncode == 2 and "--resume" in res.stderr

    saved = sorted((run / "stages").glob(".tmp-04-heal-*/checkpoints/step-*"))[-1].name
    step = int(saved.split("-")[1])
    res = run_cli("apply", str(recipe), "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming training at step {step} of 300" in res.stderr, res.stderr[-2000:]
    assert statuses(run) == ["reused"] * 4 + ["ran"] * 4
    assert not list((run / "stages").glob(".tmp-*"))
    assert sha(run / "final" / "model.safetensors") == sha(tmp_path / "ref" / "final" / "model.safetensors")
    ref_stages = [s["folder"] for s in manifest(tmp_path / "ref")["stages"]]
    assert [s["folder"] for s in manifest(run)["stages"]] == ref_stages
