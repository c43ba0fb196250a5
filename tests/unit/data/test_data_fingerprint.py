"""The fingerprint: stable, cheap, equal to load_section's, and sensitive to what matters."""

from __future__ import annotations

import json
import os

from compressor.data import load_section, section_fingerprint
from compressor.recipe.schema import DataSpec


def test_stable_and_equal_to_load(coco_spec):
    spec = coco_spec()
    fp = section_fingerprint(spec, "test")
    assert len(fp) == 64 and fp == section_fingerprint(spec, "test")
    assert load_section(spec, "test").fingerprint == fp
    assert load_section(spec, "eval").fingerprint == fp  # same data through the fallback
    assert section_fingerprint(spec, "test", limit=2) == load_section(spec, "test", limit=2).fingerprint


def test_changes_on_annotation_edit(coco_spec, coco_dir):
    spec = coco_spec()
    before = section_fingerprint(spec, "test")
    ann = coco_dir[0]
    data = json.loads(open(ann).read())
    data["annotations"][0]["caption"] = "another caption"
    open(ann, "w").write(json.dumps(data))
    assert section_fingerprint(spec, "test") != before


def test_changes_on_image_touch_or_resize(coco_spec, coco_dir):
    spec = coco_spec()
    before = section_fingerprint(spec, "test")
    p = os.path.join(coco_dir[1], "000000000007.png")
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = section_fingerprint(spec, "test")
    assert touched != before
    assert load_section(spec, "test").fingerprint == touched
    with open(p, "ab") as f:  # a new size, same mtime
        f.write(b"\0")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert section_fingerprint(spec, "test") not in (before, touched)
    # an image outside the limit does not count
    limited = section_fingerprint(spec, "test", limit=2)  # ids 2, 3
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert section_fingerprint(spec, "test", limit=2) == limited


def test_changes_on_spec_change(coco_spec):
    base = section_fingerprint(coco_spec(), "test")
    assert section_fingerprint(coco_spec(src_extra={"limit": 3}), "test") != base
    assert section_fingerprint(coco_spec(skip_invalid=True), "test") != base
    assert section_fingerprint(coco_spec(), "test", limit=3) == section_fingerprint(
        coco_spec(src_extra={"limit": 3}), "test"
    )


def test_independent_of_cwd_and_folder_location(coco_dir, tmp_path, monkeypatch):
    import shutil

    abs_spec = DataSpec(format="coco", test={"annotations": coco_dir[0], "images": coco_dir[1]})
    fp = section_fingerprint(abs_spec, "test")
    monkeypatch.chdir(tmp_path)
    assert (
        section_fingerprint(
            DataSpec(format="coco", test={"annotations": "captions.json", "images": "imgs"}), "test"
        )
        == fp
    )
    shutil.copytree(tmp_path / "imgs", tmp_path / "copy" / "imgs", copy_function=shutil.copy2)
    shutil.copy2(coco_dir[0], tmp_path / "copy" / "captions.json")
    moved = DataSpec(format="coco", test={"annotations": "copy/captions.json", "images": "copy/imgs"})
    assert section_fingerprint(moved, "test") == fp


def test_synthetic_fingerprint():
    spec = DataSpec(format="synthetic", train={"size": 5, "seed": 1})
    fp = section_fingerprint(spec, "train")
    assert fp == load_section(spec, "train").fingerprint
    assert section_fingerprint(DataSpec(format="synthetic", train={"size": 5, "seed": 2}), "train") != fp
    assert section_fingerprint(DataSpec(format="synthetic", train={"size": 6, "seed": 1}), "train") != fp
    assert (
        section_fingerprint(
            DataSpec(format="synthetic", train={"size": 5, "seed": 1, "image_size": 32}), "train"
        )
        != fp
    )
    assert (
        section_fingerprint(DataSpec(format="synthetic", task="vqa", train={"size": 5, "seed": 1}), "train")
        != fp
    )
