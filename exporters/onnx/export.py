"""Export orchestration: a model (folder) → a verified split ONNX folder, published atomically.

Each graph is exported, checked and validated by :func:`export_checked_graph`: in this process
for small models, or (``isolate_graphs``, by default for checkpoints above 1 GB) one graph per
fresh subprocess that memory-maps the model folder, so the peak follows the largest graph rather
than the whole model (:mod:`exporters.onnx.isolated`). Both paths merge the per-graph results
with :func:`merge_graph_results` and write the same folder with :func:`publish_export`. The
folder is built under a temporary name beside ``out_dir`` and renamed into place, so a killed
export never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from compressor.errors import ModelSpecError, UserInputError
from exporters.onnx import graphs, validation
from exporters.onnx import metadata as md
from exporters.onnx.options import ISOLATE_ABOVE_BYTES, OnnxOptions
from exporters.onnx.runtime import (
    convert_fp16,
    onnx_bytes,
    optimize_file,
    ort_can_run,
    quantize_int4,
    quantize_int8,
)
from exporters.onnx.samples import sample_cases
from exporters.onnx.topologies import by_kind, export_plan

log = logging.getLogger(__name__)


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    export_stage_cfg,
    device: str = "cpu",
    extra_files: dict[str, str] | None = None,
    stats: dict | None = None,
) -> dict:
    """Export a model folder to a verified split ONNX folder (the ``export`` stage and CLI).

    Large models (``isolate_graphs``) are exported one graph per fresh subprocess
    (:func:`exporters.onnx.isolated.export_isolated`); the folder written is the same.

    Args:
        model_dir: a ``save_pretrained`` folder of a registered family, with its processor.
        out_dir: the ONNX folder to create (replaced atomically if it exists).
        export_stage_cfg: an ``ExportStage`` (its ``dtype`` and ``onnx``), an ``OnnxSpec`` or
            :class:`~exporters.onnx.options.OnnxOptions`.
        device: ``cpu`` or ``cuda``: where validation runs ONNX Runtime (CUDA provider when the
            ``[gpu]`` extra is installed). Export itself traces on CPU.
        extra_files: name → text written into the folder (default: the model folder's
            ``recipe.resolved.yaml`` when it has one).
        stats: if given, filled with how the export ran: ``isolated`` (bool) and, when isolated,
            ``children``: per subprocess (graph name or ``twin_check``) its ``seconds`` and
            ``peak_rss_bytes`` (its own ``ru_maxrss``).

    Returns:
        The summary written to ``export.json`` (graphs, files, sizes, seconds, validation verdict).

    Raises:
        ModelSpecError: ``model_dir`` is not a model folder of a registered family (exit 2).
        OnnxValidationError: ONNX Runtime disagrees with PyTorch beyond tolerance (exit 3).
        VerificationError: ``onnx.checker`` rejects a graph.
        GraphSubprocessError: an isolated graph's subprocess died or failed unexpectedly (exit 3).
    """
    from compressor.models.loading import is_model_dir, load_model

    model_dir = Path(model_dir)
    if not is_model_dir(model_dir):
        raise ModelSpecError(f"{model_dir}: not a model folder (expected config.json and *.safetensors)")
    opts = export_stage_cfg if isinstance(export_stage_cfg, OnnxOptions) else OnnxOptions.from_stage(export_stage_cfg)
    opts.check()
    extra = dict(extra_files or {})
    recipe = model_dir / "recipe.resolved.yaml"
    if recipe.is_file() and "recipe.resolved.yaml" not in extra:
        extra["recipe.resolved.yaml"] = recipe.read_text()
    isolated = should_isolate(model_dir, opts)
    if stats is not None:
        stats["isolated"] = isolated
    if isolated:
        from exporters.onnx.isolated import export_isolated

        return export_isolated(model_dir, out_dir, opts, device=device, extra_files=extra, stats=stats)
    model, processor = load_model(model_dir, dtype=opts.dtype, device="cpu")
    require_processor(processor, model_dir)
    return export_model_onnx(model, processor, out_dir, opts, device=device, source=str(model_dir), extra_files=extra)


def should_isolate(model_dir: Path, opts: OnnxOptions) -> bool:
    """Whether :func:`export_onnx` exports one graph per subprocess: ``isolate_graphs``, and for
    ``auto`` the bytes of the folder's weight files against :data:`ISOLATE_ABOVE_BYTES`."""
    from compressor.models.loading import WEIGHT_SUFFIXES

    if opts.isolate_graphs != "auto":
        return opts.isolate_graphs == "always"
    weights = sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return weights > ISOLATE_ABOVE_BYTES


