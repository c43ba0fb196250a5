"""Pre-flight refusals of issue 20 (items 3, 6, 7, 8 and "report all at once"): each reproduction
passed `--dry-run` (or exited 3 after the run folder existed, or silently did something else);
now `apply --dry-run` and `apply` exit 2 naming the problem, and nothing is written."""

from __future__ import annotations

import json

import pytest

from tests.integration.inprocess import run_inprocess


def _recipe(tmp_path, body: str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(body)
    return p


def _refused(tmp_path, recipe, *needles: str):
    """``apply --dry-run`` and ``apply`` both exit 2 naming every needle; no run folder."""
    for extra in (["--dry-run"], []):
        res = run_inprocess("apply", str(recipe), "--out", str(tmp_path / "run"), *extra)
        assert res.returncode == 2, (extra, res.stdout, res.stderr[-2000:])
        for n in needles:
            assert n in res.stderr, (n, res.stderr[-2000:])
        assert "Traceback" not in res.stderr
        assert not (tmp_path / "run").exists()
    return res


def test_heads_ratio_that_whole_kv_groups_cannot_meet(tmp_path):
    """Item 3: `heads: {ratio: 0.3}` on 4 heads / 2 KV heads removed 50% without a word."""
    r = _recipe(tmp_path, "name: p\nmodel: tiny-blip2-llama\nstages:\n  - type: prune_width\n    heads: {ratio: 0.3}\n")
    _refused(tmp_path, r, "heads.ratio 0.3 cannot be met", "nearest allowed: 0.5 (2 heads)")


def test_bitsandbytes_quantized_folder(tmp_path):
    """Item 6: a folder whose config.json carries a bitsandbytes quantization_config passed pre-flight,
    then exited 3 ("requires bitsandbytes") after the run folder existed."""
    from compressor.models.presets import save_preset

    model = save_preset("tiny-blip2-opt", tmp_path / "q4")
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (model / "config.json").write_text(json.dumps(cfg))
    r = _recipe(tmp_path, f"name: q\nmodel: {model}\nstages:\n  - type: remove_layers\n    language_model: {{drop_top: 2}}\n")
    _refused(tmp_path, r, "bitsandbytes quantization_config (4-bit weights)", "full-precision checkpoint")
    res = run_inprocess("export", str(model), "--onnx", "--out", str(tmp_path / "onnx"))
    assert res.returncode == 2 and "quantization_config" in res.stderr and not (tmp_path / "onnx").exists()


def _jpeg(path, truncate: bool) -> None:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3] if truncate else data)


@pytest.fixture
def coco_with_truncated_jpeg(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    anns = {"images": [], "annotations": []}
    for i in range(4):
        _jpeg(imgs / f"{i}.jpg", truncate=i == 2)  # a valid header: PIL's verify() passes it
        anns["images"].append({"id": i, "file_name": f"{i}.jpg"})
        anns["annotations"].append({"id": i, "image_id": i, "caption": f"a picture number {i}"})
    (tmp_path / "caps.json").write_text(json.dumps(anns))
    return tmp_path / "caps.json", imgs


RECIPE_7 = """\
name: c
model: tiny-blip2-opt
data:
  format: coco
  {skip}
  train: {{annotations: {ann}, images: {imgs}}}
  eval: {{annotations: {ann}, images: {imgs}}}
generation: {{max_new_tokens: 4, batch_size: 4}}
stages:
  - type: lora_finetune
    parts: [language_model.attention]
    train: {{steps: 1, batch_size: 2}}
  - type: merge_adapters
  - type: evaluate
    label: e
    metrics: [bleu_4]
    characteristics: {{latency: null, gflops: false}}
"""


def test_truncated_jpeg_is_found_before_training_and_skip_invalid_skips_it(tmp_path, coco_with_truncated_jpeg):
    """Item 7: a truncated JPEG with a valid header was found only by the evaluate stage, after the
    training stages had written their folders, and skip_invalid could not skip it."""
    ann, imgs = coco_with_truncated_jpeg
    r = _recipe(tmp_path, RECIPE_7.format(ann=ann, imgs=imgs, skip=""))
    _refused(tmp_path, r, "2.jpg", "image file is truncated", "data.skip_invalid: true")
    r = _recipe(tmp_path, RECIPE_7.format(ann=ann, imgs=imgs, skip="skip_invalid: true"), "skip.yaml")
    res = run_inprocess("apply", str(r), "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "run" / "report.json").read_text())["evaluations"]["e"]["data"]
    assert data["examples"] == 3 and data["skipped"] == 1


def test_block_influence_without_data(tmp_path):
    """Item 8: `remove_layers {count: 2, select: block_influence}` without `data:` was valid in
    --dry-run, then exited 3 (AttributeError: 'NoneType' object has no attribute 'source')."""
    r = _recipe(tmp_path, "name: b\nmodel: tiny-blip2-opt\nstages:\n  - type: remove_layers\n"
                          "    qformer: {count: 2, select: block_influence}\n")
    _refused(tmp_path, r, "a remove_layers stage needs `data:`")


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    """Friction: a missing Hub token was reported first and the data problems only on a second try."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    r = _recipe(tmp_path, f"""\
name: a
model: tiny-blip2-opt
data:
  format: coco
  eval: {{annotations: {tmp_path / "missing.json"}, images: {tmp_path}}}
stages:
  - type: evaluate
    label: e
push: {{repo_id: me/x}}
""")
    res = _refused(tmp_path, r, "push:", "missing.json")
    assert "2 problems in the recipe" in res.stderr
