"""Export settings (:class:`OnnxOptions`) and the size thresholds every part of the export shares."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.errors import UserInputError

#: Above this many bytes a graph's weights go to an external ``<graph>.onnx.data`` file (protobuf's limit).
TWO_GB = 2 * 1024**3
#: The dynamo exporter's default opset: 23 is the first with the fused ``Attention``,
#: ``RMSNormalization`` and ``RotaryEmbedding`` operators, which ``torch.onnx`` emits for
#: ``scaled_dot_product_attention``, ``rms_norm`` and the rotary embedding. On SmolLM2-135M
#: inside the demo BLIP-2 they cut the decoder from 2,432 to 978 nodes (with grouped KV heads
#: passed unexpanded, :func:`exporters.onnx.patches.sdpa_native_gqa`), and to 707 once the
#: head-splitting around each ``Attention`` is folded into its 3-D form (:mod:`exporters.onnx.passes`).
#: ONNX Runtime runs them from 1.23 on CPU, from 1.26 on CUDA (1.25 refuses grouped KV heads with
#: a KV cache: "GQA ... not supported by the unfused runner"); ``opset: 20`` exports the
#: decomposed graph for older runtimes.
DYNAMO_OPSET = 23
#: ``isolate_graphs: auto`` exports in subprocesses when the checkpoint's weight files exceed this (bytes).
ISOLATE_ABOVE_BYTES = 10**9


@dataclass
class OnnxOptions:
    """Export settings (the recipe's ``OnnxSpec`` plus the export dtype).

    Attributes:
        dtype: ``float32`` / ``float16`` / ``bfloat16``, or None to keep the saved dtype.
        opset: ONNX opset, or None for the default: :data:`DYNAMO_OPSET` (23) with the dynamo
            exporter, the legacy exporter's own default with ``legacy``.
        exporter: ``dynamo`` or ``legacy``.
        optimize: also save ``<graph>.opt.onnx`` (ORT_ENABLE_ALL).
        quantize: ``int8`` for a dynamically quantised decoder, or None.
        tolerance: max |ORT − PyTorch| for fp32 graphs (None: each graph's default, 1e-4).
        external_data: ``auto`` (above 2 GB), ``always`` or ``never``.
        twin_check: for dtypes ONNX Runtime's CPU provider cannot run, check numbers on an fp32
            twin of the model (needs memory for an fp32 copy); else the signature only.
        isolate_graphs: export each graph in a fresh subprocess that memory-maps the model folder
            (:mod:`exporters.onnx.isolated`), so pages read for one graph are gone before the
            next: ``auto`` (checkpoint weights above :data:`ISOLATE_ABOVE_BYTES`), ``always`` or
            ``never``. Applies to :func:`~exporters.onnx.export.export_onnx` (a folder to reload
            from); an in-memory model is always exported in-process.
    """

    dtype: str | None = None
    opset: int | None = None
    exporter: str = "dynamo"
    optimize: bool = True
    quantize: str | None = None
    tolerance: float | None = None
    external_data: str = "auto"
    twin_check: bool = True
    isolate_graphs: str = "auto"

    @classmethod
    def from_stage(cls, cfg) -> OnnxOptions:
        """From an ``ExportStage`` (``cfg.dtype`` + ``cfg.onnx``) or an ``OnnxSpec``."""
        spec = getattr(cfg, "onnx", cfg)
        return cls(
            dtype=getattr(cfg, "dtype", None),
            opset=spec.opset,
            exporter=spec.exporter,
            optimize=spec.optimize,
            quantize=spec.quantize,
            tolerance=spec.tolerance,
            external_data=spec.external_data,
            twin_check=getattr(spec, "twin_check", True),
            isolate_graphs=getattr(spec, "isolate_graphs", "auto"),
        )

    def check(self) -> None:
        """Refuse settings outside their choices (before anything is loaded or written).

        Raises:
            UserInputError: an exporter, quantisation or isolation setting out of its choices (exit 2).
        """
        if self.exporter not in ("dynamo", "legacy"):
            raise UserInputError(f"exporter '{self.exporter}': expected dynamo or legacy")
        if self.quantize not in (None, "int8"):
            raise UserInputError(f"quantize '{self.quantize}': expected int8 or nothing")
        if self.isolate_graphs not in ("auto", "always", "never"):
            raise UserInputError(f"isolate_graphs '{self.isolate_graphs}': expected auto, always or never")

    @property
    def resolved_opset(self) -> int | None:
        """The opset the exporter is asked for: ``opset``, else :data:`DYNAMO_OPSET` with dynamo,
        else None (the legacy exporter's own default)."""
        if self.opset is not None:
            return self.opset
        return DYNAMO_OPSET if self.exporter == "dynamo" else None
