"""``cli.py`` only registers commands: one table, one module per command under ``compressor/commands``."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from compressor.cli import COMMANDS, cli, load_command

COMMANDS_DIR = Path(__file__).resolve().parents[3] / "compressor" / "commands"


def test_every_table_entry_is_a_command_of_that_name_in_its_own_module():
    for name, spec in COMMANDS.items():
        cmd = load_command(spec)
        assert isinstance(cmd, click.Command), spec
        assert cmd.name == name, f"{spec} is named {cmd.name!r}, registered as {name!r}"
        assert spec.startswith("compressor.commands."), spec


def test_the_group_lists_exactly_the_table():
    ctx = click.Context(cli, info_name="compress")
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    assert all(cli.get_command(ctx, name) is load_command(COMMANDS[name]) for name in COMMANDS)
    assert cli.get_command(ctx, "no-such-command") is None


def test_no_command_module_is_left_unregistered():
    registered = {spec.partition(":")[0] for spec in COMMANDS.values()}
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        module = importlib.import_module(f"compressor.commands.{path.stem}")
        defined_here = [
            v for v in vars(module).values()
            if isinstance(v, click.Command) and v.callback is not None and v.callback.__module__ == module.__name__
        ]
        assert bool(defined_here) == (module.__name__ in registered), (
            f"{path.name}: defines {len(defined_here)} command(s); registered: {module.__name__ in registered}"
        )
