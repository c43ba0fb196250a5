"""The typed errors of the ONNX export (both carry the project's exit codes through ``CompressError``)."""

from __future__ import annotations

from compressor.errors import CompressError, VerificationError


class OnnxValidationError(VerificationError):
    """ONNX Runtime disagrees with PyTorch beyond a graph's tolerance (exit 3).

    Attributes:
        graph: the graph name (``decoder`` …).
        output: the output name (``logits``, ``present.3.key`` …).
        max_diff: the largest |ORT − PyTorch| seen on valid positions.
        scaled_diff: ``max_diff / max(1, max |PyTorch|)``, what the tolerance bounds.
        tolerance: the allowed maximum.
        case: the sample case (``prefill``, ``decode_1`` …).
        variant: ``""`` for the plain graph, ``optimized`` for its ORT_ENABLE_ALL copy, ``fp16`` /
            ``int8`` / ``int4`` for a precision variant (then ``scaled_diff`` is its relative RMS error).
    """

    def __init__(
        self,
        graph: str,
        output: str,
        max_diff: float,
        tolerance: float,
        case: str = "",
        variant: str = "",
        scaled_diff: float | None = None,
    ):
        self.graph, self.output, self.max_diff, self.tolerance, self.case = graph, output, max_diff, tolerance, case
        self.variant = variant
        self.scaled_diff = max_diff if scaled_diff is None else scaled_diff
        where = f"{graph}{f' ({variant})' if variant else ''}"
        if variant in ("fp16", "int8", "int4"):  # precision variants are held to a relative RMS error
            measure = f"relative RMS error {self.scaled_diff:.3g} (max |ORT - PyTorch| = {max_diff:.3g})"
        else:
            measure = f"max |ORT - PyTorch| = {max_diff:.3g} (scaled by max(1, |PyTorch|): {self.scaled_diff:.3g})"
        super().__init__(
            f"ONNX validation failed: graph '{where}', output '{output}', case '{case}': {measure} > tolerance "
            f"{tolerance:.3g}" + (f"; raise onnx.variant_tolerance.{variant} or drop the variant" if variant in
                                  ("fp16", "int8", "int4") else "")
        )


class ExportWriteError(CompressError):
    """Writing a graph into the export folder failed (disk full, quota, permissions; exit 3).

    The message names the file and folder, the operating system's reason and the free space
    left on that disk; the half-written temporary folder is removed and an earlier export at
    the output path is left as it was.
    """
