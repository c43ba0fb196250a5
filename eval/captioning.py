"""Caption metrics: the COCO caption evaluation (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) and ROUGE-1/2.

Sources followed:

* The COCO caption evaluation, as packaged by ``pycocoevalcap`` 1.2
  (https://github.com/salaniz/pycocoevalcap, from https://github.com/tylin/coco-caption;
  Chen et al. 2015, "Microsoft COCO Captions: Data Collection and Evaluation Server"): every
  caption is PTB-tokenized by Stanford CoreNLP 3.4.1 (``-preserveLines -lowerCase``) and
  stripped of the same punctuation tokens, then scored by pycocoevalcap's own ``Bleu(4)``
  (Papineni et al. 2002, ``closest`` reference length), ``Meteor`` (METEOR 1.5, Denkowski &
  Lavie 2014, ``-l en -norm``), ``Rouge`` (ROUGE-L, beta 1.2) and ``Cider`` (which is CIDEr-D,
  Vedantam et al. 2015: clipped n-gram counts, Gaussian length penalty, sigma 6, x10). CIDEr's
  document frequencies come from the evaluated set, so scores of small sets are not comparable
  with published ones (a set of one image always scores CIDEr 0).
* SPICE (Anderson et al. 2016) through pycocoevalcap's ``spice-1.0.jar``, when the Stanford
  CoreNLP 3.6.0 jars it needs are present (pycocoevalcap would download them on first use;
  this module never downloads anything).
* ROUGE-1/ROUGE-2 through Google's ``rouge-score`` package (the F-measure, Porter stemming on,
  the best reference per image, averaged over images), on the raw captions.

What this module changes around pycocoevalcap, and why:

* The PTB tokenizer is called with the same jar, command line and punctuation list, but its
  temporary file goes to a temporary folder of ours and the jar is given by an absolute path:
  pycocoevalcap writes the file into its own package folder, which fails when site-packages is
  read-only. Predictions and references are tokenized in one JVM call.
* Characters the tokenizer treats as line ends (``\\r``, ``\\f``, ``\\v``, U+2028, U+2029, ... )
  become spaces first; pycocoevalcap only replaces ``\\n``, and any other line end shifts every
  later caption onto the wrong image.
* ``|||`` (METEOR's field separator) is removed from references as well as hypotheses before
  they are sent to the METEOR process.
* One METEOR JVM (5-7 s to start) is kept for the lifetime of a :class:`CaptionScorer`.

All scores are on the 0-100 scale (x100 of pycocoevalcap's values: CIDEr 124.2, not 1.242).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import DataError, StageError, UserInputError, did_you_mean
from eval.coco_tools import (
    check_java,
    find_pycocoevalcap_dir,
    meteor_safe,
    one_line,
    ptb_tokenize,
    run_spice,
    spice_status,
)
from eval.metrics import default_metrics, keys_of, metric_keys
from eval.predictions import match_ids

logger = logging.getLogger(__name__)

#: pycocoevalcap's ``Bleu(4)`` returns BLEU-1..4 in this order.
BLEU_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4")
#: The metrics of the COCO caption evaluation without SPICE: the default set (metric table).
DEFAULT_CAPTION_METRICS = default_metrics("caption")
#: Every metric :class:`CaptionScorer` knows: the table's rows computed by the caption scorer.
CAPTION_METRICS = tuple(k for k in metric_keys() if k in keys_of(compute="caption_scorer"))
#: Those scored on PTB-tokenized captions (Java).
_PTB_METRICS = frozenset(k for k in CAPTION_METRICS if k in keys_of(need="java"))

@dataclass
class CaptionScores:
    """The result of :meth:`CaptionScorer.score`.

    Attributes:
        metrics: ``{metric: value on the 0-100 scale}`` for every metric computed, in the order
            asked. A metric asked for but not computed is absent here and present in ``skipped``.
        per_image: ``{image id: {metric: value}}`` for the per-image metrics computed (BLEU-n of
            the single sentence, METEOR, ROUGE-L, CIDEr, ROUGE-1/2, SPICE).
        notes: human-readable remarks (empty predictions, skipped metrics, one-image CIDEr, ...).
        skipped: ``{metric: reason}`` for metrics asked for but not computed.
        num_images: how many images were scored.
    """

    metrics: dict[str, float]
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    num_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy: ``metrics``, ``notes``, ``skipped``, ``num_images`` (not per_image)."""
        return {
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
            "skipped": dict(self.skipped),
            "num_images": self.num_images,
        }


