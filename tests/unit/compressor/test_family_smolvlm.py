"""The SmolVLM (Idefics3) family on ``tiny-smolvlm`` (image splitting on): LoRA names match their
part's modules, layer removal keeps cache == no-cache and reloads exactly with plain transformers,
the chat-template batches learn only the caption, the GFLOPs replay equals FlopCounterMode around
the real ``generate`` for a one-tile and a split image, ``compress plan`` gives the published
SmolVLM-256M size offline, and the assembly fills the architecture with a language model (ONNX:
tests/integration/test_smolvlm_pipeline.py).

Every equality first shows it has teeth (several distinct tokens, different captions per image,
the removal changed the tokens, a 1% weight change moves the logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surgery_helpers import assert_teeth, greedy, logits, perturb_moves_logits, preset

from compressor.families import get_config_value, get_module
from compressor.lora import check_targets_on_config
from compressor.models.batches import training_batch
from compressor.recipe.schema import LoraSpec
from compressor.surgery import remove_layers

NAME = "tiny-smolvlm"
#: (height, width): 2×2 tiles + global, 1×2 + global, 2×1 + global (tiles of 32 px, longest edge 64 px)
SIZES = [(32, 32), (32, 64), (48, 16)]


def split_images(seed: int = 4):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def test_lora_names_match_their_part_only():
    model, _, family = preset(NAME)
    assert set(family.lora) == {"vision.attention", "vision.mlp", "connector", "language_model.attention", "language_model.mlp"}
    want = {"vision.attention": ("vision", 8), "vision.mlp": ("vision", 4), "connector": ("connector", 1),
            "language_model.attention": ("language_model", 24), "language_model.mlp": ("language_model", 18)}
    for entry, (part, count) in want.items():
        assert check_targets_on_config(model.config, LoraSpec(r=2), [entry])["entries"][entry] == {part: count}, entry


def test_splitting_batches_learn_only_the_caption():
    _, proc, family = preset(NAME)
    from compressor.models.batches import generation_inputs

    inputs = generation_inputs(family, proc, split_images(), ["", "", "what colour?"])
    assert inputs["pixel_values"].shape[:2] == (3, 5)  # 5 tiles at most: rows 1, 2 are padded with zero tiles
    assert (inputs["pixel_values"][1, 3:] == 0).all() and (inputs["pixel_values"][1, :3] != 0).any()
    text = proc.tokenizer.decode(inputs["input_ids"][2])
    assert "<row_2_col_1>" in text and "<global-img>" in text and text.endswith("what colour?<end_of_utterance>\nAssistant:")
    targets = ["a red circle", "two blue squares on the left", "red"]
    batch = training_batch(family, proc, split_images(), targets, ["", "", "what colour?"])
    for i, t in enumerate(targets):
        kept = batch["labels"][i][batch["labels"][i] != -100]
        assert proc.tokenizer.decode(kept) == f" {t}<end_of_utterance>"


@pytest.fixture(scope="module")
def removed(tmp_path_factory):
    """tiny-smolvlm with language-model layers 1 and 3 and vision layer 0 removed, tokens before and after."""
    model, proc, family = preset(NAME)
    images, prompts = split_images(), ["", "a picture of", ""]
    before = greedy(model, proc, family, images, prompts)
    records = [remove_layers(model, family, "language_model", [1, 3]), remove_layers(model, family, "vision", [0])]
    return model, proc, family, images, prompts, before, records


def test_removal_keeps_cache_equal_to_no_cache(removed):
    model, proc, family, images, prompts, before, _ = removed
    with_cache = greedy(model, proc, family, images, prompts, use_cache=True)
    assert_teeth(with_cache)
    assert not torch.equal(with_cache, before), "the removal changed nothing: no teeth"
    assert torch.equal(with_cache, greedy(model, proc, family, images, prompts, use_cache=False))


def test_removal_reloads_exactly_with_plain_transformers(removed, tmp_path):
    from transformers import Idefics3ForConditionalGeneration

    model, proc, family, images, _, _, records = removed
    perturb_moves_logits(model, proc, family, [f"{family.stack('language_model').layers}.0.self_attn.k_proj",
                                                f"{family.stack('vision').layers}.0.mlp.fc1"], images)
    ref = logits(model, proc, family, images)
    model.save_pretrained(tmp_path)
    reloaded, info = Idefics3ForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert torch.equal(logits(reloaded.eval(), proc, family, images), ref)
    for rec in records:
        st = family.stack(rec["part"])
        assert len(get_module(reloaded, st.layers)) == rec["after"]
        assert get_config_value(reloaded.config, st.count_fields[0]) == rec["after"]
    assert [a.self_attn.layer_idx for a in reloaded.model.text_model.layers] == [0, 1, 2, 3]


@pytest.mark.parametrize("image", ["", "split"])
def test_gflops_replay_equals_flop_counter_around_generate(image):
    from PIL import Image

    from compressor.families.smolvlm import _encode, chat_prompt
    from compressor.planning import meta_gflops, meta_model, prompt_lengths
    from eval.characteristics import count_gflops

    model, proc, _ = preset(NAME)
    side = 64 if image else 32
    kw = {} if image else {"do_image_splitting": False}
    inputs = dict(_encode(proc, [Image.new("RGB", (side, side), (200, 30, 30))], [chat_prompt(proc, "a photo")], "left", **kw))
    n = 7
    real = count_gflops(lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False), model)
    meta, fam = meta_model(model.config)
    lm_tokens, tiles, exact = prompt_lengths(fam, model.config, proc, "a photo", image)
    assert exact and tiles == (5 if image else 1) and lm_tokens == inputs["input_ids"].shape[1]
    planned = meta_gflops(meta, fam, lm_tokens, tiles, n, 1)
    assert real > 0 and planned == pytest.approx(real, rel=1e-12, abs=0)
    assert meta_gflops(meta, fam, lm_tokens, tiles + 1, n, 1) > planned  # teeth: a tile more costs more


def test_plan_of_the_published_smolvlm_256m(tmp_path):
    from compressor.planning import plan_recipe
    from compressor.recipe.loader import load_recipe

    r = tmp_path / "r.yaml"
    r.write_text("name: p\nmodel: HuggingFaceTB/SmolVLM-256M-Instruct\nstages:\n"
                 "  - type: remove_layers\n    language_model: {drop_top: 8}\n")
    plan = plan_recipe(load_recipe(r), gflops=False)
    params = {k: v for k, v in plan["before"].items() if k.startswith("params")}
    assert plan["before"]["size_mb"] == pytest.approx(256_484_928 * 4 / 1e6)  # float32 on disk
    assert params == {"params_total": 256_484_928, "params_vision": 86_433_024, "params_connector": 7_077_888,
                              "params_language_model": 162_974_016}
    assert plan["after"]["params_language_model"] == 162_974_016 - 8 * 3_540_096
    assert plan["model"]["family"] == "smolvlm"


# ------------------------------------------------------------------------------------ assembly


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A SmolVLM architecture folder (tiny-smolvlm's config + processor) and a Llama of its text
    model's shape whose tokenizer is the first 2,000 ids of the processor's (as SmolLM2-135M is of
    SmolVLM-256M's), tied embeddings (as SmolLM2)."""
    import json

    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from compressor.models.init import reinit_
    from compressor.models.processors import TOKENIZER_DIR

    root = tmp_path_factory.mktemp("smolvlm_parts")
    model, proc, _ = preset(NAME)
    model.config.save_pretrained(root / "arch")
    proc.save_pretrained(root / "arch")
    data = json.loads((TOKENIZER_DIR / "smolvlm.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 2000]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>")
    text = model.config.text_config
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert lm.config.hidden_size == text.hidden_size and len(tok) == 2000 < text.vocab_size
    reinit_(lm, seed=3, gain=2.0, embed_std=0.1)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root


def test_assemble_fills_the_architecture_with_the_language_model(stand_ins):
    from transformers import Idefics3ForConditionalGeneration, LlamaForCausalLM

    from compressor.models.assembly import assemble
    from compressor.models.loading import load_model
    from compressor.recipe.schema import recipe_model

    spec = recipe_model().model_validate({
        "name": "a", "stages": [{"type": "merge_adapters"}],
        "model": {"assemble": {"family": "smolvlm", "config": str(stand_ins / "arch"), "language_model": str(stand_ins / "lm")}},
    }).model.assemble
    out = assemble(spec, stand_ins / "assembled")
    model, info = Idefics3ForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    lm = LlamaForCausalLM.from_pretrained(str(stand_ins / "lm"))
    emb = model.model.text_model.embed_tokens.weight
    assert torch.equal(emb[:2000], lm.model.embed_tokens.weight) and torch.equal(model.lm_head.weight[:2000], lm.lm_head.weight)
    assert torch.allclose(emb[2000:], lm.model.embed_tokens.weight.mean(0).expand(38, -1))
    assert torch.equal(model.model.text_model.layers[5].mlp.down_proj.weight, lm.model.layers[5].mlp.down_proj.weight)
    # the random SigLIP sees the image: different images, clearly different features
    model, proc = load_model(out)
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs

    imgs = [split_images(seed)[0] for seed in (1, 2)]
    inputs = generation_inputs(family_for_model(model), proc, imgs, ["", ""])
    with torch.no_grad():
        a, b = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
    assert float((a - b).abs().mean()) > 0.2 * float(a.abs().mean())


def test_assemble_refuses_a_language_model_of_another_shape(stand_ins, tmp_path):
    import shutil

    from transformers import AutoConfig

    from compressor.errors import ModelSpecError
    from compressor.models.assemble_smolvlm import SmolVLMAssembleParts, assembled_config

    bad = tmp_path / "lm"
    shutil.copytree(stand_ins / "lm", bad)
    cfg = AutoConfig.from_pretrained(str(bad))
    cfg.num_hidden_layers = 5
    cfg.save_pretrained(bad)
    with pytest.raises(ModelSpecError, match="num_hidden_layers 5 ≠ 6") as err:
        assembled_config(SmolVLMAssembleParts(family="smolvlm", config=str(stand_ins / "arch"), language_model=str(bad)))
    assert err.value.exit_code == 2
