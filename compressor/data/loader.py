"""Loading a section of the recipe's data: reading, splitting, limits, validation, fingerprints.

Which data a section reads (its own key, a share of ``data.source``, a fallback) is
:mod:`compressor.data.sections`; how a format reads its files is its module, found through
:mod:`compressor.data.formats` (this module never tests a format's name). The rows are read with
the format's reader, divided by ``data.split`` when the section is a share of ``data.source``,
then sorted by image id (natural order: ``"9" < "10"``) and cut to ``limit``
(the smaller of the section's ``limit`` and the caller's), and the images of the examples kept
are checked once per load: the file exists, PIL can open and verify its header, and its end is
where the format puts it (a JPEG's end-of-image marker, a PNG's ``IEND``: a truncated file is found
without decoding it); every image is decoded when the section has at most
:data:`DECODE_ALL_UP_TO` images or ``data.verify_images: decode``, and any whose end looks wrong.

Bad rows (a missing or unreadable image, a file name escaping the image folder, an empty caption
or question, an annotation for an unknown image id, a duplicate image entry) raise
:class:`~compressor.errors.DataError` listing every one of them, or, with ``data.skip_invalid:
true``, are skipped with a warning and listed in :attr:`Dataset.skipped`. Annotation rows are
checked over the whole file (they cost nothing to check); images only for the examples loaded.
Problems with the file itself (not found, not JSON, missing CSV columns) are never skippable.

The fingerprint (sha256) covers the loader version, the format, the task, ``skip_invalid``, the
section's settings after defaults (split part and fractions, limit, and the format's own
settings: Karpathy split, synthetic seed/size/image_size and
:data:`~compressor.data.synthetic.SYNTHETIC_VERSION`), the bytes of the
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
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from compressor.data.dataset import Dataset, Example, natural_key
from compressor.data.formats import Format, get_format
from compressor.data.formats.common import CORRUPT_IMAGE, ESCAPE, MISSING_IMAGE, Parsed, Problem, Row
from compressor.data.sections import Resolved, resolve_section, split_image_ids
from compressor.errors import DataError, UserInputError

if TYPE_CHECKING:
    from compressor.recipe.schema import DataSpec

logger = logging.getLogger(__name__)

#: Bump when a change in this package changes what a given spec loads (enters every fingerprint).
DATA_LOADER_VERSION = 1
#: ``verify_images: auto`` decodes every image of a section up to this size (about 5 ms per COCO image).
DECODE_ALL_UP_TO = 1000


def _check_fields(fmt: Format, r: Resolved) -> None:
    allowed = fmt.fields
    extra = sorted(f for f in r.src.model_fields_set if f not in allowed and getattr(r.src, f) is not None)
    if extra:
        raise UserInputError(
            f"{r.key}: {', '.join(extra)} do(es) not apply to format {fmt.name} "
            f"(it reads {', '.join(sorted(allowed))}); e.g. `{r.key}: {fmt.example}`"
            + (
                ". To divide one file, use data.source with data.split: {train: 0.8, val: 0.1, test: 0.1}"
                if "split" in extra
                else ""
            )
        )


def _effective(spec: DataSpec, r: Resolved, settings: dict) -> dict:
    """The section's settings after defaults (part of the fingerprint), the format's own included."""
    eff: dict = {"format": spec.format, "task": spec.task, "skip_invalid": spec.skip_invalid, **settings}
    if spec.skip_invalid and spec.verify_images != "auto":  # decides which images are skipped
        eff["verify_images"] = spec.verify_images
    if r.part:
        eff["split"] = {"part": r.part, **spec.split.model_dump()}  # type: ignore[union-attr]
    return eff


@dataclass
class _Collected:
    resolved: Resolved
    eff: dict
    parsed: Parsed
    rows: list[Row]  # after split, sort and limit


def _collect(spec: DataSpec, section: str, limit: int | None) -> _Collected:
    r = resolve_section(spec, section)
    fmt = get_format(spec.format)
    _check_fields(fmt, r)
    settings = fmt.settings(r)
    eff = _effective(spec, r, settings)
    parsed = fmt.read(r.src, r.key, spec.task, settings)
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


def _end_looks_wrong(path: str) -> bool:
    """A JPEG without its end-of-image marker or a PNG without ``IEND`` near the end (truncated);
    reads the first and last bytes only. Other formats: False (not checked)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 32))
            tail = fh.read()
    except OSError:
        return True
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    return False


def check_image(path: str, decode: bool = False) -> tuple[str, str] | None:
    """Check one image file: it exists, PIL can open and verify its header, its end is in place
    (JPEG, PNG), and, when ``decode`` or its end looks wrong, it decodes.

    Args:
        path: absolute path.
        decode: decode the pixels (finds damage inside the file; costs a decode).

    Returns:
        None when fine, else ``(kind, detail)``.
    """
    if not os.path.isfile(path):
        return MISSING_IMAGE, path
    try:
        with Image.open(path) as im:
            im.verify()
        if decode or _end_looks_wrong(path):  # verify() reads the header only: a truncated body passes it
            with Image.open(path) as im:
                im.load()
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, struct.error ...)
        return CORRUPT_IMAGE, f"{path}: {type(e).__name__}: {e}"
    return None


def _check_images(rows: list[Row], verify: str = "auto") -> tuple[list[Problem], set[str]]:
    import functools

    paths = _image_paths(rows)
    check = functools.partial(check_image, decode=verify == "decode" or len(paths) <= DECODE_ALL_UP_TO)
    if len(paths) > 64:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
            results = list(pool.map(check, paths))
    else:
        results = [check(p) for p in paths]
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
        if ESCAPE in kinds:
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
    image_problems, bad_paths = _check_images(c.rows, spec.verify_images)
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
        skip_invalid=spec.skip_invalid,
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
