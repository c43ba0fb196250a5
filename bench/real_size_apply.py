"""Real size: `compress apply` on BLIP-2 OPT-2.7B (published config, random bf16 weights).

Prints the peak resident memory of the run divided by the input checkpoint's bytes. Target
<= 1.0: safetensors are memory-mapped, so loading costs nothing until a page is read; slicing
layers out and saving touches each kept weight once. Any step that holds a second copy (a
reload compared against the model, a dtype cast, a state_dict clone) shows up as a ratio near 2.

Steps:

1. (untimed, its own process) write the random bf16 checkpoint from the shipped published config,
   one tensor at a time into 2 GB shards, so writing never holds the model in memory;
2. in a fresh process, ``compress apply`` a recipe that loads it, removes the top 4 OPT and the top
   4 Q-Former layers (LLM28+Q8: 3.7447B -> 3.3950B parameters) and exports safetensors; the parent
   samples the child's resident memory (VmRSS, every 50 ms) and reads its peak (ru_maxrss);
3. for reference, in a fresh process, plain transformers: ``from_pretrained`` + slice +
   ``save_pretrained`` (stack-facts §10 measured 0.96 for it).

Needs about 8 GB of free memory, 30 GB of disk and several minutes on 2 cores:
    python bench/real_size_apply.py [--out bench/out/real_size] [--no-reference] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "compressor" / "families" / "configs" / "blip2-opt-2.7b.config.json"
SHARD_BYTES = 2 * 1024**3

RECIPE = """\
name: real_size_llm28_q8
model: {model}
dtype: bfloat16
device: cpu
stages:
  - type: remove_layers
    qformer: {{drop_top: 4}}
    language_model: {{drop_top: 4}}
  - type: export
    formats: [safetensors]
report: {{plots: false}}
"""

REFERENCE = """\
import sys, torch
from transformers import Blip2ForConditionalGeneration
m = Blip2ForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
qf, dec = m.qformer.encoder, m.language_model.model.decoder
qf.layer = torch.nn.ModuleList(list(qf.layer)[:-4]); m.config.qformer_config.num_hidden_layers -= 4
dec.layers = torch.nn.ModuleList(list(dec.layers)[:-4]); m.config.text_config.num_hidden_layers -= 4
for j, l in enumerate(dec.layers):
    l.self_attn.layer_idx = j
m.save_pretrained(sys.argv[2])
"""


def write_checkpoint(out: Path, seed: int = 0, config=None, dtype: str = "bfloat16") -> int:
    """Write the random bf16 checkpoint (shards + index + config); returns its bytes.

    Args:
        out: the folder to create.
        seed: seed of the random weights.
        config: a ``Blip2Config`` (default: the shipped published BLIP-2 OPT-2.7B config).
        dtype: ``bfloat16`` (the published recipes' working dtype) or ``float32``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, Blip2ForConditionalGeneration

    config = config if config is not None else AutoConfig.from_pretrained(str(CONFIG))
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    seen: set[int] = set()
    shapes = []
    for name, t in model.state_dict(keep_vars=True).items():  # a tied weight is the same object: kept once
        if id(t) not in seen:
            seen.add(id(t))
            shapes.append((name, tuple(t.shape), t.dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shard: dict = {}
    size = 0
    index: dict[str, str] = {}
    files: list[str] = []

    def flush():
        nonlocal shard, size
        if not shard:
            return
        fname = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        files.append(fname)
        for k in shard:
            index[k] = fname
        shard, size = {}, 0

    for name, shape, tdtype in shapes:
        if tdtype.is_floating_point:
            t = (torch.randn(shape, generator=gen) * 0.02).to(getattr(torch, dtype))
        else:
            t = torch.zeros(shape, dtype=tdtype)
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    n = len(files)
    for i, f in enumerate(files):  # transformers' shard naming: model-00001-of-0000N.safetensors
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f, tmp / new)
        for k, v in index.items():
            if v == f:
                index[k] = new
    total = sum((tmp / f).stat().st_size for f in os.listdir(tmp))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    config.dtype = dtype
    config.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return total


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its wall time, sampled peak VmRSS and ru_maxrss (bytes)."""
    peak = 0
    done = threading.Event()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            done.wait(0.05)

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    seconds = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"rc": proc.returncode, "seconds": seconds, "peak_sampled": peak,
            "maxrss": maxrss if maxrss > before * 1024 else None, "log": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "real_size")
    ap.add_argument("--no-reference", action="store_true", help="skip the plain-transformers reference run")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (about 28 GB)")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    ckpt = out / "input"
    if args.write_only:
        write_checkpoint(ckpt)
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    if not (ckpt / "model.safetensors.index.json").is_file():
        print("writing the random bf16 BLIP-2 OPT-2.7B checkpoint (untimed) ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--out", str(out), "--write-only"], check=True, env=env)
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    size = checkpoint_bytes(ckpt)
    recipe = out / "real_size.yaml"
    recipe.write_text(RECIPE.format(model=ckpt))
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"input checkpoint: {size / 1e9:.2f} GB; running compress apply in a fresh process ...", flush=True)
    r = run_measured([sys.executable, "-m", "compressor.cli", "apply", str(recipe), "--out", str(run_dir)], env)
    if r["rc"] != 0:
        print(r["log"][-3000:])
        print(f"compress apply failed with exit {r['rc']}")
        return 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    final = run_dir / "final"
    results = {"input_bytes": size, "apply": {k: v for k, v in r.items() if k != "log"},
               "stages": {f"{s['index']}-{s['type']}": {"seconds": s["seconds"], "peak_rss_mb": s["peak_rss_mb"]}
                          for s in manifest["stages"]},
               "final_bytes": checkpoint_bytes(final)}
    same_inode = all(
        (final / p.name).stat().st_ino == p.stat().st_ino
        for p in next(run_dir.glob("stages/*-remove_layers-*/model")).glob("*.safetensors")
    )
    results["final_hard_linked"] = same_inode
    if not args.no_reference:
        print("reference: plain from_pretrained + slice + save_pretrained in a fresh process ...", flush=True)
        ref_out = out / "reference"
        shutil.rmtree(ref_out, ignore_errors=True)
        rr = run_measured([sys.executable, "-c", REFERENCE, str(ckpt), str(ref_out)], env)
        results["reference"] = {k: v for k, v in rr.items() if k != "log"}
        if rr["rc"] != 0:
            print(rr["log"][-2000:])
        shutil.rmtree(ref_out, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    def ratio(res: dict) -> str:
        peak = max(res["peak_sampled"], res["maxrss"] or 0)
        return f"{peak / size:.3f} (peak RSS {peak / 1e9:.2f} GB, {res['seconds']:.0f} s)"

    print(f"\ninput checkpoint           {size / 1e9:.3f} GB ({size:,} bytes)")
    print(f"final/ (LLM28+Q8)          {results['final_bytes'] / 1e9:.3f} GB, hard-linked from the stage: {same_inode}")
    print(f"compress apply             peak RSS / input = {ratio(results['apply'])}")
    for k, v in results["stages"].items():
        print(f"  stage {k:22} {v['seconds']:7.1f} s   peak RSS {v['peak_rss_mb'] / 1e3:6.2f} GB")
    if "reference" in results:
        print(f"plain transformers         peak RSS / input = {ratio(results['reference'])}")
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
