"""Loading a section of the recipe's data: fallbacks, splitting, limits, validation, fingerprints.

A section (``train``, ``val``, ``eval``, ``test``, ``calibration``) is read from, in order:

1. its own key, ``data.<section>``;
2. for ``train`` / ``val`` / ``test``: its share of ``data.source`` divided by ``data.split``
   (by image, so all captions and questions of an image land on one side; seeded; the image
   ids are sorted before shuffling, so the split depends only on the ids and the seed);
3. a fallback: ``eval`` → ``test`` → ``val``, ``calibration`` → ``train`` (each through 1-2).

Then the examples are sorted by image id (natural order: ``"9" < "10"``) and cut to ``limit``
(the smaller of the section's ``limit`` and the caller's), and the images of the examples kept
are checked cheaply (the file exists and PIL can open and verify its header), once per load.

Bad rows (a missing or unreadable image, a file name escaping the image folder, an empty caption
or question, an annotation for an unknown image id, a duplicate image entry) raise
:class:`~compressor.errors.DataError` listing every one of them, or, with ``data.skip_invalid:
true``, are skipped with a warning and listed in :attr:`Dataset.skipped`. Annotation rows are
checked over the whole file (they cost nothing to check); images only for the examples loaded.
Problems with the file itself (not found, not JSON, missing CSV columns) are never skippable.

The fingerprint (sha256) covers the loader version, the format, the task, ``skip_invalid``, the
section's settings after defaults (split part and fractions, limit, Karpathy split, synthetic
seed/size/image_size and :data:`~compressor.data.synthetic.SYNTHETIC_VERSION`), the bytes of the
annotation files, and, for every image of the examples loaded, its path relative to the image
folder, its size and its mtime_ns: not its pixels, so fingerprinting a 100k-image set costs one
``stat`` per image. The folders' absolute locations are not part of it: a copy of the data
(``cp -p``, ``rsync -a``) elsewhere has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from compressor.data import formats
from compressor.data.dataset import Dataset, Example, natural_key
from compressor.data.formats import CORRUPT_IMAGE, MISSING_IMAGE, Parsed, Problem, Row
from compressor.errors import DataError, UserInputError

if TYPE_CHECKING:
    from compressor.recipe.schema import DataSource, DataSpec

logger = logging.getLogger(__name__)

#: Bump when a change in this package changes what a given spec loads (enters every fingerprint).
DATA_LOADER_VERSION = 1

SECTIONS = ("train", "val", "eval", "test", "calibration")
#: Where a section looks for its data, in order.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val",),
    "eval": ("eval", "test", "val"),
    "test": ("test",),
    "calibration": ("calibration", "train"),
}
#: Seed of a synthetic section without `seed`, by the section key it was read from: sections
#: never share images by accident.
SYNTHETIC_DEFAULT_SEED = {"train": 0, "val": 1, "test": 2, "eval": 3, "calibration": 4, "source": 0}
#: DataSource fields each format reads (others set in the recipe are an error).
FORMAT_FIELDS = {
    "coco": {"annotations", "images", "limit"},
    "karpathy": {"annotations", "images", "split", "limit"},
    "csv": {"annotations", "images", "limit"},
    "imagefolder": {"path", "limit"},
    "synthetic": {"size", "seed", "image_size", "limit"},
}
_EXAMPLE_SECTION = {
    "coco": "{annotations: captions_val2017.json, images: val2017/}",
    "karpathy": "{annotations: dataset_coco.json, images: coco/, split: test}",
    "csv": "{annotations: data.csv, images: images/}",
    "imagefolder": "{path: images/}",
    "synthetic": "{size: 200, seed: 1}",
}


@dataclass(frozen=True)
class Resolved:
    """Where a section's data comes from.

    Attributes:
        name: the section key read (``test`` when ``eval`` fell back to it).
        src: the DataSource.
        part: ``train`` / ``val`` / ``test`` when the data is a share of ``data.source``, else None.
    """

    name: str
    src: DataSource
    part: str | None

    @property
    def key(self) -> str:
        """The recipe key, e.g. ``data.test`` or ``data.source``."""
        return "data.source" if self.part else f"data.{self.name}"

    @property
    def label(self) -> str:
        """Human-readable origin, e.g. ``data.test`` or ``data.source[val]``."""
        return f"data.source[{self.part}]" if self.part else f"data.{self.name}"


def _direct(spec: DataSpec, name: str) -> Resolved | None:
    src = getattr(spec, name, None)
    if src is not None:
        return Resolved(name, src, None)
    if spec.source is not None and spec.split is not None and name in ("train", "val", "test"):
        if getattr(spec.split, name) > 0:
            return Resolved(name, spec.source, name)
    return None


def resolve_section(spec: DataSpec, section: str) -> Resolved:
    """Find the data a section reads, following the fallbacks.

    Args:
        spec: the recipe's ``data``.
        section: ``train``, ``val``, ``eval``, ``test`` or ``calibration``.

    Returns:
        The resolved source.

    Raises:
        UserInputError: an unknown section name, or no data for it (the message names the
            recipe key to add).
    """
    if section not in FALLBACKS:
        from compressor.errors import did_you_mean

        raise UserInputError(
            f"unknown data section '{section}'.{did_you_mean(section, SECTIONS)} Valid: {', '.join(SECTIONS)}"
        )
    for name in FALLBACKS[section]:
        r = _direct(spec, name)
        if r is not None:
            if name != section:
                logger.info("data.%s is not set; using %s", section, r.label)
            return r
    looked = ", ".join(f"data.{n}" for n in FALLBACKS[section])
    extra = (
        " (or a share of data.source via data.split)" if section in ("train", "val", "test", "eval") else ""
    )
    raise UserInputError(
        f"the recipe has no data for section '{section}': looked for {looked}{extra}. "
        f"Add `data.{section}: {_EXAMPLE_SECTION[spec.format]}` to the recipe."
    )


def available_sections(spec: DataSpec) -> list[str]:
    """The sections :func:`load_section` can load, fallbacks included.

    Args:
        spec: the recipe's ``data``.

    Returns:
        Section names in the order ``train, val, eval, test, calibration``; e.g. a spec with only
        ``train`` gives ``["train", "calibration"]``.
    """
    return [s for s in SECTIONS if any(_direct(spec, n) is not None for n in FALLBACKS[s])]


def _check_fields(spec: DataSpec, r: Resolved) -> None:
    allowed = FORMAT_FIELDS[spec.format]
    extra = sorted(f for f in r.src.model_fields_set if f not in allowed and getattr(r.src, f) is not None)
    if extra:
        raise UserInputError(
            f"{r.key}: {', '.join(extra)} do(es) not apply to format {spec.format} "
            f"(it reads {', '.join(sorted(allowed))}); e.g. `{r.key}: {_EXAMPLE_SECTION[spec.format]}`"
            + (
                ". To divide one file, use data.source with data.split: {train: 0.8, val: 0.1, test: 0.1}"
                if "split" in extra
                else ""
            )
        )


def _effective(spec: DataSpec, r: Resolved) -> dict:
    """The section's settings after defaults (part of the fingerprint)."""
    src = r.src
    eff: dict = {"format": spec.format, "task": spec.task, "skip_invalid": spec.skip_invalid}
    if spec.format == "karpathy":
        eff["karpathy_split"] = (
            src.split
            if src.split is not None
            else (None if r.part else formats.KARPATHY_DEFAULT_SPLIT[r.name])
        )
    if spec.format == "synthetic":
        from compressor.data.synthetic import SYNTHETIC_VERSION

        if src.size is None:
            raise UserInputError(
                f"{r.key}.size is required for format synthetic: e.g. `{r.key}: {{size: 200, seed: 1}}`"
            )
        eff.update(
            size=src.size,
            seed=src.seed if src.seed is not None else SYNTHETIC_DEFAULT_SEED["source" if r.part else r.name],
            image_size=src.image_size,
            synthetic_version=SYNTHETIC_VERSION,
        )
    if r.part:
        eff["split"] = {"part": r.part, **spec.split.model_dump()}  # type: ignore[union-attr]
    return eff


