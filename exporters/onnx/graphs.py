"""Graphs declared as data (optimum's ``OnnxConfig`` idea), and the export and check of one graph.

Every graph is a small ``torch.nn.Module`` around the loaded transformers model plus a
:class:`GraphSpec` (input/output names, symbolic axes, which positions are valid for comparison,
tolerance). A topology (:mod:`exporters.onnx.topologies`) builds the :class:`ExportPlan` of a model
from the parts its family supplies; :func:`export_graph` exports one graph with ``torch.onnx``
(dynamo or legacy TorchScript), runs ``onnx.checker`` and checks the written signature against the
spec. Floating inputs and outputs other than ``pixel_values`` and ``logits`` (always float32) are
in the export dtype (``dtype="model"``).

The helpers below (:func:`past_names`, :func:`kv_specs`, :func:`generation_position_ids`,
:func:`cross_kv`, :func:`cross_cache`) are shared by the wrappers of every topology and family.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import UserInputError, VerificationError
from exporters.onnx import patches
from exporters.onnx.options import TWO_GB
from exporters.onnx.runtime import onnx_bytes

log = logging.getLogger(__name__)

#: Default max |ORT − PyTorch| per graph for an fp32 export (issue 5: at most 1e-4).
FP32_TOLERANCE = 1e-4
#: fp16 exports are checked against the fp16 PyTorch model (half-precision rounding).
FP16_TOLERANCE = 2e-2


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: the ONNX name.
        dims: axis names (symbolic, dynamic) or sizes (static), e.g. ``("batch", "seq", 576)``.
        dtype: ``float32``, ``int64``, or ``model`` (the export dtype).
    """

    name: str
    dims: tuple[Any, ...]
    dtype: str = "model"


@dataclass(frozen=True)
class GraphSpec:
    """A graph's signature and comparison rules, as data.

    Attributes:
        name: graph (and file) name, e.g. ``decoder`` → ``decoder.onnx``.
        inputs: inputs, in the wrapper's positional order.
        outputs: outputs, in the wrapper's return order.
        valid: output name → ``(axis, mask input)``: along ``axis``, only positions where the
            mask input is 1 are compared (padded positions are never read by generation, and
            exporters may compute them differently, stack-facts §5).
        tolerance: max |ORT − PyTorch| for an fp32 export.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    valid: dict[str, tuple[int, str]] = field(default_factory=dict)
    tolerance: float = FP32_TOLERANCE

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{name: {axis: label}}`` for every symbolic axis (torch.onnx's ``dynamic_axes``)."""
        out: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            axes = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    def signature(self) -> dict[str, Any]:
        """JSON form written to ``export.json``."""
        return {
            "inputs": [{"name": t.name, "dims": list(t.dims), "dtype": t.dtype} for t in self.inputs],
            "outputs": [{"name": t.name, "dims": list(t.dims), "dtype": t.dtype} for t in self.outputs],
            "tolerance": self.tolerance,
        }


@dataclass
class GraphDef:
    """A graph to export: its spec and the PyTorch module computing exactly its outputs.

    Attributes:
        spec: the signature.
        module: ``module(*inputs)`` returns the outputs in ``spec.outputs`` order.
        sample: for graphs whose inputs the family defines (the image graph): ``sample(batch,
            generator) -> [tensor per input]``, random sample inputs drawn from ``generator``.
    """

    spec: GraphSpec
    module: Any
    sample: Callable[[int, Any], list] | None = None


@dataclass
class ExportPlan:
    """Everything the exporter and the ONNX Runtime captioner need to know about one model.

    Attributes:
        kind: the topology's ``export.json`` kind (``causal``, ``seq2seq`` or ``blip``).
        graphs: in export order.
        meta: JSON-able facts for ``export.json`` (layer counts, KV heads, head size, hidden
            size, image token id, number of image tokens, …).
    """

    kind: str
    graphs: list[GraphDef]
    meta: dict[str, Any]

    def graph(self, name: str) -> GraphDef:
        return next(g for g in self.graphs if g.spec.name == name)

    def only(self, name: str) -> ExportPlan:
        """The same plan with the one graph ``name``."""
        return ExportPlan(self.kind, [self.graph(name)], self.meta)


@dataclass
class ImageGraph:
    """A family's image path, as its topology places it first in the plan.

    Attributes:
        module: the wrapper: ``module(*inputs)`` → the image embeddings (and, for a cross-attending
            decoder, its K/V), in the order the topology declares its outputs.
        inputs: the wrapper's inputs (``pixel_values``, an instruction's ids, a pixel mask …);
            the captioner feeds them by these names from the processor's output.
        sample: ``sample(batch, generator) -> [tensor per input]`` for validation cases.
        num_tokens: image positions per image in the output (query tokens, patches).
    """

    module: Any
    inputs: tuple[TensorSpec, ...]
    sample: Callable[[int, Any], list]
    num_tokens: int


# --------------------------------------------------------------------------------------------
# Helpers of the wrappers (torch imported lazily)
# --------------------------------------------------------------------------------------------


