"""``compress plan RECIPE [--config FILE]``: parameters per part and GFLOPs before and after, no weights."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    help="config.json (or a folder with one) of the model; needed for Hub ids whose architecture is not shipped.",
)
@click.option("--no-gflops", is_flag=True, help="Count parameters only (GFLOPs take ~10 s for a 2.7B model).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (stages.N.key=value).")
@click.pass_obj
def plan(obj, recipe: Path, config_file: Path | None, no_gflops: bool, overrides):
    """Parameters per part and GFLOPs before and after the recipe, on the meta device (no weights, no network)."""
    from compressor.planning import format_plan, plan_recipe
    from compressor.recipe.loader import load_recipe

    loaded = load_recipe(recipe, overrides)
    result = plan_recipe(loaded, config_file, gflops=not no_gflops)
    if obj is not None and obj.json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(format_plan(result))
