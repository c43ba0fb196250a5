"""Layer removal and healing on the demo's shapes teacher: what removal costs, what healing gives back.

Runs the real pipeline (``compressor.pipeline.runner.Runner``) on the shipped ``shapes-teacher``
with the demo's data and heal settings (recipes/demo.yaml), one run directory per removal
setting, so the teacher's evaluation and the removal are computed once and shared by both heals:

* the teacher's CIDEr on held-out synthetic shapes (seed 2000, 256 images: larger than the demo's
  64 so that differences of a few points are not noise);
* right after removing language-model layers: 25% of them (2 of 8) by position (``drop_top``),
  by ``block_influence`` and by ``angular_distance``; the middle two (the harder 25% setting, as
  the top ones cost nothing on this teacher); 50% (4 of 8) by ``drop_top`` and ``block_influence``;
  and the demo's Q-Former top 2 + language-model top 2;
* after healing each (LoRA as in the demo) with ``loss: ce`` and ``loss: distill`` (teacher =
  the uncompressed model) for the same number of steps, against the references and against
  the teacher's own captions (``teacher_cider``: how closely the student imitates the teacher), with the CIDEr curve every
  ``--eval-every`` steps from the in-training evaluation (same held-out set, no checkpoint
  selection: the last step's adapter is merged and scored).

Every heal runs once per ``--seeds`` value (LoRA initialisation and batch order), because one
run's CIDEr moves by ±10 from step to step; the table shows the mean and the range.

Usage: ``python -m bench.healing [--steps 100] [--eval-every 25] [--seeds 0 1 2] [--out runs/bench-healing]``.
Prints one table; ``results.json`` in ``--out`` holds every figure. About 25 minutes on 2 CPU
cores with ``OMP_NUM_THREADS=1`` (the default here: tiny models run 10-25x slower with two
OpenMP threads on a busy machine, and the figures do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

BASE = """\
name: {name}
model: shapes-teacher
seed: {seed}
data:
  format: synthetic
  train: {{size: 512, seed: 300}}
  val: {{size: {eval_size}, seed: 2000}}
  eval: {{size: {eval_size}, seed: 2000}}
  calibration: {{size: 64, seed: 300}}
generation: {{num_beams: 1, max_new_tokens: 20, batch_size: 32}}
stages:
  - type: evaluate
    label: teacher
    metrics: [bleu_4, cider]
    characteristics: {{latency: null, gflops: false}}
  - type: remove_layers
{removal}
    calibration: {{batches: 4, batch_size: 16}}
  - type: evaluate
    label: removed
    metrics: [bleu_4, cider, teacher_cider]
    teacher: teacher
    characteristics: {{latency: null, gflops: false}}
"""
HEAL = """\
  - type: heal
    trainable: lora
    parts: [qformer.self_attention, qformer.cross_attention, qformer.mlp, projection,
            language_model.attention, language_model.mlp]
    lora: {{r: 32, lora_alpha: 64, lora_dropout: 0.0}}
    loss: {loss}
{distill}    train: {{steps: {steps}, batch_size: 16, learning_rate: 3.0e-3, warmup_steps: 10, eval_every: {eval_every}}}
  - type: merge_adapters
  - type: evaluate
    label: healed
    metrics: [bleu_4, cider, teacher_cider]
    teacher: teacher
    characteristics: {{latency: null, gflops: false}}
