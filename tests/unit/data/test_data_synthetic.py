"""The synthetic shapes set: deterministic, varied, and its captions/answers match its pixels."""

from __future__ import annotations

import numpy as np

from compressor.data import SYNTHETIC_VERSION, load_section, make_scene, render_shapes
from compressor.data.synthetic import COLORS, SHAPES, captions_for
from compressor.recipe.schema import DataSpec


def _spec(task="caption", **src):
    return DataSpec(format="synthetic", task=task, train={"size": 40, "seed": 0, **src})


def test_deterministic_across_calls():
    a, b = load_section(_spec(), "train"), load_section(_spec(), "train")
    assert a.examples == b.examples and a.fingerprint == b.fingerprint
    assert isinstance(SYNTHETIC_VERSION, int)
    for ex_a, ex_b in zip(a.examples[:5], b.examples[:5], strict=True):
        assert np.array_equal(np.asarray(ex_a.load_image()), np.asarray(ex_b.load_image()))
    assert [e.image_id for e in a][:3] == ["syn-0-0", "syn-0-1", "syn-0-2"]
    assert [e.image_id for e in a][-1] == "syn-0-39"  # natural order


def test_seeds_differ_and_default_seeds_differ_by_section():
    a = load_section(_spec(seed=0), "train")
    b = load_section(_spec(seed=1), "train")
    assert [e.captions for e in a] != [e.captions for e in b]
    spec = DataSpec(format="synthetic", train={"size": 10}, eval={"size": 10})
    assert [e.captions for e in load_section(spec, "train")] != [
        e.captions for e in load_section(spec, "eval")
    ]


def test_images_differ_and_are_sized():
    ds = load_section(_spec(image_size=48), "train")
    arrays = [np.asarray(e.load_image(), dtype=np.int16) for e in ds.examples[:12]]
    assert all(a.shape == (48, 48, 3) for a in arrays)
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.abs(arrays[i] - arrays[j]).mean() > 1.0


def _pixels_of(color, arr):
    return np.all(np.abs(arr - np.array(COLORS[color], dtype=np.int16)) <= 2, axis=-1)


def test_captions_mention_colour_and_shape_and_pixels_agree():
    counts = {1: 0, 2: 0}
    for i in range(60):
        scene = make_scene(7, i)
        caps = captions_for(scene)
        assert len(caps) == 5 and len(set(caps)) == 5
        assert all(c == c.lower() for c in caps)
        counts[len(scene.shapes)] += 1
        arr = np.asarray(render_shapes(scene, 64), dtype=np.int16)
        for s in scene.shapes:
            assert s.kind in SHAPES and s.size >= 0.25
            assert all(s.color in c and s.kind in c for c in caps)
            mask = _pixels_of(s.color, arr)
            ys, xs = np.nonzero(mask)
            assert mask.sum() > 0.25 * (0.25 * 64) ** 2  # large enough to see at 32x32
            cx, cy = xs.mean() / 64, ys.mean() / 64
            expected = {
                "left": cx < 0.45,
                "right": cx > 0.55,
                "top": cy < 0.45,
                "bottom": cy > 0.55,
                "center": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1,
            }[s.position]
            assert expected, (s, cx, cy)
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            assert {a.position, b.position} in ({"left", "right"}, {"top", "bottom"})
            assert a.kind != b.kind and a.color != b.color
    assert counts[1] > 10 and counts[2] > 10


def test_vqa_answers_match_render_params():
    ds = load_section(_spec(task="vqa"), "train")
    assert ds.task == "vqa"
    by_image: dict[str, list] = {}
    for ex in ds:
        by_image.setdefault(ex.image_id, []).append(ex)
        assert len(ex.answers) == 10 and len(set(ex.answers)) == 1
    assert len(by_image) == 40
    assert len({ex.question_id for ex in ds}) == len(ds)
    for exs in by_image.values():
        _, scene = exs[0].render
        kinds = {s.kind: s for s in scene.shapes}
        positions = {s.position: s for s in scene.shapes}
        assert len(exs) >= 5
        for ex in exs:
            q, a = ex.question, ex.answers[0]
            if q.startswith("what color is the "):
                assert kinds[q.removeprefix("what color is the ").rstrip("?")].color == a
            elif q.startswith("what shape is "):
                pos = q.removeprefix("what shape is ").rstrip("?").split()[-1]
                assert positions[pos].kind == a
            elif q.startswith("is there a "):
                assert a == ("yes" if q.removeprefix("is there a ").rstrip("?") in kinds else "no")
            else:
                assert q == "how many shapes are there?" and a == ["one", "two"][len(scene.shapes) - 1]
        assert {ex.answers[0] for ex in exs if ex.question.startswith("is there")} == {"yes", "no"}
    assert all(t in ("yes", "no", "one", "two", *COLORS, *SHAPES) for _, t in ds.training_pairs())

