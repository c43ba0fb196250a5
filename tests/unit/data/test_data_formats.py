"""Each data format loads into Examples with the documented ids, paths and references."""

from __future__ import annotations

import json
import os

import pytest

from compressor.data import Example, infer_spec, load_images, load_section
from compressor.recipe.schema import DataSpec


def test_coco_loads_sorted_with_captions(coco_spec, coco_dir):
    ds = load_section(coco_spec(), "test")
    assert [e.image_id for e in ds] == ["2", "3", "7", "10"]  # natural order of ids
    assert ds.task == "caption" and ds.skipped == []
    assert ds[0].captions == ("caption 0 of image 2", "caption 1 of image 2")
    assert ds[0].image_path == os.path.join(coco_dir[1], "000000000002.png")
    assert ds.references()["10"] == ["caption 0 of image 10", "caption 1 of image 10"]
    assert len(ds.training_pairs()) == 8
    ims = load_images(ds.examples[:2])
    assert all(im.mode == "RGB" and im.size == (8, 6) for im in ims)
    assert ims[0].getpixel((0, 0)) != ims[1].getpixel((0, 0))


def test_coco_image_without_annotations_is_unlabelled(tmp_path, write_images):
    write_images(tmp_path / "i", ["a.png", "b.png"])
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}],
            }
        )
    )
    spec = DataSpec(
        format="coco", test={"annotations": str(tmp_path / "c.json"), "images": str(tmp_path / "i")}
    )
    ds = load_section(spec, "test")
    assert [e.captions for e in ds] == [("a cat",), ()]
    assert [e.labelled for e in ds] == [True, False]


def test_relative_paths_resolve_against_cwd(coco_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = DataSpec(format="coco", test={"annotations": "captions.json", "images": "imgs"})
    ds = load_section(spec, "test")
    assert len(ds) == 4 and ds[0].image_path == os.path.join(str(tmp_path), "imgs", "000000000002.png")


def _karpathy(tmp_path, write_images):
    write_images(tmp_path / "coco" / "val2014", ["x1.png", "x2.png", "x3.png", "x4.png"])
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        entries.append(
            {
                "filepath": "val2014",
                "filename": f"x{i + 1}.png",
                "imgid": i,
                "cocoid": 100 + i,
                "split": split,
                "sentences": [{"raw": f"Sentence {k} of {i}.", "tokens": ["x"]} for k in range(3)],
            }
        )
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return str(p), str(tmp_path / "coco")


def test_karpathy_splits_and_restval(tmp_path, write_images):
    ann, root = _karpathy(tmp_path, write_images)
    spec = DataSpec(
        format="karpathy",
        train={"annotations": ann, "images": root},  # split inferred from the section: train (+ restval)
        val={"annotations": ann, "images": root, "split": "val"},
        eval={"annotations": ann, "images": root},  # eval reads test
        calibration={"annotations": ann, "images": root, "split": "restval"},
    )
    assert [e.image_id for e in load_section(spec, "train")] == ["100", "101"]  # cocoid
    assert [e.image_id for e in load_section(spec, "val")] == ["102"]
    ev = load_section(spec, "eval")
    assert [e.image_id for e in ev] == ["103"]
    assert ev[0].captions == ("Sentence 0 of 3.", "Sentence 1 of 3.", "Sentence 2 of 3.")
    assert ev[0].image_path == os.path.join(root, "val2014", "x4.png")
    assert [e.image_id for e in load_section(spec, "calibration")] == ["101"]


def test_karpathy_unknown_split_is_a_clear_error(tmp_path, write_images):
    from compressor.errors import UserInputError

    ann, root = _karpathy(tmp_path, write_images)
    spec = DataSpec(format="karpathy", test={"annotations": ann, "images": root, "split": "tset"})
    with pytest.raises(UserInputError, match=r"split 'tset'.*Did you mean 'test'"):
        load_section(spec, "test")


def test_csv_captions_multiple_rows_per_image(tmp_path, write_images):
    write_images(tmp_path / "im", ["b.png", "a.png", "sub/c.png"])
    (tmp_path / "c.csv").write_text(
        "image_name,caption,extra\nb.png,a dog,1\na.png,a cat,2\nb.png,  a   brown dog ,3\nsub/c.png,a car,4\n"
    )
    spec = DataSpec(
        format="csv", train={"annotations": str(tmp_path / "c.csv"), "images": str(tmp_path / "im")}
    )
    ds = load_section(spec, "train")
    assert [(e.image_id, e.captions) for e in ds] == [
        ("a", ("a cat",)),
        ("b", ("a dog", "a brown dog")),
        ("sub/c", ("a car",)),
    ]


def test_csv_vqa_answers_split_on_pipe(tmp_path, write_images):
    write_images(tmp_path / "im", ["q.png", "p.png"])
    (tmp_path / "v.csv").write_text(
        "image_name,question,answer\nq.png,what is it?,cat|cat|dog\np.png,is it red?,yes\nq.png,how many?,two\n"
    )
    spec = DataSpec(
        format="csv",
        task="vqa",
        test={"annotations": str(tmp_path / "v.csv"), "images": str(tmp_path / "im")},
    )
    ds = load_section(spec, "eval")
    assert [(e.image_id, e.question, e.answers, e.question_id) for e in ds] == [
        ("p", "is it red?", ("yes",), "p-1"),
        ("q", "what is it?", ("cat", "cat", "dog"), "q-0"),
        ("q", "how many?", ("two",), "q-2"),
    ]
    assert ds.references() == {"p-1": ["yes"], "q-0": ["cat", "cat", "dog"], "q-2": ["two"]}
    assert [t for _, t in ds.training_pairs()] == ["yes", "cat", "two"]


def test_csv_vqa_without_answers_is_unlabelled(tmp_path, write_images):
    write_images(tmp_path / "im", ["q.png"])
    (tmp_path / "v.csv").write_text("image_name,question,question_id\nq.png,what is it?,77\n")
    spec = DataSpec(
        format="csv",
        task="vqa",
        test={"annotations": str(tmp_path / "v.csv"), "images": str(tmp_path / "im")},
    )
    (ex,) = load_section(spec, "test").examples
    assert ex.answers == () and ex.question_id == "77" and not ex.labelled


def test_imagefolder_captions_and_vqa(tmp_path, write_images):
    root = write_images(tmp_path / "f", ["a.png", "b.png"])
    (tmp_path / "f" / "metadata.jsonl").write_text(
        '{"file_name": "b.png", "text": "a blue thing"}\n\n{"file_name": "a.png", "captions": ["one", "two"]}\n'
    )
    ds = load_section(DataSpec(format="imagefolder", train={"path": root}), "train")
    assert [(e.image_id, e.captions) for e in ds] == [("a", ("one", "two")), ("b", ("a blue thing",))]

    root2 = write_images(tmp_path / "g", ["a.png"])
    (tmp_path / "g" / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "question": "color?", "answers": [{"answer": "red"}, {"answer": "red"}], "question_id": 5}\n'
        '{"file_name": "a.png", "question": "shape?", "answer": "circle"}\n'
    )
    ds = load_section(DataSpec(format="imagefolder", task="vqa", test={"path": root2}), "test")
    assert [(e.question, e.answers, e.question_id) for e in ds] == [
        ("color?", ("red", "red"), "5"),
        ("shape?", ("circle",), "a-1"),
    ]