def _parse(spec: DataSpec, r: Resolved, eff: dict) -> Parsed:
    key = r.key
    if spec.format == "coco":
        return formats.read_coco(r.src, key, spec.task)
    if spec.format == "karpathy":
        return formats.read_karpathy(r.src, key, spec.task, eff["karpathy_split"])
    if spec.format == "csv":
        return formats.read_csv(r.src, key, spec.task)
    if spec.format == "imagefolder":
        return formats.read_imagefolder(r.src, key, spec.task)
    if spec.format == "synthetic":
        from compressor.data.synthetic import synthetic_examples

        exs = synthetic_examples(eff["seed"], eff["size"], eff["image_size"], spec.task)
        return Parsed(rows=[Row(e, f"synthetic {e.question_id or e.image_id}") for e in exs])
    raise UserInputError(f"unknown data format {spec.format!r}")  # pragma: no cover - the schema forbids it


def split_image_ids(image_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, set[str]]:
    """Divide image ids into train/val/test, seeded and deterministic.

    The ids are sorted (natural order) and de-duplicated, shuffled with ``random.Random(seed)``,
    then cut at ``round(n * train)`` and ``round(n * (train + val))``; test takes the rest.

    Args:
        image_ids: ids (repeats allowed).
        fractions: ``{"train": f, "val": f, "test": f}`` summing to 1.
        seed: shuffle seed.

    Returns:
        ``{"train": ids, "val": ids, "test": ids}``, disjoint, covering every id.
    """
    ids = sorted(set(image_ids), key=natural_key)
    random.Random(seed).shuffle(ids)
    n = len(ids)
    b1 = round(n * fractions["train"])
    b2 = max(b1, min(n, round(n * (fractions["train"] + fractions["val"]))))
    return {"train": set(ids[:b1]), "val": set(ids[b1:b2]), "test": set(ids[b2:])}


