"""InstructBLIP: ``InstructBlipForConditionalGeneration``, BLIP-2 whose Q-Former also reads the instruction.

Dai et al. 2023, "InstructBLIP: Towards General-purpose Vision-Language Models with Instruction
Tuning". Everything is BLIP-2's (:mod:`compressor.families.blip2`: parts, stacks, LoRA names,
language models) except that the Q-Former gets the instruction's tokens from its own BERT
tokenizer (``qformer_input_ids`` / ``qformer_attention_mask``, the processor's
``qformer_tokenizer``): in training batches it reads the prompt only, never the target.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from compressor.families import blip2
from compressor.families.base import Family

MODEL_CLASS = "InstructBlipForConditionalGeneration"
MODEL_TYPES = ("instructblip",)
REMOVAL_KEYS = blip2.REMOVAL_KEYS
ENCODER_DECODER_KEYS = blip2.ENCODER_DECODER_KEYS
LORA_NAMES = blip2.LORA_NAMES
PARTS = blip2.PARTS
PART_LABELS = blip2.PART_LABELS
TRAINABLE_NAMES = blip2.TRAINABLE_NAMES

generation_inputs = blip2.generation_inputs  # the processor builds the Q-Former's instruction inputs itself
decode = blip2.decode
caption_batch = blip2.caption_batch
prompt_lengths = blip2.prompt_lengths
gflops_replay = blip2.gflops_replay
token_ids = blip2.token_ids
reconcile = blip2.reconcile
check_inputs = blip2.check_inputs


def describe(config) -> Family:
    """The :class:`Family` of an InstructBLIP config."""
    return blip2.describe(
        config,
        name="instructblip",
        model_class="InstructBlipForConditionalGeneration",
        config_class="InstructBlipConfig",
        impl=sys.modules[__name__],
        extra={"qformer_text": True},
    )


def training_batch(family: Family, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
    """BLIP-2's batch, plus the instruction (the prompt only) for the Q-Former."""
    enc = blip2.training_batch(family, processor, images, targets, prompts)
    q = processor.qformer_tokenizer(list(prompts), padding=True, return_tensors="pt")
    enc["qformer_input_ids"] = q["input_ids"]
    enc["qformer_attention_mask"] = q["attention_mask"]
    return enc


# --------------------------------------------------------------------------------------------
# ONNX: BLIP-2's parts; the image path also reads the instruction (``extra["qformer_text"]``)
# --------------------------------------------------------------------------------------------

onnx_graph_parts = blip2.onnx_graph_parts
