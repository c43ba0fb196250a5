"""``compress apply RECIPE``: run a recipe's stages, then the report, the gate and the push."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from compressor.commands._common import Ctx, echo_json


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default runs/<name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (stages.N.key=value).")
@click.option("--resume", is_flag=True, help="Continue a run that was interrupted.")
@click.option("--dry-run", is_flag=True, help="Validate and plan; write nothing.")
@click.pass_obj
def apply(obj: Ctx, recipe, out, overrides, resume, dry_run):
    """Run a recipe: stages, report, gate, push."""
    from compressor.pipeline.runner import Runner
    from compressor.recipe.loader import load_recipe

    loaded = load_recipe(recipe, overrides)
    runner = Runner(loaded, out, resume=resume, progress=not (obj.quiet or obj.json) and sys.stderr.isatty())
    runner.preflight()
    if dry_run:
        stages = [{"index": i, "type": st.type, "label": st.label} for i, st in enumerate(loaded.recipe.stages)]
        if obj.json:
            echo_json({"recipe": loaded.recipe.name, "run_dir": str(runner.run_dir), "stages": stages, "valid": True})
        else:
            click.echo(f"{recipe}: valid; would run into {runner.run_dir}:")
            for s in stages:
                click.echo(f"  {s['index']:2d} {s['type']}" + (f" [{s['label']}]" if s["label"] else ""))
        return
    from compressor.errors import GateFailed

    try:
        report = runner.run()
        if not runner.dist.main:  # another process of a multi-process run: the main one reports
            return
    except GateFailed:
        _print_summary(obj, runner.run_dir)
        raise
    except KeyboardInterrupt:
        if not runner.dist.main:
            raise
        click.echo(_resume_hint(runner, recipe, out, overrides), err=True)
        sys.exit(130)
    _print_summary(obj, runner.run_dir)
    del report


def _resume_hint(runner, recipe: Path, out, overrides) -> str:
    """What Ctrl-C tells: where the run stopped, what was saved, the command that continues it."""
    import shlex

    args = ["compress", "apply", str(recipe)] + (["--out", str(out)] if out is not None else [])
    for o in overrides:
        args += ["--set", o]
    where = ""
    if runner.interrupted is not None:
        index, type_, step = runner.interrupted
        where = f" during stage {index} {type_}" + (
            f" (its training state at step {step} is saved)" if step is not None else " (no training state saved yet)")
    return f"interrupted{where}; continue with: {shlex.join(args + ['--resume'])}"


def _print_summary(obj: Ctx, run_dir: Path) -> None:
    """Print a finished run's comparison table, gate and push lines (or its report.json with ``--json``)."""
    from eval.reports import comparison_text

    path = run_dir / "report.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    if obj.json:
        echo_json(report)
        return
    labels = list(report.get("evaluations", {}))
    if labels:
        click.echo(comparison_text(labels, report["evaluations"]))
    if "gate" in report:
        g = report["gate"]
        click.echo(f"gate: {'PASSED' if g['passed'] else 'FAILED'} ({g['summary']})")
    if "push" in report:
        click.echo(f"push: {report['push'].get('summary', '')}")
    click.echo(f"report: {run_dir / 'report.md'}  final model: {run_dir / 'final'}")
