"""Generate the reference docs from the recipe schema, the stages and the click commands.

``python -m compressor.recipe.docs`` rewrites every generated block, each between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers:

* ``README.md``: ``stage-table`` (one line per stage) and ``command-table`` (one line per command);
* ``docs/recipe.md``: ``recipe-reference`` (one table per recipe section: key, type, default, meaning);
* ``docs/cli.md``: ``cli-reference`` (every command's usage and options).

``--check`` writes nothing and exits 1 naming the stale files; a test runs the same check, so the
docs always match the code (``make docs`` regenerates, ``make lint`` checks).

Where the stages come from is decided in one place, :func:`stage_sections`: the recipe
reference's stage sections and the README's stage table both read it.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from compressor.data.formats import formats
from compressor.models.assembly import DEFAULT_FAMILY, parts_classes
from compressor.recipe import schema as S

ROOT = Path(__file__).resolve().parents[2]

#: Recipe sections before the stages: (title, model).
SECTIONS_BEFORE_STAGES: list[tuple[str, type[BaseModel]]] = [
    ("model: {config: …}", S.ConfigModelSpec),
    *[
        ("model: {assemble: {…}}" if name == DEFAULT_FAMILY else f"model: {{assemble: {{family: {name}, …}}}}", cls)
        for name, cls in parts_classes().items()
    ],
    ("data", S.DataSpec),
    ("data.<section> (train, val, eval, test, calibration, source)", S.DataSource),
    ("data.split", S.SplitSpec),
    ("data.columns", S.ColumnsSpec),
    ("generation", S.GenerationSpec),
]
#: Recipe sections after the stages: (title, model).
SECTIONS_AFTER_STAGES: list[tuple[str, type[BaseModel]]] = [
    ("gate", S.GateSpec),
    ("gate.rules.<key>", S.GateRule),
    ("push", S.PushSpec),
    ("report", S.ReportSpec),
    ("search (compress search, docs/search.md)", S.SearchSpec),
    ("search.budget", S.SearchBudget),
]


# ------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class StageSection:
    """One stage as the docs show it.

    Attributes:
        type: the recipe's ``type:`` value.
        config: the stage's pydantic config class.
        description: the first line of the config class's docstring (the stage table's line).
    """

    type: str
    config: type[BaseModel]
    description: str

    @property
    def title(self) -> str:
        """The stage's heading in the recipe reference."""
        return f"stages: type: {self.type}"


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].strip()


def stage_sections() -> list[StageSection]:
    """Every registered stage, in registration order, with its config class and one-line description.

    The only function here that knows where stages are declared: the stage registry
    (:mod:`compressor.stages`); the recipe reference's stage sections, their nested settings and
    the README's stage table are all derived from what it returns.
    """
    from compressor.stages import declarations

    return [StageSection(d.type, d.config, d.description) for d in declarations()]


def _models_in(ann: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, lists, dicts, Annotated)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(ann):
        out += [m for m in _models_in(arg) if m not in out]
    return out


