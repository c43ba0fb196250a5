"""Fixtures of the data tests: tiny image folders and annotation files written in tmp_path."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image


def _png(path, i: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), ((40 * i) % 256, (90 + 17 * i) % 256, 200)).save(path)


@pytest.fixture
def write_images():
    """write_images(folder, names) -> folder: small distinct PNGs."""

    def write(folder, names):
        for i, n in enumerate(names):
            _png(os.path.join(str(folder), n), i)
        return str(folder)

    return write


@pytest.fixture
def coco_dir(tmp_path, write_images):
    """A COCO captions file over 4 images with 2 captions each; returns (annotations, images)."""
    names = [f"{i:012d}.png" for i in (3, 10, 2, 7)]
    write_images(tmp_path / "imgs", names)
    images = [{"id": int(n[:-4]), "file_name": n} for n in names]
    anns = []
    for im in images:
        for k in range(2):
            anns.append(
                {"id": len(anns) + 1, "image_id": im["id"], "caption": f"caption {k} of image {im['id']}"}
            )
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    return str(ann), str(tmp_path / "imgs")


@pytest.fixture
def coco_spec(coco_dir):
    """coco_spec(section="test", **data_kwargs) -> DataSpec over `coco_dir`."""
    from compressor.recipe.schema import DataSpec

    ann, imgs = coco_dir

    def make(section="test", src_extra=None, **kw):
        return DataSpec(
            format="coco", **{section: {"annotations": ann, "images": imgs, **(src_extra or {})}}, **kw
        )

    return make
