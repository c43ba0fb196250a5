"""ONNX precision variants: fp16 (every graph) and int4 MatMulNBits (the decoder) are written, validated
against PyTorch within their tolerance and listed in export.json; the captioner picks one by name; a
tolerance the variant cannot meet fails the export and leaves no folder."""

from __future__ import annotations

import json

import pytest
from onnx_helpers import build

from compressor.errors import ModelSpecError
from exporters.onnx.errors import OnnxValidationError

# tiny re-initialised models amplify rounding (real weights: exporters.onnx.options.VARIANT_TOLERANCE)
TINY = {"fp16": 0.1, "int4": 0.9}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from exporters.onnx import OnnxOptions, export_model_onnx

    model, proc = build("tiny-blip2-llama")
    out = tmp_path_factory.mktemp("variants") / "onnx"
    export_model_onnx(model, proc, out, OnnxOptions(exporter="legacy", variants=("fp16", "int4"), int4_block_size=16,
                                                    variant_tolerance=TINY))
    return model, proc, out


def test_variants_are_validated_and_listed(exported):
    _, _, out = exported
    meta = json.loads((out / "export.json").read_text())
    val = json.loads((out / "validation.json").read_text())
    assert meta["variants"] == ["plain", "optimized", "fp16", "int4"]
    assert set(meta["graphs"]["decoder"]["variants"]) == {"fp16", "int4"}
    assert set(meta["graphs"]["image_encoder"]["variants"]) == {"fp16"}  # int4 is the decoder's
    errs = {k: v["relative_rms_error"] for k, v in val["variants"].items()}
    assert 0 < errs["decoder.fp16"] < errs["decoder.int4"] <= TINY["int4"]  # teeth: 4 bits err more than fp16
    assert all(v["tolerance"] == TINY[k.rsplit(".", 1)[1]] for k, v in val["variants"].items())
    dec = meta["graphs"]["decoder"]
    assert dec["variants"]["int4"]["bytes"] < 0.5 * dec["bytes"]
    assert (out / dec["variants"]["int4"]["file"]).is_file()


def test_the_captioner_runs_a_variant_by_name(exported, images):
    from exporters.onnx import OnnxCaptioner

    _, _, out = exported
    int4 = OnnxCaptioner(out, None, variant="int4")
    assert int4.graph_files["decoder"] == "decoder.int4.onnx" and int4.graph_files["image_encoder"].endswith(".opt.onnx")
    assert OnnxCaptioner(out, None, variant="fp16").graph_files["image_encoder"] == "image_encoder.fp16.onnx"
    assert OnnxCaptioner(out, None, variant="fp32").graph_files["decoder"] == "decoder.opt.onnx"
    caps = int4.caption(images[:2])
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)
    with pytest.raises(ModelSpecError, match="no int8 variant"):
        OnnxCaptioner(out, None, variant="int8")
    with pytest.raises(ModelSpecError, match="expected one of"):
        OnnxCaptioner(out, None, variant="int3")


def test_a_variant_outside_its_tolerance_fails_the_export(exported, tmp_path):
    from exporters.onnx import OnnxOptions, export_model_onnx

    model, proc, _ = exported
    out = tmp_path / "onnx"
    with pytest.raises(OnnxValidationError, match=r"decoder \(int4\).*relative RMS error"):
        export_model_onnx(model, proc, out, OnnxOptions(exporter="legacy", variants=("int4",), int4_block_size=16,
                                                        variant_tolerance={"int4": 1e-4}, optimize=False))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_evaluate_variant_needs_the_onnx_backend():
    from pydantic import ValidationError

    from compressor.stages.evaluate import EvaluateStage

    assert EvaluateStage(type="evaluate", label="c", backend="onnx", variant="int4").variant == "int4"
    with pytest.raises(ValidationError, match="needs backend: onnx"):
        EvaluateStage(type="evaluate", label="c", variant="int4")
