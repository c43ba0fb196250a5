"""BLIP: ``BlipForConditionalGeneration``, a ViT and a BERT text decoder that cross-attends to it.

Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language
Understanding and Generation". Parts ``vision`` (``vision_model``) and ``language_model``
(``text_decoder``); stacks: the ViT's layers and the text decoder's BERT layers (every one with
cross-attention). Generation starts from ``[DEC]`` (the tokenizer's BOS) followed by the prompt;
``BlipForConditionalGeneration.generate`` overwrites the first input column with ``[DEC]`` and
drops the trailing ``[SEP]`` itself, and its output repeats the prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from compressor.families.base import Family, Stack, Width
from compressor.families.blip2 import VISION_LORA  # BLIP-2 kept BLIP's vision encoder: same paths

MODEL_CLASS = "BlipForConditionalGeneration"
MODEL_TYPES = ("blip",)
REMOVAL_KEYS = {
    "language_model": "Language-model layers (BLIP: the text decoder; `{decoder: …}` also works).",
    "vision": "Vision-encoder layers.",
}
ENCODER_DECODER_KEYS = ("language_model",)
_TEXT = r"text_decoder\.bert\.encoder\.layer\.\d+"
TEXT_LORA = {
    "language_model.attention": rf"{_TEXT}\.attention\.self\.(query|key|value)",
    "language_model.decoder.attention": rf"{_TEXT}\.attention\.self\.(query|key|value)",
    "language_model.decoder.cross_attention": rf"{_TEXT}\.crossattention\.self\.(query|key|value)",
    "language_model.mlp": rf"{_TEXT}\.(intermediate|output)\.dense",
}
LORA_NAMES = (*VISION_LORA, *TEXT_LORA)
PARTS = {"vision": ("vision_model",), "language_model": ("text_decoder",)}
TRAINABLE_NAMES = tuple(PARTS)


def describe(config) -> Family:
    """The :class:`Family` of a BLIP config."""
    return Family(
        name="blip",
        model_type="blip",
        model_class="BlipForConditionalGeneration",
        config_class="BlipConfig",
        parts=dict(PARTS),
        stacks={
            "vision": Stack("vision", "vision_model.encoder.layers", ("vision_config.num_hidden_layers",)),
            "language_model": Stack(
                "language_model",
                "text_decoder.bert.encoder.layer",
                ("text_config.num_hidden_layers",),
                layer_idx_modules=("attention.self", "crossattention.self"),
                positions="attention_mask",
            ),
        },
        lora={**VISION_LORA, **TEXT_LORA},
        trainable=dict(PARTS),
        lm=None,
        decoder_only=True,
        impl=sys.modules[__name__],
        aliases={"language_model.decoder": "language_model"},
        width=(
            Width("language_model", ("intermediate.dense",), ("output.dense",), "attention.self.query",
                  "attention.self.key", "attention.self.value", "attention.output.dense", "attention.self",
                  (("num_attention_heads", "heads"), ("all_head_size", "width"))),
        ),
        onnx_topology="blip",
        extra={"text_model_type": "bert"},
    )


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def generation_inputs(family: Family, processor, images: Sequence, prompts: Sequence[str], device: str = "cpu") -> dict:
    """``pixel_values`` (and, with prompts, ``input_ids``/``attention_mask`` of ``[CLS] prompt [SEP]``,
    which generate turns into ``[DEC] prompt``)."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    if any(prompts):
        enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
    else:
        enc = processor(images=list(images), return_tensors="pt")
    tok.padding_side = "right"
    return {k: v.to(device) for k, v in enc.items()}


