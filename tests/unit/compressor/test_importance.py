"""Importance scores: a layer made an exact identity (zeroed output projections) is ranked least
important by block influence and lies inside the block angular distance picks, for every
family whose layers are pre-norm residual blocks; Q-Former choices keep the cross-attention pattern."""

from __future__ import annotations

import pytest
import torch
from surgery_helpers import preset, probe_images

from compressor.errors import UserInputError
from compressor.families import get_module
from compressor.families.blip2 import CrossAttentionPattern
from compressor.importance import StackScores, select_layers, stack_scores
from compressor.models.batches import training_batch

CAPTIONS = ["a red circle on the left", "two blue squares", "a green triangle at the top of the picture", "one star"]

# (preset, part, index made an identity, output projections zeroed (relative to the layer))
IDENTITY_CASES = [
    ("tiny-blip2-opt", "language_model", 2, ["self_attn.out_proj", "fc2"]),
    ("tiny-blip2-llama", "language_model", 3, ["self_attn.o_proj", "mlp.down_proj"]),
    ("tiny-blip2-t5", "language_model.encoder", 1, ["layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo"]),
    ("tiny-blip2-t5", "language_model.decoder", 2,
     ["layer.0.SelfAttention.o", "layer.1.EncDecAttention.o", "layer.2.DenseReluDense.wo"]),
    ("tiny-instructblip", "language_model", 4, ["self_attn.out_proj", "fc2"]),
    ("tiny-blip", "vision", 1, ["self_attn.projection", "mlp.fc2"]),
]


def _batch(proc, family, n=4):
    return training_batch(family, proc, probe_images(n), CAPTIONS[:n], [""] * n)


def _make_identity(layer, zeroed):
    with torch.no_grad():
        for rel in zeroed:
            lin = get_module(layer, rel)
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


@pytest.mark.parametrize("name,part,idx,zeroed", IDENTITY_CASES, ids=[f"{c[0]}-{c[1]}" for c in IDENTITY_CASES])
def test_identity_layer_is_least_important(name, part, idx, zeroed):
    model, proc, family = preset(name)
    layers = get_module(model, family.stack(part).layers)
    _make_identity(layers[idx], zeroed)
    batch = _batch(proc, family)
    # Teeth: the zeroed layer really is an identity, and the other layers really transform their input.
    seen = {}
    hook = layers[idx].register_forward_hook(lambda m, a, kw, out: seen.update(i=(a[0] if a else kw["hidden_states"]),
                                                                               o=out[0] if isinstance(out, tuple) else out),
                                             with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    assert torch.equal(seen["i"], seen["o"])
    scores = stack_scores(model, family, [part], [batch])[part]
    assert scores.tokens > 0
    assert scores.block_influence[idx] == pytest.approx(0.0, abs=1e-6)
    others = [v for i, v in enumerate(scores.block_influence) if i != idx]
    assert min(others) > 1e-3
    assert select_layers(scores, 1, "block_influence", family) == [idx]
    assert select_layers(scores, 1, "angular_distance", family) == [idx]
    assert scores.angular_distance[1][idx] == pytest.approx(0.0, abs=1e-3)
    assert min(v for i, v in enumerate(scores.angular_distance[1]) if i != idx) > 1e-3
    if len(layers) > 2:
        # Two adjacent identities: the block of two angular distance picks is exactly them, and any
        # longer block it picks contains them.
        nxt = idx + 1 if idx + 1 < len(layers) else idx - 1
        _make_identity(layers[nxt], zeroed)
        scores = stack_scores(model, family, [part], [batch])[part]
        pair = sorted([idx, nxt])
        assert select_layers(scores, 2, "angular_distance", family) == pair
        assert select_layers(scores, 2, "block_influence", family) == pair


def test_scores_depend_on_the_data_positions():
    """Padding is excluded: the same captions padded to another length give the same scores."""
    model, proc, family = preset("tiny-blip2-opt")
    short = _batch(proc, family, 2)
    long = training_batch(family, proc, probe_images(3), CAPTIONS[:2] + ["a " * 30 + "long caption"], [""] * 3)
    a = stack_scores(model, family, ["language_model"], [short])["language_model"]
    b = stack_scores(model, family, ["language_model"], [{k: v[:2] for k, v in long.items()}])["language_model"]
    assert b.tokens == a.tokens
    for x, y in zip(a.block_influence, b.block_influence):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)


def test_qformer_choice_keeps_the_cross_attention_pattern():
    _, _, family = preset("tiny-blip2-opt")  # 4 Q-Former layers, cross-attention every 2
    scores = StackScores("qformer", [0.9, 0.1, 0.85, 0.2], {1: [0.5, 0.1, 0.4, 0.2], 2: [0.9, 0.05, 0.3], 3: [0.1, 0.9]})
    # The two lowest (1 and 3) would leave cross-attention at kept position 1: refused. Valid pairs
    # are {0, 1}, {1, 2}, {2, 3}; the lowest valid sum is {1, 2} (0.95).
    assert not CrossAttentionPattern(2).ok([0, 2])
    assert select_layers(scores, 2, "block_influence", family) == [1, 2]
    assert select_layers(scores, 2, "angular_distance", family) == [1, 2]
    # One layer: only the top one keeps the pattern, although layer 1 scores lowest.
    assert select_layers(scores, 1, "block_influence", family) == [3]
    assert select_layers(scores, 1, "angular_distance", family) == [3]
    # Three layers: the block [0, 1, 2] is closest but leaves a layer without cross-attention at 0.
    assert select_layers(scores, 3, "angular_distance", family) == [1, 2, 3]


def test_qformer_scores_on_a_real_model_choose_a_valid_set():
    model, proc, family = preset("tiny-instructblip")
    batch = _batch(proc, family)
    scores = stack_scores(model, family, ["qformer", "language_model", "vision"], [batch])
    assert set(scores) == {"qformer", "language_model", "vision"}
    assert scores["qformer"].tokens == 4 * model.config.num_query_tokens
    for select in ("block_influence", "angular_distance"):
        removed = select_layers(scores["qformer"], 2, select, family)
        assert CrossAttentionPattern(2).ok([i for i in range(4) if i not in removed])


def test_count_out_of_range_is_refused():
    _, _, family = preset("tiny-blip2-opt")
    scores = StackScores("language_model", [0.1, 0.2, 0.3], {1: [0.1, 0.2, 0.3], 2: [0.2, 0.3]})
    with pytest.raises(UserInputError):
        select_layers(scores, 3, "block_influence", family)
