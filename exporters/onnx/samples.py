"""Sample inputs for tracing and validation: batch > 1, padding, past length 0 and > 0.

:func:`sample_cases` gives ``{graph: [(case, [tensor per input]), …]}``; each topology writes its
own cases (:mod:`exporters.onnx.topologies`) with the tools of a :class:`SampleContext`: one
seeded generator from which every random tensor is drawn in order, the graphs' PyTorch modules
(or, dry, random outputs of the declared shapes), and empty KV caches.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class SampleContext:
    """What a topology's sample-case generator draws from.

    Args:
        plan: the :class:`~exporters.onnx.graphs.ExportPlan`.
        dtype: the model's torch dtype (past tensors and dry outputs).
        batch: rows per case (3: no padding, padding between image and text, left padding).
        seed: the generator's seed.
        dry: run no graph: outputs feeding later cases (image features, past) are random tensors
            of the declared shapes.
    """

    def __init__(self, plan, dtype, batch: int = 3, seed: int = 0, dry: bool = False):
        import torch

        self.plan, self.dtype, self.batch, self.dry = plan, dtype, batch, dry
        self.gen = torch.Generator().manual_seed(seed)
        self.meta = plan.meta
        self.vocab = int(plan.meta["vocab_size"])

    def ids(self, b: int, n: int, hi: int | None = None):
        """``(b, n)`` int64 token ids in ``[4, hi)`` (default: the vocabulary), past the special ids."""
        import torch

        return torch.randint(4, max(5, self.vocab if hi is None else hi), (b, n), generator=self.gen)

    def inputs_of(self, graph: str) -> list:
        """The family's sample inputs of ``graph`` for the batch (``GraphDef.sample``)."""
        return self.plan.graph(graph).sample(self.batch, self.gen)

    def batch_cases(self, inputs: list) -> list[tuple[str, list]]:
        """``batch_1`` (the first row) and ``batch_<n>`` cases of a graph without past."""
        return [("batch_1", [t[:1] for t in inputs]), (f"batch_{self.batch}", inputs)]

    def run(self, graph: str, inputs: list) -> tuple:
        """The graph's outputs on ``inputs`` (dry: random tensors of the declared shapes)."""
        import torch

        if self.dry:
            return shaped_outputs(self.plan.graph(graph).spec, inputs, self.dtype, self.gen)
        with torch.no_grad():
            out = self.plan.graph(graph).module(*inputs)
        return out if isinstance(out, tuple) else (out,)

    def module(self, graph: str, *inputs):
        """``graph``'s PyTorch module on ``inputs`` without gradients (also when dry)."""
        import torch

        with torch.no_grad():
            return self.plan.graph(graph).module(*inputs)

    def empty_past(self) -> list:
        """``2 × num_layers`` empty key/value tensors ``(batch, kv_heads, 0, head_dim)``."""
        import torch

        from exporters.onnx.graphs import layer_kv_heads

        m = self.meta
        return [torch.zeros((self.batch, h, 0, m["head_dim"]), dtype=self.dtype) for h in layer_kv_heads(m) for _ in "kv"]


def sample_cases(plan, model, batch: int = 3, seed: int = 0, dry: bool = False) -> dict[str, list[tuple[str, list]]]:
    """Sample inputs per graph: ``{graph: [(case, [tensor per input]), …]}``.

    The decoders are fed through a prefill (past 0) then decode steps (past > 0), with the
    presents of the previous step as past, so the cases look like generation: batch 3, rows
    with no padding, with padding between the image tokens and the text (the processor's
    layout), and with left padding. The LAST case of each graph is the one traced by the
    exporter (past > 0, more than one current token, padding present: no size 0 or 1 to
    specialise on, stack-facts §5).

    With ``dry=True`` no graph is run: outputs feeding later cases (image features, past) are
    random tensors of the declared shapes. That is enough to trace an export that ONNX Runtime
    cannot check anyway (bf16 on CPU), and avoids minutes of bf16 CPU compute at real size.

    Args:
        plan: the model's :class:`~exporters.onnx.graphs.ExportPlan`.
        model: the model (its dtype).
        batch: rows per case.
        seed: the generator's seed.
        dry: see above.
    """
    from exporters.onnx.topologies import by_kind

    ctx = SampleContext(plan, next(model.parameters()).dtype, batch, seed, dry)
    return by_kind(plan.kind).sample_cases(plan, ctx)


def shaped_outputs(spec, inputs: list, dtype, gen) -> tuple:
    """Random outputs of the shapes ``spec`` declares for these inputs (symbols read from the inputs)."""
    import torch

    sym: dict[str, Any] = {}
    for t, x in zip(spec.inputs, inputs):
        for d, n in zip(t.dims, x.shape):
            if isinstance(d, str):
                sym.setdefault(d, int(n))
    if "total" not in sym and "past" in sym and "seq" in sym:
        sym["total"] = sym["past"] + sym["seq"]
    out = []
    for t in spec.outputs:
        shape = [sym[d] if isinstance(d, str) else int(d) for d in t.dims]
        dt = torch.float32 if t.dtype == "float32" else (torch.int64 if t.dtype == "int64" else dtype)
        out.append(torch.randn(shape, generator=gen).to(dt))
    return tuple(out)
