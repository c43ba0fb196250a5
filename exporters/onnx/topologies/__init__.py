"""ONNX topologies: how a model is cut into graphs, sampled for validation, and run by the captioner.

A family names its topology (``Family.onnx_topology``) and supplies the model-specific pieces
(``Family.onnx_graph_parts(model)``: the image graph's wrapper and inputs, the language model or
its wrappers, facts for ``export.json``); the topology module turns them into the plan. Everything
else (orchestration, validation, the captioner) calls a topology only through this interface:

``NAME``
    the ``Family.onnx_topology`` value.
``KIND``
    ``export.json``'s ``kind`` (how the captioner finds the topology of a folder).
``Parts``
    the dataclass a family's ``onnx_graph_parts`` returns for this topology.
``INT8_GRAPH``
    the graph ``quantize: int8`` applies to (the autoregressive decoder).
``SINGLE_THREAD_GRAPHS``
    graphs the captioner runs with one intra-op thread (a Gather is not worth a pool).
``build_plan(parts) -> ExportPlan``
    the graphs (wrappers + specs) in export order, and the facts for ``export.json``.
``sample_cases(plan, ctx) -> {graph: [(case, inputs)]}``
    validation and tracing inputs (:class:`~exporters.onnx.samples.SampleContext`).
``prefill(cap, inputs) -> (logits, state, prompt_ids)`` and ``step(cap, tokens, state) -> (logits, state)``
    the captioner's first forward and one decode step (:class:`~exporters.onnx.captioner.OnnxCaptioner`).

Topologies (``export.json`` kind, graphs):

* ``decoder_only`` (``causal``): ``image_encoder`` (the family's image path), ``embed_tokens``,
  ``decoder`` (one graph for prefill and decode: past length 0 on the first call).
* ``encoder_decoder`` (``seq2seq``): ``image_encoder``, ``embed_tokens``, ``encoder`` (also every
  decoder layer's cross-attention K/V, computed once per image), ``decoder``.
* ``blip`` (``blip``): ``vision_encoder`` (ViT + every text-decoder layer's cross K/V),
  ``text_decoder`` (ids, self-attention past + cross K/V).

Adding a topology is one module here plus one line in :data:`TOPOLOGIES`.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from compressor.errors import ModelSpecError

log = logging.getLogger(__name__)

#: Registered topologies: ``Family.onnx_topology`` → module.
TOPOLOGIES: dict[str, str] = {
    "decoder_only": "exporters.onnx.topologies.decoder_only",
    "encoder_decoder": "exporters.onnx.topologies.encoder_decoder",
    "blip": "exporters.onnx.topologies.blip",
}


def topology(name: str) -> ModuleType:
    """The topology module registered as ``name``.

    Raises:
        ModelSpecError: no such topology (names the registered ones).
    """
    if name not in TOPOLOGIES:
        raise ModelSpecError(f"ONNX topology '{name}' is not one of {', '.join(TOPOLOGIES)}")
    return importlib.import_module(TOPOLOGIES[name])


def by_kind(kind: str) -> ModuleType:
    """The topology whose ``export.json`` kind is ``kind`` (``causal``, ``seq2seq``, ``blip``).

    Raises:
        ModelSpecError: an export of a kind no registered topology writes.
    """
    for name in TOPOLOGIES:
        mod = topology(name)
        if mod.KIND == kind:
            return mod
    raise ModelSpecError(f"export.json kind '{kind}' is not one this version runs ({', '.join(kinds())})")


def kinds() -> list[str]:
    """Every registered topology's ``export.json`` kind."""
    return [topology(n).KIND for n in TOPOLOGIES]


def export_plan(model):
    """The graphs (wrappers + specs) of a loaded model, from its family's parts and topology.

    Args:
        model: a model of a registered family (no peft wrapper), in eval mode.

    Returns:
        An :class:`~exporters.onnx.graphs.ExportPlan` whose wrappers are in eval mode.

    Raises:
        ModelSpecError: not a model of a registered family, or its parts are not what its
            topology takes.
    """
    from compressor.families import family_for_model

    family = family_for_model(model)
    topo = topology(family.onnx_topology)
    parts = family.onnx_graph_parts(model)
    if not isinstance(parts, topo.Parts):
        raise ModelSpecError(
            f"{family.describe_model()}: its ONNX parts are a {type(parts).__name__}, but its topology "
            f"'{topo.NAME}' takes {topo.Parts.__module__}.Parts"
        )
    plan = topo.build_plan(parts)
    # wrappers must be in eval mode too: torch.onnx.export restores the wrapper's own mode
    # recursively after exporting, which would switch the model's dropout on (train mode)
    for g in plan.graphs:
        g.module.eval()
    return plan
