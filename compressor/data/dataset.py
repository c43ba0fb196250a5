"""The in-memory data types every stage consumes: :class:`Example` and :class:`Dataset`.

An :class:`Example` is one image with its references: every caption of the image for the
``caption`` task, or one question with its human answers for the ``vqa`` task (so an image with
five questions gives five examples sharing one ``image_id``). Images are not decoded when a
dataset is loaded; :meth:`Example.load_image` opens (or, for the synthetic set, renders) them on
demand.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from PIL import Image

from compressor.errors import DataError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DIGITS = re.compile(r"(\d+)")


def natural_key(image_id: str) -> tuple:
    """Sort key that orders ids the way people read them: ``"9" < "10"``, ``"syn-0-2" < "syn-0-10"``.

    Used for every "sorted by image id" in this package, so COCO's numeric ids sort numerically.

    Args:
        image_id: any string id.

    Returns:
        A tuple comparable with the key of any other string (text and numbers alternate at
        fixed positions), with the raw string last as a tie-breaker (``"0139"`` vs ``"139"``).
    """
    parts = _DIGITS.split(image_id)
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), image_id)


@dataclass(frozen=True)
class Example:
    """One image with its references (captioning), or one question about an image (VQA).

    Attributes:
        image_id: stable id: the COCO image id as a string, the path of the file relative to the
            image folder without its extension for csv/imagefolder (the file stem for files at
            the top of the folder), ``"syn-<seed>-<i>"`` for the synthetic set.
        captions: reference captions (empty for unlabelled data and for VQA).
        question: the question (VQA), else None.
        answers: the human answers to ``question`` (VQA; may repeat, as VQA's 10 answers do).
        question_id: unique per question (VQA): the file's own id, else ``<image_id>-<row>``.
        image_path: absolute path of the image file, or None for synthetic images.
        render: synthetic images: ``(image_size, scene)``, hashable parameters that regenerate
            the image with :func:`compressor.data.synthetic.render_shapes`.
    """

    image_id: str
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()
    question_id: str | None = None
    image_path: str | None = None
    render: tuple | None = None

    def load_image(self) -> Image.Image:
        """Open (or render) the image.

        Returns:
            An RGB ``PIL.Image.Image`` (file images at their stored size; synthetic ones
            ``image_size`` x ``image_size`` pixels).

        Raises:
            DataError: the file cannot be read or decoded (for instance truncated after the
                header check at load time passed), or the example has neither a path nor
                render parameters.
        """
        if self.render is not None:
            from compressor.data.synthetic import render_shapes

            image_size, scene = self.render
            return render_shapes(scene, image_size)
        if self.image_path is None:
            raise DataError(f"example {self.image_id!r} has no image file and no render parameters")
        try:
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(
                "cannot decode an image; replace the file or remove its rows (data.skip_invalid: true skips "
                "it; data.verify_images: decode finds every such image before the run starts)",
                [f"{self.image_path} (image_id={self.image_id}): {e}"],
            ) from e

    @property
    def target(self) -> str | None:
        """The single training target: the first caption, or the most common answer (VQA).

        Returns:
            The text, or None for an unlabelled example.
        """
        if self.question is not None:
            return most_common(self.answers)
        return self.captions[0] if self.captions else None

    @property
    def labelled(self) -> bool:
        """True when the example has references (captions, or answers for VQA)."""
        return bool(self.answers) if self.question is not None else bool(self.captions)


def most_common(answers: Sequence[str]) -> str | None:
    """The most frequent answer; ties go to the one given first (deterministic).

    Args:
        answers: human answers, possibly repeated.

    Returns:
        The answer, or None when there is none.
    """
    if not answers:
        return None
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


@dataclass
class Dataset:
    """The examples of one data section, in a stable order (sorted by image id).

    Attributes:
        section: the section that was asked for (``train``, ``val``, ``eval``, ``test``,
            ``calibration``).
        examples: the examples, sorted by image id (natural order), then by row of the file.
        task: ``"caption"`` or ``"vqa"``.
        skipped: one human-readable line per row skipped because ``data.skip_invalid`` is true
            (``"<file> line 4 (image_name=b.png): <what is wrong> (<detail>)"``): bad annotation
            rows of the whole file (checked before any split or limit), plus the examples of
            this section whose image is missing or unreadable.
        fingerprint: sha256 hex digest identifying this data (see
            :func:`compressor.data.section_fingerprint`).
        resolved: where the data came from after fallbacks, e.g. ``"data.test"`` or
            ``"data.source[val]"``.
        skip_invalid: an image that fails to decode in :meth:`load_image` is skipped (its
            examples leave ``examples``, a line joins ``skipped``) instead of raising.
    """

    section: str
    examples: list[Example]
    task: str
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""
    resolved: str = ""
    skip_invalid: bool = False

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def load_image(self, ex: Example) -> Image.Image | None:
        """``ex.load_image()``; with ``skip_invalid``, None for an image that cannot be decoded, whose
        examples are then dropped from this dataset and counted in ``skipped`` (once per image).

        Raises:
            DataError: the image cannot be decoded and ``skip_invalid`` is off.
        """
        try:
            return ex.load_image()
        except DataError as e:
            if not self.skip_invalid:
                raise
            gone = [x for x in self.examples if x.image_path == ex.image_path and x.render == ex.render]
            if gone:
                self.examples = [x for x in self.examples if not (x.image_path == ex.image_path and x.render == ex.render)]
                line = e.rows[0] if e.rows else f"{ex.image_path} (image_id={ex.image_id}): {e}"
                self.skipped.append(line)
                logger.warning("%s: skipped %d example(s) whose image cannot be decoded (skip_invalid is on): %s",
                               self.resolved or self.section, len(gone), line)
            return None

    @property
    def image_ids(self) -> list[str]:
        """Distinct image ids in order of first appearance."""
        return list(dict.fromkeys(ex.image_id for ex in self.examples))

    @property
    def labelled(self) -> bool:
        """True when at least one example has references (captions or answers)."""
        return any(ex.labelled for ex in self.examples)

    def references(self) -> dict[str, list[str]]:
        """The references a metric scores against.

        Returns:
            Caption task: ``image_id -> captions`` (every caption of the image, file order).
            VQA task: ``question_id -> answers`` (the human answers, repeats kept).
        """
        if self.task == "vqa":
            return {ex.question_id: list(ex.answers) for ex in self.examples if ex.question_id is not None}
        refs: dict[str, list[str]] = {}
        for ex in self.examples:
            refs.setdefault(ex.image_id, []).extend(ex.captions)
        return refs

    def training_pairs(self) -> list[tuple[Example, str]]:
        """``(example, target text)`` pairs to train on.

        Returns:
            One pair per caption for captioning (so an image with 5 captions appears 5 times);
            one pair per question with its most common answer (ties: the first given) for VQA.
            Unlabelled examples give no pair.
        """
        pairs: list[tuple[Example, str]] = []
        for ex in self.examples:
            if ex.question is not None:
                t = most_common(ex.answers)
                if t is not None:
                    pairs.append((ex, t))
            else:
                pairs.extend((ex, c) for c in ex.captions)
        return pairs


def load_images(examples: Iterable[Example]) -> list[Image.Image]:
    """Open the images of several examples, in order.

    Args:
        examples: the examples (an image shared by several VQA examples is opened once per example).

    Returns:
        RGB images, one per example.

    Raises:
        DataError: an image cannot be decoded.
    """
    return [ex.load_image() for ex in examples]


def batches(seq: Sequence[T], n: int) -> Iterator[list[T]]:
    """Consecutive slices of ``seq`` of length ``n`` (the last may be shorter).

    Args:
        seq: any sequence.
        n: batch size, at least 1.

    Yields:
        Lists of at most ``n`` items, in order.

    Raises:
        ValueError: ``n`` is smaller than 1.
    """
    if n < 1:
        raise ValueError(f"batch size must be at least 1, got {n}")
    for i in range(0, len(seq), n):
        yield list(seq[i : i + n])