def decode(family: Family, processor, sequences, inputs: dict, prompts: Sequence[str]) -> list[str]:
    """Generated ids → captions: the output repeats the prompt, which is cut off by its tokens.

    ``generate`` starts from ``[DEC] prompt`` (``[CLS]`` overwritten, ``[SEP]`` dropped), so a row's
    output is ``[DEC]``, the prompt's ids, then the new tokens; the prompt's ids are removed there.
    (Comparing decoded text fails: WordPiece decodes ``Answer:`` as ``answer :``.)
    """
    tok = processor.tokenizer
    pad = tok.pad_token_id
    starts = {tok.bos_token_id, tok.cls_token_id} - {None}
    out = []
    for row, prompt in zip(sequences, prompts):
        ids = [int(t) for t in row]
        if prompt:
            want = tok(prompt).input_ids[1:-1]  # without [CLS] / [SEP]
            k = 0
            while k < len(ids) and ids[k] == pad:
                k += 1
            if k < len(ids) and ids[k] in starts:
                k += 1
            if ids[k : k + len(want)] == want:
                ids = ids[k + len(want):]
            else:  # not the expected layout: fall back to the decoded prompt text
                text = tok.decode(ids, skip_special_tokens=True).strip()
                p = tok.decode(want, skip_special_tokens=True).strip().lower()
                out.append((text[len(p):] if p and text.lower().startswith(p) else text).strip())
                continue
        out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def caption_batch(family: Family, processor, images: Sequence, prompts: Sequence[str], run) -> list[str]:
    """Caption one batch, running prompts of different token lengths as separate sub-batches.

    BLIP's generate overwrites the first input column with ``[DEC]`` and drops the last column,
    which is only right when no prompt in the batch is padded; same captions, in input order.
    Both the PyTorch and the ONNX Runtime captioner use this, so their captions are comparable.
    """
    images, prompts = list(images), list(prompts)
    if not any(prompts):
        return run(images, prompts)
    tok = processor.tokenizer
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault(len(tok(p).input_ids) if p else 0, []).append(j)
    caps: list[str] = [""] * len(images)
    for idx in groups.values():
        for j, c in zip(idx, run([images[j] for j in idx], [prompts[j] for j in idx])):
            caps[j] = c
    return caps


