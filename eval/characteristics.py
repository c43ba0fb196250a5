"""Model characteristics: parameters, GFLOPs, latency, throughput, peak memory, size on disk.

What the published RSICD study reports for every pruning experiment (Parameters, Trainable
Params, GFLOPs, Avg Inference Time), measured the same way for baseline and candidate:

* parameters by part, counted once when tied (``named_parameters`` de-duplicates);
* GFLOPs of image → caption with ``torch.utils.flop_counter.FlopCounterMode`` for a stated number
  of generated tokens (every parameter must have ``requires_grad=False`` first, stack-facts §10);
* latency per caption (s) after warm-up, p50 / p95 over repeats, at each batch size;
* peak resident memory (MB): the process's VmHWM on Linux (reset per measurement when the
  kernel allows), CUDA max allocated on GPU.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def count_parameters(model, parts: dict[str, Sequence[str]]) -> dict[str, int]:
    """Parameters in total and per part.

    Args:
        model: a ``torch.nn.Module`` (peft wrappers are unwrapped by name: ``base_model.model.``).
        parts: part name → parameter-name prefixes (a family's ``parts``).

    Returns:
        ``{"params_total": n, "params_<part>": n, …}`` (counts, tied weights once).
    """
    out = {"params_total": 0, **{f"params_{p}": 0 for p in parts}}
    for name, p in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        n = p.numel()
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        out["params_total"] += n
        for part, prefixes in parts.items():
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
                out[f"params_{part}"] += n
                break
    return out


def count_gflops(run: Callable[[], Any], model=None) -> float:
    """Floating-point operations of ``run()`` in GFLOPs (10^9), counted by FlopCounterMode.

    Args:
        run: a function doing the work once (e.g. ``generate`` for one image, with
            ``min_new_tokens == max_new_tokens`` so the token count is fixed).
        model: if given, its parameters are set ``requires_grad_(False)`` during counting and
            restored afterwards (stack-facts §10: with a parameter that requires grad, such as
            BLIP-2's ``query_tokens``, FlopCounterMode around ``generate`` fails).

    Returns:
        GFLOPs (multiply-add counted as 2 FLOPs, torch's convention).
    """
    return count_gflops_by_part(run, model)["gflops"]


def count_gflops_by_part(
    run: Callable[[], Any], model=None, parts: dict[str, Sequence[str]] | None = None
) -> dict[str, float]:
    """GFLOPs of ``run()`` in total and per model part, counted by ``FlopCounterMode``.

    FlopCounterMode attributes FLOPs to the modules it sees called. Inside ``generate`` each
    part is called on its own (``self.vision_model(...)``, ``self.language_model(...)``; T5's
    encoder stack too), so it appears as a root named by its class (the vision model's class,
    ``OPTForCausalLM``, ``T5Stack``); inside a model ``forward`` the parts appear as
    ``<ModelClass>.<prefix>``. A root is given to the part whose top module has its class, else
    to the one part holding a module of that class; a root that would fit several parts is left
    out of every part (the parts then add up to less than ``gflops``) rather than guessed.

    Args:
        run: the work to count, done once (e.g. ``generate`` with a fixed token count).
        model: the model whose parameters get ``requires_grad_(False)`` while counting
            (restored afterwards), and whose parts are looked up.
        parts: part name → module name prefixes (a family's ``parts``); None for the total only.

    Returns:
        ``{"gflops": total, "gflops_<part>": …}`` in GFLOPs (10^9 FLOPs).

    Raises:
        Whatever ``run`` raises.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    flags = []
    if model is not None:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
            run()
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    out = {"gflops": counter.get_total_flops() / 1e9}
    if model is None or not parts:
        return out
    counts = {name: sum(v.values()) for name, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    mods = {part: [m for m in (_submodule(model, pre) for pre in prefixes) if m is not None] for part, prefixes in parts.items()}
    tops = {part: {type(m).__name__ for m in ms} for part, ms in mods.items()}
    inside = {part: {type(sub).__name__ for m in ms for sub in m.modules()} for part, ms in mods.items()}
    totals = dict.fromkeys(parts, 0)
    seen: set[str] = set()
    for key, flops in counts.items():
        if key == "Global" or "." in key:
            continue
        if key == root:  # a forward of the whole model: its parts are its children
            for part, prefixes in parts.items():
                for pre in prefixes:
                    if f"{root}.{pre}" in counts:
                        totals[part] += counts[f"{root}.{pre}"]
                        seen.add(part)
            continue
        owners = [p for p in parts if key in tops[p]] or [p for p in parts if key in inside[p]]
        if len(owners) == 1:
            totals[owners[0]] += flops
            seen.add(owners[0])
    out.update({f"gflops_{p}": totals[p] / 1e9 for p in parts if p in seen})
    return out


def _submodule(model, prefix: str):
    import torch

    obj = model
    for name in prefix.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.nn.Module) else None


def onnx_parameter_count(onnx_dir: str | os.PathLike) -> int:
    """Parameters of an ONNX export: elements of the initializers of every ``*.onnx`` graph.

    Weights shared by two graphs (e.g. the token embedding in ``embed_tokens`` and in the
    decoder's tied output projection) are counted once per graph that holds them, and graph
    constants are counted too, so this is an upper bound of the PyTorch model's count; the
    export's own record (``export.json``) is preferred when it has one. External data is not
    read (only tensor shapes).

    Args:
        onnx_dir: the export folder.

    Returns:
        The element count (0 when the folder holds no graph); graphs whose name contains
        ``optimized`` (ORT-optimised copies) are skipped.
    """
    import onnx

    total = 0
    for f in sorted(Path(onnx_dir).glob("*.onnx")):
        if "optimized" in f.stem:
            continue
        g = onnx.load(str(f), load_external_data=False).graph
        for init in g.initializer:
            n = 1
            for d in init.dims:
                n *= int(d)
            total += n
    return total


def _cpu_attention_flops() -> dict:
    """FLOP formulas FlopCounterMode lacks: CPU SDPA (``_scaled_dot_product_flash_attention_for_cpu``).

    torch 2.13 registers the CUDA SDPA kernels only, so on the CPU every attention matmul counted
    0 FLOPs. The formula is torch's own ``sdpa_flop_count`` (QK^T and AV, 2 FLOPs per multiply-add),
    what the math path (and the meta device) counts.
    """
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: formula}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_latency(
    caption: Callable[[list], list[str]],
    images: Sequence,
    batch_sizes: Sequence[int],
    warmup: int = 1,
    repeats: int = 5,
    count_tokens: Callable[[list[str]], int] | None = None,
) -> dict[str, Any]:
    """Latency per caption after warm-up, at each batch size.

    Args:
        caption: images → captions (a Captioner's ``caption``).
        images: images to draw batches from (cycled).
        batch_sizes: e.g. ``[1, 8]``.
        warmup: untimed calls per batch size.
        repeats: timed calls per batch size.
        count_tokens: captions → generated token count (for ``tokens_per_s``).

    Returns:
        ``latency_p50_s`` / ``latency_p95_s`` (seconds per caption at the first batch size:
        each timed call's wall time divided by its batch size), ``tokens_per_s`` (generated
        tokens per second at the first batch size; NaN without ``count_tokens``),
        ``latency_batch_size`` and ``by_batch_size``:
        ``{"<bs>": {"p50_s", "p95_s", "captions_per_s"[, "tokens_per_s"]}}``. Empty when
        ``images`` is empty.
    """
    if not images:
        return {}
    by_bs: dict[str, dict[str, float]] = {}
    tokens_per_s = math.nan
    for k, bs in enumerate(batch_sizes):
        batch = [images[i % len(images)] for i in range(bs)]
        for _ in range(warmup):
            caption(batch)
        per_caption, total_tokens, total_time = [], 0, 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            caps = caption(batch)
            dt = time.perf_counter() - t0
            per_caption.append(dt / bs)
            total_time += dt
            if count_tokens is not None:
                total_tokens += count_tokens(caps)
        by_bs[str(bs)] = {
            "p50_s": percentile(per_caption, 50),
            "p95_s": percentile(per_caption, 95),
            "captions_per_s": bs * repeats / total_time if total_time > 0 else math.nan,
        }
        if count_tokens is not None and total_time > 0:
            by_bs[str(bs)]["tokens_per_s"] = total_tokens / total_time
            if k == 0:
                tokens_per_s = total_tokens / total_time
    first = by_bs[str(batch_sizes[0])]
    return {
        "latency_p50_s": first["p50_s"],
        "latency_p95_s": first["p95_s"],
        "tokens_per_s": tokens_per_s,
        "latency_batch_size": batch_sizes[0],
        "by_batch_size": by_bs,
    }


class PeakMemory:
    """Peak memory of a block: ``with PeakMemory() as pm: …; pm.rss_mb, pm.cuda_mb``.

    On Linux the process's high-water mark (VmHWM) is reset at entry by writing ``5`` to
    ``/proc/self/clear_refs`` and read at exit; where the reset is not allowed the value is the
    process-wide peak so far (``reset`` is False then). CUDA: ``torch.cuda.max_memory_allocated``
    after ``reset_peak_memory_stats``.
    """

    def __init__(self):
        self.rss_mb = math.nan
        self.cuda_mb: float | None = None
        self.reset = False

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except Exception:
            pass
        return self

    def __exit__(self, *exc):
        self.rss_mb = peak_rss_mb()
        try:
            import torch

            if torch.cuda.is_available():
                self.cuda_mb = torch.cuda.max_memory_allocated() / 1e6
        except Exception:
            pass
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (10^6 bytes)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def size_on_disk_mb(path) -> float:
    """Bytes of the files under ``path`` (a file, a folder, or a list of files) in MB (10^6),
    hard-linked files counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    if isinstance(path, (list, tuple)):
        files = [Path(f) for f in path]
    else:
        p = Path(path)
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total / 1e6
