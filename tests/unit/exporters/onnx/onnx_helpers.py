"""Shared helpers of the exporter tests (presets, prompts, builders, numerically determined rows)."""

from __future__ import annotations

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


def perturb_initializer(path, scale: float) -> str:
    """Multiply the largest float32 initializer of the ONNX file ``path`` by ``scale`` in place.

    Returns:
        The initializer's name.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    big = max(inits, key=lambda i: np.prod(i.dims))
    arr = numpy_helper.to_array(big) * scale
    big.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), big.name))
    onnx.save(m, str(path))
    return big.name
