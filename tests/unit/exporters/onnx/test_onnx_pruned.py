"""Head-pruned models export to ONNX (issue 20, item 4): `prune_width heads: {ratio: 0.5}` then an
ONNX export failed with "Sizes of tensors must match" because every layer's past K/V was declared
with the config's head count. The graphs now follow each layer's own heads (``layer_kv_heads`` in
export.json when they differ), are validated like every export, and caption like PyTorch; the
model card shows the loader that works for such a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx_helpers import determined_rows

from tests.integration.inprocess import run_inprocess

CASES = [  # (tiny-blip2-llama, grouped KV heads: the recipe test below)
    ("tiny-blip2-opt", []),
    ("tiny-blip", ["*.layer.0.*"]),  # the BLIP topology: self-attention pruned (not layer 0), cross-attention not
]


@pytest.mark.parametrize("name,ignored", CASES, ids=[c[0] for c in CASES])
def test_head_pruned_model_exports_validated_and_captions_like_pytorch(tmp_path, images, name, ignored):
    import torch

    from compressor.evaluation.captioner import TorchCaptioner, generate_kwargs
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs
    from compressor.models.presets import build_preset
    from compressor.pruning import apply_width, plan_width
    from compressor.recipe.schema import GenerationSpec
    from exporters.onnx import OnnxCaptioner, OnnxOptions, export_model_onnx, read_export_json

    model, proc = build_preset(name)
    family = family_for_model(model)
    config_heads = family.layer_kv_heads(model)
    apply_width(model, family, plan_width(model, family, 0.5, None, "magnitude", ignored))
    heads = family.layer_kv_heads(model)
    assert heads != config_heads  # teeth: the layers now differ from the config
    out = tmp_path / "onnx"
    export_model_onnx(model, proc, out, OnnxOptions(exporter="legacy"))
    meta = read_export_json(out)
    assert json.loads((out / "validation.json").read_text())["passed"] is True
    assert meta.get("layer_kv_heads", [meta["num_kv_heads"]] * meta["num_layers"]) == list(heads)
    if ignored:
        assert len(set(heads)) == 2 and meta["layer_kv_heads"][0] == config_heads[0]

    prompts = ["", "a photo of a", "x", "what is in the picture"]
    gen = GenerationSpec(max_new_tokens=8, batch_size=4)
    inputs = generation_inputs(family, proc, images, prompts)
    with torch.inference_mode():
        ref = model.generate(**inputs, **generate_kwargs(gen)).numpy()
    rows = determined_rows(model, proc, images, prompts, generate_kwargs(gen))
    assert rows.sum() >= 2, rows
    cap = OnnxCaptioner(out, gen, variant="plain")
    got = cap.generate({k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_array_equal(got[rows][:, : ref.shape[1]], ref[rows])
    ours, theirs = cap.caption(images, prompts), TorchCaptioner(model, proc, gen).caption(images, prompts)
    assert [c for c, r in zip(ours, rows) if r] == [c for c, r in zip(theirs, rows) if r]


def test_recipe_prune_heads_then_onnx_export_and_the_card_shows_the_loader_that_works(tmp_path):
    """The reproduction as given (exit 3 before), through `compress apply`; then the pushed card's
    loading snippet is the one that loads the folder (plain from_pretrained raises on it)."""
    from transformers import Blip2ForConditionalGeneration

    from compressor.models.loading import load_model

    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
name: pruned
model: tiny-blip2-llama
stages:
  - type: prune_width
    heads: {ratio: 0.5}
    ignored_layers: ["*.layers.0.*"]
  - type: export
    formats: [onnx]
    onnx: {exporter: legacy}
push: {repo_id: me/pruned, dry_run: true}
""")
    run = tmp_path / "run"
    res = run_inprocess("apply", str(recipe), "--out", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "onnx" / "validation.json").read_text())["passed"] is True
    # grouped KV heads: layer 0 (ignored) keeps its 2 key/value heads, the others have 1
    assert json.loads((run / "onnx" / "export.json").read_text())["layer_kv_heads"] == [2, 1, 1, 1, 1, 1]
    card = (run / "push" / "README.md").read_text()
    assert 'load_model(snapshot_download("me/pruned"))' in card
    assert 'Blip2ForConditionalGeneration.from_pretrained("me/pruned")' not in card
    with pytest.raises(Exception, match="size mismatch|mismatch"):  # why the card does not show it
        Blip2ForConditionalGeneration.from_pretrained(str(run / "final"))
    model, processor = load_model(run / "final")  # what the card's snippet calls, on the downloaded folder
    assert processor is not None and model.language_model.model.layers[1].self_attn.num_key_value_heads == 1
