"""``--draft`` on ``compress eval`` / ``compress predict``, and ``speculative`` in a recipe, in-process on tiny models.

The target is the tiny Llama BLIP-2 preset saved as a model folder; the draft is the same model
with 3% noise on its decoder weights (it agrees with the target on some tokens, not all).
"""

from __future__ import annotations

import copy
import json

import pytest

from tests.integration.inprocess import run_inprocess

NO_TIMING = ("--no-latency", "--no-gflops", "--metrics", "rouge_1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import torch

    from compressor.data.synthetic import write_files
    from compressor.models.presets import build_preset, save_preset

    root = tmp_path_factory.mktemp("spec")
    model, proc = build_preset("tiny-blip2-llama")
    model.save_pretrained(root / "target")
    proc.save_pretrained(root / "target")
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in draft.language_model.named_parameters():
            if "layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.03 * p.std())
    draft.save_pretrained(root / "draft")
    proc.save_pretrained(root / "draft")
    return {
        "root": root,
        "target": root / "target",
        "draft": root / "draft",
        "opt": save_preset("tiny-blip2-opt", root / "opt"),
        "caps": write_files(root / "caps", 4, seed=2000, image_size=32),
    }


def test_eval_with_a_draft_records_acceptance_and_gates_on_it(folders, tmp_path):
    t, d, caps = str(folders["target"]), str(folders["draft"]), str(folders["caps"])
    plain, spec = tmp_path / "plain.json", tmp_path / "spec.json"
    for out, extra in ((plain, ()), (spec, ("--draft", d, "--num-draft-tokens", "3"))):
        r = run_inprocess("eval", t, "--data", caps, "--out", str(out), "--save-predictions", str(out.with_suffix(".p.json")),
                          *NO_TIMING, *extra)
        assert r.returncode == 0, r.stderr
    a, b = json.loads(plain.read_text()), json.loads(spec.read_text())
    assert "spec_acceptance" not in a["characteristics"]
    c = b["characteristics"]
    assert 0 < c["spec_acceptance"] < 1 and c["spec_tokens_per_call"] > 1 and c["spec_target_calls_per_caption"] > 1
    assert b["decoding"]["speculative"] == {"draft": d, "draft_backend": "torch", "draft_variant": "torch", "num_draft_tokens": 3}
    assert b["metrics"] == a["metrics"]  # the same captions
    assert json.loads(plain.with_suffix(".p.json").read_text()) == json.loads(spec.with_suffix(".p.json").read_text())
    r = run_inprocess("gate", str(spec), "--rule", "spec_acceptance:min=0.99")
    assert r.returncode == 1, r.stdout
    r = run_inprocess("gate", str(spec), "--rule", "spec_acceptance:min=0.01")
    assert r.returncode == 0, r.stdout
    r = run_inprocess("gate", str(plain), "--rule", "spec_acceptance:min=0.01")  # no draft: missing fails closed
    assert r.returncode == 1


def test_predict_with_a_draft_writes_the_same_captions(folders, tmp_path):
    t, caps = str(folders["target"]), str(folders["caps"])
    outs = []
    # the model drafting for itself; a noisy draft stopped by a confidence cut
    for extra in ((), ("--draft", t), ("--draft", str(folders["draft"]), "--draft-confidence", "0.9")):
        out = tmp_path / f"p{len(outs)}.json"
        r = run_inprocess("--json", "predict", t, "--data", caps, "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(out.read_text()))
        if len(outs) == 2:
            assert json.loads(r.stdout)["speculative"]["spec_acceptance"] == 1.0
    assert outs[0] == outs[1] == outs[2] and len({p["caption"] for p in outs[0]}) >= 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--draft", "{draft}", "--num-beams", "2"), "greedy only"),
        (("--draft", "{root}/nowhere"), "neither an ONNX export"),
        (("--draft", "{opt}"), "tokenizer differs"),
        (("--num-draft-tokens", "3"), "need --draft"),
        (("--draft-confidence", "0.4"), "need --draft"),
        (("--draft", "{draft}", "--draft-confidence", "1.5"), "--draft-confidence"),
        (("--draft", "{draft}", "--no-draft"), "contradict"),
    ],
    ids=["beams", "missing", "other-tokenizer", "k-without-draft", "confidence-without-draft", "confidence-out-of-range",
         "draft-and-no-draft"],
)
def test_bad_drafts_exit_2_and_write_nothing(folders, tmp_path, extra, message):
    fill = {k: str(v) for k, v in folders.items()}
    out = tmp_path / "e.json"
    args = [a.format(**fill) for a in extra]
    r = run_inprocess("eval", str(folders["target"]), "--data", str(folders["caps"]), "--out", str(out), *NO_TIMING, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not out.exists()


RECIPE = """\
name: spec
model: tiny-blip2-llama
data:
  format: synthetic
  eval: {{size: 4, image_size: 32}}
generation: {{max_new_tokens: 10, batch_size: 2{beams}}}
stages:
  - type: evaluate
    label: baseline
    metrics: [rouge_1]
    characteristics: {{latency: null, gflops: false}}
  - type: evaluate
    label: drafted
    metrics: [rouge_1]
    characteristics: {{latency: null, gflops: false}}
    speculative: {{draft: {draft}, num_draft_tokens: 3, min_confidence: 0.5}}
gate:
  candidate: drafted
  baseline: baseline
  rules: {{spec_acceptance: {{min: 0.99}}, rouge_1: {{max_drop: 0.0}}}}
"""


def test_recipe_evaluates_with_an_earlier_stage_as_draft(folders, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(beams="", draft="baseline"))
    r = run_inprocess("apply", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    ev = report["evaluations"]["drafted"]
    assert ev["characteristics"]["spec_acceptance"] == 1.0  # the model drafting for itself
    assert ev["metrics"] == report["evaluations"]["baseline"]["metrics"] and report["gate"]["passed"]
    assert ev["decoding"]["speculative"]["num_draft_tokens"] == 3 and ev["decoding"]["speculative"]["min_confidence"] == 0.5


@pytest.mark.parametrize(
    "beams, draft, message",
    [
        ("", "nobody", "no earlier stage is labelled 'nobody'"),
        ("", "./no/such/folder", "neither an ONNX export"),
        (", num_beams: 3", "baseline", "greedy only"),
    ],
    ids=["unknown-label", "missing-folder", "beams"],
)
def test_recipe_drafts_are_checked_before_running(folders, tmp_path, beams, draft, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(beams=beams, draft=draft))
    r = run_inprocess("apply", str(recipe), "--out", str(tmp_path / "run"), "--dry-run")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "run" / "stages").exists()


def test_export_draft_options_need_a_draft(folders, tmp_path):
    """`compress export --draft-confidence` records a cut with a bundled draft: alone it is refused."""
    out = tmp_path / "x"
    r = run_inprocess("export", str(folders["target"]), "--onnx", "--out", str(out), "--draft-confidence", "0.4")
    assert r.returncode == 2 and "--draft-confidence go with --draft DIR" in r.stderr, r.stderr
    r = run_inprocess("export", str(folders["target"]), "--safetensors", "--out", str(out), "--draft", str(folders["draft"]),
                      "--draft-confidence", "0.4")
    assert r.returncode == 2 and "add --onnx" in r.stderr, r.stderr
    assert not out.exists()
