"""Validation of exported graphs against PyTorch: every case, every output, valid positions only.

:func:`validate_all` runs each graph's sample cases through ONNX Runtime and the graph's PyTorch
module and raises :class:`~exporters.onnx.errors.OnnxValidationError` on the first output whose
difference, scaled by ``max(1, |PyTorch|)``, exceeds the graph's tolerance (after the float64
allowance of :class:`Float64Reference`). :func:`int8_report` reports (never gates) the int8
decoder; :func:`twin_check` checks the numbers of a dtype ONNX Runtime's CPU provider cannot run
on an fp32 copy of the same weights.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from compressor.errors import VerificationError
from exporters.onnx.errors import OnnxValidationError
from exporters.onnx.graphs import FP16_TOLERANCE
from exporters.onnx.runtime import make_session, onnx_bytes, providers_for

log = logging.getLogger(__name__)


def to_numpy(t):
    """A tensor as a numpy array (bf16 through float32, which numpy lacks)."""
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def valid_diff(ort_out, ref, axis_mask) -> tuple[float, float]:
    """``(max |ORT − ref|, that / max(1, max |ref|))`` over valid positions.

    ``axis_mask`` is ``(axis, mask (batch, n))``: along ``axis`` only positions whose mask is 1
    count, or None for every position. The second number is what tolerances bound: absolute
    for outputs of magnitude up to 1, relative to the output's scale beyond (logits and hidden
    states of tens would otherwise be held to float32 rounding of their last digits).
    """
    import numpy as np

    a = np.asarray(ort_out, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    if axis_mask is not None:
        axis, mask = axis_mask
        m = np.asarray(mask).astype(bool)  # (batch, n)
        shape = [1] * a.ndim
        shape[0], shape[axis] = m.shape[0], m.shape[1]
        keep = np.broadcast_to(m.reshape(shape), a.shape)
        if not keep.any():
            return 0.0, 0.0
        a, b = a[keep], b[keep]
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        bad = float("inf") if not np.array_equal(np.isfinite(a), np.isfinite(b)) else 0.0
        fin = np.isfinite(a) & np.isfinite(b)
        a, b = a[fin], b[fin]
        if bad:
            return bad, bad
    d = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    return d, d / scale


class Float64Reference:
    """PyTorch in float64 on the same weights: how far PyTorch's own float32 result is from exact.

    Deep, re-initialised tiny models (and some real ones) amplify rounding: PyTorch's fp32 (or
    fp16) output can differ from the float64 result by more than the fixed tolerance, and ONNX
    Runtime, rounding differently, by as much. When a graph exceeds its tolerance, the check
    allows ``FP64_FACTOR ×`` PyTorch's own rounding error on those inputs (recorded in
    validation.json), so it measures the export, not the floating-point format. Models whose
    float64 copy would exceed ``4 × MAX_BYTES`` are not copied (the fixed tolerance applies).
    """

    MAX_BYTES = 2 * 1024**3
    FP64_FACTOR = 4.0

    def __init__(self, model):
        self.model = model
        self.plan = None

    def available(self) -> bool:
        if self.model is None:
            return False
        n = sum(p.numel() for p in self.model.parameters())
        return n * 8 <= 4 * self.MAX_BYTES

    def outputs(self, graph: str, inputs: list):
        """``graph``'s outputs in float64 on ``inputs`` (floating inputs cast to float64)."""
        import copy

        import torch

        from exporters.onnx.topologies import export_plan

        if self.plan is None:
            self.plan = export_plan(copy.deepcopy(self.model).to(torch.float64))
        cast = [t.to(torch.float64) if t.is_floating_point() else t for t in inputs]
        with torch.no_grad():
            out = self.plan.graph(graph).module(*cast)
        return out if isinstance(out, tuple) else (out,)


