"""``compress inspect MODEL [--importance --data ...]``: what a model is made of, and which layers matter.

Prints, for a model folder or a preset: the family and language model, parameters per part,
the removable layer stacks with their depth (and the Q-Former's cross-attention positions),
and how many modules each part-scoped LoRA name matches. With ``--importance``, scores every
layer of the chosen stacks on calibration batches (block influence, ShortGPT; angular distance
of one-layer blocks, Gromov et al. 2024; see :mod:`compressor.importance`) and writes
``importance.json`` and ``importance.png`` to ``--out``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import click

from compressor.commands.targets import DATA_FORMATS

log = logging.getLogger(__name__)


def load_for_inspection(spec: str):
    """``(model, processor, label)`` for a folder, a preset or a shipped preset.

    Raises:
        ModelSpecError: the name is neither (exit 2).
    """
    from compressor.models.loading import classify, load_model
    from compressor.models.presets import PRESETS, SHIPPED, build_preset

    kind = classify(spec)
    if kind == "preset" and spec in PRESETS:
        model, proc = build_preset(spec)
        return model, proc, spec
    if kind == "preset":
        model, proc = load_model(SHIPPED[spec])
        return model, proc, spec
    if kind == "folder":
        model, proc = load_model(Path(spec))
        return model, proc, str(spec)
    from compressor.errors import ModelSpecError

    raise ModelSpecError(f"inspect: '{spec}' is not a local model folder or a preset (nothing is downloaded)")


def describe(model) -> dict:
    """Family, parameters per part, stacks and LoRA name matches of a loaded model (no data needed)."""
    from compressor.families import family_for_model, get_config_value, get_module
    from compressor.lora import part_of
    from eval.characteristics import count_parameters

    family = family_for_model(model)
    params = count_parameters(model, family.parts)
    stacks = {}
    for part, st in family.stacks.items():
        layers = get_module(model, st.layers)
        entry = {
            "layers": len(layers),
            "config": {f: get_config_value(model.config, f) for f in st.count_fields},
            "params_per_layer": [sum(p.numel() for p in layer.parameters()) for layer in layers],
        }
        if st.rule is not None:
            entry.update(st.rule.describe(layers))
        stacks[part] = entry
    names = [n for n, _ in model.named_modules()]
    lora = {}
    for entry, pattern in family.lora.items():
        rx = re.compile(pattern)
        matched = [n for n in names if rx.fullmatch(n)]
        by_part: dict[str, int] = {}
        for n in matched:
            by_part[part_of(family, n)] = by_part.get(part_of(family, n), 0) + 1
        lora[entry] = by_part
    from compressor.tokens import describe_options

    return {
        "family": family.name,
        "language_model": family.lm_model_type,
        "parameters": params,
        "stacks": stacks,
        "tokens": {
            "learned_queries": family.num_queries,
            "image_tokens_per_image": family.image_tokens,
            "vision_tokens": family.vision_tokens,
            "vision_output_tokens": family.vision_output_tokens,
            "options": describe_options(family),
        },
        "lora_targets": lora,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def _data(data: str, data_format: str | None, limit: int):
    from compressor.data import infer_spec, load_section
    from compressor.recipe.schema import DataSpec

    if data == "synthetic":
        spec = DataSpec(format="synthetic", test={"size": limit, "seed": 4})
    else:
        spec = infer_spec(data, data_format, limit=limit)
    return load_section(spec, "test")


def _text_report(info: dict, scores: dict | None) -> str:
    lines = [f"family: {info['family']} (language model: {info['language_model']}), dtype {info['dtype']}", "", "parameters:"]
    total = info["parameters"]["params_total"]
    for key, n in info["parameters"].items():
        share = f" ({100 * n / total:.1f}%)" if total and key != "params_total" else ""
        lines.append(f"  {key.removeprefix('params_'):<16} {n:>14,}{share}")
    lines += ["", "layer stacks:"]
    for part, st in info["stacks"].items():
        extra = f"; cross-attention at {st['cross_attention']}" if "cross_attention" in st else ""
        per = st["params_per_layer"]
        lines.append(f"  {part:<24} {st['layers']:>3} layers, {per[0] if per else 0:,} parameters per layer{extra}")
    tok = info["tokens"]
    lines += ["", f"tokens per image: vision encoder {tok['vision_tokens']} → {tok['vision_output_tokens']}"
              + (f"; {tok['learned_queries']} learned queries, {tok['image_tokens_per_image']} reach the language model"
                 if tok["learned_queries"] else "")]
    lines += [f"  {line}" for line in tok["options"]]
    lines += ["", "LoRA part names (modules matched per part):"]
    for name, by_part in info["lora_targets"].items():
        shown = ", ".join(f"{p} {n}" for p, n in by_part.items()) or "nothing"
        lines.append(f"  {name:<40} {shown}")
    if scores:
        for part, sc in scores.items():
            lines += ["", f"importance of {part} layers ({sc['tokens']} token positions):",
                      "  layer  block_influence  angular_distance(1)  rank"]
            bi = sc["block_influence"]
            ang = sc["angular_distance"].get("1", [])
            order = sorted(range(len(bi)), key=lambda i: bi[i])
            for i, v in enumerate(bi):
                lines.append(f"  {i:>5}  {v:>15.5f}  {ang[i] if i < len(ang) else float('nan'):>19.5f}  {order.index(i) + 1:>4}")
            for n, block in sc.get("best_blocks", {}).items():
                d = sc["angular_distance"][n][block[0]]
                lines.append(f"  best removable block of {n}: layers {block[0]}..{block[-1]} (angular distance {d:.4f})")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("model_spec", metavar="MODEL")
@click.option("--importance", is_flag=True, help="Score every layer on calibration data (block influence, angular distance).")
@click.option("--data", default="synthetic", show_default=True,
              help="Calibration data: a file or folder (as `compress eval --data`), or `synthetic` (the shapes set).")
@click.option("--data-format", type=click.Choice(DATA_FORMATS), help="Format of --data (default: detected).")
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True, help="Calibration examples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per calibration batch.")
@click.option("--part", "parts", multiple=True, help="Stacks to score (default: every removable stack).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("inspect"), show_default=True,
              help="Folder for importance.json and importance.png (with --importance).")
@click.pass_obj
def inspect_command(obj, model_spec, importance, data, data_format, limit, batch_size, parts, out):
    """Parameters per part, layer stacks, LoRA targets; with --importance, per-layer importance (table and PNG)."""
    from types import SimpleNamespace

    from compressor.errors import UserInputError, did_you_mean
    from compressor.families import family_for_model

    if not importance and (parts or data != "synthetic" or data_format):
        raise UserInputError("--data, --data-format and --part go with --importance")
    model, processor, label = load_for_inspection(model_spec)
    info = {"model": label, **describe(model)}
    family = family_for_model(model)
    scores_json = None
    if importance:
        from compressor.fileio import atomic_write_json
        from compressor.importance import calibration_batches, plot_importance, select_layers, stack_scores

        bad = [p for p in parts if p not in family.stacks]
        if bad:
            raise UserInputError(
                f"--part {bad[0]}: this model's stacks are {', '.join(family.stacks)}.{did_you_mean(bad[0], family.stacks)}"
            )
        if processor is None:
            raise UserInputError(f"{model_spec} has no processor (tokenizer + image processor); importance needs one")
        chosen = list(parts) or list(family.stacks)
        dataset = _data(data, data_format, limit)
        cal = SimpleNamespace(batches=max(1, -(-limit // batch_size)), batch_size=batch_size)
        batches = calibration_batches(model, processor, dataset, cal, None, "cpu")
        scores = stack_scores(model, family, chosen, batches)
        scores_json = {}
        for p, s in scores.items():
            blocks = {}
            for n in s.angular_distance:
                try:
                    blocks[str(n)] = select_layers(s, n, "angular_distance", family)
                except UserInputError:  # no block of that length keeps the Q-Former pattern
                    pass
            scores_json[p] = {**s.to_json(), "best_blocks": blocks}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "importance.json", {"model": label, "data": data, "examples": limit, "parts": scores_json})
        plot_importance(scores_json, out / "importance.png")
        info["importance"] = {"parts": scores_json, "json": str(out / "importance.json"), "png": str(out / "importance.png")}
    if obj is not None and obj.json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(_text_report(info, scores_json))
        if importance:
            click.echo(f"\nwrote {out / 'importance.json'} and {out / 'importance.png'}")
