"""The shipped teacher really captions the shapes: CIDEr ≥ 50 on held-out images, and a shuffled
control (captions scored against other images' references) scores less than half of that."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def teacher_predictions():
    from compressor.data import load_section
    from compressor.evaluation.captioner import TorchCaptioner
    from compressor.models.loading import load_model, materialize
    from compressor.recipe.schema import DataSpec, GenerationSpec

    resolved = materialize("shapes-teacher", cache_dir=None)
    model, processor = load_model(resolved.path)
    # seed 7777: no training recipe of the project uses it (teacher 100, demo 300)
    data = load_section(DataSpec(format="synthetic", eval={"size": 64, "seed": 7777}), "eval")
    cap = TorchCaptioner(model, processor, GenerationSpec(max_new_tokens=20, batch_size=32))
    preds = dict(zip([ex.image_id for ex in data.examples], cap.caption([ex.load_image() for ex in data.examples])))
    return preds, data.references()


def test_teacher_cider_on_held_out_images(teacher_predictions):
    from eval.captioning import score_captions

    preds, refs = teacher_predictions
    true = score_captions(preds, refs, ["cider"]).metrics["cider"]
    ids = list(refs)
    shuffled_ids = ids[:]
    random.Random(0).shuffle(shuffled_ids)
    control = score_captions({a: preds[b] for a, b in zip(ids, shuffled_ids)}, refs, ["cider"]).metrics["cider"]
    assert true >= 50, true
    assert control < true / 2, (true, control)
    assert len(set(preds.values())) >= 20  # the captions follow the images