def past_names(prefix: str, layers: int) -> list[str]:
    """``[f"{prefix}.0.key", f"{prefix}.0.value", …]`` (the layout every decoder graph uses)."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def kv_specs(prefix: str, layers: int, heads, head_dim: int, length: str | int) -> tuple[TensorSpec, ...]:
    """Key/value tensors ``(batch, heads, length, head_dim)`` named by :func:`past_names`.

    Args:
        heads: key/value heads, one number for every layer or one per layer (a width-pruned model's
            layers have their own).
    """
    per_layer = [int(heads)] * layers if isinstance(heads, int) else [int(h) for h in heads]
    if len(per_layer) != layers:
        raise ValueError(f"kv_specs: {len(per_layer)} head counts for {layers} layers")
    names = past_names(prefix, layers)
    return tuple(TensorSpec(n, ("batch", per_layer[i // 2], length, head_dim)) for i, n in enumerate(names))


def layer_kv_heads(meta: dict) -> list[int]:
    """Key/value heads of each decoder layer recorded in ``export.json``: ``layer_kv_heads`` (a
    width-pruned model) or ``num_kv_heads`` for every layer."""
    heads = meta.get("layer_kv_heads")
    return [int(h) for h in heads] if heads else [int(meta["num_kv_heads"])] * int(meta["num_layers"])


def kv_heads_meta(heads: list[int]) -> dict:
    """``export.json``'s head facts: ``num_kv_heads`` (the most any layer has) and, when layers
    differ, ``layer_kv_heads`` (one per layer)."""
    out: dict = {"num_kv_heads": max(heads)}
    if len(set(heads)) > 1:
        out["layer_kv_heads"] = list(heads)
    return out


def generation_position_ids(attention_mask, seq_len: int):
    """Position ids of the last ``seq_len`` tokens as ``GenerationMixin`` builds them.

    Follows ``GenerationMixin._prepare_position_ids_for_generation`` of transformers 5.x, so a
    left-padded batch gets the same positions as ``model.generate``.

    Args:
        attention_mask: ``(batch, past + seq)`` of 0/1.
        seq_len: current tokens.

    Returns:
        ``(batch, seq)`` int64: ``cumsum(mask) - 1``, 0 where the mask is 0.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos[:, -seq_len:]


def cross_kv(attn_modules, states, key_attr: str, value_attr: str, head_dim: int) -> list:
    """Every layer's cross-attention key and value of ``states (batch, n, hidden)``, computed once.

    Args:
        attn_modules: one attention module per decoder layer.
        states: the encoder (or image) states.
        key_attr, value_attr: the names of the key and value projections on each module.
        head_dim: per-head width.

    Returns:
        ``[key_0, value_0, key_1, …]``, each ``(batch, heads, n, head_dim)``.
    """
    out = []
    b, n = states.shape[:2]
    for attn in attn_modules:
        k = getattr(attn, key_attr)(states).view(b, n, -1, head_dim).transpose(1, 2)
        v = getattr(attn, value_attr)(states).view(b, n, -1, head_dim).transpose(1, 2)
        out += [k, v]
    return out


def cross_cache(past, layers: int, config=None):
    """An ``EncoderDecoderCache`` from ``past = [self K/V per layer…, cross K/V per layer…]``.

    The cross-attention entries are marked as computed, so the decoder reads them and never
    projects the encoder states (only their shape is read).
    """
    from transformers import DynamicCache, EncoderDecoderCache

    kw = {"config": config} if config is not None else {}
    self_cache, cross = DynamicCache(**kw), DynamicCache(**kw)
    for i in range(layers):
        self_cache.update(past[2 * i], past[2 * i + 1], i)
        cross.update(past[2 * layers + 2 * i], past[2 * layers + 2 * i + 1], i)
    cache = EncoderDecoderCache(self_cache, cross)
    for i in range(layers):
        cache.is_updated[i] = True
    return cache


# --------------------------------------------------------------------------------------------
# Export of one graph
# --------------------------------------------------------------------------------------------


