"""The ``compress`` command line (click).

Exit codes: 0 success, 1 a gate failed, 2 bad usage / recipe / input (nothing written),
3 any other failure. Tracebacks only with ``--debug``; ``--json`` prints machine-readable
results on stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from compressor.errors import EXIT_BAD_INPUT, EXIT_FAILURE, CompressError

log = logging.getLogger("compressor.cli")


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


class Ctx:
    def __init__(self, debug: bool, quiet: bool, as_json: bool):
        self.debug, self.quiet, self.json = debug, quiet, as_json


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


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


class Group(click.Group):
    """Maps errors to exit codes for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            exc.exit_code = EXIT_BAD_INPUT
            obj = ctx.obj
            if obj is not None and obj.json:
                _echo_json({"error": exc.format_message(), "type": type(exc).__name__, "exit_code": EXIT_BAD_INPUT})
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
                _echo_json({"error": str(exc).strip(), "type": type(exc).__name__, "exit_code": code})
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


# ------------------------------------------------------------------------------------ recipes


@cli.command()
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
        _echo_json(results)
    if failed:
        sys.exit(EXIT_BAD_INPUT)


@cli.command()
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
            _echo_json({"recipe": loaded.recipe.name, "run_dir": str(runner.run_dir), "stages": stages, "valid": True})
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
    _print_summary(obj, runner.run_dir)
    del report


def _print_summary(obj: Ctx, run_dir: Path) -> None:
    from eval.reports import comparison_text

    path = run_dir / "report.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    if obj.json:
        _echo_json(report)
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


# ------------------------------------------------------------------------------------ gates


def _parse_rule(text: str) -> tuple[str, str, float]:
    from compressor.errors import UserInputError, did_you_mean
    from compressor.recipe.schema import GATE_KEYS
    from eval.gates import RULE_KINDS, rule_problems

    try:
        key, rest = text.split(":", 1)
        kind, value = rest.split("=", 1)
    except ValueError:
        raise UserInputError(f"--rule {text}: expected KEY:RULE=VALUE, e.g. cider:max_drop=2") from None
    try:
        num = float(value)
    except ValueError:
        raise UserInputError(f"--rule {text}: the value '{value}' is not a number (e.g. cider:max_drop=2)") from None
    if key not in GATE_KEYS:
        raise UserInputError(f"--rule {text}: unknown metric key '{key}'.{did_you_mean(key, GATE_KEYS)} Keys: {', '.join(GATE_KEYS)}")
    if kind not in RULE_KINDS:
        raise UserInputError(f"--rule {text}: unknown rule '{kind}'; expected one of {', '.join(RULE_KINDS)}.{did_you_mean(kind, RULE_KINDS)}")
    problems = rule_problems(key, kind, num)
    if problems:
        raise UserInputError(f"--rule {text}: " + "; ".join(problems))
    return key, kind, num


def _read_json(path: Path) -> dict:
    from compressor.errors import UserInputError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected an eval.json or report.json object, got a {type(data).__name__}")
    return data


def _load_eval_values(path: Path, label: str | None) -> dict:
    from compressor.errors import UserInputError
    from compressor.pipeline.report import flat_values

    data = _read_json(path)
    if "evaluations" in data:
        if label is None:
            raise UserInputError(f"{path} is a report with labels {list(data['evaluations'])}: pass --candidate/--baseline LABEL")
        if label not in data["evaluations"]:
            raise UserInputError(f"{path}: no evaluation labelled '{label}'; labels: {list(data['evaluations'])}")
        return flat_values(data["evaluations"][label])
    if "metrics" in data or "characteristics" in data:
        return flat_values(data)
    from compressor.recipe.schema import GATE_KEYS

    flat = {k: v for k, v in data.items() if isinstance(v, (int, float))}
    if not any(k in GATE_KEYS for k in flat):
        raise UserInputError(
            f"{path}: holds no metrics (keys: {', '.join(list(data)[:8])}); expected an eval.json written by "
            "`compress eval`, a run's report.json, or a flat {\"metric\": value} object"
        )
    return flat


@cli.command()
@click.argument("candidate", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--baseline", "baseline", help="Baseline eval.json (or a label with a report.json candidate).")
@click.option("--candidate", "candidate_label", help="Candidate label when CANDIDATE is a report.json.")
@click.option("--rule", "rules", multiple=True, required=True, metavar="KEY:RULE=VALUE", help="e.g. cider:max_drop=2")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML here.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write gate.json here.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Write the verdict table (Markdown) here.")
@click.pass_obj
def gate(obj: Ctx, candidate, baseline, candidate_label, rules, junit, out, markdown):
    """Check metric regressions of a candidate against rules (loads no model). Exit 1 on regression, 2 on bad rules."""
    from compressor.errors import GateFailed, UserInputError
    from compressor.fileio import atomic_write_json, atomic_write_text
    from eval.gates import RELATIVE, evaluate_gate, gate_json, gate_junit, gate_markdown, passed

    parsed: dict[str, dict[str, float]] = {}
    for r in rules:
        key, kind, num = _parse_rule(r)
        parsed.setdefault(key, {})[kind] = num
    is_report = "evaluations" in _read_json(candidate)
    cand = _load_eval_values(candidate, candidate_label if is_report else None)
    base = None
    if baseline is not None:
        if is_report and not Path(baseline).is_file():
            base = _load_eval_values(candidate, baseline)
        else:
            base = _load_eval_values(Path(baseline), None)
    elif any(k in RELATIVE for kinds in parsed.values() for k in kinds):
        raise UserInputError("relative rules (max_drop, min_recovery, max_ratio) need --baseline")
    verdicts = evaluate_gate(parsed, cand, base)
    cand_name = f"{candidate}[{candidate_label}]" if is_report else str(candidate)
    base_name = None if baseline is None else (f"{candidate}[{baseline}]" if is_report and not Path(baseline).is_file() else str(baseline))
    result = gate_json(verdicts, cand_name, base_name)
    if junit:
        atomic_write_text(junit, gate_junit(verdicts))
    if out:
        atomic_write_json(out, result)
    if markdown:
        atomic_write_text(markdown, gate_markdown(verdicts))
    if obj.json:
        _echo_json(result)
    else:
        click.echo(gate_markdown(verdicts))
    if not passed(verdicts):
        raise GateFailed("the gate failed: " + "; ".join(f"{v.key} {v.rule} ({v.reason})" for v in verdicts if not v.passed))


from compressor.commands.eval import eval_command  # noqa: E402
from compressor.commands.predict import predict_command  # noqa: E402

cli.add_command(eval_command)
cli.add_command(predict_command)
from compressor.commands.push import push as _push  # noqa: E402
from compressor.commands.report import report as _report  # noqa: E402

cli.add_command(_push)
cli.add_command(_report)
from compressor.commands.inspect import inspect_command  # noqa: E402

cli.add_command(inspect_command)
from compressor.commands.export import export as _export  # noqa: E402

cli.add_command(_export)
from compressor.commands.plan import plan as _plan_command  # noqa: E402

cli.add_command(_plan_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="compress")


if __name__ == "__main__":
    main()
