"""Loader workers: data-path time against model time per training step, 0 workers beside N.

The SmolLM2 BLIP-2 of ``recipes/smollm2_coco.yaml`` (its ``model: assemble`` section: the real
SmolLM2-135M-Instruct language model, a MiniLM Q-Former, a small random ViT) trains its LoRA stage
(``lora_finetune``, batch 8, the recipe's LoRA) for ``--steps`` steps on real COCO images (JPEG
decoding and the BLIP-2 processor at 224 px in the data path), once with ``data.num_workers: 0``
and once with ``--workers`` loader workers, each in a fresh ``compress apply`` process. The
training summary's ``data_seconds`` (the training loop waiting for its next batch) and
``train_seconds`` (the whole loop) are printed side by side, per step, with the losses (which
must be equal: the same batches in the same order).

Usage::

    python bench/loader_workers.py --coco /path/to/coco-mini [--steps 6] [--workers 2]

``--coco`` is a folder in the COCO captions layout (``captions_train2017.json``, ``train2017/``).
On a machine whose cores the model already keeps busy, workers cannot add CPU: the figure that
matters there is the data share of a step with 0 workers (what workers can hide on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def recipe(coco: Path, steps: int, workers: int, model: str | None) -> dict:
    base = yaml.safe_load((REPO / "recipes" / "smollm2_coco.yaml").read_text())
    lora = base["stages"][0]
    return {
        "name": f"loader_workers_{workers}",
        "model": model or base["model"],
        "dtype": base["dtype"],
        "seed": 0,
        "data": {"format": "coco", "num_workers": workers,
                 "train": {"annotations": str(coco / "captions_train2017.json"), "images": str(coco / "train2017")}},
        "stages": [{**lora, "train": {**lora["train"], "steps": steps, "warmup_steps": 0}}],
    }


def run(coco: Path, steps: int, workers: int, out: Path, model: str | None = None) -> dict:
    folder = out / f"w{workers}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe(coco, steps, workers, model)))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "compressor.cli", "-q", "apply", str(folder / "r.yaml"), "--out",
                        str(folder / "run")], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:])
        raise SystemExit(f"workers={workers}: compress apply exited {r.returncode}")
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    summ = manifest["stages"][0]["summary"]
    loss = json.loads(next((folder / "run" / "stages").glob("00-*/loss.json")).read_text())
    assembled = next((folder / "run" / "inputs").glob("assembled-*"), None)
    return {"model": str(assembled) if assembled else model, "wall": time.perf_counter() - t0, "train_s": summ["train_seconds"], "data_s": summ["data_seconds"],
            "steps": summ["steps"], "losses": [v for _, v in loss["loss"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "loader_workers")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    print(f"1-minute load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    # The second run trains the model the first one assembled: assembling again is not bit-exact
    # (the dequantised GGUF embedding differs by ~1e-5), which would show in the losses.
    res = {0: run(args.coco.resolve(), args.steps, 0, out)}
    res[args.workers] = run(args.coco.resolve(), args.steps, args.workers, out, model=res[0]["model"])
    print("| workers | s / step | data s / step | data share | losses |")
    print("|---|---|---|---|---|")
    for w, r in res.items():
        n = r["steps"]
        print(f"| {w} | {r['train_s'] / n:.2f} | {r['data_s'] / n:.3f} | {r['data_s'] / r['train_s']:.1%} | "
              f"{[round(x, 4) for x in r['losses']] if r['losses'] else '—'} |")
    same = res[0]["losses"] == res[args.workers]["losses"]
    print(f"losses equal with 0 and {args.workers} workers: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
