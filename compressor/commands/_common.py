"""Plumbing the ``compress`` commands share: the context object and JSON output.

Kept apart from :mod:`compressor.cli` so that command modules never import the module that
registers them (no import cycle).
"""

from __future__ import annotations

import json

import click


class Ctx:
    """The global options of ``compress`` (``--debug``, ``--quiet``, ``--json``), as ``ctx.obj``."""

    def __init__(self, debug: bool, quiet: bool, as_json: bool):
        self.debug, self.quiet, self.json = debug, quiet, as_json


def echo_json(obj) -> None:
    """Print ``obj`` as indented JSON on stdout (non-JSON values through ``str``)."""
    click.echo(json.dumps(obj, indent=2, default=str))
