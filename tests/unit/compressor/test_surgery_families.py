"""Layer removal for every family: KV-cache greedy == no-cache greedy after removing top and middle
layers, exact save/reload (no missing or unexpected keys, identical logits), configs and per-layer
arrays trimmed, T5 block-0 relative bias carried, Q-Former pattern refused.

Every equality first shows it has teeth: the removal changed the tokens, the tokens are not
degenerate, and a 1% change of a kept layer's weights moves the logits."""

from __future__ import annotations

import pytest
import torch
from surgery_helpers import (
    assert_teeth,
    greedy,
    logits,
    perturb_moves_logits,
    preset,
    probe_images,
    prompts_for,
)

from compressor.errors import UserInputError
from compressor.families import get_config_value, get_module
from compressor.surgery import remove_layers

# (preset, {part: removed}, a linear module of a kept layer relative to the stack's layer list
#  [, seed of the probe images: chosen so that no sequence is degenerate after the removal])
CASES = [
    ("tiny-blip2-opt", {"language_model": [4, 5], "qformer": [2, 3]}, "0.self_attn.q_proj"),
    ("tiny-blip2-opt", {"language_model": [2, 3]}, "2.fc1"),
    ("tiny-blip2-llama", {"language_model": [4, 5]}, "0.self_attn.k_proj", 5),
    ("tiny-blip2-llama", {"language_model": [1, 3]}, "1.self_attn.k_proj"),
    ("tiny-blip2-t5", {"language_model.encoder": [3], "language_model.decoder": [2, 3]}, "1.layer.0.SelfAttention.q"),
    ("tiny-blip2-t5", {"language_model.encoder": [1], "language_model.decoder": [1, 2]}, "1.layer.0.SelfAttention.q"),
    ("tiny-instructblip", {"language_model": [4, 5], "qformer": [3]}, "0.self_attn.v_proj"),
    ("tiny-instructblip", {"language_model": [1, 2], "qformer": [0, 1]}, "1.fc2"),
    ("tiny-blip", {"language_model": [3]}, "0.attention.self.query"),
    ("tiny-blip", {"language_model": [1, 2], "vision": [0]}, "1.crossattention.self.query"),
]
CASES = [c if len(c) == 4 else (*c, 4) for c in CASES]
IDS = [f"{c[0]}-{'+'.join(f'{p}{r}' for p, r in c[1].items())}" for c in CASES]


def _removed_model(name, removal, seed, tokens_before: bool = True):
    model, proc, family = preset(name)
    images = probe_images(seed=seed)
    prompts = prompts_for(family)
    before = greedy(model, proc, family, images, prompts) if tokens_before else None
    records = [remove_layers(model, family, part, idx) for part, idx in removal.items()]
    return model, proc, family, images, prompts, before, records


