"""Real-size ONNX export: the pruned BLIP-2 OPT-2.7B ("LLM28+Q8"), random bf16 weights, within 24 GiB.

Two steps, each in its own process:

1. untimed: build BLIP-2 OPT-2.7B from its published config
   (``compressor/families/configs/blip2-opt-2.7b.config.json``) with random bf16 weights, remove
   the top 4 OPT layers and the top 4 Q-Former layers (``compressor.surgery``), cast every weight
   to bf16 (the published config builds the OPT part in float16 otherwise, and loading that as
   bf16 converts, i.e. copies, 4.7 GB), and ``save_pretrained`` it (6.8 GB) with a processor of
   the right image size and query count;
2. measured, in a FRESH process: ``export_onnx`` with the dynamo exporter, external data, weights
   kept in bf16 (ONNX Runtime's CPU provider cannot run bf16, so validation is the graph and
   signature check; the fp32 twin check is off: an fp32 copy would need 13.6 GB more). The
   checkpoint is above 1 GB, so ``isolate_graphs: auto`` exports each graph in a fresh
   subprocess of that process (``--isolate-graphs never`` measures the one-process export).

Peak memory is measured across processes: the export process's own ``ru_maxrss`` plus the largest
``ru_maxrss`` of its children (``RUSAGE_CHILDREN``, the graph subprocesses). The two peaks need not
coincide, so the sum is an UPPER BOUND on the peak resident memory of the export's process tree
(``ru_maxrss`` counts the memory-mapped checkpoint pages a process touches). The figure is that
bound / the exported weights' bytes (target ≤ 1.2); each graph's child peak is also shown against
that graph's own weight bytes.

Usage::

    python -m bench.real_size_export --work /tmp/vlmc-real      # ~8-15 GB RAM, several minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.real_size_export")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "compressor" / "families" / "configs" / "blip2-opt-2.7b.config.json"


def build(model_dir: Path) -> dict:
    """Step 1 (untimed): the random pruned checkpoint."""
    import torch
    from transformers import AutoConfig

    from compressor.families import family_for_config
    from compressor.models.processors import blip2_processor, bpe_tokenizer
    from compressor.surgery import remove_layers

    config = AutoConfig.from_pretrained(str(CONFIG))
    family = family_for_config(config)
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        model = family.model_cls()(config)
    finally:
        torch.set_default_dtype(prev)
    # the published config's text_config says float16, and transformers builds the OPT part in it:
    # without this the "bf16" checkpoint held a float16 language model (from_pretrained then
    # converted 4.7 GB to bf16 on every load, a copy beside the touched float16 pages)
    model.to(torch.bfloat16)
    for sub in (model.config, *(getattr(model.config, k) for k in model.config.sub_configs)):
        sub.dtype = torch.bfloat16
    model.eval()
    qf = config.qformer_config.num_hidden_layers
    lm = config.text_config.num_hidden_layers
    remove_layers(model, family, "language_model", list(range(lm - 4, lm)))
    remove_layers(model, family, "qformer", list(range(qf - 4, qf)))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    # the real OPT tokenizer is not reachable offline: the preset's, with the real image size and query count
    blip2_processor(bpe_tokenizer("opt"), int(config.vision_config.image_size), int(config.num_query_tokens)).save_pretrained(
        model_dir
    )
    return {"params": params, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "build_seconds": round(time.perf_counter() - t0, 1)}


def export_child(model_dir: Path, out: Path, report: Path, isolate: str) -> None:
    """Step 2, run in a fresh process: export, and report wall time and peak RSS (see the module docstring)."""
    from exporters.onnx import OnnxOptions, export_onnx

    t0 = time.perf_counter()
    stats: dict = {}
    opts = OnnxOptions(exporter="dynamo", optimize=False, twin_check=False, isolate_graphs=isolate)
    meta = export_onnx(model_dir, out, opts, stats=stats)
    wall = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child's
    per_graph = {k: _weight_bytes(out / v["onnx"]) for k, v in meta["graphs"].items()}
    weights = sum(per_graph.values())
    graphs = {}
    for k, v in meta["graphs"].items():
        graphs[k] = {"bytes": v["bytes"], "weight_bytes": per_graph[k], "external_data": v["external_data"]}
        child = stats.get("children", {}).get(k)
        if child:
            graphs[k].update(child_peak_rss_bytes=child["peak_rss_bytes"], child_seconds=child["seconds"],
                             child_peak_over_weights=round(child["peak_rss_bytes"] / per_graph[k], 3))
    report.write_text(
        json.dumps(
            {
                "isolated": stats["isolated"],
                "wall_seconds": round(wall, 1),
                "parent_peak_rss_bytes": own,
                "largest_child_peak_rss_bytes": children,
                "peak_rss_bytes": own + children,
                "exported_weight_bytes": weights,
                "peak_rss_over_weights": round((own + children) / weights, 3),
                "graphs": graphs,
                "dtype": meta["dtype"],
                "seconds": meta["seconds"],
            },
            indent=2,
        )
    )


def _weight_bytes(path: Path) -> int:
    """Bytes of every initializer of one exported graph (external data read from the headers only)."""
    import onnx

    total = 0
    m = onnx.load(str(path), load_external_data=False)
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in init.external_data}.get("length", 0))
        else:
            total += len(init.raw_data) if init.raw_data else onnx.numpy_helper.to_array(init).nbytes
    return total


def _check_dtype(folder: Path) -> dict:
    import onnx

    kinds: dict[str, int] = {}
    for f in sorted(folder.glob("*.onnx")):
        m = onnx.load(str(f), load_external_data=False)
        for init in m.graph.initializer:
            name = onnx.TensorProto.DataType.Name(init.data_type)
            kinds[name] = kinds.get(name, 0) + 1
    return kinds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("VLMC_REAL_DIR", "/tmp/vlmc-real")))
    ap.add_argument("--keep", action="store_true", help="keep the export (the checkpoint is always kept for reruns)")
    ap.add_argument("--isolate-graphs", choices=["auto", "always", "never"], default="auto",
                    help="OnnxOptions.isolate_graphs (never: the one-process export, for comparison)")
    ap.add_argument("--_build", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_export", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args._build:
        print(json.dumps(build(args._build)))
        return 0
    if args._export:
        export_child(*(Path(a) for a in args._export[:3]), args._export[3])
        return 0
    work = args.work
    model_dir, out, report = work / "llm28-q8-bf16", work / "onnx", work / "export_report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not (model_dir / "config.json").is_file():
        log.info("step 1 (untimed): building the random pruned BLIP-2 OPT-2.7B in bf16 …")
        res = subprocess.run([sys.executable, "-m", "bench.real_size_export", "--_build", str(model_dir)], env=env,
                             cwd=REPO, capture_output=True, text=True)
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        log.info("built: %s", res.stdout.strip().splitlines()[-1])
    ckpt = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    log.info("step 2 (measured, fresh process): dynamo ONNX export of %.2f GB of bf16 weights …", ckpt / 1e9)
    res = subprocess.run([sys.executable, "-m", "bench.real_size_export", "--_export", str(model_dir), str(out), str(report),
                          args.isolate_graphs],
                         env=env, cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr[-3000:])
    r = json.loads(report.read_text())
    r["checkpoint_bytes"] = ckpt
    r["initializer_dtypes"] = _check_dtype(out)
    report.write_text(json.dumps(r, indent=2))
    mode = "one graph per subprocess" if r["isolated"] else "one process"
    print(f"\nReal-size export: BLIP-2 OPT-2.7B LLM28+Q8, random bf16 weights, dynamo exporter, external data, {mode}")
    print(f"  checkpoint            {ckpt / 1e9:8.2f} GB (safetensors)")
    print(f"  exported weights      {r['exported_weight_bytes'] / 1e9:8.2f} GB ({r['initializer_dtypes']})")
    for g, v in r["graphs"].items():
        line = f"    {g:18s} {v['weight_bytes'] / 1e9:8.2f} GB  external data: {v['external_data']}"
        if "child_peak_rss_bytes" in v:
            line += (f"  child peak RSS {v['child_peak_rss_bytes'] / 1e9:6.2f} GB = {v['child_peak_over_weights']:.3f} × "
                     f"its weights, {v['child_seconds']:.1f} s")
        print(line)
    print(f"  peak RSS (upper bound) {r['peak_rss_bytes'] / 1e9:7.2f} GB = export process {r['parent_peak_rss_bytes'] / 1e9:.2f} GB "
          f"+ largest child {r['largest_child_peak_rss_bytes'] / 1e9:.2f} GB")
    print(f"                        → {r['peak_rss_over_weights']:.3f} × exported weights (target ≤ 1.2; the two peaks "
          "need not coincide, so the tree's true peak is at most this)")
    print(f"  wall time             {r['wall_seconds']:8.1f} s  (per step: {r['seconds']})")
    if not args.keep:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
