"""Report rendering: baseline-versus-candidate tables in Markdown and plain text.

Pure functions over the report dict written by the pipeline (``report.json``); they import no
model code, so ``compress report`` and CI can render reports of finished runs anywhere.
"""

from __future__ import annotations

import math
from typing import Any

from eval.metrics import display_keys, headline_keys, runs_table_columns

# Row and column order, and the four headline figures of the published RSICD study (Parameters,
# Trainable Params, GFLOPs, Avg Inference Time: a row in every table, "—" when not measured), all
# come from the metric table (eval.metrics).


def fmt_value(key: str, v: Any) -> str:
    """Human formatting: parameters in M, seconds with 3 decimals, metrics with 2."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if not isinstance(v, (int, float)):
        return str(v)
    if key.startswith("params_"):
        return f"{v / 1e6:.3f}M" if abs(v) >= 1e5 else f"{int(v):,}"
    if key.endswith("_s"):
        return f"{v:.4f}"
    if key.startswith("gflops"):
        return f"{v:.4f}"
    return f"{v:.2f}"


def comparison_rows(labels: list[str], evals: dict[str, dict]) -> list[tuple[str, list[Any]]]:
    """Rows ``(key, [value per label])``: metrics, then characteristics, in the metric table's order.

    The headline characteristics (:func:`eval.metrics.headline_keys`) always have a row when any
    label was measured (a model evaluation, not a predictions file), ``None`` where a value is
    missing.
    """
    rows: list[tuple[str, list[Any]]] = []
    for group in ("metrics", "characteristics"):
        order = display_keys(group)
        keys: list[str] = []
        for lab in labels:
            for k in evals[lab].get(group, {}):
                if k not in keys and isinstance(evals[lab][group][k], (int, float, type(None))):
                    keys.append(k)
        if group == "characteristics" and keys:
            keys += [k for k in headline_keys() if k not in keys]
        known = [k for k in order if k in keys]
        for k in known:
            rows.append((k, [evals[lab].get(group, {}).get(k) for lab in labels]))
    return rows


def comparison_markdown(labels: list[str], evals: dict[str, dict]) -> str:
    """A Markdown table with one column per label, and a Δ / ratio column for two labels."""
    two = len(labels) == 2
    head = "| | " + " | ".join(labels) + (" | change |" if two else " |")
    sep = "|---" * (len(labels) + 1 + (1 if two else 0)) + "|"
    lines = [head, sep]
    for key, vals in comparison_rows(labels, evals):
        cells = [fmt_value(key, v) for v in vals]
        change = ""
        if two and all(isinstance(v, (int, float)) for v in vals):
            a, b = vals
            if key.startswith(("params_", "gflops")) or key.endswith("_s") or key.endswith("_mb"):
                change = f"×{b / a:.3f}" if a else "—"
            else:
                change = f"{b - a:+.2f}"
        lines.append(f"| {key} | " + " | ".join(cells) + (f" | {change} |" if two else " |"))
    return "\n".join(lines) + "\n"


def comparison_text(labels: list[str], evals: dict[str, dict]) -> str:
    """The same table as fixed-width text (for the terminal)."""
    rows = [(k, [fmt_value(k, v) for v in vals]) for k, vals in comparison_rows(labels, evals)]
    w0 = max([len(k) for k, _ in rows] + [6])
    ws = [max([len(lab)] + [len(r[1][i]) for r in rows]) for i, lab in enumerate(labels)]
    out = [" " * w0 + "  " + "  ".join(lab.rjust(w) for lab, w in zip(labels, ws))]
    for k, cells in rows:
        out.append(k.ljust(w0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, ws)))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ across runs

def _same_eval(a: dict, b: dict) -> bool:
    """Two evaluations of the same model on the same data (latency and memory may differ)."""
    ca, cb = a.get("characteristics", {}), b.get("characteristics", {})
    return (
        a.get("metrics") == b.get("metrics")
        and a.get("data", {}).get("fingerprint") == b.get("data", {}).get("fingerprint")
        and ca.get("params_total") == cb.get("params_total")
    )


def data_groups(entries: list[dict]) -> dict[str, list[str]]:
    """The experiments grouped by the data they were evaluated on (its fingerprint; ``unknown`` when
    the record has none): more than one group means their metrics are not comparable.

    Returns:
        ``{fingerprint: [experiment names]}``, in the order of ``entries``.
    """
    groups: dict[str, list[str]] = {}
    for e in entries:
        fp = str((e["eval"].get("data") or {}).get("fingerprint") or "unknown")
        groups.setdefault(fp, []).append(e["name"])
    return groups


def experiments_from_reports(named: list[tuple[str, dict]], labels: list[str] | None = None) -> list[dict]:
    """One entry per compared model across runs: each run's candidate, plus baselines once.

    A baseline that several runs share (same metrics, data fingerprint and parameter count, as
    when pruning experiments start from one model) appears once, named ``baseline`` (when the
    runs have different baselines, each is ``<run>:<label>``); a run's candidate is named after
    the run; any other label is ``<run>:<label>``.

    Args:
        named: ``(run name, report.json dict)`` per run, in the order to show.
        labels: evaluate labels to include (default: all of them).

    Returns:
        Dicts with ``name``, ``run``, ``label``, ``role`` (``baseline`` / ``candidate`` /
        ``other``), ``eval`` (the evaluation dict) and ``gate`` (True / False / None).
    """
    out: list[dict] = []
    baselines: list[dict] = []
    for run, report in named:
        evals = report.get("evaluations", {})
        keys = list(evals)
        gate = report.get("gate") or {}
        cand = gate.get("candidate") or (keys[-1] if keys else None)
        base = gate.get("baseline") or (keys[0] if len(keys) > 1 else None)
        for label in keys:
            if labels and label not in labels:
                continue
            ev = evals[label]
            role = "baseline" if label == base else "candidate" if label == cand else "other"
            if role == "baseline":
                if any(_same_eval(ev, b["eval"]) for b in baselines):
                    continue
                name = "baseline" if not baselines else f"{run}:{label}"
            elif role == "candidate":
                name = run
            else:
                name = f"{run}:{label}"
            entry = {"name": name, "run": run, "label": label, "role": role, "eval": ev,
                     "gate": gate.get("passed") if role == "candidate" and gate else None}
            if role == "baseline":
                baselines.append(entry)
            out.append(entry)
    if len(baselines) > 1:  # several different baselines: name each after its run
        baselines[0]["name"] = f"{baselines[0]['run']}:{baselines[0]['label']}"
    seen: dict[str, int] = {}
    for e in out:  # unique names (two runs with the same folder name)
        n = seen.get(e["name"], 0)
        seen[e["name"]] = n + 1
        if n:
            e["name"] = f"{e['name']}#{n + 1}"
    return sorted(out, key=lambda e: e["role"] != "baseline")


def experiment_columns(entries: list[dict]) -> tuple[list[str], list[str]]:
    """``(metric keys, characteristic keys)`` present in any entry, in display order.

    Characteristics are the across-runs columns of the metric table
    (:func:`eval.metrics.runs_table_columns`).
    """
    mets = [k for k in display_keys("metrics") if any(isinstance(e["eval"].get("metrics", {}).get(k), (int, float)) for e in entries)]
    chars = [k for k in runs_table_columns() if any(isinstance(e["eval"].get("characteristics", {}).get(k), (int, float)) for e in entries)]
    return mets, chars


def _gate_cell(v) -> str:
    return "—" if v is None else ("passed" if v else "FAILED")


def experiments_markdown(entries: list[dict]) -> str:
    """The combined table in Markdown: one row per experiment, metrics then characteristics."""
    mets, chars = experiment_columns(entries)
    head = ["experiment", "run", "label", *mets, *chars, "gate", "examples"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        ev = e["eval"]
        cells = [e["name"], e["run"], e["label"]]
        cells += [fmt_value(k, ev.get("metrics", {}).get(k)) for k in mets]
        cells += [fmt_value(k, ev.get("characteristics", {}).get(k)) for k in chars]
        cells += [_gate_cell(e["gate"]), str(ev.get("data", {}).get("examples", "—"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def experiments_csv(entries: list[dict]) -> str:
    """The combined table as CSV (raw numbers, empty cells where a value is missing)."""
    import csv
    import io

    mets, chars = experiment_columns(entries)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["experiment", "run", "label", "role", *mets, *chars, "gate_passed", "examples"])
    for e in entries:
        ev = e["eval"]

        def cell(v):
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v

        w.writerow([
            e["name"], e["run"], e["label"], e["role"],
            *[cell(ev.get("metrics", {}).get(k)) for k in mets],
            *[cell(ev.get("characteristics", {}).get(k)) for k in chars],
            "" if e["gate"] is None else e["gate"], ev.get("data", {}).get("examples", ""),
        ])
    return buf.getvalue()