def validate_all(
    plan, cases, folder: Path, files, opts, dtype, device, runnable, variant: str = "plain", fp64=None
) -> dict:
    """Run every graph's cases through ONNX Runtime and PyTorch; raise on the first excess.

    Args:
        plan: the :class:`~exporters.onnx.graphs.ExportPlan` (or a one-graph part of it).
        cases: :func:`~exporters.onnx.samples.sample_cases` of the plan.
        folder: the folder holding the graphs.
        files: graph name → ``{"onnx": file, "optimized": file or None}``.
        opts: the :class:`~exporters.onnx.options.OnnxOptions` (``tolerance``, ``exporter``).
        dtype: the export dtype's name.
        device: where ONNX Runtime runs.
        runnable: whether ONNX Runtime can run ``dtype`` there (else the signature is recorded).
        variant: ``plain`` (``<graph>.onnx``) or ``optimized`` (``<graph>.opt.onnx``).
        fp64: a :class:`Float64Reference` of the model, or None.

    Returns:
        ``{"graphs": {key: record}, "dtype", "device"}``; keys are ``<graph>`` or ``<graph>.optimized``.

    Raises:
        OnnxValidationError: an output's scaled difference exceeds the graph's tolerance (after
            the float64 allowance, see :class:`Float64Reference`).
        VerificationError: ONNX Runtime cannot load a graph.
    """
    import torch

    out: dict[str, Any] = {"graphs": {}, "dtype": dtype, "device": device}
    for g in plan.graphs:
        spec = g.spec
        name = files[spec.name]["optimized" if variant == "optimized" else "onnx"]
        key = spec.name if variant == "plain" else f"{spec.name}.{variant}"
        if not runnable:
            out["graphs"][key] = {"file": name, "checked": "signature", "note": f"ONNX Runtime's CPU provider cannot run {dtype}"}
            continue
        tol = opts.tolerance or spec.tolerance
        if dtype == "float16":
            tol = max(tol, FP16_TOLERANCE)
        try:
            sess = make_session(folder / name, providers_for(device), optimize=variant == "plain")
        except Exception as exc:  # onnxruntime's own exception types
            raise VerificationError(
                f"ONNX Runtime cannot load the exported graph {name} ({dtype}, {opts.exporter} exporter): "
                f"{str(exc).splitlines()[0][:400]}"
            ) from None
        rec: dict[str, Any] = {"file": name, "checked": "numbers", "tolerance": tol, "cases": {}}
        for label, inputs in cases[spec.name]:
            with torch.no_grad():
                ref = g.module(*inputs)
            ref = ref if isinstance(ref, tuple) else (ref,)
            feed = {n: to_numpy(t) for n, t in zip(spec.input_names, inputs)}
            got = sess.run(None, feed)
            diffs, ref64 = {}, None
            for k, (o, r, a) in enumerate(zip(spec.outputs, ref, got)):
                am = None
                if o.name in spec.valid:
                    axis, mask_name = spec.valid[o.name]
                    am = (axis, feed[mask_name])
                d, scaled = valid_diff(a, to_numpy(r), am)
                diffs[o.name] = d
                if scaled <= tol:
                    continue
                allowed = tol
                if dtype in ("float32", "float16") and fp64 is not None and fp64.available():
                    if ref64 is None:
                        ref64 = fp64.outputs(spec.name, inputs)
                    _, own = valid_diff(to_numpy(r), to_numpy(ref64[k]), am)
                    allowed = max(tol, fp64.FP64_FACTOR * own)
                    rec.setdefault("float64_allowance", {})[f"{label}/{o.name}"] = {
                        "pytorch_fp32_vs_fp64_scaled": own,
                        "allowed": allowed,
                        "ort_scaled": scaled,
                    }
                if not scaled <= allowed:
                    raise OnnxValidationError(
                        spec.name, o.name, d, allowed, label, variant if variant != "plain" else "", scaled
                    )
            shapes = {n: list(v.shape) for n, v in feed.items() if not n.startswith(("past.", "cross.")) or n.endswith(".0.key")}
            rec["cases"][label] = {"inputs": shapes, "max_abs_diff": max(diffs.values()) if diffs else 0.0, "per_output": _summary(diffs)}
        rec["max_abs_diff"] = max((c["max_abs_diff"] for c in rec["cases"].values()), default=0.0)
        out["graphs"][key] = rec
        del sess
    return out


def _summary(diffs: dict[str, float]) -> dict[str, float]:
    """Per-output differences; past/present/cross tensors summarised by their maximum."""
    out: dict[str, float] = {}
    for k, v in diffs.items():
        group = k.split(".")[0] + ".*" if k.startswith(("present.", "past.", "cross.")) else k
        out[group] = max(out.get(group, 0.0), v)
    return out


