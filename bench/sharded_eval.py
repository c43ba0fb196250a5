"""Sharded evaluation: captioning throughput of N processes (``accelerate launch``) against one.

The ``shapes-teacher`` preset evaluates ``--images`` synthetic images (batch 12, 12 new tokens, no
latency or GFLOPs measurement) once in one process and once in ``--processes`` processes under
``accelerate launch --multi_gpu`` (on a machine without GPUs accelerate uses gloo on the CPU), every
process with ``--threads`` torch threads. Each process captions its share of the batches, the main
process gathers the captions in order and scores them once. Printed: the captioning wall time
(``avg_inference_s`` × images: the slowest share, gathering included), images per second, the ratio
of N processes to 1, and whether the captions and metrics are the same.

Usage::

    python bench/sharded_eval.py [--images 64] [--processes 2] [--threads 1]

On a machine with as many free cores as processes × threads the ratio approaches N; on a shared
machine it says what that machine gives.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
name: sharded_bench
model: shapes-teacher
seed: 0
data:
  format: synthetic
  eval: {{size: {images}, seed: 2000, image_size: 64}}
generation: {{max_new_tokens: 12, batch_size: 12}}
stages:
  - type: evaluate
    label: eval
    metrics: [bleu_4, cider]
    characteristics: {{latency: null, gflops: false}}
"""


def run(folder: Path, nproc: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    args = ["-m", "compressor.cli", "-q", "apply", str(folder / "r.yaml"), "--out", str(folder / f"run{nproc}")]
    cmd = [sys.executable, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{nproc} process(es): exit {r.returncode}\n{r.stderr[-3000:]}")
    stage = next((folder / f"run{nproc}" / "stages").glob("00-evaluate-*"))
    record = json.loads((stage / "eval.json").read_text())
    return {"record": record, "predictions": (stage / "predictions.json").read_text()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    print(f"1-minute load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "r.yaml").write_text(RECIPE.format(images=args.images))
        res = {n: run(folder, n, args.threads) for n in (1, args.processes)}
    rows = {}
    for n, r in res.items():
        secs = r["record"]["characteristics"]["avg_inference_s"] * args.images
        rows[n] = args.images / secs
        print(f"{n} process(es) x {args.threads} thread(s): captioning {secs:.1f} s, {rows[n]:.2f} images/s")
    one, many = res[1], res[args.processes]
    same = one["predictions"] == many["predictions"] and one["record"]["metrics"] == many["record"]["metrics"]
    print(f"throughput ratio {args.processes} processes / 1: {rows[args.processes] / rows[1]:.2f}; "
          f"same captions and metrics: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
