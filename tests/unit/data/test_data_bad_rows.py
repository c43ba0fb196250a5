"""Bad rows raise DataError listing each one (file and row), or are skipped and counted."""

from __future__ import annotations

import json
import os

import pytest

from compressor.data import load_section
from compressor.errors import DataError
from compressor.recipe.schema import DataSpec


def _edit_coco(ann, fn):
    data = json.loads(open(ann).read())
    fn(data)
    with open(ann, "w") as f:
        json.dump(data, f)


def _missing_image(ann, imgs, tmp_path):
    os.remove(os.path.join(imgs, "000000000007.png"))
    return "images[3] (id=7", "image file not found", 3


def _corrupt_image(ann, imgs, tmp_path):
    with open(os.path.join(imgs, "000000000007.png"), "wb") as f:
        f.write(b"this is not a png")
    return "images[3] (id=7", "image file cannot be read", 3


def _truncated_png(ann, imgs, tmp_path):
    p = os.path.join(imgs, "000000000010.png")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) - 20])
    return "images[1] (id=10", "image file cannot be read", 3


def _jpeg_bytes(seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _truncated_jpeg(ann, imgs, tmp_path):
    """Issue 20, item 7: a JPEG cut after its header passes PIL's verify(); only decoding finds it."""
    data = _jpeg_bytes()
    with open(os.path.join(imgs, "000000000010.png"), "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    return "images[1] (id=10", "image file is truncated", 3


def _escape_relative(ann, imgs, tmp_path):
    (tmp_path / "outside.png").write_bytes(open(os.path.join(imgs, "000000000002.png"), "rb").read())
    _edit_coco(ann, lambda d: d["images"][2].update(file_name="../outside.png"))
    return "images[2] (id=2, file_name=../outside.png)", "outside the image folder", 3


def _escape_absolute(ann, imgs, tmp_path):
    _edit_coco(ann, lambda d: d["images"][0].update(file_name=str(tmp_path / "captions.json")))
    return "images[0] (id=3", "outside the image folder", 3


def _empty_caption(ann, imgs, tmp_path):
    _edit_coco(ann, lambda d: d["annotations"][5].update(caption="   "))
    return "annotations[5] (id=6, image_id=2)", "empty or whitespace-only", 4


def _unknown_image_id(ann, imgs, tmp_path):
    _edit_coco(ann, lambda d: d["annotations"].append({"id": 99, "image_id": 12345, "caption": "ghost"}))
    return "annotations[8] (id=99, image_id=12345)", "not in images[]", 4


def _duplicate_image(ann, imgs, tmp_path):
    _edit_coco(ann, lambda d: d["images"].append(dict(d["images"][0])))
    return "images[4] (id=3", "duplicate image entry", 4


CASES = [
    _missing_image,
    _corrupt_image,
    _truncated_png,
    _truncated_jpeg,
    _escape_relative,
    _escape_absolute,
    _empty_caption,
    _unknown_image_id,
    _duplicate_image,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[1:] for c in CASES])
def test_coco_bad_row_errors_then_skips(case, coco_dir, coco_spec, tmp_path):
    ann, imgs = coco_dir
    where, kind, n_left = case(ann, imgs, tmp_path)
    with pytest.raises(DataError) as err:
        load_section(coco_spec(), "test")
    assert len(err.value.rows) == 1, err.value.rows
    assert where in err.value.rows[0] and kind in err.value.rows[0]
    assert "data.skip_invalid: true" in str(err.value) and where in str(err.value)
    assert err.value.exit_code == 2

    ds = load_section(coco_spec(skip_invalid=True), "test")
    assert len(ds) == n_left
    assert len(ds.skipped) == 1 and where in ds.skipped[0]


def test_all_bad_rows_listed_at_once(coco_dir, coco_spec, tmp_path):
    ann, imgs = coco_dir
    _missing_image(ann, imgs, tmp_path)
    _empty_caption(ann, imgs, tmp_path)
    _unknown_image_id(ann, imgs, tmp_path)
    with pytest.raises(DataError) as err:
        load_section(coco_spec(), "test")
    assert len(err.value.rows) == 3
    ds = load_section(coco_spec(skip_invalid=True), "test")
    assert [e.image_id for e in ds] == ["2", "3", "10"]
    assert ds[0].captions == ("caption 0 of image 2",)  # only the empty caption was dropped
    assert len(ds.skipped) == 3


def test_image_whose_captions_are_all_empty_is_dropped(coco_dir, coco_spec):
    ann, _ = coco_dir
    _edit_coco(ann, lambda d: [a.update(caption="") for a in d["annotations"] if a["image_id"] == 3])
    ds = load_section(coco_spec(skip_invalid=True), "test")
    assert [e.image_id for e in ds] == ["2", "7", "10"]
    assert any("without any valid caption" in s for s in ds.skipped)


def test_only_images_of_loaded_examples_are_checked(coco_dir, coco_spec, tmp_path):
    ann, imgs = coco_dir
    _missing_image(ann, imgs, tmp_path)  # id 7, third after sorting
    assert [e.image_id for e in load_section(coco_spec(), "test", limit=2)] == ["2", "3"]


def _csv_case(tmp_path, write_images, text, task="caption", skip=False):
    write_images(tmp_path / "im", ["a.png", "b.png"])
    (tmp_path / "d.csv").write_text(text)
    return DataSpec(
        format="csv",
        task=task,
        skip_invalid=skip,
        test={"annotations": str(tmp_path / "d.csv"), "images": str(tmp_path / "im")},
    )


def test_csv_missing_columns_is_always_an_error(tmp_path, write_images):
    for skip in (False, True):
        spec = _csv_case(tmp_path, write_images, "image_name,answer\na.png,yes\n", task="vqa", skip=skip)
        with pytest.raises(
            DataError, match=r"lacks the column\(s\) question.*image_name,question\[,answer\]"
        ) as err:
            load_section(spec, "test")
        assert err.value.rows == ["d.csv line 1: image_name,answer"]
    spec = _csv_case(tmp_path, write_images, "image_name,question\na.png,what?\n")
    with pytest.raises(DataError, match="set data.task: vqa"):
        load_section(spec, "test")


def test_csv_bad_rows_name_the_line(tmp_path, write_images):
    text = "image_name,caption\na.png,fine\n../../etc/passwd,escape\nb.png,\nmissing.png,no file\n"
    with pytest.raises(DataError) as err:
        load_section(_csv_case(tmp_path, write_images, text), "test")
    rows = err.value.rows
    assert any(r.startswith("d.csv line 3 (image_name=../../etc/passwd)") and "outside" in r for r in rows)
    assert any(r.startswith("d.csv line 4 (image_name=b.png)") and "empty" in r for r in rows)
    assert any(r.startswith("d.csv line 5 (image_name=missing.png)") and "not found" in r for r in rows)
    assert "File names must stay inside the image folder" in str(err.value)
    ds = load_section(_csv_case(tmp_path, write_images, text, skip=True), "test")
    assert [e.image_id for e in ds] == ["a"] and len(ds.skipped) == 3


def test_csv_vqa_missing_answer_when_others_have_one(tmp_path, write_images):
    text = "image_name,question,answer\na.png,q1?,yes\nb.png,q2?,\n"
    with pytest.raises(DataError, match="1 bad row") as err:
        load_section(_csv_case(tmp_path, write_images, text, task="vqa"), "test")
    assert "line 3" in err.value.rows[0] and "answer is empty" in err.value.rows[0]


def test_csv_same_stem_two_files_is_a_duplicate(tmp_path, write_images):
    write_images(tmp_path / "im", ["a.jpg.png"])
    text = "image_name,caption\na.png,x\na.jpg,y\n"
    spec = _csv_case(tmp_path, write_images, text)
    with pytest.raises(DataError, match="duplicate image entry"):
        load_section(spec, "test")


def test_imagefolder_duplicate_and_malformed_lines(tmp_path, write_images):
    root = write_images(tmp_path / "f", ["a.png", "b.png"])
    (tmp_path / "f" / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\nnot json\n{"file_name": "b.png", "text": ""}\n'
    )
    with pytest.raises(DataError) as err:
        load_section(DataSpec(format="imagefolder", test={"path": root}), "test")
    rows = err.value.rows
    assert len(rows) == 3
    assert "metadata.jsonl line 2 (file_name=a.png): duplicate image entry" in rows[0]
    assert "metadata.jsonl line 3: malformed row" in rows[1]
    assert "metadata.jsonl line 4 (file_name=b.png): empty" in rows[2]
    ds = load_section(DataSpec(format="imagefolder", skip_invalid=True, test={"path": root}), "test")
    assert [(e.image_id, e.captions) for e in ds] == [("a", ("x",))]


def test_karpathy_duplicate_and_empty_sentence(tmp_path, write_images):
    root = write_images(tmp_path / "k", ["a.png", "b.png"])
    ims = [
        {"filename": "a.png", "imgid": 0, "split": "test", "sentences": [{"raw": "ok"}, {"raw": " "}]},
        {"filename": "b.png", "imgid": 0, "split": "test", "sentences": [{"raw": "dup"}]},
    ]
    (tmp_path / "k.json").write_text(json.dumps({"images": ims}))
    spec = DataSpec(format="karpathy", test={"annotations": str(tmp_path / "k.json"), "images": root})
    with pytest.raises(DataError) as err:
        load_section(spec, "test")
    assert [r.split(":")[0] for r in err.value.rows] == [
        "k.json images[0] (id=0, filename=a.png) sentences[1]",
        "k.json images[1] (id=0, filename=b.png)",
    ]


def test_truncated_jpeg_is_found_in_large_sections_by_its_end(coco_dir, coco_spec, tmp_path, monkeypatch):
    """Above DECODE_ALL_UP_TO images nothing is decoded, but a JPEG without its end marker still is."""
    import compressor.data.loader as loader

    ann, imgs = coco_dir
    _truncated_jpeg(ann, imgs, tmp_path)
    monkeypatch.setattr(loader, "DECODE_ALL_UP_TO", 0)
    with pytest.raises(DataError, match="truncated"):
        load_section(coco_spec(), "test")


def test_damage_inside_a_file_decode_option_and_skipping_at_load_time(coco_dir, coco_spec, tmp_path, monkeypatch):
    """Damage the cheap checks miss (simulated: a large section, the end check blind) is found by
    `verify_images: decode`; otherwise, with skip_invalid, a stage reading the image skips and counts it."""
    import compressor.data.loader as loader
    from compressor.evaluation.harness import predict

    ann, imgs = coco_dir
    _truncated_jpeg(ann, imgs, tmp_path)
    monkeypatch.setattr(loader, "DECODE_ALL_UP_TO", 0)
    monkeypatch.setattr(loader, "_end_looks_wrong", lambda path: False)
    with pytest.raises(DataError, match="truncated"):
        load_section(coco_spec(verify_images="decode"), "test")

    class Stub:  # a captioner: one caption per image it is given
        def caption(self, images, prompts):
            return [f"{im.size[0]} px" for im in images]

    ds = load_section(coco_spec(), "test")  # passes: nothing decoded
    assert len(ds) == 4 and not ds.skipped
    with pytest.raises(DataError, match="cannot decode an image"):
        predict(Stub(), ds, "caption", lambda ex: "", 2)
    ds = load_section(coco_spec(skip_invalid=True), "test")
    preds = predict(Stub(), ds, "caption", lambda ex: "", 2)
    assert sorted(preds) == ["2", "3", "7"] and len(ds) == 3 and sorted(ds.references()) == ["2", "3", "7"]
    assert len(ds.skipped) == 1 and "000000000010.png" in ds.skipped[0] and "truncated" in ds.skipped[0]
