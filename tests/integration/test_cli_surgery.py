"""Model surgery through the CLI: importance-based removal after width pruning, checks that exit 2
before any weight is read, `compress inspect`, and a 2-process `accelerate launch` run that writes
the same artifacts as one process with a decreasing loss."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, run_cli

DATA = """\
data:
  format: synthetic
  train: {size: 32, image_size: 32}
  eval: {size: 4, image_size: 32}
generation: {max_new_tokens: 6, batch_size: 4}
"""


def recipe(tmp_path: Path, body: str, model: str = "tiny-blip2-opt", name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"name: surgery\nmodel: {model}\nseed: 0\n{DATA}stages:\n{body}")
    return p


def test_prune_then_remove_by_importance_then_export_and_evaluate(tmp_path):
    body = """\
  - type: prune_width
    mlp: {ratio: 0.25}
    heads: {ratio: 0.25}
  - type: remove_layers
    qformer: {count: 2, select: block_influence}
    language_model: {count: 2, select: angular_distance}
    calibration: {batches: 2, batch_size: 4}
  - type: export
  - type: evaluate
    label: small
    metrics: [bleu_4, cider]
    characteristics: {latency: null, gflops: false}
"""
    run = tmp_path / "run"
    res = run_cli("apply", str(recipe(tmp_path, body)), "--out", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    stage = next((run / "stages").glob("01-remove_layers-*"))
    scores = json.loads((stage / "importance.json").read_text())
    assert (stage / "importance.png").stat().st_size > 1000
    removal = {r["part"]: r for r in json.loads((stage / "removal.json").read_text())["removed"]}
    qf, lm = scores["parts"]["qformer"], scores["parts"]["language_model"]
    assert len(qf["block_influence"]) == 4 and len(lm["block_influence"]) == 6
    assert removal["qformer"]["removed"] == qf["removed"] and removal["language_model"]["removed"] == lm["removed"]
    # angular_distance removes a contiguous block: the one with the smallest distance.
    start = lm["removed"][0]
    assert lm["removed"] == [start, start + 1]
    assert lm["angular_distance"]["2"][start] == min(lm["angular_distance"]["2"])
    kept = removal["qformer"]["kept"]
    assert all((old % 2 == 0) == (new % 2 == 0) for new, old in enumerate(kept))  # cross-attention pattern kept
    for folder in (run / "final", next((run / "stages").glob("02-export-*")) / "safetensors"):
        assert (folder / "shape_plan.json").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["evaluations"]["small"]["characteristics"]["params_total"] < 191_616


def _corrupt_model(tmp_path: Path) -> Path:
    from compressor.models.presets import save_preset

    folder = save_preset("tiny-blip2-opt", tmp_path / "model")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)  # any attempt to read the weights fails
    return folder


def test_bad_choices_exit_2_before_reading_weights(tmp_path):
    """Every problem is found from the config alone and reported at once; nothing is written."""
    model = _corrupt_model(tmp_path)
    body = """\
  - type: lora_finetune
    parts: [language_model.attention]
    lora: {target_modules: [no_such_linear]}
  - type: merge_adapters
  - type: lora_finetune
    parts: [language_model.attention]
    quantization: {bits: 4}
  - type: merge_adapters
  - type: remove_layers
    qformer: {layers: [1]}
