"""Glue from a captioner (a PyTorch model or an ONNX export) to the metrics and the characteristics.

:func:`evaluate_captioner` makes the ``eval.json`` record that the ``evaluate`` stage and
``compress eval`` both write, so a baseline and a candidate, a PyTorch folder and an ONNX
export, are always scored by the same harness (llm-compressor's "same harness" principle).
:func:`check_metric_requirements` runs every check that can fail (Java, local metric models,
metric names) before a model is loaded or a file is written.

What a record holds (DESIGN.md, "Conventions"):

* ``metrics``: the 0-100 metric keys (``cider``, ``bleu_4`` …, ``perplexity`` as is);
* ``characteristics``: ``params_total``, ``params_trainable``, ``params_<part>``, ``gflops``
  (and ``gflops_<part>``) of image-to-caption for ``gflops_new_tokens`` generated tokens,
  ``latency_p50_s`` / ``latency_p95_s`` per caption at the first latency batch size (and
  ``by_batch_size``), ``tokens_per_s``, ``avg_inference_s`` (wall seconds per caption over the
  whole evaluated set at the decoding batch size: the published RSICD study's "Avg Inference
  Time"), ``peak_rss_mb`` (and ``peak_cuda_mb`` on GPU), ``size_mb``;
* ``decoding``: the backend and decoding settings (prompt, num_beams, max_new_tokens,
  min_new_tokens, batch size, device, dtype);
* ``data``, ``notes``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compressor.errors import DataError, UserInputError, did_you_mean
from compressor.families import family_for_model
from compressor.generation import TorchCaptioner
from compressor.models.batches import build_prompt, training_batch
from eval.harness import (
    DEFAULT_CAPTION_METRICS,
    DEFAULT_VQA_METRICS,
    PYCOCO_METRICS,
    example_key,
    predict,
    score_predictions,
)

log = logging.getLogger(__name__)

#: Metrics that need a model besides the captioner (or a teacher's captions): not computed by
#: :func:`eval.harness.score_predictions`.
MODEL_METRICS = ("perplexity", "bertscore_f1", "clipscore", "teacher_cider")
#: Metrics computed through pycocoevalcap's PTB tokenizer (a Java program).
JAVA_METRICS = frozenset((PYCOCO_METRICS - {"rouge_1", "rouge_2"}) | {"teacher_cider"})
#: Metrics of answers (VQA).
VQA_METRICS = ("vqa_accuracy", "mme_acc", "mme_acc_plus")
#: The four figures the published RSICD study reports for every model; every record has them.
HEADLINE_KEYS = ("params_total", "params_trainable", "gflops", "avg_inference_s")


def prompt_fn(generation):
    """Example → prompt text: the recipe's prompt, or the VQA template filled with the question."""
    return lambda ex: build_prompt(generation.prompt, ex.question)


def resolve_metrics(metrics: Sequence[str] | None, task: str) -> list[str]:
    """The metric keys to compute: the given ones (checked), or the task's defaults.

    Args:
        metrics: metric keys, or None.
        task: ``caption`` or ``vqa``.

    Returns:
        Keys, deduplicated, in the order given.

    Raises:
        UserInputError: an unknown key (with a did-you-mean), or an empty list.
    """
    from compressor.recipe.schema import METRIC_KEYS

    if metrics is None:
        return list(DEFAULT_CAPTION_METRICS if task == "caption" else DEFAULT_VQA_METRICS)
    names = list(dict.fromkeys(metrics))
    if not names:
        raise UserInputError(f"no metric asked for; choose from {', '.join(METRIC_KEYS)}")
    bad = [m for m in names if m not in METRIC_KEYS]
    if bad:
        raise UserInputError(
            "; ".join(f"unknown metric '{b}'.{did_you_mean(b, METRIC_KEYS)}" for b in bad)
            + f" Metrics: {', '.join(METRIC_KEYS)}."
        )
    return names


