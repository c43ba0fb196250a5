"""The one metric table: every metric and characteristic key, with what the rest of the project needs to know.

Each :class:`Metric` row says what a key is called in prose, which way is better, what kind of
figure it is (``caption``, ``vqa``, ``model`` for metrics that need a model or a teacher besides
the captions, ``characteristic``), what computing it needs (Java, a local model folder, a
teacher, the PyTorch model, the images), whether it is in the task's default set, and which group
of code computes it (``compute``; the evaluation dispatches on it). Everything else derives from
this table: the recipe schema's ``METRIC_KEYS`` / ``CHARACTERISTIC_KEYS`` / ``GATE_KEYS``, the
gate's direction rules, the order of report rows and columns, the model card's display names and
the plots. Adding a metric is one row here plus the function that computes it.

Characteristics measured per model part (``params_<part>``, ``gflops_<part>``) are template rows
(``per_part``), expanded with :func:`part_names`, the one place part names are read.

Keys and scale follow DESIGN.md ("Conventions every part shares"): lowercase keys, metrics on the
0-100 scale papers report (CIDEr 124.2, not 1.242), perplexity as is.

This module imports nothing heavy (no torch, no pipeline); :func:`part_names` reads the recipe
schema's part names lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["caption", "vqa", "model", "characteristic"]
#: What computing a key may need (``Metric.needs``):
#: ``java`` a Java runtime on PATH (pycocoevalcap's PTB tokenizer, METEOR, SPICE);
#: ``model_folder`` a local model folder (``Metric.model_folder`` names the option);
#: ``bert-score`` the bert-score package (extra ``[metrics]``);
#: ``teacher`` a teacher's captions of the same images;
#: ``pytorch`` the PyTorch model (an ONNX export's PyTorch source will do);
#: ``images`` the images themselves, not only the references.
NEEDS = ("java", "model_folder", "bert-score", "teacher", "pytorch", "images")
PART = "<part>"


@dataclass(frozen=True)
class ModelFolder:
    """The option giving a model-based metric its local model folder (nothing is downloaded).

    Attributes:
        recipe_key: the recipe key (``evaluate.bertscore.model``).
        cli_option: the ``compress eval`` option (``--bertscore-model``).
        what: what the folder holds, in errors (``model``, ``CLIP model``).
    """

    recipe_key: str
    cli_option: str
    what: str


@dataclass(frozen=True)
class Metric:
    """One row of the table.

    Attributes:
        key: the lowercase key (``cider``); ``params_<part>`` for a per-part template row.
        name: the display name (``CIDEr``, ``BLEU-4``, ``Parameters (vision)``).
        higher_is_better: direction; False for perplexity, latency, memory, size, parameters and
            GFLOPs (a ``max_drop`` gate rule is refused on those).
        kind: ``caption`` (scored against reference captions), ``vqa`` (against answers),
            ``model`` (needs a model or a teacher besides the predictions) or ``characteristic``.
        compute: the group of code that computes it: ``caption_scorer`` (the COCO caption
            evaluation and ROUGE-1/2, ``eval.captioning.CaptionScorer``), ``vqa_accuracy``,
            ``mme``, ``perplexity``, ``bertscore``, ``clipscore``, ``teacher_cider``; for
            characteristics ``parameters``, ``gflops``, ``latency``, ``inference_time``,
            ``peak_memory``, ``size``, ``speculative_decoding``.
        needs: what computing it needs (see :data:`NEEDS`).
        model_folder: the option giving its local model folder, when ``model_folder`` is needed.
        default: in its task's default set (what ``evaluate`` computes without ``metrics:``).
        headline: one of the four figures the published RSICD study reports for every model
            (parameters, trainable parameters, GFLOPs, average inference time): every evaluation
            record and every report table has them, ``None`` / "—" when not measured.
        per_part: a template row, expanded once per part name (:func:`part_names`).
        listed: its position in the key listings of the recipe reference and of error messages
            (the order users have seen since the key was added); None: after every listed key,
            in table order.
        runs_column: its position among the characteristic columns of the across-runs table
            (``compress report RUN…``); None: not a column there.
        description: one line for references.
    """

    key: str
    name: str
    higher_is_better: bool
    kind: Kind
    compute: str
    needs: frozenset[str] = frozenset()
    model_folder: ModelFolder | None = None
    default: bool = False
    headline: bool = False
    per_part: bool = False
    listed: int | None = None
    runs_column: int | None = None
    description: str = ""


HIGHER, LOWER = True, False
_JAVA = frozenset({"java"})

#: The table, in display order (report rows and columns follow it).
TABLE: tuple[Metric, ...] = (
    # -- caption metrics: the COCO caption evaluation (pycocoevalcap) and ROUGE-1/2 (rouge-score)
    Metric("bleu_1", "BLEU-1", HIGHER, "caption", "caption_scorer", _JAVA, default=True, listed=0,
           description="BLEU with unigrams (Papineni et al. 2002), pycocoevalcap's Bleu(4)."),
    Metric("bleu_2", "BLEU-2", HIGHER, "caption", "caption_scorer", _JAVA, default=True, listed=1,
           description="BLEU up to bigrams."),
    Metric("bleu_3", "BLEU-3", HIGHER, "caption", "caption_scorer", _JAVA, default=True, listed=2,
           description="BLEU up to trigrams."),
    Metric("bleu_4", "BLEU-4", HIGHER, "caption", "caption_scorer", _JAVA, default=True, listed=3,
           description="BLEU up to 4-grams."),
    Metric("meteor", "METEOR", HIGHER, "caption", "caption_scorer", _JAVA, default=True, listed=4,
           description="METEOR 1.5 (Denkowski & Lavie 2014)."),
    Metric("rouge_l", "ROUGE-L", HIGHER, "caption", "caption_scorer", _JAVA, default=True, listed=5,
           description="ROUGE-L (beta 1.2), pycocoevalcap."),
    Metric("rouge_1", "ROUGE-1", HIGHER, "caption", "caption_scorer", listed=7,
           description="ROUGE-1 F-measure (rouge-score, stemmed), best reference per image."),
    Metric("rouge_2", "ROUGE-2", HIGHER, "caption", "caption_scorer", listed=8,
           description="ROUGE-2 F-measure (rouge-score, stemmed), best reference per image."),
    Metric("cider", "CIDEr", HIGHER, "caption", "caption_scorer", _JAVA, default=True, listed=6,
           description="CIDEr-D (Vedantam et al. 2015), pycocoevalcap."),
    Metric("spice", "SPICE", HIGHER, "caption", "caption_scorer", _JAVA, listed=9,
           description="SPICE (Anderson et al. 2016); skipped with a note when its CoreNLP jars are missing."),
    # -- answers (VQA)
    Metric("vqa_accuracy", "VQA accuracy", HIGHER, "vqa", "vqa_accuracy", default=True, listed=10,
           description="The VQA v2 accuracy: min(#humans who gave the answer / 3, 1), averaged."),
    Metric("mme_acc", "MME acc", HIGHER, "vqa", "mme", listed=13,
           description="MME accuracy over yes/no questions."),
    Metric("mme_acc_plus", "MME acc+", HIGHER, "vqa", "mme", listed=14,
           description="MME accuracy+: images whose questions are all answered right."),
    # -- metrics that need a model or a teacher besides the predictions
    Metric("bertscore_f1", "BERTScore F1", HIGHER, "model", "bertscore", frozenset({"model_folder", "bert-score"}),
           ModelFolder("evaluate.bertscore.model", "--bertscore-model", "model"), listed=11,
           description="BERTScore F1 (Zhang et al. 2020) from a local model folder."),
    Metric("clipscore", "CLIPScore", HIGHER, "model", "clipscore", frozenset({"model_folder", "images"}),
           ModelFolder("evaluate.clipscore.model", "--clipscore-model", "CLIP model"), listed=12,
           description="CLIPScore (Hessel et al. 2021) from a local CLIP folder, x100."),
    Metric("teacher_cider", "CIDEr against the baseline's captions", HIGHER, "model", "teacher_cider",
           frozenset({"java", "teacher"}), listed=16,
           description="CIDEr against a teacher's captions of the same images."),
    Metric("perplexity", "Perplexity", LOWER, "model", "perplexity", frozenset({"pytorch"}), listed=15,
           description="Perplexity of the reference captions given the image (teacher-forced)."),
    # -- characteristics
    Metric("params_total", "Parameters", LOWER, "characteristic", "parameters", headline=True, listed=0,
           runs_column=0, description="Parameters of the whole model."),
    Metric("params_trainable", "Trainable parameters", LOWER, "characteristic", "parameters", headline=True,
           listed=1, description="Parameters trained to make this model."),
    Metric(f"params_{PART}", "Parameters", LOWER, "characteristic", "parameters", per_part=True, listed=2,
           runs_column=1, description="Parameters of one part."),
    Metric("gflops", "GFLOPs", LOWER, "characteristic", "gflops", headline=True, listed=3, runs_column=2,
           description="GFLOPs of captioning one image (batch 1, a fixed number of generated tokens)."),
    Metric(f"gflops_{PART}", "GFLOPs", LOWER, "characteristic", "gflops", per_part=True, listed=4,
           description="GFLOPs of one part."),
    Metric("avg_inference_s", "Avg inference time (s)", LOWER, "characteristic", "inference_time", headline=True,
           listed=8, description="Wall seconds per caption over the evaluated set at the decoding batch size."),
    Metric("latency_p50_s", "Latency p50 (s)", LOWER, "characteristic", "latency", listed=5, runs_column=3,
           description="Median seconds per caption at the first latency batch size."),
    Metric("latency_p95_s", "Latency p95 (s)", LOWER, "characteristic", "latency", listed=6, runs_column=4,
           description="95th-percentile seconds per caption."),
    Metric("tokens_per_s", "Tokens/s", HIGHER, "characteristic", "latency", listed=7, runs_column=5,
           description="Generated tokens per second."),
    Metric("spec_acceptance", "Speculative acceptance", HIGHER, "characteristic", "speculative_decoding",
           description="Speculative decoding: accepted draft tokens / proposed."),
    Metric("spec_tokens_per_call", "Tokens per target call", HIGHER, "characteristic", "speculative_decoding",
           description="Speculative decoding: tokens emitted per target decoder call (plain greedy: 1)."),
    Metric("peak_rss_mb", "Peak RSS (MB)", LOWER, "characteristic", "peak_memory", listed=9, runs_column=7,
           description="Peak resident memory of the process while this evaluation ran, MB: it starts from what the process "
           "already holds (earlier stages' models, caches), so a later evaluation in one run can read higher; "
           "`compress eval` measures a model alone."),
    Metric("peak_cuda_mb", "Peak CUDA memory (MB)", LOWER, "characteristic", "peak_memory", listed=10,
           description="Peak CUDA memory allocated, MB (on GPU)."),
    Metric("size_mb", "Size on disk (MB)", LOWER, "characteristic", "size", listed=11, runs_column=6,
           description="Size of the model's files on disk, MB."),
)

def part_names() -> tuple[str, ...]:
    """The model part names that per-part characteristics are measured for: every registered
    model family's parts (:func:`compressor.families.part_names`), the one place the table reads them.

    Returns:
        Part names, e.g. ``("vision", "projection", "language_model")`` and BLIP-2's Q-Former.
    """
    from compressor.families import part_names as family_parts

    return tuple(family_parts())


def part_label(part: str) -> str:
    """A part's display label: the one its family declares (``Q-Former``), else the name with spaces."""
    from compressor.families import part_labels

    return part_labels().get(part, part.replace("_", " "))


