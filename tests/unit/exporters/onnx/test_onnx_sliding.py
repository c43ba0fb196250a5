"""Sliding-window language models export to ONNX (issue 20, item 5): a BLIP-2 on a Qwen3 with
``use_sliding_window=True`` and ``layer_types=['sliding_attention', 'full_attention'] * 3`` failed
``compress export --onnx`` with "operands could not be broadcast together … (3,1,16,1) and
requested shape (3,2,15,8)": transformers' cache keeps only ``sliding_window - 1`` positions in a
sliding layer, so that layer's ``present`` was shorter than the mask. The decoder graph now keeps
every position and lets the model's sliding-window mask choose what each layer sees; the export is
validated like every export and captions like PyTorch past the window."""

from __future__ import annotations

import json

import numpy as np
from onnx_helpers import determined_rows

WINDOW = 12  # 8 image tokens + prompt + 10 new tokens go past it


def sliding_qwen3_blip2(sliding: bool = True, seed: int = 0):
    """A tiny BLIP-2 on Qwen3 (6 layers, sliding / full alternating, window ``WINDOW``; all full
    attention, same weights, with ``sliding=False``)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Qwen3Config

    from compressor.models.presets import _finish, _qformer, _vision
    from compressor.models.processors import blip2_processor, bpe_tokenizer

    proc = blip2_processor(bpe_tokenizer("llama"), 32, 8)
    tok = proc.tokenizer
    text = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
        **(dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
                layer_types=["sliding_attention", "full_attention"] * 3) if sliding else {}),
    ).to_dict()
    cfg = Blip2Config(
        vision_config=_vision(32, 2, 32, 8), qformer_config=_qformer(32, 4, 32), text_config=text,
        num_query_tokens=8, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _finish(Blip2ForConditionalGeneration(cfg), proc, seed, (2.0, 0.1, 0))


def test_sliding_window_model_exports_validated_and_captions_like_pytorch(tmp_path, images):
    import torch

    from compressor.evaluation.captioner import TorchCaptioner, generate_kwargs
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs
    from compressor.recipe.schema import GenerationSpec
    from exporters.onnx import OnnxCaptioner, OnnxOptions, export_model_onnx

    model, proc = sliding_qwen3_blip2()
    family = family_for_model(model)
    out = tmp_path / "onnx"
    export_model_onnx(model, proc, out, OnnxOptions(exporter="legacy"))
    assert json.loads((out / "validation.json").read_text())["passed"] is True

    prompts = ["", "a photo of a", "x", "what is in the picture"]
    gen = GenerationSpec(max_new_tokens=10, min_new_tokens=10, batch_size=4)
    inputs = generation_inputs(family, proc, images, prompts)
    with torch.inference_mode():
        ref = model.generate(**inputs, **generate_kwargs(gen)).numpy()
    full, _ = sliding_qwen3_blip2(sliding=False)
    with torch.inference_mode():
        assert not np.array_equal(full.generate(**inputs, **generate_kwargs(gen)).numpy(), ref)  # teeth: the window matters
    rows = determined_rows(model, proc, images, prompts, generate_kwargs(gen))
    assert rows.sum() >= 2, rows
    cap = OnnxCaptioner(out, gen, variant="plain")
    got = cap.generate({k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_array_equal(got[rows][:, : ref.shape[1]], ref[rows])
    ours, theirs = cap.caption(images, prompts), TorchCaptioner(model, proc, gen).caption(images, prompts)
    assert [c for c, r in zip(ours, rows) if r] == [c for c, r in zip(theirs, rows) if r]
