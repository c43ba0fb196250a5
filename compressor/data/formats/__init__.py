"""Data format registry: explicit, by name, lazily imported (DESIGN.md "Conventions": data formats).

A format is one module holding its reader and ONE :class:`Format` named ``FORMAT``: everything
the loader must know about it, as data (the ``DataSource`` fields it reads, an example section
for messages, the settings it adds to the fingerprint, how ``--data PATH`` detects and describes
it). The loader (:mod:`compressor.data.loader`), section resolution
(:mod:`compressor.data.sections`), ``infer_spec`` (:mod:`compressor.data.infer`) and the
recipe schema's ``DataFormat`` read only declarations and :data:`REGISTRY`; nothing outside a
format's own module tests its name.

Adding a format is its module plus one line in :data:`REGISTRY` (the recipe schema's
``data.format`` accepts the names listed here, read when the schema is imported)::

    from compressor.data.formats import Format
    from compressor.data.formats.common import Parsed, Row, need

    def read(src, key, task, settings) -> Parsed: ...

    FORMAT = Format(name="my_format", description="what it reads", fields=frozenset({"path", "limit"}),
                    example="{path: data/}", read=read)

The shared row and problem types and the helpers readers use (``Problem``, ``Row``,
``Parsed``, the problem kinds, ``resolve_in``, ``need*``, ``read_json``) live in
:mod:`compressor.data.formats.common`. This module imports neither PIL nor torch (the recipe
schema imports it), and the format modules only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compressor.errors import UserInputError

if TYPE_CHECKING:
    from compressor.data.formats.common import Parsed

#: Registered formats: name -> module path, in the order the documentation lists them.
REGISTRY: dict[str, str] = {
    "coco": "compressor.data.formats.coco",
    "karpathy": "compressor.data.formats.karpathy",
    "csv": "compressor.data.formats.csv",
    "imagefolder": "compressor.data.formats.imagefolder",
    "hf": "compressor.data.formats.hf",
    "synthetic": "compressor.data.synthetic",
}


def _no_settings(resolved) -> dict:
    return {}


def _caption(path: str) -> str:
    return "caption"


@dataclass(frozen=True)
class Format:
    """What the loader knows about one data format.

    Attributes:
        name: the format's name (``data.format`` in a recipe); must equal its registry key.
        description: one line for the recipe reference (what files the format reads).
        fields: the ``DataSource`` fields it reads; any other field set in the recipe is an error.
        spec_fields: the ``DataSpec`` fields (set once for every section) it reads beyond those every
            format shares; another format given one of them is an error.
        example: a section in YAML flow style, shown in messages (``{path: images/}``).
        read: ``read(src, key, task, settings) -> Parsed``: reads one ``DataSource`` (``key``
            is its recipe key for messages, ``settings`` what :attr:`settings` returned) into
            rows without opening any image; bad rows are returned as problems, problems with the
            file itself raise (see :mod:`compressor.data.formats.common`).
        settings: ``settings(resolved) -> dict``: the section's format-specific settings after
            defaults (``resolved``: a :class:`~compressor.data.sections.Resolved`, with ``name``,
            ``part``, ``key`` and ``src``); they enter the fingerprint and are passed to
            :attr:`read`. May raise ``UserInputError`` for a missing required field.
        detect: ``detect(path) -> int`` for ``--data PATH`` without ``--data-format``: 0 when
            the absolute ``path`` is not this format, else how specific the match is (the
            highest wins, ties go to the earlier registered format). None: never detected.
        path_source: ``path_source(path, images) -> dict``: the ``DataSource`` fields that
            read ``path`` (``images``: the ``--images`` folder or None). None: the format cannot
            be read from a path.
        path_task: ``path_task(path) -> "caption" | "vqa"``: the task when ``--task`` is not given.
    """

    name: str
    fields: frozenset[str]
    example: str
    read: Callable[[Any, str, str, Mapping[str, Any]], Parsed]
    description: str = ""
    settings: Callable[[Any], dict] = _no_settings
    detect: Callable[[str], int] | None = None
    path_source: Callable[[str, str | None], dict] | None = None
    path_task: Callable[[str], str] = _caption
    spec_fields: frozenset[str] = frozenset()


def format_names() -> tuple[str, ...]:
    """Every registered format name, in registration order (imports no format module)."""
    return tuple(REGISTRY)


def get_format(name: str) -> Format:
    """The declaration of format ``name`` (its module's ``FORMAT``), importing the module.

    Raises:
        UserInputError: an unknown format name (the recipe schema rejects these before).
        TypeError: the module declares another name than it is registered under.
    """
    if name not in REGISTRY:
        from compressor.errors import did_you_mean

        raise UserInputError(
            f"unknown data format '{name}'.{did_you_mean(name, list(REGISTRY))} Valid: {', '.join(REGISTRY)}"
        )
    fmt = importlib.import_module(REGISTRY[name]).FORMAT
    if fmt.name != name:
        raise TypeError(f"{REGISTRY[name]} declares data format '{fmt.name}' but is registered as '{name}'")
    return fmt


def path_format_names() -> tuple[str, ...]:
    """Formats that ``--data PATH`` can name (those that read from a path), in registration order."""
    return tuple(f.name for f in formats() if f.path_source is not None)


def formats() -> list[Format]:
    """Every registered format's declaration, in registration order."""
    return [get_format(name) for name in REGISTRY]
