"""Token reduction, side by side: what fewer queries, CATP per image and ToMe cost and buy.

Two models:

* ``shapes``: the shipped shapes teacher (BLIP-2 OPT, 8 learned queries, 64 patch tokens + the
  class token over 3 ViT layers) on the built-in synthetic shapes set: CIDEr against the
  references and against the unreduced teacher's own captions (``teacher_cider``);
* ``smollm2``: the BLIP-2 of ``make demo-real`` (SmolLM2-135M-Instruct, MiniLM-initialised
  Q-Former, random ViT-Tiny: 32 queries, 196 patches + class token over 12 layers), LoRA-tuned 50
  steps on COCO-mini as the demo does (the unreduced model): perplexity of the held-out human
  captions, agreement with the unreduced model (``teacher_cider``), CIDEr against the humans
  (low: its vision side is random, see docs/experiments.md).

Settings per model: static query reduction ``reduce_queries`` to k = N/2 and N/4 (``--quick``:
N/2) by ``first``, ``catp`` and ``ablation``, each unhealed and healed with the same steps (the
demo's heal budget: LoRA + distillation from the unreduced model); CATP at inference
(``select_queries``) with k = N/2, N/4; ToMe (``merge_tokens``) with two values of r. Every model
is made by the real pipeline (:class:`compressor.pipeline.runner.Runner`, one run directory per
model, so the unreduced model's stages are computed once and shared).

Then, for each distinct architecture, side by side in one process (every side warmed up, then
timed in alternation, one thread each, so machine noise hits all sides alike): latency p50 of a
caption at batch 1 and batch 8 (greedy, exactly ``--new-tokens`` tokens) and the prefill alone
(image path + language-model prefill: generation of one token, batch 8), in PyTorch and in
ONNX Runtime (legacy-exporter fp32 graphs, ORT_ENABLE_ALL copy; ``--quick`` times the SmolLM2
model in PyTorch only); GFLOPs per part of a whole caption (``evaluate``'s count) and of the
prefill alone; and whether ONNX Runtime's greedy tokens equal PyTorch's on 3 different images.
Ratios are against the unreduced model.

Usage::

    python -m bench.tokens --quick --coco ../shared/data/coco-mini          # shapes half: 30 min at load 17 on 2 cores
    python -m bench.tokens --coco ../shared/data/coco-mini                  # the full table
    python -m bench.tokens --models shapes --quick                          # shapes teacher only

``results.json`` in ``--out`` (default runs/bench-tokens) holds every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

log = logging.getLogger("bench.tokens")

SHAPES_BASE = """\
name: {name}
model: shapes-teacher
seed: {seed}
data:
  format: synthetic
  train: {{size: 512, seed: 300}}
  eval: {{size: {eval_size}, seed: 2000}}
  calibration: {{size: 64, seed: 300}}
generation: {{num_beams: 1, max_new_tokens: 20, batch_size: 32}}
stages:
  - type: evaluate
    label: teacher
    metrics: [cider]
    characteristics: {{latency: null}}
"""
#: The demo's heal (recipes/demo.yaml), distilling from the unreduced model.
SHAPES_HEAL = """\
  - type: heal
    trainable: lora
    parts: [qformer.self_attention, qformer.cross_attention, qformer.mlp, projection,
            language_model.attention, language_model.mlp]
    lora: {{r: 32, lora_alpha: 64, lora_dropout: 0.0}}
    loss: distill
    distill: {{teacher: teacher, temperature: 2.0, kl_weight: 1.0, ce_weight: 0.5}}
    train: {{steps: {steps}, batch_size: 16, learning_rate: 3.0e-3, warmup_steps: 10}}
"""
SMOLLM2_BASE = """\
name: {name}
model:
  assemble:
    language_model: smollm2-135m-instruct
    qformer_init: all-minilm-l6-v2
    vision: vit-tiny
    num_query_tokens: 32
    image_size: 224
    seed: 0
