"""Split ONNX export: files, validation, ORT == PyTorch tokens (greedy and beam), no PyTorch fallback,
typed validation errors, corruption detection, int8, dynamo and bf16 paths."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from onnx_helpers import PRESETS, PROMPTS, REMOVED, build, determined_rows, perturb_initializer

from compressor.errors import UserInputError, VerificationError


def _gen(**kw):
    from compressor.recipe.schema import GenerationSpec

    return GenerationSpec(**{"max_new_tokens": 10, "batch_size": 4, **kw})


def _torch_tokens(model, proc, images, prompts, gen):
    """``model.generate`` exactly as TorchCaptioner calls it, and its inputs as numpy."""
    import torch

    from compressor.evaluation.captioner import generate_kwargs
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs

    inputs = generation_inputs(family_for_model(model), proc, images, prompts)
    with torch.inference_mode():
        seq = model.generate(**inputs, **generate_kwargs(gen))
    return seq.numpy(), {k: v.numpy() for k, v in inputs.items()}


def _new_tokens(model, seq, inputs):
    from compressor.families import family_for_model

    fam = family_for_model(model)
    return seq[:, inputs["input_ids"].shape[1]:] if fam.decoder_only and "input_ids" in inputs else seq


@pytest.mark.parametrize("name", [*PRESETS, REMOVED])
def test_export_writes_validated_graphs(onnx_export, name):
    from exporters.onnx import read_export_json, verify_onnx_dir

    model, _, out = onnx_export(name)
    meta = read_export_json(out)
    val = json.loads((out / "validation.json").read_text())
    assert val["passed"] is True
    expected = {"blip": ["vision_encoder", "text_decoder"]}.get(meta["family"]) or (
        ["image_encoder", "embed_tokens", "decoder"] if meta["kind"] == "causal" else ["image_encoder", "embed_tokens", "encoder", "decoder"]
    )
    assert list(meta["graphs"]) == expected
    for g, info in meta["graphs"].items():
        assert (out / info["onnx"]).is_file() and (out / info["optimized"]).is_file()
        for variant in (g, f"{g}.optimized"):
            rec = val["graphs"][variant]
            assert rec["checked"] == "numbers" and len(rec["cases"]) >= 2
            allowed = max([rec["tolerance"], *(a["allowed"] for a in rec.get("float64_allowance", {}).values())])
            assert allowed >= rec["tolerance"] and all(math.isfinite(c["max_abs_diff"]) for c in rec["cases"].values())
        if "decoder" in g:  # past 0 and past > 0, batch 3 with padding
            cases = val["graphs"][g]["cases"]
            assert len(cases) == 3 and all(c["inputs"]["past.0.key"][0] == 3 for c in cases.values())
            assert [c["inputs"]["past.0.key"][2] for c in cases.values()][0] == 0
            assert all(c["inputs"]["past.0.key"][2] > 0 for c in list(cases.values())[1:])
    verify_onnx_dir(out)  # SHA256SUMS of every file
    from compressor.families import family_for_model
    from eval.characteristics import count_parameters

    assert meta["characteristics"]["params_total"] == count_parameters(model, family_for_model(model).parts)["params_total"]
    if name == REMOVED:
        assert meta["num_layers"] == 4
    if name == "tiny-blip":
        assert meta["opset"] == 18


@pytest.mark.parametrize("name", [*PRESETS, REMOVED])
def test_greedy_tokens_equal_pytorch_generate(onnx_export, images, name):
    from exporters.onnx import OnnxCaptioner

    model, proc, out = onnx_export(name)
    gen = _gen()
    ref, inputs = _torch_tokens(model, proc, images, PROMPTS, gen)
    new = _new_tokens(model, ref, inputs)
    # teeth: several distinct tokens per caption (one row may stop early at EOS, which exercises
    # the padding of finished rows), different captions across the batch
    assert sum(len(set(row.tolist())) >= 3 for row in new) >= 3, new
    assert len({tuple(r) for r in new.tolist()}) >= 3
    from compressor.evaluation.captioner import TorchCaptioner, generate_kwargs

    rows = determined_rows(model, proc, images, PROMPTS, generate_kwargs(gen))
    assert rows.sum() >= 2, rows  # at least half the rows are numerically determined
    cap = OnnxCaptioner(out, gen, variant="optimized")  # fp32 (tiny-blip2-opt's default is its int8 decoder)
    got = cap.generate(inputs)
    assert got.shape[0] == ref.shape[0]
    np.testing.assert_array_equal(got[rows][:, : ref.shape[1]], ref[rows])
    ours, theirs = cap.caption(images, PROMPTS), TorchCaptioner(model, proc, gen).caption(images, PROMPTS)
    assert [c for c, r in zip(ours, rows) if r] == [c for c, r in zip(theirs, rows) if r]


@pytest.mark.parametrize("name", PRESETS)
def test_beam_search_equals_pytorch_beam_search(onnx_export, images, name):
    from exporters.onnx import OnnxCaptioner

    model, proc, out = onnx_export(name)
    gen = _gen(num_beams=3, max_new_tokens=8)
    ref, inputs = _torch_tokens(model, proc, images[:3], PROMPTS[:3], gen)
    from compressor.evaluation.captioner import generate_kwargs

    rows = determined_rows(model, proc, images[:3], PROMPTS[:3], generate_kwargs(gen))
    assert rows.sum() >= 2, rows
    got = OnnxCaptioner(out, gen, variant="plain").generate(inputs)
    n = max(got.shape[1], ref.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, n - a.shape[1])), constant_values=-1)  # noqa: E731
    np.testing.assert_array_equal(pad(got)[rows], pad(ref)[rows])


@pytest.mark.parametrize(
    "settings",
    [
        dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=6),
        dict(num_beams=2, length_penalty=0.6, no_repeat_ngram_size=3, max_new_tokens=8),
    ],
    ids=["greedy-processors", "beam-processors"],
)
def test_logits_processors_match_generate(onnx_export, images, settings):
    """Repetition penalty, no-repeat n-grams, min new tokens and length penalty as transformers applies them."""
    from compressor.evaluation.captioner import generate_kwargs
    from exporters.onnx import OnnxCaptioner

    model, proc, out = onnx_export("tiny-blip2-llama")
    gen = _gen(**settings)
    ref, inputs = _torch_tokens(model, proc, images, PROMPTS, gen)
    plain, _ = _torch_tokens(model, proc, images, PROMPTS, _gen(num_beams=settings.get("num_beams", 1),
                                                               max_new_tokens=settings.get("max_new_tokens", 10)))
    assert not np.array_equal(ref, plain) if ref.shape == plain.shape else True  # the settings change the tokens
    rows = determined_rows(model, proc, images, PROMPTS, generate_kwargs(gen))
    assert rows.sum() >= 2, rows
    got = OnnxCaptioner(out, gen).generate(inputs)
    n = max(got.shape[1], ref.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, n - a.shape[1])), constant_values=-1)  # noqa: E731
    np.testing.assert_array_equal(pad(got)[rows], pad(ref)[rows])


def test_ort_generation_never_calls_pytorch(onnx_export, images, monkeypatch):
    import torch

    from exporters.onnx import OnnxCaptioner

    _, _, out = onnx_export("tiny-blip2-opt")
    _, _, out_t5 = onnx_export("tiny-blip2-t5")

    def boom(self, *a, **k):
        raise AssertionError(f"PyTorch module {type(self).__name__} called during ONNX Runtime generation")

    monkeypatch.setattr(torch.nn.Module, "__call__", boom)
    for folder in (out, out_t5):
        for beams in (1, 2):
            caps = OnnxCaptioner(folder, _gen(num_beams=beams)).caption(images, PROMPTS)
            assert len(caps) == 4 and any(caps)
    with pytest.raises(AssertionError):  # the patch is effective
        torch.nn.Linear(2, 2)(torch.zeros(1, 2))


def _perturb(src, dst, graph, scale):
    """Copy an export, multiply the largest float initializer of ``graph`` by ``scale``."""
    shutil.copytree(src, dst)
    return perturb_initializer(dst / f"{graph}.onnx", scale)


def test_perturbed_initializer_raises_typed_validation_error(onnx_export, tmp_path):
    from exporters.onnx import OnnxValidationError, validate_export

    model, _, out = onnx_export("tiny-blip2-opt")
    validate_export(model, out)  # the intact export passes
    name = _perturb(out, tmp_path / "bad", "decoder", 1.01)  # a 1% weight change
    with pytest.raises(OnnxValidationError) as err:
        validate_export(model, tmp_path / "bad")
    e = err.value
    assert e.graph == "decoder" and (e.output == "logits" or e.output.startswith("present."))
    assert e.max_diff > 1e-3 and e.scaled_diff > e.tolerance
    assert "decoder" in str(e) and e.output in str(e), name


def test_corrupted_onnx_file_is_detected(onnx_export, tmp_path):
    from exporters.onnx import OnnxCaptioner

    _, _, out = onnx_export("tiny-blip")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / "text_decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "text_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="text_decoder.onnx") as err:
        OnnxCaptioner(bad)
    assert err.value.exit_code == 2  # a corrupted input folder is bad input
    (bad / "text_decoder.onnx").write_bytes(bytes(data[: len(data) // 3]))  # truncated, checksums skipped
    with pytest.raises(VerificationError, match="text_decoder"):
        OnnxCaptioner(bad, verify=False, variant="plain")


def test_int8_decoder_is_quantised_and_scorable(onnx_export, images):
    import onnx

    from exporters.onnx import OnnxCaptioner

    _, _, out = onnx_export("tiny-blip2-opt")
    meta = json.loads((out / "export.json").read_text())
    assert meta["quantized"] == "int8" and meta["default_variant"] == "int8"
    q = onnx.load(str(out / meta["graphs"]["decoder"]["int8"])).graph
    ops = {n.op_type for n in q.node}
    assert ops & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    weights = {i.name for i in q.initializer}
    assert not [n.name for n in q.node if n.op_type == "MatMul" and n.input[1] in weights]  # every weight MatMul is int8
    val = json.loads((out / "validation.json").read_text())
    assert set(val["int8"]["cases"]) == {"prefill", "decode_1", "decode_3"}
    caps = OnnxCaptioner(out, _gen()).caption(images, PROMPTS)
    assert OnnxCaptioner(out, _gen()).settings["variant"] == "int8"
    assert len(caps) == 4 and all(isinstance(c, str) for c in caps)


@pytest.mark.parametrize("name", ["tiny-blip2-opt", "tiny-blip2-llama", "tiny-blip2-t5"])
def test_dynamo_exporter(tmp_path, images, name):
    """The dynamo exporter (default; the one that survives real sizes) at its default opset 23.

    Llama: attention, RMS norms and rotary embeddings become the fused opset-23 operators. OPT
    and Llama: every decoder attention is the 3-D form with the KV cache as its own past
    inputs (:func:`exporters.onnx.passes.fold_attention_layout`: no head-splitting Transpose
    left). T5: exports at all (its sdpa attention cannot be decomposed by torch.export; eager is
    used). Greedy tokens equal PyTorch ``generate`` on the numerically determined rows.
    """
    import collections

    import onnx

    from compressor.evaluation.captioner import generate_kwargs
    from exporters.onnx import DYNAMO_OPSET, OnnxCaptioner, OnnxOptions, export_model_onnx

    model, proc = build(name)
    impl = model.language_model.config._attn_implementation
    meta = export_model_onnx(model, proc, tmp_path / "dyn", OnnxOptions(exporter="dynamo", optimize=False))
    assert meta["exporter"] == "dynamo" and meta["default_variant"] == "plain" and meta["opset"] == DYNAMO_OPSET == 23
    assert model.language_model.config._attn_implementation == impl  # restored after export
    assert "forward" not in vars(model.language_model.get_decoder().norm if name.endswith("llama") else model.language_model)
    dec = onnx.load(str(tmp_path / "dyn" / "decoder.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in dec.graph.node)
    L = model.config.text_config.num_decoder_layers if name.endswith("t5") else model.config.text_config.num_hidden_layers
    if not name.endswith("opt"):
        assert ops["RMSNormalization"] == (2 * L + 1 if name.endswith("llama") else 3 * L + 1), ops
    if not name.endswith("t5"):
        # the folded form: q/k/v enter Attention as (batch, seq, heads x head_dim), the past as
        # Attention's own inputs, present.* as its outputs; no Transpose, no KV-cache Concat
        att = [n for n in dec.graph.node if n.op_type == "Attention"]
        assert len(att) == L and ops["Transpose"] == 0, ops
        for i, n in enumerate(sorted(att, key=lambda n: int(n.output[1].split(".")[1]))):
            heads = {a.name for a in n.attribute}
            assert {"q_num_heads", "kv_num_heads"} <= heads, n
            assert list(n.input[4:]) == [f"past.{i}.key", f"past.{i}.value"], n.input
            assert list(n.output[1:]) == [f"present.{i}.key", f"present.{i}.value"], n.output
        enc = onnx.load(str(tmp_path / "dyn" / "image_encoder.onnx"), load_external_data=False)
        assert any(a.name == "q_num_heads" for n in enc.graph.node if n.op_type == "Attention" for a in n.attribute)
    if name.endswith("llama"):
        assert ops["Attention"] == L and ops["RotaryEmbedding"] == 2 * L and ops["Pow"] == 0, ops
        # grouped KV heads reach Attention unexpanded (repeat_kv would add 2 Expand per layer)
        assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
        assert ops["Expand"] < L, ops
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    gen = _gen()
    ref, inputs = _torch_tokens(model, proc, images, PROMPTS, gen)
    rows = determined_rows(model, proc, images, PROMPTS, generate_kwargs(gen))
    assert rows.sum() >= 2, rows
    got = OnnxCaptioner(tmp_path / "dyn", gen).generate(inputs)
    np.testing.assert_array_equal(got[rows][:, : ref.shape[1]], ref[rows])


def test_rms_norm_swap_keeps_other_norms():
    """Only norms whose forward equals ``F.rms_norm`` are exported as RMSNormalization."""
    import torch
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from exporters.onnx.patches import rms_norm_as_op

    class OnePlusWeight(nn.Module):  # Gemma's formula: scale by (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    llama, gemma = LlamaRMSNorm(8), OnePlusWeight()
    with torch.no_grad():
        llama.weight.copy_(torch.randn(8))
    box = nn.ModuleList([llama, gemma])
    x = torch.randn(2, 3, 8)
    before = [m(x) for m in box]
    with rms_norm_as_op(box) as swapped:
        assert swapped == [llama]
        torch.testing.assert_close(llama(x), before[0])
        torch.testing.assert_close(gemma(x), before[1])
    assert "forward" not in vars(llama)
    with rms_norm_as_op(box, enabled=False) as swapped:
        assert swapped == []


def test_bf16_export_checks_signature_and_fp32_twin(tmp_path):
    import onnx

    from exporters.onnx import OnnxCaptioner, OnnxOptions, export_model_onnx

    model, proc = build("tiny-blip")
    export_model_onnx(model, proc, tmp_path / "bf16", OnnxOptions(exporter="legacy", dtype="bfloat16"))
    val = json.loads((tmp_path / "bf16" / "validation.json").read_text())
    assert {g["checked"] for g in val["graphs"].values()} == {"signature"}
    assert val["numbers"]["checked"].startswith("numbers on an fp32 twin")
    assert all(g["checked"] == "numbers" for g in val["numbers"]["graphs"].values())
    m = onnx.load(str(tmp_path / "bf16" / "text_decoder.onnx"))
    assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in m.graph.initializer)  # weights kept in bf16
    with pytest.raises(UserInputError, match="bfloat16"):
        OnnxCaptioner(tmp_path / "bf16")


@pytest.mark.gpu
def test_cuda_provider_gives_the_cpu_tokens(onnx_export, images):
    """With onnxruntime-gpu ([gpu] extra) on a CUDA machine: same tokens as the CPU provider."""
    import onnxruntime as ort

    from exporters.onnx import OnnxCaptioner

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install the [gpu] extra on a CUDA machine)")
    _, _, out = onnx_export("tiny-blip2-llama")
    gen = _gen()
    cpu = OnnxCaptioner(out, gen, providers=["CPUExecutionProvider"]).caption(images, PROMPTS)
    gpu = OnnxCaptioner(out, gen, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.settings["device"] == "cuda"
    assert gpu.caption(images, PROMPTS) == cpu


def test_disk_full_while_writing_is_a_clear_error(tmp_path, monkeypatch):
    """A write that fails (here: ENOSPC from the exporter) names file, folder, reason and free space;
    the earlier export at the output path is left as it was and no temporary folder remains."""
    import errno

    import torch

    from exporters.onnx import ExportWriteError, OnnxOptions, export_model_onnx

    model, proc = build("tiny-blip")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "export.json").write_text('{"earlier": true}')

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    with pytest.raises(ExportWriteError, match=r"writing vision_encoder\.onnx into .*No space left on device \(\d+\.\d\d GB free"):
        export_model_onnx(model, proc, out, OnnxOptions(exporter="legacy"))
    assert (out / "export.json").read_text() == '{"earlier": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_onnx_captioner_strips_blip_prompts_and_completes_old_processor_configs(onnx_export, images, tmp_path):
    """Issue 20, items 1 and 2 under ONNX Runtime: BLIP's prompt is cut by its tokens, an export whose
    processor config has no num_query_tokens is completed from config.json, and a processor that
    inserts no image token is refused rather than captioned."""
    from compressor.errors import ModelSpecError
    from compressor.evaluation.captioner import TorchCaptioner
    from exporters.onnx import OnnxCaptioner

    prompt = "Question: what is in the picture? Answer:"
    model, proc, out = onnx_export("tiny-blip")
    gen = _gen(prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    ours = OnnxCaptioner(out, gen).caption(images[:2], [prompt] * 2)
    assert ours == TorchCaptioner(model, proc, gen).caption(images[:2], [prompt] * 2)
    assert all(c and not c.lower().startswith("question") for c in ours), ours

    model, proc, out = onnx_export("tiny-blip2-opt")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    cfg = json.loads((old / "processor_config.json").read_text())
    del cfg["num_query_tokens"]
    (old / "processor_config.json").write_text(json.dumps(cfg))
    gen = _gen(max_new_tokens=6)
    ref = OnnxCaptioner(out, gen).caption(images[:2])
    cap = OnnxCaptioner(old, gen, verify=False)
    assert cap.caption(images[:2]) == ref and len(set(ref)) == 2
    cap.processor.num_query_tokens = None
    with pytest.raises(ModelSpecError, match="image token"):
        cap.caption(images[:2])
