"""``report.json`` / ``report.md`` of a run: metrics per evaluate label, characteristics, gate, timings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from compressor.fileio import atomic_write_json, atomic_write_text
from eval.gates import evaluate_gate, gate_json, gate_junit, gate_markdown
from eval.reports import comparison_markdown

log = logging.getLogger(__name__)


def flat_values(ev: dict) -> dict[str, Any]:
    """Metrics and characteristics of one evaluation in one mapping (what gate rules read)."""
    return {**ev.get("characteristics", {}), **ev.get("metrics", {})}


def build_report(recipe, recipe_hash: str, records, evals: dict[str, dict], seconds: float) -> dict:
    """The report dict: evaluations by label, gate verdicts, stage timings."""
    import dataclasses

    report: dict[str, Any] = {
        "recipe": recipe.name,
        "recipe_hash": recipe_hash,
        "evaluations": evals,
        "stages": [
            {k: v for k, v in dataclasses.asdict(r).items() if k != "summary"} | {"summary": _short(r.summary)}
            for r in records
        ],
        "seconds": round(seconds, 2),
    }
    gate = recipe.gate
    if gate is not None:
        rules = {k: r.model_dump(exclude_none=True) for k, r in gate.rules.items()}
        cand = flat_values(evals.get(gate.candidate, {}))
        base = flat_values(evals.get(gate.baseline, {})) if gate.baseline else None
        verdicts = evaluate_gate(rules, cand, base)
        g = gate_json(verdicts, gate.candidate, gate.baseline)
        failed = [f"{v.key} {v.rule} ({v.reason})" for v in verdicts if not v.passed]
        g["summary"] = "all rules passed" if not failed else "; ".join(failed)
        g["_verdicts"] = verdicts
        report["gate"] = g
    return report


def _short(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k in ("lora", "removed")}


def report_markdown(report: dict, plots: list[str] | None = None) -> str:
    """``report.md``: metrics and characteristics side by side, plots, gate verdicts, stage timings.

    Args:
        report: the report dict (with the gate's verdict objects).
        plots: PNG file names beside report.md to embed.
    """
    labels = list(report["evaluations"])
    parts = [f"# Run report: {report['recipe']}", "", f"Recipe hash `{report['recipe_hash'][:12]}`, wall time {report['seconds']:.1f} s.", ""]
    if "fast_dev_run" in report:
        parts += [f"> **{report['fast_dev_run']['note'][0].upper()}{report['fast_dev_run']['note'][1:]}.**", ""]
    if labels:
        parts += ["## Metrics and characteristics", "", comparison_markdown(labels, report["evaluations"])]
        for lab in labels:
            ev = report["evaluations"][lab]
            dec = ev.get("decoding", {})
            chars = ev.get("characteristics", {})
            measured = []
            if chars.get("latency_batch_size") is not None:
                sizes = ", ".join(chars.get("by_batch_size", {})) or chars["latency_batch_size"]
                measured.append(f"latency per caption at batch size {chars['latency_batch_size']} (timed at {sizes})")
            if chars.get("gflops_new_tokens") is not None:
                measured.append(f"GFLOPs for one image and {chars['gflops_new_tokens']} generated tokens")
            parts.append(
                f"- **{lab}**: {ev['data']['examples']} examples of `{ev['data']['section']}`; decoding "
                + ", ".join(f"{k}={dec[k]}" for k in ("backend", "num_beams", "max_new_tokens", "min_new_tokens", "prompt", "batch_size") if k in dec)
                + ("; " + "; ".join(measured) if measured else "")
            )
            for note in ev.get("notes", []):
                parts.append(f"  - note: {note}")
        parts.append("")
    for name in plots or []:
        parts += [f"![{name[:-4]}]({name})", ""]
    if "gate" in report:
        parts += ["## Gate", "", gate_markdown(report["gate"]["_verdicts"]), ""]
    parts += ["## Stages", "", "| # | stage | label | status | seconds | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for s in report["stages"]:
        peak = f"{s['peak_rss_mb']:.0f}" if s.get("peak_rss_mb") else "—"
        parts.append(f"| {s['index']} | {s['type']} | {s['label'] or ''} | {s['status']} | {s['seconds']:.1f} | {peak} |")
    n_ran = sum(s["status"] == "ran" for s in report["stages"])
    total = sum(s["seconds"] for s in report["stages"])
    parts.append(f"| | **total** | | {n_ran} ran, {len(report['stages']) - n_ran} reused | {total:.1f} | |")
    if "push" in report:
        parts += ["", "## Push", "", f"{report['push'].get('summary', '')}"]
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path, report: dict, plots: bool = True) -> None:
    """Write ``report.json``, ``report.md``, the plots (``metrics.png``, ``characteristics.png``) and,
    with a gate, ``gate.json`` / ``gate.xml``. ``plots=False`` keeps plots drawn earlier."""
    clean = {k: v for k, v in report.items() if k != "gate"}
    if "gate" in report:
        clean["gate"] = {k: v for k, v in report["gate"].items() if k != "_verdicts"}
        atomic_write_json(run_dir / "gate.json", clean["gate"])
        atomic_write_text(run_dir / "gate.xml", gate_junit(report["gate"]["_verdicts"], f"gate {report['recipe']}"))
    atomic_write_json(run_dir / "report.json", clean)
    if plots:
        try:
            from eval.plots import run_plots

            run_plots(run_dir, clean)
        except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
            log.warning("could not draw the report plots: %s", exc)
    from eval.plots import RUN_PLOTS

    shown = [name for name in RUN_PLOTS if (run_dir / name).is_file()]
    atomic_write_text(run_dir / "report.md", report_markdown(report, shown))
