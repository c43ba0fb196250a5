"""Checks that run before anything is written: features, model config, layer choices, data.

Everything here reads configs and annotation files only — no weights — so a bad recipe exits 2
within seconds and leaves no run directory (DESIGN.md "The recipe").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import CompressError, NotBuiltError, RecipeError, UserInputError
from compressor.recipe.loader import LoadedRecipe, _where

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    """What pre-flight learned, and what a stage's ``check`` sees.

    Attributes:
        config: the model's transformers config (None for specs only known after building); while
            stages are checked, a copy that earlier stages have shrunk (removed layers).
        family: its family (None likewise).
        datasets: ``(section, limit)`` → loaded Dataset, reused by the run.
        removals: stage index → part → indices (None where importance decides).
        index: the stage being checked.
        device: the resolved device of the recipe (``cpu`` or ``cuda``).
        recipe: the recipe.
    """

    config: Any = None
    family: Any = None
    datasets: dict = field(default_factory=dict)
    removals: dict[int, dict] = field(default_factory=dict)
    index: int = 0
    device: str = "cpu"
    recipe: Any = None


def check_features(loaded: LoadedRecipe) -> None:
    """Exit 2 (NotBuiltError) naming every recipe key whose feature this version does not run."""
    from compressor.recipe.features import unbuilt

    missing = unbuilt(loaded.recipe)
    if missing:
        lines = [
            _where(str(loaded.source), loaded.lines, path) + f"{'.'.join(map(str, path))}: {feature} is not built in this version"
            for path, feature in missing
        ]
        raise NotBuiltError("the recipe asks for features this version cannot run yet:\n" + "\n".join("  - " + x for x in lines))


def model_config(loaded: LoadedRecipe):
    """The model's config without weights, or None for Hub ids whose architecture is not shipped."""
    from compressor.models.loading import classify, load_config

    spec = loaded.recipe.model
    kind = classify(spec)
    if kind == "assemble":
        from compressor.models.assembly import assembled_config

        return assembled_config(spec.assemble)[0]  # configs and tokenizer only, no weights
    if kind == "hub":
        from compressor.models.loading import KNOWN_HUB_CONFIGS

        if spec in KNOWN_HUB_CONFIGS:
            return load_config(spec)
        return None  # fetched (or refused) by materialize, still before any stage runs
    return load_config(spec if kind != "config" else spec.config)


def run_preflight(loaded: LoadedRecipe, load_data: bool = True) -> Preflight:
    """All checks, every problem reported at once (recipe, model, stages, data).

    Each stage is checked by its declaration's ``check`` (with the model's config),
    ``check_recipe`` (without it) and ``check_data`` (once the data is loaded); the data each
    stage declares is loaded here, once.

    Raises:
        NotBuiltError, RecipeError, UserInputError, DataError, ModelSpecError (all exit 2).
    """
    import copy

    from compressor.data import load_section
    from compressor.errors import DataError
    from compressor.families import family_for_config
    from compressor.models.loading import resolve_device
    from compressor.stages import FieldProblem, declaration

    check_features(loaded)
    recipe = loaded.recipe
    # Every problem is found before any is reported (a missing Hub token, the model, the stage
    # checks, the data): (text, the exception to raise when it is the only one, or None).
    problems: list[tuple[str, BaseException | None]] = []
    if recipe.push is not None and not recipe.push.dry_run:
        from exporters.hub import resolve_token

        try:
            resolve_token()  # no token: fail now (exit 2), not after the run; makes no network call
        except CompressError as exc:  # reported with the recipe's other problems
            problems.append((_where(str(loaded.source), loaded.lines, ("push",)) + f"push: {exc}", None))
    pf = Preflight(recipe=recipe)
    try:
        pf.config = model_config(loaded)
    except CompressError as exc:
        problems.append((_where(str(loaded.source), loaded.lines, ("model",)) + f"model: {exc}", exc))
    if pf.config is not None:
        pf.family = family_for_config(pf.config)
        original, pf.config = pf.config, copy.deepcopy(pf.config)
        pf.device = resolve_device(recipe.device) if recipe.device != "cuda" else "cuda"
        for i, st in enumerate(recipe.stages):
            decl = declaration(st.type)
            if decl.check is None:
                continue
            pf.index = i
            try:
                decl.check(st, pf)
            except FieldProblem as exc:
                path = ("stages", i, *exc.field)
                problems.append((_where(str(loaded.source), loaded.lines, path) + f"{'.'.join(map(str, path))}: {exc}", None))
            except CompressError as exc:
                problems.append((_where(str(loaded.source), loaded.lines, ("stages", i)) + f"stages.{i}: {exc}", None))
        pf.config = original
    try:
        _check_stages(loaded)
    except UserInputError as exc:
        problems.append((str(exc), exc))
    failed: list[UserInputError] = []
    if load_data and recipe.data is not None:
        for st in recipe.stages:
            for section, limit in declaration(st.type).data(st).items():
                key = (section, limit)
                if key not in pf.datasets:
                    try:
                        pf.datasets[key] = load_section(recipe.data, section, limit=limit)
                    except UserInputError as exc:  # every section's problems at once
                        pf.datasets[key] = None
                        failed.append(exc)
        if not failed:
            try:
                _check_stages(loaded, pf.datasets)
            except UserInputError as exc:
                problems.append((str(exc), exc))
    if problems:
        entries = problems + [(f"data: {e}", e) for e in failed]
        if len(entries) == 1 and entries[0][1] is not None:
            raise entries[0][1]
        raise RecipeError([text for text, _ in entries])
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise DataError(f"{len(failed)} data sections have problems:", [str(e) for e in failed])
    return pf


def _check_stages(loaded: LoadedRecipe, datasets: dict | None = None) -> None:
    """Each stage's checks without the model (``check_recipe``: Java, metric model folders), or,
    with the data loaded, of the data (``check_data``); raises on the first problem."""
    from compressor.stages import declaration

    recipe = loaded.recipe
    if recipe.data is None:
        return
    for i, st in enumerate(recipe.stages):
        decl = declaration(st.type)
        try:
            if datasets is None and decl.check_recipe is not None:
                decl.check_recipe(st, recipe)
            elif datasets is not None and decl.check_data is not None:
                decl.check_data(st, recipe, datasets)
        except UserInputError as exc:
            raise type(exc)(_where(str(loaded.source), loaded.lines, ("stages", i)) + f"stages.{i}: {exc}") from None


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)
