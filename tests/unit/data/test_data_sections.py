"""Sections, fallbacks, splitting a `source` by image, and limits."""

from __future__ import annotations

import pytest

from compressor.data import available_sections, load_section, resolve_section, split_image_ids
from compressor.errors import UserInputError
from compressor.recipe.schema import DataSpec


def _vqa_source(tmp_path, write_images, n_images=20, q_per_image=3):
    names = [f"img{i}.png" for i in range(n_images)]
    write_images(tmp_path / "im", names)
    lines = ["image_name,question,answer"]
    for n in names:
        lines += [f"{n},question {k} about {n}?,answer {k}" for k in range(q_per_image)]
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n")
    return {"annotations": str(tmp_path / "q.csv"), "images": str(tmp_path / "im")}


def test_split_by_image_is_disjoint_complete_and_deterministic(tmp_path, write_images):
    src = _vqa_source(tmp_path, write_images)
    spec = DataSpec(
        format="csv", task="vqa", source=src, split={"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3}
    )
    parts = {s: load_section(spec, s) for s in ("train", "val", "test")}
    ids = {s: {e.image_id for e in d} for s, d in parts.items()}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert (
        not (ids["train"] & ids["val"])
        and not (ids["train"] & ids["test"])
        and not (ids["val"] & ids["test"])
    )
    assert set().union(*ids.values()) == {f"img{i}" for i in range(20)}
    # every question of an image is on the same side
    assert all(len(d) == 3 * len(ids[s]) for s, d in parts.items())
    again = load_section(spec, "val")
    assert [e.question_id for e in again] == [e.question_id for e in parts["val"]]
    assert parts["val"].resolved == "data.source[val]"
    # another seed gives another split
    other = spec.model_copy(update={"split": spec.split.model_copy(update={"seed": 4})})
    assert {e.image_id for e in load_section(other, "val")} != ids["val"]
    # eval falls back to the test share, calibration to the train share
    assert {e.image_id for e in load_section(spec, "eval")} == ids["test"]
    assert {e.image_id for e in load_section(spec, "calibration")} == ids["train"]


def test_split_ignores_input_order():
    ids = [f"x{i}" for i in range(50)]
    a = split_image_ids(ids, {"train": 0.8, "val": 0.1, "test": 0.1}, 0)
    b = split_image_ids(list(reversed(ids)) + ids[:5], {"train": 0.8, "val": 0.1, "test": 0.1}, 0)
    assert a == b and [len(a[k]) for k in ("train", "val", "test")] == [40, 5, 5]


def test_zero_test_fraction_falls_back_to_val(tmp_path, write_images):
    src = _vqa_source(tmp_path, write_images, n_images=10, q_per_image=1)
    spec = DataSpec(format="csv", task="vqa", source=src, split={"train": 0.7, "val": 0.3, "test": 0.0})
    assert available_sections(spec) == ["train", "val", "eval", "calibration"]
    assert load_section(spec, "eval").resolved == "data.source[val]"
    with pytest.raises(UserInputError, match=r"no data for section 'test'.*Add `data.test:"):
        load_section(spec, "test")


def test_limit_takes_first_after_sorting_and_the_smaller_wins(tmp_path, write_images):
    src = _vqa_source(tmp_path, write_images, n_images=12, q_per_image=2)
    spec = DataSpec(format="csv", task="vqa", test={**src, "limit": 5})
    ds = load_section(spec, "test")
    assert [e.question_id for e in ds] == ["img0-0", "img0-1", "img1-2", "img1-3", "img2-4"]
    assert len(load_section(spec, "test", limit=3)) == 3
    assert len(load_section(spec, "test", limit=50)) == 5
    full = load_section(DataSpec(format="csv", task="vqa", test=src), "test")
    assert [e.image_id for e in full][-2:] == ["img11", "img11"]  # natural order: img2 < img10


def test_fallbacks(coco_spec):
    spec = coco_spec("val")
    assert resolve_section(spec, "eval").name == "val"
    assert load_section(spec, "eval").section == "eval"
    assert available_sections(spec) == ["val", "eval"]
    spec = coco_spec("train")
    assert available_sections(spec) == ["train", "calibration"]
    assert load_section(spec, "calibration").resolved == "data.train"


def test_missing_section_names_the_key_to_add(coco_spec):
    spec = coco_spec("train")
    with pytest.raises(
        UserInputError, match=r"looked for data.eval, data.test, data.val.*Add `data.eval: \{annotations:"
    ):
        load_section(spec, "eval")
    with pytest.raises(UserInputError, match=r"Add `data.val:"):
        load_section(spec, "val")
    with pytest.raises(UserInputError, match="Did you mean 'eval'"):
        load_section(spec, "evl")
    syn = DataSpec(format="synthetic", train={"size": 3})
    with pytest.raises(UserInputError, match=r"Add `data.test: \{size: 200, seed: 1\}`"):
        load_section(syn, "test")