def check_metric_requirements(
    metrics: Sequence[str],
    task: str,
    *,
    bertscore_model: str | None = None,
    clipscore_model: str | None = None,
    teacher: bool = False,
    teacher_option: str = "evaluate.teacher",
) -> None:
    """Every check that can fail before a model is loaded: Java, metric models, the teacher.

    Args:
        metrics: resolved metric keys.
        task: ``caption`` or ``vqa``.
        bertscore_model: the local model folder for ``bertscore_f1`` (or None).
        clipscore_model: the local CLIP folder for ``clipscore`` (or None).
        teacher: whether the teacher's captions for ``teacher_cider`` are given.
        teacher_option: how the user gives them (named in the error).

    Raises:
        UserInputError: ``java`` is not on PATH while a caption metric needs it (the message
            says how to install it); a metric's model is missing (naming the recipe key and the
            CLI option to set); bert-score is not installed; ``teacher_cider`` without a teacher.
    """
    wanted = set(metrics)
    if task == "caption" and wanted & JAVA_METRICS:
        from eval.captioning import check_java

        check_java()
    if "bertscore_f1" in wanted:
        import importlib.util

        from eval.embedding_metrics import require_model_folder

        require_model_folder(bertscore_model, "bertscore_f1")
        if importlib.util.find_spec("bert_score") is None:
            raise UserInputError("bertscore_f1 needs bert-score: `pip install 'vlm-compress[metrics]'`.")
    if "clipscore" in wanted:
        from eval.embedding_metrics import require_model_folder

        require_model_folder(clipscore_model, "clipscore")
    if "teacher_cider" in wanted and not teacher:
        raise UserInputError(f"teacher_cider scores against a teacher's captions: set `{teacher_option}`")


def check_data_for_metrics(metrics: Sequence[str], data) -> None:
    """Checks of the data that a metric needs, run before any captioning.

    Args:
        metrics: resolved metric keys.
        data: the dataset to score.

    Raises:
        DataError: examples without references; ``mme_acc`` / ``mme_acc_plus`` on questions
            whose human answers are not all ``yes`` or all ``no`` (listed).
        UserInputError: a VQA metric on captioning data.
    """
    unl = [ex.question_id or ex.image_id for ex in data.examples if not ex.labelled]
    if unl:
        raise DataError(
            f"{len(unl)} of {len(data)} examples have no reference captions (answers for VQA): evaluation "
            "needs them; `compress predict` writes captions for unlabelled data",
            unl[:10],
        )
    wanted = set(metrics)
    vqa_only = sorted(wanted & set(VQA_METRICS))
    if vqa_only and data.task != "vqa":
        raise UserInputError(f"{', '.join(vqa_only)} score answers, but the data holds captions (task caption)")
    if wanted & {"mme_acc", "mme_acc_plus"}:
        bad = [
            f"{ex.question_id}: {sorted(set(ex.answers))}"
            for ex in data.examples
            if {a.strip().lower() for a in ex.answers} not in ({"yes"}, {"no"})
        ]
        if bad:
            raise DataError("mme_acc / mme_acc_plus need yes/no questions; these questions have other answers:", bad)


def score_model(model, processor, dataset, generation, device: str, metrics=None, scorer=None, progress=False) -> dict:
    """Caption ``dataset`` with a PyTorch model and score it (no characteristics).

    Used for in-training evaluation on ``val``.

    Args:
        model: a BLIP-family model (or a peft model around one), in eval mode.
        processor: its processor.
        dataset: a labelled :class:`compressor.data.Dataset`.
        generation: the recipe's ``GenerationSpec``.
        device: ``cpu`` or ``cuda``.
        metrics: metric keys (model-based ones are skipped), or None for the task's defaults.
        scorer: an open ``CaptionScorer`` to reuse.
        progress: show a progress bar.

    Returns:
        ``{"metrics", "notes", "predictions", "settings"}`` (0-100 scale).
    """
    captioner = TorchCaptioner(model, processor, generation, device)
    preds = predict(captioner, dataset.examples, dataset.task, prompt_fn(generation), generation.batch_size, progress)
    wanted = None if metrics is None else [m for m in metrics if m not in MODEL_METRICS]
    scored = score_predictions(preds, dataset, wanted, scorer)
    return {"metrics": scored["metrics"], "notes": scored["notes"], "predictions": preds, "settings": captioner.settings}