@pytest.mark.parametrize("name,removal,kept_linear,seed", CASES, ids=IDS)
def test_cache_equals_no_cache_after_removal(name, removal, kept_linear, seed):
    model, proc, family, images, prompts, before, _ = _removed_model(name, removal, seed)
    with_cache = greedy(model, proc, family, images, prompts, use_cache=True)
    assert_teeth(with_cache)
    assert not torch.equal(with_cache, before), "removal changed nothing: the comparison has no teeth"
    without = greedy(model, proc, family, images, prompts, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("name,removal,kept_linear,seed", CASES, ids=IDS)
def test_save_reload_is_exact(name, removal, kept_linear, seed, tmp_path):
    model, proc, family, images, _, _, records = _removed_model(name, removal, seed, tokens_before=False)
    first_part = next(iter(removal))
    perturb_moves_logits(model, proc, family, [f"{family.stack(first_part).layers}.{kept_linear}"], images)
    ref = logits(model, proc, family, images)
    model.save_pretrained(tmp_path)
    reloaded, info = family.model_cls().from_pretrained(str(tmp_path), output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert torch.equal(logits(reloaded, proc, family, images), ref)
    for rec in records:
        st = family.stack(rec["part"])
        assert len(get_module(reloaded, st.layers)) == rec["after"]
        for path in st.count_fields:
            assert get_config_value(reloaded.config, path) == rec["after"], path


@pytest.mark.parametrize("name", ["tiny-blip2-opt", "tiny-blip2-llama", "tiny-blip2-t5", "tiny-instructblip"])
def test_layer_idx_renumbered(name):
    model, _, family = preset(name)
    parts = [p for p in family.stacks if p.startswith("language_model")]
    for part in parts:
        remove_layers(model, family, part, [1])
        st = family.stack(part)
        for new_idx, layer in enumerate(get_module(model, st.layers)):
            for rel in st.layer_idx_modules:
                assert get_module(layer, rel).layer_idx == new_idx


def test_per_layer_config_arrays_are_trimmed(tmp_path):
    """Llama with distinct per-layer ``layer_types``: the kept layers keep their own entries, and
    the saved config reloads with arrays as long as the stack."""
    model, proc, family = preset("tiny-blip2-llama")
    types = ["full_attention", "sliding_attention"] * 3
    model.config.text_config.layer_types = list(types)
    remove_layers(model, family, "language_model", [0, 3])
    assert model.config.text_config.layer_types == [types[i] for i in (1, 2, 4, 5)]
    assert model.language_model.config.layer_types == model.config.text_config.layer_types
    model.save_pretrained(tmp_path)
    reloaded, info = family.model_cls().from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.text_config.layer_types == [types[i] for i in (1, 2, 4, 5)]
    assert reloaded.config.text_config.num_hidden_layers == 4


@pytest.mark.parametrize("part", ["language_model.encoder", "language_model.decoder"])
def test_t5_block0_relative_bias_is_carried(part, tmp_path):
    model, proc, family = preset("tiny-blip2-t5")
    images = probe_images()
    st = family.stack(part)
    bias = get_module(model, st.layers)[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().clone()
    remove_layers(model, family, part, [0])
    new0 = get_module(model, st.layers)[0].layer[0].SelfAttention
    assert new0.has_relative_attention_bias
    assert torch.equal(new0.relative_attention_bias.weight, bias)
    # Teeth: without the bias the model computes something else.
    ref = logits(model, proc, family, images)
    with torch.no_grad():
        saved = new0.relative_attention_bias.weight.clone()
        new0.relative_attention_bias.weight.zero_()
        assert float((logits(model, proc, family, images) - ref).abs().max()) > 1e-3
        new0.relative_attention_bias.weight.copy_(saved)
    model.save_pretrained(tmp_path)
    reloaded, info = family.model_cls().from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(reloaded.eval(), proc, family, images), ref)


def test_t5_encoder_and_decoder_are_counted_separately():
    model, _, family = preset("tiny-blip2-t5")
    remove_layers(model, family, "language_model.encoder", [2, 3])
    assert model.config.text_config.num_layers == 2 and model.config.text_config.num_decoder_layers == 4
    assert len(model.language_model.encoder.block) == 2 and len(model.language_model.decoder.block) == 4
    assert model.language_model.encoder.config.num_layers == 2
    assert model.language_model.decoder.config.num_layers == 4


@pytest.mark.parametrize("removed", [[1], [0, 2], [0, 3], [1, 3]])
def test_qformer_pattern_break_is_refused_with_nearest_choice(removed):
    model, _, family = preset("tiny-blip2-opt")
    with pytest.raises(UserInputError, match="Nearest valid choice") as err:
        remove_layers(model, family, "qformer", removed)
    assert "cross-attention" in str(err.value)
    assert len(model.qformer.encoder.layer) == 4  # nothing changed


def test_removal_of_every_layer_is_refused():
    model, _, family = preset("tiny-blip2-opt")
    with pytest.raises(UserInputError):
        remove_layers(model, family, "language_model", list(range(6)))


def test_t5_decoder_deeper_than_encoder_is_refused_before_loading():
    """transformers sizes T5's generation cache by the encoder depth: refuse such plans from the config alone."""
    from compressor.stages.remove_layers import RemoveLayersStage
    from compressor.surgery import plan_removals

    model, _, family = preset("tiny-blip2-t5")
    stage = RemoveLayersStage(type="remove_layers", language_model={"encoder": {"drop_top": 2}, "decoder": {"drop_top": 1}})
    with pytest.raises(UserInputError, match="decoder deeper than the encoder"):
        plan_removals(model.config, family, stage)
    ok = RemoveLayersStage(type="remove_layers", language_model={"encoder": {"drop_top": 1}, "decoder": {"drop_top": 2}})
    assert plan_removals(model.config, family, ok) == {"language_model.encoder": [3], "language_model.decoder": [2, 3]}
