"""``compress export``: write a model folder as a verified split ONNX export and/or safetensors.

``compress export [MODEL_DIR] --onnx [--safetensors] [--out DIR] [--dtype D] [--opset N] [--quantize int8] [--draft DIR]``

* MODEL_DIR defaults to the newest ``runs/*/final`` (so ``compress export --onnx`` works right
  after ``compress apply``);
* ``--out`` is the ONNX folder with ``--onnx`` alone (default: ``onnx/`` beside MODEL_DIR), the
  safetensors folder with ``--safetensors`` alone (default ``safetensors/`` beside it), and the
  parent of ``onnx/`` and ``safetensors/`` with both (default: beside MODEL_DIR);
* a path that is not a model folder exits 2 before anything is written;
* ``--draft DIR`` bundles a draft (a model folder, exported with the same options, or an ONNX
  export) in ``draft/`` for speculative decoding: ONNX Runtime captioning of the folder then
  gives the model's own greedy captions with the draft proposing tokens
  (:func:`exporters.onnx.export.export_onnx_with_draft`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import click

from compressor.errors import ModelSpecError, UserInputError

log = logging.getLogger(__name__)


def newest_final(root: Path = Path("runs")) -> Path:
    """The most recently written ``runs/*/final`` model folder.

    Raises:
        UserInputError: there is none (exit 2).
    """
    from compressor.models.loading import is_model_dir

    finals = [p for p in Path(root).glob("*/final") if is_model_dir(p)]
    if not finals:
        raise UserInputError(
            f"no MODEL_DIR given and no {root}/*/final model folder here; pass the folder to export "
            "(a save_pretrained folder) or run `compress apply RECIPE` first"
        )
    return max(finals, key=lambda p: (p / "config.json").stat().st_mtime)


def _targets(base: Path, out: Path | None, onnx: bool, safetensors: bool) -> dict[str, Path]:
    if onnx and safetensors:
        parent = out or base
        return {"onnx": parent / "onnx", "safetensors": parent / "safetensors"}
    if onnx:
        return {"onnx": out or base / "onnx"}
    return {"safetensors": out or base / "safetensors"}


@click.command("export")
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--onnx", "onnx", is_flag=True, help="Write the split ONNX export (validated against PyTorch).")
@click.option("--safetensors", "safetensors", is_flag=True, help="Write a verified safetensors folder (SHA256SUMS).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="The ONNX folder with --onnx alone, the safetensors folder with --safetensors alone, their parent with both "
              "(default: onnx/ and safetensors/ beside MODEL_DIR).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Weights dtype (default: as saved).")
@click.option("--opset", type=click.IntRange(min=14), help="ONNX opset (default: 23 with dynamo, the legacy exporter's own with legacy).")
@click.option("--quantize", type=click.Choice(["int8"]), help="Also write a dynamically quantised int8 decoder.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(["fp16", "int8", "int4"]),
              help="Also write this precision variant (repeatable): fp16 every graph, int8/int4 the decoder (MatMulNBits); "
              "each validated against PyTorch.")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True,
              help="torch.onnx exporter (dynamo keeps bf16 weights and survives real sizes).")
