"""safetensors export: sharded folders reload exactly; a corrupted weights file is detected."""

from __future__ import annotations

import json

import pytest

from compressor.errors import VerificationError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from compressor.models.presets import build_preset
    from exporters.safetensors_export import export_safetensors

    model, proc = build_preset("tiny-blip2-opt")
    out = tmp_path_factory.mktemp("st") / "model"
    info = export_safetensors(model, proc, out, max_shard_size="100KB", extra_files={"recipe.resolved.yaml": "name: x\n"})
    return model, proc, out, info


def test_sharded_export_reloads_exactly(sharded, tmp_path):
    import torch
    from transformers import Blip2ForConditionalGeneration

    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs

    model, proc, out, info = sharded
    assert info["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == info["shards"]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # never pickle
    reloaded, loading = Blip2ForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    sd, sd2 = model.state_dict(), reloaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    from PIL import Image

    imgs = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    inputs = generation_inputs(family_for_model(model), proc, imgs, ["", "a photo of"])
    with torch.inference_mode():
        a, b = model(**inputs).logits, reloaded.eval()(**inputs).logits
        # teeth: a 1% change of one weight moves the logits
        w = reloaded.language_model.model.decoder.layers[0].fc1.weight
        w.mul_(1.01)
        c = reloaded(**inputs).logits
    assert torch.equal(a, b)
    assert (c - a).abs().max() > 1e-3
    lines = (out / "SHA256SUMS").read_text().splitlines()
    listed = {line.split("  ", 1)[1] for line in lines}
    assert listed == {p.name for p in out.iterdir() if p.name != "SHA256SUMS"}


def test_corrupted_weights_are_detected(sharded, tmp_path):
    import shutil

    from exporters.safetensors_export import verify_checksums, verify_folder

    _, _, out, _ = sharded
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    verify_folder(bad)  # intact copy passes
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight
    shard.write_bytes(bytes(data))
    assert verify_checksums(bad) == [shard.name]
    with pytest.raises(VerificationError, match=shard.name):
        verify_folder(bad)