seed: {seed}
data:
  format: coco
  train: {{annotations: {coco}/captions_train2017.json, images: {coco}/train2017}}
  eval: {{annotations: {coco}/captions_val2017.json, images: {coco}/val2017, limit: {eval_size}}}
generation: {{num_beams: 1, max_new_tokens: 20, batch_size: 16}}
stages:
  - type: lora_finetune
    parts: [qformer.self_attention, qformer.cross_attention, projection, language_model.attention]
    lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.05}}
    train: {{steps: 50, batch_size: 8, learning_rate: 1.0e-3, warmup_steps: 5}}
  - type: merge_adapters
  - type: evaluate
    label: teacher
    metrics: [cider, perplexity]
    characteristics: {{latency: null}}
"""
#: recipes/smollm2_coco.yaml's heal budget (60 steps), distilling from the unreduced model.
SMOLLM2_HEAL = """\
  - type: heal
    trainable: lora
    parts: [qformer.self_attention, qformer.cross_attention, projection, language_model.attention]
    lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.0}}
    loss: distill
    distill: {{teacher: teacher, temperature: 2.0, kl_weight: 1.0, ce_weight: 0.5}}
    train: {{steps: {steps}, batch_size: 8, learning_rate: 1.0e-3, warmup_steps: 5}}
"""
CALIBRATION = "    calibration: {batches: 4, batch_size: 8, data: train}\n"


@dataclass
class Setting:
    """One row: the reduction stage (YAML), the architecture it runs as, whether it is also healed."""

    name: str
    stage: str
    arch: str
    heal: bool = False


@dataclass
class ModelBench:
    key: str
    base: str
    heal: str
    heal_steps: int
    metrics: list[str]
    n: int
    settings: list[Setting] = field(default_factory=list)


def settings_for(n: int, r_values: list[int], quick: bool, heal_all: bool) -> list[Setting]:
    """Static k = N/2 (and N/4) × first/catp/ablation, CATP at inference, ToMe."""
    ks = [n // 2] if quick else [n // 2, n // 4]
    out = []
    for k in ks:
        for sel in ("first", "catp", "ablation"):
            body = f"  - type: reduce_queries\n    keep: {k}\n    select: {sel}\n" + (CALIBRATION if sel != "first" else "")
            out.append(Setting(f"static k={k} {sel}", body, f"static-{k}", heal=heal_all or k == n // 2))
    for k in ks if quick else [n // 2, n // 4]:
        out.append(Setting(f"catp-inference k={k}", f"  - type: select_queries\n    keep: {k}\n", f"catp-{k}", heal=not quick and k == n // 2))
    for r in r_values:
        out.append(Setting(f"tome r={r}", f"  - type: merge_tokens\n    r: {r}\n", f"tome-{r}"))
    return out


def evaluate_stage(label: str, metrics: list[str]) -> str:
    return (f"  - type: evaluate\n    label: {label}\n    metrics: [{', '.join(metrics)}]\n    teacher: teacher\n"
            "    characteristics: {latency: null}\n")


def run_setting(mb: ModelBench, s: Setting, run_dir: Path, out: Path, eval_size: int, coco: str, seeds: list[int]) -> dict:
    """The setting's models through the pipeline: reduced (and healed, once per seed) and evaluated."""
    from compressor.pipeline.runner import Runner
    from compressor.recipe.loader import load_recipe

    row: dict = {"setting": s.name, "arch": s.arch}
    for seed in seeds if s.heal else seeds[:1]:
        text = mb.base.format(name=f"tokens-{mb.key}", seed=seed, eval_size=eval_size, coco=coco)
        text += s.stage + evaluate_stage("reduced", mb.metrics)
        if s.heal:
            text += mb.heal.format(steps=mb.heal_steps) + "  - type: merge_adapters\n" + evaluate_stage("healed", mb.metrics)
        slug = "".join(c if c.isalnum() else "-" for c in s.name)
        path = out / f"{mb.key}-{slug}-seed{seed}.yaml"
        path.write_text(text)
        runner = Runner(load_recipe(path), run_dir, progress=False)
        t0 = time.perf_counter()
        report = runner.run()
        evals = report["evaluations"]
        row["teacher"] = evals["teacher"]["metrics"]
        row["teacher_characteristics"] = evals["teacher"]["characteristics"]
        row["reduced"] = evals["reduced"]["metrics"]
        row["characteristics"] = evals["reduced"]["characteristics"]
        stage_type = s.stage.split("type: ")[1].split()[0]
        folder = next(r.folder for r in runner.records if r.type == stage_type)
        row["model_dir"] = str(run_dir / "stages" / folder / "model")
        row["teacher_dir"] = str(_teacher_dir(runner, run_dir, stage_type))
        queries = run_dir / "stages" / folder / "queries.json"
        if queries.is_file():
            row["kept"] = json.loads(queries.read_text())["kept"]
        if s.heal:
            row.setdefault("healed", []).append({"seed": seed, **evals["healed"]["metrics"],
                                                 "seconds": round(time.perf_counter() - t0, 1)})
    return row


