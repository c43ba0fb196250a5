"""Export-time swaps: what changes while ``torch.onnx.export`` traces, and is restored after.

Each is a context manager that leaves the model exactly as it found it; validation always
compares the exported graph with the unmodified module.

* :func:`writing`: an ``OSError`` while a file is written becomes an :class:`ExportWriteError`.
* :func:`rms_norm_as_op`: RMS norms written out by transformers run as ``F.rms_norm``.
* :func:`sdpa_native_gqa`: grouped-query attention reaches sdpa with its KV heads unexpanded.
* :func:`attention_implementation`: wrappers that declare ``export_attention`` (T5's, whose sdpa
  path ``torch.export`` cannot decompose) run that attention implementation.
* :class:`quiet_loggers`, :class:`root_logging_quiet`: the exporters' and quantiser's INFO chatter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
from pathlib import Path

from exporters.onnx.errors import ExportWriteError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def writing(folder: Path, name: str):
    """Turns an ``OSError`` while ``name`` is written into ``folder`` into an :class:`ExportWriteError`.

    numpy and onnx_ir report a full disk as "problem writing element N to file"; the message
    says what was written where, why (``strerror``) and how much space that disk has left.

    Raises:
        ExportWriteError: the block raised an ``OSError``.
    """
    try:
        yield
    except OSError as exc:
        try:
            free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free there"
        except OSError:
            free = "free space unknown"
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ExportWriteError(
            f"writing {name} into {folder} failed: {reason} ({free}); free some space or export to "
            "another disk (--out), the export needs about twice the weights' size while it runs"
        ) from exc


@contextlib.contextmanager
def rms_norm_as_op(module, enabled: bool = True):
    """Within the block, RMS norms run as ``torch.nn.functional.rms_norm`` (→ ONNX ``RMSNormalization``).

    transformers writes RMSNorm out (``x * rsqrt(mean(x²) + eps) * weight``: LlamaRMSNorm, the
    Mistral/Qwen copies, T5LayerNorm), which exports as five nodes per norm. A module is swapped
    only when it has a 1-D float32 ``weight`` and a ``variance_epsilon`` and its own forward agrees
    with ``F.rms_norm`` on a probe input (max |Δ| ≤ 1e-5), so a norm with another formula
    (Gemma's ``1 + weight``) keeps its own; half-precision norms keep theirs too (their fp32
    upcast order differs). Yields the swapped modules; their forwards are restored on exit, and
    validation still compares the exported graph with the unmodified module.
    """
    import torch
    import torch.nn.functional as F

    swapped = []
    for m in module.modules() if enabled else ():
        w, eps = getattr(m, "weight", None), getattr(m, "variance_epsilon", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.dtype != torch.float32 or not isinstance(eps, float):
            continue
        if "forward" in vars(m):
            continue
        probe = torch.randn(2, 3, w.shape[0], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, got = m(probe), F.rms_norm(probe, (w.shape[0],), w, eps)
        if ref.shape == got.shape and float((ref - got).abs().max()) <= 1e-5:
            m.forward = functools.partial(_rms_norm, weight=w, eps=eps)
            swapped.append(m)
    try:
        yield swapped
    finally:
        for m in swapped:
            del m.forward


def _rms_norm(x, weight, eps: float):
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@contextlib.contextmanager
def sdpa_native_gqa(enabled: bool = True):
    """Within the block, grouped-query attention reaches sdpa with its ``kv_heads`` unexpanded.

    transformers repeats each key/value head ``heads / kv_heads`` times before sdpa when a mask
    is given (``repeat_kv``: 8 more nodes per layer and a copy of the whole KV cache per step);
    ``TRANSFORMERS_SDPA_FORCE_GQA=1`` (transformers' switch, read when attention runs) passes
    ``enable_gqa=True`` instead, which ``torch.onnx`` exports as one opset-23 ``Attention`` with
    fewer KV heads than query heads. SmolLM2-135M (9 heads, 3 KV heads) decode step, 2 threads:
    23.4 against 27.3 ms fp32, 9.4 against 11.6 ms int8. Models without grouped heads are
    unaffected. The variable is restored on exit.
    """
    if not enabled:
        yield
        return
    var = "TRANSFORMERS_SDPA_FORCE_GQA"
    previous = os.environ.get(var)
    os.environ[var] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[var]
        else:
            os.environ[var] = previous


@contextlib.contextmanager
def attention_implementation(module):
    """Within the block, every transformers config under ``module`` runs the attention
    implementation the wrapper declares in its ``export_attention`` attribute (nothing changes
    when it declares none).

    A wrapper declares one when its model's default cannot be exported: with sdpa, T5Attention's
    ``reshape`` of the transposed attention output cannot be decomposed by ``torch.export`` under
    dynamic batch and sequence (:mod:`compressor.families.language_models`, whose T5 wrappers
    declare ``eager``). Every config object under ``module`` (T5's encoder and decoder stacks hold
    their own copies) is switched and restored on exit.
    """
    want = getattr(module, "export_attention", None)
    configs = {}
    for m in module.modules() if want else ():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs[id(cfg)] = (cfg, cfg._attn_implementation)
    for cfg, _ in configs.values():
        cfg._attn_implementation = want
    try:
        yield
    finally:
        for cfg, previous in configs.values():
            cfg._attn_implementation = previous


class _NoTorchvision(logging.Filter):
    """Drops torch.onnx's "torchvision is not installed. Skipping torchvision::nms" warnings (12
    lines per export): BLIP-family graphs use no torchvision operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_NoTorchvision())


class quiet_loggers:
    """Raise the given loggers to WARNING for a block (the dynamo exporter logs every pass at INFO)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            if lg.getEffectiveLevel() < logging.WARNING:
                lg.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for lg, lvl in zip(self.loggers, self.levels):
            lg.setLevel(lvl)


class root_logging_quiet:
    """onnxruntime.quantization logs every tensor at INFO on the root logger: mute it meanwhile."""

    def __enter__(self):
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.setLevel(max(self.level, logging.WARNING))

    def __exit__(self, *exc):
        self.root.setLevel(self.level)
