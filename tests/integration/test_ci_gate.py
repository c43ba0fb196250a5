"""The CI use, end to end: export a model that really captions (the shipped shapes teacher), remove
most of its language-model layers WITHOUT healing, `compress eval` both exports, and
`compress gate` the pruned one against the unpruned one: exit 1 and a JUnit failure naming cider.

The safetensors path always runs; the ONNX path runs when the ONNX exporter and its runtime
captioner are installed (exporters.onnx).
"""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest

from compressor.data.synthetic import write_files
from tests.conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1"}
RECIPE = """\
name: ci-export
model: shapes-teacher
stages:
  - type: export                 # the unpruned export: the baseline
    formats: {formats}
  - type: remove_layers
    language_model: {{drop_top: 6}}   # OPT 8 -> 2 layers, no healing
  - type: export                 # the candidate
    formats: {formats}
"""
EVAL = ("--metrics", "bleu_4,cider", "--latency-batch-sizes", "1,4", "--latency-repeats", "1", "--latency-warmup", "1")


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_ci_gate_catches_unhealed_layer_removal(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("exporters.onnx")
    data = write_files(tmp_path / "data", 16, seed=2000)
    recipe = tmp_path / "ci.yaml"
    recipe.write_text(RECIPE.format(formats=f"[{fmt}]"))
    run = tmp_path / "run"
    r = run_cli("apply", str(recipe), "--out", str(run), env=ENV)
    assert r.returncode == 0, r.stderr
    exports = sorted(p / fmt for p in (run / "stages").glob("*-export-*"))
    assert len(exports) == 2 and all(p.is_dir() for p in exports)
    base_dir, cand_dir = exports
    if fmt == "safetensors":
        layers = [json.loads((p / "config.json").read_text())["text_config"]["num_hidden_layers"] for p in exports]
        assert layers == [8, 2]

    evals = {}
    for name, folder in (("baseline", base_dir), ("candidate", cand_dir)):
        out = tmp_path / f"{name}_eval.json"
        r = run_cli("eval", str(folder), "--data", str(data), "--out", str(out), "--label", name, *EVAL, env=ENV)
        assert r.returncode == 0, r.stderr
        evals[name] = json.loads(out.read_text())
    base, cand = evals["baseline"], evals["candidate"]
    assert base["decoding"]["backend"] == ("torch" if fmt == "safetensors" else "onnxruntime")
    assert base["metrics"]["cider"] > cand["metrics"]["cider"] + 20  # the damage is real
    assert cand["characteristics"]["params_total"] < base["characteristics"]["params_total"]

    junit, gate_out = tmp_path / "gate.xml", tmp_path / "gate.json"
    r = run_cli("gate", str(tmp_path / "candidate_eval.json"), "--baseline", str(tmp_path / "baseline_eval.json"),
                "--rule", "cider:max_drop=2", "--rule", "params_total:max_ratio=1.0",
                "--junit", str(junit), "--out", str(gate_out))
    assert r.returncode == 1, r.stdout + r.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["cider:max_drop"]
    assert "cider" in failed[0].find("failure").get("message")
    g = json.loads(gate_out.read_text())
    assert g["passed"] is False and [v["passed"] for v in g["verdicts"]] == [False, True]

    # the same gate passes the baseline against itself (the gate is not simply always failing)
    r = run_cli("gate", str(tmp_path / "baseline_eval.json"), "--baseline", str(tmp_path / "baseline_eval.json"),
                "--rule", "cider:max_drop=2")
    assert r.returncode == 0, r.stderr
