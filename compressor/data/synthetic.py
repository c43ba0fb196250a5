"""The built-in synthetic "shapes" set: coloured shapes on a light background, with captions and QA.

Every image is a pure function of ``(seed, index)``: one or two large shapes (circle, square,
triangle) in distinct colours at named positions, and five template captions in plain lowercase
English ("a red circle on the left", "a picture of a red circle on the left and a blue square on
the right", ...). The vocabulary is small and fixed so that a tiny captioning model can learn it
in minutes; this is what the demo recipe and the tiny teacher train on.

For VQA, each image gives several questions ("what color is the circle?", "what shape is on the
left?", "is there a square?", "how many shapes are there?"), each answered ten times as VQA's
human answers are.

As the data format ``synthetic`` (its :data:`FORMAT`, registered in :mod:`compressor.data.formats`)
a section reads ``size`` images of ``seed``; it has no files, so ``--data PATH`` cannot name it.

Bump :data:`SYNTHETIC_VERSION` whenever a change here changes any image, caption or question;
it is part of every synthetic dataset's fingerprint.
"""

from __future__ import annotations

import hashlib
import random
from typing import NamedTuple

from PIL import Image, ImageDraw

from compressor.data.dataset import Example
from compressor.data.formats import Format
from compressor.data.formats.common import Parsed, Row
from compressor.errors import UserInputError

#: Version of the generator; part of the fingerprint of every synthetic dataset.
SYNTHETIC_VERSION = 1
#: Seed of a synthetic section without `seed`, by the section key it was read from: sections
#: never share images by accident.
SYNTHETIC_DEFAULT_SEED = {"train": 0, "val": 1, "test": 2, "eval": 3, "calibration": 4, "source": 0}

SHAPES = ("circle", "square", "triangle")
#: Colour name -> RGB, saturated so they stay distinct after downscaling to 32x32.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 0),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
POSITIONS = ("left", "right", "top", "bottom", "center")
#: Centre of each position, as fractions of the image side (x, y).
_CENTERS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
_PAIRS = (("left", "right"), ("top", "bottom"))
_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_COUNT_WORDS = {1: "one", 2: "two"}
ANSWER_REPEATS = 10


class Shape(NamedTuple):
    """One shape of a scene; lengths are fractions of the image side.

    Attributes:
        kind: ``circle``, ``square`` or ``triangle``.
        color: a key of :data:`COLORS`.
        position: a key of the position table (``left``, ``right``, ``top``, ``bottom``, ``center``).
        size: side (or diameter) as a fraction of the image side, 0.30-0.40.
        dx: horizontal offset of the centre from its position, fraction of the side.
        dy: vertical offset of the centre, fraction of the side.
    """

    kind: str
    color: str
    position: str
    size: float
    dx: float
    dy: float


class Scene(NamedTuple):
    """Everything needed to redraw one synthetic image, independent of its pixel size.

    Attributes:
        background: RGB of the light background, each channel 232-252.
        noise_seed: seed of the slight background noise (+-5 per channel).
        shapes: one shape, or two at a left/right or top/bottom pair of positions.
    """

    background: tuple[int, int, int]
    noise_seed: int
    shapes: tuple[Shape, ...]