def perplexity(model, processor, dataset, generation, device: str, batch_size: int = 8, max_examples: int = 256) -> float:
    """Perplexity of the reference captions (answers for VQA) under the model, given the image.

    ``exp(total NLL / total target tokens)`` over every reference caption of the first
    ``max_examples`` (example, caption) pairs: the language-model perplexity reported by
    compression studies, conditioned on the image (and prompt). The prompt and image tokens are
    not scored; the end-of-sequence token is (it is part of the target, as in training).

    Args:
        model: a BLIP-family model (or a peft model around one).
        processor: its processor.
        dataset: a labelled dataset.
        generation: the recipe's ``GenerationSpec`` (its prompt is put before each caption).
        device: ``cpu`` or ``cuda``.
        batch_size: pairs per forward pass.
        max_examples: pairs scored at most.

    Returns:
        The perplexity (≥ 1; NaN when there is no target token).
    """
    import torch

    family = family_for_model(model)
    pairs = dataset.training_pairs()[:max_examples]
    total_nll, total_tokens = 0.0, 0
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            batch = training_batch(
                family,
                processor,
                [ex.load_image() for ex, _ in chunk],
                [t for _, t in chunk],
                [build_prompt(generation.prompt, ex.question) for ex, _ in chunk],
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            labels = batch["labels"]
            out = model(**batch)
            logits = out.logits[:, -labels.shape[1] :, :].float()
            if family.decoder_only:
                logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            total_nll += float(nll)
            total_tokens += int(mask.sum())
    return math.exp(total_nll / total_tokens) if total_tokens else math.nan


def _latency_items(dataset, generation, n: int) -> list[tuple[Any, str]]:
    prompt_of = prompt_fn(generation)
    return [(ex.load_image(), prompt_of(ex)) for ex in dataset.examples[:n]]


def torch_characteristics(model, processor, dataset, generation, device: str, spec=None, model_dir=None) -> dict[str, Any]:
    """Parameters (per part), GFLOPs (per part), latency, tokens/s and size on disk of a PyTorch model.

    Args:
        model: a BLIP-family model (or a peft model around one).
        processor: its processor.
        dataset: images (and prompts) to time and count on.
        generation: decoding settings (the same as the metrics used).
        device: ``cpu`` or ``cuda``.
        spec: a ``CharacteristicsSpec`` (None: the defaults: GFLOPs for 20 tokens, latency at
            batch 1 and 8, 1 warm-up and 5 timed calls).
        model_dir: the folder whose size is reported (``size_mb``), or None.

    Returns:
        ``params_*``, ``gflops`` / ``gflops_<part>`` / ``gflops_new_tokens``, the latency keys
        of :func:`eval.characteristics.measure_latency`, ``size_mb``.
    """
    from compressor.recipe.schema import CharacteristicsSpec
    from eval.characteristics import count_parameters, measure_latency, size_on_disk_mb

    spec = spec or CharacteristicsSpec()
    family = family_for_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, Any] = count_parameters(base, family.parts)
    n_items = max([8, *(spec.latency.batch_sizes if spec.latency else [])])
    items = _latency_items(dataset, generation, n_items)
    if spec.gflops and items:
        out.update(count_gflops(model, processor, items[0], generation, device, spec.gflops_new_tokens))
    if spec.latency is not None and items:
        largest = max(spec.latency.batch_sizes)
        captioner = TorchCaptioner(model, processor, generation.model_copy(update={"batch_size": largest}), device)
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
    if model_dir is not None:
        out["size_mb"] = size_on_disk_mb(model_dir)
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


def onnx_characteristics(captioner, onnx_dir: Path, dataset, generation, spec=None, make_captioner=None) -> tuple[dict, list[str]]:
    """Characteristics of an ONNX export: latency and tokens/s measured, the rest from its record.

    Parameters and GFLOPs cannot be counted on the graphs the way PyTorch counts them: they come
    from the export's ``export.json`` (``characteristics``) when it has them; otherwise
    ``params_total`` is the element count of the graphs' initializers (an upper bound) and
    GFLOPs is left out, with a note.

    Args:
        captioner: the ONNX Runtime captioner.
        onnx_dir: the export folder (holds ``export.json``).
        dataset: images (and prompts) to time.
        generation: decoding settings.
        spec: a ``CharacteristicsSpec`` (None: defaults).
        make_captioner: batch size → a captioner that generates that many in one call (None:
            use ``captioner`` as is).

    Returns:
        ``(characteristics, notes)``.
    """
    from compressor.recipe.schema import CharacteristicsSpec
    from eval.characteristics import measure_latency, onnx_parameter_count, size_on_disk_mb

    spec = spec or CharacteristicsSpec()
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
        timed = make_captioner(largest) if make_captioner is not None else captioner
        items = _latency_items(dataset, generation, max(8, largest))
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


