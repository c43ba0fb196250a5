"""Characteristics of an evaluation target: parameters, GFLOPs, latency, tokens/s, size on disk.

The measurement primitives live in ``eval.characteristics``; this module applies them to an
:class:`~compressor.evaluation.target.EvalTarget`, a PyTorch model (everything counted on the
model) or an ONNX export (latency measured through ONNX Runtime, the rest from the export's
record or its PyTorch source). :func:`measure_characteristics` is the entry point.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from compressor.evaluation.captioner import prompt_fn

log = logging.getLogger(__name__)


def latency_items(dataset, generation, n: int) -> list[tuple[Any, str]]:
    """``(PIL image, prompt)`` of the first ``n`` examples: what latency and GFLOPs are measured on."""
    prompt_of = prompt_fn(generation)
    return [(ex.load_image(), prompt_of(ex)) for ex in dataset.examples[:n]]


def measure_characteristics(target, dataset, spec=None) -> tuple[dict[str, Any], list[str]]:
    """The characteristics of ``target`` that the model itself determines.

    Args:
        target: an :class:`~compressor.evaluation.target.EvalTarget`.
        dataset: images (and prompts) to time and count on.
        spec: a ``CharacteristicsSpec`` (None: the defaults: GFLOPs for 20 tokens, latency at
            batch 1 and 8, 1 warm-up and 5 timed calls).

    Returns:
        ``(characteristics, notes)``: see :func:`torch_characteristics` and
        :func:`onnx_characteristics`; for an ONNX export with a PyTorch source and no recorded
        GFLOPs, GFLOPs are counted on the source (with a note).
    """
    from compressor.recipe.schema import CharacteristicsSpec

    if target.model is not None:
        return torch_characteristics(target, dataset, spec), []
    chars, notes = onnx_characteristics(target, dataset, spec)
    spec = spec or CharacteristicsSpec()
    if target.source is not None and spec.gflops and "gflops" not in chars and len(dataset):
        item = latency_items(dataset, target.generation, 1)[0]
        chars.update(count_gflops(*target.source_model(), item, target.generation, target.device, spec.gflops_new_tokens))
        notes = [n for n in notes if not n.startswith("gflops:")]
        notes.append("gflops: counted on the PyTorch model the ONNX graphs were exported from")
    return chars, notes


def torch_characteristics(target, dataset, spec=None) -> dict[str, Any]:
    """Parameters (per part), GFLOPs (per part), latency, tokens/s and size on disk of a PyTorch model.

    Args:
        target: an :class:`~compressor.evaluation.target.EvalTarget` with its ``model`` (a
            BLIP-family model or a peft model around one) and ``processor``.
        dataset: images (and prompts) to time and count on.
        spec: a ``CharacteristicsSpec`` (None: defaults).

    Returns:
        ``params_*``, ``gflops`` / ``gflops_<part>`` / ``gflops_new_tokens``, the latency keys
        of :func:`eval.characteristics.measure_latency`, ``size_mb`` (when the target has a folder).
    """
    from compressor.families import family_for_model
    from compressor.recipe.schema import CharacteristicsSpec
    from eval.characteristics import count_parameters, measure_latency, size_on_disk_mb

    spec = spec or CharacteristicsSpec()
    model, processor, generation = target.model, target.processor, target.generation
    family = family_for_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, Any] = count_parameters(base, family.parts)
    n_items = max([8, *(spec.latency.batch_sizes if spec.latency else [])])
    items = latency_items(dataset, generation, n_items)
    if spec.gflops and items:
        out.update(count_gflops(model, processor, items[0], generation, target.device, spec.gflops_new_tokens))
    if spec.latency is not None and items:
        largest = max(spec.latency.batch_sizes)
        if target.make_captioner is not None:
            captioner = target.make_captioner(largest)
        else:
            from compressor.evaluation.target import torch_captioner_for_batch

            captioner = torch_captioner_for_batch(model, processor, generation, target.device, largest)
        tok = processor.tokenizer
        out.update(
            measure_latency(
                lambda batch: captioner.caption([im for im, _ in batch], [p for _, p in batch]),
                items,
                spec.latency.batch_sizes,
                spec.latency.warmup,
                spec.latency.repeats,
                count_tokens=lambda caps: sum(len(tok(c, add_special_tokens=False).input_ids) for c in caps),
            )
        )
    if target.folder is not None:
        out["size_mb"] = size_on_disk_mb(target.folder)
    return out


def count_gflops(model, processor, item, generation, device: str, new_tokens: int) -> dict[str, Any]:
    """GFLOPs of captioning one image, in total and per part, with torch's FlopCounterMode.

    ``generate`` runs at batch 1 with exactly ``new_tokens`` new tokens (``min_new_tokens`` =
    ``max_new_tokens``) and the recipe's ``num_beams``, so the figure depends on the architecture
    and the decoding settings only, not on the weights (the convention of the published RSICD
    study's GFLOPs column; stack-facts section 10 for the counter's trap).

    Args:
        model: a BLIP-family model (or a peft model around one).
        processor: its processor.
        item: ``(PIL image, prompt or None)``.
        generation: decoding settings (``num_beams`` is used).
        device: ``cpu`` or ``cuda``.
        new_tokens: generated tokens counted.

    Returns:
        ``gflops``, ``gflops_<part>``, ``gflops_new_tokens``, ``gflops_batch_size`` (1).
    """
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs
    from eval.characteristics import count_gflops_by_part

    family = family_for_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_beams": generation.num_beams, "do_sample": False}
    inputs = generation_inputs(family, processor, [item[0]], [item[1]], device)
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    out = count_gflops_by_part(lambda: model.generate(**inputs, **kw), base, family.parts)
    return {**out, "gflops_new_tokens": new_tokens, "gflops_batch_size": 1}


def _captioner_tokenizer(captioner, onnx_dir: Path | None):
    for obj in (captioner, getattr(captioner, "processor", None)):
        tok = getattr(obj, "tokenizer", None)
        if tok is not None and callable(tok):
            return tok
    if onnx_dir is not None and (Path(onnx_dir) / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(onnx_dir))
        except Exception:  # noqa: BLE001 - tokens/s is optional
            return None
    return None


def onnx_characteristics(target, dataset, spec=None) -> tuple[dict, list[str]]:
    """Characteristics of an ONNX export: latency and tokens/s measured, the rest from its record.

    Parameters and GFLOPs cannot be counted on the graphs the way PyTorch counts them: they come
    from the export's ``export.json`` (``characteristics``) when it has them; otherwise
    ``params_total`` is the element count of the graphs' initializers (an upper bound) and
    GFLOPs is left out, with a note.

    Args:
        target: an :class:`~compressor.evaluation.target.EvalTarget` whose ``folder`` is the
            export folder (holds ``export.json``) and whose ``captioner`` runs it;
            ``make_captioner`` (when set) gives the captioner timed at the largest batch size.
        dataset: images (and prompts) to time.
        spec: a ``CharacteristicsSpec`` (None: defaults).

    Returns:
        ``(characteristics, notes)``.
    """
    from compressor.recipe.schema import CharacteristicsSpec
    from eval.characteristics import measure_latency, onnx_parameter_count, size_on_disk_mb

    spec = spec or CharacteristicsSpec()
    captioner, onnx_dir = target.captioner, target.folder
    notes: list[str] = []
    out: dict[str, Any] = {}
    meta_path = Path(onnx_dir) / "export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    recorded = meta.get("characteristics", {}) if isinstance(meta, dict) else {}
    out.update({k: v for k, v in recorded.items() if k.startswith(("params_", "gflops"))})
    if "params_total" not in out:
        out["params_total"] = onnx_parameter_count(onnx_dir)
        notes.append("params_total counts the ONNX graphs' initializers (the export records no parameter count)")
    if spec.gflops and "gflops" not in out:
        notes.append("gflops: the ONNX export records no GFLOPs; evaluate the PyTorch folder for it")
    if spec.latency is not None:
        largest = max(spec.latency.batch_sizes)
        timed = target.make_captioner(largest) if target.make_captioner is not None else captioner
        items = latency_items(dataset, target.generation, max(8, largest))
        tok = _captioner_tokenizer(timed, onnx_dir)
        count = (lambda caps: sum(len(tok(c, add_special_tokens=False).input_ids) for c in caps)) if tok else None
        out.update(
            measure_latency(
                lambda batch: timed.caption([im for im, _ in batch], [p for _, p in batch]),
                items,
                spec.latency.batch_sizes,
                spec.latency.warmup,
                spec.latency.repeats,
                count_tokens=count,
            )
        )
    out["size_mb"] = size_on_disk_mb(variant_files(onnx_dir, getattr(captioner, "graph_files", None)))
    return out, notes


def variant_files(onnx_dir: Path, graph_files: dict[str, str] | None) -> list[Path]:
    """The files of an ONNX export that one variant needs: its graphs, their external data
    (``<graph file>.data``) and every non-graph file (config, processor, ``export.json``…).

    Args:
        onnx_dir: the export folder.
        graph_files: graph name → the file the captioner runs (``OnnxCaptioner.graph_files``);
            None: every file of the folder.

    Returns:
        Paths whose total size is the deployed size of that variant (``size_mb``).
    """
    files = sorted(f for f in Path(onnx_dir).rglob("*") if f.is_file())
    if not graph_files:
        return files
    used = set(graph_files.values())

    def needed(f: Path) -> bool:
        name = f.name
        if not (name.endswith(".onnx") or ".onnx." in name):
            return True
        return any(name == u or name.startswith(u + ".") for u in used)

    return [f for f in files if needed(f)]


def speculative_characteristics(captioner) -> dict[str, Any]:
    """What speculative decoding did while ``captioner`` captioned (the metric table's
    ``speculative_decoding`` rows): ``spec_acceptance`` (accepted draft tokens / proposed),
    ``spec_tokens_per_call`` (tokens emitted per target decoder call; plain greedy: 1.0) and
    ``spec_target_calls_per_caption``; empty for a captioner without a draft.

    Args:
        captioner: a Captioner; one with a draft has ``stats``
            (:class:`~exporters.onnx.speculative.SpecStats`).
    """
    stats = getattr(captioner, "stats", None)
    return stats.record() if stats is not None else {}


def busy_machine_note(load: float | None = None, cores: int | None = None) -> str | None:
    """A note when other work competed for the CPU while latency was timed, else None.

    Latency on a CPU shared with other busy processes can be many times the idle figure (two
    OpenMP threads waiting on a descheduled sibling: 30-100x on a tiny model measured here), so a
    latency gate on such a machine compares noise. Judged by the 1-minute load average (Linux
    ``os.getloadavg``) against the cores this process may use: more than one busy process beyond
    the cores counts as busy.

    Args:
        load: the 1-minute load average (None: read it).
        cores: usable cores (None: ``os.sched_getaffinity``).

    Returns:
        The note text, or None (idle enough, or no load average on this platform).
    """
    import os

    try:
        load = os.getloadavg()[0] if load is None else load
        cores = len(os.sched_getaffinity(0)) if cores is None else cores
    except (AttributeError, OSError):
        return None
    if load <= cores + 1.0:
        return None
    return (
        f"latency: the machine was busy while timing (1-minute load {load:.1f} on {cores} cores); "
        "latency figures may be inflated: compare or gate them only between runs on an idle machine"
    )
