"""Shape plans: save and reload models whose layer shapes their config cannot express.

Width pruning gives layers their own head counts and MLP widths, which ``OPTConfig`` /
``LlamaConfig`` / ``T5Config`` cannot describe (one global ``ffn_dim``, ``head_dim = hidden /
heads``; transformers' ``per_layer_config`` raises for OPT: shared/notes/stack-facts.md §8).
``from_pretrained`` then refuses the checkpoint (size mismatch) or, with
``ignore_mismatched_sizes``, silently re-initialises the pruned weights.

So a model folder carries ``shape_plan.json`` beside the weights: every ``Linear`` / ``Embedding``
whose shape differs from what the config builds, and every attribute the forward pass reads that
pruning changed (``num_heads`` …, recorded on the module as :data:`MARKER`). Loading builds the
model from the config without initialising weights, rebuilds the planned modules with their
saved shapes, sets the attributes, and loads the state dict strictly (tied weights re-tied).
:func:`compressor.models.loading.load_model` does this transparently; the plan is computed at
save time from the model itself, so it survives later layer removal, LoRA merges and healing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHAPE_PLAN = "shape_plan.json"
#: How a model card tells to load a folder with a shape plan (``{repo_id}``, ``{cls}``, ``{text_arg}``,
#: ``{beams}``, ``{new}`` filled in): transformers' ``from_pretrained`` refuses its weights.
LOADING = """\
Width pruning gave its layers shapes that `config.json` cannot express (per-layer head counts and MLP widths,
recorded in `shape_plan.json`), so `{cls}.from_pretrained` refuses these weights (size mismatch). vlm-compress's
loader rebuilds the layers from the plan (`pip install vlm-compress`):

```python
from PIL import Image
from huggingface_hub import snapshot_download
from compressor.models.loading import load_model

model, processor = load_model(snapshot_download("{repo_id}"))
inputs = processor(images=Image.open("photo.jpg"){text_arg}, return_tensors="pt")
out = model.generate(**inputs, num_beams={beams}, max_new_tokens={new})
print(processor.batch_decode(out, skip_special_tokens=True)[0].strip())
```
"""
#: Attribute a pruned module carries: ``{attribute: value}`` to restore on reload.
MARKER = "_vlmc_shape_attrs"
PLAN_VERSION = 1


def _describe(mod) -> dict[str, Any]:
    from torch import nn

    if isinstance(mod, nn.Embedding):
        return {"type": "Embedding", "num_embeddings": mod.num_embeddings, "embedding_dim": mod.embedding_dim,
                "padding_idx": mod.padding_idx}
    return {"type": "Linear", "in_features": mod.in_features, "out_features": mod.out_features, "bias": mod.bias is not None}


def meta_skeleton(config):
    """The model a config builds, on the meta device (no memory, no init)."""
    import copy
    import warnings

    import torch

    from compressor.families import family_for_config

    family = family_for_config(config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return family.model_cls()(copy.deepcopy(config))


def shape_plan(model) -> dict[str, Any] | None:
    """The plan of a model whose shapes differ from its config's, or None when they do not.

    Args:
        model: a BLIP-family model (not a peft wrapper).

    Returns:
        ``{"version", "modules": {path: {type, shape fields}}, "attributes": {path: {name: value}}}``.
    """
    from torch import nn

    ref = dict(meta_skeleton(model.config).named_modules())
    modules: dict[str, dict] = {}
    attributes: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            other = ref.get(name)
            if other is None or tuple(other.weight.shape) != tuple(mod.weight.shape):
                modules[name] = _describe(mod)
        if getattr(mod, MARKER, None):
            attributes[name] = dict(getattr(mod, MARKER))
    if not modules and not attributes:
        return None
    return {"version": PLAN_VERSION, "modules": modules, "attributes": attributes}


def write_shape_plan(model, folder: Path) -> dict | None:
    """Write (or remove a stale) ``shape_plan.json`` in a saved model folder; returns the plan."""
    from compressor.fileio import atomic_write_json

    plan = shape_plan(model)
    path = Path(folder) / SHAPE_PLAN
    if plan is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_json(path, plan)
    return plan


def apply_shape_plan(model, plan: dict[str, Any]) -> None:
    """Rebuild the planned modules with their saved shapes (same dtype and device) and set attributes.

    Raises:
        ModelSpecError: a plan of another version, or naming a module the model does not have.
    """
    from torch import nn

    from compressor.errors import ModelSpecError
    from compressor.families import get_module, set_module

    if plan.get("version") != PLAN_VERSION:
        raise ModelSpecError(f"{SHAPE_PLAN}: version {plan.get('version')} is not supported (expected {PLAN_VERSION})")
    for path, spec in plan["modules"].items():
        try:
            old = get_module(model, path)
        except (AttributeError, IndexError):
            raise ModelSpecError(f"{SHAPE_PLAN}: the model has no module '{path}'") from None
        kw = {"dtype": old.weight.dtype, "device": old.weight.device}
        if spec["type"] == "Embedding":
            new = nn.Embedding(spec["num_embeddings"], spec["embedding_dim"], padding_idx=spec.get("padding_idx"), **kw)
        else:
            new = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], **kw)
        set_module(model, path, new)
    for path, attrs in plan["attributes"].items():
        mod = get_module(model, path)
        for k, v in attrs.items():
            setattr(mod, k, v)
        setattr(mod, MARKER, dict(attrs))


def _state_dict_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        from compressor.errors import ModelSpecError

        raise ModelSpecError(f"{folder}: no *.safetensors weights beside {SHAPE_PLAN}")
    return files


def load_planned(folder: Path | str, dtype=None, config=None):
    """Load a model folder that has a shape plan, exactly (no missing or unexpected keys).

    Args:
        folder: a save_pretrained folder with ``shape_plan.json``.
        dtype: a ``torch.dtype`` to cast to, or None for the saved dtype.
        config: the folder's config as loaded (completed) by the caller, or None to read it.

    Returns:
        The model on the CPU, in eval mode.

    Raises:
        ModelSpecError: the weights do not fit the plan (missing, unexpected or mis-shaped keys).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    from compressor.errors import ModelSpecError
    from compressor.families import family_for_config

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    folder = Path(folder)
    plan = json.loads((folder / SHAPE_PLAN).read_text())
    if config is None:
        from compressor.models.loading import folder_config

        config = folder_config(folder)
    family = family_for_config(config)
    state: dict[str, torch.Tensor] = {}
    for f in _state_dict_files(folder):
        state.update(load_file(str(f)))
    saved_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(saved_dtype)
    try:
        with no_init_weights():
            model = family.model_cls()(config)
    finally:
        torch.set_default_dtype(prev)
    apply_shape_plan(model, plan)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelSpecError(f"{folder}: the weights do not fit {SHAPE_PLAN}: {str(exc).splitlines()[0]}") from None
    model.tie_weights()
    loaded_ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k not in result.missing_keys}
    params = model.state_dict()
    untied = [k for k in result.missing_keys if params[k].data_ptr() not in loaded_ptrs]
    if untied or result.unexpected_keys:
        raise ModelSpecError(
            f"{folder}: loading with {SHAPE_PLAN} left missing keys {untied[:5]} and unexpected keys "
            f"{list(result.unexpected_keys)[:5]}"
        )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    if dtype is not None:
        model.to(dtype)
    model.eval()
    log.info("loaded %s with its shape plan (%d modules reshaped)", folder, len(plan["modules"]))
    return model
