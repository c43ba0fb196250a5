"""Loader workers (``data.num_workers``): training with 0 and 2 worker processes sees the same
batches in the same order (identical losses for a fixed seed), captioning gets the same images in
the same order (the loader's own generator seeds the workers, so dropout draws the same masks),
and the default leaves small machines without workers."""

from __future__ import annotations

from surgery_helpers import preset


def _losses(pairs, workers: int, seed: int, tmp_path) -> list[float]:
    from compressor.recipe.schema import TrainSpec
    from compressor.training import train
    from compressor.training_glue import batch_maker

    model, proc, _ = preset("tiny-blip2-opt")
    for n, p in model.named_parameters():
        p.requires_grad_("language_projection" in n or "qformer" in n)
    spec = TrainSpec(steps=3, batch_size=2, learning_rate=1e-3)
    result = train(model, batch_maker(model, proc, None), pairs, spec, seed=seed, device="cpu",
                   out_dir=tmp_path / f"w{workers}-{seed}", progress=False, num_workers=workers)
    assert result.extra["data_seconds"] >= 0
    return [loss for _, loss in result.losses]


def test_zero_and_two_workers_train_on_the_same_batches(tmp_path):
    from compressor.data.synthetic import synthetic_examples

    pairs = [(ex, ex.captions[0]) for ex in synthetic_examples(seed=0, size=10, image_size=32, task="caption")]
    base = _losses(pairs, 0, 0, tmp_path)
    assert len(set(base)) == len(base)  # every step sees other images: another order would show
    assert _losses(pairs, 2, 0, tmp_path) == base


class _PixelCaptioner:
    """Captions an image by its pixel sum (and the batch's position), so order and content both show."""

    def caption(self, images, prompts):
        import numpy as np

        return [f"{int(np.asarray(im).sum())}:{i}:{p}" for i, (im, p) in enumerate(zip(images, prompts))]


def test_zero_and_two_workers_caption_the_same_images_in_order():
    from compressor.data.synthetic import synthetic_examples
    from compressor.evaluation.harness import predict

    examples = synthetic_examples(seed=3, size=7, image_size=16, task="caption")
    one = predict(_PixelCaptioner(), examples, "caption", lambda ex: "", 2, num_workers=0)
    assert len(set(one.values())) == len(examples) and list(one) == [ex.image_id for ex in examples]
    two = predict(_PixelCaptioner(), examples, "caption", lambda ex: "", 2, num_workers=2)
    assert list(two.items()) == list(one.items())


def test_default_workers_are_a_share_of_the_cpus(monkeypatch):
    import os

    from compressor.data import workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert workers.resolve_workers(None) == 0 and workers.resolve_workers(3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert workers.resolve_workers(None) == workers.MAX_DEFAULT_WORKERS
