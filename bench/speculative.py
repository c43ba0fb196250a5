"""Speculative decoding against plain decoding, side by side in one process: the original model's
captions at a compressed draft's speed.

Models (each a target with its drafts):

* ``demo``: the SmolLM2-135M BLIP-2 of ``make demo-real`` (recipes/smollm2_coco.yaml). Target: its
  LoRA-tuned baseline (the model labelled ``baseline``); drafts: its pruned-and-healed candidate
  (``final/``), the baseline's own int8 decoder, and the candidate's int8 decoder. Give the run
  folder with ``--run runs/smollm2_coco``; without it, ``--prepare`` builds the same chain (without
  its evaluations; ``--lora-steps`` / ``--heal-steps`` as in the recipe unless lowered) into ``--work``.
* ``shapes``: the shipped shapes teacher, drafted by its demo candidate (``runs/demo/final`` of
  ``make demo``: ``--shapes-draft``) and by its own int8 decoder, on the synthetic shapes set.

For each model, in one process, 2 ONNX Runtime threads (``--threads``), greedy:

* exactness: on ``--exact-images`` images at batch 8, every speculative configuration (each
  draft, each k) gives token-for-token the target's plain fp32 ONNX Runtime tokens (asserted on
  every row, with ``--new-tokens``' largest value: shorter captions are their prefixes), and the
  plain ONNX Runtime tokens are compared with PyTorch ``generate`` (the rows whose top-2 margins
  are float noise may differ there, as between any two runtimes; counted);
* latency at batch 1 on ``--images-timed`` images: PyTorch ``generate``, plain ORT fp32, plain ORT
  int8, and the fp32 target with each draft and each k in ``--k``, warmed up, then timed in
  alternating rounds (the order rotates) so machine noise hits every side alike: ratios to
  PyTorch and to plain ORT fp32 (median of rounds), acceptance, target calls per caption, the part
  of a caption spent in the image paths and prefills, and the time per generated token against
  the bandwidth floor of one fp32 decoder step (``bench.onnx_speed.bandwidth_floor``).

Usage::

    python -m bench.speculative --images ../shared/data/coco-mini --run runs/smollm2_coco \\
        --shapes-draft runs/demo/final                       # the issue's size (64 exact, 20/40 tokens, k 2,3,4,6)
    python -m bench.speculative --images ../shared/data/coco-mini --prepare --models demo \\
        --exact-images 16 --images-timed 2 --rounds 2 --k 3 --new-tokens 20   # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.speculative")

#: The shipped recipe whose baseline and candidate this benchmark uses (``make demo-real``).
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_coco.yaml"
#: Stage types kept from it: the chain that makes the models, without evaluations and export.
PREP_TYPES = ("lora_finetune", "merge_adapters", "remove_layers", "heal")


def prep_recipe(coco: Path, lora_steps: int, heal_steps: int) -> dict:
    """recipes/smollm2_coco.yaml without its evaluations, export, gate and push: the baseline (its
    label moved onto the model stage the dropped evaluation scored) and its pruned-and-healed
    candidate, on the COCO-layout folder ``coco``, with the given LoRA and heal step counts."""
    import yaml

    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["name"] = "smollm2_coco_spec"
    for section, split in (("train", "train2017"), ("eval", "val2017")):
        recipe["data"][section].update(annotations=f"{coco}/captions_{split}.json", images=f"{coco}/{split}")
    stages: list[dict] = []
    for st in recipe["stages"]:
        if st["type"] in PREP_TYPES:
            stages.append(dict(st))
        elif st.get("label") == "baseline":
            stages[-1]["label"] = "baseline"
    steps = {"lora_finetune": lora_steps, "heal": heal_steps}
    for st in stages:
        if st["type"] in steps:
            st["train"] = {**st["train"], "steps": steps[st["type"]]}
    recipe["stages"] = stages
    for key in ("gate", "push"):
        recipe.pop(key, None)
    return recipe


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def run_models(run: Path) -> tuple[Path, Path]:
    """``(baseline, candidate)`` model folders of a ``make demo-real`` (or ``--prepare``) run:
    the stage labelled ``baseline`` in the manifest, and ``final/``."""
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["stages"]
    label = next((s for s in stages if s.get("label") == "baseline"), None)
    if label is None:
        sys.exit(f"{run}: no stage labelled baseline in manifest.json")
    # the labelled stage evaluates (or is) the model of the latest model-producing stage before it
    producing = [s for s in stages[: stages.index(label) + 1] if (run / "stages" / s["folder"] / "model").is_dir()]
    base = run / "stages" / producing[-1]["folder"] / "model"
    return base, run / "final"


def prepare(coco: Path, work: Path, lora_steps: int, heal_steps: int) -> Path:
    """Run the demo-real chain without its evaluations into ``work/run`` (cached by the runner)."""
    import subprocess

    import yaml

    recipe = work / "smollm2_coco_spec.yaml"
    recipe.write_text(yaml.safe_dump(prep_recipe(coco.resolve(), lora_steps, heal_steps), sort_keys=False))
    run = work / "run"  # one run folder: the runner reuses what is unchanged (the assembled model)
    if not (run / "final" / "config.json").is_file():
        t0 = time.perf_counter()
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "compressor.cli", "apply", str(recipe), "--out", str(run)]
        if (run / "manifest.json").is_file():
            cmd.append("--resume")  # an earlier preparation was stopped: continue it (cached stages kept)
        rc = subprocess.call(cmd, cwd=repo, env=env)
        if rc != 0:
            sys.exit(f"preparing the demo-real models failed (exit {rc})")
        log.info("prepared %s in %.0f s", run, time.perf_counter() - t0)
    return run


EXPORTER = "dynamo"


def export(model_dir: Path, out: Path) -> Path:
    """fp32 + int8 ONNX export of ``model_dir`` (:data:`EXPORTER`, its default opset; cached)."""
    from exporters.onnx import OnnxOptions, export_onnx

    if EXPORTER != "dynamo":
        out = out.with_name(f"{out.name}-{EXPORTER}")
    if not (out / "export.json").is_file():
        t0 = time.perf_counter()
        export_onnx(model_dir, out, OnnxOptions(quantize="int8", exporter=EXPORTER))
        log.info("exported %s in %.1f s", out, time.perf_counter() - t0)
    return out


def draft_export(folder: Path, target_dir: Path, target_onnx: Path, work: Path) -> Path:
    """The export a draft runs: its own folder if it is an export, the target's export when it is
    the target (its int8 variant drafts), else its export into ``work`` (cached)."""
    if (folder / "export.json").is_file():
        return folder
    if folder.resolve() == Path(target_dir).resolve():
        return target_onnx
    return export(folder, work / f"{folder.parent.name}-{folder.name}-onnx")


def val_images(coco: Path | None, n: int, size: int = 224, synthetic: bool = False):
    """``n`` images of ``coco``'s val2017 (random images without a folder), or of the synthetic
    shapes set (``synthetic``: what the shapes teacher captions)."""
    from PIL import Image

    if synthetic:
        from compressor.data.synthetic import synthetic_examples

        return [ex.load_image() for ex in synthetic_examples(2000, n, 64, "caption")]
    if coco is None:
        import numpy as np

        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    data = json.loads((coco / "captions_val2017.json").read_text())
    files = [coco / "val2017" / im["file_name"] for im in data["images"]]
    files = [f for f in files if f.is_file()][:n]
    if len(files) < n:
        log.warning("only %d val images under %s", len(files), coco)
    return [Image.open(f).convert("RGB") for f in files]


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


class CallTimer:
    """Times every graph call of the captioners it wraps (``run``), per role and graph."""

    def __init__(self, **caps):
        self.calls: dict[tuple[str, str], list[float]] = {}
        self._orig = {}
        for role, cap in caps.items():
            orig = cap.run
            self._orig[role] = (cap, orig)

            def timed(graph, feed, orig=orig, role=role):
                t = time.perf_counter()
                out = orig(graph, feed)
                self.calls.setdefault((role, graph), []).append(time.perf_counter() - t)
                return out

            cap.run = timed

    def reset(self):
        self.calls.clear()

    def total(self, role: str, graph: str, first: int | None = None) -> float:
        v = self.calls.get((role, graph), [])
        return sum(v[:first] if first is not None else v)

    def close(self):
        for cap, _ in self._orig.values():
            del cap.run


def alternate(sides: dict, images, rounds: int) -> dict[str, list[float]]:
    """Per side, per round: median seconds per caption over ``images`` at batch 1 (the order
    of the sides rotates every round)."""
    names = list(sides)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            ts = []
            for im in images:
                t0 = time.perf_counter()
                sides[k]([im])
                ts.append(time.perf_counter() - t0)
            out[k].append(statistics.median(ts))
    return out


def where_time_goes(spec, images) -> dict[str, float]:
    """ms per caption (batch 1, mean over ``images``) of a speculative captioner: both image
    paths, both prefills, target scoring calls, draft calls, and the rest (loop, processors)."""
    from exporters.onnx.topologies import image_tokens

    timer = CallTimer(target=spec.target, draft=spec.draft)
    try:
        rows = []
        for im in images:
            timer.reset()
            t0 = time.perf_counter()
            spec.caption([im])
            total = time.perf_counter() - t0
            img = timer.total("target", image_tokens.IMAGE_GRAPH) + timer.total("draft", image_tokens.IMAGE_GRAPH)
            emb = timer.total("target", image_tokens.EMBED_GRAPH, 1) + timer.total("draft", image_tokens.EMBED_GRAPH, 1)
            pre = timer.total("target", "decoder", 1) + timer.total("draft", "decoder", 1) + emb
            tgt = timer.total("target", "decoder") - timer.total("target", "decoder", 1)
            tgt += timer.total("target", image_tokens.EMBED_GRAPH) - timer.total("target", image_tokens.EMBED_GRAPH, 1)
            drf = timer.total("draft", "decoder") - timer.total("draft", "decoder", 1)
            drf += timer.total("draft", image_tokens.EMBED_GRAPH) - timer.total("draft", image_tokens.EMBED_GRAPH, 1)
            rows.append((total, img, pre, tgt, drf))
    finally:
        timer.close()
    total, img, pre, tgt, drf = (statistics.mean(c) * 1e3 for c in zip(*rows))
    return {"caption_ms": round(total, 1), "image_ms": round(img, 1), "prefill_ms": round(pre, 1),
            "target_calls_ms": round(tgt, 1), "draft_calls_ms": round(drf, 1),
            "other_ms": round(total - img - pre - tgt - drf, 1)}


def bench_model(name: str, target_dir: Path, drafts: dict[str, tuple[Path, str | None]], args) -> dict:
    """Exactness and batch-1 latency of ``target_dir`` with each draft (see the module docstring).

    Args:
        drafts: label → (model folder or export folder, variant or None).
    """
    import torch

    from compressor.evaluation.captioner import TorchCaptioner, generate_kwargs
    from compressor.models.batches import generation_inputs
    from compressor.models.loading import load_model
    from compressor.recipe.schema import GenerationSpec
    from exporters.onnx import OnnxCaptioner
    from exporters.onnx.speculative import SpeculativeCaptioner

    torch.set_num_threads(args.threads)
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    t_onnx = export(target_dir, work / "target-onnx")
    d_onnx = {label: (draft_export(Path(folder), target_dir, t_onnx, work), variant) for label, (folder, variant) in drafts.items()}
    meta = json.loads((t_onnx / "export.json").read_text())
    size = int(meta.get("image_size") or 224)
    kw = {"threads": args.threads, "providers": ["CPUExecutionProvider"]}
    longest = max(args.new_tokens)
    result: dict = {"model": name, "target": str(target_dir), "drafts": {k: [str(v[0]), v[1]] for k, v in drafts.items()},
                    "threads": args.threads, "load_1min": round(os.getloadavg()[0], 2), "exact": {}, "latency": {}}

    # ---- exactness at batch 8 on the longest captions
    gen = GenerationSpec(max_new_tokens=longest, batch_size=8)
    synthetic = name == "shapes"
    images = val_images(args.images, args.exact_images, size, synthetic)
    plain = OnnxCaptioner(t_onnx, gen, variant="optimized", **kw)
    target = OnnxCaptioner(t_onnx, gen, variant="optimized", scoring=True, **kw)
    draft_caps = {label: OnnxCaptioner(d, gen, variant=v or "optimized", **kw) for label, (d, v) in d_onnx.items()}
    batches = []
    for i in range(0, len(images), 8):
        inputs = {k: v.numpy() for k, v in generation_inputs(plain.family, plain.processor, images[i : i + 8], [""] * len(images[i : i + 8])).items()}
        batches.append((inputs, plain.generate(inputs)))
    model, proc = load_model(target_dir, dtype="float32")
    same_as_torch = 0
    for inputs, ref in batches:
        with torch.inference_mode():
            tt = model.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **generate_kwargs(gen)).numpy()
        same_as_torch += int((_pad(tt, ref.shape[1]) == _pad(ref, tt.shape[1])).all(1).sum())
    result["exact"]["images"] = len(images)
    result["exact"]["new_tokens"] = longest
    result["exact"]["ort_fp32_rows_equal_to_pytorch_generate"] = same_as_torch
    result["exact"]["distinct_captions"] = len({tuple(r) for _, ref in batches for r in ref.tolist()})
    for (label, dcap), share, k, conf in configurations(draft_caps, target, args):
        sc = SpeculativeCaptioner(target, dcap, k, label, min_confidence=conf, share_cache=share)
        label = label + ("" if share is None else "/own-cache")
        equal = 0
        for inputs, ref in batches:
            got = sc.generate(inputs, inputs)
            equal += int((got.shape == ref.shape) and (got == ref).all(1).sum()) if got.shape == ref.shape else 0
        rec = {"rows_identical": equal, **sc.stats.record()}
        result["exact"][side_name(label, k, conf)] = rec
        log.info("%s exact %s: %s", name, side_name(label, k, conf), rec)
        assert equal == len(images), f"{name}: {side_name(label, k, conf)}: {equal}/{len(images)} rows identical to plain fp32 ORT"

    # ---- latency at batch 1
    timed = val_images(args.images, args.images_timed, size, synthetic)
    floor = None
    from bench.onnx_speed import CACHE_RESIDENT_BYTES, read_bandwidth

    dec_bytes = meta["graphs"]["decoder"]["bytes"]
    if dec_bytes >= CACHE_RESIDENT_BYTES:
        floor = dec_bytes / (read_bandwidth(args.threads) * 1e9) * 1e3
    result["decoder_mb"] = round(dec_bytes / 1e6, 1)
    result["step_floor_ms"] = round(floor, 2) if floor else None
    for tokens in args.new_tokens:
        gen = GenerationSpec(max_new_tokens=tokens, batch_size=1)
        tc = TorchCaptioner(model, proc, gen)
        sides = {"torch": lambda ims, c=tc: c.caption(ims)}
        plain = OnnxCaptioner(t_onnx, gen, variant="optimized", **kw)
        sides["ort_fp32"] = lambda ims, c=plain: c.caption(ims)
        q8 = OnnxCaptioner(t_onnx, gen, variant="int8", **kw)
        sides["ort_int8"] = lambda ims, c=q8: c.caption(ims)
        target = OnnxCaptioner(t_onnx, gen, variant="optimized", scoring=True, **kw)
        specs = {}
        dcaps = {label: OnnxCaptioner(d, gen, variant=v or "optimized", **kw) for label, (d, v) in d_onnx.items()}
        for (label, dcap), share, k, conf in configurations(dcaps, target, args):
            sc = SpeculativeCaptioner(target, dcap, k, label, min_confidence=conf, share_cache=share)
            label = label + ("" if share is None else "/own-cache")
            specs[side_name(label, k, conf)] = sc
            sides[side_name(label, k, conf)] = lambda ims, c=sc: c.caption(ims)
        for f in sides.values():  # warm-up
            f(timed[:1])
        for sc in specs.values():
            sc.stats.reset()
        times = alternate(sides, timed, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows = {}
        for k, s in med.items():
            row = {"s": round(s, 4), "x_torch": round(med["torch"] / s, 2), "x_ort_fp32": round(med["ort_fp32"] / s, 2),
                   "x_ort_int8": round(med["ort_int8"] / s, 2)}
            if k in specs:
                sc = specs[k]
                row.update(sc.stats.record())
                parts = where_time_goes(sc, timed[:1])
                row["parts_ms"] = parts
                row["image_prefill_share"] = round((parts["image_ms"] + parts["prefill_ms"]) / parts["caption_ms"], 3)
                gen_tokens = sc.stats.tokens / max(1, sc.stats.captions)
                if floor:
                    row["ms_per_token_after_prefill"] = round((parts["target_calls_ms"] + parts["draft_calls_ms"] + parts["other_ms"])
                                                             / max(1.0, gen_tokens - 1), 2)
            rows[k] = row
        result["latency"][tokens] = rows
        log.info("%s %d tokens: %s", name, tokens, {k: (v["s"], v["x_torch"]) for k, v in rows.items()})
    return result


def configurations(drafts: dict, target, args):
    """``((label, draft captioner), share_cache, k, min_confidence)`` for every draft, k and cut; a
    draft that can draft on the target's cache (a variant of its export) also runs with its own
    cache (``share_cache=False``, labelled ``/own-cache``), side by side."""
    from exporters.onnx.speculative import can_share_cache

    for item in drafts.items():
        shares = [None, False] if can_share_cache(target, item[1]) and args.own_cache else [None]
        for share in shares:
            for k in args.k:
                for conf in args.min_confidence:
                    yield item, share, k, conf


def side_name(label: str, k: int, conf: float | None) -> str:
    """How tables name a speculative configuration (draft, k, and the confidence cut if any)."""
    return f"{label} k={k}" + ("" if conf is None else f" c={conf:g}")


def _pad(a, other: int):
    """``a (rows, n)`` padded with -1 to ``max(n, other)`` columns."""
    import numpy as np

    return np.pad(a, ((0, 0), (0, max(0, other - a.shape[1]))), constant_values=-1)


def print_results(results: list[dict], args) -> None:
    for r in results:
        e = r["exact"]
        print(f"\n{r['model']}: target {r['target']} (1-min load at start {r['load_1min']}, {r['threads']} threads)")
        print(f"  exactness, {e['images']} images, {e['new_tokens']} new tokens, batch 8 (per-row acceptance): "
              f"plain ORT fp32 equals PyTorch generate on {e['ort_fp32_rows_equal_to_pytorch_generate']}/{e['images']} rows; "
              f"{e['distinct_captions']} distinct captions")
        for key, v in e.items():
            if isinstance(v, dict):
                print(f"    {key:22s} identical {v['rows_identical']}/{e['images']}  acceptance {v['spec_acceptance']}  "
                      f"tokens/target call {v['spec_tokens_per_call']}")
        if r.get("step_floor_ms"):
            print(f"  fp32 decoder {r['decoder_mb']} MB: bandwidth floor of one step {r['step_floor_ms']} ms")
        for tokens, rows in r["latency"].items():
            print(f"  batch 1, {tokens} new tokens, {args.images_timed} images, median of {args.rounds} alternating rounds:")
            print(f"    {'side':28s} {'s/caption':>9s} {'x torch':>8s} {'x ORT':>6s} {'x int8':>7s} {'accept':>7s} {'calls':>6s} "
                  f"{'img+pre':>8s} {'ms/tok':>7s}")
            for k, v in rows.items():
                acc = v.get("spec_acceptance")
                calls = v.get("spec_target_calls_per_caption")
                share = v.get("image_prefill_share")
                mpt = v.get("ms_per_token_after_prefill")
                print(f"    {k:28s} {v['s']:9.3f} {v['x_torch']:8.2f} {v['x_ort_fp32']:6.2f} {v['x_ort_int8']:7.2f} "
                      f"{'' if acc is None else f'{acc:7.2f}':>7s} {'' if calls is None else f'{calls:6.1f}':>6s} "
                      f"{'' if share is None else f'{share:8.0%}':>8s} {'' if mpt is None else f'{mpt:7.1f}':>7s}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,shapes", help="comma-separated: demo, shapes")
    ap.add_argument("--images", type=Path, default=None, help="a COCO-layout folder (coco-mini); random images without")
    ap.add_argument("--run", type=Path, default=None, help="a `make demo-real` run folder (runs/smollm2_coco)")
    ap.add_argument("--prepare", action="store_true", help="without --run: build the demo-real baseline and candidate")
    ap.add_argument("--demo-target", type=Path, default=None,
                    help="instead of a run: this model folder is the demo's target (e.g. the assembled SmolLM2 "
                         "BLIP-2 of --prepare's inputs/), drafted by its int8 decoder")
    ap.add_argument("--demo-draft", type=Path, default=None, help="with --demo-target: a model folder that drafts too")
    ap.add_argument("--lora-steps", type=int, default=50)
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--shapes-draft", type=Path, default=Path("runs/demo/final"), help="the demo candidate (make demo)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("VLMC_BENCH_DIR", "/tmp/vlmc-bench")) / "speculative")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", default="20,40")
    ap.add_argument("--k", default="2,3,4,6")
    ap.add_argument("--own-cache", action=argparse.BooleanOptionalAction, default=True,
                    help="also run drafts that share the target's cache (its int8 variant) with their own cache")
    ap.add_argument("--min-confidence", default="none",
                    help="comma-separated draft-confidence cuts to try (none: always k; e.g. none,0.4)")
    ap.add_argument("--exact-images", type=int, default=64)
    ap.add_argument("--images-timed", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"],
                    help="ONNX exporter of the bench's exports (legacy: faster to export, slower graphs)")
    ap.add_argument("--prepare-only", action="store_true", help="build (and export) the models, measure nothing")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    args.new_tokens = [int(x) for x in args.new_tokens.split(",")]
    args.k = [int(x) for x in args.k.split(",")]
    args.min_confidence = [None if x.strip().lower() == "none" else float(x) for x in args.min_confidence.split(",")]
    global EXPORTER
    EXPORTER = args.exporter
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "onnx_ir", "onnxscript", "torch", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    args.work.mkdir(parents=True, exist_ok=True)
    plans = []
    for m in args.models.split(","):
        if m == "demo":
            if args.demo_target is not None:  # a model folder drafted by its int8 decoder (and --demo-draft)
                drafts = {"int8": (args.demo_target, "int8")}
                if args.demo_draft is not None:
                    drafts = {"candidate": (args.demo_draft, None), **drafts,
                              "candidate-int8": (args.demo_draft, "int8")}
                plans.append(("demo", args.demo_target, drafts))
                continue
            run = args.run
            if run is None:
                if not (args.prepare and args.images):
                    sys.exit("demo: give --run runs/smollm2_coco (make demo-real), or --prepare with --images")
                run = prepare(args.images, args.work, args.lora_steps, args.heal_steps)
            base, cand = run_models(run)
            plans.append(("demo", base, {"candidate": (cand, None), "int8": (base, "int8"), "candidate-int8": (cand, "int8")}))
        elif m == "shapes":
            from compressor.models.presets import SHIPPED

            teacher = Path(SHIPPED["shapes-teacher"])
            drafts = {"int8": (teacher, "int8")}
            if (args.shapes_draft / "config.json").is_file():
                drafts = {"candidate": (args.shapes_draft, None), **drafts}
            else:
                log.warning("no demo candidate at %s (make demo): the shapes teacher is drafted by its int8 decoder only",
                            args.shapes_draft)
            plans.append(("shapes", teacher, drafts))
        else:
            sys.exit(f"unknown model {m}: demo or shapes")
    if args.prepare_only:
        for name, target, drafts in plans:
            t_onnx = export(target, args.work / name / "target-onnx")
            for folder, _ in drafts.values():
                draft_export(Path(folder), target, t_onnx, args.work / name)
        return 0
    results = [bench_model(name, target, drafts, args) for name, target, drafts in plans]
    print_results(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
