"""Run a ``compress`` command in this process with click's CliRunner (no interpreter start-up, no
model-free import cost), keeping the logging set-up of the test process intact."""

from __future__ import annotations

import logging
import warnings

from click.testing import CliRunner


class Result:
    """``returncode``, ``stdout``, ``stderr`` of one in-process command (like subprocess's)."""

    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def run_inprocess(*args: str) -> Result:
    """``compress ARGS`` in-process; the CLI's logging and warning filters are undone afterwards."""
    from compressor.cli import cli

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with warnings.catch_warnings():
        try:
            r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    return Result(r)