def check_caption_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """Validate metric names for :meth:`CaptionScorer.score`.

    Args:
        metrics: names from :data:`CAPTION_METRICS`, or None for :data:`DEFAULT_CAPTION_METRICS`.

    Returns:
        The names, deduplicated, in the order given.

    Raises:
        UserInputError: an unknown name (with a did-you-mean), or an empty list.
    """
    if metrics is None:
        return DEFAULT_CAPTION_METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    names = tuple(dict.fromkeys(metrics))
    if not names:
        raise UserInputError("no caption metric asked for; choose from " + ", ".join(CAPTION_METRICS))
    for m in names:
        if m not in CAPTION_METRICS:
            raise UserInputError(
                f"unknown caption metric '{m}'.{did_you_mean(m, CAPTION_METRICS)} "
                f"Caption metrics: {', '.join(CAPTION_METRICS)}."
            )
    return names


def _check_inputs(
    predictions: Mapping[Any, Any], references: Mapping[Any, Any]
) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    ids = match_ids(predictions, references)
    preds = {str(k): v for k, v in predictions.items()}
    refs: dict[str, list[str]] = {}
    bad: list[str] = []
    for k, v in references.items():
        texts = [v] if isinstance(v, str) else list(v)
        if not texts:
            bad.append(f"id {k}: no references")
        elif not all(isinstance(t, str) for t in texts):
            bad.append(f"id {k}: references must be strings")
        refs[str(k)] = texts
    bad += [
        f"id {i}: the prediction is {type(preds[i]).__name__}, not a string"
        for i in ids
        if not isinstance(preds[i], str)
    ]
    if bad:
        raise DataError("bad captions:", bad)
    return ids, preds, refs