@click.option("--no-optimize", is_flag=True, help="Skip the ORT_ENABLE_ALL-optimised copies.")
@click.option("--no-twin-check", is_flag=True, help="bf16: check the signature only (no fp32 twin in memory).")
@click.option("--isolate-graphs", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Export each graph in a fresh subprocess (auto: checkpoint weights above 1 GB); bounds peak memory.")
@click.option("--tolerance", type=float, help="Max |ONNX Runtime - PyTorch| per graph (default 1e-4 for fp32).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="safetensors shard size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where validation runs ONNX Runtime (cuda needs the [gpu] extra).")
@click.option("--draft", type=click.Path(file_okay=False, path_type=Path),
              help="Bundle this draft (model folder or ONNX export, same tokenizer) in draft/ for speculative decoding.")
@click.option("--num-draft-tokens", type=click.IntRange(1, 16), help="Draft tokens per target call recorded with --draft (default 4).")
@click.option("--draft-variant", type=click.Choice(["plain", "optimized", "fp32", "fp16", "int8", "int4"]), help="The draft variant the captioner runs.")
@click.option("--draft-confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Draft-confidence cut recorded with --draft: a round's drafting ends below this probability.")
@click.pass_obj
def export(obj, model_dir, onnx, safetensors, out, dtype, opset, quantize, variants, exporter, no_optimize, no_twin_check,
           isolate_graphs, tolerance, max_shard_size, device, draft, num_draft_tokens, draft_variant,
           draft_confidence=None):
    """Export MODEL_DIR (default: the newest runs/*/final) to ONNX and/or safetensors.

    \b
    --out is the ONNX folder with --onnx alone (default: onnx/ beside MODEL_DIR),
    the safetensors folder with --safetensors alone (default: safetensors/ beside it),
    and the parent of onnx/ and safetensors/ with both (default: beside MODEL_DIR).
    Every ONNX graph is checked against PyTorch (validation.json); a folder that is
    not a model exits 2 before anything is written. MODEL_DIR may name a preset
    (as for inspect): it is built (seed 0) and exported, outputs in the working folder.
    """
    if not (onnx or safetensors):
        raise UserInputError("choose what to write: --onnx and/or --safetensors")
    if quantize and not onnx:
        raise UserInputError("--quantize int8 applies to the ONNX decoder: add --onnx")
    if variants and not onnx:
        raise UserInputError("--variant applies to the ONNX graphs: add --onnx")
    if (draft is not None or num_draft_tokens or draft_variant or draft_confidence) and not onnx:
        raise UserInputError("--draft bundles a draft with the ONNX export: add --onnx")
    if draft is None and (num_draft_tokens or draft_variant or draft_confidence):
        raise UserInputError("--num-draft-tokens / --draft-variant / --draft-confidence go with --draft DIR")
    model_dir = model_dir if model_dir is not None else newest_final()
    beside = model_dir.resolve().parent
    with contextlib.ExitStack() as stack:
        if not model_dir.exists():
            model_dir = _preset_folder(model_dir, stack)
        _export(obj, model_dir, beside, onnx, safetensors, out, dtype, opset, quantize, variants, exporter, no_optimize,
                no_twin_check, isolate_graphs, tolerance, max_shard_size, device, draft, num_draft_tokens, draft_variant,
                draft_confidence)


def _preset_folder(name: Path, stack: contextlib.ExitStack) -> Path:
    """The folder of preset ``name`` (``inspect``'s presets export too): a shipped preset's own, or a
    built one saved into a temporary folder that ``stack`` removes; the default outputs go beside
    ``name`` (the working directory), as for a folder of that name.

    Raises:
        ModelSpecError: ``name`` is neither a folder nor a preset (exit 2).
    """
    from compressor.models.presets import PRESET_NAMES, SHIPPED, save_preset

    if str(name) not in PRESET_NAMES:
        raise ModelSpecError(f"{name}: no such folder (nor a preset: {', '.join(PRESET_NAMES)})")
    if str(name) in SHIPPED:
        return Path(SHIPPED[str(name)])
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vlm-compress-preset-")))
    log.info("%s: a preset built in code (seed 0), saved to %s for the export", name, tmp)
    return save_preset(str(name), tmp / str(name))


def _export(obj, model_dir, beside, onnx, safetensors, out, dtype, opset, quantize, variants, exporter, no_optimize,
            no_twin_check, isolate_graphs, tolerance, max_shard_size, device, draft, num_draft_tokens, draft_variant,
            draft_confidence=None):
    from compressor.models.loading import is_model_dir, resolve_device

    if not is_model_dir(model_dir):
        hint = " (it is an ONNX export already)" if (model_dir / "export.json").is_file() else ""
        raise ModelSpecError(
            f"{model_dir}: not a model folder{hint}; expected config.json and *.safetensors as save_pretrained writes"
        )
    from compressor.families import family_for_config
    from compressor.models.loading import load_config

    family_for_config(load_config(str(model_dir)))  # a non-BLIP model exits 2 before anything is written
    if draft is not None:
        from exporters.onnx.speculative import check_folders

        check_folders(model_dir, draft)  # before anything is written
    dev = resolve_device(device)
    targets = _targets(beside, out, onnx, safetensors)
    for t in targets.values():
        if t.resolve() == model_dir.resolve() or model_dir.resolve() in t.resolve().parents:
            raise UserInputError(f"--out {t} would write inside the model folder {model_dir}; choose another folder")
    summary: dict = {"model_dir": str(model_dir)}
    if safetensors:
        summary["safetensors"] = _write_safetensors(model_dir, targets["safetensors"], dtype, max_shard_size)
    if onnx:
        from exporters.onnx import OnnxOptions, export_onnx

        opts = OnnxOptions(
            dtype=dtype,
            opset=opset,
            exporter=exporter,
            optimize=not no_optimize,
            quantize=quantize,
            variants=tuple(variants),
            tolerance=tolerance,
            twin_check=not no_twin_check,
            isolate_graphs=isolate_graphs,
        )
        if draft is not None:
            from exporters.onnx.export import export_onnx_with_draft

            meta = export_onnx_with_draft(model_dir, targets["onnx"], opts, draft, num_draft_tokens, draft_variant, device=dev,
                                          min_confidence=draft_confidence)
        else:
            meta = export_onnx(model_dir, targets["onnx"], opts, device=dev)
        summary["onnx"] = {
            "folder": str(targets["onnx"]),
            "graphs": {k: {"file": v["onnx"], "bytes": v["bytes"]} for k, v in meta["graphs"].items()},
            "dtype": meta["dtype"],
            "seconds": meta["seconds"]["total"],
            "validation": str(targets["onnx"] / "validation.json"),
        }
        if meta.get("draft"):
            summary["onnx"]["draft"] = meta["draft"]
    if getattr(obj, "json", False):
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        for kind, info in summary.items():
            if kind == "model_dir":
                continue
            click.echo(f"{kind}: {info['folder']}")
            if kind == "onnx":
                for g, v in info["graphs"].items():
                    click.echo(f"  {g:15s} {v['file']:24s} {v['bytes'] / 1e6:10.1f} MB")
                click.echo(f"  validated against PyTorch ({info['validation']}), {info['seconds']:.1f} s")
                if info.get("draft"):
                    d = info["draft"]
                    click.echo(f"  draft/: {d['source']} bundled for speculative decoding ({d['num_draft_tokens']} tokens per call)")
            else:
                click.echo(f"  {info['shards']} shard(s), {info['dtype']}, {info['bytes'] / 1e6:.1f} MB, SHA256SUMS written")


def _write_safetensors(model_dir: Path, out: Path, dtype: str | None, max_shard_size: str) -> dict:
    import shutil

    from compressor.models.loading import load_model
    from exporters.safetensors_export import export_safetensors

    model, processor = load_model(model_dir, dtype=dtype)
    extra = {}
    if (model_dir / "recipe.resolved.yaml").is_file():
        extra["recipe.resolved.yaml"] = (model_dir / "recipe.resolved.yaml").read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    from compressor.fileio import make_tmp_dir

    tmp = make_tmp_dir(out.parent, out.name)
    try:
        info = export_safetensors(model, processor, tmp, max_shard_size=max_shard_size, extra_files=extra or None)
        from exporters.onnx import replace_dir

        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"folder": str(out), **{k: v for k, v in info.items() if k != "files"}}