def require_processor(processor, model_dir: Path) -> None:
    """The ONNX folder needs the model's processor to caption alone.

    Raises:
        ModelSpecError: ``processor`` is None (the model folder has none).
    """
    if processor is None:
        raise ModelSpecError(f"{model_dir}: no processor (tokenizer + image processor) saved; the ONNX folder needs one")


def export_model_onnx(
    model,
    processor,
    out_dir: Path,
    opts: OnnxOptions | None = None,
    device: str = "cpu",
    source: str = "",
    extra_files: dict[str, str] | None = None,
) -> dict:
    """Export an in-memory model (see :func:`export_onnx`; used by tests and benchmarks).

    Every graph is exported, checked and validated by :func:`export_checked_graph` in this
    process (``opts.isolate_graphs`` needs a folder to reload from: :func:`export_onnx`).

    Args:
        model: a model of a registered family in eval mode on CPU (cast to ``opts.dtype`` when set).
        processor: its processor (saved into the folder).
        out_dir: the folder to create.
        opts: settings (defaults: dynamo, ORT_ENABLE_ALL copy, no quantisation).
        device: where validation runs ONNX Runtime.
        source: recorded in ``export.json``.
        extra_files: name → text written into the folder (e.g. the resolved recipe).

    Returns:
        The ``export.json`` summary.

    Raises:
        OnnxValidationError, VerificationError: see :func:`export_onnx`.
        UserInputError: ``isolate_graphs: always`` (an in-memory model cannot be reloaded by a
            subprocess), or an option out of its choices.
    """
    from compressor.families import family_for_model
    from compressor.fileio import make_tmp_dir

    opts = opts or OnnxOptions()
    opts.check()
    if opts.isolate_graphs == "always":
        raise UserInputError("isolate_graphs: always needs a model folder to reload from; use export_onnx(model_dir, …)")
    model, dtype = prepare_model(model, opts)
    family = family_for_model(model)
    out_dir = Path(out_dir)
    tmp = make_tmp_dir(out_dir.parent, out_dir.name)
    t_start = time.perf_counter()
    try:
        plan, runnable, cases = plan_and_cases(model, dtype, device)
        fp64 = validation.Float64Reference(model)
        results = {
            g.spec.name: export_checked_graph(plan, g.spec.name, cases, tmp, opts, dtype, device, runnable, fp64)
            for g in plan.graphs
        }
        numbers = numbers_record(dtype, runnable, opts, lambda: validation.twin_check(model, opts, device))
        files, timings, val = merge_graph_results(plan, results, dtype, device, numbers)
        model.config.save_pretrained(tmp)  # config.json: family lookup and `compress inspect` without weights
        meta = md.export_meta(model, processor, family, plan, files, dtype, opts, source)
        publish_export(tmp, out_dir, processor, meta, val, timings, t_start, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def prepare_model(model, opts: OnnxOptions):
    """Cast to ``opts.dtype`` (when set) and switch to eval mode.

    Returns:
        ``(model, dtype)``: the model and its dtype's name (``float32``, ``bfloat16`` …, from its
        first parameter), what export.json and validation.json record.
    """
    from compressor.models.loading import torch_dtype

    if opts.dtype is not None:
        model = model.to(torch_dtype(opts.dtype))
    model.eval()
    return model, str(next(model.parameters()).dtype).replace("torch.", "")


def plan_and_cases(model, dtype: str, device: str):
    """The export plan, whether ONNX Runtime can run ``dtype`` on ``device``, and the sample cases.

    Returns:
        ``(plan, runnable, cases)``; see :func:`~exporters.onnx.samples.sample_cases` (dry when
        not runnable).
    """
    import torch

    plan = export_plan(model)
    runnable = ort_can_run(dtype, device)
    with torch.inference_mode(False), torch.no_grad():
        cases = sample_cases(plan, model, dry=not runnable)
    return plan, runnable, cases


def export_checked_graph(
    plan, name: str, cases, folder: Path, opts: OnnxOptions, dtype: str, device: str, runnable: bool, fp64
) -> dict:
    """Export, check and validate ONE graph into ``folder``: the unit both the in-process loop and
    an isolated subprocess run.

    ``<name>.onnx`` is written and checked (``onnx.checker``, signature), validated against
    PyTorch when ONNX Runtime can run it, then (``opts.optimize``) its ORT_ENABLE_ALL copy is
    written and validated, and, for the topology's int8 graph with ``quantize: int8``, the int8
    copy written and reported.

    Returns:
        JSON-able ``{"file": export.json's graph entry (without the signature), "seconds":
        {"export", "optimize"?, "quantize"?} (s), "validation": {key: record} (``<name>`` and
        ``<name>.optimized``), "int8": the int8 report or None}``.

    Raises:
        OnnxValidationError, VerificationError, UserInputError: see
            :func:`~exporters.onnx.graphs.export_graph` and :func:`~exporters.onnx.validation.validate_all`.
    """
    g = plan.graph(name)
    one = plan.only(name)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    f = graphs.export_graph(g, cases[name][-1][1], folder, opts, dtype)
    seconds["export"] = round(time.perf_counter() - t0, 3)
    files = {name: f}
    val = validation.validate_all(one, cases, folder, files, opts, dtype, device, runnable, fp64=fp64)["graphs"]
    if opts.optimize:
        t0 = time.perf_counter()
        f["optimized"] = optimize_file(folder, f["onnx"], device) if runnable or dtype == "float32" else None
        seconds["optimize"] = round(time.perf_counter() - t0, 3)
        if runnable:
            val.update(validation.validate_all(one, cases, folder, files, opts, dtype, device, True, "optimized", fp64)["graphs"])
    int8 = None
    decoder = name == by_kind(plan.kind).INT8_GRAPH
    if (opts.quantize == "int8" or "int8" in opts.variants) and decoder:
        t0 = time.perf_counter()
        f["int8"], f["int8_method"] = quantize_int8(folder, f["onnx"])
        seconds["quantize"] = round(time.perf_counter() - t0, 3)
        int8 = validation.int8_report(one, cases, folder, files, name, device) if runnable else {"checked": "not run"}
    variants: dict[str, dict] = {}
    for v in opts.variants:  # each written, then validated against PyTorch within its tolerance
        if v != "fp16" and not decoder:
            continue
        t0 = time.perf_counter()
        if v == "int8":
            file, method = f["int8"], f["int8_method"]
        elif v == "int4":
            file, method = quantize_int4(folder, f["onnx"], opts.int4_block_size)
        else:
            file, method = convert_fp16(folder, f["onnx"])
        seconds[f"variant_{v}"] = round(time.perf_counter() - t0, 3)
        check = (validation.variant_check(one, cases, folder, name, file, v, opts.tolerance_of(v), device)
                 if runnable and dtype == "float32" else {"checked": "not run (the export dtype is not float32)"})
        variants[v] = {"file": file, "method": method, "bytes": onnx_bytes(folder / file), **(
            {"relative_rms_error": check["relative_rms_error"], "tolerance": check["tolerance"]} if "cases" in check else {})}
        val[f"{name}.{v}"] = check
    if variants:
        f["variants"] = variants
    for k in ("optimized", "int8"):
        if f.get(k):
            f[f"{k}_bytes"] = onnx_bytes(folder / f[k])
    return {"file": f, "seconds": seconds, "validation": val, "int8": int8}


def numbers_record(dtype: str, runnable: bool, opts: OnnxOptions, twin) -> dict | None:
    """validation.json's ``numbers`` entry: None when the graphs' own numbers were checked; else
    ``twin()`` (the fp32 twin check, :func:`~exporters.onnx.validation.twin_check`) or, with
    ``twin_check: false``, a note."""
    if dtype == "float32" or runnable:
        return None
    return twin() if opts.twin_check else {"checked": "signature only (twin_check: false)"}


def merge_graph_results(plan, results: dict[str, dict], dtype: str, device: str, numbers: dict | None):
    """Merge per-graph :func:`export_checked_graph` results, in plan order, into the folder's records.

    Returns:
        ``(files, timings, validation)``: export.json's graph entries (before signatures), its
        ``seconds`` (exports, then optimisations, then quantisation) and validation.json's
        content (plain graphs, then optimised ones; ``numbers``, ``int8``; ``passed``).
    """
    names = [g.spec.name for g in plan.graphs]
    files = {n: results[n]["file"] for n in names}
    timings: dict[str, float] = {}
    for step, suffix in (("export", ""), ("optimize", ".optimize"), ("quantize", ".quantize")):
        timings.update({f"{n}{suffix}": results[n]["seconds"][step] for n in names if step in results[n]["seconds"]})
    for n in names:
        timings.update({f"{n}.{k}": v for k, v in results[n]["seconds"].items() if k.startswith("variant_")})
    val: dict[str, Any] = {"graphs": {}, "dtype": dtype, "device": device}
    precision = tuple(f".{v}" for v in ("fp16", "int8", "int4"))
    for variant in (False, True):
        val["graphs"].update(
            {k: v for n in names for k, v in results[n]["validation"].items()
             if k.endswith(".optimized") == variant and not k.endswith(precision)}
        )
    variants = {k: v for n in names for k, v in results[n]["validation"].items() if k.endswith(precision)}
    if variants:
        val["variants"] = variants
    if numbers is not None:
        val["numbers"] = numbers
    int8 = [results[n]["int8"] for n in names if results[n]["int8"] is not None]
    if int8:
        val["int8"] = int8[0]
    val["passed"] = True
    return files, timings, val


def publish_export(
    tmp: Path, out_dir: Path, processor, meta: dict, validation_record: dict, timings: dict, t_start: float, extra_files
) -> None:
    """Write the processor, extra files, validation.json, export.json (with ``seconds``) and
    SHA256SUMS into ``tmp`` (which holds the graphs and config.json), then rename it to ``out_dir``."""
    from exporters.safetensors_export import write_checksums

    processor.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    meta["seconds"] = {**timings, "total": round(time.perf_counter() - t_start, 3)}
    md.write_json(tmp / md.VALIDATION_JSON, validation_record)
    md.write_json(tmp / md.EXPORT_JSON, meta)
    write_checksums(tmp)
    replace_dir(tmp, out_dir)
    log.info(
        "onnx export: %s graphs to %s in %.1f s (%s, %s)",
        len(meta["graphs"]),
        out_dir,
        meta["seconds"]["total"],
        meta["dtype"],
        meta["exporter"],
    )


def validate_export(model, onnx_dir: Path, device: str = "cpu", variant: str = "plain") -> dict:
    """Re-check an existing ONNX folder against a PyTorch model (same cases as after export).

    Args:
        model: the model the folder was exported from, in the export's dtype.
        onnx_dir: the ONNX folder.
        device: where ONNX Runtime runs.
        variant: ``plain`` (``<graph>.onnx``) or ``optimized`` (``<graph>.opt.onnx``).

    Returns:
        The per-graph validation record (as in ``validation.json``).

    Raises:
        OnnxValidationError: an output differs beyond its graph's tolerance.
        ModelSpecError: ``onnx_dir`` is not an ONNX export folder.
    """
    import torch

    meta = md.read_export_json(onnx_dir)
    model.eval()
    plan = export_plan(model)
    with torch.no_grad():
        cases = sample_cases(plan, model)
    opts = OnnxOptions(tolerance=None)
    files = {k: {"onnx": v["onnx"], "optimized": v.get("optimized")} for k, v in meta["graphs"].items()}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return validation.validate_all(
        plan, cases, Path(onnx_dir), files, opts, dtype, device, ort_can_run(dtype, device), variant,
        validation.Float64Reference(model),
    )


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_onnx_with_draft(
    model_dir: Path,
    out_dir: Path,
    opts,
    draft_dir: Path,
    num_draft_tokens: int | None = None,
    draft_variant: str | None = None,
    device: str = "cpu",
    extra_files: dict[str, str] | None = None,
    min_confidence: float | None = None,
) -> dict:
    """Export ``model_dir`` with a draft bundled for speculative decoding (the ``export`` stage's
    ``speculative``, ``compress export --draft``).

    The folder is the model's export plus ``draft/``: the draft's own export (a model folder is
    exported with the same options; an export folder is hard-linked as it is). ``export.json``
    names it (``"draft": {"folder": "draft", "num_draft_tokens": k, "variant": …, "source": …}``)
    and the captioner uses it unless told not to (:func:`exporters.onnx.speculative.resolve_draft`).
    ``SHA256SUMS`` covers the draft's files too. The draft is checked against the model before
    anything is exported (tokenizers, decoder-only kinds, its image tokens when it is an export),
    and both are opened as a speculative pair before the folder is published (scoring graph,
    vocabulary, image tokens); the folder appears complete or not at all.

    Args:
        model_dir: the model folder to export (the target).
        out_dir: the folder to create.
        opts: :class:`~exporters.onnx.options.OnnxOptions` (also used for a draft model folder).
        draft_dir: the draft: a model folder or an ONNX export folder.
        num_draft_tokens: ``k`` recorded for the captioner (None: 4).
        draft_variant: the draft export's variant the captioner runs (None: its default).
        device: where validation runs.
        extra_files: as for :func:`export_onnx`.
        min_confidence: the draft-confidence cut recorded for the captioner
            (:func:`exporters.onnx.speculative.speculative_greedy`; None: always ``k``).

    Returns:
        The target's ``export.json`` content, with its ``draft`` entry.

    Raises:
        UserInputError: the draft cannot draft for the model (exit 2, nothing written).
        ModelSpecError, OnnxValidationError, VerificationError: see :func:`export_onnx`.
    """
    from compressor.fileio import link_tree
    from exporters.onnx.metadata import is_onnx_dir
    from exporters.onnx.speculative import (
        DEFAULT_DRAFT_TOKENS,
        DRAFT_KEY,
        OpenDraft,
        check_folders,
        onnx_captioner,
    )
    from exporters.safetensors_export import write_checksums

    model_dir, out_dir, draft_dir = Path(model_dir), Path(out_dir), Path(draft_dir)
    if draft_dir.is_dir() and not is_onnx_dir(draft_dir) and is_onnx_dir(draft_dir / "onnx"):
        draft_dir = draft_dir / "onnx"
    k = int(num_draft_tokens or DEFAULT_DRAFT_TOKENS)
    check_folders(model_dir, draft_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-bundle-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = export_onnx(model_dir, tmp, opts, device=device, extra_files=extra_files)
        if is_onnx_dir(draft_dir):
            link_tree(draft_dir, tmp / "draft")
        else:
            export_onnx(draft_dir, tmp / "draft", opts, device=device)
        meta[DRAFT_KEY] = {"folder": "draft", "num_draft_tokens": k, "variant": draft_variant, "source": str(draft_dir)}
        if min_confidence is not None:
            meta[DRAFT_KEY]["min_confidence"] = float(min_confidence)
        md.write_json(tmp / ".export.json.new", meta)
        os.replace(tmp / ".export.json.new", tmp / md.EXPORT_JSON)  # a new file: never writes through a hard link
        write_checksums(tmp)
        from exporters.onnx.captioner import OnnxCaptioner

        draft = OnnxCaptioner(tmp / "draft", None, variant=draft_variant, verify=False, providers=["CPUExecutionProvider"])
        onnx_captioner(tmp, None, OpenDraft(draft, k, str(draft_dir), min_confidence), verify=False, providers=["CPUExecutionProvider"])
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("onnx export: %s bundles the draft %s (k = %d)", out_dir, draft_dir, k)
    return meta
