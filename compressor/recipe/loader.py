"""Load a recipe YAML with line numbers kept, apply ``--set`` overrides, validate, report all errors.

Every problem is reported as ``FILE:LINE: field.path: what is wrong. Did you mean 'x'?`` and all
problems are reported at once (a :class:`~compressor.errors.RecipeError`, exit 2). Nothing is
written by loading.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from compressor.errors import RecipeError, did_you_mean
from compressor.recipe.schema import cross_check, recipe_model

Path_ = tuple[Any, ...]


@dataclass
class LoadedRecipe:
    """A validated recipe and where it came from.

    Attributes:
        recipe: the validated model, defaults filled in.
        source: the YAML file it was read from.
        lines: field path → YAML line (1-based), or the ``--set`` text that set it.
        overrides: the ``--set`` strings applied, in order.
        fast_dev_run: training steps per stage when the recipe was cut to a fast dev run
            (:mod:`compressor.recipe.dev_run`), else None.
    """

    recipe: Any
    source: Path
    lines: dict[Path_, int | str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    fast_dev_run: int | None = None

    def resolved_dict(self) -> dict:
        """The recipe with every default made explicit (what ``recipe.resolved.yaml`` holds)."""
        return self.recipe.model_dump(mode="json")

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved_dict(), sort_keys=False, allow_unicode=True)

    def hash(self) -> str:
        """SHA-256 (hex) of the resolved recipe as canonical JSON."""
        import hashlib

        text = json.dumps(self.resolved_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------


def _compose(text: str, source: str) -> tuple[Any, dict[Path_, int], list[str]]:
    """Parse YAML into plain data plus a path → line map; duplicate keys are problems."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:  # syntax error: one problem, with its line
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RecipeError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    lines: dict[Path_, int] = {}
    problems: list[str] = []
    constructor = yaml.SafeLoader("")

    def build(n: yaml.Node, path: Path_) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k_node, v_node in n.value:
                key = constructor.construct_object(k_node, deep=True)
                if key in out:
                    problems.append(
                        f"{source}:{k_node.start_mark.line + 1}: {_fmt(path + (key,))}: key given twice "
                        f"(first on line {lines[path + (key,)]}); keep one"
                    )
                lines[path + (key,)] = k_node.start_mark.line + 1
                out[key] = build(v_node, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    data = build(node, ()) if node is not None else None
    return data, lines, problems


# --------------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------------


def apply_override(data: dict, text: str) -> Path_:
    """Apply one ``key.sub=value`` (or ``stages.N.key=value``) override in place.

    The value is parsed as YAML (``3`` → int, ``true`` → bool, ``{a: 1}`` → mapping,
    ``null`` → None).

    Returns:
        The field path that was set.

    Raises:
        RecipeError: malformed override or an index/path that does not exist.
    """
    if "=" not in text:
        raise RecipeError([f"--set {text}: expected key.path=value"])
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(p == "" for p in parts):
        raise RecipeError([f"--set {text}: expected key.path=value, e.g. stages.3.train.steps=100"])
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError([f"--set {text}: the value is not valid YAML: {exc}"]) from None
    cur: Any = data
    path: list[Any] = []
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not p.lstrip("-").isdigit():
                raise RecipeError([f"--set {text}: {_fmt(tuple(path))} is a list; use an index, e.g. {'.'.join([*map(str, path), '0'])}"])
            idx = int(p)
            if not -len(cur) <= idx < len(cur):
                raise RecipeError([f"--set {text}: {_fmt(tuple(path))} has {len(cur)} items (0..{len(cur) - 1}), no index {idx}"])
            idx %= len(cur)
            path.append(idx)
            if last:
                cur[idx] = value
            else:
                cur = cur[idx]
        elif isinstance(cur, dict):
            path.append(p)
            if last:
                cur[p] = value
            else:
                if cur.get(p) is None:
                    cur[p] = {}
                cur = cur[p]
        else:
            raise RecipeError([f"--set {text}: {_fmt(tuple(path))} is a single value, it has no '{p}'"])
    return tuple(path)


# --------------------------------------------------------------------------------------------
# Errors → messages
# --------------------------------------------------------------------------------------------


def _fmt(path: Path_) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _clean_loc(loc: Path_, data: Any) -> Path_:
    """Drop pydantic's union tags from an error location by walking the data alongside it."""
    out: list[Any] = []
    cur = data
    for i, elem in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(cur, dict) and elem in cur:
            out.append(elem)
            cur = cur[elem]
        elif isinstance(cur, list) and isinstance(elem, int) and 0 <= elem < len(cur):
            out.append(elem)
            cur = cur[elem]
        elif last and isinstance(cur, dict):
            out.append(elem)
        # else: a union tag (stage type, 'str', 'list[str]', …): skip
    return tuple(out)


def _unwrap(ann: Any) -> list[Any]:
    """The candidate types of an annotation (Optional/Union/Annotated unwrapped)."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(ann)[0])
    if origin in (Union, types.UnionType):
        out: list[Any] = []
        for a in typing.get_args(ann):
            out.extend(_unwrap(a))
        return out
    return [ann]


def _pick(cands: list[Any], value: Any) -> Any:
    """Choose the union member that fits ``value`` (by stage type, then by shared keys)."""
    models = [c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)]
    containers = [c for c in cands if typing.get_origin(c) in (list, dict)]
    if isinstance(value, dict) and models:
        if "type" in value:
            for m in models:
                f = m.model_fields.get("type")
                if f is not None and value["type"] in typing.get_args(f.annotation):
                    return m
        return max(models, key=lambda m: len(set(value) & set(m.model_fields)))
    if isinstance(value, (list, dict)) and containers:
        return containers[0]
    return models[0] if models else (containers[0] if containers else None)


def model_class_at(path: Path_, data: Any) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path`` in ``data`` (None if not a model)."""
    ann: Any = recipe_model()
    cur = data
    for elem in path:
        target = _pick(_unwrap(ann), cur)
        if target is None:
            return None
        if isinstance(target, type) and issubclass(target, BaseModel):
            f = target.model_fields.get(elem)
            if f is None:
                return None
            ann = f.annotation
        else:  # list[...] or dict[str, ...]
            args = typing.get_args(target)
            ann = args[-1] if args else Any
        cur = cur[elem] if isinstance(cur, (dict, list)) and _has(cur, elem) else None
    target = _pick(_unwrap(ann), cur)
    return target if isinstance(target, type) and issubclass(target, BaseModel) else None


def _has(container: Any, key: Any) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(key, int) and 0 <= key < len(container)


def _line(path: Path_, lines: dict[Path_, int | str]) -> int | str | None:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _message(err: dict, path: Path_, data: Any) -> str:
    typ = err["type"]
    ctx = err.get("ctx") or {}
    if typ == "extra_forbidden":
        parent = model_class_at(path[:-1], data)
        valid = sorted(parent.model_fields) if parent is not None else []
        return (
            f"unknown key '{path[-1]}'; expected one of: {', '.join(valid)}.{did_you_mean(path[-1], valid)}"
        )
    if typ == "missing":
        return f"missing required key '{path[-1]}'" if path else "missing"
    if typ in ("union_tag_invalid", "union_tag_not_found") and "type" in str(ctx.get("discriminator", "")):
        tag = ctx.get("tag")
        from compressor.stages import stage_types

        types_ = stage_types()
        if tag is None:
            return f"missing `type:`; expected one of: {', '.join(types_)}"
        return f"unknown stage type '{tag}'; expected one of: {', '.join(types_)}.{did_you_mean(tag, types_)}"
    if typ == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        return f"got {err.get('input')!r}; expected {expected}.{did_you_mean(str(err.get('input')), choices)}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if typ not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def validate_data(data: Any, source: str, lines: dict[Path_, int | str]):
    """Validate plain recipe data; raise one RecipeError listing every problem with its line."""
    if not isinstance(data, dict):
        raise RecipeError([f"{source}:1: the recipe must be a mapping (name:, model:, stages: …)"])
    problems: list[tuple[int, str]] = []
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as exc:
        seen: set[tuple[Path_, str]] = set()
        for err in exc.errors():
            path = _clean_loc(tuple(err["loc"]), data)
            text = _message(err, path, data)
            if (path, text) in seen:
                continue
            seen.add((path, text))
            problems.append((path, text))
        raise RecipeError([_where(source, lines, p) + f"{_fmt(p)}: {t}" for p, t in _sorted(problems, lines)]) from None
    cross = cross_check(recipe)
    if cross:
        raise RecipeError([_where(source, lines, p) + f"{_fmt(p)}: {t}" for p, t in _sorted(cross, lines)])
    return recipe


def _sorted(problems, lines):
    def key(item):
        ln = _line(item[0], lines)
        return (0, ln) if isinstance(ln, int) else (1, 0)

    return sorted(problems, key=key)


def _where(source: str, lines: dict[Path_, int | str], path: Path_) -> str:
    ln = _line(path, lines)
    if isinstance(ln, str):
        return f"{ln}: "
    return f"{source}:{ln}: " if ln is not None else f"{source}: "


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings (``--set``), applied in order before validation.

    Returns:
        The validated recipe with its line map.

    Raises:
        RecipeError: the file is missing or unreadable, is not valid YAML, or fails the schema;
            every problem is listed with file, line, field path and a suggestion.
    """
    src = Path(path)
    if not src.is_file():
        hint = ""
        if src.parent.is_dir():
            names = [p.name for p in src.parent.glob("*.y*ml")]
            hint = did_you_mean(src.name, names)
        raise RecipeError([f"{src}: no such recipe file.{hint}"])
    text = src.read_text(encoding="utf-8")
    data, lines, problems = _compose(text, str(src))
    if problems:
        raise RecipeError(problems)
    data = copy.deepcopy(data) if data is not None else {}
    all_lines: dict[Path_, int | str] = dict(lines)
    for ov in overrides:
        set_path = apply_override(data, ov) if isinstance(data, dict) else ()
        for p in list(all_lines):
            if p[: len(set_path)] == set_path:
                del all_lines[p]
        all_lines[set_path] = f"--set {ov}"
    recipe = validate_data(data, str(src), all_lines)
    return LoadedRecipe(recipe=recipe, source=src, lines=all_lines, overrides=list(overrides))
