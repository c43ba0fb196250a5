"""``--fast-dev-run [N]`` (PyTorch Lightning's name): the whole recipe, cut to minutes.

The point is to find a broken recipe, missing data, a dtype or memory problem before a
multi-hour GPU run, not to measure anything. The cut is an override layer on the loaded recipe:
:func:`dev_run_overrides` walks the validated recipe and writes ``--set``-style overrides for
every value of a shared schema type, wherever it sits (no stage type is named here), so a new
stage that uses these types is cut without an edit:

* every :class:`~compressor.recipe.schema.TrainSpec` (training stages, heal): ``N`` optimizer
  steps, batch size at most 2, no gradient accumulation, no warm-up (with one step, warm-up
  would leave the learning rate at zero and the adapter untrained), in-training evaluation once
  at the end on at most :data:`EXAMPLES` examples;
* every :class:`~compressor.recipe.schema.CalibrationSpec`: one batch of at most 2 examples;
* every :class:`~compressor.recipe.schema.CharacteristicsSpec`: latency timed once at batch
  size 1 without warm-up, GFLOPs counted for :data:`NEW_TOKENS` tokens;
* every data section (:class:`~compressor.recipe.schema.DataSource`): at most
  :data:`EXAMPLES` examples;
* the decoding settings: at most :data:`NEW_TOKENS` new tokens, batch size at most 2 (the beam
  width is kept: beam search is a mechanism to exercise);
* the push: a dry run (the upload folder is written, nothing is uploaded).

The overrides are recorded like ``--set`` ones (the run's manifest lists them), the run goes into
its own folder (``runs/<name>-fast-dev-run``), and the gate is checked but does not fail the run:
its metrics mean nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from compressor.recipe import schema as S

#: Examples per data section (images for captioning, questions for VQA).
EXAMPLES = 4
#: Generated tokens per caption (and GFLOPs' token count).
NEW_TOKENS = 4
#: Largest batch of training, calibration and decoding.
BATCH = 2
DEFAULT_STEPS = 2
RUN_SUFFIX = "-fast-dev-run"
NOTE = (
    "fast dev run: every training stage cut to {n} step(s), data to {k} examples per section, "
    "{t} new tokens, characteristics measured once, push as a dry run; its metrics mean nothing "
    "(it shows that the recipe runs)"
)


def _walk(value: Any, path: tuple) -> Iterator[tuple[tuple, BaseModel]]:
    """Every pydantic model inside ``value`` with its field path (lists by index)."""
    if isinstance(value, BaseModel):
        yield path, value
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name), (*path, name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk(item, (*path, i))
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _walk(item, (*path, k))


def _cut(model: BaseModel, n: int) -> dict[str, Any]:
    """The fields to set on one value of a shared schema type (empty for any other model)."""
    if isinstance(model, S.TrainSpec):
        out: dict[str, Any] = {"steps": n, "batch_size": min(model.batch_size, BATCH), "gradient_accumulation_steps": 1,
                               "warmup_steps": 0, "warmup_ratio": 0.0, "log_every": 1}
        if model.eval_every is not None:
            out["eval_every"] = n
            out["eval_limit"] = min(model.eval_limit or EXAMPLES, EXAMPLES)
        return out
    if isinstance(model, S.CalibrationSpec):
        return {"batches": 1, "batch_size": min(model.batch_size, BATCH)}
    if isinstance(model, S.CharacteristicsSpec):
        out = {"gflops_new_tokens": min(model.gflops_new_tokens, NEW_TOKENS)}
        if model.latency is not None:
            out["latency"] = {"batch_sizes": [1], "warmup": 0, "repeats": 1}
        return out
    if isinstance(model, S.DataSource):
        return {"limit": min(model.limit or EXAMPLES, EXAMPLES)}
    if isinstance(model, S.GenerationSpec):
        new = min(model.max_new_tokens, NEW_TOKENS)
        return {"max_new_tokens": new, "min_new_tokens": min(model.min_new_tokens, new),
                "batch_size": min(model.batch_size, BATCH)}
    if isinstance(model, S.PushSpec):
        return {"dry_run": True}
    return {}


def dev_run_overrides(recipe, n: int = DEFAULT_STEPS) -> list[str]:
    """``key.path=value`` overrides cutting a validated recipe to a fast dev run.

    Args:
        recipe: a validated recipe (the ``Recipe`` model, user overrides applied).
        n: optimizer steps per training stage (at least 1).

    Returns:
        Override strings in ``--set`` syntax, values as JSON (which YAML reads), only for values
        that change.
    """
    out = []
    for path, model in _walk(recipe, ()):
        for field, value in _cut(model, n).items():
            if getattr(model, field) == value or (
                isinstance(getattr(model, field), BaseModel) and getattr(model, field).model_dump() == value
            ):
                continue
            out.append(".".join(str(p) for p in (*path, field)) + "=" + json.dumps(value))
    return out


def load_fast_dev_run(path: str | Path, overrides: list[str] | tuple[str, ...] = (), n: int = DEFAULT_STEPS):
    """Load a recipe with the user's overrides, then cut it to a fast dev run.

    Args:
        path: the recipe file.
        overrides: the user's ``--set`` strings (applied first; the cut sees their result).
        n: optimizer steps per training stage.

    Returns:
        The :class:`~compressor.recipe.loader.LoadedRecipe` of the cut recipe, with
        ``fast_dev_run`` set to ``n`` and every override (the user's, then the cut's) recorded.

    Raises:
        RecipeError: the recipe (with the user's overrides) is invalid; ``n`` below 1.
    """
    from compressor.errors import RecipeError
    from compressor.recipe.loader import load_recipe

    if n < 1:
        raise RecipeError([f"--fast-dev-run {n}: give at least 1 training step"])
    first = load_recipe(path, overrides)
    loaded = load_recipe(path, [*overrides, *dev_run_overrides(first.recipe, n)])
    loaded.fast_dev_run = n
    return loaded


def note(n: int) -> str:
    """The line a fast dev run's report and output carry."""
    return NOTE.format(n=n, k=EXAMPLES, t=NEW_TOKENS)
