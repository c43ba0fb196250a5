"""ONNX Runtime: execution providers, sessions, the ORT_ENABLE_ALL copy and int8 quantisation."""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.errors import UserInputError
from exporters.onnx.options import TWO_GB
from exporters.onnx.patches import root_logging_quiet

log = logging.getLogger(__name__)

#: int8 decoder scheme: weights int8 in blocks of this many input channels (one scale each).
INT8_BLOCK = 32


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``cpu`` / ``cuda`` (CUDA only when available).

    Raises:
        UserInputError: ``cuda`` asked but the installed onnxruntime has no CUDA provider
            (install the ``[gpu]`` extra, onnxruntime-gpu).
    """
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserInputError(
                "device cuda: this onnxruntime has no CUDAExecutionProvider; install the [gpu] extra "
                "(onnxruntime-gpu, which replaces onnxruntime)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(
    path: Path,
    providers: list[str],
    optimize: bool = True,
    threads: int | None = None,
    spinning: bool = True,
    rewrite=None,
):
    """An ``InferenceSession``; graph optimisation off for already-optimised copies.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers.
        optimize: ORT_ENABLE_ALL (True) or ORT_DISABLE_ALL (for ``*.opt.onnx``, already optimised).
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        spinning: let intra-op threads spin-wait between the nodes of one ``run`` (ONNX Runtime's
            default) and stop spinning when the ``run`` returns (``session.force_spinning_stop``),
            so a pool never holds the cores between calls, where the next session or another
            library (PyTorch in the benchmark) needs them. SmolLM2-135M decode step in the demo
            BLIP-2, 2 threads, quiet 2-core machine: 29.8 ms (spin, stop after run) against 31.1 ms
            (spin throughout) and 42.2 ms (no spinning); int8 15.6 / 15.1 / 22.2 ms. False: no
            spinning at all (a machine shared with other busy processes).
        rewrite: ``rewrite(model_proto) -> bool``, a graph pass applied in memory before the
            session is made (the file is not changed; external weights are read from the
            file's folder); None: the file as it is.

    Raises:
        ModelSpecError: ``rewrite`` returned False (the graph is not what the pass rewrites).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if rewrite is None:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    import onnx

    from compressor.errors import ModelSpecError

    model = onnx.load(str(path), load_external_data=False)
    if not rewrite(model):
        raise ModelSpecError(
            f"{path}: {getattr(rewrite, '__name__', 'the graph pass')} does not apply to this graph "
            "(not a decoder written by this version's export); re-export it"
        )
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent.resolve()))
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=providers)


def ort_can_run(dtype: str, device: str) -> bool:
    """Whether ONNX Runtime can run a ``dtype`` graph on ``device``: bf16 graphs do not run on its
    CPU provider (no bf16 MatMul kernels)."""
    return dtype != "bfloat16" or device == "cuda"


def onnx_bytes(path: Path) -> int:
    """Size of an ``.onnx`` file plus its ``.onnx.data`` side file, if any (bytes)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def optimize_file(folder: Path, name: str, device: str) -> str:
    """Save ONNX Runtime's ORT_ENABLE_ALL-optimised copy of ``folder/name`` as ``<graph>.opt.onnx``.

    Returns:
        The copy's file name.
    """
    import onnxruntime as ort

    src = folder / name
    dst = folder / name.replace(".onnx", ".opt.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if onnx_bytes(src) > TWO_GB or (folder / (name + ".data")).is_file():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), sess_options=so, providers=providers_for(device)[-1:])
    return dst.name


def quantize_int8(folder: Path, name: str) -> tuple[str, str]:
    """int8 dynamic quantisation of a decoder's MatMuls (onnxruntime.quantization).

    The scheme is ONNX Runtime's ``MatMulNBits`` with 8 bits: weights int8 in blocks of
    :data:`INT8_BLOCK` input channels with one scale each, activations quantised to int8 per
    block at run time (``accuracy_level=4``, int8 dot products). On SmolLM2-135M inside the demo
    BLIP-2, teacher-forced on COCO captions, its top-1 agreement with fp32 was 0.93 (KL 0.007)
    against 0.83 (KL 0.046) for ``quantize_dynamic`` (per-channel int8 weights, per-tensor uint8
    activations), at the same speed (24.9 against 23.7 ms per decode step, 2 threads, against
    56-67 ms in fp32). ``quantize_dynamic`` is the fallback where the blockwise quantiser is
    missing (older onnxruntime). Both follow onnxruntime.quantization's recipe for transformers:
    ``quant_pre_process`` first.

    Returns:
        ``(file name, method)``: ``<graph>.int8.onnx`` and a description of the scheme used.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = folder / name
    pre = folder / ".int8-pre.onnx"
    dst = folder / name.replace(".onnx", ".int8.onnx")
    large = onnx_bytes(src) > TWO_GB
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large)
        source = pre
    except Exception as exc:  # pre-processing is an optimisation; quantise the plain graph without it
        log.info("quant_pre_process failed (%s); quantising %s directly", type(exc).__name__, name)
        source = src
    try:
        with root_logging_quiet():
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            cfg = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, bits=8)
            q = MatMulNBitsQuantizer(
                onnx.load(str(source)), bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, algo_config=cfg
            )
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=large)
        method = f"MatMulNBits int8 weights (blocks of {INT8_BLOCK}), int8 activations per block (accuracy_level 4)"
    except (ImportError, TypeError, ValueError) as exc:  # an onnxruntime without 8-bit MatMulNBits
        log.info("blockwise int8 unavailable (%s); using quantize_dynamic", exc)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with root_logging_quiet():
            quantize_dynamic(
                str(source),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
                use_external_data_format=large,
            )
        method = "quantize_dynamic: per-channel int8 weights, per-tensor uint8 activations"
    for p in folder.glob(".int8-pre.onnx*"):
        p.unlink()
    return dst.name, method
