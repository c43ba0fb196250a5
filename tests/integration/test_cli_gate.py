"""`compress gate` as CI calls it: eval.json files in, exit code, gate.json, Markdown and JUnit out.
No model is loaded. The regression case runs the real CLI in a subprocess; the others run the same
click command in-process (click's CliRunner), which is much faster on a loaded machine."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest

from tests.conftest import run_cli
from tests.integration.inprocess import run_inprocess


def gate_cli(*args: str):
    """``compress gate ARGS`` in-process."""
    return run_inprocess("gate", *args)


def _eval(path, metrics, chars=None):
    path.write_text(json.dumps({"label": path.stem, "metrics": metrics, "characteristics": chars or {}}))
    return path


@pytest.fixture
def evals(tmp_path):
    base = _eval(tmp_path / "base.json", {"cider": 120.0, "bleu_4": 30.0}, {"latency_p50_s": 1.0, "params_total": 100})
    good = _eval(tmp_path / "good.json", {"cider": 119.0, "bleu_4": 29.5}, {"latency_p50_s": 0.7, "params_total": 90})
    bad = _eval(tmp_path / "bad.json", {"cider": 60.0, "bleu_4": 29.5}, {"latency_p50_s": 0.7, "params_total": 90})
    return base, good, bad


def test_gate_passes_and_writes_outputs(evals, tmp_path):
    base, good, _ = evals
    r = gate_cli(str(good), "--baseline", str(base), "--rule", "cider:max_drop=2", "--rule", "bleu_4:min_recovery=0.95",
                "--rule", "latency_p50_s:max_ratio=0.8", "--rule", "params_total:max=95",
                "--junit", str(tmp_path / "g.xml"), "--out", str(tmp_path / "gate.json"), "--markdown", str(tmp_path / "g.md"))
    assert r.returncode == 0, r.stderr
    assert "**Gate: PASSED**" in r.stdout
    g = json.loads((tmp_path / "gate.json").read_text())
    assert g["passed"] is True and len(g["verdicts"]) == 4
    suite = ET.parse(tmp_path / "g.xml").getroot().find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "0"
    assert "**Gate: PASSED**" in (tmp_path / "g.md").read_text()


def test_gate_regression_exits_1_with_junit_failure_naming_the_metric(evals, tmp_path):
    base, _, bad = evals
    r = run_cli("gate", str(bad), "--baseline", str(base), "--rule", "cider:max_drop=2", "--rule", "bleu_4:max_drop=2",
                "--junit", str(tmp_path / "g.xml"), "--out", str(tmp_path / "gate.json"))
    assert r.returncode == 1, r.stderr
    assert "cider max_drop" in r.stderr
    failures = [c for c in ET.parse(tmp_path / "g.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["cider:max_drop"]
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is False


def test_gate_missing_and_null_metric_fail_closed(evals, tmp_path):
    base, _, _ = evals
    cand = _eval(tmp_path / "c.json", {"cider": None})  # NaN is written as null
    r = gate_cli(str(cand), "--baseline", str(base), "--rule", "cider:max_drop=2", "--rule", "bleu_4:min=1")
    assert r.returncode == 1
    assert "cider is missing or NaN in the candidate" in r.stdout + r.stderr
    assert "bleu_4 is missing or NaN in the candidate" in r.stdout + r.stderr


@pytest.mark.parametrize(
    "rule,expect",
    [
        ("cidr:max_drop=2", "unknown metric key 'cidr'. Did you mean 'cider'?"),
        ("cider:max_dorp=2", "Did you mean 'max_drop'?"),
        ("cider:max_drop=two", "the value 'two' is not a number"),
        ("cider-max_drop=2", "expected KEY:RULE=VALUE"),
        ("cider:max_drop=-1", "at least 0"),
        ("perplexity:max_drop=1", "use max_ratio"),
        ("cider:min=nan", "finite"),
    ],
)
def test_bad_rules_exit_2_and_write_nothing(evals, tmp_path, rule, expect):
    base, good, _ = evals
    r = gate_cli(str(good), "--baseline", str(base), "--rule", rule, "--junit", str(tmp_path / "g.xml"),
                "--out", str(tmp_path / "gate.json"))
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr
    assert not (tmp_path / "g.xml").exists() and not (tmp_path / "gate.json").exists()


def test_relative_rule_needs_baseline(evals):
    _, good, _ = evals
    r = gate_cli(str(good), "--rule", "cider:max_drop=2")
    assert r.returncode == 2 and "need --baseline" in r.stderr


def test_gate_on_report_labels(tmp_path):
    report = {"evaluations": {
        "baseline": {"metrics": {"cider": 100.0}, "characteristics": {"latency_p50_s": 1.0}},
        "candidate": {"metrics": {"cider": 90.0}, "characteristics": {"latency_p50_s": 0.5}},
    }}
    p = tmp_path / "report.json"
    p.write_text(json.dumps(report))
    ok = gate_cli(str(p), "--candidate", "candidate", "--baseline", "baseline", "--rule", "cider:min_recovery=0.9",
                 "--rule", "latency_p50_s:max_ratio=0.6")
    assert ok.returncode == 0, ok.stderr
    bad = gate_cli(str(p), "--candidate", "candidate", "--baseline", "baseline", "--rule", "cider:min_recovery=0.95")
    assert bad.returncode == 1
    nolabel = gate_cli(str(p), "--baseline", "baseline", "--rule", "cider:min=1")
    assert nolabel.returncode == 2 and "pass --candidate" in nolabel.stderr
    wrong = gate_cli(str(p), "--candidate", "cand", "--baseline", "baseline", "--rule", "cider:min=1")
    assert wrong.returncode == 2 and "no evaluation labelled 'cand'" in wrong.stderr


def test_gate_unreadable_json_exits_2(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    r = gate_cli(str(p), "--rule", "cider:min=1")
    assert r.returncode == 2 and "cannot read it as JSON" in r.stderr


def test_gate_on_a_file_that_is_not_an_evaluation_exits_2(evals, tmp_path):
    """A wrong file passed in CI is bad input (2), never a regression (1)."""
    base, _, _ = evals
    p = tmp_path / "captions.json"
    p.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}))
    r = gate_cli(str(p), "--baseline", str(base), "--rule", "cider:min=1")
    assert r.returncode == 2 and "holds no metrics" in r.stderr, r.stderr


def test_errors_are_json_on_stdout_with_json(evals):
    base, good, _ = evals
    r = run_inprocess("--json", "gate", str(good), "--baseline", str(base), "--rule", "cidr:max_drop=2")
    assert r.returncode == 2
    err = json.loads(r.stdout)
    assert err["exit_code"] == 2 and "cidr" in err["error"]
