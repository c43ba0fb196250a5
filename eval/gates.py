"""Regression gates: rules over metrics and characteristics, failing closed.

Rules (DESIGN.md "Gate rules"): ``min`` / ``max`` (absolute), ``max_drop`` (baseline −
candidate, points on the 0–100 scale, for higher-is-better metrics), ``min_recovery``
(candidate / baseline at least this, llm-compressor's recovery), ``max_ratio`` (candidate /
baseline at most this: latency, size, perplexity). A missing or NaN value fails its rule; an
unknown key is a usage error. Outputs: a verdict table, ``gate.json``, Markdown and JUnit XML.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any
from xml.etree import ElementTree as ET

from eval.metrics import higher_is_better

RULE_KINDS = ("min", "max", "max_drop", "min_recovery", "max_ratio")
RELATIVE = ("max_drop", "min_recovery", "max_ratio")


def lower_is_better(key: str) -> bool:
    """True for keys where a smaller value is the better one (perplexity, latency, memory, size,
    parameters and GFLOPs, per part included): a ``max_drop`` on them would pass every regression.
    The direction is the metric table's (:func:`eval.metrics.higher_is_better`)."""
    return not higher_is_better(key)


def rule_problems(key: str, rule: str, threshold: float) -> list[str]:
    """What is wrong with one rule, before any value is read (empty when it is sound).

    Args:
        key: the metric or characteristic key.
        rule: the rule kind.
        threshold: its value.

    Returns:
        Human-readable problems: an unknown rule kind, a NaN or infinite threshold, a negative
        ``max_drop``, a non-positive ratio, or ``max_drop`` on a key where lower is better
        (``perplexity``, latency, size: use ``max_ratio``).
    """
    out = []
    if rule not in RULE_KINDS:
        out.append(f"unknown rule '{rule}'; expected one of {', '.join(RULE_KINDS)}")
        return out
    if not math.isfinite(threshold):
        out.append(f"{key}:{rule}: the threshold must be a finite number, got {threshold}")
    elif rule == "max_drop" and threshold < 0:
        out.append(f"{key}:max_drop: a drop is in points and at least 0, got {threshold:g}")
    elif rule in ("min_recovery", "max_ratio") and threshold <= 0:
        out.append(f"{key}:{rule}: a ratio must be above 0, got {threshold:g}")
    if rule == "max_drop" and lower_is_better(key):
        out.append(f"{key}:max_drop: max_drop is for metrics where higher is better; for {key} use max_ratio (or max)")
    return out


@dataclass
class Verdict:
    """One rule on one key.

    Attributes:
        key: metric or characteristic key (``cider``, ``latency_p50_s`` …).
        rule: rule kind.
        threshold: the rule's value.
        candidate: the candidate's value (None if missing).
        baseline: the baseline's value (relative rules), else None.
        observed: what the rule compared (the value, the drop, or the ratio).
        passed: whether the rule holds.
        reason: a one-line explanation.
    """

    key: str
    rule: str
    threshold: float
    candidate: float | None
    baseline: float | None
    observed: float | None
    passed: bool
    reason: str


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def check_rule(key: str, rule: str, threshold: float, candidate: Any, baseline: Any = None) -> Verdict:
    """Evaluate one rule; missing or NaN values fail (fail closed).

    Args:
        key: the metric or characteristic key.
        rule: ``min``, ``max``, ``max_drop``, ``min_recovery`` or ``max_ratio``.
        threshold: the rule's value (points on the 0-100 scale for ``max_drop``; a ratio for
            ``min_recovery`` / ``max_ratio``; the key's own unit for ``min`` / ``max``).
        candidate: the candidate's value (any number; None, NaN, a bool or text fail).
        baseline: the baseline's value (relative rules).

    Returns:
        The verdict. ``max_drop`` compares ``baseline - candidate``; ``min_recovery`` and
        ``max_ratio`` compare ``candidate / baseline`` (a zero baseline fails: undefined).

    Raises:
        ValueError: an unknown rule kind.
    """
    c, b = _num(candidate), _num(baseline)
    if c is None:
        return Verdict(key, rule, threshold, None, b, None, False, f"{key} is missing or NaN in the candidate")
    if rule in RELATIVE and b is None:
        return Verdict(key, rule, threshold, c, None, None, False, f"{key} is missing or NaN in the baseline")
    if rule == "min":
        ok = c >= threshold
        return Verdict(key, rule, threshold, c, b, c, ok, f"{c:.4g} {'≥' if ok else '<'} {threshold:g}")
    if rule == "max":
        ok = c <= threshold
        return Verdict(key, rule, threshold, c, b, c, ok, f"{c:.4g} {'≤' if ok else '>'} {threshold:g}")
    if rule == "max_drop":
        drop = b - c
        ok = drop <= threshold
        return Verdict(key, rule, threshold, c, b, drop, ok, f"drop {drop:.4g} {'≤' if ok else '>'} {threshold:g}")
    if b == 0:
        return Verdict(key, rule, threshold, c, b, None, False, f"{key} is 0 in the baseline: the ratio is undefined")
    ratio = c / b
    if rule == "min_recovery":
        ok = ratio >= threshold
        return Verdict(key, rule, threshold, c, b, ratio, ok, f"recovery {ratio:.4g} {'≥' if ok else '<'} {threshold:g}")
    if rule == "max_ratio":
        ok = ratio <= threshold
        return Verdict(key, rule, threshold, c, b, ratio, ok, f"ratio {ratio:.4g} {'≤' if ok else '>'} {threshold:g}")
    raise ValueError(f"unknown rule kind '{rule}'")


