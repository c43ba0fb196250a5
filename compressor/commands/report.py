"""``compress report RUN… --out DIR``: compare finished runs in one table and a set of plots.

Reads each run's ``report.json`` (a run directory or the file itself) and writes to DIR:
``comparison.md`` (the combined table, the runs, the plots), ``comparison.csv`` (raw numbers),
``metrics.png``, ``params.png``, ``latency.png``, ``gflops.png`` (per experiment, as the
published RSICD pruning study drew them) and ``pareto_<metric>_<against>.png``. Loads no model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

log = logging.getLogger(__name__)


def load_reports(paths: list[Path]) -> list[tuple[str, dict]]:
    """``(run name, report dict)`` per path; every path is checked before anything is written.

    Raises:
        UserInputError: a path with no readable ``report.json`` (all of them listed).
    """
    from compressor.errors import UserInputError

    out, bad = [], []
    for p in paths:
        f = p / "report.json" if p.is_dir() else p
        try:
            rep = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            bad.append(f"{p}: no readable report.json ({exc.__class__.__name__}); pass a run directory made by `compress apply`")
            continue
        if not isinstance(rep, dict) or "evaluations" not in rep:
            bad.append(f"{p}: {f.name} has no evaluations (not a run report)")
            continue
        out.append((f.parent.name if f.name == "report.json" else f.stem, rep))
    if bad:
        raise UserInputError("cannot compare these runs:\n" + "\n".join("  - " + b for b in bad))
    return out


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the table and plots.")
@click.option("--metric", help="Metric of the Pareto plot (default cider, else the first metric).")
@click.option("--against", type=click.Choice(["latency", "params", "gflops"]), default="latency", show_default=True,
              help="x axis of the Pareto plot.")
@click.option("--label", "labels", multiple=True, metavar="LABEL", help="Evaluate labels to include (default all); repeatable.")
@click.pass_obj
def report(obj, runs, out: Path, metric, against, labels):
    """Compare runs: a combined table (Markdown + CSV) and plots of metrics, parameters, latency, GFLOPs, Pareto."""
    from compressor.errors import UserInputError, did_you_mean
    from compressor.fileio import atomic_write_text
    from eval.plots import experiment_plots
    from eval.reports import (
        data_groups,
        experiment_columns,
        experiments_csv,
        experiments_from_reports,
        experiments_markdown,
    )

    named = load_reports(list(runs))
    entries = experiments_from_reports(named, list(labels) or None)
    if not entries:
        raise UserInputError(f"no evaluation labelled {', '.join(labels)} in these runs" if labels else "these runs have no evaluations")
    mets, _ = experiment_columns(entries)
    metric = metric or ("cider" if "cider" in mets else (mets[0] if mets else None))
    if metric is None or metric not in mets:
        raise UserInputError(f"--metric {metric}: not measured in these runs; measured: {', '.join(mets)}.{did_you_mean(str(metric), mets)}")
    groups = data_groups(entries)
    warning = None
    if len(groups) > 1:
        warning = ("these experiments were evaluated on different data, so their metrics are not comparable: "
                   + "; ".join(f"data {fp[:12]}: {', '.join(names)}" for fp, names in groups.items()))
        log.warning("%s", warning)
    out.mkdir(parents=True, exist_ok=True)
    files = experiment_plots(entries, out, metric, against, warning="different data: not comparable" if warning else None)
    atomic_write_text(out / "comparison.csv", experiments_csv(entries))
    md = ["# Comparison of runs", "", *([f"**Warning:** {warning}.", ""] if warning else []), experiments_markdown(entries),
          "Runs:", ""]
    for name, rep in named:
        gate = rep.get("gate")
        verdict = "" if not gate else f"; gate {'passed' if gate.get('passed') else 'FAILED'} ({gate.get('summary', '')})"
        md.append(f"- `{name}`: recipe `{rep.get('recipe')}` (hash `{str(rep.get('recipe_hash', ''))[:12]}`){verdict}")
    md.append("")
    md += [f"![{f.stem}]({f.name})\n" for f in files]
    atomic_write_text(out / "comparison.md", "\n".join(md))
    written = [out / "comparison.md", out / "comparison.csv", *files]
    if obj is not None and obj.json:
        click.echo(json.dumps({"experiments": [{k: e[k] for k in ("name", "run", "label", "role", "gate")} for e in entries],
                               "files": [str(f) for f in written]}, indent=2))
        return
    click.echo(experiments_markdown(entries))
    click.echo(f"wrote {len(written)} files to {out}: " + ", ".join(f.name for f in written))