"""
DISTILL = "    distill: {{teacher: teacher, temperature: {temperature}, kl_weight: {kl_weight}, ce_weight: {ce_weight}}}\n"
#: The demo's distillation settings (recipes/demo.yaml); --temperature / --kl-weight / --ce-weight change them.
DISTILL_DEFAULTS = {"temperature": 2.0, "kl_weight": 1.0, "ce_weight": 0.5}

#: name → (remove_layers body, heal it?)
SETTINGS = {
    "lm 25% drop_top 2": ("    language_model: {drop_top: 2}", False),
    "lm 25% block_influence 2": ("    language_model: {count: 2, select: block_influence}", False),
    "lm 25% angular_distance 2": ("    language_model: {count: 2, select: angular_distance}", False),
    "lm 25% middle [3, 4]": ("    language_model: {layers: [3, 4]}", True),
    "lm 50% drop_top 4": ("    language_model: {drop_top: 4}", True),
    "lm 50% block_influence 4": ("    language_model: {count: 4, select: block_influence}", True),
    "qformer 2 + lm 2 (demo)": ("    qformer: {drop_top: 2}\n    language_model: {drop_top: 2}", True),
}


def run_setting(out: Path, name: str, removal: str, heal: bool, steps: int, eval_every: int, eval_size: int,
                seeds: list[int], distill: dict | None = None) -> dict:
    """Run one setting (teacher → removal → heal with ce, then distill; once per seed) and collect its figures.

    The recipe seed changes the LoRA initialisation and the order of the training batches; the
    teacher, the removal and the held-out set are the same for every seed.
    """
    from compressor.pipeline.runner import Runner
    from compressor.recipe.loader import load_recipe

    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    result: dict = {"setting": name}
    for seed in seeds if heal else seeds[:1]:
        run_dir = out / f"{slug}-seed{seed}"
        for loss in ("ce", "distill") if heal else ("ce",):
            path = out / f"{slug}-seed{seed}-{loss}.yaml"
            text = BASE.format(name=slug, seed=seed, eval_size=eval_size, removal=removal)
            if heal:
                d = DISTILL.format(**{**DISTILL_DEFAULTS, **(distill or {})}) if loss == "distill" else ""
                text += HEAL.format(loss=loss, distill=d, steps=steps, eval_every=eval_every)
            path.write_text(text)
            runner = Runner(load_recipe(path), run_dir, progress=False)
            t0 = time.perf_counter()
            report = runner.run()
            evals = report["evaluations"]
            result["teacher"] = evals["teacher"]["metrics"]["cider"]
            result["removed"] = evals["removed"]["metrics"]["cider"]
            result["removed_teacher_cider"] = evals["removed"]["metrics"]["teacher_cider"]
            removal_json = json.loads(next((run_dir / "stages").glob("01-remove_layers-*/removal.json")).read_text())
            result["layers"] = {r["part"]: r["removed"] for r in removal_json["removed"]}
            if heal:
                heal_dir = run_dir / "stages" / next(r.folder for r in runner.records if r.type == "heal")
                curve = json.loads((heal_dir / "loss.json").read_text())["evals"]
                result.setdefault(loss, []).append({
                    "seed": seed, "final": evals["healed"]["metrics"]["cider"],
                    "teacher_cider": evals["healed"]["metrics"]["teacher_cider"], "curve": {s: m["cider"] for s, m in curve},
                    "seconds": round(time.perf_counter() - t0, 1),
                })
    return result


def _mean(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def _stats(runs: list[dict], teacher: float) -> str:
    vals = [r["final"] for r in runs]
    mean = sum(vals) / len(vals)
    spread = f" [{min(vals):.0f}-{max(vals):.0f}]" if len(vals) > 1 else ""
    return f"{mean:.1f} ({100 * mean / teacher:.0f}%){spread}"


def table(results: list[dict], steps: int, seeds: list[int]) -> str:
    teacher = results[0]["teacher"]
    head = (f"teacher CIDEr {teacher:.1f} (held-out shapes, greedy); healing: mean over seeds {seeds} "
            "[min-max], % of the teacher; teacher agreement = CIDEr against the teacher's own captions\n")
    cols = ["setting", "removed layers", "after removal", f"heal ce ({steps} steps)", f"heal distill ({steps} steps)",
            "distill > ce", "teacher agreement: removed / ce / distill"]
    rows = []
    for r in results:
        layers = "; ".join(f"{p} {v}" for p, v in r["layers"].items())
        after = f"{r['removed']:.1f} ({100 * r['removed'] / teacher:.0f}%)"
        if "ce" in r:
            wins = sum(d["final"] > c["final"] for c, d in zip(r["ce"], r["distill"]))
            agree = " / ".join(f"{v:.0f}" for v in (r["removed_teacher_cider"], _mean(r["ce"], "teacher_cider"),
                                                          _mean(r["distill"], "teacher_cider")))
            rows.append([r["setting"], layers, after, _stats(r["ce"], teacher), _stats(r["distill"], teacher),
                         f"{wins} of {len(r['ce'])} seeds", agree])
        else:
            rows.append([r["setting"], layers, after, "-", "-", "-", f"{r['removed_teacher_cider']:.0f}"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    curves = ["", "CIDEr during healing, mean over seeds (in-training evaluation on the same held-out set):"]
    for r in results:
        for loss in ("ce", "distill"):
            if loss in r:
                steps_seen = list(r[loss][0]["curve"])
                pts = ", ".join(f"{s}: {sum(x['curve'][s] for x in r[loss]) / len(r[loss]):.1f}" for s in steps_seen)
                curves.append(f"  {r['setting']:<28} {loss:<8} {pts}")
    return head + "\n".join(lines + curves)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="Healing steps (equal for ce and distill).")
    parser.add_argument("--eval-every", type=int, default=25, help="In-training evaluation interval.")
    parser.add_argument("--eval-size", type=int, default=256, help="Held-out images scored.")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="Subset of settings to run.")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="Recipe seeds of the heals.")
    for key, value in DISTILL_DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=float, default=value, help=f"distill.{key}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-healing"))
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.settings:
        removal, heal = SETTINGS[name]
        distill = {k: getattr(args, k) for k in DISTILL_DEFAULTS}
        results.append(run_setting(args.out, name, removal, heal, args.steps, args.eval_every, args.eval_size, args.seeds,
                                   distill))
        print(f"done: {name}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results, args.steps, args.seeds))
    return {"results": results}


if __name__ == "__main__":
    main()