def evaluate_gate(
    rules: dict[str, dict[str, float]], candidate: dict[str, Any], baseline: dict[str, Any] | None = None
) -> list[Verdict]:
    """Evaluate every rule.

    Args:
        rules: key → {rule kind: threshold} (e.g. ``{"cider": {"max_drop": 2.0}}``).
        candidate: the candidate's flat values (metrics and characteristics).
        baseline: the baseline's flat values, needed by relative rules.

    Returns:
        One verdict per (key, rule), in the order given.
    """
    out = []
    for key, kinds in rules.items():
        for rule, threshold in kinds.items():
            if threshold is None:
                continue
            out.append(check_rule(key, rule, float(threshold), candidate.get(key), (baseline or {}).get(key)))
    return out


def passed(verdicts: list[Verdict]) -> bool:
    """True when every verdict passed and there is at least one (no rule is not a pass)."""
    return bool(verdicts) and all(v.passed for v in verdicts)


def gate_json(verdicts: list[Verdict], candidate_label: str, baseline_label: str | None) -> dict[str, Any]:
    """The machine-readable verdict (``gate.json``): passed, labels, one entry per rule."""
    return {
        "passed": passed(verdicts),
        "candidate": candidate_label,
        "baseline": baseline_label,
        "verdicts": [asdict(v) for v in verdicts],
    }


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def gate_markdown(verdicts: list[Verdict]) -> str:
    """A Markdown verdict table."""
    lines = [
        f"**Gate: {'PASSED' if passed(verdicts) else 'FAILED'}**",
        "",
        "| key | rule | threshold | baseline | candidate | observed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        lines.append(
            f"| {v.key} | {v.rule} | {v.threshold:g} | {_fmt(v.baseline)} | {_fmt(v.candidate)} | {_fmt(v.observed)} | "
            f"{'pass' if v.passed else '**FAIL**'} |"
        )
    return "\n".join(lines) + "\n"


def gate_junit(verdicts: list[Verdict], name: str = "vlm-compress gate") -> str:
    """JUnit XML: one testcase per rule, a ``<failure>`` for each failed rule (CI systems read it)."""
    suite = ET.Element(
        "testsuite",
        name=name,
        tests=str(len(verdicts)),
        failures=str(sum(not v.passed for v in verdicts)),
        errors="0",
        skipped="0",
    )
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", classname="gate", name=f"{v.key}:{v.rule}")
        if not v.passed:
            fail = ET.SubElement(case, "failure", message=f"{v.key} {v.rule} {v.threshold:g}: {v.reason}", type="regression")
            fail.text = v.reason
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