def make_scene(seed: int, index: int) -> Scene:
    """The scene of image ``index`` of the set generated with ``seed`` (deterministic).

    Args:
        seed: generator seed (any int).
        index: image index, from 0.

    Returns:
        The scene. Two-shape scenes have distinct kinds and distinct colours, so every caption
        and question is unambiguous; shapes never overlap (each stays within its half).
    """
    digest = hashlib.sha256(f"shapes:{seed}:{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    background = tuple(rng.randint(232, 252) for _ in range(3))
    noise_seed = rng.getrandbits(31)
    if rng.random() < 0.5:
        placements = [(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(POSITIONS))]
    else:
        pair = rng.choice(_PAIRS)
        kinds = rng.sample(SHAPES, 2)
        colors = rng.sample(list(COLORS), 2)
        placements = list(zip(kinds, colors, pair, strict=True))
    shapes = []
    for kind, color, position in placements:
        size = round(rng.uniform(0.30, 0.40), 4)
        # Jitter along the axis that separates the pair is small (shapes stay in their half).
        along, across = round(rng.uniform(-0.04, 0.04), 4), round(rng.uniform(-0.08, 0.08), 4)
        if position in ("left", "right"):
            dx, dy = along, across
        elif position in ("top", "bottom"):
            dx, dy = across, along
        else:
            dx, dy = along, round(rng.uniform(-0.04, 0.04), 4)
        shapes.append(Shape(kind, color, position, size, dx, dy))
    return Scene(background, noise_seed, tuple(shapes))  # type: ignore[arg-type]


def render_shapes(params: Scene | tuple, image_size: int = 64) -> Image.Image:
    """Draw a scene.

    Args:
        params: a :class:`Scene` (or the plain tuple it is equal to, as stored in
            ``Example.render``).
        image_size: side of the square image, pixels.

    Returns:
        An RGB image of ``image_size`` x ``image_size`` pixels; the same parameters always give
        the same pixels.
    """
    import numpy as np

    background, noise_seed, shapes = params
    rng = np.random.default_rng(noise_seed)
    noise = rng.integers(-5, 6, size=(image_size, image_size, 3))
    pixels = np.clip(np.asarray(background, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for kind, color, position, size, dx, dy in shapes:
        cx0, cy0 = _CENTERS[position]
        cx, cy = (cx0 + dx) * image_size, (cy0 + dy) * image_size
        half = size * image_size / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[color]
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        elif kind == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        else:  # pragma: no cover - scenes come from make_scene
            raise ValueError(f"unknown shape kind {kind!r}")
    return image


def captions_for(scene: Scene) -> tuple[str, ...]:
    """Five reference captions of a scene, from fixed templates.

    Args:
        scene: the scene.

    Returns:
        Five lowercase captions, e.g. ``"a red circle on the left"``,
        ``"there is a red circle on the left of the image"``.
    """
    bare = [f"{s.color} {s.kind} {_PHRASE[s.position]}" for s in scene.shapes]
    parts = [("an " if b[0] in "aeiou" else "a ") + b for b in bare]  # "an orange square"
    if len(parts) == 1:
        (p,) = parts
        return (
            p,
            f"there is {p} of the image",
            f"a picture of {p}",
            f"one {bare[0]}",
            f"a single {bare[0]}",
        )
    first, second = parts
    return (
        f"{first} and {second}",
        f"there is {first} and {second}",
        f"a picture of {first} and {second}",
        f"two shapes with {first} and {second}",
        f"{second} and {first}",
    )


def questions_for(scene: Scene) -> list[tuple[str, str]]:
    """Question/answer pairs about a scene.

    Args:
        scene: the scene.

    Returns:
        ``(question, answer)`` pairs: the colour of each shape, the shape at each position,
        whether a present and an absent shape kind exist, and how many shapes there are.
    """
    qa: list[tuple[str, str]] = []
    for s in scene.shapes:
        qa.append((f"what color is the {s.kind}?", s.color))
    for s in scene.shapes:
        qa.append((f"what shape is {_PHRASE[s.position]}?", s.kind))
    present = [s.kind for s in scene.shapes]
    absent = [k for k in SHAPES if k not in present]
    qa.append((f"is there a {present[0]}?", "yes"))
    # Which absent kind is asked about is fixed by the scene, not random.
    qa.append((f"is there a {absent[scene.noise_seed % len(absent)]}?", "no"))
    qa.append(("how many shapes are there?", _COUNT_WORDS[len(scene.shapes)]))
    return qa


def synthetic_examples(seed: int, size: int, image_size: int, task: str) -> list[Example]:
    """The examples of a synthetic set, in image order.

    Args:
        seed: generator seed.
        size: number of images.
        image_size: side of the images, pixels.
        task: ``"caption"`` (one example per image, five captions) or ``"vqa"`` (one example
            per question, each answer repeated :data:`ANSWER_REPEATS` times).

    Returns:
        The examples; image ids are ``"syn-<seed>-<i>"``, question ids ``"syn-<seed>-<i>-q<k>"``.
    """
    out: list[Example] = []
    for i in range(size):
        scene = make_scene(seed, i)
        image_id = f"syn-{seed}-{i}"
        render = (image_size, scene)
        if task == "vqa":
            for k, (q, a) in enumerate(questions_for(scene)):
                out.append(
                    Example(
                        image_id=image_id,
                        question=q,
                        answers=(a,) * ANSWER_REPEATS,
                        question_id=f"{image_id}-q{k}",
                        render=render,
                    )
                )
        else:
            out.append(Example(image_id=image_id, captions=captions_for(scene), render=render))
    return out


def write_files(folder, size: int, seed: int, image_size: int = 64, task: str = "caption", labelled: bool = True):
    """Write a synthetic set to disk in a file format, for commands that take ``--data PATH``.

    Captioning: a COCO captions file ``captions_shapes.json`` (integer ids 0..size-1, five
    captions per image) with the PNGs in ``shapes/`` (the COCO naming: ``captions_val2017.json``
    beside ``val2017/``, so ``--data FOLDER/captions_shapes.json`` finds the images). VQA:
    ``questions.csv`` (``image_name,question,answer`` with the ten human answers
    ``|``-separated, and a ``question_id`` column) with the PNGs beside it.

    Args:
        folder: where to write (created).
        size: number of images.
        seed: generator seed (the images and captions of :func:`synthetic_examples`).
        image_size: side of the images, pixels.
        task: ``"caption"`` or ``"vqa"``.
        labelled: False leaves out the captions (annotations ``[]``) or answers (no column).

    Returns:
        The annotation file written (``captions_shapes.json`` or ``questions.csv``).
    """
    import csv
    import json
    from pathlib import Path

    root = Path(folder)
    image_dir = root if task == "vqa" else root / "shapes"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, rows = [], [], []
    for i in range(size):
        scene = make_scene(seed, i)
        name = f"{seed}_{i:05d}.png"
        render_shapes(scene, image_size).save(image_dir / name)
        images.append({"id": i, "file_name": name})
        if task == "vqa":
            for k, (q, a) in enumerate(questions_for(scene)):
                rows.append([name, q, "|".join([a] * ANSWER_REPEATS), f"{i}-q{k}"])
        elif labelled:
            annotations += [{"id": len(annotations), "image_id": i, "caption": c} for c in captions_for(scene)]
    if task == "vqa":
        path = root / "questions.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image_name", "question", "answer", "question_id"] if labelled else ["image_name", "question", "question_id"])
            for name, q, a, qid in rows:
                w.writerow([name, q, a, qid] if labelled else [name, q, qid])
        return path
    path = root / "captions_shapes.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# the ``synthetic`` data format (registered in compressor.data.formats)
# ------------------------------------------------------------------------------------------


def _settings(resolved) -> dict:
    """A synthetic section's settings after defaults (they enter its fingerprint).

    ``size`` (required), ``seed`` (default: by section, :data:`SYNTHETIC_DEFAULT_SEED`),
    ``image_size`` and :data:`SYNTHETIC_VERSION`.

    Raises:
        UserInputError: ``size`` is not set.
    """
    src, key = resolved.src, resolved.key
    if src.size is None:
        raise UserInputError(
            f"{key}.size is required for format synthetic: e.g. `{key}: {{size: 200, seed: 1}}`"
        )
    default_seed = SYNTHETIC_DEFAULT_SEED["source" if resolved.part else resolved.name]
    return {
        "size": src.size,
        "seed": src.seed if src.seed is not None else default_seed,
        "image_size": src.image_size,
        "synthetic_version": SYNTHETIC_VERSION,
    }


def _read(src, key: str, task: str, settings: dict) -> Parsed:
    """The rows of a synthetic section: :func:`synthetic_examples` of ``settings`` (never a bad row)."""
    exs = synthetic_examples(settings["seed"], settings["size"], settings["image_size"], task)
    return Parsed(rows=[Row(e, f"synthetic {e.question_id or e.image_id}") for e in exs])


FORMAT = Format(
    name="synthetic",
    description="the built-in coloured-shapes set, generated (`size`, `seed`, `image_size`)",
    fields=frozenset({"size", "seed", "image_size", "limit"}),
    example="{size: 200, seed: 1}",
    read=_read,
    settings=_settings,
)
