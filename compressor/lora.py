"""LoRA targets: part-scoped names → anchored module patterns → a peft ``LoraConfig``.

``parts: [vision.attention, language_model.attention]`` expands, through the model
family's knowledge, to one regular expression that peft matches with ``re.fullmatch`` against
module names (peft's ``target_modules`` string semantics). Names like ``fc1`` exist in both the
vision MLP and the OPT MLP, and ``query``/``key``/``value`` in both Q-Former self- and
cross-attention (stack-facts §4), which is why patterns are anchored at the part's root.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; implementation peft.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from compressor.errors import UserInputError, did_you_mean

LINEAR_TYPES = ("Linear", "Conv1D", "Conv2d", "Embedding")


def part_patterns(family, parts: list[str]) -> dict[str, str]:
    """Regex per part-scoped name for this family.

    Raises:
        UserInputError: a name this family does not have (a Q-Former part on BLIP).
    """
    out: dict[str, str] = {}
    for name in parts:
        if name not in family.lora:
            raise UserInputError(
                f"LoRA part '{name}' does not exist in a {family.name} model with a {family.lm_model_type} language "
                f"model.{did_you_mean(name, family.lora)} Available: {', '.join(family.lora)}"
            )
        out[name] = family.lora[name]
    return out


def target_regex(family, parts: list[str], target_modules: list[str] | str | None) -> list[str] | str:
    """The peft ``target_modules`` value for ``parts`` plus the user's own ``target_modules``.

    A list of names is kept as peft reads it (a module name ending in one of them); combined
    with parts, names become ``.*\\.(name)`` alternatives of one anchored regex.
    """
    patterns = list(part_patterns(family, parts).values())
    if not patterns:
        if target_modules is None:
            raise UserInputError("LoRA needs `parts: [...]` or `lora.target_modules`")
        return target_modules
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            raise UserInputError("lora.target_modules: 'all-linear' cannot be combined with `parts`; use one of them")
        patterns.append(target_modules)
    elif target_modules:
        patterns.append(r"(.*\.)?(" + "|".join(re.escape(t) for t in target_modules) + ")")
    return "(" + "|".join(f"(?:{p})" for p in patterns) + ")"


def lora_config(spec, family, parts: list[str], task_type: str | None = None):
    """A peft ``LoraConfig`` from the recipe's ``lora:`` keys (passed unchanged) and ``parts``."""
    from peft import LoraConfig

    kwargs: dict[str, Any] = spec.model_dump(exclude_none=True)
    kwargs["target_modules"] = target_regex(family, parts, spec.target_modules)
    if task_type:
        kwargs["task_type"] = task_type
    try:
        return LoraConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        hint = ""
        if spec.layers_to_transform is not None and parts:
            hint = (" (`parts` expand to one regular expression, which peft cannot combine with layers_to_transform; "
                    "give `target_modules` as a list of names instead of `parts`)")
        raise UserInputError(f"lora: peft refused these settings: {exc}{hint}") from None


def part_of(family, module_name: str) -> str:
    """The part (a key of ``family.parts``) a module name belongs to, or ``other``."""
    for part, prefixes in family.parts.items():
        if any(module_name == p or module_name.startswith(p + ".") for p in prefixes):
            return part
    return "other"


