"""``compress gate CANDIDATE --baseline B --rule KEY:RULE=VALUE…``: metric regressions, no model loaded.

Reads ``eval.json`` records (``compress eval``, the ``evaluate`` stage), a run's ``report.json``
with ``--candidate LABEL --baseline LABEL``, or a flat ``{"metric": value}`` object. Exit 1 on a
regression, 2 on a bad rule or file.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from compressor.commands._common import Ctx, echo_json


def _parse_rule(text: str) -> tuple[str, str, float]:
    """``cider:max_drop=2`` → ``("cider", "max_drop", 2.0)``.

    Raises:
        UserInputError: the text is malformed, or names an unknown key or rule, or a value the
            rule refuses (e.g. ``max_drop`` on a metric where lower is better).
    """
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
    """The JSON object in ``path``.

    Raises:
        UserInputError: unreadable, not JSON, or not an object.
    """
    from compressor.errors import UserInputError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected an eval.json or report.json object, got a {type(data).__name__}")
    return data


def _load_eval_values(path: Path, label: str | None) -> dict:
    """Flat ``{key: value}`` of an eval.json, of one label of a report.json, or of a flat object.

    Raises:
        UserInputError: a report without (or with an unknown) label, or a file holding no metrics.
    """
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


@click.command()
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
        echo_json(result)
    else:
        click.echo(gate_markdown(verdicts))
    if not passed(verdicts):
        raise GateFailed("the gate failed: " + "; ".join(f"{v.key} {v.rule} ({v.reason})" for v in verdicts if not v.passed))
