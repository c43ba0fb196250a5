"""Generate the README's recipe and CLI references from the schema and the click commands.

``python -m compressor.recipe.docs`` rewrites the sections of README.md between the
``<!-- recipe-reference -->`` and ``<!-- cli-reference -->`` markers; a test fails when the
README is out of date, so the reference always matches the code.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from compressor.recipe import schema as S

README = Path(__file__).resolve().parents[2] / "README.md"

TOP_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("model: {config: …}", S.ConfigModelSpec),
    ("model: {assemble: {…}}", S.AssembleParts),
    ("data", S.DataSpec),
    ("data.<section> (train, val, eval, test, calibration, source)", S.DataSource),
    ("data.split", S.SplitSpec),
    ("generation", S.GenerationSpec),
]
TAIL_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("gate", S.GateSpec),
    ("gate.rules.<key>", S.GateRule),
    ("push", S.PushSpec),
    ("report", S.ReportSpec),
]


def stage_sections() -> list[tuple[str, type[BaseModel]]]:
    """``(title, model)`` of every registered stage and the sub-models it declares (``docs``), in
    registration order, each documented once: all from the stage registry (:mod:`compressor.stages`)."""
    from compressor.stages import declarations

    out: list[tuple[str, type[BaseModel]]] = []
    seen: set[type] = set()
    for decl in declarations():
        for title, model in ((f"stages: type: {decl.type}", decl.config), *decl.docs):
            if model not in seen:
                seen.add(model)
                out.append((title, model))
    return out


def sections() -> list[tuple[str, type[BaseModel]]]:
    """Every documented section: the top level, model/data/generation, the stages, gate/push/report."""
    return [("top level", S.recipe_model()), *TOP_SECTIONS, *stage_sections(), *TAIL_SECTIONS]


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(ann))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if ann is S.recipe_model().model_fields["stages"].annotation:
        return "list[stage]"
    if origin in (list, tuple):
        args = typing.get_args(ann)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        k, v = typing.get_args(ann)
        return f"map[{_type_name(k)}→{_type_name(v)}]"
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        try:
            val = field.default_factory()
        except TypeError:
            return "—"
        if isinstance(val, BaseModel):
            return "(defaults)"
        return f"`{val}`" if val not in ([], {}) else f"`{val!r}`"
    d = field.default
    if d is PydanticUndefined:
        return "—"
    return f"`{'null' if d is None else d}`"


def recipe_reference() -> str:
    """Markdown: one table per recipe section (key, type, default, meaning)."""
    out = []
    for title, model in sections():
        out += [f"#### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{name}` | {_type_name(f.annotation)} | {_default(f)} | {desc} |")
        out.append("")
    out.append(
        "Metric and characteristic keys (gate rules, `evaluate.metrics`): "
        + ", ".join(f"`{k}`" for k in S.GATE_KEYS)
        + "."
    )
    return "\n".join(out) + "\n"


def cli_reference() -> str:
    """Markdown: every command's usage and options, from click."""
    import click

    from compressor.cli import cli

    ctx = click.Context(cli, info_name="compress")
    out = []
    for name in sorted(cli.list_commands(ctx)):
        cmd = cli.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out += [f"#### `compress {name}`", "", (cmd.help or "").strip().split("\n")[0], "", "```", cmd.get_usage(sub)]
        for p in cmd.get_params(sub):
            rec = p.get_help_record(sub)
            if rec and isinstance(p, click.Option) and "--help" not in rec[0]:
                out.append(f"  {rec[0]:<32} {rec[1]}")
        out += ["```", ""]
    return "\n".join(out)


def _replace(text: str, marker: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the <!-- {marker}:start/end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def render_readme(text: str) -> str:
    text = _replace(text, "recipe-reference", recipe_reference())
    return _replace(text, "cli-reference", cli_reference())


if __name__ == "__main__":
    new = render_readme(README.read_text())
    if "--check" in sys.argv:
        sys.exit(0 if new == README.read_text() else 1)
    README.write_text(new)
