"""``export.json``: what it records, how it is read, and the folder's checksums.

``export.json`` holds the family, the topology's ``kind`` (``causal``, ``seq2seq``, ``blip``),
dtype, exporter and opset, the topology's facts (layer counts, KV heads, head size, image token
id …), the token ids generation reads, every graph's files and signature, the parameter counts
and the library versions. ``format_version`` 1 is the only format so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compressor.errors import ModelSpecError, VerificationError

log = logging.getLogger(__name__)

EXPORT_JSON = "export.json"
VALIDATION_JSON = "validation.json"
FORMAT = "vlm-compress-onnx"
FORMAT_VERSION = 1


def export_meta(model, processor, family, plan, files: dict, dtype: str, opts, source: str) -> dict:
    """The content of ``export.json`` (``seconds`` is added when the folder is published).

    Args:
        model: the exported model (a ``meta``-device skeleton is enough: only parameter counts
            and generation configs are read).
        processor: its processor (token ids).
        family: its :class:`~compressor.families.base.Family`.
        plan: the :class:`~exporters.onnx.graphs.ExportPlan`.
        files: graph name → its file entry (``onnx``, ``bytes``, ``optimized`` …).
        dtype: the export dtype's name.
        opts: the :class:`~exporters.onnx.options.OnnxOptions`.
        source: where the model came from (recorded as is).
    """
    import onnx
    import onnxruntime
    import torch
    import transformers

    from eval.characteristics import count_parameters

    chars = count_parameters(model, family.parts)
    graphs = {}
    for g in plan.graphs:
        f = files[g.spec.name]
        graphs[g.spec.name] = {**f, "signature": g.spec.signature()}
    optimized = opts.optimize and any(f.get("optimized") for f in files.values())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "model_type": family.model_type,
        "language_model": family.lm_model_type,
        "kind": plan.kind,
        "decoder_only": family.decoder_only,
        "dtype": dtype,
        "exporter": opts.exporter,
        "opset": max((f.get("opset", 0) for f in files.values()), default=opts.opset),
        "optimized": bool(opts.optimize),
        "quantized": opts.quantize,
        "default_variant": "int8" if opts.quantize else ("optimized" if optimized else "plain"),
        "variants": ["plain", *(["optimized"] if optimized else []),
                     *[v for v in ("fp16", "int8", "int4") if any(v in (f.get("variants") or {}) for f in files.values())
                       or (v == "int8" and any(f.get("int8") for f in files.values()))]],
        "source": source,
        "source_weights": _source_weights(model),
        **plan.meta,
        "token_ids": family.token_ids(model, processor),
        "graphs": graphs,
        "characteristics": chars,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _source_weights(model) -> dict | None:
    """How the exported weights were stored in the source model: ``None`` for dense weights, or for a
    ``quantize`` stage's folder ``{"quantized_modules": n, "schemes": {describe(): n}}``. The graphs
    then hold those integer weights dequantized (the same function as the quantized model)."""
    done = getattr(model, "vlmc_quantized", None)
    if not done:
        return None
    from collections import Counter

    return {"quantized_modules": len(done), "schemes": dict(Counter(q.scheme.describe() for q in done.values()))}


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON (``export.json``, ``validation.json``)."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def is_onnx_dir(path: Path | str) -> bool:
    """Whether ``path`` is an ONNX export folder (it holds ``export.json``)."""
    return (Path(path) / EXPORT_JSON).is_file()


def read_export_json(onnx_dir: Path | str) -> dict:
    """``export.json`` of an ONNX folder.

    Raises:
        ModelSpecError: the folder has no ``export.json`` or it is unreadable (exit 2).
    """
    path = Path(onnx_dir) / EXPORT_JSON
    if not path.is_file():
        raise ModelSpecError(f"{onnx_dir}: not an ONNX export folder (no export.json); run `compress export --onnx` first")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelSpecError(f"{path}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ModelSpecError(f"{path}: not written by vlm-compress (format {meta.get('format')!r})")
    return meta


def verify_onnx_dir(onnx_dir: Path | str) -> None:
    """Check every file of an ONNX folder against its ``SHA256SUMS``.

    Raises:
        CorruptInputError: a file is missing or its bytes changed (names the files; exit 2).
    """
    from compressor.errors import CorruptInputError
    from exporters.safetensors_export import verify_folder

    try:
        verify_folder(Path(onnx_dir))
    except VerificationError as exc:
        raise CorruptInputError(str(exc)) from None
