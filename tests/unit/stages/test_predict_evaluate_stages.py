"""The `predict` and `evaluate` stages on the shipped teacher: output files and their layouts."""

from __future__ import annotations

import csv
import json

import pytest


def _ctx(tmp_path, task: str, stage: dict):
    from compressor.pipeline.context import StageContext
    from compressor.recipe.schema import Recipe

    recipe = Recipe(
        name="t",
        model="shapes-teacher",
        data={"format": "synthetic", "task": task, "test": {"size": 3, "seed": 2000}, "eval": {"size": 3, "seed": 2000}},
        generation={"batch_size": 4},
        stages=[stage],
    )
    return recipe.stages[0], StageContext(recipe=recipe, index=0, run_dir=tmp_path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def teacher_dir():
    from compressor.models.presets import SHIPPED

    return SHIPPED["shapes-teacher"]


def test_predict_stage_captions_and_answers(tmp_path, teacher_dir):
    from compressor.stages import predict

    cfg, ctx = _ctx(tmp_path, "caption", {"type": "predict"})
    out = tmp_path / "p"
    out.mkdir()
    assert predict.run(cfg, ctx, teacher_dir, out) == {"file": "predictions.json", "predictions": 3, "skipped": 0}
    rows = json.loads((out / "predictions.json").read_text())
    assert [r["image_id"] for r in rows] == ["syn-2000-0", "syn-2000-1", "syn-2000-2"] and all(r["caption"] for r in rows)

    cfg, ctx = _ctx(tmp_path, "vqa", {"type": "predict"})
    out = tmp_path / "v"
    out.mkdir()
    summary = predict.run(cfg, ctx, teacher_dir, out)
    assert summary["file"] == "answers.csv"
    rows = list(csv.reader((out / "answers.csv").open()))
    assert rows[0] == ["image_name", "question", "answer"] and len(rows) == summary["predictions"] + 1
    assert rows[1][0] == "syn-2000-0" and rows[1][1].endswith("?")


def test_evaluate_stage_record(tmp_path, teacher_dir):
    from compressor.stages import evaluate

    cfg, ctx = _ctx(tmp_path, "caption", {"type": "evaluate", "label": "base", "metrics": ["bleu_4", "cider"],
                                          "characteristics": {"latency": {"batch_sizes": [1, 2], "repeats": 1, "warmup": 0}}})
    out = tmp_path / "e"
    out.mkdir()
    try:
        evaluate.run(cfg, ctx, teacher_dir, out)
    finally:
        ctx.close()
    rec = json.loads((out / "eval.json").read_text())
    assert rec["label"] == "base" and rec["data"]["section"] == "eval" and rec["data"]["examples"] == 3
    assert set(rec["metrics"]) == {"bleu_4", "cider"}
    c = rec["characteristics"]
    assert c["params_trainable"] == 0 and c["gflops"] > 0 and c["avg_inference_s"] > 0 and c["size_mb"] > 0
    assert rec["decoding"]["batch_size"] == 4
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 3 and {"image_id", "caption"} == set(preds[0])
