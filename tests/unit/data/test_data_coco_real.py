"""The real COCO mini set, when this machine has it (never required)."""

from __future__ import annotations

import os

import pytest

from compressor.data import infer_spec, load_section
from compressor.recipe.schema import DataSpec

COCO_MINI = os.environ.get("VLM_COMPRESS_COCO_MINI", "/work/shared/data/coco-mini")


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(COCO_MINI, "captions_val2017.json")), reason="coco-mini not present"
)
def test_real_coco_val2017():
    spec = DataSpec(
        format="coco",
        eval={
            "annotations": os.path.join(COCO_MINI, "captions_val2017.json"),
            "images": os.path.join(COCO_MINI, "val2017"),
        },
    )
    ds = load_section(spec, "eval")
    assert len(ds) == 159 and ds.skipped == []
    assert all(len(e.captions) >= 5 for e in ds)
    ids = [int(e.image_id) for e in ds]
    assert ids == sorted(ids)
    im = ds[0].load_image()
    assert im.mode == "RGB" and min(im.size) > 100


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(COCO_MINI, "captions_val2017.json")), reason="coco-mini not present"
)
def test_infer_spec_finds_the_sibling_image_folder():
    spec = infer_spec(os.path.join(COCO_MINI, "captions_train2017.json"), limit=10)
    assert spec.format == "coco" and spec.test.images == os.path.join(COCO_MINI, "train2017")
    assert len(load_section(spec, "eval")) == 10
