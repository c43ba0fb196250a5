"""Plots (matplotlib Agg PNGs) and the across-runs comparison table."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image

from eval.plots import experiment_plots, metric_bars, pareto_front, run_plots
from eval.reports import experiments_csv, experiments_from_reports, experiments_markdown

GREY = (0x8C, 0x8C, 0x8C)
BLUE = (31, 119, 180)  # tab10's first colour: the first non-baseline entry


def _ev(cider, bleu, params, latency, fp="x"):
    return {
        "metrics": {"cider": cider, "bleu_4": bleu},
        "characteristics": {"params_total": params, "params_vision": params // 4, "params_qformer": params // 4,
                            "params_projection": 100, "params_language_model": params // 2 - 100,
                            "gflops": params / 1e6, "latency_p50_s": latency, "latency_p95_s": latency * 1.1, "size_mb": 1.0},
        "data": {"fingerprint": fp, "examples": 8},
    }


def _report(name, base, cand, passed=True):
    return {"recipe": name, "recipe_hash": "ab" * 32, "evaluations": {"baseline": base, "candidate": cand},
            "gate": {"passed": passed, "candidate": "candidate", "baseline": "baseline", "summary": "ok"}}


def _colors(path):
    img = Image.open(path).convert("RGB")
    return {c for _, c in img.getcolors(maxcolors=1 << 20)}


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [(1.0, 10.0), (2.0, 12.0), (3.0, 11.0), (0.5, 5.0), (2.0, 9.0)]
    assert pareto_front(pts) == [3, 0, 1]
    # lower-is-better metric (perplexity): (0.5, 5) dominates everything with larger x
    assert pareto_front(pts, higher_is_better=False) == [3]


def test_shared_baseline_is_shown_once_and_candidates_are_named_by_run():
    base = _ev(80.0, 30.0, 1000, 0.5)
    entries = experiments_from_reports([("llm28", _report("a", base, _ev(78.0, 29.0, 900, 0.4))),
                                        ("q8", _report("b", dict(base), _ev(79.0, 29.5, 950, 0.45), passed=False))])
    assert [(e["name"], e["role"], e["gate"]) for e in entries] == [
        ("baseline", "baseline", None), ("llm28", "candidate", True), ("q8", "candidate", False)]
    # a different baseline (other data) is kept and named after its run
    other = experiments_from_reports([("a", _report("a", base, _ev(1, 1, 1, 1))),
                                      ("b", _report("b", _ev(80.0, 30.0, 1000, 0.5, fp="y"), _ev(2, 2, 2, 2)))])
    assert [e["name"] for e in other] == ["a:baseline", "b:baseline", "a", "b"]


def test_combined_table_markdown_and_csv():
    base = _ev(80.0, 30.0, 1_000_000, 0.5)
    entries = experiments_from_reports([("llm28", _report("a", base, _ev(78.0, 29.0, 900_000, 0.4)))])
    md = experiments_markdown(entries)
    assert md.splitlines()[0].startswith("| experiment | run | label | bleu_4 | cider | params_total |")
    assert "| llm28 | llm28 | candidate | 29.00 | 78.00 | 0.900M |" in md and "passed" in md
    rows = list(csv.DictReader(io.StringIO(experiments_csv(entries))))
    assert [r["experiment"] for r in rows] == ["baseline", "llm28"]
    assert float(rows[1]["cider"]) == 78.0 and rows[1]["gate_passed"] == "True" and rows[0]["gate_passed"] == ""


def test_run_plots_draw_baseline_and_candidate_bars(tmp_path):
    report = {"recipe": "r", "evaluations": {"baseline": _ev(80.0, 30.0, 1000, 0.5), "candidate": _ev(60.0, 20.0, 800, 0.3)},
              "gate": {"baseline": "baseline", "candidate": "candidate"}}
    files = run_plots(tmp_path, report)
    assert [f.name for f in files] == ["metrics.png", "characteristics.png"]
    for f in files:
        img = Image.open(f)
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
        colours = _colors(f)
        assert GREY in colours and BLUE in colours  # baseline grey and candidate blue bars are drawn
    assert not list(tmp_path.glob(".*.tmp"))


def test_metric_bars_without_metrics_draws_nothing(tmp_path):
    assert metric_bars(["a"], [{"metrics": {}}], tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()


def test_experiment_plots_write_every_figure(tmp_path):
    base = _ev(80.0, 30.0, 1000, 0.5)
    entries = experiments_from_reports([("a", _report("a", base, _ev(78.0, 29.0, 900, 0.4))),
                                        ("b", _report("b", base, _ev(70.0, 25.0, 700, 0.6)))])
    files = experiment_plots(entries, tmp_path, "cider", "params")
    assert [f.name for f in files] == ["metrics.png", "params.png", "latency.png", "gflops.png", "pareto_cider_params.png"]
    for f in files:
        assert Image.open(f).format == "PNG"
    with pytest.raises(ValueError, match="against must be one of"):
        experiment_plots(entries, tmp_path, "cider", "memory")


def test_perplexity_gets_its_own_panel(tmp_path):
    """Perplexity (lower is better, another scale) is drawn beside the ×100 metrics, not among them."""
    evals = [{"metrics": {"cider": 80.0, "perplexity": 12.0}}, {"metrics": {"cider": 70.0, "perplexity": 15.0}}]
    wide = metric_bars(["baseline", "candidate"], evals, tmp_path / "with.png", roles=["baseline", ""])
    narrow = metric_bars(["baseline", "candidate"], [{"metrics": {"cider": 80.0}}, {"metrics": {"cider": 70.0}}],
                         tmp_path / "without.png", roles=["baseline", ""])
    assert Image.open(wide).size[0] > Image.open(narrow).size[0]


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plots would save, kept open for inspection."""
    import eval.plots

    kept = []
    monkeypatch.setattr(eval.plots, "save_png", lambda fig, path: kept.append(fig) or path)
    return kept


def test_cider_gets_its_own_panel_and_different_data_is_flagged(tmp_path, figures):
    """CIDEr (~290) does not squash BLEU (~30) on one axis; a Pareto plot across runs evaluated on different
    data says so, and labels of nearby points do not overprint (issue 20, reports)."""
    from eval.plots import _label_offset
    from eval.reports import data_groups

    metric_bars(["a", "b"], [_ev(290.0, 30.0, 1000, 0.5), _ev(280.0, 29.0, 900, 0.4)], tmp_path / "m.png")
    axes = figures[-1].axes
    assert len(axes) == 2 and axes[0].get_ylim()[1] < 60 and axes[1].get_ylim()[1] > 280
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["cider"]

    base = _ev(80.0, 30.0, 1000, 0.5)
    same = experiments_from_reports([("a", _report("a", base, _ev(78.0, 29.0, 900, 0.4))),
                                     ("b", _report("b", base, _ev(70.0, 25.0, 700, 0.6)))])
    assert len(data_groups(same)) == 1
    mixed = experiments_from_reports([("a", _report("a", base, _ev(78.0, 29.0, 900, 0.4))),
                                      ("b", _report("b", _ev(80.0, 30.0, 1000, 0.5, fp="y"), _ev(70.0, 25.0, 700, 0.6, fp="y")))])
    assert data_groups(mixed) == {"x": ["a:baseline", "a"], "y": ["b:baseline", "b"]}
    experiment_plots(mixed, tmp_path, "cider", "params", warning="different data: not comparable")
    assert "different data" in figures[-1].axes[0].get_title()
    assert [_label_offset([(1.0, 1.0), (1.01, 1.0), (5.0, 9.0)], i) for i in range(3)] == [5.0, -5.0, 5.0]
