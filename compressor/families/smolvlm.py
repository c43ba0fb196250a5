"""SmolVLM: ``Idefics3ForConditionalGeneration`` (and ``SmolVLMForConditionalGeneration``), a SigLIP
vision encoder, a pixel-shuffle connector and a Llama-architecture language model.

Laurençon et al. 2024, "Building and better understanding vision-language models: insights and
future directions" (Idefics3); Marafioti et al. 2025, "SmolVLM: Redefining small and efficient
multimodal models". transformers 5.x attribute paths:

* parts: ``vision`` (``model.vision_model``, SigLIP), ``connector`` (``model.connector``: the
  pixel shuffle by ``scale_factor`` and one linear projection), ``language_model``
  (``model.text_model``, a bare ``LlamaModel``, and the top-level ``lm_head``);
* stacks: the vision encoder's layers and the language model's
  (:mod:`compressor.families.language_models`, body ``model.text_model``);
* batches: the prompt is the processor's chat template (``<|im_start|>User:<image>{prompt}
  <end_of_utterance>\\nAssistant:``) whose ``<image>`` the processor expands into the image
  layout: with image splitting, one block of ``image_seq_len`` ``<image>`` tokens per tile
  (``<fake_token_around_image><row_i_col_j>``) and one for the downscaled global image; the model
  ``masked_scatter``s the connector's outputs of the real (non-padding) tiles into them. A
  caption is the text after ``Assistant:``, ended by ``<end_of_utterance>``.

The ONNX export reuses the decoder-only topology: the image path takes the processor's
``pixel_values (batch, tiles, 3, S, S)`` and ``pixel_attention_mask (batch, tiles, S, S)`` and
returns the features of the real tiles, as the hand-made ``vision_encoder.onnx`` of
HuggingFaceTB/SmolVLM-256M-Instruct does; the language model is exported as a plain causal LM.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from compressor.errors import ModelSpecError
from compressor.families.base import Family, Stack
from compressor.families.language_models import LLAMA_LIKE, language_model_kind

MODEL_CLASS = "Idefics3ForConditionalGeneration"
MODEL_TYPES = ("idefics3", "smolvlm")
#: model_type → (model class, config class) of transformers.
CLASSES = {
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Config"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMConfig"),
}
REMOVAL_KEYS = {
    "vision": "Vision-encoder layers.",
    "language_model": "Language-model layers.",
}
ENCODER_DECODER_KEYS: tuple[str, ...] = ()
_VISION = r"model\.vision_model\.encoder\.layers\.\d+"
VISION_LORA = {
    "vision.attention": rf"{_VISION}\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "vision.mlp": rf"{_VISION}\.mlp\.(fc1|fc2)",
}
CONNECTOR_LORA = {"connector": r"model\.connector\.modality_projection\.proj"}
LORA_NAMES = (*VISION_LORA, *CONNECTOR_LORA, "language_model.attention", "language_model.mlp")
PARTS = {
    "vision": ("model.vision_model",),
    "connector": ("model.connector",),
    "language_model": ("model.text_model", "lm_head"),
}
TRAINABLE_NAMES = tuple(PARTS)
#: ``compress plan``'s GFLOPs figures: key suffix → the image it assumes.
GFLOPS_IMAGES = {
    "": "one tile-sized image (image splitting off: one tile)",
    "split": "one square image at the processor's longest edge, split into tiles plus the global image",
}
#: The model-assembly module of this family (``model: {assemble: {family: smolvlm, …}}``).
ASSEMBLY = "compressor.models.assemble_smolvlm"
#: The user turn of plain captioning (a recipe's ``generation.prompt`` replaces it).
CAPTION_INSTRUCTION = "Describe this image in one sentence."
#: The chat layout when a processor carries no chat template (SmolVLM's own).
FALLBACK_TEMPLATE = "<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant:"


def describe(config) -> Family:
    """The :class:`Family` of an Idefics3 / SmolVLM config.

    Raises:
        ModelSpecError: a language model other than a Llama-architecture decoder (exit 2).
    """
    text_type = config.text_config.model_type
    if text_type not in LLAMA_LIKE:
        raise ModelSpecError(
            f"{config.model_type} with a '{text_type}' language model is not supported; supported language models: "
            f"{', '.join(LLAMA_LIKE)}"
        )
    lm = language_model_kind(text_type, root="model.text_model", body="model.text_model")
    model_class, config_class = CLASSES.get(config.model_type, CLASSES["idefics3"])
    stacks = {"vision": Stack("vision", "model.vision_model.encoder.layers", ("vision_config.num_hidden_layers",))}
    for st in lm.stacks:
        stacks[st.part] = st
    tile = tile_size(config)
    seq_len = (tile // int(config.vision_config.patch_size)) ** 2 // int(getattr(config, "scale_factor", 2)) ** 2
    return Family(
        name="smolvlm",
        model_type=config.model_type,
        model_class=model_class,
        config_class=config_class,
        parts=dict(PARTS),
        stacks=stacks,
        lora={**VISION_LORA, **CONNECTOR_LORA, **lm.lora},
        trainable=dict(PARTS),
        lm=lm,
        decoder_only=True,
        impl=sys.modules[__name__],
        width=lm.width,
        num_queries=0,
        config_mirrors={"model.text_model": "text_config", "model.vision_model": "vision_config"},
        onnx_topology="decoder_only",
        extra={"image_seq_len": seq_len, "tile_size": tile},
    )


def tile_size(config) -> int:
    """The side in pixels of the tiles the model is run on: ``vision_config.max_image_size``'s
    longest edge where the config records the processor's (the published SmolVLM configs do, and
    an assembly at another operating point writes its own), else the vision encoder's ``image_size``."""
    vc = config.vision_config
    return int((getattr(vc, "max_image_size", None) or {}).get("longest_edge", vc.image_size))


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def chat_prompt(processor, prompt: str) -> str:
    """The processor's chat template around one image and ``prompt`` (plain captioning:
    :data:`CAPTION_INSTRUCTION`), ending with the assistant's turn (``…Assistant:``)."""
    text = prompt or CAPTION_INSTRUCTION
    if getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return FALLBACK_TEMPLATE.format(text=text)


