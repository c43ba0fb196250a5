"""Quantization side by side: RTN against GPTQ, 8 against 4 bits, the language model alone against the
language model + Q-Former + vision, on the shapes teacher and on the SmolLM2 BLIP-2 of ``make demo-real``.

Per model, everything in one process: the unquantized baseline, then each setting through the
``quantize`` stage itself (its saved compressed-tensors folder reloaded, as later stages see it):

* ``size_ratio``: bytes of the weight files against the baseline's;
* ``perplexity`` of the held-out reference captions (teacher-forced; human captions on COCO) and its
  ratio to the baseline's (the issue's acceptance: 4-bit language model within +10 %);
* ``teacher_cider``: CIDEr of the quantized model's captions against the unquantized model's
  (agreement), and ``cider`` against the references;
* ``kl``: the stage's own KL (nats per caption token) of the whole quantized model on the calibration batches;
* a sensitivity table (4-bit, language model, per layer) and the mixed-precision choice for a KL
  target (half the all-4-bit KL): units kept at 8 bits, bytes, KL met;
* ONNX Runtime batch-1 caption latency of the fp32 (optimised), int8 and int4 decoders against
  PyTorch ``generate``, timed in alternation (``bench.onnx_speed``'s ``alternate``);
* ``--pruned`` (full runs): the demo-real recipe (remove 8 of 30 SmolLM2 layers, heal) with a
  4-bit quantize stage before export: does the gate still pass?

GPTQ is Intel Neural Compressor's (the ``gptq`` extra); without it the GPTQ rows say so.

Usage::

    python -m bench.quantize --quick                                     # shapes teacher, 4 bits, ~3 min
    python -m bench.quantize --coco ../shared/data/coco-mini             # both models, every setting
    python -m bench.quantize --coco ../shared/data/coco-mini --pruned    # + remove/heal/4-bit gate

Prints a table and writes ``<out>/quantize.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PARTS = {"lm": ["language_model"], "lm+qf+vision": ["language_model", "qformer", "vision"]}


def recipe_for(name: str, coco: Path | None, eval_size: int, stages: list[dict]):
    from compressor.recipe.schema import Recipe

    if name == "teacher":
        model, data = "shapes-teacher", {"format": "synthetic", "train": {"size": 64, "seed": 300},
                                          "eval": {"size": eval_size, "seed": 2000}}
    else:
        model = "demo"
        data = {"format": "coco",
                "train": {"annotations": str(coco / "captions_train2017.json"), "images": str(coco / "train2017")},
                "eval": {"annotations": str(coco / "captions_val2017.json"), "images": str(coco / "val2017"),
                         "limit": eval_size}}
    return Recipe.model_validate({"name": f"bench-quantize-{name}", "model": model if model != "demo" else "tiny-blip2-opt",
                                  "data": data, "generation": {"num_beams": 1, "max_new_tokens": 20, "batch_size": 16},
                                  "stages": stages or [{"type": "evaluate", "label": "data"}]})


def base_folder(name: str, work: Path) -> Path:
    """The unquantized model as a folder: the shipped shapes teacher, or the assembled SmolLM2 BLIP-2."""
    if name == "teacher":
        from compressor.models.presets import SHIPPED

        return Path(SHIPPED["shapes-teacher"])
    from bench.onnx_speed import build_demo

    return build_demo(work / "demo-assembled")


def score(folder: Path, data, scorer, teacher: dict | None):
    """``(metrics, predictions)`` of a model folder: cider, perplexity (+ teacher_cider against ``teacher``)."""
    from compressor.evaluation import EvalOptions, EvalTarget, evaluate
    from compressor.models.loading import load_model
    from compressor.recipe.schema import CharacteristicsSpec, GenerationSpec

    model, proc = load_model(folder, dtype="float32")
    gen = GenerationSpec(num_beams=1, max_new_tokens=20, batch_size=16)
    target = EvalTarget.torch(model, proc, gen, "cpu", folder=folder)
    metrics = ["cider", "perplexity"] + (["teacher_cider"] if teacher else [])
    rec, preds = evaluate(target, data, metrics=metrics, options=EvalOptions(teacher_predictions=teacher), scorer=scorer,
                          spec=CharacteristicsSpec(latency=None, gflops=False))
    return rec["metrics"], preds


def weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6


def quantize(name, base: Path, out: Path, recipe_args, cfg: dict) -> tuple[Path, dict, float]:
    """Run the quantize stage on ``base`` into ``out``; returns (model folder, summary, seconds)."""
    from compressor.pipeline.context import StageContext
    from compressor.stages import get_stage

    recipe = recipe_for(name, *recipe_args, [{"type": "quantize", **cfg}])
    ctx = StageContext(recipe=recipe, index=0, run_dir=out.parent, device="cpu", progress=False)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    summary = get_stage("quantize").run(recipe.stages[0], ctx, base, out)
    return out / "model", summary, time.perf_counter() - t


def fake_quantized(base: Path, out: Path, parts: list[str], scheme) -> tuple[Path, float, float]:
    """RTN of ``parts``' linears with ``scheme`` applied in memory and saved dense (the dequantized
    weights): how a scheme the stage refuses to store (asymmetric: transformers cannot reload packed
    zero points yet) would score. Returns (folder, bytes the stored model would have, seconds)."""
    from compressor.families import family_for_model
    from compressor.models.folders import save_model
    from compressor.models.loading import load_model
    from compressor.quantization import linear_targets, part_bytes, quantize_modules, quantized_bytes

    t = time.perf_counter()
    model, proc = load_model(base, dtype="float32")
    family = family_for_model(model)
    targets = linear_targets(model, family, parts)
    quantize_modules(model, {n: scheme for n in targets}, "rtn", family)
    secs = time.perf_counter() - t
    mods = {n: model.get_submodule(n) for n in targets}
    stored = part_bytes(model, {}, 4, {n: quantized_bytes(m.out_features, m.in_features, scheme, 4) for n, m in mods.items()})
    shutil.rmtree(out, ignore_errors=True)
    save_model(model, proc, out)
    return out, stored["total"], secs


def calibration_kl(name, base: Path, work: Path, rargs, batches: int):
    """``folder → KL`` (nats per caption token) of a quantized folder against ``base`` on calibration
    batches of the train section (the same batches for every setting)."""
    from compressor.families import family_for_model
    from compressor.importance import calibration_batches
    from compressor.models.loading import load_model
    from compressor.pipeline.context import StageContext
    from compressor.quantization import kl_from, next_token_logprobs
    from compressor.recipe.schema import CalibrationSpec

    recipe = recipe_for(name, *rargs, [])
    ctx = StageContext(recipe=recipe, index=0, run_dir=work, device="cpu", progress=False)
    model, proc = load_model(base, dtype="float32")
    family = family_for_model(model)
    cal = calibration_batches(model, proc, ctx.data("train"), CalibrationSpec(batches=batches, batch_size=8, data="train"),
                              None, "cpu")
    ref = next_token_logprobs(model, cal, family.decoder_only)
    del model

    def kl(folder: Path) -> float:
        m, _ = load_model(folder, dtype="float32")
        return kl_from(ref, m, cal, family.decoder_only)

    return kl


def onnx_latency(base: Path, work: Path, images: list, rounds: int, block: int) -> dict:
    """Batch-1 caption seconds: PyTorch generate and ONNX Runtime fp32 / int8 / int4 decoders, alternated."""
    from bench.onnx_speed import alternate
    from compressor.evaluation import TorchCaptioner
    from compressor.models.loading import load_model
    from compressor.recipe.schema import GenerationSpec
    from exporters.onnx import OnnxCaptioner, OnnxOptions, export_onnx

    out = work / f"onnx-{base.name}"
    if not (out / "export.json").is_file():
        export_onnx(base, out, OnnxOptions(variants=("int8", "int4"), int4_block_size=block, tolerance=1e-3,
                                           variant_tolerance={"int8": 0.5, "int4": 1.5}))
    meta = json.loads((out / "export.json").read_text())
    gen = GenerationSpec(num_beams=1, max_new_tokens=20, min_new_tokens=20, batch_size=1)
    model, proc = load_model(base, dtype="float32")
    caps = {"pytorch": TorchCaptioner(model, proc, gen, "cpu")}
    for v in ("optimized", "int8", "int4"):
        caps[f"onnx_{'fp32' if v == 'optimized' else v}"] = OnnxCaptioner(out, gen, variant=v,
                                                                          providers=["CPUExecutionProvider"])
    times = alternate(caps, images[:1], [""], rounds)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    dec = meta["graphs"]["decoder"]
    return {
        "seconds_p50": med,
        "speedup_vs_pytorch": {k: med["pytorch"] / v for k, v in med.items() if k != "pytorch"},
        "decoder_mb": {"fp32": dec["bytes"] / 1e6, **{v: r["bytes"] / 1e6 for v, r in dec.get("variants", {}).items()}},
        "relative_rms_error": {v: r.get("relative_rms_error") for v, r in dec.get("variants", {}).items()},
    }


def bench_model(name: str, args, scorer) -> dict:
    from compressor.pipeline.context import StageContext
    from compressor.quantization import gptq_available

    work = args.out / name
    work.mkdir(parents=True, exist_ok=True)
    base = base_folder(name, work)
    rargs = (args.coco, args.eval_size)
    data = StageContext(recipe=recipe_for(name, *rargs, []), index=0, run_dir=work, device="cpu", progress=False).data("eval")
    base_metrics, base_preds = score(base, data, scorer, None)
    base_mb = weights_mb(base)
    kl_of = calibration_kl(name, base, work, rargs, args.cal_batches)
    # divides every width (teacher 64/256; SmolLM2 576/1536)
    group = args.group_size or (32 if name == "teacher" else 64)
    cal = {"data": "train", "batches": args.cal_batches, "batch_size": 8}
    rows = []
    methods = [m for m in args.methods if m != "gptq" or gptq_available()]
    for parts_key in args.parts:
        for bits in args.bits:
            settings = [(m, g, o, pos) for m in methods for g in args.grids for o in args.observers
                        for pos in (args.gptq_positions if m == "gptq" else [None])
                        if m != "gptq" or not args.gptq_bits or bits in args.gptq_bits]
            for method, grid, obs, pos in settings:
                tag = f"{method}-{grid}" + ("" if obs == "minmax" else f"-{obs}") + (
                    "" if pos in (None, "text") else f"-{pos}")
                if grid == "asym":  # measured in memory: the stage refuses to store it (see fake_quantized)
                    if method != "rtn":
                        continue
                    from compressor.quantization import Scheme

                    folder, stored, secs = fake_quantized(base, work / f"q-{parts_key}-{bits}-{tag}", PARTS[parts_key],
                                                          Scheme(bits, group, symmetric=False, clip=obs == "mse"))
                    size_mb = stored / 1e6
                else:
                    cfg = {"parts": PARTS[parts_key], "bits": bits, "group_size": group, "method": method,
                           "calibration": cal, "observer": obs}
                    if method == "gptq":
                        cfg["gptq"] = {"damp": args.gptq_damp, "act_order": args.act_order, "positions": pos}
                    folder, summary, secs = quantize(name, base, work / f"q-{parts_key}-{bits}-{tag.replace('-sym', '')}",
                                                     rargs, cfg)
                    size_mb = weights_mb(folder)
                m, _ = score(folder, data, scorer, base_preds)
                rows.append({"parts": parts_key, "bits": bits, "method": method, "grid": grid, "observer": obs,
                             "positions": pos, "seconds": round(secs, 1),
                             "size_mb": size_mb, "size_ratio": size_mb / base_mb,
                             "perplexity": m.get("perplexity"),
                             "perplexity_ratio": m.get("perplexity", float("nan")) / base_metrics["perplexity"],
                             "teacher_cider": m.get("teacher_cider"), "cider": m.get("cider"), "kl": kl_of(folder)})
                log.info("%s %s", name, rows[-1])
    if "gptq" in args.methods and "gptq" not in methods:
        rows.append({"method": "gptq", "note": "neural-compressor-pt not installed (pip install 'vlm-compress[gptq]')"})
    # sensitivity and mixed precision: 4-bit language model, KL target a fraction of the all-4-bit KL
    row4 = next((r for r in rows if r.get("parts") == "lm" and r.get("bits") == 4 and r.get("method") == "rtn"
                 and r.get("grid") == "sym" and r.get("observer") == "minmax"), None)
    all4 = row4["kl"] if row4 and not args.no_mixed else None
    mixed = None
    if all4:
        cfg = {"parts": ["language_model"], "bits": 4, "group_size": group, "method": "rtn", "calibration": cal,
               "keep_sensitive": {"max_kl": all4 * args.mixed_kl, "bits": 8}}
        folder, summary, _ = quantize(name, base, work / "q-mixed", rargs, cfg)
        sens = json.loads((folder.parent / "sensitivity.json").read_text())
        m, _ = score(folder, data, scorer, base_preds)
        mixed = {"max_kl": all4 * args.mixed_kl, "kl": sens["kl_whole_model"], "met": sens["met"], "kept_high": sens["kept_high"],
                 "units": sens["units"], "size_ratio": weights_mb(folder) / base_mb, "perplexity": m.get("perplexity"),
                 "sensitivity": sens["kl"]}
    lat = None
    if not args.no_latency:
        images = [data.examples[0].load_image()]
        lat = onnx_latency(base, work, images, args.rounds, group)
    return {"model": name, "baseline": {**base_metrics, "size_mb": base_mb}, "rows": rows, "mixed_precision": mixed,
            "onnx_latency": lat}


def pruned_gate(args) -> dict:
    """smollm2_coco.yaml with a 4-bit quantize stage before its export: does the gate pass?"""
    import subprocess

    import yaml

    repo = Path(__file__).resolve().parents[1]
    rec = yaml.safe_load((repo / "recipes" / "smollm2_coco.yaml").read_text())
    i = next(k for k, st in enumerate(rec["stages"]) if st["type"] == "export")
    gptq = _gptq() and "gptq" in args.methods
    stage = {"type": "quantize", "parts": ["language_model"], "bits": 4, "group_size": args.group_size or 64,
             "method": "gptq" if gptq else "rtn", "calibration": {"data": "train", "batches": args.cal_batches, "batch_size": 8}}
    if gptq:
        stage["gptq"] = {"damp": args.gptq_damp, "act_order": args.act_order, "positions": args.gptq_positions[0]}
    rec["stages"].insert(i, stage)
    # the pruned and healed model before 4 bits, scored beside the baseline and the 4-bit ONNX candidate
    rec["stages"].insert(i, {"type": "evaluate", "label": "pruned", "teacher": "baseline",
                             "metrics": ["bleu_1", "bleu_4", "cider", "perplexity", "teacher_cider"]})
    rec["name"] = "smollm2_coco_w4"
    path = args.out / "smollm2_coco_w4.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    coco = args.coco
    sets = [f"data.train.annotations={coco}/captions_train2017.json", f"data.train.images={coco}/train2017",
            f"data.eval.annotations={coco}/captions_val2017.json", f"data.eval.images={coco}/val2017"]
    cmd = [sys.executable, "-m", "compressor.cli", "apply", str(path), "--out", str(args.out / "run-w4")]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True)
    report = json.loads((args.out / "run-w4" / "report.json").read_text()) if (args.out / "run-w4" / "report.json").is_file() else {}
    keys = ("perplexity", "cider", "bleu_1", "bleu_4", "teacher_cider", "size_mb", "params_total")
    evals = {}
    for label, e in (report.get("evaluations") or {}).items():
        values = {**(e.get("characteristics") or {}), **(e.get("metrics") or {})}
        evals[label] = {k: values.get(k) for k in keys}
    return {"exit_code": res.returncode, "quantize": stage, "evaluations": evals, "gate": report.get("gate"),
            "seconds": report.get("seconds"), "stderr_tail": res.stderr[-2000:]}


def _gptq() -> bool:
    from compressor.quantization import gptq_available

    return gptq_available()


def table(res: dict) -> str:
    lines = [f"== {res['model']}: baseline perplexity {res['baseline'].get('perplexity', float('nan')):.3f}, "
             f"cider {res['baseline'].get('cider', float('nan')):.2f}, weights {res['baseline']['size_mb']:.2f} MB"]
    lines.append(f"{'parts':14}{'bits':>5}{'method':>11}{'grid':>5}{'obs':>7}{'size':>8}{'ppl':>9}{'ppl×':>7}{'t_cider':>9}{'cider':>8}{'kl':>9}{'s':>7}")
    for r in res["rows"]:
        if "note" in r:
            lines.append(f"  {r['method']}: {r['note']}")
            continue
        meth = r["method"] + (f"/{r['positions']}" if r.get("positions") else "")
        lines.append(f"{r['parts']:14}{r['bits']:>5}{meth:>11}{r.get('grid', 'sym'):>5}{r.get('observer', 'minmax'):>7}{r['size_ratio']:>8.3f}{r['perplexity']:>9.3f}"
                     f"{r['perplexity_ratio']:>7.3f}{r['teacher_cider']:>9.2f}{r['cider']:>8.2f}{r['kl']:>9.4f}{r['seconds']:>7.1f}")
    m = res.get("mixed_precision")
    if m:
        lines.append(f"mixed precision (4-bit LM, 8-bit for the most sensitive; target KL {m['max_kl']:.4f}): kept "
                     f"{len(m['kept_high'])}/{m['units']} layers at 8 bits, KL {m['kl']:.4f} (met: {m['met']}), size "
                     f"{m['size_ratio']:.3f}, perplexity {m['perplexity']:.3f}")
        top = sorted(m["sensitivity"].items(), key=lambda kv: -kv[1])[:5]
        lines.append("  most sensitive: " + ", ".join(f"{k.rsplit('.', 2)[-2] + '.' + k.rsplit('.', 1)[-1]} {v:.4f}" for k, v in top))
    lat = res.get("onnx_latency")
    if lat:
        lines.append("batch-1 caption latency (s, p50): " + ", ".join(f"{k} {v:.3f}" for k, v in lat["seconds_p50"].items()))
        lines.append("  speed-up vs PyTorch: " + ", ".join(f"{k} {v:.2f}x" for k, v in lat["speedup_vs_pytorch"].items())
                     + "; decoder MB: " + ", ".join(f"{k} {v:.2f}" for k, v in lat["decoder_mb"].items())
                     + "; logits rel. RMS error: " + ", ".join(f"{k} {v:.3f}" for k, v in lat["relative_rms_error"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Shapes teacher only, 4 bits, LM only, 16 images, 3 rounds.")
    parser.add_argument("--coco", type=Path, help="COCO-mini folder (captions_*2017.json, train2017/, val2017/): adds the SmolLM2 BLIP-2.")
    parser.add_argument("--models", default=None, help="teacher,demo (default: teacher, and demo with --coco).")
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 4])
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--eval-size", type=int, default=64, help="Held-out images scored.")
    parser.add_argument("--cal-batches", type=int, default=4, help="Calibration batches of 8 (GPTQ, KL, sensitivity).")
    parser.add_argument("--rounds", type=int, default=7, help="Alternated latency rounds.")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--methods", nargs="*", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    parser.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ Hessian dampening (share of its mean diagonal).")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal.")
    parser.add_argument("--gptq-positions", nargs="*", default=["text"], choices=["text", "all"],
                        help="GPTQ: the language model's Hessian from its text positions, every position, or both side by side.")
    parser.add_argument("--gptq-bits", type=int, nargs="*", default=None, help="GPTQ only at these bits (default: every --bits).")
    parser.add_argument("--group-size", type=int, default=None, help="Default: 32 (teacher), 64 (SmolLM2).")
    parser.add_argument("--grids", nargs="*", default=["sym"], choices=["sym", "asym"],
                        help="sym: symmetric grid (the quantize stage); asym: a zero point per group, RTN only, measured in memory "
                        "and saved dense (the stage refuses it: transformers cannot reload packed zero points yet); "
                        "its size is the bytes the packed model would have.")
    parser.add_argument("--observers", nargs="*", default=["minmax"], choices=["minmax", "mse"],
                        help="How scales are chosen: minmax (full range) or mse (clipping searched per group).")
    parser.add_argument("--no-mixed", action="store_true", help="Skip the sensitivity table and the mixed-precision choice.")
    parser.add_argument("--mixed-kl", type=float, default=0.5,
                        help="Mixed precision's KL target as a fraction of the all-4-bit RTN model's KL.")
    parser.add_argument("--pruned", action="store_true", help="Also run smollm2_coco.yaml + a 4-bit stage (needs --coco; "
                        "GPTQ with --cal-batches/--gptq-damp/--act-order/--gptq-positions when in --methods, else RTN).")
    parser.add_argument("--pruned-only", action="store_true", help="Only the --pruned run (no side-by-side table).")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quantize"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.bits, args.parts, args.eval_size, args.rounds, args.cal_batches = [4], ["lm"], 16, 3, 2
    args.pruned = args.pruned or args.pruned_only
    models = [] if args.pruned_only else (args.models or ("teacher,demo" if args.coco else "teacher")).split(",")
    if "demo" in models and args.coco is None:
        sys.exit("the SmolLM2 BLIP-2 needs --coco <COCO-mini folder>")
    args.out.mkdir(parents=True, exist_ok=True)
    from eval.captioning import CaptionScorer

    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "models": []}
    with CaptionScorer() as scorer:
        for name in models:
            res = bench_model(name, args, scorer)
            results["models"].append(res)
            print(table(res), flush=True)
    if args.pruned and args.coco:
        results["pruned_w4"] = pruned_gate(args)
        pw = results["pruned_w4"]
        print("remove 8 layers + heal + 4-bit: exit", pw["exit_code"], "gate", (pw["gate"] or {}).get("passed"))
        for label, m in pw["evaluations"].items():
            print(f"  {label:10}" + "".join(f"  {k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float))))
        for v in (pw["gate"] or {}).get("verdicts", []):
            print(f"  gate {v['key']} {v['rule']} {v['threshold']}: {v['reason']} ({'pass' if v['passed'] else 'FAIL'})")
    (args.out / "quantize.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