def export_graph(graph: GraphDef, args: list, folder: Path, opts, dtype: str) -> dict[str, Any]:
    """Export one graph to ``folder/<name>.onnx``; ``onnx.checker`` and the signature check must pass.

    Args:
        graph: the graph.
        args: the sample inputs it is traced with (past > 0, no size 0 or 1 to specialise on).
        folder: where ``<name>.onnx`` (and ``<name>.onnx.data``) is written.
        opts: the :class:`~exporters.onnx.options.OnnxOptions`.
        dtype: the export dtype's name.

    Returns:
        export.json's file entry: ``onnx`` (file name), ``bytes``, ``external_data``, ``opset``.

    Raises:
        VerificationError: the checker rejects the graph, or its inputs/outputs differ from the spec.
        UserInputError: ``external_data: never`` for a graph above 2 GB.
        ExportWriteError: the file could not be written (disk full …).
    """
    import onnx
    import torch

    spec = graph.spec
    path = folder / f"{spec.name}.onnx"
    kwargs: dict[str, Any] = {"input_names": spec.input_names, "output_names": spec.output_names}
    opset = opts.resolved_opset
    if opset is not None:
        kwargs["opset_version"] = opset
    fused_ops = (opset or 0) >= 23  # Attention, RMSNormalization, RotaryEmbedding
    if opts.exporter == "legacy":
        import warnings

        with warnings.catch_warnings(), patches.writing(folder, path.name):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph.module,
                tuple(args),
                str(path),
                dynamic_axes=spec.dynamic_axes(),
                do_constant_folding=True,
                dynamo=False,
                **kwargs,
            )
        size = onnx_bytes(path)
        if opts.external_data == "always" or (opts.external_data == "auto" and size > TWO_GB):
            m = onnx.load(str(path))
            _remove_external(path)
            with patches.writing(folder, f"{path.name} (external data)"):
                onnx.save_model(m, str(path), save_as_external_data=True, location=f"{spec.name}.onnx.data")
    else:
        with (
            patches.quiet_loggers("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo"),
            patches.rms_norm_as_op(graph.module, enabled=fused_ops),
            patches.sdpa_native_gqa(enabled=fused_ops),
            patches.attention_implementation(graph.module),
        ):
            prog = torch.onnx.export(
                graph.module,
                tuple(args),
                dynamo=True,
                dynamic_shapes=dynamic_shapes(spec, len(args)),
                optimize=True,
                verbose=False,
                **kwargs,
            )
        weights = sum(
            int(v.const_value.nbytes) for v in prog.model.graph.initializers.values() if v.const_value is not None
        )
        if opts.external_data == "never" and weights > TWO_GB:
            raise UserInputError(f"graph {spec.name} holds {weights / 1e9:.2f} GB of weights: external_data: never cannot hold it")
        external = opts.external_data == "always" or (opts.external_data == "auto" and weights > TWO_GB)
        with patches.writing(folder, path.name + (" (external data)" if external else "")):
            prog.save(str(path), external_data=external)
        del prog
        if fused_ops:
            from exporters.onnx.passes import fold_attention_layout_file

            with patches.writing(folder, path.name):
                folded = fold_attention_layout_file(path)
            log.debug("%s: %d attentions folded to 3-D", spec.name, folded)
    try:
        # full_check adds strict type and shape inference (catches mixed-dtype nodes); it loads
        # the whole model, so graphs above 2 GB get the structural check only
        # bf16 Conv/LayerNorm are outside the ONNX type constraints onnx's inference enforces
        # (ONNX Runtime's CUDA provider runs them); those graphs get the structural check
        onnx.checker.check_model(str(path), full_check=onnx_bytes(path) < TWO_GB and dtype != "bfloat16")
    except Exception as exc:  # onnx.checker.ValidationError, InferenceError and protobuf errors
        raise VerificationError(f"onnx.checker rejected {path.name}: {str(exc).splitlines()[0][:400]}") from exc
    opset = check_signature(path, spec, dtype)
    return {
        "onnx": path.name,
        "bytes": onnx_bytes(path),
        "external_data": (folder / f"{spec.name}.onnx.data").is_file(),
        "opset": opset,
    }


def dynamic_shapes(spec: GraphSpec, n_args: int):
    """dynamo ``dynamic_shapes`` mirroring the wrapper's signature (``*past`` nested, stack-facts §5)."""
    from torch.export import Dim

    def axes(t):
        return {i: Dim.DYNAMIC for i, d in enumerate(t.dims) if isinstance(d, str)} or None

    fixed = 2 if len(spec.inputs) > 2 and spec.inputs[2].name.startswith(("past.", "cross.")) else len(spec.inputs)
    head = [axes(t) for t in spec.inputs[:fixed]]
    if fixed == len(spec.inputs):
        return tuple(head)
    return (*head, tuple(axes(t) for t in spec.inputs[fixed:]))


def _remove_external(path: Path) -> None:
    for p in path.parent.glob(path.name + ".data"):
        p.unlink()


_ELEM = {"float32": 1, "int64": 7, "float16": 10, "bfloat16": 16}


def check_signature(path: Path, spec: GraphSpec, dtype: str) -> int:
    """The graph's inputs/outputs are exactly the declared ones: names in order, ranks, element types.

    Returns:
        The graph's ONNX opset (default domain).

    Raises:
        VerificationError: naming the first mismatch.
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in m.graph.input]
    got_out = [o.name for o in m.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise VerificationError(
            f"{path.name}: signature differs from the declared graph: inputs {got_in} vs {spec.input_names}, "
            f"outputs {got_out} vs {spec.output_names}"
        )
    for vi, t in zip([*m.graph.input, *m.graph.output], [*spec.inputs, *spec.outputs]):
        rank = len(vi.type.tensor_type.shape.dim)
        if rank != len(t.dims):
            raise VerificationError(f"{path.name}: {t.name} has rank {rank}, declared {len(t.dims)}")
        want = _ELEM[dtype if t.dtype == "model" else t.dtype]
        got = vi.type.tensor_type.elem_type
        if got != want:
            name = onnx.TensorProto.DataType.Name(got)
            raise VerificationError(f"{path.name}: {t.name} is {name}, declared {t.dtype if t.dtype != 'model' else dtype}")
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
