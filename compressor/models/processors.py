"""Processors (tokenizer + image processor) for the presets, built from the shipped tokenizer files.

The tokenizer files in ``compressor/models/tokenizers/`` were trained once by
``python -m compressor.models.tokenizers.build`` and are committed (the WordPiece trainer is not
deterministic, stack-facts §1). Special-token layouts follow the real models:

* OPT: byte-level BPE, ``</s>`` prepended as BOS, pad 1, bos = eos 2 (facebook/opt-*).
* Llama: byte-level BPE, ``<s>`` prepended as BOS, ``</s>`` EOS.
* T5: Unigram + Metaspace, ``</s>`` appended, pad 0, eos 1 (google/flan-t5-*).
* BERT: WordPiece, ``[CLS] … [SEP]``; BLIP's text decoder starts with ``[DEC]``.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizers"
IMAGE_TOKEN = "<image>"


def _image_processor(image_size: int):
    import transformers

    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    return cls(
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )


def bpe_tokenizer(style: str = "opt"):
    """Byte-level BPE tokenizer with OPT's or Llama's special-token layout.

    Args:
        style: ``opt`` (``</s>`` as BOS and EOS, pad ``<pad>``) or ``llama`` (``<s>`` BOS, ``</s>`` EOS).

    Returns:
        A ``PreTrainedTokenizerFast`` whose vocabulary already holds ``<image>``.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "bpe.json"))
    bos = "</s>" if style == "opt" else "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def unigram_tokenizer():
    """T5-style Unigram tokenizer: ``</s>`` appended, pad 0, eos 1."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "unigram.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def wordpiece_tokenizer():
    """BERT WordPiece tokenizer (``[CLS] $A [SEP]``), with BLIP's ``[DEC]`` as BOS."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "wordpiece.json"))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        bos_token="[DEC]",
        model_max_length=512,
    )


def blip2_processor(tokenizer, image_size: int, num_query_tokens: int):
    """A ``Blip2Processor`` that prepends ``num_query_tokens`` image tokens (transformers 5.x)."""
    from transformers import Blip2Processor

    return Blip2Processor(_image_processor(image_size), tokenizer, num_query_tokens=num_query_tokens)


def instructblip_processor(tokenizer, qformer_tokenizer, image_size: int, num_query_tokens: int):
    """An ``InstructBlipProcessor`` (the Q-Former reads the instruction through a BERT tokenizer)."""
    from transformers import InstructBlipProcessor

    return InstructBlipProcessor(
        _image_processor(image_size), tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens
    )


def blip_processor(image_size: int):
    """A ``BlipProcessor`` (BERT WordPiece tokenizer; the decoder starts with ``[DEC]``)."""
    from transformers import BlipProcessor

    return BlipProcessor(_image_processor(image_size), wordpiece_tokenizer())


#: The published SmolVLM folder shipped with the project (config, processor, tokenizer, chat template).
SMOLVLM_DIR = Path(__file__).resolve().parent.parent / "families" / "configs" / "smolvlm-256m-instruct"


def smolvlm_tokenizer():
    """The tiny SmolVLM tokenizer (``smolvlm.json``): byte-level BPE with SmolLM2's special tokens.

    No BOS is added (the chat template writes ``<|im_start|>`` itself, as SmolVLM's does); EOS is
    ``<end_of_utterance>`` and padding ``<|im_end|>``, as in HuggingFaceTB/SmolVLM-256M-Instruct.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "smolvlm.json"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=4096,
    )


def smolvlm_processor(tokenizer, tile_size: int, longest_edge: int, image_seq_len: int):
    """An ``Idefics3Processor`` with image splitting on (SmolVLM's processor, scaled down).

    Args:
        tokenizer: the tokenizer (holds ``<image>``, ``<fake_token_around_image>``, ``<global-img>``
            and the ``<row_i_col_j>`` tile tokens).
        tile_size: side of one tile in pixels (the vision encoder's ``image_size``).
        longest_edge: images are resized to this longest edge, then split into
            ``tile_size`` tiles plus one global image (SmolVLM-256M: 2048 and 512).
        image_seq_len: image tokens per tile after the pixel shuffle.

    The chat template is the published one (``families/configs/smolvlm-256m-instruct``).
    """
    import json

    import transformers
    from transformers import Idefics3Processor

    cls = getattr(transformers, "Idefics3ImageProcessorPil", None) or transformers.Idefics3ImageProcessor
    image_processor = cls(
        do_resize=True,
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile_size},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    template = json.loads((SMOLVLM_DIR / "chat_template.json").read_text())["chat_template"]
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=template)
