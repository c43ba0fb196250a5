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
#: Default tolerance of each precision variant: the relative RMS error ``‖ORT − PyTorch‖₂ / ‖PyTorch‖₂`` of
#: the graph's first output (the decoder's logits) on the validation cases, against the fp32 PyTorch
#: module the graph came from. Set for real weights (SmolLM2-135M in the demo BLIP-2: see
#: bench/quantize.py); tiny re-initialised test models amplify rounding and set their own.
VARIANT_TOLERANCE = {"fp16": 0.02, "int8": 0.15, "int4": 0.35}
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
        variants: precision variants written beside the fp32 graphs (``fp16``, ``int8``, ``int4``;
            :data:`~exporters.onnx.runtime.VARIANTS`), each validated against PyTorch within
            ``variant_tolerance`` (else the export fails).
        int4_block_size: input channels per scale of the int4 variant.
        variant_tolerance: variant → relative RMS error allowed (defaults: :data:`VARIANT_TOLERANCE`).
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
    variants: tuple[str, ...] = ()
    int4_block_size: int = 32
    variant_tolerance: dict | None = None

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
            variants=tuple(getattr(spec, "variants", None) or ()),
            int4_block_size=getattr(spec, "int4_block_size", 32),
            variant_tolerance=dict(getattr(spec, "variant_tolerance", None) or {}) or None,
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
        bad = [v for v in self.variants if v not in ("fp16", "int8", "int4")]
        bad += [v for v in (self.variant_tolerance or {}) if v not in ("fp16", "int8", "int4")]
        if bad:
            raise UserInputError(f"onnx variants {bad}: expected fp16, int8, int4")
        if self.int4_block_size < 16 or self.int4_block_size & (self.int4_block_size - 1):
            raise UserInputError(f"int4_block_size {self.int4_block_size}: expected a power of 2, at least 16")

    def tolerance_of(self, variant: str) -> float:
        """The relative RMS error a precision variant may show (see :data:`VARIANT_TOLERANCE`)."""
        return float((self.variant_tolerance or {}).get(variant, VARIANT_TOLERANCE[variant]))

    @property
    def resolved_opset(self) -> int | None:
        """The opset the exporter is asked for: ``opset``, else :data:`DYNAMO_OPSET` with dynamo,
        else None (the legacy exporter's own default)."""
        if self.opset is not None:
            return self.opset
        return DYNAMO_OPSET if self.exporter == "dynamo" else None
