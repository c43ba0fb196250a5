"""A data spec from one path: the CLI's ``--data PATH [--data-format F]``.

Detection, the sources and the task guesses are the formats' own (``detect``, ``path_source``,
``path_task`` of each :class:`~compressor.data.formats.Format`); this module only chooses.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from compressor.data.formats import Format, formats, get_format
from compressor.errors import UserInputError

if TYPE_CHECKING:
    from compressor.recipe.schema import DataSpec

def _detect(ap: str, path: str) -> Format:
    """The registered format that claims ``ap`` most specifically (ties: the first registered).

    Raises:
        UserInputError: no format claims it.
    """
    readable = [f for f in formats() if f.path_source is not None]
    best, best_score = None, 0
    for fmt in readable:
        score = fmt.detect(ap) if fmt.detect is not None else 0
        if score > best_score:
            best, best_score = fmt, score
    if best is None:
        names = "|".join(f.name for f in readable)
        raise UserInputError(f"--data: cannot tell the format of {path}: give --data-format {names}")
    return best


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
    (Each rule is its format module's ``detect`` / ``path_source`` / ``path_task``.)

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
        UserInputError: the path does not exist, its format cannot be told, or the format has
            no path (``synthetic``).
    """
    from compressor.recipe.schema import DataSpec

    fmt = get_format(data_format) if data_format is not None else None
    if fmt is not None and fmt.path_source is None:
        raise UserInputError(
            f"format {fmt.name} has no path: put `data: {{format: {fmt.name}, ...}}` in a recipe"
        )
    ap = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(ap):
        raise UserInputError(f"--data: {path} does not exist (relative paths resolve against {os.getcwd()})")
    if fmt is None:
        fmt = _detect(ap, path)
    assert fmt.path_source is not None
    src: dict = {"limit": limit, **fmt.path_source(ap, images)}
    if task is None:
        task = fmt.path_task(ap)
    return DataSpec(
        format=fmt.name,
        task=task,
        test={k: v for k, v in src.items() if v is not None},
        skip_invalid=skip_invalid,
    )
