"""Prediction / reference files and id matching."""

from __future__ import annotations

import json

import pytest

import eval.predictions as predictions_mod
from compressor.errors import DataError
from eval.predictions import load_predictions, load_references, match_ids, write_coco_results


def _write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def test_load_predictions_formats(tmp_path):
    coco = _write(
        tmp_path / "a.json", [{"image_id": 42, "caption": "a dog"}, {"image_id": 7, "caption": "é"}]
    )
    assert load_predictions(coco) == {"42": "a dog", "7": "é"}
    mapping = _write(tmp_path / "b.json", {"42": "a dog", "x1": "a cat"})
    assert load_predictions(mapping) == {"42": "a dog", "x1": "a cat"}
    vqa = _write(tmp_path / "c.json", [{"question_id": 5, "answer": "yes"}])
    assert load_predictions(vqa) == {"5": "yes"}


def test_load_predictions_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_predictions(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1,', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_predictions(bad)
    dup = _write(tmp_path / "dup.json", [{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}])
    with pytest.raises(DataError, match="id 1 appears more than once"):
        load_predictions(dup)
    wrong = _write(tmp_path / "w.json", [{"image_id": 1, "caption": None}, {"img": 2}])
    with pytest.raises(DataError) as e:
        load_predictions(wrong)
    assert "must be a string" in str(e.value) and "entry 1" in str(e.value)
    with pytest.raises(DataError, match="expected a COCO results list"):
        load_predictions(_write(tmp_path / "n.json", 3))


def test_load_references_coco_annotations(tmp_path):
    ann = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "a dog"},
            {"image_id": 2, "id": 11, "caption": "a cat"},
            {"image_id": 1, "id": 12, "caption": "the dog runs"},
        ],
    }
    refs = load_references(_write(tmp_path / "ann.json", ann))
    assert refs == {"1": ["a dog", "the dog runs"], "2": ["a cat"]}  # image 3 has no caption


def test_load_references_mapping_and_vqa(tmp_path):
    refs = load_references(_write(tmp_path / "m.json", {"1": ["a", "b"], "2": "single"}))
    assert refs == {"1": ["a", "b"], "2": ["single"]}
    vqa = {"annotations": [{"question_id": 9, "answers": [{"answer": "yes"}, {"answer": "no"}]}]}
    assert load_references(_write(tmp_path / "v.json", vqa)) == {"9": ["yes", "no"]}
    with pytest.raises(DataError, match="no references"):
        load_references(_write(tmp_path / "e.json", {"1": []}))
    with pytest.raises(DataError, match="needs 'image_id' and 'caption'"):
        load_references(_write(tmp_path / "x.json", {"annotations": [{"foo": 1}]}))


def test_match_ids_lists_both_sides():
    preds = {"1": "a", 2: "b", "3": "c", "4": "d"}
    refs = {1: ["a"], "2": ["b"], "5": ["e"]}
    with pytest.raises(DataError) as e:
        match_ids(preds, refs)
    msg = str(e.value)
    assert "2 ids in predictions without references: 3, 4" in msg
    assert "1 ids in references without predictions: 5" in msg
    assert e.value.rows and len(e.value.rows) == 2


def test_match_ids_ok_and_edge_cases():
    assert match_ids({"b": 1, 2: 1}, {"2": 1, "b": 1}) == ["b", "2"]
    with pytest.raises(DataError, match="same id twice"):
        match_ids({1: "a", "1": "b"}, {"1": ["a"]})
    with pytest.raises(DataError, match="nothing to score"):
        match_ids({}, {})
    many = {str(i): "x" for i in range(25)}
    with pytest.raises(DataError, match="… and 15 more"):
        match_ids(many, {})


def test_write_coco_results_int_ids_and_round_trip(tmp_path):
    out = write_coco_results(tmp_path / "sub" / "res.json", {"42": "a dog", 7: "é ü"})
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert rows == [{"image_id": 42, "caption": "a dog"}, {"image_id": 7, "caption": "é ü"}]
    assert load_predictions(out) == {"42": "a dog", "7": "é ü"}
    assert [p.name for p in out.parent.iterdir()] == ["res.json"]  # no temporary file left


@pytest.mark.parametrize("ids", [["1", "abc"], ["007", "8"], ["-1", "2"]])
def test_write_coco_results_keeps_strings_unless_all_canonical_ints(tmp_path, ids):
    out = write_coco_results(tmp_path / "r.json", {i: "x" for i in ids})
    assert [r["image_id"] for r in json.loads(out.read_text())] == ids


def test_write_coco_results_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "res.json"
    write_coco_results(out, {"1": "old"})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(predictions_mod.os, "fsync", boom)  # fails after part of the file is written
    with pytest.raises(RuntimeError, match="disk full"):
        write_coco_results(out, {"1": "new"})
    monkeypatch.undo()
    assert load_predictions(out) == {"1": "old"}  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["res.json"]
    with pytest.raises(DataError, match="must be strings"):
        write_coco_results(out, {"1": 3})