class CaptionScorer:
    """Caption metrics with one long-lived METEOR process (pycocoevalcap's ``Meteor``).

    Starting METEOR costs 5-7 s (a JVM plus the paraphrase table), so a scorer keeps one for its
    lifetime; it is created on the first :meth:`score` that asks for METEOR. Use it as a context
    manager or call :meth:`close`. Thread-safe (METEOR calls are serialised by its lock).

    Args:
        coco_dir: the pycocoevalcap package folder whose PTB tokenizer and SPICE jars are used
            (default: the installed package, :func:`find_pycocoevalcap_dir`). METEOR is always
            pycocoevalcap's own ``Meteor()``, which reads its jar without writing anything.
        spice_cache_dir: SPICE's parse cache folder, or None for no cache.
    """

    def __init__(self, *, coco_dir: str | Path | None = None, spice_cache_dir: str | Path | None = None):
        self._coco_dir = Path(coco_dir) if coco_dir is not None else None
        self._spice_cache_dir = spice_cache_dir
        self._meteor: Any = None
        self._meteor_err: collections.deque[str] = collections.deque(maxlen=40)
        self._lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the METEOR process, if one was started. Safe to call twice."""
        with self._lock:
            meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        with meteor.lock:
            try:
                meteor.meteor_p.stdin.close()
            except OSError:
                pass
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
        logger.debug("METEOR process stopped")

    @property
    def coco_dir(self) -> Path:
        """The pycocoevalcap package folder in use."""
        if self._coco_dir is None:
            self._coco_dir = find_pycocoevalcap_dir()
        return self._coco_dir

    def _get_meteor(self) -> Any:
        with self._lock:
            if self._meteor is None:
                from pycocoevalcap.meteor.meteor import Meteor

                t0 = time.perf_counter()
                meteor = Meteor()
                self._meteor_err.clear()
                threading.Thread(
                    target=self._drain, args=(meteor.meteor_p.stderr,), name="meteor-stderr", daemon=True
                ).start()
                self._meteor = meteor
                logger.info(
                    "started METEOR (pid %d) in %.2f s", meteor.meteor_p.pid, time.perf_counter() - t0
                )
            return self._meteor

    def _drain(self, stream: Any) -> None:
        # pycocoevalcap never reads METEOR's stderr; a full pipe would block the JVM.
        for raw in iter(stream.readline, b""):
            self._meteor_err.append(raw.decode("utf-8", errors="replace").rstrip())

    def _run_meteor(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
        meteor = self._get_meteor()
        t0 = time.perf_counter()
        try:
            score, scores = meteor.compute_score(gts, res)
        except (ValueError, OSError) as e:
            # A dead JVM: readline() returns b"" and float("") raises; or the pipe is broken.
            if meteor.lock.locked():
                meteor.lock.release()
            time.sleep(0.2)
            err = "\n".join(self._meteor_err) or "(no output on stderr)"
            self.close()
            raise StageError(
                f"the METEOR process failed ({type(e).__name__}: {e}). Its stderr:\n{err}"
            ) from e
        logger.info("METEOR on %d images: %.2f s", len(gts), time.perf_counter() - t0)
        return float(score), [float(s) for s in scores]

    # -- scoring ----------------------------------------------------------------------------
    def score(
        self,
        predictions: Mapping[Any, str],
        references: Mapping[Any, Sequence[str]],
        metrics: Sequence[str] | None = None,
    ) -> CaptionScores:
        """Score one caption per image against that image's reference captions.

        Args:
            predictions: ``{image id: caption}``. Empty or whitespace captions score 0 and are
                counted in ``notes``.
            references: ``{image id: [reference captions]}`` (a single string counts as one).
            metrics: names from :data:`CAPTION_METRICS`; None means
                :data:`DEFAULT_CAPTION_METRICS` (BLEU-1..4, METEOR, ROUGE-L, CIDEr). ROUGE-1/2 and
                SPICE are computed only when asked; SPICE is skipped (see ``skipped``) when its
                CoreNLP jars are missing or it fails.

        Returns:
            A :class:`CaptionScores` (values on the 0-100 scale).

        Raises:
            DataError: the ids differ between predictions and references (rows list both
                sides), an image has no references, or a caption is not a string.
            UserInputError: an unknown metric, or Java missing when a metric needs it.
            StageError: the PTB tokenizer or METEOR process failed.
        """
        names = check_caption_metrics(metrics)
        ids, preds, refs = _check_inputs(predictions, references)
        result = CaptionScores(metrics={}, per_image={i: {} for i in ids}, num_images=len(ids))
        empty = [i for i in ids if not preds[i].strip()]
        if empty:
            shown = ", ".join(empty[:10]) + (", …" if len(empty) > 10 else "")
            result.notes.append(f"{len(empty)} of {len(ids)} predictions are empty and score 0: {shown}")
            logger.warning("%d of %d predictions are empty and score 0", len(empty), len(ids))

        wanted = set(names)
        if wanted & _PTB_METRICS:
            java = check_java()
            if "meteor" in wanted:
                self._get_meteor()  # the JVM loads its paraphrase table while PTB runs
            flat = [preds[i] for i in ids] + [r for i in ids for r in refs[i]]
            tokens = ptb_tokenize(flat, coco_dir=self.coco_dir, java=java)
            res = {i: [tokens[n]] for n, i in enumerate(ids)}
            gts: dict[str, list[str]] = {}
            pos = len(ids)
            for i in ids:
                gts[i] = tokens[pos : pos + len(refs[i])]
                pos += len(refs[i])
            lost = [i for i in ids if preds[i].strip() and not res[i][0]]
            if lost:
                result.notes.append(
                    f"{len(lost)} predictions are empty after PTB tokenization (only punctuation, or "
                    f"characters the tokenizer drops such as emoji): {', '.join(lost[:10])}"
                )
            self._coco_metrics(wanted, ids, gts, res, java, result)
        if wanted & {"rouge_1", "rouge_2"}:
            self._rouge_n(wanted, ids, preds, refs, result)

        for i in empty:  # by definition; guards against scorer smoothing constants
            result.per_image[i] = {k: 0.0 for k in result.per_image[i]}
        result.metrics = {m: result.metrics[m] for m in names if m in result.metrics}
        for m, why in result.skipped.items():
            result.notes.append(f"{m} skipped: {why}")
        logger.info(
            "caption metrics on %d images: %s",
            len(ids),
            ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items()),
        )
        return result

    def _coco_metrics(
        self,
        wanted: set[str],
        ids: list[str],
        gts: dict[str, list[str]],
        res: dict[str, list[str]],
        java: str,
        result: CaptionScores,
    ) -> None:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if wanted & set(BLEU_METRICS):
            score, scores = Bleu(4).compute_score(gts, res, verbose=0)
            for n, m in enumerate(BLEU_METRICS):
                if m in wanted:
                    result.metrics[m] = 100.0 * float(score[n])
                    for i, s in zip(ids, scores[n], strict=True):
                        result.per_image[i][m] = 100.0 * float(s)
        if "meteor" in wanted:
            safe_gts = {i: [meteor_safe(r) for r in gts[i]] for i in ids}
            safe_res = {i: [meteor_safe(res[i][0])] for i in ids}
            score, scores = self._run_meteor(safe_gts, safe_res)
            result.metrics["meteor"] = 100.0 * score
            for i, s in zip(ids, scores, strict=True):
                result.per_image[i]["meteor"] = 100.0 * s
        if "rouge_l" in wanted:
            score, scores = Rouge().compute_score(gts, res)
            result.metrics["rouge_l"] = 100.0 * float(score)
            for i, s in zip(ids, scores, strict=True):
                result.per_image[i]["rouge_l"] = 100.0 * float(s)
        if "cider" in wanted:
            if not any(r for i in ids for r in gts[i]):
                # CiderScorer takes max() over an empty document-frequency table and crashes.
                result.metrics["cider"] = 0.0
                for i in ids:
                    result.per_image[i]["cider"] = 0.0
                result.notes.append("cider: every reference is empty after tokenization; CIDEr is 0")
            else:
                score, scores = Cider().compute_score(gts, res)
                result.metrics["cider"] = 100.0 * float(score)
                for i, s in zip(ids, scores, strict=True):
                    result.per_image[i]["cider"] = 100.0 * float(s)
                if len(ids) == 1:
                    result.notes.append(
                        "cider: one image only; CIDEr's document frequencies come from the evaluated "
                        "set, so every n-gram has IDF 0 and CIDEr is 0"
                    )
        if "spice" in wanted:
            ok, why = spice_status(self.coco_dir)
            if not ok:
                result.skipped["spice"] = why
                logger.warning("spice skipped: %s", why)
            else:
                try:
                    t0 = time.perf_counter()
                    per = run_spice(
                        gts,
                        {i: res[i][0] for i in ids},
                        coco_dir=self.coco_dir,
                        java=java,
                        cache_dir=self._spice_cache_dir,
                    )
                    logger.info("SPICE on %d images: %.2f s", len(ids), time.perf_counter() - t0)
                except StageError as e:
                    result.skipped["spice"] = str(e)
                    logger.warning("spice skipped: %s", e)
                else:
                    vals = [per[i] for i in ids]
                    result.metrics["spice"] = sum(vals) / len(vals)
                    for i in ids:
                        result.per_image[i]["spice"] = per[i]

    def _rouge_n(
        self,
        wanted: set[str],
        ids: list[str],
        preds: dict[str, str],
        refs: dict[str, list[str]],
        result: CaptionScores,
    ) -> None:
        from rouge_score import rouge_scorer

        kinds = [k for k in ("rouge_1", "rouge_2") if k in wanted]
        scorer = rouge_scorer.RougeScorer([k.replace("_", "") for k in kinds], use_stemmer=True)
        totals = dict.fromkeys(kinds, 0.0)
        non_ascii = 0
        for i in ids:
            pred = one_line(preds[i])
            ref_list = [one_line(r) for r in refs[i]]
            non_ascii += any(not t.isascii() for t in (pred, *ref_list))
            best = scorer.score_multi(ref_list, pred)
            for k in kinds:
                v = 100.0 * float(best[k.replace("_", "")].fmeasure)
                result.per_image[i][k] = v
                totals[k] += v
        for k in kinds:
            result.metrics[k] = totals[k] / len(ids)
        if non_ascii:
            result.notes.append(
                f"rouge_1/rouge_2: {non_ascii} images have non-ASCII captions; rouge-score's tokenizer "
                "keeps only a-z and 0-9, so those characters do not count"
            )


def score_captions(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    metrics: Sequence[str] | None = None,
    *,
    coco_dir: str | Path | None = None,
) -> CaptionScores:
    """Score captions with a scorer opened and closed for this call (METEOR starts every time).

    Args:
        predictions: ``{image id: caption}``.
        references: ``{image id: [reference captions]}``.
        metrics: see :meth:`CaptionScorer.score`.
        coco_dir: see :class:`CaptionScorer`.

    Returns:
        A :class:`CaptionScores`.

    Raises:
        DataError, UserInputError, StageError: see :meth:`CaptionScorer.score`.
    """
    with CaptionScorer(coco_dir=coco_dir) as scorer:
        return scorer.score(predictions, references, metrics)
