"""Session fixtures of the export tests: each tiny family is exported ONCE and shared.

Exports use the legacy exporter (about 1 s per graph on a tiny model against 5-30 s for dynamo);
the dynamo exporter has its own test. ``tiny-blip2-opt`` also gets the int8 decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx_helpers import build


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """``get(name) -> (model, processor, onnx_dir)``, exported on first use and cached."""
    from exporters.onnx import OnnxOptions, export_model_onnx

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
    """Four different random 32×32 RGB images (seed 2: on them every preset's float32 tokens are numerically
    determined, also on CPUs whose kernels leave 3 of 4 tiny-T5 rows undetermined with seed 0)."""
    from PIL import Image

    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
