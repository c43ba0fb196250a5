"""Session fixtures of the export tests: each tiny family is exported ONCE and shared.

Exports use the legacy exporter (about 1 s per graph on a tiny model against 5-30 s for dynamo);
the dynamo exporter has its own test. ``tiny-blip2-opt`` also gets the int8 decoder.
"""

from __future__ import annotations

import numpy as np
import pytest

PRESETS = ("tiny-blip2-opt", "tiny-blip2-llama", "tiny-blip2-t5", "tiny-instructblip", "tiny-blip")
REMOVED = "tiny-blip2-opt-removed"
#: Prompts of different lengths: the batch is left-padded (causal LMs) or right-padded (T5).
PROMPTS = ["", "a photo of a", "x", "what is in the picture"]


def build(name: str):
    """A preset, or the BLIP-2 OPT preset with its top 2 OPT and top 2 Q-Former layers removed."""
    from compressor.families import family_for_model
    from compressor.models.presets import build_preset
    from compressor.surgery import remove_layers

    if name != REMOVED:
        return build_preset(name)
    model, proc = build_preset("tiny-blip2-opt")
    fam = family_for_model(model)
    remove_layers(model, fam, "language_model", [4, 5])
    remove_layers(model, fam, "qformer", [2, 3])
    return model, proc


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """``get(name) -> (model, processor, onnx_dir)``, exported on first use and cached."""
    from exporters.onnx_export import OnnxOptions, export_model_onnx

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model, proc = build(name)
            out = tmp_path_factory.mktemp("onnx") / name
            opts = OnnxOptions(
                exporter="legacy",
                quantize="int8" if name == "tiny-blip2-opt" else None,
                opset=18 if name == "tiny-blip" else None,  # a non-default opset once
            )
            export_model_onnx(model, proc, out, opts)
            cache[name] = (model, proc, out)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def images():
    """Four different random 32×32 RGB images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]


def determined_rows(model, proc, images, prompts, gen_kwargs: dict, factor: float = 4.0):
    """Rows whose PyTorch tokens are numerically determined in float32.

    The re-initialised tiny presets amplify float32 rounding (the T5 preset's logits move by up
    to 0.26 between float32 and float64 PyTorch on some rows): there, PyTorch's own float32
    tokens are arbitrary, and no other runtime can be required to reproduce them. A row counts
    when float64 PyTorch gives the same tokens and, for greedy decoding, every step's top-2
    logit margin exceeds ``factor ×`` that row's float32-vs-float64 logit difference.

    Returns:
        A boolean numpy array, one entry per row.
    """
    import copy

    import torch

    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs

    inputs = generation_inputs(family_for_model(model), proc, images, prompts)
    kw = {**gen_kwargs, "output_scores": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        o32 = model.generate(**inputs, **kw)
        m64 = copy.deepcopy(model).double()
        in64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        o64 = m64.generate(**in64, **kw)
    n = max(o32.sequences.shape[1], o64.sequences.shape[1])
    a, b = (torch.nn.functional.pad(s.sequences, (0, n - s.sequences.shape[1]), value=-1) for s in (o32, o64))
    same = (a == b).all(1).numpy()
    if gen_kwargs.get("num_beams", 1) > 1:
        return same
    ok = same.copy()
    for r in range(len(ok)):
        if not ok[r]:
            continue
        # processed scores hold -inf where a processor bans a token: compare finite entries only
        err = max(float((a[r].double() - b[r]).nan_to_num(0.0, 0.0, 0.0).abs().max()) for a, b in zip(o32.scores, o64.scores))
        margin = min(float(torch.topk(a[r].double().nan_to_num(-1e30, 1e30, -1e30), 2).values.diff().abs()) for a in o32.scores)
        ok[r] = margin > factor * err
    return ok