def variant_check(plan, cases, folder: Path, graph: str, file: str, variant: str, tolerance: float, device: str) -> dict:
    """Validate a precision variant of one graph against the fp32 PyTorch module it came from.

    The figure gated is the relative RMS error ``‖ORT − PyTorch‖₂ / ‖PyTorch‖₂`` of the graph's
    first output over its valid positions (the decoder's logits); the largest absolute difference
    and, for logits, the top-1 agreement are recorded beside it.

    Returns:
        validation.json's ``variants.<graph>.<variant>`` entry.

    Raises:
        OnnxValidationError: the relative error exceeds ``tolerance`` on some case.
    """
    import numpy as np
    import torch

    g = plan.graph(graph)
    spec = g.spec
    sess = make_session(folder / file, providers_for(device))
    out = spec.outputs[0].name
    rec: dict[str, Any] = {"file": file, "bytes": onnx_bytes(folder / file), "output": out, "tolerance": tolerance,
                           "measure": "relative RMS error of the first output", "cases": {}}
    for label, inputs in cases[graph]:
        with torch.no_grad():
            ref = g.module(*inputs)
        ref = to_numpy(ref[0] if isinstance(ref, tuple) else ref).astype(np.float64)
        feed = {n: to_numpy(t) for n, t in zip(spec.input_names, inputs)}
        got = np.asarray(sess.run([out], feed)[0], dtype=np.float64)
        a, b = got, ref
        if out in spec.valid:
            axis, mask_name = spec.valid[out]
            m = np.asarray(feed[mask_name]).astype(bool)
            shape = [1] * a.ndim
            shape[0], shape[axis] = m.shape
            keep = np.broadcast_to(m.reshape(shape), a.shape)
            a, b = a[keep], b[keep]
        rel = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))
        case = {"relative_rms_error": rel, "max_abs_diff": float(np.max(np.abs(got - ref))) if got.size else 0.0}
        if out == "logits":
            case["top1_agreement"] = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
        rec["cases"][label] = case
        if not rel <= tolerance:
            raise OnnxValidationError(graph, out, case["max_abs_diff"], tolerance, label, variant, rel)
    rec["relative_rms_error"] = max(c["relative_rms_error"] for c in rec["cases"].values())
    del sess
    return rec


def int8_report(plan, cases, folder: Path, files, dec: str, device: str) -> dict:
    """How the int8 decoder's logits compare with PyTorch (reported, not gated: the caption gate decides).

    Returns:
        validation.json's ``int8`` entry: file, method, bytes, and per case the largest logit
        difference and the top-1 agreement (0-1).
    """
    import numpy as np
    import torch

    g = plan.graph(dec)
    sess = make_session(folder / files[dec]["int8"], providers_for(device))
    rep: dict[str, Any] = {
        "file": files[dec]["int8"],
        "method": files[dec].get("int8_method"),
        "bytes": onnx_bytes(folder / files[dec]["int8"]),
        "cases": {},
    }
    for label, inputs in cases[dec]:
        with torch.no_grad():
            ref = to_numpy(g.module(*inputs)[0])
        got = sess.run(["logits"], {n: to_numpy(t) for n, t in zip(g.spec.input_names, inputs)})[0]
        rep["cases"][label] = {
            "logits_max_abs_diff": float(np.max(np.abs(got - ref))),
            "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        }
    rep["checked"] = "reported (int8 is accepted or refused by the caption-metric gate)"
    return rep


def twin_check(model, opts, device: str) -> dict:
    """Export an fp32 copy of the same weights to a scratch folder and validate its numbers.

    Returns:
        validation.json's ``numbers`` entry (the twin's per-graph records).

    Raises:
        OnnxValidationError: the fp32 twin disagrees with PyTorch.
    """
    import copy

    import torch

    from exporters.onnx import graphs
    from exporters.onnx.samples import sample_cases
    from exporters.onnx.topologies import export_plan

    twin = copy.deepcopy(model).to(torch.float32)
    scratch = Path(tempfile.mkdtemp(prefix="vlmc-onnx-twin-"))
    try:
        plan = export_plan(twin)
        with torch.no_grad():
            cases = sample_cases(plan, twin)
        files = {g.spec.name: graphs.export_graph(g, cases[g.spec.name][-1][1], scratch, opts, "float32") for g in plan.graphs}
        res = validate_all(plan, cases, scratch, files, opts, "float32", device, True, fp64=Float64Reference(twin))
        return {"checked": "numbers on an fp32 twin of the same weights", "graphs": res["graphs"]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        del twin
