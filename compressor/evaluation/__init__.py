"""Caption generation and evaluation glue: one home for what turns a model into an ``eval.json`` record.

Modules:

* :mod:`~compressor.evaluation.captioner`: the ``Captioner`` protocol (images + prompts in,
  captions out), its PyTorch implementation ``TorchCaptioner`` and ``generate_kwargs`` (the
  ONNX Runtime implementation is ``exporters.onnx.OnnxCaptioner``);
* :mod:`~compressor.evaluation.target`: ``EvalTarget`` (a captioner plus, where there is one,
  its PyTorch model, its folder, an ONNX export's PyTorch source) and ``EvalOptions`` (settings of
  the model-based metrics);
* :mod:`~compressor.evaluation.harness`: ``predict``, ``score_predictions``, ``score_model`` and
  ``evaluate``, the entry point both the ``evaluate`` stage and ``compress eval`` call;
* :mod:`~compressor.evaluation.model_metrics`: metric names and requirements checked up front,
  and perplexity, BERTScore, CLIPScore and CIDEr against a teacher;
* :mod:`~compressor.evaluation.characteristics`: parameters, GFLOPs, latency and size of a
  PyTorch model or an ONNX export;
* :mod:`~compressor.evaluation.outputs`: prediction keys, result files, CSV rows, JSON-ready records.

The metric table (keys, direction, kind, needs, who computes each) and the measurement
primitives live in ``eval`` (``eval.metrics``, ``eval.characteristics``); this package is the
glue between them and the models.
"""

from compressor.evaluation.captioner import Captioner, TorchCaptioner, generate_kwargs, prompt_fn
from compressor.evaluation.characteristics import busy_machine_note, variant_files
from compressor.evaluation.harness import evaluate, predict, score_model, score_predictions
from compressor.evaluation.model_metrics import (
    check_data_for_metrics,
    check_metric_requirements,
    perplexity,
    resolve_metrics,
    teacher_cider,
)
from compressor.evaluation.outputs import (
    answers_rows,
    caption_rows,
    example_key,
    finite,
    image_name,
    write_predictions,
)
from compressor.evaluation.target import EvalOptions, EvalTarget

__all__ = [
    "Captioner",
    "EvalOptions",
    "EvalTarget",
    "TorchCaptioner",
    "answers_rows",
    "busy_machine_note",
    "caption_rows",
    "check_data_for_metrics",
    "check_metric_requirements",
    "evaluate",
    "example_key",
    "finite",
    "generate_kwargs",
    "image_name",
    "perplexity",
    "predict",
    "prompt_fn",
    "resolve_metrics",
    "score_model",
    "score_predictions",
    "teacher_cider",
    "variant_files",
    "write_predictions",
]
