"""Model characteristics on hand-checkable cases: parameters by part, GFLOPs (and the requires_grad
trap), percentiles, latency with a fake clock (no timed tests), peak memory, size on disk."""

from __future__ import annotations

import copy
import os

import pytest

import eval.characteristics as ch
from eval.characteristics import (
    PeakMemory,
    count_gflops,
    count_gflops_by_part,
    count_parameters,
    measure_latency,
    onnx_parameter_count,
    percentile,
    size_on_disk_mb,
)


@pytest.fixture(scope="module")
def tiny():
    import torch

    from compressor.data.synthetic import synthetic_examples
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs
    from compressor.models.presets import build_preset

    model, processor = build_preset("tiny-blip2-opt")
    family = family_for_model(model)
    image = synthetic_examples(0, 1, 32, "caption")[0].load_image()
    inputs = generation_inputs(family, processor, [image], [""])
    torch.manual_seed(0)
    return model, processor, family, inputs


def _generate(model, inputs, n=6):
    return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_count_parameters_by_part_ties_once(tiny):
    model, _, family, _ = tiny
    counts = count_parameters(model, family.parts)
    by_hand = {p.data_ptr(): p.numel() for p in model.parameters()}  # tied lm_head shares storage
    assert counts["params_total"] == sum(by_hand.values())
    assert counts["params_total"] == sum(counts[f"params_{p}"] for p in family.parts)
    assert counts["params_qformer"] >= model.query_tokens.numel() > 0
    assert counts["params_projection"] == sum(p.numel() for p in model.language_projection.parameters())


def test_flop_counter_trap_and_gflops_by_part(tiny):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model, _, family, inputs = tiny
    assert model.query_tokens.requires_grad  # as loaded: the trap is armed
    with pytest.raises(Exception):  # noqa: B017 - the exception type changed across torch versions
        with torch.inference_mode(), FlopCounterMode(display=False):
            _generate(model, inputs)()
    res = count_gflops_by_part(_generate(model, inputs), model, family.parts)
    assert model.query_tokens.requires_grad  # flags restored
    assert res["gflops"] > 0
    parts = [res[f"gflops_{p}"] for p in family.parts if f"gflops_{p}" in res]
    assert {"gflops_vision", "gflops_qformer", "gflops_language_model"} <= set(res)
    assert sum(parts) == pytest.approx(res["gflops"], rel=1e-6)
    assert count_gflops(_generate(model, inputs), model) == pytest.approx(res["gflops"])
    # more generated tokens: only the language model does more work
    more = count_gflops_by_part(_generate(model, inputs, 12), model, family.parts)
    assert more["gflops_language_model"] > res["gflops_language_model"]
    assert more["gflops_vision"] == res["gflops_vision"] and more["gflops_qformer"] == res["gflops_qformer"]


def test_gflops_shrink_with_removed_language_model_layers(tiny):
    from compressor.surgery import remove_layers

    model, _, family, inputs = tiny
    pruned = copy.deepcopy(model)
    remove_layers(pruned, family, "language_model", [3, 4, 5])
    full = count_gflops_by_part(_generate(model, inputs), model, family.parts)
    half = count_gflops_by_part(_generate(pruned, inputs), pruned, family.parts)
    assert half["gflops_vision"] == full["gflops_vision"]
    assert half["gflops_language_model"] < full["gflops_language_model"]
    # 3 of 6 decoder layers go; the embedding-tied lm_head stays, so the LM keeps more than half
    assert 0.5 < half["gflops_language_model"] / full["gflops_language_model"] < 0.95


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [0.3, 0.1, 0.4, 0.2, 1.5]
    for q in (0, 25, 50, 90, 95, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_measure_latency_with_a_fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(ch.time, "perf_counter", lambda: clock[0])
    calls = []

    def caption(batch):
        calls.append(len(batch))
        clock[0] += 0.5 + 0.1 * len(batch)  # fixed overhead per call + per image
        return ["a b c"] * len(batch)

    res = measure_latency(caption, ["img1", "img2", "img3"], [1, 4], warmup=1, repeats=3,
                          count_tokens=lambda caps: 3 * len(caps))
    assert calls == [1, 1, 1, 1, 4, 4, 4, 4]  # warm-up + repeats, images cycled to fill a batch
    assert res["latency_batch_size"] == 1
    assert res["latency_p50_s"] == pytest.approx(0.6) and res["latency_p95_s"] == pytest.approx(0.6)
    assert res["by_batch_size"]["4"]["p50_s"] == pytest.approx(0.9 / 4)
    assert res["by_batch_size"]["4"]["captions_per_s"] == pytest.approx(4 / 0.9)
    assert res["tokens_per_s"] == pytest.approx(3 / 0.6)
    assert res["by_batch_size"]["4"]["tokens_per_s"] == pytest.approx(12 / 0.9)
    assert measure_latency(caption, [], [1]) == {}


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as before:
        pass
    with PeakMemory() as pm:
        block = bytearray(200 * 1024 * 1024)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    del block
    assert pm.rss_mb > 0
    if pm.reset and before.reset:
        assert pm.rss_mb - before.rss_mb > 150


def test_size_on_disk_counts_hard_links_once(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1_000_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 500_000)
    os.link(tmp_path / "a.bin", tmp_path / "sub" / "a-link.bin")
    assert size_on_disk_mb(tmp_path) == pytest.approx(1.5)
    assert size_on_disk_mb(tmp_path / "a.bin") == pytest.approx(1.0)


def test_onnx_parameter_count(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((3, 4), dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros((4,), dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[w, b],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "decoder.onnx"))
    onnx.save(helper.make_model(graph), str(tmp_path / "decoder_optimized.onnx"))  # ORT copy: skipped
    assert onnx_parameter_count(tmp_path) == 16


@pytest.mark.parametrize("name", ["tiny-blip2-llama", "tiny-blip2-t5", "tiny-instructblip", "tiny-blip"])
def test_gflops_parts_add_up_for_every_family(name):
    from compressor.data.synthetic import synthetic_examples
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs
    from compressor.models.presets import build_preset

    model, processor = build_preset(name)
    family = family_for_model(model)
    image = synthetic_examples(0, 1, 32, "caption")[0].load_image()
    inputs = generation_inputs(family, processor, [image], ["a picture of"])
    res = count_gflops_by_part(_generate(model, inputs), model, family.parts)
    assert res["gflops_vision"] > 0 and res["gflops_language_model"] > 0
    assert sum(v for k, v in res.items() if k != "gflops") == pytest.approx(res["gflops"], rel=1e-6)


def test_gflops_parts_of_a_forward_pass(tiny):
    model, _, family, inputs = tiny
    res = count_gflops_by_part(lambda: model(**inputs), model, family.parts)
    assert res["gflops_language_model"] > 0 and res["gflops_vision"] > 0
    assert sum(v for k, v in res.items() if k != "gflops") == pytest.approx(res["gflops"], rel=1e-6)
