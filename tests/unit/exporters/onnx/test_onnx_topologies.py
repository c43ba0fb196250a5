"""The topology interface: the registry, a new decoder-only VLM reusing ``decoder_only`` unchanged
(an image path with its own inputs), and no family knowledge in ``exporters/onnx``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import PRESETS, build

from compressor.errors import ModelSpecError, UserInputError

ROOT = Path(__file__).resolve().parents[4]
INTERFACE = ("NAME", "KIND", "Parts", "INT8_GRAPH", "SINGLE_THREAD_GRAPHS", "build_plan", "sample_cases", "prefill", "step")


def test_registry_serves_every_family_and_kind():
    from compressor.families import family_for_model
    from exporters.onnx.topologies import TOPOLOGIES, by_kind, kinds, topology

    assert kinds() == ["causal", "seq2seq", "blip"]  # export.json's kind values of FORMAT_VERSION 1
    for name in TOPOLOGIES:
        mod = topology(name)
        assert mod.NAME == name and by_kind(mod.KIND) is mod
        assert all(hasattr(mod, a) for a in INTERFACE), [a for a in INTERFACE if not hasattr(mod, a)]
    used = {family_for_model(build(p)[0]).onnx_topology for p in PRESETS}
    assert used == set(TOPOLOGIES)
    with pytest.raises(ModelSpecError, match="kind 'llava'"):
        by_kind("llava")
    with pytest.raises(ModelSpecError, match="'nope'"):
        topology("nope")


def test_exporters_onnx_holds_no_family_knowledge():
    """No family name, no ``kind ==`` branch and no BLIP attribute path under exporters/onnx."""
    pattern = re.compile(
        r"\.kind ==|kind == \"|family\.name ==|model_type ==|\.(qformer|query_tokens|language_projection|text_decoder|"
        r"vision_model|crossattention|EncDecAttention)\b|Blip2|qformer"
    )
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in sorted((ROOT / "exporters" / "onnx").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def _patch_pool():
    import torch
    from torch import nn

    class PatchPool(nn.Module):
        """A toy image path with a pixel mask: ``pixel_values (b, 3, 8, 8)``, ``pixel_attention_mask
        (b, 8, 8)`` → ``(b, 3, hidden)`` (one token per colour channel)."""

        def __init__(self, hidden: int):
            super().__init__()
            self.proj = nn.Linear(64, hidden)
            with torch.no_grad():
                self.proj.weight.normal_(0.0, 0.5)

        def forward(self, pixel_values, pixel_attention_mask):
            x = pixel_values * pixel_attention_mask[:, None].to(pixel_values.dtype)
            return self.proj(x.flatten(2))

    return PatchPool


def _sample(batch: int, gen):
    import torch

    mask = torch.ones((batch, 8, 8), dtype=torch.long)
    mask[1, :, 4:] = 0
    return [torch.randn((batch, 3, 8, 8), generator=gen), mask]


def test_new_decoder_only_vlm_reuses_the_topology(tmp_path):
    """A VLM the toolchain has never seen (its image path reads ``pixel_attention_mask``) supplies
    its Parts; the decoder-only topology plans, samples, exports, validates and runs it under ONNX
    Runtime with no change, and prefill/step equal PyTorch."""
    import torch

    from exporters.onnx import OnnxCaptioner, OnnxOptions, make_session
    from exporters.onnx.graphs import ImageGraph, TensorSpec, export_graph, generation_position_ids
    from exporters.onnx.samples import SampleContext
    from exporters.onnx.topologies import decoder_only
    from exporters.onnx.validation import Float64Reference, validate_all

    torch.manual_seed(0)
    lm = build("tiny-blip2-llama")[0].language_model.eval()
    hidden = lm.get_input_embeddings().weight.shape[1]
    image = ImageGraph(
        module=_patch_pool()(hidden).eval(),
        inputs=(TensorSpec("pixel_values", ("batch", 3, 8, 8), "float32"), TensorSpec("pixel_attention_mask", ("batch", 8, 8), "int64")),
        sample=_sample,
        num_tokens=3,
    )
    IMG = 3
    plan = decoder_only.build_plan(decoder_only.Parts(image=image, language_model=lm, text_config=lm.config, meta={"image_token_id": IMG}))
    for g in plan.graphs:
        g.module.eval()
    assert [g.spec.name for g in plan.graphs] == ["image_encoder", "embed_tokens", "decoder"]
    assert plan.graph("image_encoder").spec.input_names == ["pixel_values", "pixel_attention_mask"]
    with torch.no_grad():
        cases = decoder_only.sample_cases(plan, SampleContext(plan, torch.float32))
    assert cases["image_encoder"][-1][1][1].shape == (3, 8, 8)  # the family's own sample inputs
    opts = OnnxOptions(exporter="legacy", optimize=False)
    files = {g.spec.name: export_graph(g, cases[g.spec.name][-1][1], tmp_path, opts, "float32") for g in plan.graphs}
    rec = validate_all(plan, cases, tmp_path, files, opts, "float32", "cpu", True, fp64=Float64Reference(None))
    assert set(rec["graphs"]) == {"image_encoder", "embed_tokens", "decoder"}

    cap = OnnxCaptioner.__new__(OnnxCaptioner)  # the captioner's topology half, without a processor
    cap.meta = {**plan.meta, "graphs": {g.spec.name: {"signature": g.spec.signature()} for g in plan.graphs}}
    cap.dir, cap.np_dtype, cap.topology = tmp_path, np.float32, decoder_only
    cap.sessions = {n: make_session(tmp_path / f["onnx"], ["CPUExecutionProvider"]) for n, f in files.items()}
    gen = torch.Generator().manual_seed(1)
    pix, pmask = _sample(3, gen)
    ids = torch.tensor([[0, 0, IMG, IMG, IMG, 9, 10], [IMG, IMG, IMG, 0, 11, 12, 13], [IMG, IMG, IMG, 14, 15, 16, 17]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    inputs = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "pixel_values": pix.numpy(), "pixel_attention_mask": pmask.numpy()}

    def torch_logits(ids, mask):
        with torch.no_grad():
            emb = lm.get_input_embeddings()(ids)
            emb[ids == IMG] = image.module(pix, pmask).reshape(-1, hidden)
            out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=generation_position_ids(mask, ids.shape[1]))
        return out.logits[:, -1].numpy()

    logits, state, prompt = cap.prefill(inputs)
    ref = torch_logits(ids, mask)
    np.testing.assert_allclose(logits, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
    masked_out = dict(inputs, pixel_attention_mask=np.ones_like(inputs["pixel_attention_mask"]))
    assert not np.allclose(cap.prefill(masked_out)[0][1], logits[1], atol=1e-4)  # teeth: the mask is read
    nxt = logits.argmax(-1)
    logits2, _ = cap.step(nxt, state)
    ids2, mask2 = torch.cat([ids, torch.as_tensor(nxt)[:, None]], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    ref2 = torch_logits(ids2, mask2)
    np.testing.assert_allclose(logits2, ref2, atol=1e-4 * max(1.0, np.abs(ref2).max()))
    np.testing.assert_array_equal(prompt, inputs["input_ids"])
    with pytest.raises(UserInputError, match="pixel_attention_mask"):
        cap.prefill({k: v for k, v in inputs.items() if k != "pixel_attention_mask"})


def test_parts_of_another_topology_are_refused(monkeypatch):
    from compressor.families import family_for_model
    from compressor.families.base import Family
    from exporters.onnx.topologies import blip, export_plan

    model, _ = build("tiny-blip2-opt")
    assert family_for_model(model).onnx_topology == "decoder_only"
    monkeypatch.setattr(Family, "onnx_graph_parts", lambda self, m: blip.Parts(None, None, 1, 1, 1, 1, 1, 1))
    with pytest.raises(ModelSpecError, match="takes exporters.onnx.topologies.decoder_only.Parts"):
        export_plan(model)
