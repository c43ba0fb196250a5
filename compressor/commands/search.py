"""``compress search RECIPE``: Optuna multi-objective search over the recipe's `search:` space."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compressor.commands._common import Ctx, echo_json


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trials", type=click.IntRange(min=1), help="Trials of the study (default: search.trials).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes on the study (this one included).")
@click.option("--storage", metavar="URL", help="Optuna RDB storage URL shared by workers on several machines "
              "(default: sqlite:///OUT/study.db).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Search folder (default runs/<name>-search).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, as in apply.")
@click.option("--worker-only", is_flag=True, help="Only run trials of an existing study (no prefix, no results).")
@click.option("--results-only", is_flag=True, help="Only write the results of the trials stored so far (no new trial).")
@click.pass_obj
def search(obj: Ctx, recipe, trials, workers, storage, out, overrides, worker_only, results_only):
    """Search the recipe's `search:` space; write the Pareto front and finish the smallest passing trial.

    Every trial is a run directory under OUT/trials; OUT holds trials.csv, pareto.json, pareto.png,
    report.md and best/ (linked as result). Run again to resume; run it on more machines with one
    --storage URL to share the study. Exit 1 when no trial passes the gate.
    """
    from compressor.errors import GateFailed, UserInputError
    from compressor.pipeline.search import Search, make_plan, write_results
    from compressor.pipeline.search import search as run_search
    from compressor.recipe.loader import load_recipe

    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserInputError("compress search needs Optuna: pip install 'vlm-compress[search]'") from None
    loaded = load_recipe(recipe, overrides)
    plan = make_plan(loaded, trials)
    out = out or Path("runs") / f"{loaded.recipe.name}-search"
    if worker_only:
        Search(plan, out, storage).work()
        return
    if results_only:
        if not (out / "study.db").is_file() and not storage:
            raise UserInputError(f"{out}: no study here yet; run compress search first")
        result = write_results(Search(plan, out, storage))
    else:
        result = None
    args = ["-q", "search", str(recipe), "--out", str(out), "--worker-only", "--trials", str(plan.trials)]
    args += [a for ov in overrides for a in ("--set", ov)]
    if storage:
        args += ["--storage", storage]
    if result is None:
        result = run_search(plan, out, storage, workers, args)
    if obj.json:
        echo_json(result)
    else:
        states = ", ".join(f"{n} {s}" for s, n in result["states"].items())
        repeated = f", {result['repeated_draws']} repeated draws told, not run" if result.get("repeated_draws") else ""
        click.echo(f"search {result['study']}: {result['trials']} trials run ({states}{repeated}); front of "
                   f"{len(result['front'])}; see {out / 'report.md'}")
        ch = result["chosen"]
        if ch is not None:
            vals = ", ".join(f"{k}={ch[k]}" for k in result["space"])
            objs = ", ".join(f"{k} {ch[k]:.4g}" for k in result["objectives"])
            click.echo(f"chosen: trial {ch['trial']} ({vals}): {objs}; finished run: {out / 'best'}")
    if result["chosen"] is None:
        print(f"no trial passes the gate; see {out / 'pareto.png'}", file=sys.stderr)
        raise GateFailed("no trial of the search passes the gate")
