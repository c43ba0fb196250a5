"""``compress eval``: score a model folder or an ONNX export on data, or score prediction files.

Two modes (DESIGN.md "CLI contract"):

* ``compress eval MODEL_OR_ONNX_DIR --data PATH [--data-format F] [--limit N] --out eval.json``:
  caption the data with the model, compute the metrics and the characteristics (parameters,
  GFLOPs, latency p50/p95 at each ``--latency-batch-sizes``, tokens/s, peak memory, size on disk)
  and write the same record as the ``evaluate`` stage, which ``compress gate`` reads.
* ``compress eval --predictions P.json --references R.json --out eval.json`` (or ``--data PATH``
  instead of ``--references``): score without any model. Predictions: a COCO results list
  ``[{image_id, caption}]``, a mapping ``{image_id: caption}``, a VQA results list, or the answers
  CSV of ``compress predict`` (with ``--data``). Ids that do not match are listed in the error;
  with ``--references`` and ``--limit N`` (after ``compress predict --limit N``) the predicted
  ids are scored and the record's notes say how many references were left out.

Everything that can fail on input (paths, data rows, metric names, Java, metric model folders)
is checked before a model is loaded, and nothing is written then (exit 2).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from compressor.commands.targets import (
    check_out,
    data_options,
    draft_options,
    load_data,
    load_target,
    model_options,
    trainable_from_run,
)
from compressor.errors import DataError, UserInputError

log = logging.getLogger(__name__)


def _csv_ints(text: str, option: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserInputError(f"{option} {text}: expected comma-separated integers, e.g. 1,8") from None
    if not vals or any(v < 1 for v in vals):
        raise UserInputError(f"{option} {text}: expected positive integers, e.g. 1,8")
    return vals


@click.command("eval")
@click.argument("model", required=False, metavar="[MODEL_OR_ONNX_DIR]")
@data_options
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path), help="Score this predictions file (no model).")
@click.option("--references", type=click.Path(dir_okay=False, path_type=Path), help="References for --predictions (COCO captions file, VQA annotations or {id: [captions]}).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Write the evaluation record (eval.json) here.")
@click.option("--metrics", help="Comma-separated metric keys (default: BLEU-1..4, METEOR, ROUGE-L, CIDEr; vqa_accuracy for VQA).")
@click.option("--label", help="Name of this evaluation in the record (default: the folder or file name).")
@click.option("--save-predictions", type=click.Path(dir_okay=False, path_type=Path), help="Also write the model's predictions (COCO results list) here.")
@click.option("--bertscore-model", metavar="DIR", help="Local model folder for bertscore_f1 (e.g. all-MiniLM-L6-v2).")
@click.option("--bertscore-layers", type=click.IntRange(min=1), help="bert-score layer (default: the model's last).")
@click.option("--clipscore-model", metavar="DIR", help="Local CLIP folder (CLIPModel + CLIPProcessor) for clipscore.")
@click.option("--teacher-predictions", type=click.Path(dir_okay=False, path_type=Path), help="A teacher's predictions: references of teacher_cider.")
@model_options
@draft_options
@click.option("--latency-batch-sizes", default="1,8", show_default=True, help="Batch sizes to time (latency p50/p95 per caption).")
@click.option("--latency-repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed calls per batch size.")
@click.option("--latency-warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed calls per batch size.")
@click.option("--no-latency", is_flag=True, help="Do not time latency.")
@click.option("--no-gflops", is_flag=True, help="Do not count GFLOPs.")
@click.option("--gflops-new-tokens", type=click.IntRange(min=1), default=20, show_default=True, help="Generated tokens the GFLOPs figure assumes.")
@click.pass_obj
def eval_command(obj, model, data_path, data_format, task, images, limit, skip_invalid, predictions, references, out, metrics,
                 label, save_predictions, bertscore_model, bertscore_layers, clipscore_model, teacher_predictions, prompt,
                 num_beams, max_new_tokens, min_new_tokens, batch_size, device, dtype, draft, num_draft_tokens, draft_variant,
                 draft_confidence, no_draft, latency_batch_sizes, latency_repeats, latency_warmup, no_latency, no_gflops, gflops_new_tokens):
    """Score MODEL_OR_ONNX_DIR on --data, or score --predictions against --references / --data.

    Writes an evaluation record (metrics on the 0-100 scale, characteristics, decoding settings)
    that `compress gate` reads. Exit 2 on bad input (nothing written). With --references, --limit N
    scores the predicted ids of `compress predict --limit N` (the notes count the references left out).
    """
    from compressor.evaluation import check_data_for_metrics, check_metric_requirements, resolve_metrics
    from compressor.recipe.schema import CharacteristicsSpec, LatencySpec

    out = check_out(out, (".json",))
    metric_list = [m.strip() for m in metrics.split(",") if m.strip()] if metrics is not None else None
    if model is not None and predictions is not None:
        raise UserInputError("give MODEL_OR_ONNX_DIR (to caption --data) or --predictions (to score a file), not both")
    if model is None and predictions is None:
        raise UserInputError("give MODEL_OR_ONNX_DIR with --data, or --predictions with --references (or --data)")
    if predictions is not None and (draft or num_draft_tokens or draft_variant or draft_confidence):
        raise UserInputError("--draft options go with MODEL_OR_ONNX_DIR: scoring --predictions runs no model")
    if save_predictions is not None:
        check_out(save_predictions, (".json",), "--save-predictions")
    teacher = None
    if teacher_predictions is not None:
        from eval.predictions import load_predictions

        teacher = load_predictions(teacher_predictions)
    if predictions is not None:
        record = _score_files(predictions, references, data_path, data_format, task, images, limit, skip_invalid,
                              metric_list, bertscore_model, bertscore_layers, clipscore_model, teacher)
        record = {"label": label or predictions.stem, **record}
        _finish(obj, out, record)
        return
    if references is not None:
        raise UserInputError("--references goes with --predictions; with a model, give the data (and references) as --data")
    if not data_path:
        raise UserInputError("--data PATH is needed to evaluate a model (a COCO captions file, karpathy JSON, csv or folder)")
    lat = None if no_latency else LatencySpec(
        batch_sizes=_csv_ints(latency_batch_sizes, "--latency-batch-sizes"), warmup=latency_warmup, repeats=latency_repeats
    )
    spec = CharacteristicsSpec(latency=lat, gflops=not no_gflops, gflops_new_tokens=gflops_new_tokens)
    data = load_data(data_path, data_format, task, images, limit, skip_invalid)
    names = resolve_metrics(metric_list, data.task)
    check_data_for_metrics(names, data)
    check_metric_requirements(
        names, data.task, bertscore_model=bertscore_model, clipscore_model=clipscore_model,
        teacher=teacher is not None, teacher_option="--teacher-predictions FILE",
    )
    overrides = dict(prompt=prompt, num_beams=num_beams, max_new_tokens=max_new_tokens,
                     min_new_tokens=min_new_tokens, batch_size=batch_size)
    drafting = dict(draft=draft, num_draft_tokens=num_draft_tokens, draft_variant=draft_variant,
                    draft_confidence=draft_confidence, no_draft=no_draft)
    tgt = load_target(model, overrides, device, dtype, drafting)
    from compressor.evaluation import EvalOptions, evaluate
    from eval.captioning import CaptionScorer

    options = EvalOptions(bertscore_model=bertscore_model, bertscore_layers=bertscore_layers,
                          clipscore_model=clipscore_model, teacher_predictions=teacher)
    with CaptionScorer() as scorer:
        record, preds = evaluate(
            tgt, data, metrics=names, options=options, scorer=scorer, spec=spec,
            params_trainable=trainable_from_run(tgt.folder) if tgt.model is not None else None,
            progress=not (obj.quiet or obj.json),
        )
    record["decoding"]["settings_from"] = tgt.settings_from
    record = {"label": label or tgt.folder.name, "model": str(tgt.folder), **record}
    record["data"] = {"path": str(Path(data_path).resolve()), **record["data"]}
    if save_predictions is not None:
        from compressor.evaluation import write_predictions

        write_predictions(save_predictions, preds, data.task)
    _finish(obj, out, record)


def _score_files(predictions, references, data_path, data_format, task, images, limit, skip_invalid, metric_list,
                 bertscore_model, bertscore_layers, clipscore_model, teacher) -> dict[str, Any]:
    """Score a predictions file against references or data; returns the record (no label)."""
    from compressor.evaluation import (
        EvalOptions,
        check_data_for_metrics,
        check_metric_requirements,
        resolve_metrics,
    )
    from compressor.evaluation.model_metrics import MetricJob, compute_model_metrics, model_metric_keys
    from eval.metrics import lookup
    from eval.predictions import load_predictions, load_references

    if (references is None) == (data_path is None):
        raise UserInputError("--predictions needs exactly one of --references FILE or --data PATH")
    data = refs = None
    if data_path is not None:
        data = load_data(data_path, data_format, task, images, limit, skip_invalid)
        task = data.task
    else:
        refs = load_references(references)
        task = task or _detect_task(predictions, references)
    if predictions.suffix.lower() == ".csv":
        if data is None:
            raise UserInputError(f"{predictions} is an answers CSV (image_name,question,answer): score it with --data, which holds the question ids")
        preds = _answers_csv_to_ids(predictions, data)
    else:
        preds = load_predictions(predictions)
    left_out: list[str] = []
    if data is None:
        refs, left_out = _predicted_references(preds, refs, limit, references)
    names = resolve_metrics(metric_list, task)
    if data is not None:
        check_data_for_metrics(names, data)
    needs_model = [m for m in names if "pytorch" in lookup(m).needs or ("images" in lookup(m).needs and data is None)]
    if needs_model:
        raise UserInputError(
            f"{', '.join(needs_model)} need{'s' if len(needs_model) == 1 else ''} the model (perplexity) or the images "
            "(clipscore): use `compress eval MODEL --data PATH`, or --data instead of --references for clipscore"
        )
    check_metric_requirements(names, task, bertscore_model=bertscore_model, clipscore_model=clipscore_model,
                              teacher=teacher is not None, teacher_option="--teacher-predictions FILE")
    from compressor.evaluation import score_predictions
    from eval.captioning import CaptionScorer

    values: dict[str, Any] = {}
    notes: list[str] = list(left_out)
    with CaptionScorer() as scorer:
        plain = [m for m in names if m not in model_metric_keys()]
        if data is not None:
            refs = data.references()
        if not plain:
            from eval.predictions import match_ids

            match_ids(preds, refs)  # lists ids that do not match
        elif data is not None:
            scored = score_predictions(preds, data, plain, scorer)
            values.update(scored["metrics"])
            notes += scored["notes"]
        else:
            values.update(_score_against(preds, refs, plain, task, scorer, notes))
        options = EvalOptions(bertscore_model=bertscore_model, bertscore_layers=bertscore_layers,
                              clipscore_model=clipscore_model, teacher_predictions=teacher)
        job = MetricJob(preds, task, options, data=data, references=refs, scorer=scorer, notes=notes)
        values.update(compute_model_metrics(job, names))
    source = {"predictions": str(predictions.resolve())}
    if references is not None:
        source["references"] = str(Path(references).resolve())
    else:
        source["data"] = str(Path(data_path).resolve())
    return {
        "task": task,
        "metrics": values,
        "characteristics": {},
        "source": source,
        "data": {"examples": len(preds), **({"fingerprint": data.fingerprint} if data is not None else {})},
        "notes": notes + ["scored from a predictions file: no model, so no characteristics"],
    }


def _predicted_references(preds, refs, limit, references) -> tuple[dict, list[str]]:
    """The references to score ``preds`` against with ``--references`` (and ``--limit``).

    ``compress predict --limit N`` captions the first N examples; their references file holds every
    id. With ``--limit``, the predicted ids are scored (what pycocoevalcap does: it scores the
    results' images) and the note says how many references were left out; without it, that
    mismatch is refused (exit 2) with the fix.

    Returns:
        ``(references, notes)``.

    Raises:
        UserInputError: references hold ids without predictions and ``--limit`` is not given.
    """
    pred_ids = {str(k) for k in preds}
    ref_ids = {str(k) for k in refs}
    missing = ref_ids - pred_ids
    if not missing or not pred_ids <= ref_ids:
        return refs, []  # equal, or predictions without references: scoring lists those ids
    if limit is None:
        raise UserInputError(
            f"{references}: {len(missing)} ids in references have no prediction ({len(pred_ids)} predicted). "
            f"To score only the predicted ones (after `compress predict --limit {len(pred_ids)}`), add "
            f"--limit {len(pred_ids)}, or score against --data with the same --limit"
        )
    if len(pred_ids) > limit:
        raise UserInputError(
            f"--limit {limit}: the predictions file holds {len(pred_ids)} predictions; raise --limit to {len(pred_ids)}"
        )
    kept = {k: v for k, v in refs.items() if str(k) in pred_ids}
    return kept, [f"--limit {limit}: scored the {len(kept)} predicted ids; {len(missing)} references without a prediction left out"]


def _score_against(preds, refs, metrics, task, scorer, notes) -> dict[str, float]:
    if task == "caption":
        res = scorer.score(preds, refs, metrics)
        notes += list(res.notes)
        return dict(res.metrics)
    from eval.vqa import vqa_accuracy

    out = {}
    if "vqa_accuracy" in metrics:
        out["vqa_accuracy"] = vqa_accuracy(preds, refs)
    rest = [m for m in metrics if m != "vqa_accuracy"]
    if rest:
        notes.append(f"{', '.join(rest)} skipped: with --references only vqa_accuracy is computed (MME needs --data)")
    return out


def _detect_task(predictions: Path, references: Path) -> str:
    """``vqa`` when either file is in a VQA layout (question_id), else ``caption``."""
    for path in (predictions, references):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows = data if isinstance(data, list) else data.get("annotations") if isinstance(data, dict) else None
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "question_id" in rows[0]:
            return "vqa"
    return "caption"


def _answers_csv_to_ids(path: Path, data) -> dict[str, str]:
    """Map the rows of an answers CSV to the data's question ids by (image name, question)."""
    from compressor.evaluation import image_name
    from eval.predictions import load_answers_csv

    if data.task != "vqa":
        raise UserInputError(f"{path} is an answers CSV, but --data holds captions (task caption)")
    slots: dict[tuple[str, str], list[str]] = {}
    for ex in data.examples:
        for name in dict.fromkeys((image_name(ex), Path(ex.image_path).name if ex.image_path else ex.image_id)):
            slots.setdefault((name, ex.question.strip()), []).append(ex.question_id)
    out: dict[str, str] = {}
    unknown: list[str] = []
    for n, (name, question, answer) in enumerate(load_answers_csv(path), start=2):
        queue = slots.get((name, question.strip()))
        qid = next((q for q in queue or [] if q not in out), None)
        if qid is None:
            unknown.append(f"line {n}: ({name}, {question!r}) is not a question of --data")
            continue
        out[qid] = answer
    if unknown:
        raise DataError(f"{path}: {len(unknown)} rows match no question of the data:", unknown)
    return out


def _finish(obj, out: Path, record: dict) -> None:
    from compressor.evaluation import finite
    from compressor.fileio import atomic_write_json
    from eval.reports import comparison_text

    record = finite(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)
    if obj.json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    label = record["label"]
    click.echo(comparison_text([label], {label: record}), nl=False)
    dec = record.get("decoding")
    if dec:
        click.echo("decoding: " + ", ".join(f"{k}={dec[k]}" for k in ("backend", "num_beams", "max_new_tokens", "min_new_tokens", "prompt", "batch_size", "device", "dtype") if k in dec))
    spec = (dec or {}).get("speculative")
    if spec:
        ch = record.get("characteristics", {})
        click.echo(f"speculative decoding: draft {spec['draft']}, {spec['num_draft_tokens']} tokens per call; "
                   f"acceptance {ch.get('spec_acceptance')}, {ch.get('spec_tokens_per_call')} tokens per target call")
    for note in record.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(f"wrote {out}")