"""
    res = run_cli("apply", str(recipe(tmp_path, body, model=str(model))), "--out", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    assert "3 problems in the recipe" in res.stderr and "Traceback" not in res.stderr
    assert "stages.0: LoRA target target_modules matched no module" in res.stderr
    assert "stages.2.quantization: QLoRA on a 4-bit base (bitsandbytes) needs a CUDA GPU" in res.stderr
    assert "stages.4: qformer: removing layers [1]" in res.stderr and "Nearest valid choice: layers: [" in res.stderr
    assert not (tmp_path / "run").exists()
    # Teeth: a valid removal on the same folder does read the weights, and fails on them.
    ok = recipe(tmp_path, "  - type: remove_layers\n    qformer: {drop_top: 2}\n", model=str(model), name="ok.yaml")
    res = run_cli("apply", str(ok), "--out", str(tmp_path / "run2"))
    assert res.returncode == 3 and "cross-attention" not in res.stderr


def invoke(*args: str):
    """``compress ARGS`` in this process (click's runner): cheaper than a subprocess for quick commands."""
    from click.testing import CliRunner

    from compressor.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_t5_refusals_exit_2_before_writing(tmp_path):
    body = """\
  - type: prune_width
    heads: {ratio: 0.5}
  - type: remove_layers
    language_model: {encoder: {drop_top: 2}}
"""
    res = invoke("apply", str(recipe(tmp_path, body, model="tiny-blip2-t5")), "--out", str(tmp_path / "run"))
    assert res.exit_code == 2, res.output
    assert "relative position bias" in res.stderr and "decoder deeper than the encoder" in res.stderr
    assert not (tmp_path / "run").exists()


def test_inspect_prints_parts_and_importance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("inspect", "tiny-blip2-llama")
    assert res.exit_code == 0, res.output
    assert re.search(r"language_model\s+[\d,]+ \(\d+\.\d%\)", res.stdout)
    assert "cross-attention at [0, 2]" in res.stdout
    assert re.search(r"language_model\.mlp\s+language_model 18", res.stdout)
    assert not (tmp_path / "inspect").exists()
    res = invoke("--json", "inspect", "tiny-blip2-t5", "--importance", "--limit", "8",
                 "--part", "language_model.decoder", "--out", str(tmp_path / "imp"))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["family"] == "blip2" and info["language_model"] == "t5"
    dec = info["importance"]["parts"]["language_model.decoder"]
    assert len(dec["block_influence"]) == 4 and all(v > 0 for v in dec["block_influence"])
    assert (tmp_path / "imp" / "importance.png").stat().st_size > 1000
    res = invoke("inspect", "tiny-blip2-opt", "--importance", "--part", "languge_model", "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "Did you mean" in res.stderr
    res = invoke("inspect", "tiny-blip2-opt", "--part", "qformer")
    assert res.exit_code == 2 and "go with --importance" in res.stderr


def _launch(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compressor.cli", *args]
    if nproc > 1:
        # `--multi_gpu` starts torchrun-style workers; without GPUs, accelerate picks gloo on the CPU
        # (`--cpu` would start a single process).
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "compressor.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _files(run: Path) -> list[str]:
    out = []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if p.is_file() and not rel.startswith("inputs/"):
            out.append(re.sub(r"-[0-9a-f]{10}(/|$)", r"\1", rel))
    return out


def test_two_processes_write_the_same_artifacts_with_decreasing_loss(tmp_path):
    body = """\
  - type: lora_finetune
    parts: [language_model.attention, language_model.mlp]
    lora: {r: 8, lora_alpha: 16, lora_dropout: 0.0}
    train: {steps: 10, batch_size: 4, learning_rate: 2.0e-2, save_every: 4}
  - type: merge_adapters
  - type: evaluate
    label: tuned
    metrics: [bleu_4]
    characteristics: {latency: null, gflops: false}
"""
    r = recipe(tmp_path, body)
    runs = {}
    for n in (1, 2):
        res = _launch(["-q", "apply", str(r), "--out", str(tmp_path / f"run{n}")], tmp_path, n)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[n] = tmp_path / f"run{n}"
    assert _files(runs[1]) == _files(runs[2])
    assert not [p for p in runs[2].iterdir() if p.name.startswith(".rank")]  # scratch folders removed
    assert not list((runs[2] / "stages").glob(".tmp-*"))  # training states saved by both processes, then removed
    for n, run in runs.items():
        stage = next((run / "stages").glob("00-lora_finetune-*"))
        losses = [v for _, v in json.loads((stage / "loss.json").read_text())["loss"]]
        assert len(losses) == 10
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, (n, losses)
        record = json.loads((stage / "stage.json").read_text())
        assert record["key_parts"].get("processes") == (2 if n == 2 else None)
    manifest = json.loads((runs[2] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [s["status"] for s in manifest["stages"]] == ["ran"] * 3
