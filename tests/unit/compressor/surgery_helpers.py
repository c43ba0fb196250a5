"""Shared helpers for the model-surgery tests: tiny presets per family, probe images, greedy
decoding with and without KV cache, and the "teeth" checks every equality test makes first
(several distinct tokens per sequence, different captions across the batch, a 1% change to the
touched weights moves the logits)."""

from __future__ import annotations

import copy

FAMILIES = ("tiny-blip2-opt", "tiny-blip2-llama", "tiny-blip2-t5", "tiny-instructblip", "tiny-blip")
_CACHE: dict[str, tuple] = {}


def preset(name: str):
    """A fresh deep copy of a preset (built once per session): ``(model, processor, family)``."""
    from compressor.families import family_for_model
    from compressor.models.presets import build_preset

    if name not in _CACHE:
        _CACHE[name] = build_preset(name)
    model, proc = _CACHE[name]
    model = copy.deepcopy(model)
    return model, proc, family_for_model(model)


def probe_images(n: int = 3, size: int = 32, seed: int = 4):
    """Seeded noise images (they give every tiny preset several distinct tokens per caption and
    different captions per image; plain shape scenes leave the tiny T5 repeating one token)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def prompts_for(family, n: int = 3):
    if family.name == "blip":
        return [""] * n
    return ["", "a picture of", ""][:n]


def greedy(model, processor, family, images, prompts, use_cache: bool = True, new_tokens: int = 10):
    """Greedy generated token ids ``(batch, new_tokens)`` (prompt stripped for causal LMs)."""
    import torch

    from compressor.models.batches import generation_inputs

    inp = generation_inputs(family, processor, images, prompts)
    with torch.inference_mode():
        out = model.generate(**inp, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             use_cache=use_cache)
    if family.decoder_only and family.name != "blip":
        out = out[:, inp["input_ids"].shape[1]:]
    return out


def logits(model, processor, family, images, texts=None):
    """Logits of a labelled batch ``(batch, seq, vocab)``: float32, or float64 for a float64 model."""
    import torch

    from compressor.models.batches import training_batch

    texts = texts or ["a red circle on the left", "two blue squares", "a green triangle at the top"][: len(images)]
    batch = training_batch(family, processor, images, texts, [""] * len(images))
    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    with torch.inference_mode():
        out = model(**batch).logits
    return out if out.dtype == torch.float64 else out.float()


def assert_teeth(tokens) -> None:
    """At least 3 distinct tokens per sequence and not every sequence the same."""
    rows = [tuple(r) for r in tokens.tolist()]
    for r in rows:
        assert len(set(r)) >= 3, f"degenerate sequence {r}: the test would pass trivially"
    assert len(set(rows)) > 1, "every example got the same tokens: the model ignores its input"


def perturb_moves_logits(model, processor, family, module_names, images, min_change: float = 1e-3) -> float:
    """Scale the named modules' weights by 1.01 in a copy; returns the max logit change (asserted > min_change)."""
    import torch

    from compressor.families import get_module

    ref = logits(model, processor, family, images)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name in module_names:
            get_module(other, name).weight.mul_(1.01)
    change = float((logits(other, processor, family, images) - ref).abs().max())
    assert change > min_change, f"a 1% change of {module_names} moved logits by only {change:.2e}"
    return change


_SAVED: dict[str, object] = {}


def saved_preset(name: str):
    """A preset saved (model + processor) once per session into a temporary folder; returns the folder."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from compressor.models.presets import save_preset

    if name not in _SAVED:
        root = Path(tempfile.mkdtemp(prefix="surgery-tests-"))
        atexit.register(shutil.rmtree, root, True)
        _SAVED[name] = save_preset(name, root / name)
    return _SAVED[name]


def make_recipe(stages: list[dict], model: str = "tiny-blip2-opt", data: dict | None = None, generation: dict | None = None):
    """A validated Recipe around ``stages`` with small synthetic data."""
    from compressor.recipe.schema import Recipe

    return Recipe.model_validate({
        "name": "t",
        "model": model,
        "data": data or {"format": "synthetic", "train": {"size": 16, "image_size": 32},
                         "val": {"size": 4, "image_size": 32}, "eval": {"size": 4, "image_size": 32}},
        "generation": generation or {"max_new_tokens": 6, "batch_size": 8},
        "stages": stages,
    })


def stage_ctx(recipe, run_dir, index: int = 0):
    """A StageContext for calling a stage's ``run`` directly (CPU, no progress bars)."""
    from compressor.pipeline.context import StageContext

    return StageContext(recipe=recipe, index=index, run_dir=run_dir, device="cpu", progress=False)


def run_stage(recipe, index: int, input_dir, out_dir, ctx=None):
    """Run stage ``index`` of ``recipe`` from ``input_dir`` into ``out_dir``; returns its summary."""
    from pathlib import Path

    from compressor.stages import get_stage

    st = recipe.stages[index]
    ctx = ctx or stage_ctx(recipe, Path(out_dir).parent, index)
    ctx.index = index
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return get_stage(st.type).run(st, ctx, Path(input_dir), Path(out_dir))
