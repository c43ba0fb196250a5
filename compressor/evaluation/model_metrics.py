"""Metric names and requirements, checked up front, and the metrics that need a model or a teacher.

:func:`resolve_metrics`, :func:`check_metric_requirements` and :func:`check_data_for_metrics` run
every check that can fail (metric names, Java, local metric models, the teacher, the data) before
a model is loaded or a file is written; they read what each metric needs from the metric table
(``eval.metrics``). :data:`MODEL_SCORERS` maps the table's ``compute`` groups of the ``model``
kind (perplexity, BERTScore, CLIPScore, CIDEr against a teacher) to the functions computing
them; :func:`compute_model_metrics` runs the ones asked for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import DataError, UserInputError, did_you_mean
from compressor.evaluation.outputs import example_key
from eval.metrics import default_metrics, keys_of, lookup, metric_keys

log = logging.getLogger(__name__)


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
    known = metric_keys()
    if metrics is None:
        return list(default_metrics(task))
    names = list(dict.fromkeys(metrics))
    if not names:
        raise UserInputError(f"no metric asked for; choose from {', '.join(known)}")
    bad = [m for m in names if m not in known]
    if bad:
        raise UserInputError(
            "; ".join(f"unknown metric '{b}'.{did_you_mean(b, known)}" for b in bad) + f" Metrics: {', '.join(known)}."
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

    What each metric needs is its row's ``needs`` in the metric table.

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
    wanted = [m for m in keys_of() if m in set(metrics)]  # table order: the first failing check wins
    if task == "caption" and any("java" in lookup(m).needs for m in wanted):
        from eval.coco_tools import check_java

        check_java()
    folders = {"bertscore_f1": bertscore_model, "clipscore": clipscore_model}
    for m in wanted:
        needs = lookup(m).needs
        if "model_folder" in needs:
            from eval.embedding_metrics import require_model_folder

            require_model_folder(folders.get(m), m)
        if "bert-score" in needs:
            import importlib.util

            if importlib.util.find_spec("bert_score") is None:
                raise UserInputError(f"{m} needs bert-score: `pip install 'vlm-compress[metrics]'`.")
        if "teacher" in needs and not teacher:
            raise UserInputError(f"{m} scores against a teacher's captions: set `{teacher_option}`")


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
    vqa_only = sorted(wanted & set(keys_of(kind="vqa")))
    if vqa_only and data.task != "vqa":
        raise UserInputError(f"{', '.join(vqa_only)} score answers, but the data holds captions (task caption)")
    if wanted & set(keys_of(compute="mme")):
        bad = [
            f"{ex.question_id}: {sorted(set(ex.answers))}"
            for ex in data.examples
            if {a.strip().lower() for a in ex.answers} not in ({"yes"}, {"no"})
        ]
        if bad:
            raise DataError("mme_acc / mme_acc_plus need yes/no questions; these questions have other answers:", bad)


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

    from compressor.families import family_for_model
    from compressor.models.batches import build_prompt, training_batch

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


@dataclass
class MetricJob:
    """What a model-based metric may read.

    Attributes:
        predictions: ``{key: caption}`` (see :func:`~compressor.evaluation.outputs.example_key`).
        task: ``caption`` or ``vqa``.
        options: an :class:`~compressor.evaluation.target.EvalOptions`.
        data: the dataset scored, or None (predictions scored against a references file).
        references: ``{key: [references]}``; None: ``data.references()``.
        scorer: an open ``CaptionScorer`` to reuse.
        target: the :class:`~compressor.evaluation.target.EvalTarget` that captioned, or None
            (a predictions file).
        notes: where notes go (shared with the caller's record).
    """

    predictions: dict[str, str]
    task: str
    options: Any
    data: Any = None
    references: Mapping[str, Any] | None = None
    scorer: Any = None
    target: Any = None
    notes: list[str] = field(default_factory=list)

    def refs(self) -> Mapping[str, Any]:
        """The references: given, or the data's."""
        return self.references if self.references is not None else self.data.references()


def _teacher_cider(job: MetricJob) -> dict[str, float]:
    return {"teacher_cider": teacher_cider(job.predictions, job.options.teacher_predictions or {}, job.scorer)}


def _perplexity(job: MetricJob) -> dict[str, float]:
    t = job.target
    gen = t.generation
    if t.model is not None:
        return {"perplexity": perplexity(t.model, t.processor, job.data, gen, t.device)}
    if t.source is not None:
        value = perplexity(*t.source_model(), job.data, gen, t.device)
        job.notes.append("perplexity: teacher-forced on the PyTorch model the ONNX graphs were exported from")
        return {"perplexity": value}
    job.notes.append("perplexity needs the PyTorch model; not computed for an ONNX export")
    return {}


def _bertscore(job: MetricJob) -> dict[str, float]:
    from eval.embedding_metrics import bertscore_f1

    refs = job.refs()
    keys = list(job.predictions)
    opts = job.options
    value = bertscore_f1([job.predictions[k] for k in keys], [refs[k] for k in keys], opts.bertscore_model, opts.bertscore_layers)
    return {"bertscore_f1": value}


def _clipscore(job: MetricJob) -> dict[str, float]:
    from eval.embedding_metrics import clip_score

    examples = job.data.examples
    value = clip_score(
        [ex.load_image() for ex in examples],
        [job.predictions[example_key(ex, job.task)] for ex in examples],
        job.options.clipscore_model,
    )
    return {"clipscore": value}


#: ``compute`` group of the metric table (kind ``model``) → the function computing its keys, in
#: the order they are computed (and so appear in a record).
MODEL_SCORERS: dict[str, Callable[[MetricJob], dict[str, float]]] = {
    "teacher_cider": _teacher_cider,
    "perplexity": _perplexity,
    "bertscore": _bertscore,
    "clipscore": _clipscore,
}


def model_metric_keys() -> tuple[str, ...]:
    """Keys of the metric table's ``model`` kind: computed here, not by the prediction scorers."""
    return keys_of(kind="model")


def compute_model_metrics(job: MetricJob, names: Sequence[str]) -> dict[str, float]:
    """Compute the model-based metrics among ``names``.

    Args:
        job: what they read.
        names: metric keys (others are ignored).

    Returns:
        ``{key: value}`` (0-100 scale; perplexity as is), in :data:`MODEL_SCORERS` order.
    """
    groups = {lookup(m).compute for m in names if m in model_metric_keys()}
    out: dict[str, float] = {}
    for group, fn in MODEL_SCORERS.items():
        if group in groups:
            out.update(fn(job))
    return out
