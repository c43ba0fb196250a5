"""The gate truth table: every rule kind passing and failing, missing and NaN values failing closed,
rule checks, and the three outputs (gate.json, Markdown, JUnit XML that parses)."""

from __future__ import annotations

import json
import math
from xml.etree import ElementTree as ET

import pytest

from eval.gates import (
    RULE_KINDS,
    check_rule,
    evaluate_gate,
    gate_json,
    gate_junit,
    gate_markdown,
    passed,
    rule_problems,
)

# (rule, threshold, candidate, baseline, expected pass, observed)
TRUTH = [
    ("min", 100.0, 100.0, None, True, 100.0),  # the bound itself passes
    ("min", 100.0, 99.9, None, False, 99.9),
    ("max", 0.5, 0.5, None, True, 0.5),
    ("max", 0.5, 0.51, None, False, 0.51),
    ("max_drop", 2.0, 98.0, 100.0, True, 2.0),  # drop = baseline - candidate
    ("max_drop", 2.0, 97.9, 100.0, False, 2.1),
    ("max_drop", 2.0, 120.0, 100.0, True, -20.0),  # an improvement
    ("min_recovery", 0.95, 95.0, 100.0, True, 0.95),
    ("min_recovery", 0.95, 94.0, 100.0, False, 0.94),
    ("max_ratio", 0.8, 0.4, 0.5, True, 0.8),
    ("max_ratio", 0.8, 0.45, 0.5, False, 0.9),
]


@pytest.mark.parametrize("rule,threshold,cand,base,ok,observed", TRUTH)
def test_truth_table(rule, threshold, cand, base, ok, observed):
    v = check_rule("cider", rule, threshold, cand, base)
    assert v.passed is ok
    assert v.observed == pytest.approx(observed)
    assert v.candidate == cand and v.baseline == base


def test_every_rule_kind_has_a_passing_and_a_failing_row():
    kinds = {(r, ok) for r, _, _, _, ok, _ in TRUTH}
    assert kinds == {(r, ok) for r in RULE_KINDS for ok in (True, False)}


@pytest.mark.parametrize("rule", RULE_KINDS)
@pytest.mark.parametrize("missing", [None, math.nan, "NaN", True, "n/a"])
def test_missing_or_nan_candidate_fails_closed(rule, missing):
    v = check_rule("cider", rule, 1.0, missing, 100.0)
    assert not v.passed
    assert "missing or NaN in the candidate" in v.reason


@pytest.mark.parametrize("rule", ["max_drop", "min_recovery", "max_ratio"])
@pytest.mark.parametrize("missing", [None, math.nan])
def test_missing_or_nan_baseline_fails_relative_rules(rule, missing):
    v = check_rule("cider", rule, 1.0, 50.0, missing)
    assert not v.passed and "baseline" in v.reason


@pytest.mark.parametrize("rule", ["min_recovery", "max_ratio"])
def test_zero_baseline_ratio_is_undefined_and_fails(rule):
    v = check_rule("cider", rule, 0.5, 1.0, 0.0)
    assert not v.passed and "undefined" in v.reason


def test_absolute_rules_need_no_baseline():
    assert check_rule("cider", "min", 10.0, 20.0).passed
    assert not check_rule("cider", "max", 10.0, 20.0).passed


def test_evaluate_gate_missing_key_fails_and_order_kept():
    rules = {"cider": {"max_drop": 2.0, "min": 50.0}, "bleu_4": {"min_recovery": 0.9}, "latency_p50_s": {"max_ratio": 0.8}}
    cand = {"cider": 99.0, "bleu_4": 30.0}  # latency missing
    base = {"cider": 100.0, "bleu_4": 31.0, "latency_p50_s": 1.0}
    vs = evaluate_gate(rules, cand, base)
    assert [(v.key, v.rule) for v in vs] == [
        ("cider", "max_drop"), ("cider", "min"), ("bleu_4", "min_recovery"), ("latency_p50_s", "max_ratio")
    ]
    assert [v.passed for v in vs] == [True, True, True, False]
    assert not passed(vs)
    assert passed(vs[:3])
    assert not passed([])  # no rule is not a pass


def test_rule_problems():
    assert rule_problems("cider", "max_drop", 2.0) == []
    assert "at least 0" in rule_problems("cider", "max_drop", -1.0)[0]
    assert "finite" in rule_problems("cider", "min", math.nan)[0]
    assert "above 0" in rule_problems("cider", "min_recovery", 0.0)[0]
    assert "use max_ratio" in rule_problems("perplexity", "max_drop", 1.0)[0]
    assert "use max_ratio" in rule_problems("latency_p50_s", "max_drop", 1.0)[0]
    assert "unknown rule" in rule_problems("cider", "min_drop", 1.0)[0]


def test_outputs_json_markdown_junit():
    vs = evaluate_gate({"cider": {"max_drop": 2.0}, "bleu_4": {"min": 10.0}}, {"cider": 50.0, "bleu_4": 12.0}, {"cider": 100.0})
    g = json.loads(json.dumps(gate_json(vs, "cand.json", "base.json")))
    assert g["passed"] is False and g["candidate"] == "cand.json" and g["baseline"] == "base.json"
    assert [(v["key"], v["passed"]) for v in g["verdicts"]] == [("cider", False), ("bleu_4", True)]
    assert g["verdicts"][0]["observed"] == pytest.approx(50.0)
    md = gate_markdown(vs)
    assert "**Gate: FAILED**" in md
    assert "| cider | max_drop | 2 | 100 | 50 | 50 | **FAIL** |" in md
    assert "| bleu_4 | min | 10 | — | 12 | 12 | pass |" in md
    root = ET.fromstring(gate_junit(vs, "my gate"))
    suite = root.find("testsuite")
    assert suite.get("name") == "my gate" and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["cider:max_drop", "bleu_4:min"]
    fail = cases[0].find("failure")
    assert fail is not None and "cider" in fail.get("message") and "drop 50 > 2" in fail.text
    assert cases[1].find("failure") is None


def test_junit_escapes_odd_text():
    vs = evaluate_gate({"cider": {"min": 1.0}}, {"cider": None})
    xml = gate_junit(vs, 'gate "<&>"')
    assert ET.fromstring(xml).find("testsuite").get("name") == 'gate "<&>"'
