"""merge_adapters for every family: merged logits equal the adapter model's within 1e-5 (1e-10 seen, the
check being float64 throughout), the
adapted weights change, an adapter that never trained is a no-op error, a quantised base is refused
(before its weights are read)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from surgery_helpers import FAMILIES, logits, make_recipe, preset, probe_images, run_stage, saved_preset

from compressor.errors import UserInputError
from compressor.lora import apply_lora
from compressor.models.folders import link_base_model
from compressor.recipe.schema import LoraSpec

PARTS = {
    "tiny-blip2-opt": ["qformer.cross_attention", "language_model.attention", "projection"],
    "tiny-blip2-llama": ["qformer.self_attention", "language_model.attention", "language_model.mlp"],
    "tiny-blip2-t5": ["language_model.encoder.attention", "language_model.decoder.cross_attention", "vision.mlp"],
    "tiny-instructblip": ["qformer.self_attention", "qformer.mlp", "language_model.mlp"],
    "tiny-blip": ["vision.attention", "language_model.decoder.cross_attention", "language_model.mlp"],
}


def adapter_folder(name, root, trained=True, seed=0, scale=0.1):
    """The preset's folder (hard links) + an adapter whose lora_B are random × ``scale`` (as after training) or zero."""
    from compressor.models.loading import load_model

    folder = link_base_model(saved_preset(name), root / "model")
    model, _ = load_model(folder)
    peft_model, _ = apply_lora(model, LoraSpec(r=4, lora_alpha=8, lora_dropout=0.0), PARTS[name])
    if trained:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(folder / "adapter"))
    return folder


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_equals_adapter_model(name, tmp_path):
    """The stage verifies merged == adapter model within 1e-5 in float64 and saves exactly that merge.

    The tiny re-initialised presets amplify float32 rounding (a 1e-7 relative change of a weight
    moves their logits by up to ~1e-4), so the equality is checked in float64, where only the merge
    itself can differ, and the saved float32 weights must be bit-identical to the float64 merge rounded.
    """
    from peft import PeftModel

    from compressor.models.loading import load_model

    src = adapter_folder(name, tmp_path / "in")
    recipe = make_recipe([{"type": "lora_finetune", "parts": PARTS[name]}, {"type": "merge_adapters"}], model=name)
    out = tmp_path / "out"
    summary = run_stage(recipe, 1, src, out)
    # float64 throughout (transformers' float32 norms too: test_float32_norms_compute_in_float64_only_inside_the_check):
    # only the merge's own rounding is left, far below the 1e-5 tolerance
    assert summary["checked_in"] == "torch.float64" and summary["max_logit_diff"] <= 1e-10
    assert summary["merged_modules"] > 0

    _, proc, family = preset(name)
    images = probe_images()
    base, _ = load_model(src)
    ref_base = logits(base.double(), proc, family, images)
    adapter_model = PeftModel.from_pretrained(base, str(src / "adapter")).double()
    ref = logits(adapter_model, proc, family, images)
    assert float((ref - ref_base).abs().max()) > 1e-3, "the adapter changes nothing: no teeth"
    merged64 = adapter_model.merge_and_unload(safe_merge=True)
    assert float((logits(merged64, proc, family, images) - ref).abs().max()) <= 1e-5
    merged, _ = load_model(out / "model")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert not (out / "model" / "adapter").exists()
    want = {k: v.float() for k, v in merged64.state_dict().items()}
    got = merged.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    # The adapted weights differ from the base; the untouched ones are identical.
    base_sd = load_model(src)[0].state_dict()
    changed = [k for k in got if not torch.equal(got[k], base_sd[k])]
    assert changed and all(k.endswith("weight") for k in changed)


def test_untrained_adapter_is_a_noop_error(tmp_path):
    src = adapter_folder("tiny-blip2-opt", tmp_path / "in", trained=False)
    recipe = make_recipe([{"type": "lora_finetune", "parts": ["language_model.attention"]}, {"type": "merge_adapters"}])
    with pytest.raises(UserInputError, match="never trained") as err:
        run_stage(recipe, 1, src, tmp_path / "out")
    assert err.value.exit_code == 2
    assert not (tmp_path / "out" / "model").exists()


