"""PNG plots of runs and of comparisons across runs (matplotlib's object API, Agg; no display).

Per run (beside ``report.md``, drawn by :func:`run_plots`):

* ``metrics.png`` — bars of every metric, one bar per evaluate label (baseline against
  candidate), values written on the bars; perplexity (lower is better, other scale) in its own
  panel;
* ``characteristics.png`` — parameters (stacked by part: vision, Q-Former, projection, language
  model), GFLOPs, latency (p50 bar, p95 whisker) and size on disk, side by side.

Across runs (``compress report RUN… --out DIR``), what the published RSICD pruning study drew by
hand — metrics per pruning experiment, parameters, inference time and GFLOPs — one figure each
(:func:`experiment_plots`), plus a Pareto plot of one metric against latency, parameters or
GFLOPs with the non-dominated experiments joined (:func:`pareto_plot`).

Every plot function takes evaluation dicts (``eval.json`` / ``report.json`` entries), never a
model; files are written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from eval.metrics import display_keys, higher_is_better, part_label, part_names
from eval.reports import fmt_value

log = logging.getLogger(__name__)

#: Characteristics a Pareto plot can put on its x axis: (key, axis label, scale).
PARETO_X = {
    "latency": ("latency_p50_s", "latency p50 per caption (s)", 1.0),
    "params": ("params_total", "parameters (M)", 1e-6),
    "gflops": ("gflops", "GFLOPs per caption", 1.0),
}
#: The per-run plots, beside report.md.
RUN_PLOTS = ("metrics.png", "characteristics.png")
BASE_COLOR = "#8c8c8c"


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as PNG at ``path`` through a temporary file (never a half-written PNG)."""
    from compressor.fileio import default_file_mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, default_file_mode())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _colors(names: list[str], roles: list[str] | None = None) -> list[str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    roles = roles or ["" for _ in names]
    out, k = [], 0
    for r in roles:
        if r == "baseline":
            out.append(BASE_COLOR)
        else:
            out.append(cmap(k % 10))
            k += 1
    return out


def _parts() -> list[tuple[str, str]]:
    """``(params_<part> key, display label)`` per model part (the metric table's part names)."""
    return [(f"params_{p}", part_label(p)) for p in part_names()]


def _metric_keys(evals: list[dict]) -> list[str]:
    keys = [k for k in display_keys("metrics") if any(_num(e.get("metrics", {}).get(k)) is not None for e in evals)]
    extra = sorted({k for e in evals for k, v in e.get("metrics", {}).items() if k not in keys and _num(v) is not None})
    return keys + extra


def metric_bars(names: list[str], evals: list[dict], path: Path, title: str = "", roles: list[str] | None = None) -> Path | None:
    """Grouped bars: x = metric, one bar per evaluation; metrics above 100 (CIDEr) and perplexity
    each in a separate panel, so one scale does not squash the others.

    Args:
        names: a legend name per evaluation (``baseline``, ``candidate``, a run name …).
        evals: evaluation dicts with ``metrics`` (0–100 scale).
        path: the PNG to write.
        title: figure title.
        roles: ``baseline`` entries are drawn grey.

    Returns:
        ``path``, or None when no evaluation has a metric.
    """
    keys = _metric_keys(evals)
    if not keys:
        return None
    def over_100(k: str) -> bool:
        return any((_num(e.get("metrics", {}).get(k)) or 0.0) > 100 for e in evals)

    higher = [k for k in keys if higher_is_better(k)]
    main = [k for k in higher if not over_100(k)]
    wide = [k for k in higher if over_100(k)]  # CIDEr (0-1000) beside, so it does not squash the others
    side = [k for k in keys if not higher_is_better(k)]
    groups = [(g, label) for g, label in ((main, "score (×100 scale)"), (wide, "score (×100 scale; above 100)"),
                                          (side, "perplexity (lower is better)")) if g]
    colors = _colors(names, roles)
    n = len(evals)
    fig = _figure(min(14.0, max(4.5, 1.1 * len(higher) * max(1, n / 2) + 2.0)) + (2.2 if side else 0), 3.8)
    axes = (fig.subplots(1, len(groups), width_ratios=[max(len(g), 1) * (1 if g is main else 0.9) for g, _ in groups])
            if len(groups) > 1 else [fig.subplots()])
    width = 0.8 / n
    for ax, (group, ylabel) in zip(axes, groups):
        for i, (name, ev, col) in enumerate(zip(names, evals, colors)):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(group))]
            vals = [_num(ev.get("metrics", {}).get(k)) for k in group]
            bars = ax.bar(xs, [v if v is not None else 0.0 for v in vals], width * 0.95, label=name, color=col)
            for b, v in zip(bars, vals):
                ax.annotate("n/a" if v is None else f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(group)), group)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def _bar_panel(ax, names, evals, key, label, scale, colors, err_key=None):
    vals = [_num(e.get("characteristics", {}).get(key)) for e in evals]
    xs = list(range(len(names)))
    heights = [v * scale if v is not None else 0.0 for v in vals]
    bars = ax.bar(xs, heights, 0.7, color=colors)
    if err_key:
        tops = [_num(e.get("characteristics", {}).get(err_key)) for e in evals]
        yerr = [[0.0] * len(xs), [max(0.0, t * scale - h) if t is not None else 0.0 for t, h in zip(tops, heights)]]
        ax.errorbar(xs, heights, yerr=yerr, fmt="none", ecolor="black", capsize=3, lw=0.8)
    for b, v in zip(bars, vals):
        ax.annotate("n/a" if v is None else fmt_value(key, v), (b.get_x() + b.get_width() / 2, b.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names, rotation=20 if max(len(n) for n in names) > 8 else 0, ha="right" if max(len(n) for n in names) > 8 else "center")
    ax.set_title(label, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    if all(v is None for v in vals):
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")


def _params_panel(ax, names, evals, colors):
    from matplotlib import colormaps

    xs = list(range(len(names)))
    parts = _parts()
    have_parts = all(any(_num(e.get("characteristics", {}).get(k)) is not None for k, _ in parts) for e in evals)
    if have_parts:
        bottom = [0.0] * len(xs)
        cmap = colormaps["Pastel1"]
        for j, (key, label) in enumerate(parts):
            vals = [(_num(e.get("characteristics", {}).get(key)) or 0.0) / 1e6 for e in evals]
            ax.bar(xs, vals, 0.7, bottom=bottom, label=label, color=cmap(j), edgecolor=colors, linewidth=1.5)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    else:
        vals = [(_num(e.get("characteristics", {}).get("params_total")) or 0.0) / 1e6 for e in evals]
        ax.bar(xs, vals, 0.7, color=colors)
    for x, e in zip(xs, evals):
        tot = _num(e.get("characteristics", {}).get("params_total"))
        if tot is not None:
            ax.annotate(fmt_value("params_total", tot), (x, tot / 1e6), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names, rotation=20 if max(len(n) for n in names) > 8 else 0, ha="right" if max(len(n) for n in names) > 8 else "center")
    ax.set_title("parameters (M)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)


def characteristics_bars(names: list[str], evals: list[dict], path: Path, title: str = "", roles: list[str] | None = None) -> Path:
    """Parameters (stacked by part), GFLOPs, latency (p50, p95 whisker) and size, side by side."""
    colors = _colors(names, roles)
    fig = _figure(max(9.0, 2.6 * len(names) + 4), 3.6)
    ax = fig.subplots(1, 4)
    _params_panel(ax[0], names, evals, colors)
    _bar_panel(ax[1], names, evals, "gflops", "GFLOPs per caption", 1.0, colors)
    _bar_panel(ax[2], names, evals, "latency_p50_s", "latency (s; p50, whisker p95)", 1.0, colors, "latency_p95_s")
    _bar_panel(ax[3], names, evals, "size_mb", "size on disk (MB)", 1.0, colors)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def run_plots(run_dir: Path, report: dict) -> list[Path]:
    """``metrics.png`` and ``characteristics.png`` of one run, beside its ``report.md``.

    Args:
        run_dir: the run directory.
        report: the run's report dict (``evaluations`` by label).

    Returns:
        The PNG files written (none when the run has no evaluation).
    """
    evals = report.get("evaluations", {})
    if not evals:
        return []
    gate = report.get("gate") or {}
    names = list(evals)
    roles = ["baseline" if n == (gate.get("baseline") or (names[0] if len(names) > 1 else None)) else "" for n in names]
    title = f"{report.get('recipe', '')}"
    out = []
    p = metric_bars(names, [evals[n] for n in names], Path(run_dir) / "metrics.png", f"{title}: metrics", roles)
    if p:
        out.append(p)
    out.append(characteristics_bars(names, [evals[n] for n in names], Path(run_dir) / "characteristics.png",
                                    f"{title}: size and speed", roles))
    return out


def single_characteristic(entries: list[dict], key: str, label: str, scale: float, path: Path, err_key: str | None = None) -> Path:
    """One characteristic per experiment (the RSICD study's parameters / inference time / GFLOPs charts)."""
    names = [e["name"] for e in entries]
    evals = [e["eval"] for e in entries]
    colors = _colors(names, [e["role"] for e in entries])
    fig = _figure(max(4.5, 1.2 * len(names) + 1.5), 3.6)
    ax = fig.subplots()
    if key == "params_total":
        _params_panel(ax, names, evals, colors)
    else:
        _bar_panel(ax, names, evals, key, label, scale, colors, err_key)
    return save_png(fig, path)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points, sorted by x (x: lower is better).

    A point is dominated when another is at least as good on both axes and better on one.
    """
    sign = 1 if higher_is_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and sign * y2 >= sign * y) and (x2 < x or sign * y2 > sign * y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_plot(entries: list[dict], metric: str, against: str, path: Path, warning: str | None = None) -> Path:
    """A metric against latency, parameters or GFLOPs; the non-dominated experiments joined.

    Args:
        entries: from :func:`eval.reports.experiments_from_reports`.
        metric: a metric key (``cider`` …).
        against: ``latency``, ``params`` or ``gflops``.
        path: the PNG to write.
        warning: a line shown under the title (experiments evaluated on different data).

    Raises:
        ValueError: ``against`` is unknown.
    """
    if against not in PARETO_X:
        raise ValueError(f"against must be one of {', '.join(PARETO_X)}, got {against!r}")
    xkey, xlabel, scale = PARETO_X[against]
    pts, names, roles = [], [], []
    for e in entries:
        x = _num(e["eval"].get("characteristics", {}).get(xkey))
        y = _num(e["eval"].get("metrics", {}).get(metric))
        if x is not None and y is not None:
            pts.append((x * scale, y))
            names.append(e["name"])
            roles.append(e["role"])
    fig = _figure(5.8, 4.2)
    ax = fig.subplots()
    if not pts:
        ax.text(0.5, 0.5, f"no experiment has both {metric} and {xkey}", transform=ax.transAxes, ha="center")
        return save_png(fig, path)
    front = pareto_front(pts, higher_is_better(metric))
    colors = _colors(names, roles)
    for i, ((x, y), name, col) in enumerate(zip(pts, names, colors)):
        on = i in front
        ax.scatter([x], [y], s=60, color=col if on else "white", edgecolors=col, linewidths=1.5, zorder=3)
        ax.annotate(name, (x, y), xytext=(5, _label_offset(pts, i)), textcoords="offset points", fontsize=8)
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="black", lw=0.8, zorder=2,
                drawstyle="steps-post", label="Pareto front")
        ax.legend(fontsize=8, loc="best")
    better = "higher" if higher_is_better(metric) else "lower"
    ax.set_xlabel(f"{xlabel} (lower is better)")
    ax.set_ylabel(f"{metric} ({better} is better)")
    ax.set_title(f"{metric} against {against}: filled = not dominated" + (f"\n{warning}" if warning else ""), fontsize=10,
                 **({"color": "darkred"} if warning else {}))
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return save_png(fig, path)


def _label_offset(pts: list[tuple[float, float]], i: int) -> float:
    """Vertical label offset (points) of point ``i``: labels of points close to an earlier one step
    down in turn, so they do not print over each other."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    near = sum(1 for j in range(i) if abs(xs[j] - xs[i]) < 0.08 * dx and abs(ys[j] - ys[i]) < 0.08 * dy)
    return 5.0 - 10.0 * near


def experiment_plots(entries: list[dict], out_dir: Path, metric: str, against: str, warning: str | None = None) -> list[Path]:
    """Every cross-run figure: metrics, parameters, latency, GFLOPs per experiment, and the Pareto plot
    (``warning`` under its title: experiments evaluated on different data).

    Returns:
        The PNG files written (``metrics.png``, ``params.png``, ``latency.png``, ``gflops.png``,
        ``pareto_<metric>_<against>.png``).
    """
    out_dir = Path(out_dir)
    names = [e["name"] for e in entries]
    roles = [e["role"] for e in entries]
    evals = [e["eval"] for e in entries]
    files = []
    p = metric_bars(names, evals, out_dir / "metrics.png", "metrics per experiment", roles)
    if p:
        files.append(p)
    files.append(single_characteristic(entries, "params_total", "parameters (M)", 1e-6, out_dir / "params.png"))
    files.append(single_characteristic(entries, "latency_p50_s", "inference time per caption (s; p50, p95 whisker)", 1.0,
                                       out_dir / "latency.png", "latency_p95_s"))
    files.append(single_characteristic(entries, "gflops", "GFLOPs per caption", 1.0, out_dir / "gflops.png"))
    files.append(pareto_plot(entries, metric, against, out_dir / f"pareto_{metric}_{against}.png", warning))
    return files
