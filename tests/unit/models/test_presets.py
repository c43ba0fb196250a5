"""Presets: deterministic, reloadable, and not blind to their input (the teeth every test relies on)."""

from __future__ import annotations

import pytest
import torch

from compressor.data.synthetic import make_scene, render_shapes
from compressor.models.presets import PRESETS, build_preset

TINY = ["tiny-blip2-opt", "tiny-blip2-llama", "tiny-blip2-t5", "tiny-instructblip", "tiny-blip"]


def shape_images(n=6):
    return [render_shapes(make_scene(11, i), 64) for i in range(n)]


@pytest.mark.parametrize("name", TINY)
def test_preset_is_deterministic_and_reloads(name, tmp_path):
    from transformers import AutoProcessor

    from compressor.models.loading import load_model

    m1, p1 = build_preset(name, seed=0)
    m2, _ = build_preset(name, seed=0)
    m3, _ = build_preset(name, seed=1)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1 if sd1[k].dtype.is_floating_point)
    m1.save_pretrained(tmp_path)
    p1.save_pretrained(tmp_path)
    reloaded, info = type(m1).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    proc = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(proc) is type(p1)
    text = ["a red circle on the left"]
    assert proc.tokenizer(text).input_ids == p1.tokenizer(text).input_ids
    model, processor = load_model(tmp_path)
    assert processor is not None and model.config.model_type == m1.config.model_type


@pytest.mark.parametrize("name", TINY)
def test_preset_captions_depend_on_the_image(name):
    from compressor.evaluation.captioner import TorchCaptioner
    from compressor.recipe.schema import GenerationSpec

    model, processor = build_preset(name)
    cap = TorchCaptioner(model, processor, GenerationSpec(max_new_tokens=10, batch_size=6))
    captions = cap.caption(shape_images())
    assert len(set(captions)) >= 3, captions  # different images, different captions
    tok = processor.tokenizer
    distinct = [len(set(tok(c, add_special_tokens=False).input_ids)) for c in captions]
    assert sum(d >= 3 for d in distinct) >= 4, (captions, distinct)  # not one repeated token


@pytest.mark.parametrize("name", TINY)
def test_small_weight_change_moves_logits(name):
    from compressor.families import family_for_model
    from compressor.stages.merge_adapters import logits_of, probe_batch

    model, processor = build_preset(name)
    batch = probe_batch(model, processor)
    before = logits_of(model, batch)
    fam = family_for_model(model)
    stack = fam.stacks["qformer" if "qformer" in fam.stacks else "language_model"]
    from compressor.families import get_module

    layer = get_module(model, stack.layers)[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.01)
    assert float((logits_of(model, batch) - before).abs().max()) > 1e-3


def test_every_preset_is_listed():
    from compressor.models.presets import PRESET_NAMES

    assert set(TINY) <= set(PRESETS) and "shapes-teacher" in PRESET_NAMES