def _expand(row: Metric, parts: tuple[str, ...]) -> list[Metric]:
    if not row.per_part:
        return [row]
    return [
        replace(row, key=row.key.replace(PART, p), name=f"{row.name} ({part_label(p)})", per_part=False)
        for p in parts
    ]


def rows(kinds: tuple[str, ...] | str | None = None) -> tuple[Metric, ...]:
    """The table with per-part rows expanded, in display order.

    Args:
        kinds: a kind or kinds to keep (None: every row).

    Returns:
        Rows.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    parts = part_names()
    return tuple(m for row in TABLE if kinds is None or row.kind in kinds for m in _expand(row, parts))


METRIC_KINDS = ("caption", "vqa", "model")


def display_keys(group: Literal["metrics", "characteristics"]) -> tuple[str, ...]:
    """Keys in display order (report rows, plots): ``metrics`` or ``characteristics``."""
    return tuple(m.key for m in rows(METRIC_KINDS if group == "metrics" else "characteristic"))


def _listed(kinds: tuple[str, ...] | str) -> tuple[str, ...]:
    table = [row for row in TABLE if row.kind in ((kinds,) if isinstance(kinds, str) else kinds)]
    order = sorted(range(len(table)), key=lambda i: (table[i].listed is None, table[i].listed or 0, i))
    parts = part_names()
    return tuple(m.key for i in order for m in _expand(table[i], parts))


def metric_keys() -> tuple[str, ...]:
    """Every metric key (caption, VQA, model-based), in the order users see them listed."""
    return _listed(METRIC_KINDS)


def characteristic_keys() -> tuple[str, ...]:
    """Every characteristic key (per-part keys expanded), in the order users see them listed."""
    return _listed("characteristic")


def gate_keys() -> tuple[str, ...]:
    """Keys a gate rule may name: :func:`metric_keys` then :func:`characteristic_keys`."""
    return metric_keys() + characteristic_keys()


def default_metrics(task: str) -> tuple[str, ...]:
    """The metrics computed when none are asked for: the default rows of the task's kind.

    Args:
        task: ``caption`` or ``vqa``.

    Returns:
        Keys in listing order (``bleu_1`` … ``cider`` for captions, ``vqa_accuracy`` for VQA).
    """
    return tuple(k for k in _listed(task) if lookup(k).default)


def headline_keys() -> tuple[str, ...]:
    """The four figures every evaluation record and report table has (see ``Metric.headline``)."""
    return tuple(m.key for m in rows("characteristic") if m.headline)


def runs_table_columns() -> tuple[str, ...]:
    """Characteristic columns of the across-runs table, in their order (``Metric.runs_column``)."""
    table = [row for row in TABLE if row.runs_column is not None]
    parts = part_names()
    return tuple(m.key for row in sorted(table, key=lambda r: r.runs_column) for m in _expand(row, parts))


def keys_of(*, kind: str | None = None, compute: str | None = None, need: str | None = None) -> tuple[str, ...]:
    """Keys (display order) of the rows matching every condition given.

    Args:
        kind: a ``Metric.kind``.
        compute: a ``Metric.compute`` group.
        need: one of :data:`NEEDS`.
    """
    return tuple(
        m.key
        for m in rows()
        if (kind is None or m.kind == kind)
        and (compute is None or m.compute == compute)
        and (need is None or need in m.needs)
    )


def lookup(key: str) -> Metric | None:
    """The row of ``key`` (per-part keys of the current part names included), or None."""
    for m in rows():
        if m.key == key:
            return m
    return None


def _template(key: str) -> Metric | None:
    """The per-part template row whose prefix ``key`` has (``params_connector`` → ``params_<part>``)."""
    for row in TABLE:
        prefix = row.key.split(PART)[0]
        if row.per_part and key.startswith(prefix) and len(key) > len(prefix):
            return row
    return None


def higher_is_better(key: str) -> bool:
    """Whether a larger value of ``key`` is the better one.

    Per-part keys of parts outside :func:`part_names` (another family's) follow their template
    row (``params_*``, ``gflops_*``: lower is better); keys the table does not know count as
    higher-is-better.
    """
    row = lookup(key) or _template(key)
    return True if row is None else row.higher_is_better


def display_name(key: str) -> str:
    """The display name of ``key`` (``CIDEr``, ``BLEU-4``), or the key itself when unknown."""
    row = lookup(key)
    return row.name if row is not None else key