def _teacher_dir(runner, run_dir: Path, stage_type: str) -> Path:
    """The unreduced model: the merge before the reduction stage (SmolLM2), else the shipped teacher."""
    from compressor.models.presets import SHIPPED

    at = next(r.index for r in runner.records if r.type == stage_type)
    merged = [r.folder for r in runner.records if r.type == "merge_adapters" and r.index < at]
    if merged:
        return run_dir / "stages" / merged[0] / "model"
    return Path(SHIPPED["shapes-teacher"])


# --------------------------------------------------------------------------------------------
# Timing, side by side
# --------------------------------------------------------------------------------------------


def bench_images(mb: ModelBench, coco: str | None, n: int = 8):
    if mb.key == "shapes":
        from compressor.data.synthetic import make_scene, render_shapes

        return [render_shapes(make_scene(2000, i), 64) for i in range(n)]
    from PIL import Image

    files = sorted((Path(coco) / "val2017").iterdir())[:n]
    return [Image.open(f).convert("RGB") for f in files]


def timing(archs: dict[str, Path], images, new_tokens: int, rounds: int, onnx_root: Path | None) -> dict:
    """Latency p50 (s per call) of every architecture: PyTorch (and ONNX Runtime) at batch 1, 8 and the prefill."""
    import numpy as np
    import torch

    from compressor.evaluation.captioner import TorchCaptioner, generate_kwargs
    from compressor.evaluation.characteristics import count_gflops
    from compressor.models.loading import load_model
    from compressor.recipe.schema import GenerationSpec

    torch.set_num_threads(1)
    full = GenerationSpec(max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=8)
    first = GenerationSpec(max_new_tokens=1, min_new_tokens=1, batch_size=8)
    sides: dict[tuple[str, str], object] = {}
    extra: dict[str, dict] = {}
    for arch, folder in archs.items():
        model, proc = load_model(folder)
        sides[(arch, "torch")] = (TorchCaptioner(model, proc, full), TorchCaptioner(model, proc, first))
        extra[arch] = {"prefill_gflops": count_gflops(model, proc, (images[0], ""), first, "cpu", 1)}
        if onnx_root is not None:
            from exporters.onnx import OnnxCaptioner, OnnxOptions, export_onnx

            out = onnx_root / arch
            if not (out / "export.json").is_file():
                export_onnx(folder, out, OnnxOptions(exporter="legacy"))
            oc = (OnnxCaptioner(out, full, threads=1, spinning=False), OnnxCaptioner(out, first, threads=1, spinning=False))
            sides[(arch, "onnx")] = oc
            # ORT greedy tokens = PyTorch's on 3 different images
            from compressor.families import family_for_model
            from compressor.models.batches import generation_inputs

            inputs = generation_inputs(family_for_model(model), proc, images[:3], [""] * 3)
            with torch.inference_mode():  # the captioner's own decoding settings (min_new_tokens, ids)
                ref = model.generate(**inputs, **generate_kwargs(full)).numpy()
            got = oc[0].generate({k: v.numpy() for k, v in inputs.items()})
            extra[arch]["ort_tokens_equal"] = bool(np.array_equal(got[:, : ref.shape[1]], ref))
    calls = {"b1": lambda c: c[0].caption(images[:1]), "b8": lambda c: c[0].caption(images[:8]),
             "prefill_b8": lambda c: c[1].caption(images[:8])}
    times: dict[tuple, list[float]] = {}
    for side in sides.values():  # warm-up
        for call in calls.values():
            call(side)
    keys = list(sides)
    for rnd in range(rounds):
        for i in range(len(keys)):
            key = keys[(i + rnd) % len(keys)]  # the order rotates each round
            for cname, call in calls.items():
                t0 = time.perf_counter()
                call(sides[key])
                times.setdefault((*key, cname), []).append(time.perf_counter() - t0)
    out = {arch: dict(extra[arch]) for arch in archs}
    for (arch, backend, cname), ts in times.items():
        out[arch][f"{backend}_{cname}_p50_s"] = statistics.median(ts)
    return out


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(mb: ModelBench, rows: list[dict], times: dict) -> str:
    t = rows[0]
    base_chars = t["teacher_characteristics"]
    quality = ["cider", "teacher_cider"] + (["perplexity"] if "perplexity" in mb.metrics else [])
    teacher_line = ", ".join(f"{k} {t['teacher'][k]:.2f}" for k in ("cider", "perplexity") if k in t["teacher"])
    lines = [f"== {mb.key}: unreduced model {teacher_line}; GFLOPs {base_chars['gflops']:.4f} per caption "
             f"(vision {base_chars.get('gflops_vision', 0):.4f}, qformer {base_chars.get('gflops_qformer', 0):.4f}, "
             f"LM {base_chars.get('gflops_language_model', 0):.4f})"]
    head = ["setting", *(f"{q} unhealed" for q in quality), *(f"{q} healed" for q in quality),
            "GFLOPs", "vision", "qformer", "LM", "prefill GFLOPs"]
    body = []
    base_pf = times.get("full", {}).get("prefill_gflops", {}).get("gflops")
    for r in [{"setting": "unreduced", "arch": "full", "reduced": t["teacher"], "characteristics": base_chars}, *rows]:
        c = r["characteristics"]
        healed = r.get("healed") or []
        cells = [r["setting"]]
        cells += [f"{r['reduced'].get(q, float('nan')):.2f}" for q in quality]
        for q in quality:
            vals = [h[q] for h in healed if q in h]
            cells.append(f"{statistics.mean(vals):.2f}" + (f" [{min(vals):.1f}-{max(vals):.1f}]" if len(vals) > 1 else "")
                         if vals else "-")
        cells += [_ratio(c.get("gflops"), base_chars.get("gflops"))]
        cells += [_ratio(c.get(f"gflops_{p}"), base_chars.get(f"gflops_{p}")) for p in ("vision", "qformer", "language_model")]
        pf = times.get(r["arch"], {}).get("prefill_gflops", {}).get("gflops")
        cells.append(_ratio(pf, base_pf))
        body.append(cells)
    lines += _grid(head, body)
    lines.append("GFLOPs columns: ratio to the unreduced model (whole caption of 20 tokens, per part; prefill: image "
                 "path + language-model prefill).")
    # latency
    archs = list(times)
    base = times.get("full", {})
    lhead = ["architecture", "PT b1", "PT b8", "PT prefill b8", "ORT b1", "ORT b8", "ORT prefill b8", "ORT tokens = PT"]
    lbody = []
    for a in archs:
        x = times[a]
        cells = [a]
        for backend in ("torch", "onnx"):
            for cname in ("b1", "b8", "prefill_b8"):
                k = f"{backend}_{cname}_p50_s"
                cells.append(f"{x[k]:.3f}s ({_ratio(x.get(k), base.get(k))})" if k in x else "-")
        cells.append({True: "yes", False: "NO"}.get(x.get("ort_tokens_equal"), "-"))
        lbody.append(cells)
    lines.append("")
    lines += _grid(lhead, lbody)
    lines.append("latency: p50 seconds per call (ratio to the unreduced model), 1 thread, greedy, exactly the same number "
                 "of new tokens for every model; prefill = generating 1 token.")
    return "\n".join(lines)


