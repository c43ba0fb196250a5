"""`make demo`'s recipe, as shipped: completes, passes its gate, and writes a reloadable final model."""

from __future__ import annotations

import json

from tests.conftest import REPO, run_cli


def test_demo_recipe_end_to_end(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    run = tmp_path / "demo"
    res = run_cli("apply", str(REPO / "recipes" / "demo.yaml"), "--out", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    base = report["evaluations"]["baseline"]["metrics"]
    cand = report["evaluations"]["candidate"]["metrics"]
    assert set(base) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}
    assert base["cider"] >= 50 and cand["cider"] >= 0.9 * base["cider"]
    assert report["gate"]["passed"] is True
    # the candidate is the exported ONNX graphs run by ONNX Runtime, with every headline figure
    cand_rec = report["evaluations"]["candidate"]
    assert cand_rec["decoding"]["backend"] == "onnxruntime"
    for key in ("params_total", "params_trainable", "gflops", "avg_inference_s"):
        assert cand_rec["characteristics"][key] is not None, key
    base_gflops = report["evaluations"]["baseline"]["characteristics"]["gflops"]
    assert 0 < cand_rec["characteristics"]["gflops"] < base_gflops
    assert (run / "push" / "onnx" / "export.json").is_file()
    assert (run / "report.md").is_file() and (run / "push" / "model.safetensors").is_file()
    model, info = Blip2ForConditionalGeneration.from_pretrained(str(run / "final"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.num_hidden_layers == 6 and model.config.qformer_config.num_hidden_layers == 2
    assert "baseline" in res.stdout and "gate: PASSED" in res.stdout