def test_imagefolder_metadata_csv_and_unlabelled(tmp_path, write_images):
    root = write_images(tmp_path / "f", ["a.png", "b.png"])
    (tmp_path / "f" / "metadata.csv").write_text("file_name,text\na.png,hello\n")
    ds = load_section(DataSpec(format="imagefolder", test={"path": root}), "test")
    assert [(e.image_id, e.captions) for e in ds] == [("a", ("hello",))]
    root2 = write_images(tmp_path / "u", ["z.png", "y.jpg.png"])
    (tmp_path / "u" / "note.txt").write_text("not an image")
    ds = load_section(DataSpec(format="imagefolder", test={"path": root2}), "test")
    assert [e.image_id for e in ds] == ["y.jpg", "z"] and not ds.labelled


def test_field_of_another_format_is_an_error(tmp_path):
    from compressor.errors import UserInputError

    spec = DataSpec(format="coco", test={"annotations": "a.json", "images": "i", "split": "test"})
    with pytest.raises(UserInputError, match=r"data.test: split do\(es\) not apply to format coco"):
        load_section(spec, "test")
    with pytest.raises(UserInputError, match=r"data.test.path is required"):
        load_section(DataSpec(format="imagefolder", test={}), "test")


def test_missing_annotation_file_and_bad_json(tmp_path, write_images):
    from compressor.errors import DataError

    root = write_images(tmp_path / "i", ["a.png"])
    spec = DataSpec(format="coco", test={"annotations": str(tmp_path / "nope.json"), "images": root})
    with pytest.raises(DataError, match="annotation file not found"):
        load_section(spec, "test")
    (tmp_path / "bad.json").write_text('{"images": [')
    spec = DataSpec(format="coco", test={"annotations": str(tmp_path / "bad.json"), "images": root})
    with pytest.raises(DataError, match="not valid JSON.*line 1"):
        load_section(spec, "test")


def test_infer_spec_detects_formats(tmp_path, coco_dir, write_images):
    spec = infer_spec(coco_dir[0], images=coco_dir[1])
    assert spec.format == "coco" and len(load_section(spec, "eval")) == 4
    write_images(tmp_path / "q", ["a.png"])
    (tmp_path / "q" / "v.csv").write_text("image_name,question\na.png,what?\n")
    spec = infer_spec(str(tmp_path / "q" / "v.csv"))
    assert (spec.format, spec.task) == ("csv", "vqa") and len(load_section(spec, "eval")) == 1


def test_example_is_hashable_and_frozen():
    e = Example("1", captions=("a",))
    assert hash(e) == hash(Example("1", captions=("a",)))
    with pytest.raises(AttributeError):
        e.image_id = "2"  # type: ignore[misc]
