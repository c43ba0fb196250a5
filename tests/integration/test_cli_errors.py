"""Bad input exits 2 with a clear message and writes nothing; other failures exit 3 without a traceback."""

from __future__ import annotations

import json

from tests.conftest import run_cli

BASE = """\
name: err
model: {model}
data:
  format: coco
  train: {{annotations: {ann}, images: {images}}}
  eval: {{annotations: {ann}, images: {images}}}
{extra}
generation: {{max_new_tokens: 5}}
stages:
  - type: finetune
    train: {{steps: {steps}, batch_size: 4, learning_rate: {lr}}}
  - type: evaluate
    label: e
    metrics: [cider]
    characteristics: {{latency: null, gflops: false}}
"""


def coco(tmp_path, missing=False):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    anns = {"images": [], "annotations": []}
    for i in range(4):
        if not (missing and i == 2):
            Image.new("RGB", (32, 32), (60 * i, 20, 200 - 40 * i)).save(images / f"{i}.png")
        anns["images"].append({"id": i, "file_name": f"{i}.png"})
        anns["annotations"].append({"id": i, "image_id": i, "caption": f"picture number {i}"})
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(anns))
    return ann, images


def recipe(tmp_path, model="tiny-blip2-opt", extra="", steps=2, lr="1.0e-3", missing=False):
    ann, images = coco(tmp_path, missing)
    p = tmp_path / "r.yaml"
    p.write_text(BASE.format(model=model, ann=ann, images=images, extra=extra, steps=steps, lr=lr))
    return p


def test_missing_image_lists_the_row_and_writes_nothing(tmp_path):
    res = run_cli("apply", str(recipe(tmp_path, missing=True)), "--out", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    assert "2.png" in res.stderr and "skip_invalid" in res.stderr
    assert not (tmp_path / "run").exists()


def test_problems_of_every_data_section_are_reported_at_once(tmp_path):
    """A missing train annotation file and a bad eval image: both in one error, nothing written."""
    p = recipe(tmp_path, missing=True)
    text = p.read_text().replace("train: {annotations: " + str(tmp_path / "captions.json"),
                                 "train: {annotations: " + str(tmp_path / "nope.json"))
    p.write_text(text)
    res = run_cli("apply", str(p), "--out", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    assert "nope.json" in res.stderr and "2.png" in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


def test_skip_invalid_skips_and_counts(tmp_path):
    res = run_cli("apply", str(recipe(tmp_path, missing=True, extra="  skip_invalid: true")), "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-2000:]
    ev = json.loads((tmp_path / "run" / "report.json").read_text())["evaluations"]["e"]
    assert ev["data"]["examples"] == 3 and ev["data"]["skipped"] == 1


def test_unknown_preset_suggests_the_closest(tmp_path):
    res = run_cli("apply", str(recipe(tmp_path, model="tiny-blip2-op")), "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert "Did you mean 'tiny-blip2-opt'?" in res.stderr
    assert not (tmp_path / "run").exists()


def test_hub_id_offline_fails_at_once_naming_the_way_out(tmp_path):
    res = run_cli(
        "apply", str(recipe(tmp_path, model="someone/blip2-custom")), "--out", str(tmp_path / "run"),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 2, res.stderr
    assert "HF_HUB_OFFLINE" in res.stderr and "local" in res.stderr


def test_failure_inside_a_stage_exits_3_without_traceback(tmp_path):
    res = run_cli("apply", str(recipe(tmp_path, steps=3, lr="1.0e+12")), "--out", str(tmp_path / "run"))
    assert res.returncode == 3, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "--debug" in res.stderr
    assert not list((tmp_path / "run" / "stages").glob("00-*"))  # the failed stage left no folder
    res = run_cli("--debug", "apply", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.returncode == 3 and "Traceback" in res.stderr


def test_validate_reports_every_recipe(tmp_path):
    good = recipe(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("steps:", "stpes:"))
    res = run_cli("validate", str(good), str(bad))
    assert res.returncode == 2
    assert f"{good}: ok" in res.stdout and "Did you mean 'steps'?" in res.stderr


def test_not_built_features_exit_2_before_writing(tmp_path, monkeypatch):
    """The mechanism that guards features a version validates but cannot run (apply exits 2)."""
    import pytest

    from compressor.errors import NotBuiltError
    from compressor.pipeline import preflight
    from compressor.recipe import features
    from compressor.recipe.loader import load_recipe

    loaded = load_recipe(recipe(tmp_path))
    monkeypatch.setattr(features, "unbuilt", lambda r: [(("stages", 0), "time travel")])
    with pytest.raises(NotBuiltError, match=r"r.yaml:10: stages.0: time travel is not built"):
        preflight.check_features(loaded)