@dataclass
class _Collected:
    resolved: Resolved
    eff: dict
    parsed: Parsed
    rows: list[Row]  # after split, sort and limit


def _collect(spec: DataSpec, section: str, limit: int | None) -> _Collected:
    r = resolve_section(spec, section)
    _check_fields(spec, r)
    eff = _effective(spec, r)
    parsed = _parse(spec, r, eff)
    rows = parsed.rows
    if r.part:
        assert spec.split is not None
        parts = split_image_ids(
            [row.example.image_id for row in rows],
            {"train": spec.split.train, "val": spec.split.val, "test": spec.split.test},
            spec.split.seed,
        )
        keep = parts[r.part]
        rows = [row for row in rows if row.example.image_id in keep]
    rows = sorted(
        rows, key=lambda row: natural_key(row.example.image_id)
    )  # stable: file order within an image
    limits = [x for x in (r.src.limit, limit) if x is not None]
    eff["limit"] = min(limits) if limits else None
    if eff["limit"] is not None:
        rows = rows[: eff["limit"]]
    return _Collected(r, eff, parsed, rows)


def _image_paths(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(row.example.image_path for row in rows if row.example.image_path is not None))


def _fingerprint(c: _Collected) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"loader": DATA_LOADER_VERSION, **c.eff}, sort_keys=True, default=str).encode())
    for f in c.parsed.files:
        fh = hashlib.sha256()
        with open(f, "rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 20), b""):
                fh.update(chunk)
        h.update(b"\0file\0" + fh.digest())
    root = c.parsed.image_root
    for p in _image_paths(c.rows):
        rel = os.path.relpath(p, root) if root else p
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\0img\0{rel}\0{stamp}".encode())
    return h.hexdigest()


def check_image(path: str) -> tuple[str, str] | None:
    """Cheap check of one image file: it exists and PIL can open and verify it (no decoding).

    Args:
        path: absolute path.

    Returns:
        None when fine, else ``(kind, detail)``.
    """
    if not os.path.isfile(path):
        return MISSING_IMAGE, path
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, struct.error ...)
        return CORRUPT_IMAGE, f"{path}: {type(e).__name__}: {e}"
    return None


