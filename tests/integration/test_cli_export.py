"""`compress export` end to end (default MODEL_DIR and --out, exit 2 on bad input, nothing written),
and a recipe that exports ONNX and scores it with `backend: onnx` through the same harness."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from compressor.models.presets import save_preset

    tmp = tmp_path_factory.mktemp("cliexport")
    save_preset("tiny-blip2-opt", tmp / "runs" / "a" / "final")
    return tmp


def test_export_defaults_to_newest_final(workdir):
    res = run_cli("--json", "export", "--onnx", "--safetensors", "--exporter", "legacy", "--no-optimize", cwd=workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    run = workdir / "runs" / "a"
    summary = json.loads(res.stdout)
    assert summary["onnx"]["folder"] == str((run / "onnx").resolve())
    meta = json.loads((run / "onnx" / "export.json").read_text())
    assert meta["family"] == "blip2" and meta["kind"] == "causal" and meta["num_query_tokens"] == 8
    assert meta["characteristics"]["params_total"] > 0 and meta["token_ids"]["eos_token_id"] == [2]
    assert json.loads((run / "onnx" / "validation.json").read_text())["passed"] is True
    assert (run / "safetensors" / "SHA256SUMS").is_file() and (run / "safetensors" / "model.safetensors").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]


def test_not_a_model_exits_2_and_writes_nothing(tmp_path, workdir):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    res = run_cli("export", str(junk), "--onnx")
    assert res.returncode == 2 and "not a model folder" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["junk"]
    res = run_cli("export", str(workdir / "runs" / "a" / "final"))  # nothing asked for
    assert res.returncode == 2 and "--onnx" in res.stderr
    res = run_cli("export", "--onnx", cwd=tmp_path)  # no runs/*/final here
    assert res.returncode == 2 and "runs/*/final" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["junk"]


def test_presets_export_and_stage_folders_name_their_model(tmp_path, workdir):
    """`compress export tiny-blip2-opt` exports the preset as `inspect` takes it; `eval`/`predict` on a run's
    stage folder use the model/ inside it (issue 20, newcomer friction)."""
    from tests.integration.inprocess import run_inprocess

    out = tmp_path / "st"
    res = run_inprocess("export", "tiny-blip2-opt", "--safetensors", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "SHA256SUMS").is_file() and (out / "config.json").is_file()
    res = run_inprocess("export", "tiny-nothing", "--safetensors", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "nor a preset" in res.stderr and "tiny-blip2-opt" in res.stderr
    assert not (tmp_path / "x").exists()

    from compressor.commands.targets import resolve_target_path

    stage = tmp_path / "stages" / "01-merge_adapters-abc"
    stage.mkdir(parents=True)
    (stage / "model").symlink_to(workdir / "runs" / "a" / "final")
    assert resolve_target_path(str(stage)) == ((stage / "model").resolve(), "torch")


RECIPE = """\
name: onnx-eval
model: tiny-blip2-opt
data:
  format: synthetic
  train: {size: 8}
  eval: {size: 8}
generation: {max_new_tokens: 8, batch_size: 4}
stages:
  - type: evaluate
    label: torch
    metrics: [bleu_4, cider]
    characteristics: {latency: null, gflops: false}
  - type: export
    formats: [onnx]
    onnx: {exporter: legacy, quantize: int8}
  - type: evaluate
    label: onnx_int8
    backend: onnx
    metrics: [bleu_4, cider]
    characteristics: {latency: {batch_sizes: [1], repeats: 1}, gflops: false}
gate:
  candidate: onnx_int8
  baseline: torch
  rules: {params_total: {max_ratio: 1.0}}
"""


def test_recipe_exports_onnx_and_scores_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    res = run_cli("apply", str(recipe), "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    ev = report["evaluations"]["onnx_int8"]
    assert set(ev["metrics"]) == {"bleu_4", "cider"}
    assert ev["characteristics"]["params_total"] == report["evaluations"]["torch"]["characteristics"]["params_total"]
    assert ev["characteristics"]["latency_p50_s"] > 0
    onnx_eval = json.loads(next((run / "stages").glob("02-evaluate-*/eval.json")).read_text())
    assert onnx_eval["decoding"]["backend"] == "onnxruntime" and onnx_eval["decoding"]["variant"] == "int8"
    assert (run / "onnx" / "export.json").is_file() and (run / "onnx" / "decoder.int8.onnx").is_file()
