"""`compress plan`: parameter counts and GFLOPs on the meta device, checked against built models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.planning import meta_gflops, meta_model, plan_recipe, prompt_lengths
from compressor.recipe.loader import load_recipe
from tests.conftest import REPO, run_cli

OPT_LAYER = 78_676_480  # one OPT-2.7B decoder layer (stack-facts §7: 78.68M)


def _recipe(tmp_path: Path, model: str, stages: str, name: str = "p.yaml", extra: str = "") -> Path:
    p = tmp_path / name
    p.write_text(f"name: plan-test\nmodel: {model}\n{extra}stages:\n{stages}")
    return p


def test_llm28_q8_matches_the_published_architecture():
    plan = plan_recipe(load_recipe(REPO / "recipes" / "llm28_q8.yaml"))
    b, a = plan["before"], plan["after"]
    assert b["params_total"] == 3_744_761_856  # 3.7447B (stack-facts §7, real-material.md)
    assert b["params_vision"] == 985_952_256 and b["params_language_model"] == 2_651_678_720
    assert b["params_qformer"] == 105_162_240 and b["params_projection"] == 1_968_640
    # Top 4 OPT layers (4 × 78.68M) and top 4 Q-Former layers (2 × 10.43M + 2 × 7.09M): -349.75M, -9.34 %.
    assert a["params_language_model"] == b["params_language_model"] - 4 * OPT_LAYER
    assert a["params_qformer"] == b["params_qformer"] - 2 * 10_434_816 - 2 * 7_087_872
    assert a["params_total"] == 3_395_010_560  # the study's 3.39B
    assert 0 < a["gflops"] < b["gflops"]
    lora = [s for s in plan["stages"] if s["type"] == "lora_finetune"]
    assert lora and all(sum(c.values()) >= 1 for c in lora[0]["lora_matches"].values())


@pytest.mark.parametrize("k", [0, 2, 6])  # 0: nothing removed (a `search:` space point)
def test_drop_top_k_changes_exactly_k_opt_layers(tmp_path, k):
    r = _recipe(tmp_path, "Salesforce/blip2-opt-2.7b", f"  - type: remove_layers\n    language_model: {{drop_top: {k}}}\n")
    plan = plan_recipe(load_recipe(r), gflops=False)
    assert plan["before"]["params_total"] - plan["after"]["params_total"] == k * OPT_LAYER
    assert plan["stages"][0]["removed"] == {"language_model": list(range(32 - k, 32))}


PRESETS = ["tiny-blip2-opt", "tiny-blip2-llama", "tiny-blip2-t5", "tiny-instructblip", "tiny-blip", "small-blip2-opt"]


@pytest.mark.parametrize("preset", PRESETS)
def test_plan_equals_the_built_model(tmp_path, preset):
    """Before: the built preset's count; after: the count of the built preset with the same surgery."""
    from compressor.families import family_for_config
    from compressor.models.presets import build_preset
    from compressor.stages.remove_layers import RemoveLayersStage
    from compressor.surgery import plan_removals, remove_layers

    lm = "{encoder: {drop_top: 1}, decoder: {drop_top: 2}}" if preset == "tiny-blip2-t5" else "{drop_top: 2}"
    qf = "" if preset == "tiny-blip" else "    qformer: {drop_top: 2}\n"
    stages = f"  - type: remove_layers\n{qf}    language_model: {lm}\n    vision: {{drop_top: 1}}\n"
    plan = plan_recipe(load_recipe(_recipe(tmp_path, preset, stages)), gflops=False)
    model, _ = build_preset(preset)
    family = family_for_config(model.config)
    assert plan["before"]["params_total"] == sum(p.numel() for p in model.parameters())
    stage = load_recipe(_recipe(tmp_path, preset, stages, "q.yaml")).recipe.stages[0]
    assert isinstance(stage, RemoveLayersStage)
    for part, removed in plan_removals(model.config, family, stage).items():
        remove_layers(model, family, part, removed)
    assert plan["after"]["params_total"] == sum(p.numel() for p in model.parameters())
    assert plan["after"]["params_total"] < plan["before"]["params_total"]


@pytest.mark.parametrize("preset,prompt,beams", [("tiny-blip2-opt", "", 2), ("tiny-blip2-llama", "a photo of", 1),
                                                 ("tiny-blip2-t5", "a photo of", 2), ("tiny-instructblip", "describe", 1),
                                                 ("tiny-blip", "a photo of", 2)])
def test_meta_gflops_equal_flop_counter_around_real_generate(preset, prompt, beams):
    """The meta replay counts what `evaluate` counts with FlopCounterMode around the real generate."""
    from PIL import Image

    from compressor.families import family_for_config
    from compressor.models.batches import generation_inputs
    from compressor.models.presets import build_preset
    from eval.characteristics import count_gflops

    model, proc = build_preset(preset)
    family = family_for_config(model.config)
    side = model.config.vision_config.image_size
    inputs = generation_inputs(family, proc, [Image.new("RGB", (side, side), (200, 30, 30))], [prompt], "cpu")
    n = 9
    real = count_gflops(lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, num_beams=beams, do_sample=False), model)
    meta, fam = meta_model(model.config)
    lm_tokens, q_tokens, exact = prompt_lengths(fam, model.config, proc, prompt)
    assert exact
    planned = meta_gflops(meta, fam, lm_tokens, q_tokens, n, beams)
    assert real > 0 and planned == pytest.approx(real, rel=1e-12, abs=0)
    # Teeth: one token more or a beam more changes the figure.
    assert meta_gflops(meta, fam, lm_tokens, q_tokens, n + 1, beams) > planned
    assert meta_gflops(meta, fam, lm_tokens, q_tokens, n, beams + 1) > planned


def test_cpu_attention_is_counted():
    """FlopCounterMode alone counts 0 for CPU SDPA; count_gflops adds torch's SDPA formula."""
    import torch

    from eval.characteristics import count_gflops

    q = torch.randn(1, 4, 16, 8)
    got = count_gflops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert got == pytest.approx(2 * 2 * 4 * 16 * 16 * 8 / 1e9)


def test_cli_unknown_hub_id_needs_config(tmp_path):
    r = _recipe(tmp_path, "someone/blip2-custom", "  - type: remove_layers\n    language_model: {drop_top: 1}\n")
    res = run_cli("plan", str(r), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "--config" in res.stderr and "someone/blip2-custom" in res.stderr
    assert list(tmp_path.iterdir()) == [r]  # nothing written
    from compressor.models.presets import build_preset

    cfg = tmp_path / "t5-config.json"
    build_preset("tiny-blip2-t5")[0].config.to_json_file(str(cfg))
    r2 = _recipe(tmp_path, "someone/blip2-custom", "  - type: remove_layers\n    language_model: {encoder: {drop_top: 1}, decoder: {drop_top: 2}}\n", "t5.yaml")
    res = run_cli("--json", "plan", str(r2), "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"]["language_model"] == "t5"
    assert out["before"]["params_total"] - out["after"]["params_total"] > 0
    assert out["after"]["gflops"] < out["before"]["gflops"]
    res = run_cli("plan", str(r2), "--config", str(cfg), "--no-gflops", cwd=tmp_path)
    assert res.returncode == 0 and "params_language_model" in res.stdout and "gflops" not in res.stdout
