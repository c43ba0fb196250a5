"""ONNX exports of token-reduced models: fewer queries (static), CATP's TopK + Gather and ToMe inside
the image graph; validated against PyTorch, and ONNX Runtime's greedy tokens equal PyTorch's on 3 images."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from onnx_helpers import PROMPTS, build, determined_rows


@pytest.mark.parametrize("name", ["tiny-blip2-opt", "tiny-blip"])
def test_token_reduced_model_exports_validates_and_decodes_like_pytorch(tmp_path, images, name):
    import onnx
    import torch

    from compressor.evaluation.captioner import generate_kwargs
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs
    from compressor.recipe.schema import GenerationSpec
    from compressor.tokens import apply_token_options, set_token_option
    from exporters.onnx import OnnxCaptioner, OnnxOptions, export_model_onnx, read_export_json

    model, proc = build(name)
    gen = GenerationSpec(max_new_tokens=10, batch_size=4)
    imgs, prompts = images[:3], PROMPTS[:3]
    before = family_for_model(model)
    with torch.inference_mode():
        full = model.generate(**generation_inputs(before, proc, imgs, prompts), **generate_kwargs(gen))
    if before.num_queries:  # BLIP-2: 8 → 6 queries for good, then 3 of them per image (CATP), and ToMe
        before.reduce_queries(model, proc, [0, 1, 2, 4, 5, 7])
        set_token_option(model.config, "query_tokens", {"keep": 3, "select": "catp"})
    set_token_option(model.config, "token_merging", {"r": 3})
    apply_token_options(model)
    fam = family_for_model(model)
    out = tmp_path / "onnx"
    export_model_onnx(model, proc, out, OnnxOptions(exporter="legacy", optimize=False))

    meta = read_export_json(out)
    assert json.loads((out / "validation.json").read_text())["passed"] is True
    image_graph = next(iter(meta["graphs"]))
    ops = Counter(n.op_type for n in onnx.load(str(out / meta["graphs"][image_graph]["onnx"])).graph.node)
    assert ops["ScatterElements"] >= 2  # ToMe's size-weighted merge in both ViT layers
    assert fam.vision_output_tokens == 17 - 2 * 3
    if fam.num_queries:
        assert meta["graphs"][image_graph]["signature"]["outputs"][0]["dims"] == ["batch", 3, 32]
        assert meta["num_query_tokens"] == 3 and ops["TopK"] >= 1 and ops["GatherElements"] >= 1
    else:
        assert meta["num_patches"] == 11

    inputs = generation_inputs(fam, proc, imgs, prompts)
    with torch.inference_mode():
        ref = model.generate(**inputs, **generate_kwargs(gen)).numpy()
    n = inputs["input_ids"].shape[1]
    assert ref[:, n:].tolist() != full[:, full.shape[1] - (ref.shape[1] - n):].tolist()  # teeth: the reduction changed the tokens
    rows = determined_rows(model, proc, imgs, prompts, generate_kwargs(gen))
    assert rows.sum() >= 2, rows
    got = OnnxCaptioner(out, gen).generate({k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_array_equal(got[rows][:, : ref.shape[1]], ref[rows])
