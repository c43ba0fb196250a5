"""Report rendering: baseline-versus-candidate tables in Markdown and plain text.

Pure functions over the report dict written by the pipeline (``report.json``); they import no
model code, so ``compress report`` and CI can render reports of finished runs anywhere.
"""

from __future__ import annotations

import math
from typing import Any

#: Display order of metric and characteristic rows.
METRIC_ORDER = (
    "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "rouge_1", "rouge_2", "cider", "spice",
    "vqa_accuracy", "mme_acc", "mme_acc_plus", "bertscore_f1", "clipscore", "teacher_cider", "perplexity",
)
CHAR_ORDER = (
    "params_total", "params_trainable", "params_vision", "params_qformer", "params_projection",
    "params_language_model", "gflops", "gflops_vision", "gflops_qformer", "gflops_projection", "gflops_language_model",
    "avg_inference_s", "latency_p50_s", "latency_p95_s", "tokens_per_s", "peak_rss_mb", "peak_cuda_mb", "size_mb",
)
#: The four figures the published RSICD study reports (Parameters, Trainable Params, GFLOPs,
#: Avg Inference Time): a row in every table, "—" when not measured.
HEADLINE = ("params_total", "params_trainable", "gflops", "avg_inference_s")
LOWER_IS_BETTER = {"perplexity", "latency_p50_s", "latency_p95_s", "avg_inference_s", "peak_rss_mb", "peak_cuda_mb",
                   "size_mb", "gflops", "params_total", "params_vision", "params_qformer", "params_projection",
                   "params_language_model"}


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
    """Rows ``(key, [value per label])``: metrics, then characteristics in :data:`CHAR_ORDER`.

    The :data:`HEADLINE` characteristics always have a row when any label was measured (a
    model evaluation, not a predictions file), ``None`` where a value is missing.
    """
    rows: list[tuple[str, list[Any]]] = []
    for group, order in (("metrics", METRIC_ORDER), ("characteristics", CHAR_ORDER)):
        keys: list[str] = []
        for lab in labels:
            for k in evals[lab].get(group, {}):
                if k not in keys and isinstance(evals[lab][group][k], (int, float, type(None))):
                    keys.append(k)
        if group == "characteristics" and keys:
            keys += [k for k in HEADLINE if k not in keys]
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