def test_adapter_trained_to_nothing_is_bad_input_too(tmp_path):
    """An adapter trained with learning_rate 1e-30 has lora_B ~1e-30: merging changes no weight.
    That is bad input as a never-trained adapter is (exit 2), not a verification failure (issue 20)."""
    src = adapter_folder("tiny-blip2-opt", tmp_path / "in", scale=1e-30)
    recipe = make_recipe([{"type": "lora_finetune", "parts": ["language_model.attention"]}, {"type": "merge_adapters"}])
    with pytest.raises(UserInputError, match="trained to nothing") as err:
        run_stage(recipe, 1, src, tmp_path / "out")
    assert err.value.exit_code == 2 and "learning_rate" in str(err.value)
    assert not (tmp_path / "out" / "model").exists()


def test_quantised_base_is_refused_before_loading(tmp_path):
    src = adapter_folder("tiny-blip2-opt", tmp_path / "in")
    q = tmp_path / "q"
    shutil.copytree(src, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    (q / "model.safetensors").write_bytes(b"not weights")  # reading them would fail differently
    recipe = make_recipe([{"type": "lora_finetune", "parts": ["language_model.attention"]}, {"type": "merge_adapters"}])
    with pytest.raises(UserInputError, match="merge into an fp16/bf16|Merge into an fp16/bf16") as err:
        run_stage(recipe, 1, q, tmp_path / "out")
    assert "re-quantise" in str(err.value) and "4-bit" in str(err.value)


def test_loaded_quantised_base_is_refused():
    from compressor.stages.merge_adapters import check_not_quantized

    model, _, _ = preset("tiny-blip2-opt")
    check_not_quantized(model)  # a full-precision base passes
    model.is_quantized = True
    with pytest.raises(UserInputError, match="4/8 bits"):
        check_not_quantized(model)


def test_in_place_merge_never_writes_its_input_and_refuses_non_finite_weights(tmp_path):
    """The merge goes into the memory-mapped base (copy-on-write): the input folder keeps its bytes; a broken
    adapter (inf in lora_B) fails the finiteness check with nothing written."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from compressor.errors import VerificationError

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.safetensors"))}

    recipe = make_recipe([{"type": "lora_finetune", "parts": PARTS["tiny-blip2-opt"]}, {"type": "merge_adapters"}])
    src = adapter_folder("tiny-blip2-opt", tmp_path / "in")
    before = digest(src)
    run_stage(recipe, 1, src, tmp_path / "out")
    assert digest(src) == before
    bad = adapter_folder("tiny-blip2-opt", tmp_path / "bad")
    f = bad / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, str(f))
    before = digest(bad)
    with pytest.raises(VerificationError, match="non-finite weights"):
        run_stage(recipe, 1, bad, tmp_path / "out2")
    assert not (tmp_path / "out2" / "model").exists() and digest(bad) == before


def test_float32_norms_compute_in_float64_only_inside_the_check():
    """transformers' Llama RMSNorm rounds a float64 input to float32; inside norms_in_input_dtype it
    keeps float64 (the merge check's premise), and on exit the class's forward is back."""
    from compressor.stages.merge_adapters import norms_in_input_dtype

    model, _, _ = preset("tiny-blip2-llama")
    model = model.double()
    norm = model.language_model.model.norm
    assert type(norm).__name__ == "LlamaRMSNorm"
    x = torch.randn(2, 5, norm.weight.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    outside = norm(x)
    assert float((outside - exact).abs().max()) > 1e-12  # teeth: the library's norm is float32 inside
    with norms_in_input_dtype(model) as n:
        assert n == 2 * model.config.text_config.num_hidden_layers + 1
        assert float((norm(x) - exact).abs().max()) <= 1e-15
    assert "forward" not in vars(norm) and torch.equal(norm(x), outside)
