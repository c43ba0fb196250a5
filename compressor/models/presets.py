"""Deterministic tiny models built in code, one per family, with processors that reload.

Presets are what tests and the offline demo run on; users on GPUs name Hub ids instead. Each
preset is re-initialised with :func:`compressor.models.init.reinit_` so it is not blind to its
input (several distinct tokens per caption, different captions for different images).

===================  =====================================================================
preset               architecture
===================  =====================================================================
tiny-blip2-opt       BLIP-2: ViT 2×32, Q-Former 4×32 (cross-attention every 2), OPT 6×32
tiny-blip2-llama     BLIP-2 with a Llama decoder, 4 heads / 2 KV heads (grouped, as SmolLM2)
tiny-blip2-t5        BLIP-2 with a T5 encoder-decoder (4 + 4 blocks, gated-GELU as Flan-T5)
tiny-instructblip    InstructBLIP: Q-Former reads the instruction (BERT WordPiece), OPT LM
tiny-blip            BLIP: ViT + BERT text decoder (4 layers, cross-attention every layer)
tiny-smolvlm         SmolVLM (Idefics3): SigLIP 2×32 on 32 px tiles, pixel shuffle 2, Llama 6×32
                     (4 heads / 2 KV heads); image splitting on (64 px longest edge: up to 2×2 tiles
                     + the global image, 4 image tokens each); SmolLM2-style special tokens
small-smolvlm        SmolVLM: SigLIP 2×64, Llama 4×64, same processor (the distillation student, 0.50M)
small-blip2-opt      BLIP-2 OPT sized to learn the synthetic shapes (the demo teacher's base)
shapes-teacher       small-blip2-opt trained on the shapes set (shipped in compressor/assets)
===================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PRESET_VERSION = "1"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable[[int], tuple]  # seed -> (model, processor)


def _vision(hidden: int, layers: int, image: int, patch: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image,
        patch_size=patch,
    )


def _qformer(hidden: int, layers: int, vision_hidden: int, **kw) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        cross_attention_frequency=2,
        encoder_hidden_size=vision_hidden,
        **kw,
    )


def _opt(tokenizer, hidden: int, layers: int, ffn: int) -> dict:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,
        attention_dropout=0.0,
    ).to_dict()


def _finish(model, processor, seed: int, init: tuple[float, float, int] = (1.0, 1.0, 0)):
    """Re-initialise (gain, embed_std, seed offset chosen per preset so captions vary), set ids."""
    from compressor.models.init import reinit_

    gain, embed_std, offset = init
    reinit_(model, seed=seed + offset, gain=gain, embed_std=embed_std)
    set_generation_ids(model, processor.tokenizer)
    model.eval()
    return model, processor


def set_generation_ids(model, tokenizer, max_new_tokens: int = 20) -> None:
    """Copy the tokenizer's BOS/EOS/PAD ids into ``model.generation_config``, with a caption-length default."""
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.max_new_tokens = max_new_tokens


def _blip2_opt(seed: int, *, vh=32, vl=2, image=32, patch=8, qh=32, ql=4, th=32, tl=6, ffn=64, nq=8, init=(3.0, 0.1, 1)):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from compressor.models.processors import blip2_processor, bpe_tokenizer

    proc = blip2_processor(bpe_tokenizer("opt"), image, nq)
    tok = proc.tokenizer
    cfg = Blip2Config(
        vision_config=_vision(vh, vl, image, patch),
        qformer_config=_qformer(qh, ql, vh),
        text_config=_opt(tok, th, tl, ffn),
        num_query_tokens=nq,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _finish(Blip2ForConditionalGeneration(cfg), proc, seed, init)


def tiny_blip2_opt(seed: int = 0):
    """BLIP-2 OPT: 133k-parameter scale (ViT 2×32, Q-Former 4×32, OPT 6×32), image 32×32."""
    return _blip2_opt(seed)


def small_blip2_opt(seed: int = 0):
    """BLIP-2 OPT sized for the shapes teacher: ViT 3×64 on 64×64, Q-Former 4×64, OPT 8×64."""
    return _blip2_opt(seed, vh=64, vl=3, image=64, patch=8, qh=64, ql=4, th=64, tl=8, ffn=256, nq=8, init=(3.0, 0.1, 0))


def tiny_blip2_llama(seed: int = 0):
    """BLIP-2 with a Llama decoder (6 layers, hidden 32, 4 query heads / 2 KV heads)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig

    from compressor.models.processors import blip2_processor, bpe_tokenizer

    proc = blip2_processor(bpe_tokenizer("llama"), 32, 8)
    tok = proc.tokenizer
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    ).to_dict()
    cfg = Blip2Config(
        vision_config=_vision(32, 2, 32, 8),
        qformer_config=_qformer(32, 4, 32),
        text_config=text,
        num_query_tokens=8,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _finish(Blip2ForConditionalGeneration(cfg), proc, seed, (2.0, 0.1, 0))


def tiny_blip2_t5(seed: int = 0):
    """BLIP-2 with a Flan-T5-style encoder-decoder (4 + 4 blocks, d_model 32, gated-GELU)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    from compressor.models.processors import blip2_processor, unigram_tokenizer

    proc = blip2_processor(unigram_tokenizer(), 32, 8)
    tok = proc.tokenizer
    text = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        dropout_rate=0.0,
    ).to_dict()
    cfg = Blip2Config(
        vision_config=_vision(32, 2, 32, 8),
        qformer_config=_qformer(32, 4, 32),
        text_config=text,
        num_query_tokens=8,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model, proc = _finish(Blip2ForConditionalGeneration(cfg), proc, seed, (3.0, 0.1, 0))
    model.generation_config.decoder_start_token_id = tok.pad_token_id
    return model, proc


def tiny_instructblip(seed: int = 0):
    """InstructBLIP: the Q-Former reads the instruction (BERT WordPiece), OPT 6×32 decoder."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from compressor.models.processors import bpe_tokenizer, instructblip_processor, wordpiece_tokenizer

    qtok = wordpiece_tokenizer()
    proc = instructblip_processor(bpe_tokenizer("opt"), qtok, 32, 8)
    tok = proc.tokenizer
    cfg = InstructBlipConfig(
        vision_config=_vision(32, 2, 32, 8),
        qformer_config=_qformer(32, 4, 32, vocab_size=len(qtok), pad_token_id=qtok.pad_token_id),
        text_config=_opt(tok, 32, 6, 64),
        num_query_tokens=8,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return _finish(InstructBlipForConditionalGeneration(cfg), proc, seed, (3.0, 0.1, 1))


def tiny_blip(seed: int = 0):
    """BLIP captioning: ViT 2×32 + BERT text decoder 4×32 (cross-attention in every layer)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    from compressor.models.processors import blip_processor

    proc = blip_processor(32)
    tok = proc.tokenizer
    cfg = BlipConfig(
        vision_config=_vision(32, 2, 32, 8),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            encoder_hidden_size=32,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.sep_token_id,
            sep_token_id=tok.sep_token_id,
        ),
    )
    model, proc = _finish(BlipForConditionalGeneration(cfg), proc, seed, (0.5, 0.5, 3))
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.config.text_config.bos_token_id = tok.bos_token_id
    model.config.text_config.sep_token_id = tok.sep_token_id
    model.config.text_config.eos_token_id = tok.sep_token_id
    return model, proc


