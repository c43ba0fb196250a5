"""Split ONNX export of BLIP-family models, verified against PyTorch after every export.

optimum cannot export BLIP, BLIP-2 or InstructBLIP, and its exporter pins transformers < 4.58
(README, "Why not optimum"); the graphs are cut by hand in
:mod:`compressor.families.onnx_graphs` and exported here with ``torch.onnx.export`` (the dynamo
exporter by default: it is the one that keeps bf16 weights and survives real sizes,
stack-facts §5 and §10; the legacy TorchScript exporter is faster on tiny models).

The output folder::

    export.json         family, kind, dtype, token ids, num_query_tokens, graph signatures and
                        files, characteristics (params_*), the decoding defaults
    validation.json     per graph and variant: cases, per-output max |ORT − PyTorch| on valid
                        positions, tolerance, what was checked (numbers / signature / fp32 twin)
    <graph>.onnx        one file per graph (+ <graph>.onnx.data above 2 GB)
    <graph>.opt.onnx    ONNX Runtime's ORT_ENABLE_ALL-optimised copy (optimize: true)
    decoder.int8.onnx   dynamic int8 quantisation of the decoder (quantize: int8)
    processor files     the tokenizer and image processor (so the folder captions alone)
    SHA256SUMS          every file's SHA-256 (a corrupted file is found before it is run)

The folder is built under a temporary name beside ``out_dir`` and renamed into place, so a killed
export never leaves a folder that looks complete.

Each graph is exported, checked and validated by :func:`export_checked_graph`: in this process
for small models, or (``isolate_graphs``, by default for checkpoints above 1 GB) one graph per
fresh subprocess that memory-maps the model folder, so the peak follows the largest graph rather
than the whole model (:mod:`exporters.onnx_isolated`). Both paths merge the per-graph results
with :func:`merge_graph_results` and write the same folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import CompressError, ModelSpecError, UserInputError, VerificationError

log = logging.getLogger(__name__)

EXPORT_JSON = "export.json"
VALIDATION_JSON = "validation.json"
FORMAT_VERSION = 1
TWO_GB = 2 * 1024**3
#: The dynamo exporter's default opset: 23 is the first with the fused ``Attention``,
#: ``RMSNormalization`` and ``RotaryEmbedding`` operators, which ``torch.onnx`` emits for
#: ``scaled_dot_product_attention``, ``rms_norm`` and the rotary embedding. On SmolLM2-135M
#: inside the demo BLIP-2 they cut the decoder from 2,432 to 978 nodes (with grouped KV heads
#: passed unexpanded, :func:`_sdpa_native_gqa`), and to 707 once the head-splitting around
#: each ``Attention`` is folded into its 3-D form (:mod:`exporters.onnx_passes`).
#: ONNX Runtime runs them from 1.23 on CPU, from 1.26 on CUDA (1.25 refuses grouped KV heads with
#: a KV cache: "GQA ... not supported by the unfused runner"); ``opset: 20`` exports the
#: decomposed graph for older runtimes.
DYNAMO_OPSET = 23


class OnnxValidationError(VerificationError):
    """ONNX Runtime disagrees with PyTorch beyond a graph's tolerance (exit 3).

    Attributes:
        graph: the graph name (``decoder`` …).
        output: the output name (``logits``, ``present.3.key`` …).
        max_diff: the largest |ORT − PyTorch| seen on valid positions.
        scaled_diff: ``max_diff / max(1, max |PyTorch|)``, what the tolerance bounds.
        tolerance: the allowed maximum.
        case: the sample case (``prefill``, ``decode_1`` …).
        variant: ``""`` for the plain graph, ``optimized`` for its ORT_ENABLE_ALL copy.
    """

    def __init__(
        self,
        graph: str,
        output: str,
        max_diff: float,
        tolerance: float,
        case: str = "",
        variant: str = "",
        scaled_diff: float | None = None,
    ):
        self.graph, self.output, self.max_diff, self.tolerance, self.case = graph, output, max_diff, tolerance, case
        self.variant = variant
        self.scaled_diff = max_diff if scaled_diff is None else scaled_diff
        where = f"{graph}{f' ({variant})' if variant else ''}"
        super().__init__(
            f"ONNX validation failed: graph '{where}', output '{output}', case '{case}': max |ORT - PyTorch| = "
            f"{max_diff:.3g} (scaled by max(1, |PyTorch|): {self.scaled_diff:.3g}) > tolerance {tolerance:.3g}"
        )


class ExportWriteError(CompressError):
    """Writing a graph into the export folder failed (disk full, quota, permissions; exit 3).

    The message names the file and folder, the operating system's reason and the free space
    left on that disk; the half-written temporary folder is removed and an earlier export at
    the output path is left as it was.
    """


@contextlib.contextmanager
def _writing(folder: Path, name: str):
    """Turns an ``OSError`` while ``name`` is written into ``folder`` into an :class:`ExportWriteError`.

    numpy and onnx_ir report a full disk as "problem writing element N to file"; the message
    says what was written where, why (``strerror``) and how much space that disk has left.
    """
    try:
        yield
    except OSError as exc:
        try:
            free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free there"
        except OSError:
            free = "free space unknown"
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ExportWriteError(
            f"writing {name} into {folder} failed: {reason} ({free}); free some space or export to "
            "another disk (--out), the export needs about twice the weights' size while it runs"
        ) from exc


@dataclass
class OnnxOptions:
    """Export settings (the recipe's ``OnnxSpec`` plus the export dtype).

    Attributes:
        dtype: ``float32`` / ``float16`` / ``bfloat16``, or None to keep the saved dtype.
        opset: ONNX opset, or None for the default: :data:`DYNAMO_OPSET` (23) with the dynamo
            exporter, the legacy exporter's own default with ``legacy``.
        exporter: ``dynamo`` or ``legacy``.
        optimize: also save ``<graph>.opt.onnx`` (ORT_ENABLE_ALL).
        quantize: ``int8`` for a dynamically quantised decoder, or None.
        tolerance: max |ORT − PyTorch| for fp32 graphs (None: each graph's default, 1e-4).
        external_data: ``auto`` (above 2 GB), ``always`` or ``never``.
        twin_check: for dtypes ONNX Runtime's CPU provider cannot run, check numbers on an fp32
            twin of the model (needs memory for an fp32 copy); else the signature only.
        isolate_graphs: export each graph in a fresh subprocess that memory-maps the model folder
            (:mod:`exporters.onnx_isolated`), so pages read for one graph are gone before the
            next: ``auto`` (checkpoint weights above :data:`ISOLATE_ABOVE_BYTES`), ``always`` or
            ``never``. Applies to :func:`export_onnx` (a folder to reload from); an in-memory
            model is always exported in-process.
    """

    dtype: str | None = None
    opset: int | None = None
    exporter: str = "dynamo"
    optimize: bool = True
    quantize: str | None = None
    tolerance: float | None = None
    external_data: str = "auto"
    twin_check: bool = True
    isolate_graphs: str = "auto"

    @classmethod
    def from_stage(cls, cfg) -> OnnxOptions:
        """From an ``ExportStage`` (``cfg.dtype`` + ``cfg.onnx``) or an ``OnnxSpec``."""
        spec = getattr(cfg, "onnx", cfg)
        return cls(
            dtype=getattr(cfg, "dtype", None),
            opset=spec.opset,
            exporter=spec.exporter,
            optimize=spec.optimize,
            quantize=spec.quantize,
            tolerance=spec.tolerance,
            external_data=spec.external_data,
            twin_check=getattr(spec, "twin_check", True),
            isolate_graphs=getattr(spec, "isolate_graphs", "auto"),
        )

    def check(self) -> None:
        """Refuse settings outside their choices (before anything is loaded or written).

        Raises:
            UserInputError: an exporter, quantisation or isolation setting out of its choices (exit 2).
        """
        if self.exporter not in ("dynamo", "legacy"):
            raise UserInputError(f"exporter '{self.exporter}': expected dynamo or legacy")
        if self.quantize not in (None, "int8"):
            raise UserInputError(f"quantize '{self.quantize}': expected int8 or nothing")
        if self.isolate_graphs not in ("auto", "always", "never"):
            raise UserInputError(f"isolate_graphs '{self.isolate_graphs}': expected auto, always or never")


#: ``isolate_graphs: auto`` exports in subprocesses when the checkpoint's weight files exceed this (bytes).
ISOLATE_ABOVE_BYTES = 10**9


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


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
    (:func:`exporters.onnx_isolated.export_isolated`); the folder written is the same.

    Args:
        model_dir: a BLIP-family ``save_pretrained`` folder with its processor.
        out_dir: the ONNX folder to create (replaced atomically if it exists).
        export_stage_cfg: an ``ExportStage`` (its ``dtype`` and ``onnx``), an ``OnnxSpec`` or
            :class:`OnnxOptions`.
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
        ModelSpecError: ``model_dir`` is not a BLIP-family model folder (exit 2).
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
        from exporters.onnx_isolated import export_isolated

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
        model: a BLIP-family model in eval mode on CPU (cast to ``opts.dtype`` when set).
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
        fp64 = _Float64Reference(model)
        results = {
            g.spec.name: export_checked_graph(plan, g.spec.name, cases, tmp, opts, dtype, device, runnable, fp64)
            for g in plan.graphs
        }
        numbers = numbers_record(dtype, runnable, opts, lambda: _twin_check(model, opts, device))
        files, timings, validation = merge_graph_results(plan, results, dtype, device, numbers)
        model.config.save_pretrained(tmp)  # config.json: family lookup and `compress inspect` without weights
        meta = _export_meta(model, processor, family, plan, files, dtype, opts, source)
        publish_export(tmp, out_dir, processor, meta, validation, timings, t_start, extra_files)
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
        ``(plan, runnable, cases)``; see :func:`sample_cases` (dry when not runnable).
    """
    import torch

    from compressor.families.onnx_graphs import export_plan

    plan = export_plan(model)
    runnable = _ort_can_run(dtype, device)
    with torch.inference_mode(False), torch.no_grad():
        cases = sample_cases(plan, model, dry=not runnable)
    return plan, runnable, cases


def export_checked_graph(plan, name: str, cases, folder: Path, opts: OnnxOptions, dtype: str, device: str, runnable: bool, fp64) -> dict:
    """Export, check and validate ONE graph into ``folder``: the unit both the in-process loop and
    an isolated subprocess run.

    ``<name>.onnx`` is written and checked (``onnx.checker``, signature), validated against
    PyTorch when ONNX Runtime can run it, then (``opts.optimize``) its ORT_ENABLE_ALL copy is
    written and validated, and, for the decoder with ``quantize: int8``, the int8 copy written
    and reported.

    Returns:
        JSON-able ``{"file": export.json's graph entry (without the signature), "seconds":
        {"export", "optimize"?, "quantize"?} (s), "validation": {key: record} (``<name>`` and
        ``<name>.optimized``), "int8": the int8 report or None}``.

    Raises:
        OnnxValidationError, VerificationError, UserInputError: see :func:`_export_graph` and
            :func:`_validate_all`.
    """
    from compressor.families.onnx_graphs import ExportPlan

    g = plan.graph(name)
    one = ExportPlan(plan.kind, [g], plan.meta)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    f = _export_graph(g, cases[name][-1][1], folder, opts, dtype)
    seconds["export"] = round(time.perf_counter() - t0, 3)
    files = {name: f}
    validation = _validate_all(one, cases, folder, files, opts, dtype, device, runnable, fp64=fp64)["graphs"]
    if opts.optimize:
        t0 = time.perf_counter()
        f["optimized"] = _optimize(folder, f["onnx"], device) if runnable or dtype == "float32" else None
        seconds["optimize"] = round(time.perf_counter() - t0, 3)
        if runnable:
            validation.update(_validate_all(one, cases, folder, files, opts, dtype, device, True, "optimized", fp64)["graphs"])
    int8 = None
    if opts.quantize == "int8" and name == int8_graph(plan.kind):
        t0 = time.perf_counter()
        f["int8"], f["int8_method"] = _quantize_int8(folder, f["onnx"])
        seconds["quantize"] = round(time.perf_counter() - t0, 3)
        int8 = _int8_report(one, cases, folder, files, name, device) if runnable else {"checked": "not run"}
    for k in ("optimized", "int8"):
        if f.get(k):
            f[f"{k}_bytes"] = _onnx_bytes(folder / f[k])
    return {"file": f, "seconds": seconds, "validation": validation, "int8": int8}


def int8_graph(kind: str) -> str:
    """The graph ``quantize: int8`` applies to (the autoregressive decoder)."""
    return "text_decoder" if kind == "blip" else "decoder"


def numbers_record(dtype: str, runnable: bool, opts: OnnxOptions, twin) -> dict | None:
    """validation.json's ``numbers`` entry: None when the graphs' own numbers were checked; else
    ``twin()`` (the fp32 twin check, :func:`_twin_check`) or, with ``twin_check: false``, a note."""
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
    validation: dict[str, Any] = {"graphs": {}, "dtype": dtype, "device": device}
    for variant in (False, True):
        validation["graphs"].update(
            {k: v for n in names for k, v in results[n]["validation"].items() if k.endswith(".optimized") == variant}
        )
    if numbers is not None:
        validation["numbers"] = numbers
    int8 = [results[n]["int8"] for n in names if results[n]["int8"] is not None]
    if int8:
        validation["int8"] = int8[0]
    validation["passed"] = True
    return files, timings, validation


def publish_export(tmp: Path, out_dir: Path, processor, meta: dict, validation: dict, timings: dict, t_start: float, extra_files) -> None:
    """Write the processor, extra files, validation.json, export.json (with ``seconds``) and
    SHA256SUMS into ``tmp`` (which holds the graphs and config.json), then rename it to ``out_dir``."""
    from exporters.safetensors_export import write_checksums

    processor.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    meta["seconds"] = {**timings, "total": round(time.perf_counter() - t_start, 3)}
    _write_json(tmp / VALIDATION_JSON, validation)
    _write_json(tmp / EXPORT_JSON, meta)
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
        model: the BLIP-family model the folder was exported from, in the export's dtype.
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

    from compressor.families.onnx_graphs import export_plan
    from exporters.onnx_runtime import read_export_json

    meta = read_export_json(onnx_dir)
    model.eval()
    plan = export_plan(model)
    with torch.no_grad():
        cases = sample_cases(plan, model)
    opts = OnnxOptions(tolerance=None)
    files = {k: {"onnx": v["onnx"], "optimized": v.get("optimized")} for k, v in meta["graphs"].items()}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return _validate_all(
        plan, cases, Path(onnx_dir), files, opts, dtype, device, _ort_can_run(dtype, device), variant, _Float64Reference(model)
    )


# --------------------------------------------------------------------------------------------
# Sample inputs: batch > 1, left padding, past length 0 and > 0
# --------------------------------------------------------------------------------------------


def sample_cases(plan, model, batch: int = 3, seed: int = 0, dry: bool = False) -> dict[str, list[tuple[str, list]]]:
    """Sample inputs per graph: ``{graph: [(case, [tensor per input]), …]}``.

    The decoders are fed through a prefill (past 0) then decode steps (past > 0), with the
    presents of the previous step as past, so the cases look like generation: batch 3, rows
    with no padding, with padding between the image tokens and the text (the processor's
    layout), and with left padding. The LAST case of each graph is the one traced by the
    exporter (past > 0, more than one current token, padding present: no size 0 or 1 to
    specialise on, stack-facts §5).

    With ``dry=True`` no graph is run: outputs feeding later cases (image features, past) are
    random tensors of the declared shapes. That is enough to trace an export that ONNX Runtime
    cannot check anyway (bf16 on CPU), and avoids minutes of bf16 CPU compute at real size.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    meta = plan.meta
    dtype = next(model.parameters()).dtype
    vocab = int(meta["vocab_size"])

    def ids(b, n, hi=vocab):
        return torch.randint(4, max(5, hi), (b, n), generator=g)

    def run(name, inputs):
        if dry:
            return _shaped_outputs(plan.graph(name).spec, inputs, dtype, g)
        with torch.no_grad():
            out = plan.graph(name).module(*inputs)
        return out if isinstance(out, tuple) else (out,)

    size = int(meta["image_size"])
    pix = torch.randn((batch, 3, size, size), generator=g)
    cases: dict[str, list] = {}
    if plan.kind == "blip":
        L = meta["num_layers"]
        cases["vision_encoder"] = [("batch_1", [pix[:1]]), (f"batch_{batch}", [pix])]
        cross = list(run("vision_encoder", [pix])[1:])
        mask = torch.ones((batch, 5), dtype=torch.long)
        mask[1, :2] = 0
        mask[2, :1] = 0
        empty = _empty_past(meta, batch, dtype)
        steps = []
        x, past = ids(batch, 5), empty
        for label, n in (("prefill", 5), ("decode_1", 1), ("decode_3", 3)):
            if label != "prefill":
                x = ids(batch, n)
                mask = torch.cat([mask, torch.ones((batch, n), dtype=torch.long)], 1)
            inputs = [x, mask.clone(), *past, *cross]
            steps.append((label, inputs))
            past = list(run("text_decoder", inputs)[1 : 1 + 2 * L])
        cases["text_decoder"] = steps
        return cases
    nq = int(meta["num_query_tokens"])
    image_inputs = [pix]
    if "qformer_input_ids" in plan.graph("image_encoder").spec.input_names:
        qv = int(model.config.qformer_config.vocab_size)
        qmask = torch.ones((batch, 5), dtype=torch.long)
        qmask[1, 3:] = 0
        qmask[2, 4:] = 0
        image_inputs = [pix, ids(batch, 5, qv), qmask]
    cases["image_encoder"] = [("batch_1", [t[:1] for t in image_inputs]), (f"batch_{batch}", image_inputs)]
    feats = run("image_encoder", image_inputs)[0]
    cases["embed_tokens"] = [("batch_1", [ids(1, 4)]), (f"batch_{batch}", [ids(batch, 7)])]
    embed = plan.graph("embed_tokens").module

    def emb(x):
        with torch.no_grad():
            return embed(x)

    prompt = 4
    mask = torch.ones((batch, nq + prompt), dtype=torch.long)
    if plan.kind == "causal":
        mask[1, nq : nq + 2] = 0  # processor layout: image tokens, padding, text
        mask[2, :3] = 0  # plain left padding
        L = meta["num_layers"]
        x = torch.cat([feats, emb(ids(batch, prompt))], 1)
        past = _empty_past(meta, batch, dtype)
        steps = []
        for label, n in (("prefill", None), ("decode_1", 1), ("decode_3", 3)):
            if label != "prefill":
                x = emb(ids(batch, n))
                mask = torch.cat([mask, torch.ones((batch, n), dtype=torch.long)], 1)
            inputs = [x, mask.clone(), *past]
            steps.append((label, inputs))
            past = list(run("decoder", inputs)[1:])
        cases["decoder"] = steps
        return cases
    # seq2seq: the encoder input is right-padded (T5 tokenizers pad right)
    mask[1, -2:] = 0
    mask[2, -1:] = 0
    enc_in = [torch.cat([feats, emb(ids(batch, prompt))], 1), mask]
    cases["encoder"] = [("batch_1", [t[:1] for t in enc_in]), (f"batch_{batch}", enc_in)]
    cross = list(run("encoder", enc_in)[1:])
    L = meta["num_layers"]
    past = _empty_past(meta, batch, dtype)
    steps = []
    for label, n in (("start", 1), ("decode_1", 1), ("decode_3", 3)):
        inputs = [emb(ids(batch, n)), mask, *past, *cross]
        steps.append((label, inputs))
        past = list(run("decoder", inputs)[1 : 1 + 2 * L])
    cases["decoder"] = steps
    return cases


def _shaped_outputs(spec, inputs: list, dtype, gen) -> tuple:
    """Random outputs of the shapes ``spec`` declares for these inputs (symbols read from the inputs)."""
    import torch

    sym: dict[str, int] = {}
    for t, x in zip(spec.inputs, inputs):
        for d, n in zip(t.dims, x.shape):
            if isinstance(d, str):
                sym.setdefault(d, int(n))
    if "total" not in sym and "past" in sym and "seq" in sym:
        sym["total"] = sym["past"] + sym["seq"]
    out = []
    for t in spec.outputs:
        shape = [sym[d] if isinstance(d, str) else int(d) for d in t.dims]
        dt = torch.float32 if t.dtype == "float32" else (torch.int64 if t.dtype == "int64" else dtype)
        out.append(torch.randn(shape, generator=gen).to(dt))
    return tuple(out)


def _empty_past(meta: dict, batch: int, dtype) -> list:
    import torch

    shape = (batch, meta["num_kv_heads"], 0, meta["head_dim"])
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * meta["num_layers"])]


# --------------------------------------------------------------------------------------------
# Export of one graph
# --------------------------------------------------------------------------------------------


def _param_bytes(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _export_graph(graph, args: list, folder: Path, opts: OnnxOptions, dtype: str) -> dict[str, Any]:
    """Export one graph to ``folder/<name>.onnx``; ``onnx.checker`` and the signature check must pass.

    Raises:
        VerificationError: the checker rejects the graph, or its inputs/outputs differ from the spec.
        UserInputError: ``external_data: never`` for a graph above 2 GB.
    """
    import onnx
    import torch

    spec = graph.spec
    path = folder / f"{spec.name}.onnx"
    kwargs: dict[str, Any] = {"input_names": spec.input_names, "output_names": spec.output_names}
    opset = opts.opset if opts.opset is not None else (DYNAMO_OPSET if opts.exporter == "dynamo" else None)
    if opset is not None:
        kwargs["opset_version"] = opset
    fused_ops = (opset or 0) >= 23  # Attention, RMSNormalization, RotaryEmbedding
    if opts.exporter == "legacy":
        import warnings

        with warnings.catch_warnings(), _writing(folder, path.name):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph.module,
                tuple(args),
                str(path),
                dynamic_axes=spec.dynamic_axes(),
                do_constant_folding=True,
                dynamo=False,
                **kwargs,
            )
        size = _onnx_bytes(path)
        if opts.external_data == "always" or (opts.external_data == "auto" and size > TWO_GB):
            m = onnx.load(str(path))
            _remove_external(path)
            with _writing(folder, f"{path.name} (external data)"):
                onnx.save_model(m, str(path), save_as_external_data=True, location=f"{spec.name}.onnx.data")
    else:
        with (
            _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo"),
            _rms_norm_as_op(graph.module, enabled=fused_ops),
            _sdpa_native_gqa(enabled=fused_ops),
            _t5_eager_attention(graph.module),
        ):
            prog = torch.onnx.export(
                graph.module,
                tuple(args),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(spec, len(args)),
                optimize=True,
                verbose=False,
                **kwargs,
            )
        weights = sum(
            int(v.const_value.nbytes) for v in prog.model.graph.initializers.values() if v.const_value is not None
        )
        if opts.external_data == "never" and weights > TWO_GB:
            raise UserInputError(f"graph {spec.name} holds {weights / 1e9:.2f} GB of weights: external_data: never cannot hold it")
        external = opts.external_data == "always" or (opts.external_data == "auto" and weights > TWO_GB)
        with _writing(folder, path.name + (" (external data)" if external else "")):
            prog.save(str(path), external_data=external)
        del prog
        if fused_ops:
            from exporters.onnx_passes import fold_attention_layout_file

            with _writing(folder, path.name):
                folded = fold_attention_layout_file(path)
            log.debug("%s: %d attentions folded to 3-D", spec.name, folded)
    try:
        # full_check adds strict type and shape inference (catches mixed-dtype nodes); it loads
        # the whole model, so graphs above 2 GB get the structural check only
        # bf16 Conv/LayerNorm are outside the ONNX type constraints onnx's inference enforces
        # (ONNX Runtime's CUDA provider runs them); those graphs get the structural check
        onnx.checker.check_model(str(path), full_check=_onnx_bytes(path) < TWO_GB and dtype != "bfloat16")
    except Exception as exc:  # onnx.checker.ValidationError, InferenceError and protobuf errors
        raise VerificationError(f"onnx.checker rejected {path.name}: {str(exc).splitlines()[0][:400]}") from exc
    opset = _check_signature(path, spec, dtype)
    return {
        "onnx": path.name,
        "bytes": _onnx_bytes(path),
        "external_data": (folder / f"{spec.name}.onnx.data").is_file(),
        "opset": opset,
    }


@contextlib.contextmanager
def _rms_norm_as_op(module, enabled: bool = True):
    """Within the block, RMS norms run as ``torch.nn.functional.rms_norm`` (→ ONNX ``RMSNormalization``).

    transformers writes RMSNorm out (``x * rsqrt(mean(x²) + eps) * weight``: LlamaRMSNorm, the
    Mistral/Qwen copies, T5LayerNorm), which exports as five nodes per norm. A module is swapped
    only when it has a 1-D float32 ``weight`` and a ``variance_epsilon`` and its own forward agrees
    with ``F.rms_norm`` on a probe input (max |Δ| ≤ 1e-5), so a norm with another formula
    (Gemma's ``1 + weight``) keeps its own; half-precision norms keep theirs too (their fp32
    upcast order differs). Yields the swapped modules; their forwards are restored on exit, and
    validation still compares the exported graph with the unmodified module.
    """
    import torch
    import torch.nn.functional as F

    swapped = []
    for m in module.modules() if enabled else ():
        w, eps = getattr(m, "weight", None), getattr(m, "variance_epsilon", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.dtype != torch.float32 or not isinstance(eps, float):
            continue
        if "forward" in vars(m):
            continue
        probe = torch.randn(2, 3, w.shape[0], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, got = m(probe), F.rms_norm(probe, (w.shape[0],), w, eps)
        if ref.shape == got.shape and float((ref - got).abs().max()) <= 1e-5:
            m.forward = functools.partial(_rms_norm, weight=w, eps=eps)
            swapped.append(m)
    try:
        yield swapped
    finally:
        for m in swapped:
            del m.forward


def _rms_norm(x, weight, eps: float):
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@contextlib.contextmanager
def _sdpa_native_gqa(enabled: bool = True):
    """Within the block, grouped-query attention reaches sdpa with its ``kv_heads`` unexpanded.

    transformers repeats each key/value head ``heads / kv_heads`` times before sdpa when a mask
    is given (``repeat_kv``: 8 more nodes per layer and a copy of the whole KV cache per step);
    ``TRANSFORMERS_SDPA_FORCE_GQA=1`` (transformers' switch, read when attention runs) passes
    ``enable_gqa=True`` instead, which ``torch.onnx`` exports as one opset-23 ``Attention`` with
    fewer KV heads than query heads. SmolLM2-135M (9 heads, 3 KV heads) decode step, 2 threads:
    23.4 against 27.3 ms fp32, 9.4 against 11.6 ms int8. Models without grouped heads are
    unaffected. The variable is restored on exit.
    """
    if not enabled:
        yield
        return
    var = "TRANSFORMERS_SDPA_FORCE_GQA"
    previous = os.environ.get(var)
    os.environ[var] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[var]
        else:
            os.environ[var] = previous


@contextlib.contextmanager
def _t5_eager_attention(module):
    """Within the block, T5 attention runs transformers' eager path instead of sdpa.

    With sdpa, T5Attention's ``reshape`` of the transposed attention output cannot be decomposed
    by ``torch.export`` under dynamic batch and sequence ("Cannot view a tensor with shape
    [s59, s29, 4, 8] and strides (32*s29, 8, 8*s29, 1)", torch 2.13, transformers 5.24); the eager
    path gives the same numbers and exports. Every T5 config object under ``module`` (the encoder
    and decoder stacks hold their own copies) is switched and restored on exit.
    """
    configs = {}
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "model_type", None) == "t5":
            configs[id(cfg)] = (cfg, cfg._attn_implementation)
    for cfg, _ in configs.values():
        cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        for cfg, previous in configs.values():
            cfg._attn_implementation = previous


def _dynamic_shapes(spec, n_args: int):
    """dynamo ``dynamic_shapes`` mirroring the wrapper's signature (``*past`` nested, stack-facts §5)."""
    from torch.export import Dim

    def axes(t):
        return {i: Dim.DYNAMIC for i, d in enumerate(t.dims) if isinstance(d, str)} or None

    fixed = 2 if len(spec.inputs) > 2 and spec.inputs[2].name.startswith(("past.", "cross.")) else len(spec.inputs)
    head = [axes(t) for t in spec.inputs[:fixed]]
    if fixed == len(spec.inputs):
        return tuple(head)
    return (*head, tuple(axes(t) for t in spec.inputs[fixed:]))


def _onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _remove_external(path: Path) -> None:
    for p in path.parent.glob(path.name + ".data"):
        p.unlink()


_ELEM = {"float32": 1, "int64": 7, "float16": 10, "bfloat16": 16}


def _check_signature(path: Path, spec, dtype: str) -> int:
    """The graph's inputs/outputs are exactly the declared ones: names in order, ranks, element types.

    Returns:
        The graph's ONNX opset (default domain).

    Raises:
        VerificationError: naming the first mismatch.
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in m.graph.input]
    got_out = [o.name for o in m.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise VerificationError(
            f"{path.name}: signature differs from the declared graph: inputs {got_in} vs {spec.input_names}, "
            f"outputs {got_out} vs {spec.output_names}"
        )
    for vi, t in zip([*m.graph.input, *m.graph.output], [*spec.inputs, *spec.outputs]):
        rank = len(vi.type.tensor_type.shape.dim)
        if rank != len(t.dims):
            raise VerificationError(f"{path.name}: {t.name} has rank {rank}, declared {len(t.dims)}")
        want = _ELEM[dtype if t.dtype == "model" else t.dtype]
        got = vi.type.tensor_type.elem_type
        if got != want:
            name = onnx.TensorProto.DataType.Name(got)
            raise VerificationError(f"{path.name}: {t.name} is {name}, declared {t.dtype if t.dtype != 'model' else dtype}")
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


# --------------------------------------------------------------------------------------------
# ONNX Runtime: sessions, optimisation, quantisation
# --------------------------------------------------------------------------------------------


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``cpu`` / ``cuda`` (CUDA only when available).

    Raises:
        UserInputError: ``cuda`` asked but the installed onnxruntime has no CUDA provider
            (install the ``[gpu]`` extra, onnxruntime-gpu).
    """
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserInputError(
                "device cuda: this onnxruntime has no CUDAExecutionProvider; install the [gpu] extra "
                "(onnxruntime-gpu, which replaces onnxruntime)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(
    path: Path, providers: list[str], optimize: bool = True, threads: int | None = None, spinning: bool = True
):
    """An ``InferenceSession``; graph optimisation off for already-optimised copies.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers.
        optimize: ORT_ENABLE_ALL (True) or ORT_DISABLE_ALL (for ``*.opt.onnx``, already optimised).
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        spinning: let intra-op threads spin-wait between the nodes of one ``run`` (ONNX Runtime's
            default) and stop spinning when the ``run`` returns (``session.force_spinning_stop``),
            so a pool never holds the cores between calls, where the next session or another
            library (PyTorch in the benchmark) needs them. SmolLM2-135M decode step in the demo
            BLIP-2, 2 threads, quiet 2-core machine: 29.8 ms (spin, stop after run) against 31.1 ms
            (spin throughout) and 42.2 ms (no spinning); int8 15.6 / 15.1 / 22.2 ms. False: no
            spinning at all (a machine shared with other busy processes).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def _ort_can_run(dtype: str, device: str) -> bool:
    """bf16 graphs do not run on ONNX Runtime's CPU provider (no bf16 MatMul kernels)."""
    return dtype != "bfloat16" or device == "cuda"


def _optimize(folder: Path, name: str, device: str) -> str:
    """Save ONNX Runtime's ORT_ENABLE_ALL-optimised copy as ``<graph>.opt.onnx``."""
    import onnxruntime as ort

    src = folder / name
    dst = folder / name.replace(".onnx", ".opt.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if _onnx_bytes(src) > TWO_GB or (folder / (name + ".data")).is_file():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=so, providers=providers_for(device)[-1:])
    return dst.name


#: int8 decoder scheme: weights int8 in blocks of this many input channels (one scale each).
INT8_BLOCK = 32


def _quantize_int8(folder: Path, name: str) -> tuple[str, str]:
    """int8 dynamic quantisation of the decoder's MatMuls (onnxruntime.quantization).

    The scheme is ONNX Runtime's ``MatMulNBits`` with 8 bits: weights int8 in blocks of
    :data:`INT8_BLOCK` input channels with one scale each, activations quantised to int8 per
    block at run time (``accuracy_level=4``, int8 dot products). On SmolLM2-135M inside the demo
    BLIP-2, teacher-forced on COCO captions, its top-1 agreement with fp32 was 0.93 (KL 0.007)
    against 0.83 (KL 0.046) for ``quantize_dynamic`` (per-channel int8 weights, per-tensor uint8
    activations), at the same speed (24.9 against 23.7 ms per decode step, 2 threads, against
    56-67 ms in fp32). ``quantize_dynamic`` is the fallback where the blockwise quantiser is
    missing (older onnxruntime). Both follow onnxruntime.quantization's recipe for transformers:
    ``quant_pre_process`` first.

    Returns:
        ``(file name, method)``.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = folder / name
    pre = folder / ".int8-pre.onnx"
    dst = folder / name.replace(".onnx", ".int8.onnx")
    large = _onnx_bytes(src) > TWO_GB
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large)
        source = pre
    except Exception as exc:  # pre-processing is an optimisation; quantise the plain graph without it
        log.info("quant_pre_process failed (%s); quantising %s directly", type(exc).__name__, name)
        source = src
    try:
        with _root_logging_quiet():
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            cfg = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, bits=8)
            q = MatMulNBitsQuantizer(
                onnx.load(str(source)), bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, algo_config=cfg
            )
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=large)
        method = f"MatMulNBits int8 weights (blocks of {INT8_BLOCK}), int8 activations per block (accuracy_level 4)"
    except (ImportError, TypeError, ValueError) as exc:  # an onnxruntime without 8-bit MatMulNBits
        log.info("blockwise int8 unavailable (%s); using quantize_dynamic", exc)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _root_logging_quiet():
            quantize_dynamic(
                str(source),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
                use_external_data_format=large,
            )
        method = "quantize_dynamic: per-channel int8 weights, per-tensor uint8 activations"
    for p in folder.glob(".int8-pre.onnx*"):
        p.unlink()
    return dst.name, method


class _NoTorchvision(logging.Filter):
    """Drops torch.onnx's "torchvision is not installed. Skipping torchvision::nms" warnings (12
    lines per export): BLIP-family graphs use no torchvision operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_NoTorchvision())


class _quiet_loggers:
    """Raise the given loggers to WARNING for a block (the dynamo exporter logs every pass at INFO)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            if lg.getEffectiveLevel() < logging.WARNING:
                lg.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for lg, lvl in zip(self.loggers, self.levels):
            lg.setLevel(lvl)


class _root_logging_quiet:
    """onnxruntime.quantization logs every tensor at INFO on the root logger: mute it meanwhile."""

    def __enter__(self):
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.setLevel(max(self.level, logging.WARNING))

    def __exit__(self, *exc):
        self.root.setLevel(self.level)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _np(t):
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def _valid_diff(ort_out, ref, axis_mask) -> tuple[float, float]:
    """``(max |ORT − ref|, that / max(1, max |ref|))`` over valid positions.

    ``axis_mask`` is ``(axis, mask (batch, n))``: along ``axis`` only positions whose mask is 1
    count, or None for every position. The second number is what tolerances bound: absolute
    for outputs of magnitude up to 1, relative to the output's scale beyond (logits and hidden
    states of tens would otherwise be held to float32 rounding of their last digits).
    """
    import numpy as np

    a = np.asarray(ort_out, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    if axis_mask is not None:
        axis, mask = axis_mask
        m = np.asarray(mask).astype(bool)  # (batch, n)
        shape = [1] * a.ndim
        shape[0], shape[axis] = m.shape[0], m.shape[1]
        keep = np.broadcast_to(m.reshape(shape), a.shape)
        if not keep.any():
            return 0.0, 0.0
        a, b = a[keep], b[keep]
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        bad = float("inf") if not np.array_equal(np.isfinite(a), np.isfinite(b)) else 0.0
        fin = np.isfinite(a) & np.isfinite(b)
        a, b = a[fin], b[fin]
        if bad:
            return bad, bad
    d = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    return d, d / scale


class _Float64Reference:
    """PyTorch in float64 on the same weights: how far PyTorch's own float32 result is from exact.

    Deep, re-initialised tiny models (and some real ones) amplify rounding: PyTorch's fp32 (or
    fp16) output can differ from the float64 result by more than the fixed tolerance, and ONNX
    Runtime, rounding differently, by as much. When a graph exceeds its tolerance, the check
    allows ``FP64_FACTOR ×`` PyTorch's own rounding error on those inputs (recorded in
    validation.json), so it measures the export, not the floating-point format. Models whose
    float64 copy would exceed ``4 × MAX_BYTES`` are not copied (the fixed tolerance applies).
    """

    MAX_BYTES = 2 * 1024**3
    FP64_FACTOR = 4.0

    def __init__(self, model):
        self.model = model
        self.plan = None

    def available(self) -> bool:
        if self.model is None:
            return False
        n = sum(p.numel() for p in self.model.parameters())
        return n * 8 <= 4 * self.MAX_BYTES

    def outputs(self, graph: str, inputs: list):
        import copy

        import torch

        from compressor.families.onnx_graphs import export_plan

        if self.plan is None:
            self.plan = export_plan(copy.deepcopy(self.model).to(torch.float64))
        cast = [t.to(torch.float64) if t.is_floating_point() else t for t in inputs]
        with torch.no_grad():
            out = self.plan.graph(graph).module(*cast)
        return out if isinstance(out, tuple) else (out,)


def _validate_all(
    plan, cases, folder: Path, files, opts, dtype, device, runnable, variant: str = "plain", fp64=None
) -> dict:
    """Run every graph's cases through ONNX Runtime and PyTorch; raise on the first excess.

    Raises:
        OnnxValidationError: an output's scaled difference exceeds the graph's tolerance (after
            the float64 allowance, see :class:`_Float64Reference`).
    """
    import torch

    from compressor.families.onnx_graphs import FP16_TOLERANCE

    out: dict[str, Any] = {"graphs": {}, "dtype": dtype, "device": device}
    for g in plan.graphs:
        spec = g.spec
        name = files[spec.name]["optimized" if variant == "optimized" else "onnx"]
        key = spec.name if variant == "plain" else f"{spec.name}.{variant}"
        if not runnable:
            out["graphs"][key] = {"file": name, "checked": "signature", "note": f"ONNX Runtime's CPU provider cannot run {dtype}"}
            continue
        tol = opts.tolerance or spec.tolerance
        if dtype == "float16":
            tol = max(tol, FP16_TOLERANCE)
        try:
            sess = make_session(folder / name, providers_for(device), optimize=variant == "plain")
        except Exception as exc:  # onnxruntime's own exception types
            raise VerificationError(
                f"ONNX Runtime cannot load the exported graph {name} ({dtype}, {opts.exporter} exporter): "
                f"{str(exc).splitlines()[0][:400]}"
            ) from None
        rec: dict[str, Any] = {"file": name, "checked": "numbers", "tolerance": tol, "cases": {}}
        for label, inputs in cases[spec.name]:
            with torch.no_grad():
                ref = g.module(*inputs)
            ref = ref if isinstance(ref, tuple) else (ref,)
            feed = {n: _np(t) for n, t in zip(spec.input_names, inputs)}
            got = sess.run(None, feed)
            diffs, ref64 = {}, None
            for k, (o, r, a) in enumerate(zip(spec.outputs, ref, got)):
                am = None
                if o.name in spec.valid:
                    axis, mask_name = spec.valid[o.name]
                    am = (axis, feed[mask_name])
                d, scaled = _valid_diff(a, _np(r), am)
                diffs[o.name] = d
                if scaled <= tol:
                    continue
                allowed = tol
                if dtype in ("float32", "float16") and fp64 is not None and fp64.available():
                    if ref64 is None:
                        ref64 = fp64.outputs(spec.name, inputs)
                    _, own = _valid_diff(_np(r), _np(ref64[k]), am)
                    allowed = max(tol, fp64.FP64_FACTOR * own)
                    rec.setdefault("float64_allowance", {})[f"{label}/{o.name}"] = {
                        "pytorch_fp32_vs_fp64_scaled": own,
                        "allowed": allowed,
                        "ort_scaled": scaled,
                    }
                if not scaled <= allowed:
                    raise OnnxValidationError(
                        spec.name, o.name, d, allowed, label, variant if variant != "plain" else "", scaled
                    )
            shapes = {n: list(v.shape) for n, v in feed.items() if not n.startswith(("past.", "cross.")) or n.endswith(".0.key")}
            rec["cases"][label] = {"inputs": shapes, "max_abs_diff": max(diffs.values()) if diffs else 0.0, "per_output": _summ(diffs)}
        rec["max_abs_diff"] = max((c["max_abs_diff"] for c in rec["cases"].values()), default=0.0)
        out["graphs"][key] = rec
        del sess
    return out


def _summ(diffs: dict[str, float]) -> dict[str, float]:
    """Per-output differences; past/present/cross tensors summarised by their maximum."""
    out: dict[str, float] = {}
    for k, v in diffs.items():
        group = k.split(".")[0] + ".*" if k.startswith(("present.", "past.", "cross.")) else k
        out[group] = max(out.get(group, 0.0), v)
    return out


def _int8_report(plan, cases, folder: Path, files, dec: str, device: str) -> dict:
    """How the int8 decoder's logits compare with PyTorch (reported, not gated: the caption gate decides)."""
    import numpy as np
    import torch

    g = plan.graph(dec)
    sess = make_session(folder / files[dec]["int8"], providers_for(device))
    rep: dict[str, Any] = {
        "file": files[dec]["int8"],
        "method": files[dec].get("int8_method"),
        "bytes": _onnx_bytes(folder / files[dec]["int8"]),
        "cases": {},
    }
    for label, inputs in cases[dec]:
        with torch.no_grad():
            ref = _np(g.module(*inputs)[0])
        got = sess.run(["logits"], {n: _np(t) for n, t in zip(g.spec.input_names, inputs)})[0]
        rep["cases"][label] = {
            "logits_max_abs_diff": float(np.max(np.abs(got - ref))),
            "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        }
    rep["checked"] = "reported (int8 is accepted or refused by the caption-metric gate)"
    return rep


def _twin_check(model, opts: OnnxOptions, device: str) -> dict:
    """Export an fp32 copy of the same weights to a scratch folder and validate its numbers."""
    import copy

    import torch

    twin = copy.deepcopy(model).to(torch.float32)
    scratch = Path(tempfile.mkdtemp(prefix="vlmc-onnx-twin-"))
    try:
        from compressor.families.onnx_graphs import export_plan

        plan = export_plan(twin)
        with torch.no_grad():
            cases = sample_cases(plan, twin)
        files = {g.spec.name: _export_graph(g, cases[g.spec.name][-1][1], scratch, opts, "float32") for g in plan.graphs}
        res = _validate_all(
            plan, cases, scratch, files, opts, "float32", device, True, fp64=_Float64Reference(twin)
        )
        return {"checked": "numbers on an fp32 twin of the same weights", "graphs": res["graphs"]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        del twin


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _export_meta(model, processor, family, plan, files, dtype, opts, source) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from eval.characteristics import count_parameters

    chars = count_parameters(model, family.parts)
    graphs = {}
    for g in plan.graphs:
        f = files[g.spec.name]
        graphs[g.spec.name] = {**f, "signature": g.spec.signature()}
    return {
        "format": "vlm-compress-onnx",
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "model_type": family.model_type,
        "language_model": family.lm_model_type,
        "kind": plan.kind,
        "decoder_only": family.decoder_only,
        "dtype": dtype,
        "exporter": opts.exporter,
        "opset": max((f.get("opset", 0) for f in files.values()), default=opts.opset),
        "optimized": bool(opts.optimize),
        "quantized": opts.quantize,
        "default_variant": "int8" if opts.quantize else ("optimized" if opts.optimize and any(f.get("optimized") for f in files.values()) else "plain"),
        "source": source,
        **plan.meta,
        "token_ids": family.token_ids(model, processor),
        "graphs": graphs,
        "characteristics": chars,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