def _nested(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(field path, model) of every model nested in ``model``'s fields, depth first, in field order."""
    out: list[tuple[str, type[BaseModel]]] = []
    for name, f in model.model_fields.items():
        for sub in _models_in(f.annotation):
            out.append((prefix + name, sub))
            out += _nested(sub, f"{prefix}{name}.")
    return out


def _paths_title(prefix: str, paths: list[str]) -> str:
    """``heal.distill``, or ``remove_layers.{a, b}`` for a model reached by several fields."""
    return f"{prefix}.{paths[0]}" if len(paths) == 1 else f"{prefix}.{{{', '.join(paths)}}}"


def _stage_reference_sections() -> list[tuple[str, type[BaseModel]]]:
    """(title, model) of the stage sections: settings shared by several stages first (``stages[].train``),
    then each stage followed by its own nested settings (``heal.distill``)."""
    stages = stage_sections()
    nested = {s.type: _nested(s.config) for s in stages}
    users: dict[type[BaseModel], set[str]] = {}
    for t, pairs in nested.items():
        for _, m in pairs:
            users.setdefault(m, set()).add(t)
    out: list[tuple[str, type[BaseModel]]] = []
    shared: dict[type[BaseModel], list[str]] = {}
    for pairs in nested.values():
        for path, m in pairs:
            if len(users[m]) > 1 and path not in shared.setdefault(m, []):
                shared[m].append(path)
    out += [(_paths_title("stages[]", paths), m) for m, paths in shared.items()]
    for s in stages:
        out.append((s.title, s.config))
        own: dict[type[BaseModel], list[str]] = {}
        for path, m in nested[s.type]:
            if m not in shared and path not in own.setdefault(m, []):
                own[m].append(path)
        out += [(_paths_title(s.type, paths), m) for m, paths in own.items()]
    return out


def stage_table() -> str:
    """Markdown: one line per stage (type, what it does), linking into docs/recipe.md."""
    out = ["| stage | what it does |", "|---|---|"]
    for s in stage_sections():
        out.append(f"| [`{s.type}`](docs/recipe.md#{_anchor(s.title)}) | {_cell(s.description)} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ recipe reference


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


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor(title: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def recipe_reference() -> str:
    """Markdown: one table per recipe section (key, type, default, meaning)."""
    out = []
    top = [("top level", S.recipe_model())]
    for title, model in top + SECTIONS_BEFORE_STAGES + _stage_reference_sections() + SECTIONS_AFTER_STAGES:
        out += [f"#### {title}", ""]
        if _first_line(model.__doc__):
            out += [_first_line(model.__doc__), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            out.append(f"| `{name}` | {_type_name(f.annotation)} | {_default(f)} | {_cell(f.description or '')} |")
        out.append("")
    out += ["#### data formats", "", "| format | reads | section keys |", "|---|---|---|"]
    for f in formats():
        out.append(f"| `{f.name}` | {_cell(f.description)} | {', '.join(f'`{k}`' for k in sorted(f.fields))} |")
    out.append("")
    out.append(
        "Metric and characteristic keys (gate rules, `evaluate.metrics`): "
        + ", ".join(f"`{k}`" for k in S.GATE_KEYS)
        + "."
    )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ commands


def _commands():
    """(name, click command, its context) of every ``compress`` command, sorted by name."""
    import click

    from compressor.cli import cli

    ctx = click.Context(cli, info_name="compress")
    for name in sorted(cli.list_commands(ctx)):
        cmd = cli.get_command(ctx, name)
        yield name, cmd, click.Context(cmd, info_name=name, parent=ctx)


def _help_line(cmd) -> str:
    return (cmd.help or "").strip().split("\n")[0]


def command_table() -> str:
    """Markdown: one line per command (name, first line of its help), linking into docs/cli.md."""
    out = ["| command | what it does |", "|---|---|"]
    for name, cmd, _ in _commands():
        out.append(f"| [`compress {name}`](docs/cli.md#{_anchor('compress ' + name)}) | {_cell(_help_line(cmd))} |")
    return "\n".join(out) + "\n"


def cli_reference() -> str:
    """Markdown: every command's usage and options, from click."""
    import click

    out = []
    for name, cmd, sub in _commands():
        out += [f"#### `compress {name}`", "", _help_line(cmd), "", "```", cmd.get_usage(sub)]
        for p in cmd.get_params(sub):
            rec = p.get_help_record(sub)
            if rec and isinstance(p, click.Option) and "--help" not in rec[0]:
                out.append(f"  {rec[0]:<32} {rec[1]}")
        out += ["```", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ files

#: Generated blocks: marker name → the function that renders its body.
BLOCKS = {
    "stage-table": stage_table,
    "command-table": command_table,
    "recipe-reference": recipe_reference,
    "cli-reference": cli_reference,
}
#: Every file holding generated blocks (relative to the repository root) and its blocks.
TARGETS: dict[str, tuple[str, ...]] = {
    "README.md": ("stage-table", "command-table"),
    "docs/recipe.md": ("recipe-reference",),
    "docs/cli.md": ("cli-reference",),
}


def _replace(text: str, marker: str, body: str, where: str) -> str:
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where} lacks the <!-- {marker}:start/end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def render(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """``{relative path: (current text, regenerated text)}`` for every file of :data:`TARGETS` under ``root``.

    Raises:
        SystemExit: a file lacks one of its markers.
    """
    bodies: dict[str, str] = {}
    out = {}
    for rel, markers in TARGETS.items():
        text = (root / rel).read_text(encoding="utf-8")
        new = text
        for marker in markers:
            if marker not in bodies:
                bodies[marker] = BLOCKS[marker]()
            new = _replace(new, marker, bodies[marker], rel)
        out[rel] = (text, new)
    return out


def stale(root: Path = ROOT) -> list[str]:
    """The files under ``root`` whose generated blocks differ from what the code generates now."""
    return [rel for rel, (old, new) in render(root).items() if old != new]


def write(root: Path = ROOT) -> list[str]:
    """Regenerate every stale file under ``root``; returns the files rewritten."""
    changed = []
    for rel, (old, new) in render(root).items():
        if old != new:
            (root / rel).write_text(new, encoding="utf-8")
            changed.append(rel)
    return changed


def main(argv: list[str] | None = None) -> int:
    """``python -m compressor.recipe.docs [--check]``: regenerate, or exit 1 when anything is stale."""
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        old = stale()
        if old:
            sys.stderr.write(f"stale generated docs: {', '.join(old)}: run `make docs`\n")
            return 1
        return 0
    for rel in write():
        sys.stderr.write(f"regenerated {rel}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
