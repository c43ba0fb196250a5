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
    """What pre-flight learned.

    Attributes:
        config: the model's transformers config (None for specs only known after building).
        family: its family (None likewise).
        datasets: ``(section, limit)`` → loaded Dataset, reused by the run.
        removals: stage index → part → indices (None where importance decides).
    """

    config: Any = None
    family: Any = None
    datasets: dict = field(default_factory=dict)
    removals: dict[int, dict] = field(default_factory=dict)


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
        from compressor.models.assemble import assembled_config

        return assembled_config(spec.assemble)[0]  # configs and tokenizer only, no weights
    if kind == "hub":
        from compressor.models.loading import KNOWN_HUB_CONFIGS

        if spec in KNOWN_HUB_CONFIGS:
            return load_config(spec)
        return None  # fetched (or refused) by materialize, still before any stage runs
    return load_config(spec if kind != "config" else spec.config)


def run_preflight(loaded: LoadedRecipe, load_data: bool = True) -> Preflight:
    """All checks; raises on the first kind of problem, listing every instance of it.

    Raises:
        NotBuiltError, RecipeError, UserInputError, DataError, ModelSpecError (all exit 2).
    """
    from compressor.families import family_for_config
    from compressor.lora import check_targets_on_config, part_patterns
    from compressor.surgery import plan_removals

    check_features(loaded)
    recipe = loaded.recipe
    problems: list[str] = []
    if recipe.push is not None and not recipe.push.dry_run:
        from exporters.hub import resolve_token

        try:
            resolve_token()  # no token: fail now (exit 2), not after the run; makes no network call
        except CompressError as exc:  # reported with the recipe's other problems
            problems.append(_where(str(loaded.source), loaded.lines, ("push",)) + f"push: {exc}")
    pf = Preflight()
    pf.config = model_config(loaded)
    if pf.config is not None:
        import copy

        pf.family = family_for_config(pf.config)
        config = copy.deepcopy(pf.config)
        for i, st in enumerate(recipe.stages):
            try:
                if st.type in ("lora_finetune", "heal") and getattr(st, "trainable", "lora") == "lora":
                    part_patterns(pf.family, st.parts)
                    check_targets_on_config(config, st.lora, st.parts)
                if st.type in ("lora_finetune", "heal") and st.train.resume_from:
                    from compressor.stages.lora_finetune import resolve_adapter

                    resolve_adapter(st.train.resume_from)
                if st.type == "lora_finetune" and st.quantization is not None:
                    from compressor.models.loading import resolve_device
                    from compressor.stages.lora_finetune import check_quantization

                    try:
                        check_quantization(st, resolve_device(recipe.device))
                    except CompressError as exc:
                        path = ("stages", i, "quantization")
                        problems.append(_where(str(loaded.source), loaded.lines, path) + f"stages.{i}.quantization: {exc}")
                if st.type == "prune_width":
                    from compressor.pruning import check_width_on_config

                    check_width_on_config(config, pf.family, st)
                if st.type == "remove_layers":
                    plan = plan_removals(config, pf.family, st)
                    pf.removals[i] = plan
                    _apply_counts(config, pf.family, st, plan)
            except CompressError as exc:
                problems.append(_where(str(loaded.source), loaded.lines, ("stages", i)) + f"stages.{i}: {exc}")
    if problems:
        raise RecipeError(problems)
    _check_evaluations(loaded)
    if load_data and recipe.data is not None:
        from compressor.data import load_section
        from compressor.errors import DataError, UserInputError
        from compressor.stages import get_stage

        failed: list[UserInputError] = []
        for st in recipe.stages:
            mod = get_stage(st.type)
            limit = getattr(st, "limit", None)
            for section in mod.data_sections(st):
                key = (section, limit if section == getattr(st, "data", None) else None)
                if key not in pf.datasets:
                    try:
                        pf.datasets[key] = load_section(recipe.data, section, limit=key[1])
                    except UserInputError as exc:  # every section's problems at once, then stop
                        pf.datasets[key] = None
                        failed.append(exc)
        if len(failed) == 1:
            raise failed[0]
        if failed:
            raise DataError(f"{len(failed)} data sections have problems:", [str(e) for e in failed])
        _check_evaluations(loaded, pf.datasets)
    return pf


def _check_evaluations(loaded: LoadedRecipe, datasets: dict | None = None) -> None:
    """Evaluate stages: Java, metric model folders, teacher (and, with the data loaded, what metrics need of it)."""
    from compressor.evaluation import check_data_for_metrics, resolve_metrics
    from compressor.stages.evaluate import check

    recipe = loaded.recipe
    if recipe.data is None:
        return
    for i, st in enumerate(recipe.stages):
        if st.type != "evaluate":
            continue
        try:
            if datasets is None:
                check(st, recipe.data.task)
            elif (st.data, st.limit) in datasets:
                check_data_for_metrics(resolve_metrics(st.metrics, recipe.data.task), datasets[(st.data, st.limit)])
        except UserInputError as exc:
            raise type(exc)(_where(str(loaded.source), loaded.lines, ("stages", i)) + f"stages.{i}: {exc}") from None


def _apply_counts(config, family, stage, plan) -> None:
    """Shrink the simulated config's layer counts so later stages are checked against them."""
    from compressor.families import get_config_value, set_config_value

    for part, removed in plan.items():
        st = family.stack(part)
        n = int(get_config_value(config, st.count_fields[0]))
        k = len(removed) if removed is not None else _count_of(stage, part)
        for path in st.count_fields:
            set_config_value(config, path, n - k)


def _count_of(stage, part: str) -> int:
    if part == "qformer":
        return stage.qformer.count
    if part == "vision":
        return stage.vision.count
    lm = stage.language_model
    if hasattr(lm, "encoder"):
        return (lm.encoder if part.endswith("encoder") else lm.decoder).count
    return lm.count


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)