def training_batch(family: Family, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
    """``input_ids = [DEC] prompt target [SEP]`` (BLIP decodes from ``[DEC]``); labels mask padding,
    ``[DEC]`` and the prompt."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    full = [(p + " " + t).strip() if p else t for p, t in zip(prompts, targets)]
    enc = processor(images=list(images), text=full, padding=True, return_tensors="pt")
    enc["input_ids"][:, 0] = tok.bos_token_id
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, 0] = -100
    for i, p in enumerate(prompts):
        if p:
            n = len(tok(p, add_special_tokens=False).input_ids)
            labels[i, 1 : 1 + n] = -100
    enc["labels"] = labels
    return dict(enc)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def prompt_lengths(family: Family, config, processor, prompt: str) -> tuple[int, int, bool]:
    """Generate starts from ``[DEC]`` + prompt (the trailing ``[SEP]`` dropped); no Q-Former text."""
    if processor is not None:
        from PIL import Image

        side = int(config.vision_config.image_size)
        enc = generation_inputs(family, processor, [Image.new("RGB", (side, side))], [prompt], "cpu")
        return (int(enc["input_ids"].shape[1]) - 1 if "input_ids" in enc else 1), 0, True
    return 1 + len(prompt.split()), 0, False


def gflops_replay(family: Family, model, lm_tokens: int, text_tokens: int, new_tokens: int, num_beams: int = 1) -> float:
    """GFLOPs of captioning one image on the meta model: the ViT once, then one text-decoder step
    per token with a cache, cross-attending to the image at batch ``num_beams``."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    from compressor.planning import cache_of, decode_flops, flops_of

    meta = torch.device("meta")
    side = int(model.config.vision_config.image_size)
    B = num_beams
    state: dict[str, Any] = {}
    with torch.inference_mode():
        total, image = flops_of(lambda: model.vision_model(torch.zeros(1, 3, side, side, device=meta)).last_hidden_state)
        dec = model.text_decoder
        enc = image.expand(B, -1, -1)
        state["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())

        def step(n: int = 1):
            out = dec(input_ids=torch.zeros(B, n, dtype=torch.long, device=meta), encoder_hidden_states=enc,
                      cache=state["cache"], use_cache=True, logits_to_keep=1)
            state["cache"] = cache_of(out)

        first, _ = flops_of(lambda: step(lm_tokens))  # [DEC] + prompt
        return (total + decode_flops(step, first, new_tokens)) / 1e9


# --------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------


def token_ids(family: Family, model, processor) -> dict[str, Any]:
    """``[DEC]`` (bos), ``[SEP]`` (eos) and pad from the text config: what BLIP's generate reads."""
    text = model.config.text_config
    return {
        "bos_token_id": int(text.bos_token_id),
        "eos_token_id": [int(text.sep_token_id)],
        "pad_token_id": int(text.pad_token_id),
    }


# --------------------------------------------------------------------------------------------
# ONNX: the vision encoder and the cross-attending text decoder (exporters.onnx.topologies.blip)
# --------------------------------------------------------------------------------------------

_ONNX_CLASSES: dict[str, Any] = {}


def _onnx_wrappers() -> dict[str, Any]:
    """The wrapper classes, built on first use (this module imports without torch)."""
    if _ONNX_CLASSES:
        return _ONNX_CLASSES
    import torch
    from torch import nn

    from exporters.onnx.graphs import cross_cache, cross_kv, generation_position_ids

    class BlipVisionEncoder(nn.Module):
        """BLIP: ``pixel_values (batch, 3, H, W)`` float32 → ``image_embeds (batch, patches + 1,
        vision_hidden)`` and every text-decoder layer's cross-attention K/V
        ``cross.{i}.key/value (batch, heads, patches + 1, head_dim)``."""

        def __init__(self, model):
            super().__init__()
            self.vision_model = model.vision_model
            self.dtype_ = next(model.vision_model.parameters()).dtype
            layers = model.text_decoder.bert.encoder.layer
            self.attn = nn.ModuleList([layer.crossattention.self for layer in layers])
            self.head_dim = self.attn[0].attention_head_size

        def forward(self, pixel_values):
            h = self.vision_model(pixel_values=pixel_values.to(self.dtype_))[0]
            return (h, *cross_kv(self.attn, h, "key", "value", self.head_dim))

    class BlipTextDecoder(nn.Module):
        """BLIP text decoder with past and precomputed cross-attention K/V.

        ``input_ids (batch, seq)``, ``attention_mask (batch, past + seq)``,
        ``past.{i}.key/value (batch, heads, past, head_dim)``, ``cross.{i}.key/value`` →
        ``logits (batch, vocab)`` (last position), ``present.{i}.key/value``.
        """

        def __init__(self, text_decoder, layers: int, vision_hidden: int):
            super().__init__()
            self.dec = text_decoder
            self.layers = layers
            self.vision_hidden = vision_hidden

        def forward(self, input_ids, attention_mask, *past):
            L = self.layers
            cache = cross_cache(past, L)
            k0 = past[2 * L]
            dummy = torch.zeros((k0.shape[0], k0.shape[2], self.vision_hidden), dtype=k0.dtype, device=k0.device)
            pos = generation_position_ids(attention_mask, input_ids.shape[1])
            out = self.dec(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=pos,
                encoder_hidden_states=dummy,
                cache=cache,
                use_cache=True,
                is_decoder=True,
            )
            presents = [t for layer in out.cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
            return (out.logits[:, -1, :].float(), *presents)

    _ONNX_CLASSES.update(BlipVisionEncoder=BlipVisionEncoder, BlipTextDecoder=BlipTextDecoder)
    return _ONNX_CLASSES


def _onnx_image_sample(size: int, batch: int, gen) -> list:
    """Sample ``pixel_values (batch, 3, size, size)``."""
    import torch

    return [torch.randn((batch, 3, size, size), generator=gen)]


def onnx_graph_parts(family: Family, model):
    """The ONNX parts of a BLIP model for the ``blip`` topology: the ViT with every text-decoder
    layer's cross-attention K/V, and the BERT text decoder with past and cross K/V."""
    from exporters.onnx.graphs import ImageGraph, TensorSpec
    from exporters.onnx.topologies.blip import Parts

    W = _onnx_wrappers()
    cfg = model.config
    text, vc = cfg.text_config, cfg.vision_config
    layers = model.text_decoder.bert.encoder.layer
    L = len(layers)
    size = int(vc.image_size)
    vh = int(vc.hidden_size)
    patches = (size // int(vc.patch_size)) ** 2 + 1
    image = ImageGraph(
        module=W["BlipVisionEncoder"](model),
        inputs=(TensorSpec("pixel_values", ("batch", 3, size, size), "float32"),),
        sample=lambda batch, gen: _onnx_image_sample(size, batch, gen),
        num_tokens=patches,
    )
    return Parts(
        image=image,
        decoder=W["BlipTextDecoder"](model.text_decoder, L, vh),
        num_layers=L,
        num_heads=int(text.num_attention_heads),
        head_dim=int(layers[0].attention.self.attention_head_size),
        image_hidden=vh,
        hidden_size=int(text.hidden_size),
        vocab_size=int(model.text_decoder.cls.predictions.decoder.weight.shape[0]),
        meta={"image_size": size, "num_patches": patches},
        layer_heads=family.layer_kv_heads(model),
    )