def _check_images(rows: list[Row]) -> tuple[list[Problem], set[str]]:
    paths = _image_paths(rows)
    if len(paths) > 64:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
            results = list(pool.map(check_image, paths))
    else:
        results = [check_image(p) for p in paths]
    bad = {p: res for p, res in zip(paths, results, strict=True) if res is not None}
    if not bad:
        return [], set()
    per_image: dict[str, list[Row]] = {}
    for row in rows:
        if row.example.image_path in bad:
            per_image.setdefault(row.example.image_path, []).append(row)
    problems = []
    for p, (kind, detail) in bad.items():
        rs = per_image[p]
        where = rs[0].where + (f" and {len(rs) - 1} more row(s) of this image" if len(rs) > 1 else "")
        problems.append(Problem(kind, where, detail))
    return problems, set(bad)


def _raise_or_skip(
    spec: DataSpec, c: _Collected, problems: list[Problem], label: str, skip_hint: str
) -> list[str]:
    lines = [str(p) for p in problems]
    if not problems:
        return lines
    kinds = Counter(p.kind for p in problems)
    summary = "; ".join(f"{n} × {k}" for k, n in kinds.items())
    if not spec.skip_invalid:
        hint = ""
        if formats.ESCAPE in kinds:
            hint = " File names must stay inside the image folder."
        raise DataError(
            f"{len(problems)} bad row(s) in {label} (format {spec.format}): {summary}.{hint} "
            f"Fix the rows listed below, or {skip_hint} to skip them.",
            lines,
        )
    logger.warning(
        "%s: skipped %d bad row(s) (%s), skip_invalid is on; first: %s",
        label,
        len(problems),
        summary,
        lines[0],
    )
    return lines


def load_section(
    spec: DataSpec,
    section: str,
    limit: int | None = None,
    *,
    label: str | None = None,
    skip_hint: str = "set data.skip_invalid: true",
) -> Dataset:
    """Load one section of the data.

    Args:
        spec: the recipe's ``data``.
        section: ``train``, ``val``, ``eval``, ``test`` or ``calibration`` (fallbacks in the
            module docstring).
        limit: keep at most this many examples (the first after sorting by image id); the
            smaller of this and the section's own ``limit`` applies. Captioning counts images,
            VQA counts questions.
        label: how bad-row errors name the data (default: the recipe section, ``data.train``).
        skip_hint: how bad-row errors say to skip them (the command line: ``pass --skip-invalid``).

    Returns:
        The dataset; its ``fingerprint`` equals :func:`section_fingerprint` for the same arguments.

    Raises:
        UserInputError: no data for the section, a recipe field that does not apply to the
            format, a required field missing, a Karpathy split the file lacks.
        DataError: a file is missing or malformed, or bad rows while ``skip_invalid`` is false
            (all of them listed, file and row each).
    """
    c = _collect(spec, section, limit)
    fingerprint = _fingerprint(c)
    image_problems, bad_paths = _check_images(c.rows)
    skipped = _raise_or_skip(spec, c, [*c.parsed.problems, *image_problems], label or c.resolved.label, skip_hint)
    rows = [row for row in c.rows if row.example.image_path not in bad_paths]
    examples: list[Example] = [row.example for row in rows]
    logger.info(
        "loaded %s for section %s: %d example(s)%s",
        c.resolved.label,
        section,
        len(examples),
        f", {len(skipped)} skipped" if skipped else "",
    )
    return Dataset(
        section=section,
        examples=examples,
        task=spec.task,
        skipped=skipped,
        fingerprint=fingerprint,
        resolved=c.resolved.label,
    )


