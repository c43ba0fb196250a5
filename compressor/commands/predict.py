"""``compress predict``: captions for unlabelled data, or answers for VQA, from a model folder or an ONNX export.

``compress predict MODEL_OR_ONNX_DIR --data PATH [--data-format F] [--limit N] --out preds.json|answers.csv``

Output by the extension of ``--out``:

* ``.json``: a COCO results list ``[{"image_id", "caption"}]`` (what the COCO caption evaluation
  server takes; integer ids when every id is an integer), or for VQA a results list
  ``[{"question_id", "answer"}]``;
* ``.csv``: for VQA ``image_name,question,answer`` (one row per question), for captions
  ``image_name,caption``.

``compress eval --predictions`` reads either output as is. The data need no references.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from compressor.commands.targets import (
    check_out,
    data_options,
    draft_options,
    load_data,
    load_target,
    model_options,
)

log = logging.getLogger(__name__)


@click.command("predict")
@click.argument("model", metavar="MODEL_OR_ONNX_DIR")
@data_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="preds.json (COCO results list) or answers.csv.")
@model_options
@draft_options
@click.pass_obj
def predict_command(obj, model, data_path, data_format, task, images, limit, skip_invalid, out, prompt, num_beams,
                    max_new_tokens, min_new_tokens, batch_size, device, dtype, draft, num_draft_tokens, draft_variant, draft_confidence,
                    no_draft):
    """Write captions (a COCO results list) or VQA answers (a CSV) for --data. Exit 2 on bad input."""
    from compressor.errors import UserInputError
    from compressor.evaluation import answers_rows, caption_rows, predict, prompt_fn, write_predictions
    from eval.predictions import write_answers_csv, write_captions_csv

    out = check_out(out, (".json", ".csv"))
    if not data_path:
        raise UserInputError("--data PATH is needed: the images (and questions) to predict for")
    data = load_data(data_path, data_format, task, images, limit, skip_invalid)
    overrides = dict(prompt=prompt, num_beams=num_beams, max_new_tokens=max_new_tokens,
                     min_new_tokens=min_new_tokens, batch_size=batch_size)
    drafting = dict(draft=draft, num_draft_tokens=num_draft_tokens, draft_variant=draft_variant,
                    draft_confidence=draft_confidence, no_draft=no_draft)
    tgt = load_target(model, overrides, device, dtype, drafting)
    gen = tgt.generation
    preds = predict(tgt.captioner, data, data.task, prompt_fn(gen), gen.batch_size, not (obj.quiet or obj.json))
    if out.suffix.lower() == ".csv":
        if data.task == "vqa":
            write_answers_csv(out, answers_rows(data.examples, preds))
        else:
            write_captions_csv(out, caption_rows(data.examples, preds))
    else:
        write_predictions(out, preds, data.task)
    summary = {"out": str(out), "predictions": len(preds), "skipped": len(data.skipped), "task": data.task,
               "decoding": {**tgt.captioner.settings, "settings_from": tgt.settings_from}}
    stats = getattr(tgt.captioner, "stats", None)
    if stats is not None:
        summary["speculative"] = stats.record()
    if obj.json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        skipped = f" ({len(data.skipped)} invalid row(s) skipped)" if data.skipped else ""
        click.echo(f"wrote {len(preds)} {'answers' if data.task == 'vqa' else 'captions'} to {out}{skipped}")
