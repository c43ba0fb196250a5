"""safetensors export verification reads the saved tensors one at a time (no second model in memory)."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import VerificationError


def test_export_compares_every_saved_tensor_and_catches_a_difference(tmp_path, monkeypatch):
    import exporters.safetensors_export as se
    from compressor.models.presets import build_preset

    model, proc = build_preset("tiny-blip2-opt")
    info = se.export_safetensors(model, proc, tmp_path / "ok")
    names = [k for k, _ in se.saved_tensors(tmp_path / "ok")]
    assert info["shards"] == 1 and len(names) == len(set(names)) > 50
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in se.saved_tensors(tmp_path / "ok"))

    real = se.saved_tensors

    def corrupted(folder):
        for i, (k, v) in enumerate(real(folder)):
            yield k, (v + 1e-3 if i == 7 else v)

    monkeypatch.setattr(se, "saved_tensors", corrupted)
    with pytest.raises(VerificationError, match="differs after reload"):
        se.export_safetensors(model, proc, tmp_path / "bad")
