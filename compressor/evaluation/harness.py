"""The evaluation harness: caption a dataset with any target, score it and measure the model.

:func:`evaluate` makes the ``eval.json`` record that the ``evaluate`` stage and ``compress eval``
both write, so a baseline and a candidate, a PyTorch folder and an ONNX export, are always scored
by the same harness (llm-compressor's "same harness" principle): :func:`predict` captions through
the :class:`~compressor.evaluation.captioner.Captioner` protocol, :func:`score_predictions` scores
captions (per image, every reference caption of the image) or answers (per question), and the
model-based metrics and characteristics come from :mod:`compressor.evaluation.model_metrics` and
:mod:`compressor.evaluation.characteristics`. Which code computes a metric is the metric table's
``compute`` (``eval.metrics``).

What a record holds (DESIGN.md, "Conventions"):

* ``metrics``: the 0-100 metric keys (``cider``, ``bleu_4`` …, ``perplexity`` as is);
* ``characteristics``: ``params_total``, ``params_trainable``, ``params_<part>``, ``gflops``
  (and ``gflops_<part>``) of image-to-caption for ``gflops_new_tokens`` generated tokens,
  ``latency_p50_s`` / ``latency_p95_s`` per caption at the first latency batch size (and
  ``by_batch_size``), ``tokens_per_s``, ``avg_inference_s`` (wall seconds per caption over the
  whole evaluated set at the decoding batch size: the published RSICD study's "Avg Inference
  Time"), ``peak_rss_mb`` (and ``peak_cuda_mb`` on GPU), ``size_mb``; with a draft (speculative
  decoding) ``spec_acceptance``, ``spec_tokens_per_call`` and ``spec_target_calls_per_caption``
  over the evaluated set;
* ``decoding``: the backend and decoding settings (prompt, num_beams, max_new_tokens,
  min_new_tokens, batch size, device, dtype);
* ``data``, ``notes``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from compressor.evaluation.captioner import prompt_fn
from compressor.evaluation.characteristics import (
    busy_machine_note,
    measure_characteristics,
    speculative_characteristics,
)
from compressor.evaluation.model_metrics import (
    MetricJob,
    check_data_for_metrics,
    compute_model_metrics,
    model_metric_keys,
    resolve_metrics,
)
from compressor.evaluation.outputs import example_key
from compressor.evaluation.target import EvalOptions, EvalTarget
from eval.metrics import default_metrics, headline_keys, keys_of, lookup

log = logging.getLogger(__name__)


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The batches (``(start, stop)`` of the example list) one process captions when ``world`` share the work.

    The batches are the single process's batches (``batch_size`` consecutive examples each, the last
    one shorter), dealt out in contiguous runs, so every image is captioned in the same batch as
    in one process (same padding, same captions) and the runs of ranks 0, 1, … concatenate back to
    the original order.

    Args:
        n: number of examples.
        batch_size: examples per batch.
        rank: this process's index.
        world: number of processes (1: every batch).

    Returns:
        ``(start, stop)`` of each batch of this process, in order.
    """
    starts = list(range(0, n, batch_size))
    per = -(-len(starts) // max(world, 1))
    return [(i, min(i + batch_size, n)) for i in starts[rank * per : (rank + 1) * per]]


def predict(
    captioner,
    examples: Sequence,
    task: str,
    prompt_for: Callable[[Any], str],
    batch_size: int,
    progress: bool = False,
    load_image: Callable[[Any], Any] | None = None,
    shards=None,
    num_workers: int | None = None,
) -> dict[str, str]:
    """Run ``captioner`` over ``examples``.

    Args:
        captioner: a Captioner.
        examples: data examples (``image_id``, ``question_id``, ``load_image()``), or a
            :class:`~compressor.data.Dataset`, whose ``load_image`` skips (and counts) an image that
            cannot be decoded when its data has ``skip_invalid``: that example gets no caption.
        task: ``caption`` or ``vqa``.
        prompt_for: example → prompt text (``""`` for none).
        batch_size: examples per call.
        progress: show a tqdm bar.
        load_image: example → image (default ``example.load_image()``).
        shards: the processes of a multi-process run, every one of which calls this together
            (``world``, ``rank``, ``gather(list) -> list`` concatenating every process's list in
            rank order: :class:`compressor.pipeline.distributed.Dist`); each captions its share of
            the batches (:func:`shard_batches`) and every process gets all captions. None or one
            process: every batch here.
        num_workers: loader worker processes decoding each batch's images ahead of the captioner
            (:func:`compressor.data.workers.ordered_loader`; same images, same order); None: the
            default share of the CPUs (:func:`~compressor.data.workers.default_workers`).

    Returns:
        key → caption (see :func:`~compressor.evaluation.outputs.example_key`), in dataset order.
    """
    from tqdm.auto import tqdm

    from compressor.data.workers import ordered_loader, resolve_workers

    if load_image is None and hasattr(examples, "load_image"):
        load_image = examples.load_image
    examples = list(examples)  # a Dataset drops skipped examples while this runs
    load = load_image or (lambda ex: ex.load_image())

    def try_load(ex):  # in a loader worker: a failure is decided (raised or skipped and counted) here
        try:
            return ex.load_image()
        except Exception:  # noqa: BLE001 - retried by ``load`` in this process
            return None

    world, rank = (shards.world, shards.rank) if shards is not None else (1, 0)
    mine = shard_batches(len(examples), batch_size, rank, world)
    pairs: list[tuple[str, str]] = []
    bar = tqdm(total=sum(b - a for a, b in mine), desc="caption", unit="img", disable=not progress, leave=False)
    images = ordered_loader(lambda i: [try_load(ex) for ex in examples[mine[i][0] : mine[i][1]]], len(mine),
                            resolve_workers(num_workers))
    for (a, b), imgs in zip(mine, images):
        loaded = [(ex, im if im is not None else load(ex)) for ex, im in zip(examples[a:b], imgs)]
        chunk = [(ex, im) for ex, im in loaded if im is not None]
        if chunk:
            caps = captioner.caption([im for _, im in chunk], [prompt_for(ex) for ex, _ in chunk])
            pairs.extend((example_key(ex, task), cap) for (ex, _), cap in zip(chunk, caps))
        bar.update(len(loaded))
    bar.close()
    if world > 1:
        pairs = [tuple(p) for p in shards.gather(pairs)]
    return dict(pairs)


def _caption_scorer(predictions, dataset, refs, keys, scorer, out) -> None:
    from eval.captioning import CaptionScorer

    own = scorer is None
    sc = scorer or CaptionScorer()
    try:
        res = sc.score(predictions, refs, keys)
    finally:
        if own:
            sc.close()
    out["metrics"].update(res.metrics)
    out["notes"] += list(res.notes)
    out["per_image"] = res.per_image


def _vqa_accuracy(predictions, dataset, refs, keys, scorer, out) -> None:
    from eval.vqa import vqa_accuracy

    out["metrics"]["vqa_accuracy"] = vqa_accuracy(predictions, refs)


def _mme(predictions, dataset, refs, keys, scorer, out) -> None:
    from eval.vqa import mme_scores

    image_ids = {example_key(ex, dataset.task): ex.image_id for ex in dataset.examples}
    out["metrics"].update(mme_scores(predictions, refs, image_ids))


#: ``compute`` group of the metric table (kinds ``caption`` and ``vqa``) → the function scoring
#: its keys from predictions and references, in the order they run (and so appear in a record).
PREDICTION_SCORERS: dict[str, Callable[..., None]] = {
    "caption_scorer": _caption_scorer,
    "vqa_accuracy": _vqa_accuracy,
    "mme": _mme,
}


def score_predictions(
    predictions: dict[str, str],
    dataset,
    metrics: Sequence[str] | None = None,
    scorer=None,
) -> dict[str, Any]:
    """Score predictions against a dataset's references.

    Args:
        predictions: key → text (image id for captioning, question id for VQA).
        dataset: a ``compressor.data.Dataset`` (``task``, ``references()``, ``examples``).
        metrics: metric keys (default by task). Keys of the metric table's ``caption`` kind are
            scored on captioning data, ``vqa`` keys on VQA data (caption keys asked for VQA data
            are skipped with a note); model-based metrics (perplexity, bertscore_f1, clipscore,
            teacher_cider) are computed by the caller and skipped here.
        scorer: an open ``eval.captioning.CaptionScorer`` to reuse (one METEOR process).

    Returns:
        ``{"metrics": {key: value}, "notes": [...], "per_image": {...}}`` (0–100 scale).
    """
    task = dataset.task
    # None: the task's defaults; an empty list (only model-based metrics were asked for): nothing here
    metrics = list(metrics) if metrics is not None else list(default_metrics(task))
    refs = dataset.references()
    out: dict[str, Any] = {"metrics": {}, "notes": [], "per_image": {}}
    of_task = [m for m in metrics if m in keys_of(kind=task)]
    for group, score in PREDICTION_SCORERS.items():
        keys = [m for m in of_task if lookup(m).compute == group]
        if keys:
            score(predictions, dataset, refs, keys, scorer, out)
    if task == "vqa":
        cap_metrics = [m for m in metrics if m in keys_of(kind="caption")]
        if cap_metrics:
            out["notes"].append(f"{', '.join(cap_metrics)} skipped: VQA answers are scored by accuracy")
    for k, v in list(out["metrics"].items()):
        if isinstance(v, float) and math.isnan(v):
            out["notes"].append(f"{k} is NaN")
    return out


def score_model(model, processor, dataset, generation, device: str, metrics=None, scorer=None, progress=False,
                num_workers: int | None = None) -> dict:
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
        num_workers: loader worker processes decoding the images (see :func:`predict`).

    Returns:
        ``{"metrics", "notes", "predictions", "settings"}`` (0-100 scale).
    """
    from compressor.evaluation.captioner import TorchCaptioner

    captioner = TorchCaptioner(model, processor, generation, device)
    preds = predict(captioner, dataset, dataset.task, prompt_fn(generation), generation.batch_size, progress,
                    num_workers=num_workers)
    wanted = None if metrics is None else [m for m in metrics if m not in model_metric_keys()]
    scored = score_predictions(preds, dataset, wanted, scorer)
    return {"metrics": scored["metrics"], "notes": scored["notes"], "predictions": preds, "settings": captioner.settings}


def evaluate(
    target: EvalTarget,
    data,
    *,
    metrics: Sequence[str] | None = None,
    options: EvalOptions | None = None,
    scorer=None,
    spec=None,
    params_trainable: int | None = None,
    progress: bool = False,
    shards=None,
    num_workers: int | None = None,
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Caption a dataset, score it and measure the model: one ``eval.json`` record.

    Args:
        target: what to caption with and measure (:class:`~compressor.evaluation.target.EvalTarget`:
            its captioner and decoding settings, and where there is one its PyTorch model, its
            folder, the ONNX export's PyTorch source).
        data: a labelled :class:`compressor.data.Dataset`.
        metrics: metric keys (None: the task's defaults); checked with
            :func:`~compressor.evaluation.model_metrics.check_metric_requirements` by the caller
            beforehand.
        options: settings of the model-based metrics (None: none given).
        scorer: an open ``CaptionScorer`` to reuse (one METEOR process per run).
        spec: a ``CharacteristicsSpec`` (None: defaults).
        params_trainable: parameters trained to make this model (None: unknown, noted).
        progress: show a progress bar while captioning.
        shards: the processes of a multi-process run, all calling this together (see
            :func:`predict`): each captions its share; the main process (rank 0) then scores the
            gathered captions once and measures the characteristics alone; the others return
            ``(None, predictions)``.
        num_workers: loader worker processes decoding the images (see :func:`predict`).

    Returns:
        ``(record, predictions)``: the record (``task``, ``metrics``, ``characteristics``,
        ``decoding``, ``data``, ``notes``; NaN kept as NaN, see
        :func:`~compressor.evaluation.outputs.finite`) and ``{key: caption}`` in dataset order
        (key: image id, or question id for VQA).

    Raises:
        DataError, UserInputError: see
            :func:`~compressor.evaluation.model_metrics.check_data_for_metrics`.
    """
    from eval.characteristics import PeakMemory

    options = options or EvalOptions()
    task = data.task
    names = resolve_metrics(metrics, task)
    check_data_for_metrics(names, data)
    generation = target.generation
    notes: list[str] = []
    model_keys = model_metric_keys()
    # A teacher's captions, when given, are always scored against.
    with_teacher = keys_of(need="teacher") if options.teacher_predictions is not None else ()

    world = shards.world if shards is not None else 1
    stats = getattr(target.captioner, "stats", None)
    if stats is not None:
        stats.reset()  # speculative decoding: count the evaluated set only
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        preds = predict(target.captioner, data, task, prompt_fn(generation), generation.batch_size, progress,
                        shards=shards, num_workers=num_workers)
        predict_s = time.perf_counter() - t0
        if world > 1 and shards.rank != 0:
            return None, preds
        if world > 1:
            notes.append(
                f"captions from {world} processes (each its share of the batches, gathered in order); scored once; "
                "latency, GFLOPs, peak memory and speculative acceptance measured on the main process alone"
            )
        speculative = speculative_characteristics(target.captioner)
        scored = score_predictions(preds, data, [m for m in names if m not in model_keys], scorer)
        values: dict[str, Any] = dict(scored["metrics"])
        notes += scored["notes"]
        job = MetricJob(preds, task, options, data=data, scorer=scorer, target=target, notes=notes)
        values.update(compute_model_metrics(job, [*names, *with_teacher]))
        chars, more = measure_characteristics(target, data, spec)
        chars.update(speculative)
        notes += more
    busy = busy_machine_note()
    if busy and (spec is None or spec.latency is not None):
        notes.append(busy)
    chars["params_trainable"] = params_trainable
    if params_trainable is None:
        notes.append("params_trainable is unknown: no training record comes with this model")
    chars["avg_inference_s"] = predict_s / len(data)
    chars["avg_inference_batch_size"] = generation.batch_size
    if world > 1:
        chars["avg_inference_processes"] = world
    chars["peak_rss_mb"] = mem.rss_mb
    if mem.cuda_mb is not None:
        chars["peak_cuda_mb"] = mem.cuda_mb
    for key in headline_keys():
        chars.setdefault(key, None)
    record = {
        "task": task,
        "metrics": values,
        "characteristics": chars,
        "decoding": dict(target.captioner.settings),
        "data": {
            "resolved": getattr(data, "resolved", ""),
            "examples": len(data),
            "fingerprint": data.fingerprint,
            "skipped": len(data.skipped),
        },
        "notes": notes,
    }
    return record, preds
