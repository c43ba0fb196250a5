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
import statistics
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
        model: if given, its parameters are set ``requires_grad_(False)`` during counting.

    Returns:
        GFLOPs (multiply-add counted as 2 FLOPs, torch's convention).
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
        return counter.get_total_flops() / 1e9
    finally:
        for p, f in flags:
            p.requires_grad_(f)


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
        ``latency_p50_s`` / ``latency_p95_s`` (seconds per caption at the first batch size),
        ``tokens_per_s`` (at the first batch size), and ``by_batch_size``:
        ``{bs: {"p50_s", "p95_s", "captions_per_s"}}``.
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
        if k == 0 and count_tokens is not None and total_time > 0:
            tokens_per_s = total_tokens / total_time
    first = by_bs[str(batch_sizes[0])]
    return {
        "latency_p50_s": first["p50_s"],
        "latency_p95_s": first["p95_s"],
        "tokens_per_s": tokens_per_s,
        "latency_batch_size": batch_sizes[0],
        "by_batch_size": by_bs,
        "latency_stdev_s": statistics.pstdev([v["p50_s"] for v in by_bs.values()]) if len(by_bs) > 1 else 0.0,
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


def size_on_disk_mb(path: str | os.PathLike) -> float:
    """Bytes of the files under ``path`` in MB (10^6), hard-linked files counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total / 1e6