def _grid(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    return [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths),
            *(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body)]


def model_benches(args) -> list[ModelBench]:
    out = []
    if "shapes" in args.models:
        mb = ModelBench("shapes", SHAPES_BASE, SHAPES_HEAL, args.shapes_heal_steps, ["cider", "teacher_cider"], 8)
        mb.settings = settings_for(8, [8, 16] if not args.quick else [8, 16], args.quick, heal_all=not args.quick)
        out.append(mb)
    if "smollm2" in args.models:
        if not args.coco:
            raise SystemExit("--coco DIR (COCO-mini: captions_*2017.json, train2017/, val2017/) is needed for smollm2")
        mb = ModelBench("smollm2", SMOLLM2_BASE, SMOLLM2_HEAL, args.smollm2_heal_steps,
                        ["cider", "teacher_cider", "perplexity"], 32)
        mb.settings = settings_for(32, [8] if args.quick else [8, 15], args.quick, heal_all=not args.quick)
        if args.quick:  # heal only the CATP selection at k = 16
            for s in mb.settings:
                s.heal = s.name == "static k=16 catp"
        out.append(mb)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shapes,smollm2", help="Comma-separated: shapes, smollm2.")
    parser.add_argument("--coco", default=None, help="COCO-mini folder (smollm2).")
    parser.add_argument("--quick", action="store_true", help="Fewer settings, one seed, SmolLM2 timed in PyTorch only.")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="Heal seeds (default: 0 quick, 0 1 2 full).")
    parser.add_argument("--shapes-eval", type=int, default=256, help="Held-out shapes images scored.")
    parser.add_argument("--smollm2-eval", type=int, default=None, help="COCO-mini val images scored (default 48 quick, 159 full).")
    parser.add_argument("--shapes-heal-steps", type=int, default=400, help="The demo's heal budget.")
    parser.add_argument("--smollm2-heal-steps", type=int, default=60, help="recipes/smollm2_coco.yaml's heal budget.")
    parser.add_argument("--rounds", type=int, default=None, help="Timed rounds per side (default 5 quick, 9 full).")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tokens"))
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    rounds = args.rounds or (5 if args.quick else 9)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    coco = str(Path(args.coco).resolve()) if args.coco else ""
    results, tables = {}, []
    t_start = time.perf_counter()
    for mb in model_benches(args):
        eval_size = args.shapes_eval if mb.key == "shapes" else (args.smollm2_eval or (48 if args.quick else 159))
        run_dir = args.out / mb.key
        rows = []
        for s in mb.settings:
            t0 = time.perf_counter()
            rows.append(run_setting(mb, s, run_dir, args.out, eval_size, coco, seeds))
            print(f"done: {mb.key} {s.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        archs = {"full": Path(rows[0]["teacher_dir"])}
        for r in rows:
            archs.setdefault(r["arch"], Path(r["model_dir"]))
        onnx_root = None if (args.quick and mb.key == "smollm2") else args.out / f"{mb.key}-onnx"
        times = timing(archs, bench_images(mb, coco), args.new_tokens, rounds, onnx_root)
        results[mb.key] = {"rows": rows, "timing": times, "eval_size": eval_size, "seeds": seeds}
        tables.append(table(mb, rows, times))
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(tables[-1], flush=True)
    print(f"\nbench.tokens: {time.perf_counter() - t_start:.0f} s; results in {args.out / 'results.json'}")
    print("\n\n".join(tables))
    return results


if __name__ == "__main__":
    main()
