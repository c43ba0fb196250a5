"""Split ONNX export of vision-language models, verified against PyTorch, and its ONNX Runtime captioner.

optimum cannot export BLIP, BLIP-2 or InstructBLIP, and its exporter pins transformers < 4.58
(README, "Why not optimum"); the graphs are cut by hand, per topology
(:mod:`exporters.onnx.topologies`: decoder-only, encoder-decoder, BLIP), from the wrappers each
family supplies (``Family.onnx_graph_parts``), and exported with ``torch.onnx.export`` (the
dynamo exporter by default: it is the one that keeps bf16 weights and survives real sizes,
stack-facts §5 and §10; the legacy TorchScript exporter is faster on tiny models).

The output folder::

    export.json         family, kind, dtype, token ids, the topology's facts, graph signatures and
                        files, characteristics (params_*), the decoding defaults
    validation.json     per graph and variant: cases, per-output max |ORT − PyTorch| on valid
                        positions, tolerance, what was checked (numbers / signature / fp32 twin)
    <graph>.onnx        one file per graph (+ <graph>.onnx.data above 2 GB)
    <graph>.opt.onnx    ONNX Runtime's ORT_ENABLE_ALL-optimised copy (optimize: true)
    decoder.int8.onnx   dynamic int8 quantisation of the decoder (quantize: int8)
    processor files     the tokenizer and image processor (so the folder captions alone)
    SHA256SUMS          every file's SHA-256 (a corrupted file is found before it is run)

Modules: :mod:`~exporters.onnx.export` (orchestration, publishing), :mod:`~exporters.onnx.graphs`
(graphs as data, export and check of one graph), :mod:`~exporters.onnx.samples` (validation
inputs), :mod:`~exporters.onnx.patches` (export-time swaps), :mod:`~exporters.onnx.runtime`
(sessions, optimisation, int8), :mod:`~exporters.onnx.validation`, :mod:`~exporters.onnx.metadata`
(export.json), :mod:`~exporters.onnx.captioner` (greedy and beam search under ONNX Runtime),
:mod:`~exporters.onnx.isolated` (one graph per subprocess), :mod:`~exporters.onnx.passes`
(graph passes after export).
"""

from __future__ import annotations

from exporters.onnx.captioner import DEFAULT_GENERATION, OnnxCaptioner
from exporters.onnx.errors import ExportWriteError, OnnxValidationError
from exporters.onnx.export import (
    export_checked_graph,
    export_model_onnx,
    export_onnx,
    merge_graph_results,
    publish_export,
    replace_dir,
    should_isolate,
    validate_export,
)
from exporters.onnx.graphs import ExportPlan, GraphDef, GraphSpec, ImageGraph, TensorSpec
from exporters.onnx.metadata import (
    EXPORT_JSON,
    FORMAT_VERSION,
    VALIDATION_JSON,
    is_onnx_dir,
    read_export_json,
    verify_onnx_dir,
)
from exporters.onnx.options import DYNAMO_OPSET, ISOLATE_ABOVE_BYTES, OnnxOptions
from exporters.onnx.runtime import make_session, providers_for
from exporters.onnx.samples import sample_cases
from exporters.onnx.topologies import export_plan

__all__ = [
    "DEFAULT_GENERATION",
    "DYNAMO_OPSET",
    "EXPORT_JSON",
    "FORMAT_VERSION",
    "ISOLATE_ABOVE_BYTES",
    "VALIDATION_JSON",
    "ExportPlan",
    "ExportWriteError",
    "GraphDef",
    "GraphSpec",
    "ImageGraph",
    "OnnxCaptioner",
    "OnnxOptions",
    "OnnxValidationError",
    "TensorSpec",
    "export_checked_graph",
    "export_model_onnx",
    "export_onnx",
    "export_plan",
    "is_onnx_dir",
    "make_session",
    "merge_graph_results",
    "providers_for",
    "publish_export",
    "read_export_json",
    "replace_dir",
    "sample_cases",
    "should_isolate",
    "validate_export",
    "verify_onnx_dir",
]
