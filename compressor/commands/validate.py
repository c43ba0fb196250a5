"""``compress validate RECIPE…``: check recipes against the schema, write nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compressor.commands._common import Ctx, echo_json
from compressor.errors import EXIT_BAD_INPUT


@click.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (stages.N.key=value).")
@click.pass_obj
def validate(obj: Ctx, recipes, overrides):
    """Check recipes against the schema (and the model config when it is known offline)."""
    from compressor.errors import RecipeError
    from compressor.recipe.loader import load_recipe

    failed = 0
    results = []
    for path in recipes:
        try:
            loaded = load_recipe(path, overrides)
            results.append({"recipe": str(path), "valid": True, "hash": loaded.hash()})
            if not obj.json:
                click.echo(f"{path}: ok")
        except RecipeError as exc:
            failed += 1
            results.append({"recipe": str(path), "valid": False, "problems": exc.problems})
            if not obj.json:
                click.echo(str(exc), err=True)
    if obj.json:
        echo_json(results)
    if failed:
        sys.exit(EXIT_BAD_INPUT)