def evaluate_captioner(
    captioner,
    data,
    generation,
    *,
    metrics: Sequence[str] | None = None,
    scorer=None,
    model=None,
    processor=None,
    device: str = "cpu",
    spec=None,
    model_dir: Path | None = None,
    onnx_dir: Path | None = None,
    make_captioner=None,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    clipscore_model: str | None = None,
    teacher_predictions: dict[str, str] | None = None,
    params_trainable: int | None = None,
    progress: bool = False,
    source_model=None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Caption a dataset, score it and measure the model: one ``eval.json`` record.

    Args:
        captioner: a :class:`eval.captioner.Captioner` (PyTorch or ONNX Runtime).
        data: a labelled :class:`compressor.data.Dataset`.
        generation: the decoding settings (``GenerationSpec``), recorded in the result.
        metrics: metric keys (None: the task's defaults); checked with
            :func:`check_metric_requirements` by the caller beforehand.
        scorer: an open ``CaptionScorer`` to reuse (one METEOR process per run).
        model: the PyTorch model behind ``captioner`` (perplexity, parameters, GFLOPs), or None
            for an ONNX export.
        processor: its processor.
        device: ``cpu`` or ``cuda``.
        spec: a ``CharacteristicsSpec`` (None: defaults).
        model_dir: the PyTorch folder whose size is reported.
        onnx_dir: the ONNX export folder (when ``model`` is None).
        make_captioner: for ONNX, batch size → a captioner generating that many in one call.
        bertscore_model: local model folder for ``bertscore_f1``.
        bertscore_layers: its layer (None: the last).
        clipscore_model: local CLIP folder for ``clipscore``.
        teacher_predictions: ``{key: caption}`` of a teacher, the references of ``teacher_cider``.
        params_trainable: parameters trained to make this model (None: unknown, noted).
        progress: show a progress bar while captioning.
        source_model: for an ONNX export, a zero-argument callable returning ``(model,
            processor)`` of the PyTorch model it was exported from (a run's export stage), called
            only when needed: GFLOPs (an architecture figure) and
            perplexity (teacher-forced logits, which the export's validation held within its
            tolerance of PyTorch's) are computed on it, with a note; None: both left out.

    Returns:
        ``(record, predictions)``: the record (``task``, ``metrics``, ``characteristics``,
        ``decoding``, ``data``, ``notes``; NaN kept as NaN, see :func:`finite`) and
        ``{key: caption}`` in dataset order (key: image id, or question id for VQA).

    Raises:
        DataError, UserInputError: see :func:`check_data_for_metrics`.
    """
    from eval.characteristics import PeakMemory

    task = data.task
    names = resolve_metrics(metrics, task)
    check_data_for_metrics(names, data)
    notes: list[str] = []
    source = functools.cache(source_model) if source_model is not None else None  # loaded once, when needed

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        preds = predict(captioner, data.examples, task, prompt_fn(generation), generation.batch_size, progress)
        predict_s = time.perf_counter() - t0
        scored = score_predictions(preds, data, [m for m in names if m not in MODEL_METRICS], scorer)
        values: dict[str, Any] = dict(scored["metrics"])
        notes += scored["notes"]
        if "teacher_cider" in names or teacher_predictions is not None:
            values["teacher_cider"] = teacher_cider(preds, teacher_predictions or {}, scorer)
        if "perplexity" in names:
            if model is not None:
                values["perplexity"] = perplexity(model, processor, data, generation, device)
            elif source_model is not None:
                values["perplexity"] = perplexity(*source(), data, generation, device)
                notes.append("perplexity: teacher-forced on the PyTorch model the ONNX graphs were exported from")
            else:
                notes.append("perplexity needs the PyTorch model; not computed for an ONNX export")
        if "bertscore_f1" in names:
            from eval.embedding_metrics import bertscore_f1

            refs = data.references()
            keys = list(preds)
            values["bertscore_f1"] = bertscore_f1(
                [preds[k] for k in keys], [refs[k] for k in keys], bertscore_model, bertscore_layers
            )
        if "clipscore" in names:
            from eval.embedding_metrics import clip_score

            values["clipscore"] = clip_score(
                [ex.load_image() for ex in data.examples],
                [preds[example_key(ex, task)] for ex in data.examples],
                clipscore_model,
            )
        if model is not None:
            chars = torch_characteristics(model, processor, data, generation, device, spec, model_dir=model_dir)
        else:
            chars, more = onnx_characteristics(captioner, onnx_dir, data, generation, spec, make_captioner)
            from compressor.recipe.schema import CharacteristicsSpec

            spec_ = spec or CharacteristicsSpec()
            if source_model is not None and spec_.gflops and "gflops" not in chars and len(data):
                item = _latency_items(data, generation, 1)[0]
                chars.update(count_gflops(*source(), item, generation, device, spec_.gflops_new_tokens))
                more = [n for n in more if not n.startswith("gflops:")]
                more.append("gflops: counted on the PyTorch model the ONNX graphs were exported from")
            notes += more
    busy = busy_machine_note()
    if busy and (spec is None or spec.latency is not None):
        notes.append(busy)
    chars["params_trainable"] = params_trainable
    if params_trainable is None:
        notes.append("params_trainable is unknown: no training record comes with this model")
    chars["avg_inference_s"] = predict_s / len(data)
    chars["avg_inference_batch_size"] = generation.batch_size
    chars["peak_rss_mb"] = mem.rss_mb
    if mem.cuda_mb is not None:
        chars["peak_cuda_mb"] = mem.cuda_mb
    for key in HEADLINE_KEYS:
        chars.setdefault(key, None)
    record = {
        "task": task,
        "metrics": values,
        "characteristics": chars,
        "decoding": dict(captioner.settings),
        "data": {
            "resolved": getattr(data, "resolved", ""),
            "examples": len(data),
            "fingerprint": data.fingerprint,
            "skipped": len(data.skipped),
        },
        "notes": notes,
    }
    return record, preds


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


def teacher_cider(preds: dict[str, str], teacher: dict[str, str], scorer=None) -> float:
    """CIDEr (0-100 scale) of ``preds`` against a teacher's captions of the same images.

    Args:
        preds: ``{image id: caption}``.
        teacher: ``{image id: the teacher's caption}``; ids outside ``preds`` are ignored.
        scorer: an open ``CaptionScorer`` (None: one is opened for this call).

    Returns:
        CIDEr-D of the shared ids, x100.

    Raises:
        UserInputError: the two share no id.
    """
    from eval.captioning import CaptionScorer

    common = [k for k in preds if k in teacher]
    if not common:
        raise UserInputError("teacher_cider: the teacher captioned other images than this evaluation; use the same data")
    own = scorer is None
    sc = scorer or CaptionScorer()
    try:
        res = sc.score({k: preds[k] for k in common}, {k: [teacher[k]] for k in common}, ["cider"])
    finally:
        if own:
            sc.close()
    return res.metrics["cider"]


def finite(obj):
    """A JSON-ready copy: NaN and infinities become null (a gate then fails closed on them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_predictions(path: Path, preds: dict[str, str], task: str) -> Path:
    """Write predictions: a COCO results list (captions) or a VQA results list (answers).

    Args:
        path: the JSON file.
        preds: ``{image id: caption}`` or ``{question id: answer}``.
        task: ``caption`` or ``vqa``.

    Returns:
        The path written (atomically).
    """
    from eval.predictions import write_coco_results, write_vqa_results

    return (write_coco_results if task == "caption" else write_vqa_results)(path, preds)


def image_name(ex) -> str:
    """The name an output CSV gives an example's image.

    For csv and imagefolder data the image id is the path relative to the image folder without
    its extension, so the id plus the file's extension is the name the input CSV used; COCO and
    Karpathy ids are numbers, so their file name is used; generated images have only their id.
    """
    if not ex.image_path:
        return ex.image_id
    p = Path(ex.image_path)
    if ex.image_id == p.stem or ex.image_id.endswith("/" + p.stem):
        return ex.image_id + p.suffix
    return p.name


def answers_rows(examples, preds: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(image_name, question, answer)`` per VQA example, for an answers CSV (see :func:`image_name`)."""
    return [(image_name(ex), ex.question or "", preds[example_key(ex, "vqa")]) for ex in examples]


def caption_rows(examples, preds: dict[str, str]) -> list[tuple[str, str]]:
    """``(image_name, caption)`` per image, for a captions CSV (see :func:`image_name`)."""
    rows, seen = [], set()
    for ex in examples:
        if ex.image_id not in seen:
            seen.add(ex.image_id)
            rows.append((image_name(ex), preds[example_key(ex, "caption")]))
    return rows
