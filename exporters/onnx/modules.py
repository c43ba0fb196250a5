"""The split graphs run as PyTorch modules: the ONNX Runtime captioner's decoding loops over a loaded model.

:func:`module_captioner` gives an :class:`~exporters.onnx.captioner.OnnxCaptioner` whose "sessions"
are the export's own graph wrappers (:func:`exporters.onnx.topologies.export_plan`: the family's
image path, the token embedding, the decoder with past) called in PyTorch, so every loop of the
ONNX captioner (greedy, beam search, speculative decoding, :mod:`exporters.onnx.speculative`)
runs unchanged over a PyTorch model. The wrappers compute what ``generate`` computes (the export
validates them against it), which is why speculative captions of a PyTorch model can be compared
token for token with its own ``generate``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from compressor.errors import ModelSpecError
from exporters.onnx.passes import NUM_LOGITS

log = logging.getLogger(__name__)


class TorchSession:
    """A graph's PyTorch module behind ONNX Runtime's ``session.run(None, feed)``.

    Args:
        module: the wrapper (``module(*inputs)`` → outputs in the spec's order).
        spec: its :class:`~exporters.onnx.graphs.GraphSpec` (input names, in order).
        device: where the module's weights are.
        dtype: the module's floating dtype (floating inputs are cast to it; outputs come back
            as float32 numpy arrays).
    """

    def __init__(self, module, spec, device, dtype):
        self.module, self.spec, self.device, self.dtype = module, spec, device, dtype

    def run(self, output_names, feed: dict) -> list:
        import numpy as np
        import torch

        args = []
        for t in self.spec.inputs:
            a = torch.from_numpy(np.ascontiguousarray(feed[t.name])).to(self.device)
            args.append(a.to(self.dtype) if a.is_floating_point() else a)
        kw = {"num_logits": int(feed[NUM_LOGITS][0])} if NUM_LOGITS in feed else {}
        with torch.inference_mode():
            out = self.module(*args, **kw)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [(o.float() if o.is_floating_point() else o).cpu().numpy() for o in out]


def module_captioner(model, processor, generation=None, scoring: bool = False, source: str = "<PyTorch model>"):
    """An :class:`~exporters.onnx.captioner.OnnxCaptioner` over ``model``'s graph wrappers, in PyTorch.

    Args:
        model: a model of a registered family (a peft model: its base model, adapters active), in
            eval mode, on any device.
        processor: its processor.
        generation: decoding settings (None: the captioner's defaults).
        scoring: the decoder's scoring form (every new position's logits; speculative targets).
        source: how messages name the model (its folder).

    Returns:
        The captioner (``settings["backend"]`` is ``torch``).

    Raises:
        ModelSpecError: not a model of a registered family, or ``scoring`` on a topology without it.
    """
    import numpy as np

    from compressor.evaluation.captioner import generate_kwargs
    from compressor.families import family_for_model
    from exporters.onnx.captioner import DEFAULT_GENERATION, OnnxCaptioner
    from exporters.onnx.topologies import export_plan, topology

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_for_model(base)
    plan = export_plan(base)
    topo = topology(family.onnx_topology)
    param = next(base.parameters())
    cap = OnnxCaptioner.__new__(OnnxCaptioner)
    cap.dir = source
    cap.generation = generation if generation is not None else SimpleNamespace(**DEFAULT_GENERATION)
    cap.kwargs = generate_kwargs(cap.generation)
    cap.providers = []
    cap.dtype = str(param.dtype).replace("torch.", "")
    cap.np_dtype = np.float32
    cap.kind = plan.kind
    cap.topology = topo
    cap.variant = "torch"
    cap.meta = {
        "kind": plan.kind,
        "dtype": cap.dtype,
        **plan.meta,
        "token_ids": family.token_ids(base, processor),
        "graphs": {g.spec.name: {"signature": g.spec.signature()} for g in plan.graphs},
    }
    cap.scoring_graph = None
    if scoring:
        if not getattr(topo, "SPECULATIVE", False):
            raise ModelSpecError(f"{source}: speculative decoding runs decoder-only models; this is {family.describe_model()}")
        cap.scoring_graph = topo.DECODER
    sessions: dict[str, Any] = {}
    for g in plan.graphs:
        module = topo.scoring_module(plan) if g.spec.name == cap.scoring_graph else g.module
        sessions[g.spec.name] = TorchSession(module, g.spec, param.device, param.dtype)
    cap.sessions = sessions
    cap.graph_files = {}
    cap.config = base.config
    cap.family = family
    cap.processor = processor
    ids = cap.meta["token_ids"]
    cap.eos = [int(e) for e in ids["eos_token_id"]]
    pad = ids.get("pad_token_id")
    cap.pad = int(pad) if pad is not None else (cap.eos[0] if cap.eos else 0)
    cap.settings = {
        "backend": "torch",
        "device": str(param.device.type),
        "dtype": cap.dtype,
        "batch_size": cap.generation.batch_size,
        **{k: v for k, v in cap.kwargs.items() if k != "do_sample"},
        "prompt": cap.generation.prompt,
    }
    return cap