def _encode(processor, images: Sequence, texts: list[str], padding_side: str, **kwargs) -> dict:
    tok = processor.tokenizer
    tok.padding_side = padding_side
    try:
        return processor(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tok.padding_side = "right"


def generation_inputs(family: Family, processor, images: Sequence, prompts: Sequence[str], device: str = "cpu") -> dict:
    """Inputs for ``model.generate`` (left padding).

    Returns:
        ``input_ids`` / ``attention_mask (batch, seq)`` (the chat prompt with the expanded image
        layout), ``pixel_values (batch, tiles, 3, S, S)`` and ``pixel_attention_mask (batch,
        tiles, S, S)``; rows with fewer tiles are padded with all-zero tiles.
    """
    enc = _encode(processor, images, [chat_prompt(processor, p) for p in prompts], "left")
    return {k: v.to(device) for k, v in enc.items()}


def decode(family: Family, processor, sequences, inputs: dict, prompts: Sequence[str]) -> list[str]:
    """Generated ids → captions: the prompt (the chat template up to ``Assistant:``) is cut off,
    special tokens (``<end_of_utterance>``) dropped."""
    sequences = sequences[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def caption_batch(family: Family, processor, images: Sequence, prompts: Sequence[str], run) -> list[str]:
    """The batch runs as is (left padding aligns the prompts; padding tiles are dropped by the model)."""
    return run(list(images), list(prompts))


def training_batch(family: Family, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
    """``[chat prompt with the image layout] + " " + target + <end_of_utterance>``, right-padded.

    Labels copy ``input_ids`` with everything up to ``Assistant:`` (image tokens, the user turn),
    and padding, set to -100. The target's tokens are counted on their own: a byte-level BPE
    never merges across the ``:`` / `` word`` boundary, so they are the row's last tokens.

    Returns:
        Tensors for ``model(**batch)``, ``labels (batch, seq)``.
    """
    tok = processor.tokenizer
    eou = getattr(processor, "end_of_utterance_token", None) or tok.eos_token
    suffixes = [" " + t.strip() + eou for t in targets]
    texts = [chat_prompt(processor, p) + s for p, s in zip(prompts, suffixes)]
    enc = _encode(processor, images, texts, "right")
    labels = enc["input_ids"].clone()
    mask = enc["attention_mask"]
    labels[mask == 0] = -100
    for i, s in enumerate(suffixes):
        n_target = len(tok(s, add_special_tokens=False).input_ids)
        labels[i, : int(mask[i].sum()) - n_target] = -100
    enc["labels"] = labels
    return dict(enc)


# --------------------------------------------------------------------------------------------
# Planning: prompt lengths and the GFLOPs replay of generate (compress plan)
# --------------------------------------------------------------------------------------------


def _sizes(config, processor) -> tuple[int, int]:
    """(tile side, the processor's longest edge) in pixels."""
    tile = tile_size(config)
    longest = None
    if processor is not None:
        longest = (getattr(processor.image_processor, "size", None) or {}).get("longest_edge")
    if longest is None:
        longest = (getattr(config.vision_config, "size", None) or {}).get("longest_edge", tile)
    return tile, int(longest)


def prompt_lengths(family: Family, config, processor, prompt: str, image: str = "") -> tuple[int, int, bool]:
    """Language-model input length and the number of tiles the vision encoder reads, for one image.

    Args:
        image: ``""``: one tile-sized image with image splitting off; ``split``: a square image
            at the processor's longest edge, split into tiles plus the global image.

    Returns:
        ``(lm_tokens, tiles, exact)``; exact is False when estimated without a processor.
    """
    tile, longest = _sizes(config, processor)
    split = image == "split"
    if processor is not None:
        from PIL import Image

        side = longest if split else tile
        kw = {} if split else {"do_image_splitting": False}
        enc = _encode(processor, [Image.new("RGB", (side, side))], [chat_prompt(processor, prompt)], "left", **kw)
        return int(enc["input_ids"].shape[1]), int(enc["pixel_values"].shape[1]), True
    per_side = max(1, -(-longest // tile)) if split else 0
    tiles = per_side**2 + 1 if per_side > 1 else 1
    seq = family.extra["image_seq_len"]
    words = len((prompt or CAPTION_INSTRUCTION).split())
    return tiles * (seq + 2) + per_side + words + 8, tiles, False


def causal_lm(model):
    """The language model as a transformers causal LM sharing ``model``'s modules (no copy).

    ``AutoModelForCausalLM`` of ``text_config`` built on the meta device, whose decoder stack and
    head are then ``model.model.text_model`` and ``model.lm_head``: what the decoder-only ONNX
    topology and the GFLOPs replay feed ``inputs_embeds`` to.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model.config.text_config)
    lm.model = model.model.text_model
    lm.lm_head = model.lm_head
    lm.eval()
    return lm


def _vision_states(vision, pixel_values, patch_mask):
    """The vision encoder's forward with every patch valid, without building the attention mask
    (its "is every position valid" check reads a value, which the meta device has not)."""
    h = vision.embeddings(pixel_values=pixel_values, patch_attention_mask=patch_mask)
    return vision.post_layernorm(vision.encoder(inputs_embeds=h, attention_mask=None).last_hidden_state)


def gflops_replay(family: Family, model, lm_tokens: int, tiles: int, new_tokens: int, num_beams: int = 1) -> float:
    """GFLOPs of captioning one image on the meta model: the vision encoder over ``tiles`` tiles
    and the connector once; the language model at batch ``num_beams``.

    Args:
        model: the model on the meta device.
        lm_tokens: language-model input length (image layout + chat prompt).
        tiles: tiles the vision encoder reads (:func:`prompt_lengths`).
        new_tokens: generated tokens.
        num_beams: beam width.
    """
    import torch

    from compressor.planning import flops_of, language_model_flops

    meta = torch.device("meta")
    side = tile_size(model.config)
    patches = side // int(model.config.vision_config.patch_size)
    with torch.inference_mode():
        mask = torch.ones(tiles, patches, patches, dtype=torch.bool, device=meta)
        px = torch.zeros(tiles, 3, side, side, device=meta)
        total, image = flops_of(lambda: _vision_states(model.model.vision_model, px, mask))
        total += flops_of(lambda: model.model.connector(image))[0]
        total += language_model_flops(causal_lm(model), True, lm_tokens, new_tokens, num_beams)
    return total / 1e9


# --------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------


def token_ids(family: Family, model, processor) -> dict[str, Any]:
    """bos / eos (a list: ``<end_of_utterance>``) / pad from the generation config, else the tokenizer."""
    gc = model.generation_config
    tok = processor.tokenizer

    def pick(name):
        v = getattr(gc, name, None)
        return v if v is not None else getattr(tok, name, None)

    eos, pad, bos = pick("eos_token_id"), pick("pad_token_id"), pick("bos_token_id")
    return {
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None],
        "pad_token_id": None if pad is None else int(pad),
    }


# --------------------------------------------------------------------------------------------
# ONNX: the image path (tiles + pixel mask → features of the real tiles) for the decoder-only
# topology of exporters.onnx.topologies
# --------------------------------------------------------------------------------------------

_ONNX_CLASSES: dict[str, Any] = {}


def _onnx_wrappers():
    """The image-path wrapper class, built on first use (this module imports without torch)."""
    if "ImageEncoder" in _ONNX_CLASSES:
        return _ONNX_CLASSES["ImageEncoder"]
    import torch
    from torch import nn
    from transformers.masking_utils import create_bidirectional_mask

    def _embeddings(emb, pixel_values, patch_mask):
        """``Idefics3VisionEmbeddings.forward`` (transformers 5.x) with int64 position ids throughout.

        The patch embeddings plus the position embedding of each valid patch's place on the
        ``num_patches_per_side`` grid (fractional coordinates bucketised); padded patches take
        position 0. The same arithmetic as transformers', whose ``torch.full`` without a dtype the
        legacy ONNX exporter types float32 (a Gather with float indices, which ONNX refuses).
        """
        b = pixel_values.shape[0]
        x = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        side = emb.num_patches_per_side
        boundaries = torch.arange(1 / side, 1.0, 1 / side, device=pixel_values.device)
        rows = torch.arange(patch_mask.shape[1], device=x.device, dtype=torch.float32)
        cols = torch.arange(patch_mask.shape[2], device=x.device, dtype=torch.float32)
        frac_h = torch.clamp(rows[None, :] * (1.0 / patch_mask[:, :, 0].sum(dim=1))[:, None], max=1.0 - 1e-6)
        frac_w = torch.clamp(cols[None, :] * (1.0 / patch_mask[:, 0, :].sum(dim=1))[:, None], max=1.0 - 1e-6)
        bucket_h = torch.bucketize(frac_h, boundaries, right=True)
        bucket_w = torch.bucketize(frac_w, boundaries, right=True)
        pos = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(b, -1).to(torch.long)
        pos = torch.where(patch_mask.reshape(b, -1), pos, torch.zeros_like(pos))
        return x + emb.position_embedding(pos)

    class ImageEncoder(nn.Module):
        """SmolVLM / Idefics3: tiles and their pixel mask → language-model inputs.

        ``pixel_values (batch, tiles, 3, S, S)`` float32 and ``pixel_attention_mask (batch, tiles,
        S, S)`` → ``image_embeds (real_tiles, image_seq_len, lm_hidden)``: padding tiles (all
        pixel values 0) are dropped, the pixel mask becomes the patch mask, then the vision
        encoder and the connector, as ``Idefics3Model.get_image_features`` computes them. The
        rows follow the tiles' order, which is the order of the ``<image>`` tokens (the model's
        ``masked_scatter``). Only those parts are registered.
        """

        def __init__(self, model):
            super().__init__()
            self.vision_model = model.model.vision_model
            self.connector = model.model.connector
            self.patch = int(model.config.vision_config.patch_size)
            self.dtype_ = next(model.model.vision_model.parameters()).dtype
            self.out_dtype = model.lm_head.weight.dtype

        def forward(self, pixel_values, pixel_attention_mask):
            b, n, c, height, width = pixel_values.shape
            p = self.patch
            pv = pixel_values.reshape(b * n, c, height, width).to(self.dtype_)
            # a patch is valid when any of its pixels is (the unfold of get_image_features, as a reshape)
            pm = pixel_attention_mask.reshape(b * n, height // p, p, width // p, p)
            patch_mask = pm.sum(dim=(2, 4)) > 0
            real = (pv == 0.0).sum(dim=(-1, -2, -3)) != c * height * width  # padding tiles are all 0
            pv, patch_mask = pv[real], patch_mask[real]
            vm = self.vision_model
            h = _embeddings(vm.embeddings, pv, patch_mask)
            mask = create_bidirectional_mask(config=vm.config, inputs_embeds=h, attention_mask=patch_mask.flatten(1))
            h = vm.post_layernorm(vm.encoder(inputs_embeds=h, attention_mask=mask).last_hidden_state)
            return self.connector(h).to(self.out_dtype)

    _ONNX_CLASSES["ImageEncoder"] = ImageEncoder
    return ImageEncoder


def _onnx_image_sample(size: int, batch: int, gen) -> list:
    """Two tiles per row (``pixel_values (batch, 2, 3, size, size)``); row 1's second tile has its
    right half masked out (the patch mask path)."""
    import torch

    mask = torch.ones((batch, 2, size, size), dtype=torch.long)
    if batch > 1:
        mask[1, 1, :, size // 2 :] = 0
    return [torch.randn((batch, 2, 3, size, size), generator=gen), mask]


def onnx_graph_parts(family: Family, model):
    """The ONNX parts of a SmolVLM: the image path (:func:`_onnx_wrappers`) and the language model
    as a causal LM (:func:`causal_lm`) for the decoder-only topology."""
    from exporters.onnx.graphs import ImageGraph, TensorSpec
    from exporters.onnx.topologies.decoder_only import Parts

    cfg = model.config
    size = int(family.extra["tile_size"])
    seq = int(family.extra["image_seq_len"])
    image = ImageGraph(
        module=_onnx_wrappers()(model),
        inputs=(
            TensorSpec("pixel_values", ("batch", "tiles", 3, size, size), "float32"),
            TensorSpec("pixel_attention_mask", ("batch", "tiles", size, size), "int64"),
        ),
        sample=lambda batch, gen: _onnx_image_sample(size, batch, gen),
        num_tokens=seq,
    )
    meta = {"image_token_id": int(cfg.image_token_id), "image_seq_len": seq, "image_size": size,
            "scale_factor": int(getattr(cfg, "scale_factor", 2))}
    return Parts(image=image, language_model=causal_lm(model), text_config=cfg.text_config, meta=meta)