def section_fingerprint(spec: DataSpec, section: str, limit: int | None = None) -> str:
    """The fingerprint :func:`load_section` would give, without opening any image.

    Reads and parses the annotation files and ``stat``s the images of the examples kept; see
    the module docstring for what it covers. Bad rows do not raise here (they are part of the
    annotation bytes hashed); :func:`load_section` reports them.

    Args:
        spec: the recipe's ``data``.
        section: the section name.
        limit: as for :func:`load_section`.

    Returns:
        sha256 hex digest.

    Raises:
        UserInputError: as :func:`load_section`, for recipe problems.
        DataError: an annotation file is missing or malformed.
    """
    return _fingerprint(_collect(spec, section, limit))


# ------------------------------------------------------------------------------------------
# a spec from a path (the CLI's --data PATH [--data-format F])
# ------------------------------------------------------------------------------------------


def infer_spec(
    path: str,
    data_format: str | None = None,
    task: str | None = None,
    images: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> DataSpec:
    """Build a ``DataSpec`` for one data path, as ``compress eval --data PATH`` needs.

    The data goes into the ``test`` section, which ``eval`` (and ``predict``'s default) read.

    Detection when ``data_format`` is None: a folder is ``imagefolder``; a ``.csv`` is ``csv``
    (images beside it unless ``images`` is given); a ``.json`` whose ``images[]`` carry
    ``sentences`` is ``karpathy`` (its ``test`` split), any other ``.json`` is ``coco``, with
    images in ``images``, else the sibling folder named by the file's last ``_`` part
    (``captions_val2017.json`` → ``val2017/``) if it exists, else the file's folder.
    ``task`` defaults to ``vqa`` when the CSV or metadata has a question column/key.

    Args:
        path: a file or folder.
        data_format: one of the formats, or None to detect.
        task: ``caption`` or ``vqa``, or None to detect.
        images: image folder for coco / karpathy / csv.
        limit: ``limit`` of the section.
        skip_invalid: ``data.skip_invalid``.

    Returns:
        A validated DataSpec.

    Raises:
        UserInputError: the path does not exist, or its format cannot be told.
    """
    from compressor.recipe.schema import DataSpec

    if data_format == "synthetic":
        raise UserInputError("format synthetic has no path: put `data: {format: synthetic, ...}` in a recipe")
    ap = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(ap):
        raise UserInputError(f"--data: {path} does not exist (relative paths resolve against {os.getcwd()})")
    fmt = data_format
    if fmt is None:
        if os.path.isdir(ap):
            fmt = "imagefolder"
        elif ap.lower().endswith(".csv"):
            fmt = "csv"
        elif ap.lower().endswith(".json"):
            head = formats.read_json(ap, "--data")
            ims = head.get("images") if isinstance(head, dict) else None
            fmt = "karpathy" if ims and isinstance(ims[0], dict) and "sentences" in ims[0] else "coco"
        else:
            raise UserInputError(
                f"--data: cannot tell the format of {path}: give --data-format coco|karpathy|csv|imagefolder"
            )
    src: dict = {"limit": limit}
    if fmt == "imagefolder":
        src["path"] = ap
    else:
        src["annotations"] = ap
        folder = images
        if folder is None:
            folder = os.path.dirname(ap)
            if fmt == "coco":
                stem = os.path.splitext(os.path.basename(ap))[0].rsplit("_", 1)[-1]
                if os.path.isdir(os.path.join(folder, stem)):
                    folder = os.path.join(folder, stem)
        src["images"] = folder
    if task is None:
        task = "caption"
        if fmt == "csv":
            with open(ap, encoding="utf-8-sig", newline="") as f:
                header = f.readline().lower()
            task = "vqa" if "question" in header else "caption"
        elif fmt == "imagefolder":
            meta = os.path.join(ap, "metadata.jsonl")
            if os.path.isfile(meta):
                with open(meta, encoding="utf-8") as f:
                    first = next((ln for ln in f if ln.strip()), "")
                task = "vqa" if '"question"' in first else "caption"
    return DataSpec(
        format=fmt, task=task, test={k: v for k, v in src.items() if v is not None}, skip_invalid=skip_invalid
    )
