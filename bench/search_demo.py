"""The acceptance run of ``compress search``: ``recipes/demo_search.yaml`` against the demo's hand-picked cut.

Runs ``compress search recipes/demo_search.yaml`` (the demo's teacher, data, gate and heal budget;
a search over the Q-Former's and the language model's removal counts) in a fresh process, times it,
and compares the chosen trial with the demo's hand-picked cut (Q-Former -2, OPT -2; its parameter
count from ``compress plan``'s meta-device model of ``recipes/demo.yaml``). Prints one table: wall
time and the 1-minute load (a busy machine stretches every trial), the trials by state, the Pareto
front, and whether the search found a passing trial with fewer parameters than the hand-picked cut.

Usage: ``python -m bench.search_demo [--trials 20] [--workers 1] [--out runs/bench-search-demo]``;
about 25 minutes on 2 idle CPU cores for 20 trials. ``--resume`` continues a killed search in the
same folder (otherwise the folder is cleared first).
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

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def hand_picked_params() -> int:
    """Parameters of the demo's hand-picked cut, from the meta-device plan of recipes/demo.yaml."""
    from compressor.planning import plan_recipe
    from compressor.recipe.loader import load_recipe

    return int(plan_recipe(load_recipe(REPO / "recipes" / "demo.yaml"), gflops=False)["after"]["params_total"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-search-demo")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.resume:
        shutil.rmtree(args.out)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "compressor.cli", "-q", "search", str(REPO / "recipes" / "demo_search.yaml"),
           "--trials", str(args.trials), "--workers", str(args.workers), "--out", str(args.out)]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]
    res = json.loads((args.out / "pareto.json").read_text())
    hand = hand_picked_params()
    print(f"compress search demo_search: {wall / 60:.1f} min wall (exit {rc}), 1-minute load {load:.1f} on "
          f"{os.cpu_count()} cores; trials run {res['trials']}: " + ", ".join(f"{n} {s}" for s, n in res["states"].items())
          + f"; {res.get('repeated_draws', 0)} repeated draws told, not run")
    keys = list(res["space"])
    q, c = res["objectives"][0], res["objectives"][-1]
    print(f"\n| trial | {' | '.join(keys)} | {q} | {c} | passes |\n|" + "---|" * (len(keys) + 4))
    for r in res["front"]:
        print(f"| {r['trial']} | " + " | ".join(str(r[k]) for k in keys) + f" | {r[q]:.4g} | {r[c]:.6g} | "
              f"{'yes' if r['passed'] else 'no'} |")
    base = res.get("baseline") or {}
    print(f"\nbaseline: {q} {base.get(q, float('nan')):.4g}, {c} {base.get(c, float('nan')):.6g}; hand-picked cut "
          f"(Q-Former -2, OPT -2): params_total {hand}")
    ch = res["chosen"]
    if ch is None:
        print("no trial passes the gate: the Pareto plot (pareto.png) shows none exists in this space")
    else:
        smaller = ch["params_total"] < hand if c == "params_total" else None
        print(f"chosen: trial {ch['trial']} ({', '.join(f'{k}={ch[k]}' for k in keys)}): {q} {ch[q]:.4g}, "
              f"params_total {ch.get('params_total', float('nan')):.6g} = {ch.get('params_total', 0) / hand:.3f} x the "
              f"hand-picked cut; " + ("smaller than the hand-picked cut" if smaller else "not smaller than the hand-picked cut"))
    print(f"files: {args.out / 'report.md'}, {args.out / 'pareto.png'}, {args.out / 'best'}")
    return 0 if rc in (0, 1) else rc


if __name__ == "__main__":
    sys.exit(main())
