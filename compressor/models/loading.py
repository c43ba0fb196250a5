"""Resolve a recipe's ``model:`` to a local save_pretrained folder, and load folders.

Every model spec becomes a local folder before the first stage runs, so stages only ever read
folders (Olive-style passes):

* an existing local folder is used in place;
* a preset (``tiny-blip2-opt`` …) is built deterministically into a cache folder;
* ``shapes-teacher`` is the trained folder shipped in ``compressor/assets``;
* ``{config: FILE, init: random}`` is built from the config with seeded random weights;
* ``{assemble: {...}}`` is assembled from pretrained parts (``compressor.models.assemble``);
* a Hub id is fetched with ``huggingface_hub.snapshot_download`` (offline it fails at once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import ModelSpecError, did_you_mean

log = logging.getLogger(__name__)

KNOWN_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "families" / "configs"
#: Hub ids whose published config ships with the project (plan offline, real-size dry runs).
KNOWN_HUB_CONFIGS = {
    "Salesforce/blip2-opt-2.7b": KNOWN_CONFIGS_DIR / "blip2-opt-2.7b.config.json",
    "Salesforce/blip2-flan-t5-xl": KNOWN_CONFIGS_DIR / "blip2-flan-t5-xl.config.json",
    "Salesforce/blip-image-captioning-base": KNOWN_CONFIGS_DIR / "blip-image-captioning-base.config.json",
    "HuggingFaceTB/SmolVLM-256M-Instruct": KNOWN_CONFIGS_DIR / "smolvlm-256m-instruct" / "config.json",
}


def known_processor(hub_id: str):
    """The processor shipped beside a known Hub id's config (None when only the config ships)."""
    if hub_id not in KNOWN_HUB_CONFIGS or KNOWN_HUB_CONFIGS[hub_id].parent == KNOWN_CONFIGS_DIR:
        return None
    return load_processor(KNOWN_HUB_CONFIGS[hub_id].parent)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec made concrete.

    Attributes:
        path: local save_pretrained folder (None until materialised, for specs built on demand).
        kind: ``folder``, ``preset``, ``config``, ``assemble`` or ``hub``.
        key: a stable description of the spec (part of stage cache keys).
    """

    path: Path | None
    kind: str
    key: str


def is_model_dir(path: Path) -> bool:
    """A folder with a config.json and at least one weights file."""
    return path.is_dir() and (path / "config.json").is_file() and any(
        p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".safetensors.index.json") for p in path.iterdir()
    )


def _spec_key(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    data = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec
    return json.dumps(data, sort_keys=True)


def classify(spec: Any) -> str:
    """``folder``, ``preset``, ``config``, ``assemble`` or ``hub`` for a recipe ``model:`` value.

    Raises:
        ModelSpecError: a string that is neither an existing folder, a preset nor a Hub id.
    """
    from compressor.models.presets import PRESET_NAMES

    if not isinstance(spec, str):
        return "assemble" if hasattr(spec, "assemble") or (isinstance(spec, dict) and "assemble" in spec) else "config"
    p = Path(spec).expanduser()
    if p.exists():
        if not is_model_dir(p):
            raise ModelSpecError(
                f"{spec}: not a model folder (expected config.json and *.safetensors, as written by "
                "save_pretrained)"
            )
        return "folder"
    if spec in PRESET_NAMES:
        return "preset"
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return "hub"
    raise ModelSpecError(
        f"model '{spec}' is not a folder, a preset or a Hub id (user/name).{did_you_mean(spec, PRESET_NAMES)} "
        f"Presets: {', '.join(PRESET_NAMES)}"
    )


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder under a temporary name and rename it into place (no half-written folder)."""
    import shutil

    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from compressor.fileio import make_tmp_dir

    tmp = make_tmp_dir(final.parent, final.name)
    try:
        build(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def materialize(spec: Any, cache_dir: Path, dtype: str = "float32") -> ResolvedModel:
    """Turn a recipe ``model:`` into a local folder.

    Args:
        spec: the recipe's model value (str, ConfigModelSpec, AssembleModelSpec).
        cache_dir: where built models are cached (``runs/<name>/inputs``).
        dtype: weights dtype for models built here.

    Returns:
        The resolved model with its folder.

    Raises:
        ModelSpecError: unknown name, missing file, Hub unreachable (the message names
            ``HF_HUB_OFFLINE`` and local paths).
    """
    from compressor.models.presets import PRESET_VERSION, SHIPPED, save_preset

    kind = classify(spec)
    key = _spec_key(spec)
    if kind == "folder":
        path = Path(spec).expanduser().resolve()
        return ResolvedModel(path, kind, f"folder:{path}")
    if kind == "preset":
        if spec in SHIPPED:
            path = SHIPPED[spec]
            if not is_model_dir(path):
                raise ModelSpecError(f"the shipped preset '{spec}' is missing from {path}; reinstall the package")
            return ResolvedModel(path, kind, f"preset:{spec}")
        digest = hashlib.sha256(f"{spec}|{PRESET_VERSION}|{dtype}".encode()).hexdigest()[:12]
        path = _atomic_dir(cache_dir / f"{spec}-{digest}", lambda d: save_preset(spec, d))
        return ResolvedModel(path, kind, f"preset:{spec}:v{PRESET_VERSION}")
    if kind == "hub":
        return ResolvedModel(_snapshot(spec), kind, f"hub:{spec}")
    if kind == "config":
        digest = hashlib.sha256(f"{key}|{dtype}".encode()).hexdigest()[:12]
        path = _atomic_dir(cache_dir / f"config-{digest}", lambda d: _build_from_config(spec, d, dtype))
        return ResolvedModel(path, kind, f"config:{key}")
    from compressor.models.assembly import assemble

    digest = hashlib.sha256(f"{key}|{dtype}".encode()).hexdigest()[:12]
    path = _atomic_dir(cache_dir / f"assembled-{digest}", lambda d: assemble(spec.assemble, d, dtype))
    return ResolvedModel(path, kind, f"assemble:{key}")


def _snapshot(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        )
    except Exception as exc:  # network, auth, offline mode
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise ModelSpecError(
            f"cannot fetch '{repo_id}' from the Hugging Face Hub ({reason}). Offline, point `model:` at a local "
            "save_pretrained folder, a preset (tiny-blip2-opt …) or {config: FILE, init: random}; "
            "or unset HF_HUB_OFFLINE / log in with `hf auth login` to download it."
        ) from None


def load_config(spec_or_path: Any):
    """Load a transformers config without weights (for pre-flight checks and plans).

    Accepts a folder, a config.json path, a preset name, a known Hub id (shipped config), or a
    recipe ConfigModelSpec.

    Raises:
        ModelSpecError: nothing loadable there.
    """
    from transformers import AutoConfig

    from compressor.models.presets import PRESETS, SHIPPED, build_preset

    if hasattr(spec_or_path, "config"):
        return load_config(spec_or_path.config)
    if isinstance(spec_or_path, str) and spec_or_path in KNOWN_HUB_CONFIGS and not Path(spec_or_path).exists():
        return AutoConfig.from_pretrained(str(KNOWN_HUB_CONFIGS[spec_or_path]))
    if isinstance(spec_or_path, str) and spec_or_path in SHIPPED:
        spec_or_path = str(SHIPPED[spec_or_path])
    if isinstance(spec_or_path, str) and spec_or_path in PRESETS:
        model, _ = build_preset(spec_or_path)
        return model.config
    p = Path(str(spec_or_path)).expanduser()
    if p.is_file() and p.suffix == ".json":
        config = AutoConfig.from_pretrained(str(p))
        refuse_quantized(config, p)
        return config
    if p.is_dir() and (p / "config.json").is_file():
        return folder_config(p)
    raise ModelSpecError(f"{spec_or_path}: no config.json found (expected a model folder or a config file)")


def _build_from_config(spec, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoProcessor

    from compressor.families import family_for_config
    from compressor.models.presets import PRESETS, SHIPPED

    config = load_config(spec.config)
    family = family_for_config(config)
    torch.manual_seed(spec.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = family.model_cls()(config)
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(out)
    if spec.processor:
        src = spec.processor
        if src in PRESETS:
            from compressor.models.presets import build_preset

            _, proc = build_preset(src)
        elif known_processor(src) is not None:
            proc = known_processor(src)
        else:
            proc = AutoProcessor.from_pretrained(str(SHIPPED.get(src, src)))
        proc.save_pretrained(out)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without CUDA is an error (exit 2)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSpecError("device: cuda was asked but no CUDA device is available; use device: auto or cpu")
    return device


def load_model(path: Path | str, dtype: str | None = None, device: str = "cpu", with_processor: bool = True):
    """Load a BLIP-family save_pretrained folder.

    Args:
        path: the folder.
        dtype: ``float32`` / ``float16`` / ``bfloat16``, or None for the saved dtype.
        device: ``cpu`` or ``cuda``.
        with_processor: also load the processor (None if the folder has none).

    A folder with ``shape_plan.json`` (a width-pruned model) is loaded through
    :func:`compressor.models.shapes.load_planned`, exactly. A compressed-tensors quantized folder
    (the ``quantize`` stage's) is checked and loaded by :func:`compressor.quantization.load_quantized`:
    plain ``nn.Linear`` modules holding the dequantized weights, the scales kept on the model. An
    older-style folder whose config or processor config lacks a field the other holds is completed
    by its family (:func:`folder_config`), with a warning. Token options recorded in its config (a
    per-image query selection, token merging: :mod:`compressor.tokens`) are applied to the model;
    the processor is returned as saved.

    Returns:
        ``(model, processor_or_None)``, the model in eval mode.

    Raises:
        ModelSpecError: the folder is not a BLIP-family model, or an older-style config that
            cannot be completed (exit 2).
        CorruptInputError: a quantized folder whose scales do not match its weights (exit 2).
        UserInputError: a quantized folder without the compressed-tensors package (exit 2).
    """
    from compressor.families import family_for_config
    from compressor.models.shapes import SHAPE_PLAN, load_planned
    from compressor.tokens import apply_token_options

    path = Path(path)
    if not is_model_dir(path):
        raise ModelSpecError(f"{path}: not a model folder (expected config.json and *.safetensors)")
    processor = _load_raw_processor(path) if with_processor else None
    config = folder_config(path, processor)
    if (path / SHAPE_PLAN).is_file():  # width-pruned: shapes the config cannot express
        model = load_planned(path, torch_dtype(dtype) if dtype is not None else None, config=config)
        model.to(device)
        apply_token_options(model)
        return model, processor
    family = family_for_config(config)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    from compressor.quantization import is_quantized_folder, load_quantized

    if is_quantized_folder(path):  # compressed-tensors: scales checked, then dequantized linears
        model = load_quantized(path, family, kwargs.get("dtype"))
    else:
        model = family.model_cls().from_pretrained(str(path), config=config, **kwargs)
    model.to(device)
    model.eval()
    apply_token_options(model)
    return model, processor


def folder_config(path: Path | str, processor=None):
    """A model folder's config, completed by its family where an older-style folder lacks a field
    (``Family.reconcile``: BLIP-2's ``num_query_tokens`` / ``image_token_index``), and ``processor``
    (when given) completed likewise.

    Raises:
        ModelSpecError: a field that cannot be recovered, or config and processor disagree (exit 2).
    """
    from transformers import AutoConfig

    from compressor.families import family_for_config

    config = AutoConfig.from_pretrained(str(path))
    refuse_quantized(config, Path(path) / "config.json")
    family_for_config(config).reconcile(config, Path(path), processor)
    return config


def refuse_quantized(config, where) -> None:
    """Refuse (exit 2) a config whose weights are stored quantized (a ``quantization_config``:
    bitsandbytes 4/8-bit, GPTQ, AWQ …), before anything is loaded or written.

    Every stage rewrites full-precision weights (LoRA merges, layer removal, pruning, export), and
    loading a bitsandbytes checkpoint needs bitsandbytes and a GPU; QLoRA keeps the base in full
    precision on disk and quantises it while training (``lora_finetune.quantization``). A
    compressed-tensors folder (what the ``quantize`` stage writes) passes: :func:`load_model`
    checks its scales and loads it dequantized, and the stages that cannot take it refuse it
    themselves (``quantize`` a second time, ``merge_adapters``).

    Raises:
        ModelSpecError: naming the quantisation and what to use instead.
    """
    q = getattr(config, "quantization_config", None)
    if not q:
        return
    q = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else vars(q))
    method = q.get("quant_method", "unknown")
    from compressor.quantization import QUANT_METHOD

    if method == QUANT_METHOD:
        return
    bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else (f"{q['bits']}-bit" if q.get("bits") else "")
    raise ModelSpecError(
        f"{where} carries a {method} quantization_config ({bits or 'quantized'} weights); vlm-compress works on "
        "full-precision weights (LoRA merges, layer removal, pruning and export rewrite them) and cannot load or "
        "change these. Start from the full-precision checkpoint of the same model (without quantization_config); "
        "for QLoRA keep that base and set `quantization: {bits: 4}` on the lora_finetune stage."
    )


def load_skeleton(path: Path | str):
    """The model a folder holds, on the meta device: its shapes without its weights.

    Built from ``config.json`` (and ``shape_plan.json`` when the model is width-pruned), with the
    folder's ``generation_config.json`` and its recorded token options: parameter counts, export plans and graph signatures come
    out as :func:`load_model`'s would, in about a second at real size, and no weight file is read.

    Returns:
        The model in eval mode, every parameter on ``meta`` (float32: the saved dtype is not read).

    Raises:
        ModelSpecError: the folder is not a BLIP-family model folder.
    """
    from transformers import GenerationConfig

    from compressor.models.shapes import SHAPE_PLAN, apply_shape_plan, meta_skeleton
    from compressor.tokens import apply_token_options

    path = Path(path)
    if not is_model_dir(path):
        raise ModelSpecError(f"{path}: not a model folder (expected config.json and *.safetensors)")
    model = meta_skeleton(folder_config(path))
    if (path / SHAPE_PLAN).is_file():
        apply_shape_plan(model, json.loads((path / SHAPE_PLAN).read_text()))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    apply_token_options(model)
    return model.eval()


def load_processor(path: Path | str):
    """The processor saved in a model folder (completed where an older-style processor config lacks
    a field the model's config holds), or None when the folder has none."""
    processor = _load_raw_processor(path)
    if processor is not None and (Path(path) / "config.json").is_file():
        folder_config(path, processor)
    return processor


def _load_raw_processor(path: Path | str):
    from transformers import AutoProcessor

    path = Path(path)
    if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json", "tokenizer.json")):
        return None
    return AutoProcessor.from_pretrained(str(path))