def _smolvlm(seed: int, *, vh: int, vl: int, th: int, tl: int, ffn: int, heads: int, kv_heads: int, init=(2.0, 0.1, 0)):
    """A SmolVLM (Idefics3) on 32 px tiles (patch 8, pixel shuffle 2: 4 image tokens per tile), images
    resized to a longest edge of 64 px and split (up to 2×2 tiles + the global image), untied head."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig

    from compressor.models.processors import smolvlm_processor, smolvlm_tokenizer

    proc = smolvlm_processor(smolvlm_tokenizer(), tile_size=32, longest_edge=64, image_seq_len=4)
    tok = proc.tokenizer
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=th,
        intermediate_size=ffn,
        num_hidden_layers=tl,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    ).to_dict()
    cfg = Idefics3Config(
        vision_config=dict(_vision(vh, vl, 32, 8), intermediate_size=vh * 2),
        text_config=text,
        scale_factor=2,
        image_token_id=proc.image_token_id,
        tie_word_embeddings=False,
    )
    return _finish(Idefics3ForConditionalGeneration(cfg), proc, seed, init)


def tiny_smolvlm(seed: int = 0):
    """SmolVLM (Idefics3): SigLIP 2×32 (32 px tiles, patch 8), pixel shuffle 2, Llama 6×32 with grouped KV heads.

    The processor splits images as SmolVLM's does (resized to a longest edge of 64 px, then 32 px
    tiles plus the global image; 4 ``<image>`` tokens per tile), with the published chat template
    and the small SmolLM2-style tokenizer ``smolvlm.json``; the head is untied, as in SmolVLM-256M.
    """
    return _smolvlm(seed, vh=32, vl=2, th=32, tl=6, ffn=64, heads=4, kv_heads=2)


def small_smolvlm(seed: int = 0):
    """SmolVLM sized to learn the synthetic shapes (the distillation student of
    ``recipes/distill_blip2_to_smolvlm.yaml``): SigLIP 2×64, Llama 4×64 (4 heads / 2 KV heads, MLP 128),
    0.50M parameters (the shapes teacher has 0.83M)."""
    return _smolvlm(seed, vh=64, vl=2, th=64, tl=4, ffn=128, heads=4, kv_heads=2)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-blip2-opt", "BLIP-2 OPT, tiny (tests)", tiny_blip2_opt),
        Preset("tiny-blip2-llama", "BLIP-2 Llama with grouped KV heads, tiny", tiny_blip2_llama),
        Preset("tiny-blip2-t5", "BLIP-2 Flan-T5 style, tiny", tiny_blip2_t5),
        Preset("tiny-instructblip", "InstructBLIP OPT, tiny", tiny_instructblip),
        Preset("tiny-blip", "BLIP captioning, tiny", tiny_blip),
        Preset("tiny-smolvlm", "SmolVLM (Idefics3) with image splitting, tiny", tiny_smolvlm),
        Preset("small-smolvlm", "SmolVLM sized for the shapes set (the distillation student)", small_smolvlm),
        Preset("small-blip2-opt", "BLIP-2 OPT sized for the shapes teacher", small_blip2_opt),
    )
}
#: Presets shipped as trained folders in compressor/assets.
SHIPPED = {"shapes-teacher": ASSETS / "shapes-teacher"}
PRESET_NAMES = (*PRESETS, *SHIPPED)


def build_preset(name: str, seed: int = 0):
    """Build a preset in memory.

    Args:
        name: one of :data:`PRESETS`.
        seed: weight seed.

    Returns:
        ``(model, processor)``: a BLIP-family ``PreTrainedModel`` in eval mode and its processor.

    Raises:
        KeyError: unknown preset name.
    """
    return PRESETS[name].build(seed)


def save_preset(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a preset and ``save_pretrained`` model and processor to ``out_dir``."""
    model, proc = build_preset(name, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return out_dir
