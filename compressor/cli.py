"""The ``compress`` command line (click): logging set-up, error handling, and the command table.

Each command lives in its own module under :mod:`compressor.commands` and is registered here by
one line of :data:`COMMANDS` (huggingface_hub's one-file-per-command layout); a module is imported
only when its command runs or help lists it.

Exit codes: 0 success, 1 a gate failed, 2 bad usage / recipe / input (nothing written),
3 any other failure. Tracebacks only with ``--debug``; ``--json`` prints machine-readable
results on stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import click

from compressor.commands._common import Ctx, echo_json
from compressor.errors import EXIT_BAD_INPUT, EXIT_FAILURE, CompressError

log = logging.getLogger(__name__)

#: Every ``compress`` command: its name → ``"module:attribute"`` of its click command.
COMMANDS: dict[str, str] = {
    "apply": "compressor.commands.apply:apply",
    "eval": "compressor.commands.eval:eval_command",
    "export": "compressor.commands.export:export",
    "gate": "compressor.commands.gate:gate",
    "inspect": "compressor.commands.inspect:inspect_command",
    "plan": "compressor.commands.plan:plan",
    "predict": "compressor.commands.predict:predict_command",
    "push": "compressor.commands.push:push",
    "report": "compressor.commands.report:report",
    "search": "compressor.commands.search:search",
    "validate": "compressor.commands.validate:validate",
}


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "accelerate", "torch", "urllib3", "httpx", "matplotlib", "PIL", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass


def _fail(exc: BaseException, debug: bool) -> int:
    if isinstance(exc, CompressError):
        click.echo(f"error: {exc}", err=True)
        code = exc.exit_code
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: {type(exc).__name__}: {first}" + ("" if debug else " (run with --debug for the traceback)"), err=True)
        code = EXIT_FAILURE
    if debug:
        import traceback

        traceback.print_exception(exc)
    return code


def load_command(spec: str) -> click.Command:
    """Import the click command named by ``"module:attribute"``."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class Group(click.Group):
    """The commands of :data:`COMMANDS`, imported on first use; maps errors to exit codes for every command."""

    def list_commands(self, ctx):
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx, cmd_name):
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.add_command(load_command(COMMANDS[cmd_name]), cmd_name)
        return self.commands.get(cmd_name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            exc.exit_code = EXIT_BAD_INPUT
            obj = ctx.obj
            if obj is not None and obj.json:
                echo_json({"error": exc.format_message(), "type": type(exc).__name__, "exit_code": EXIT_BAD_INPUT})
            raise
        except click.exceptions.Abort:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BaseException as exc:  # noqa: BLE001 - the CLI boundary
            if isinstance(exc, SystemExit):
                raise
            obj = ctx.obj or Ctx(False, False, False)
            code = _fail(exc, obj.debug)
            if obj.json:  # a CI parsing stdout gets the error too
                echo_json({"error": str(exc).strip(), "type": type(exc).__name__, "exit_code": code})
            sys.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.version_option(package_name="vlm-compress")
@click.pass_context
def cli(ctx, debug: bool, quiet: bool, as_json: bool):
    """Compress and export BLIP-2-family vision-language models, driven by YAML recipes."""
    _setup_logging(debug, quiet or as_json)
    ctx.obj = Ctx(debug, quiet, as_json)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="compress")


if __name__ == "__main__":
    main()