def match_report(model, family, parts: list[str], target_modules=None) -> dict[str, Any]:
    """How many LoRA-wrapped modules each ``parts`` entry matched, per part, and parameter counts.

    Args:
        model: the peft model after ``get_peft_model``.

    Returns:
        ``{"entries": {entry: {part: count}}, "by_part": {part: count},
        "params_trainable": int, "params_total": int}``.
    """
    base = model.get_base_model()
    lora_modules = [n for n, m in base.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0]
    entries: dict[str, dict[str, int]] = {}
    for name, pattern in part_patterns(family, parts).items():
        rx = re.compile(pattern)
        counts = Counter(part_of(family, n) for n in lora_modules if rx.fullmatch(n))
        entries[name] = dict(counts)
    if target_modules is not None and not isinstance(target_modules, str):
        rx = re.compile(r"(.*\.)?(" + "|".join(re.escape(t) for t in target_modules) + ")")
        entries["target_modules"] = dict(Counter(part_of(family, n) for n in lora_modules if rx.fullmatch(n)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "entries": entries,
        "by_part": dict(Counter(part_of(family, n) for n in lora_modules)),
        "params_trainable": int(trainable),
        "params_total": int(total),
    }


def check_matches(report: dict[str, Any]) -> None:
    """Raise UserInputError (exit 2) naming every ``parts`` entry that matched no module."""
    empty = [name for name, counts in report["entries"].items() if sum(counts.values()) == 0]
    if empty:
        raise UserInputError(
            f"LoRA target{'s' if len(empty) > 1 else ''} {', '.join(empty)} matched no module of this model; "
            "remove them or check the model's module names with `compress inspect MODEL`"
        )


def apply_lora(model, spec, parts: list[str]):
    """Wrap ``model`` with fresh LoRA adapters; returns ``(peft_model, match_report)``.

    Raises:
        UserInputError: an entry matched nothing, or peft found no target at all.
    """
    from peft import get_peft_model

    from compressor.families import family_for_model

    family = family_for_model(model)
    cfg = lora_config(spec, family, parts)
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as exc:
        raise UserInputError(f"LoRA: {exc}") from None
    report = match_report(peft_model, family, parts, spec.target_modules)
    check_matches(report)
    return peft_model, report


def check_targets_on_config(config, spec, parts: list[str]) -> dict[str, Any]:
    """Match LoRA targets on an empty (meta-device) model built from ``config``: no weights are read.

    Used by pre-flight, so that an entry matching nothing exits 2 before anything is written.

    Returns:
        The :func:`match_report`.

    Raises:
        UserInputError: an entry matched nothing, or peft refused the settings.
    """
    import warnings

    import torch

    from compressor.families import family_for_config

    family = family_for_config(config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = family.model_cls()(config)
        _, report = apply_lora(model, spec, parts)
    return report


def freeze_all_but(model, family, parts: list[str] | None) -> int:
    """Set ``requires_grad`` for the named parts only (None: every parameter); returns the trainable count.

    Names: the family's ``trainable`` names (its parts, some stacks such as T5's
    ``language_model.encoder``, single parameters such as BLIP-2's ``query_tokens``).

    Raises:
        UserInputError: a name this family does not have.
    """
    if parts is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    prefixes: list[str] = []
    for part in parts:
        if part not in family.trainable:
            raise UserInputError(
                f"part '{part}' does not exist in {family.describe_model()}.{did_you_mean(part, family.trainable)} "
                f"Its parts: {', '.join(family.trainable)}"
            )
        prefixes += list(family.trainable[part])
    n = 0
    for name, p in model.named_parameters():
        on = any(name == pre or name.startswith(pre + ".") for pre in prefixes)
        p.requires_grad_(on)
        n += p.numel() if on else 0
    return n


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder to resume from: ``path`` itself, or its ``adapter/`` (a stage's ``model/``).

    Raises:
        UserInputError: no ``adapter_config.json`` there.
    """
    from compressor.models.folders import ADAPTER_SUBDIR

    p = Path(path).expanduser()
    for cand in (p, p / ADAPTER_SUBDIR, p / "model" / ADAPTER_SUBDIR):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise UserInputError(
        f"train.resume_from: {path} holds no LoRA adapter (adapter_config.json); point it at an adapter folder or "
        "at a lora_finetune stage's model/ folder"
    )


def check_lora(family, config, spec, parts: list[str], resume_from: str | None) -> None:
    """Pre-flight of a LoRA stage on the model's config: every part name exists in this family and
    matches a module (on a meta-device model), and ``resume_from`` holds an adapter.

    Raises:
        UserInputError: naming the entry, the part or the folder.
    """
    part_patterns(family, parts)
    check_targets_on_config(config, spec, parts)
    if resume_from:
        resolve_adapter(resume_from)


def plan_lora(model, spec, parts: list[str]) -> dict[str, Any]:
    """``compress plan``'s row for a LoRA stage: trainable parameters and matches on the meta model
    (the LoRA layers are removed again, so the model is unchanged)."""
    peft_model, report = apply_lora(model, spec, parts)
    peft_model.unload()
    return {"params_trainable": report["params_trainable"], "lora_matches": report["entries"]}


def plan_freeze(model, family, parts: list[str] | None) -> dict[str, Any]:
    """``compress plan``'s row for a stage training ``parts`` (None: all) of the meta model."""
    n = freeze_all_but(model, family, parts)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"params_trainable": n}
