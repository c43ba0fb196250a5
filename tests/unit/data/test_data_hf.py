"""Format ``hf``: Hugging Face ``datasets`` written in the test (save_to_disk, Parquet, JSON lines); no network."""

from __future__ import annotations

import io
import json

import pytest

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """``datasets``' Arrow cache of converted files goes into the test's folder, not ~/.cache."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


def _png(i: int) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (8, 6), ((40 * i) % 256, (90 + 17 * i) % 256, 200)).save(b, "PNG")
    return b.getvalue()


def _split(start: int, n: int, captions=None):
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string")),
                               "cocoid": datasets.Value("int64")})
    caps = captions or [[f"caption {k} of image {start + i}" for k in range(2)] for i in range(n)]
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(start + i), "path": None} for i in range(n)], "text": caps,
         "cocoid": [100 + start + i for i in range(n)]},
        features=feats,
    )


@pytest.fixture
def saved(tmp_path):
    """A save_to_disk DatasetDict: 4 train images, 2 validation images, 2 captions each, images as bytes."""
    path = tmp_path / "ds"
    datasets.DatasetDict({"train": _split(0, 4), "validation": _split(10, 2)}).save_to_disk(str(path))
    return path


def _spec(**kw):
    from compressor.recipe.schema import DataSpec

    return DataSpec(format="hf", **kw)


def test_save_to_disk_splits_columns_and_bytes_images(saved):
    from compressor.data import load_section

    spec = _spec(columns={"caption": "text", "id": "cocoid"}, train={"path": str(saved), "split": "train"},
                 eval={"path": str(saved), "split": "validation"})
    train, ev = load_section(spec, "train"), load_section(spec, "eval")
    assert [ex.image_id for ex in train] == ["100", "101", "102", "103"]
    assert train[1].captions == ("caption 0 of image 1", "caption 1 of image 1")
    assert ev.references() == {"110": ["caption 0 of image 10", "caption 1 of image 10"],
                               "111": ["caption 0 of image 11", "caption 1 of image 11"]}
    assert train[0].image_path is None and train[0].fetch is not None
    im = train[2].load_image()
    assert im.size == (8, 6) and im.getpixel((0, 0)) == (80, 124, 200)  # the bytes of row 2, decoded on demand
    assert len(train.training_pairs()) == 8


def test_missing_column_names_it_and_the_columns_there(saved):
    from compressor.data import load_section
    from compressor.errors import UserInputError

    with pytest.raises(UserInputError) as e:
        load_section(_spec(columns={"caption": "caption"}, train={"path": str(saved), "split": "train"}), "train")
    msg = str(e.value)
    assert "data.columns.caption" in msg and "'caption'" in msg and "image, text, cocoid" in msg
    with pytest.raises(UserInputError, match="has splits train, validation: choose one"):
        load_section(_spec(train={"path": str(saved)}), "train")
    with pytest.raises(UserInputError, match="Did you mean 'validation'"):
        load_section(_spec(train={"path": str(saved), "split": "valid"}), "train")
    with pytest.raises(UserInputError, match="data.columns does not apply to format coco"):
        load_section(_spec(columns={"caption": "text"}, train={"path": str(saved), "split": "train"})
                     .model_copy(update={"format": "coco"}), "train")


def test_default_caption_column_and_parquet_file(saved, tmp_path):
    """``text`` is found without ``columns``; a Parquet file reads like the saved folder (same examples)."""
    from compressor.data import load_section

    pq = tmp_path / "train.parquet"
    _split(0, 4).to_parquet(str(pq))
    a = load_section(_spec(train={"path": str(saved), "split": "train"}), "train")
    b = load_section(_spec(train={"path": str(pq)}), "train")
    assert [ex.captions for ex in a] == [ex.captions for ex in b]
    assert [ex.image_id for ex in b] == ["0", "1", "2", "3"]  # no id column, no file name: the row number
    assert b[3].load_image().tobytes() == a[3].load_image().tobytes()


def test_repeated_rows_json_lines_with_paths_and_vqa(tmp_path):
    """One row per caption (COCO's layout) adds up by id; image paths resolve beside the file; VQA rows."""
    from PIL import Image

    from compressor.data import load_section

    (tmp_path / "im").mkdir()
    for n in ("a", "b"):
        Image.new("RGB", (4, 4), "red").save(tmp_path / "im" / f"{n}.png")
    rows = [{"image": "im/a.png", "caption": "first of a"}, {"image": "im/b.png", "caption": "only b"},
            {"image": "im/a.png", "caption": "second of a"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = load_section(_spec(train={"path": str(tmp_path / "c.jsonl")}), "train")
    assert [(ex.image_id, ex.captions) for ex in d] == [("a", ("first of a", "second of a")), ("b", ("only b",))]
    assert d[0].image_path == str(tmp_path / "im" / "a.png")
    q = [{"image": "im/a.png", "question": "what colour?", "answers": ["red", "red", "pink"]},
         {"image": "im/b.png", "question": "is it red?", "answers": [{"answer": "yes"}]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in q))
    v = load_section(_spec(task="vqa", test={"path": str(tmp_path / "q.jsonl")}), "test")
    assert [(ex.question, ex.answers, ex.question_id) for ex in v] == [
        ("what colour?", ("red", "red", "pink"), "a-0"), ("is it red?", ("yes",), "b-1")]


def test_fingerprint_follows_an_edited_caption_and_only_its_split(saved, tmp_path):
    from compressor.data import section_fingerprint

    spec = _spec(train={"path": str(saved), "split": "train"}, eval={"path": str(saved), "split": "validation"})
    before = {s: section_fingerprint(spec, s) for s in ("train", "eval")}
    assert before == {s: section_fingerprint(spec, s) for s in ("train", "eval")}  # stable
    caps = [[f"caption {k} of image {10 + i}" for k in range(2)] for i in range(2)]
    caps[1][0] = "an edited caption"
    edited = tmp_path / "ds2"
    datasets.DatasetDict({"train": _split(0, 4), "validation": _split(10, 2, caps)}).save_to_disk(str(edited))
    spec2 = _spec(train={"path": str(edited), "split": "train"}, eval={"path": str(edited), "split": "validation"})
    assert section_fingerprint(spec2, "eval") != before["eval"]
    assert section_fingerprint(spec2, "train") == before["train"]  # a copy of the same data elsewhere: same


def test_corrupt_image_bytes_are_bad_rows(tmp_path):
    from compressor.data import load_section
    from compressor.errors import DataError

    ds = _split(0, 3)
    ds = ds.cast_column("image", datasets.Image(decode=False)).map(
        lambda r, i: {"image": {"bytes": b"not an image" if i == 1 else r["image"]["bytes"], "path": None}},
        with_indices=True)
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="1 bad row"):
        load_section(_spec(train={"path": str(tmp_path / "bad")}), "train")
    d = load_section(_spec(train={"path": str(tmp_path / "bad")}, skip_invalid=True), "train")
    assert [ex.image_id for ex in d] == ["0", "2"] and len(d.skipped) == 1


def test_streaming_local_parquet_and_data_path_detection(saved, tmp_path):
    from compressor.data import infer_spec, load_section

    pq = tmp_path / "s.parquet"
    _split(0, 4).to_parquet(str(pq))
    d = load_section(_spec(train={"path": str(pq), "streaming": True, "limit": 2}), "train")
    assert len(d) == 2 and d[1].load_image().size == (8, 6)
    spec = infer_spec(str(saved / "validation"))  # a saved split folder: hf, not imagefolder
    assert spec.format == "hf" and spec.task == "caption"
    assert infer_spec(str(pq)).format == "hf"
