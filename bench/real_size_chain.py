"""Real size: the published ``llm28_q8`` chain under ``--fast-dev-run`` on BLIP-2 OPT-2.7B, stage by stage.

What a user's first run does, at the size it has, on the CPU: ``compress apply recipes/llm28_q8.yaml
--fast-dev-run`` (2 training steps per stage, 4 images per data section, 4 new tokens, beam 5,
characteristics once) on the published BLIP-2 OPT-2.7B config with random bf16 weights and the
**real published processor** (GPT-2 BPE tokenizer, ``<image>`` = 50265, 32 query tokens), on real
COCO images and captions; once with the recipe's ``ce`` heal and once with a ``distill`` heal (the
baseline as teacher). For every stage it prints the wall time and the stage's own peak resident
memory (VmHWM reset at the stage's start, from the run's ``manifest.json``) divided by the input
checkpoint's bytes, beside the target: 1.3 for every stage, 2.3 for a distillation heal (teacher and
student are both needed). Then it checks that the written checkpoint carries exactly the published
tensor names (``model.safetensors.index.json`` of the published folder) minus the removed layers,
so a user's real checkpoint takes the same paths.

Steps:

1. (untimed, its own process) write the random bf16 checkpoint from the published folder's
   ``config.json``, one tensor at a time (``bench.real_size_apply.write_checkpoint``), and copy the
   processor and tokenizer files beside it, as a user's downloaded folder would be;
2. each variant in a fresh process (``python -m compressor.cli apply``), its resident memory sampled
   every 50 ms as well (the whole process's peak, between stages included).

Needs about 17 GB of free memory for the distill variant, 40 GB of disk, and a CPU with bf16
instructions (AVX-512 BF16 / AMX; the header line says whether this one has them) or a GPU. With
them both variants take about 7 minutes on 2 cores; without them PyTorch runs bf16 matrix products
on its single-threaded reference kernel (19x slower than float32 on such a CPU) and the real-size
bf16 chain takes many hours: there ``--dtype float32 --variants ce`` runs at real size in about 10
minutes and 17 GB (float32 distillation needs about 2 x 15 GB). ``--shrink`` builds the same widths
with fewer layers for development::

    python bench/real_size_chain.py --config /path/to/hf-configs/Salesforce_blip2-opt-2.7b \\
        --coco /path/to/coco-mini [--out bench/out/real_size_chain] [--variants ce,distill] [--shrink]

``--config`` may also be a lone ``config.json`` such as ``Salesforce_blip2-flan-t5-xl.config.json``:
the same chain with the Flan-T5 cut (top 4 blocks of the T5 encoder and of its decoder), a stand-in
processor (the project's T5-style Unigram tokenizer: the published one is not offline) and the tensor
names checked against the input checkpoint's (transformers' own) instead of a published index.

``--coco`` is a folder in the COCO captions layout (``captions_train2017.json``,
``captions_val2017.json``, ``train2017/``, ``val2017/``).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_size_apply import checkpoint_bytes, run_measured, write_checkpoint  # noqa: E402

RECIPE = REPO / "recipes" / "llm28_q8.yaml"
#: Target peak RSS / checkpoint per stage (issue 19), and for a distillation heal.
LIMIT, LIMIT_DISTILL = 1.3, 2.3
#: Layer stacks as (tensor-name prefix, config path of its layer count, layers the recipe drops), per
#: language model type: BLIP-2 OPT (the recipe's LLM28+Q8) and BLIP-2 Flan-T5 (the same cut: the top 4
#: Q-Former layers and the top 4 blocks of the T5 encoder and of its decoder).
STACKS = {
    "opt": (
        ("vision_model.encoder.layers.", ("vision_config", "num_hidden_layers"), 0),
        ("qformer.encoder.layer.", ("qformer_config", "num_hidden_layers"), 4),
        ("language_model.model.decoder.layers.", ("text_config", "num_hidden_layers"), 4),
    ),
    "t5": (
        ("vision_model.encoder.layers.", ("vision_config", "num_hidden_layers"), 0),
        ("qformer.encoder.layer.", ("qformer_config", "num_hidden_layers"), 4),
        ("language_model.encoder.block.", ("text_config", "num_layers"), 4),
        ("language_model.decoder.block.", ("text_config", "num_decoder_layers"), 4),
    ),
}
#: The recipe's removal stage, rewritten for an encoder-decoder language model.
REMOVAL_SETS = {"opt": [], "t5": ["stages.3.language_model={encoder: {drop_top: 4}, decoder: {drop_top: 4}}"]}
#: --shrink: layer counts of the development model (same widths as the real one).
SHRINK = {("vision_config", "num_hidden_layers"): 2, ("qformer_config", "num_hidden_layers"): 6,
          ("text_config", "num_hidden_layers"): 6, ("text_config", "num_layers"): 6,
          ("text_config", "num_decoder_layers"): 6}
MODEL_FILES = ("config.json", "model.safetensors.index.json")


def _config(config_src: Path, shrink: bool, dtype: str):
    """The published config (a folder, or a lone ``config.json``), transformers' defaults filled in."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_src))
    for sub in (config.text_config, config.vision_config, config.qformer_config):
        sub.dtype = dtype
    if shrink:
        for (sub, attr), n in SHRINK.items():
            if hasattr(getattr(config, sub), attr):
                setattr(getattr(config, sub), attr, n)
    return config


def lm_type(config_src: Path) -> str:
    """``opt`` or ``t5``: which stacks the name check and the removal use."""
    t = _config(config_src, False, "bfloat16").text_config.model_type
    if t not in STACKS:
        raise SystemExit(f"{config_src}: language model {t!r}; this benchmark knows {sorted(STACKS)}")
    return t


def published_folder(config_src: Path) -> bool:
    """A published model folder (processor, tokenizer, weight index), not a lone config.json."""
    return config_src.is_dir() and (config_src / "model.safetensors.index.json").is_file()


def write_model(config_src: Path, out: Path, shrink: bool, dtype: str = "bfloat16") -> None:
    """The random checkpoint (bf16 unless asked) with the published processor files beside it.

    A lone ``config.json`` (e.g. blip2-flan-t5-xl, whose published tokenizer is not offline) gets a
    stand-in processor: the project's T5-style Unigram tokenizer (pad 0, eos 1, as Flan-T5's) with the
    config's image size and query count, and ``image_token_index`` set to its ``<image>`` id.
    """
    config = _config(config_src, shrink, dtype)
    processor = None
    if not published_folder(config_src):
        from compressor.models.processors import blip2_processor, unigram_tokenizer

        processor = blip2_processor(unigram_tokenizer(), config.vision_config.image_size, config.num_query_tokens)
        config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    write_checkpoint(out, config=config, dtype=dtype)
    if processor is not None:
        processor.save_pretrained(str(out))
        return
    for f in sorted(config_src.iterdir()):
        if f.is_file() and f.name not in MODEL_FILES and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, out / f.name)


def expected_names(config_src: Path, shrink: bool, ckpt: Path) -> tuple[set[str], str]:
    """The published tensor names (``model.safetensors.index.json`` of the published folder; for a lone
    config.json, the written input's, which are transformers' own), minus the layers the recipe removes
    (and, with --shrink, the layers not built); and where the names came from."""
    if published_folder(config_src):
        names, source = set(json.loads((config_src / "model.safetensors.index.json").read_text())["weight_map"]), "published"
    else:
        names, source = set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]), "input checkpoint's"
    config = _config(config_src, shrink, "bfloat16")  # the published config with transformers' defaults filled in
    stacks = STACKS[lm_type(config_src)]
    out = set()
    for name in names:
        keep = True
        for prefix, (sub, attr), drop in stacks:
            if name.startswith(prefix):
                built = getattr(getattr(config, sub), attr)
                keep = int(name[len(prefix):].split(".")[0]) < built - drop
        if keep:
            out.add(name)
    return out, source


def saved_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    out: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out |= set(fh.keys())
    return out


def _cuda_peak(run_dir: Path, index: int) -> float | None:
    """A stage's peak GPU memory (MB) from its own record (``stages/NN-*/stage.json``), None on CPU."""
    for rec in sorted((run_dir / "stages").glob(f"{index:02d}-*/stage.json")):
        return json.loads(rec.read_text()).get("peak_cuda_mb")
    return None


def run_variant(name: str, ckpt: Path, coco: Path, out: Path, env: dict, dtype: str, extra_sets: list[str] = (),
                device: str = "cpu") -> dict:
    run_dir = out / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    data = (f"data={{format: coco, train: {{annotations: {coco}/captions_train2017.json, images: {coco}/train2017}}, "
            f"val: {{annotations: {coco}/captions_val2017.json, images: {coco}/val2017}}, "
            f"eval: {{annotations: {coco}/captions_val2017.json, images: {coco}/val2017}}}}")
    sets = [f"model={ckpt}", data, f"device={device}", f"dtype={dtype}", *extra_sets]
    if name == "distill":
        sets += ["stages.4.loss=distill", "stages.4.distill={teacher: baseline}"]
    cmd = [sys.executable, "-m", "compressor.cli", "apply", str(RECIPE), "--fast-dev-run", "--out", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    r = run_measured(cmd, env)
    result = {"rc": r["rc"], "seconds": r["seconds"], "peak_sampled": r["peak_sampled"], "maxrss": r["maxrss"]}
    if r["rc"] != 0:
        print(r["log"][-4000:])
        return result
    manifest = json.loads((run_dir / "manifest.json").read_text())
    result["stages"] = [{"index": s["index"], "type": s["type"], "label": s["label"], "seconds": s["seconds"],
                         "peak_rss_mb": s["peak_rss_mb"], "peak_cuda_mb": _cuda_peak(run_dir, s["index"]), "loss": s["summary"].get("loss") if isinstance(s["summary"], dict) else None}
                        for s in manifest["stages"]]
    result["final_names"] = sorted(saved_names(run_dir / "final"))
    return result


def table(results: dict, size: int) -> str:
    names = list(results)
    head = "| # | stage | " + " | ".join(f"{n}: s | {n}: peak RSS / ckpt" for n in names) + " | target |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    first = next(r for r in results.values() if "stages" in r)
    for i, st in enumerate(first["stages"]):
        cells, target = [], LIMIT
        for n in names:
            s = results[n].get("stages", [None] * (i + 1))[i]
            if s is None:
                cells += ["—", "—"]
                continue
            ratio = s["peak_rss_mb"] * 1e6 / size
            limit = LIMIT_DISTILL if (n == "distill" and s["type"] == "heal") else LIMIT
            target = max(target, limit)
            cells += [f"{s['seconds']:.0f}", f"{ratio:.2f}{'' if ratio <= limit else ' (over)'}"]
        label = f" [{st['label']}]" if st["label"] else ""
        lines.append(f"| {st['index']} | {st['type']}{label} | " + " | ".join(cells) + f" | ≤ {target} |")
    tot = ["| | whole run (sampled) | "]
    tot.append(" | ".join(f"{results[n]['seconds']:.0f} | {max(results[n]['peak_sampled'], results[n]['maxrss'] or 0) / size:.2f}"
                          for n in names))
    lines.append("".join(tot) + " | |")
    return "\n".join(lines)


def cpu_bf16() -> str:
    """Whether this CPU has bf16 matrix instructions (Linux ``/proc/cpuinfo`` flags), in words."""
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        return "bf16 instructions unknown"
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return "bf16 instructions: " + (", ".join(have) if have else "none (bf16 GEMM on the slow reference kernel)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True,
                    help="the published model folder without weights, or a lone config.json (stand-in processor)")
    ap.add_argument("--coco", type=Path, required=True, help="COCO captions layout: captions_*2017.json, train2017/, val2017/")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "real_size_chain")
    ap.add_argument("--variants", default="ce,distill", help="comma-separated: ce (the recipe's heal), distill")
    ap.add_argument("--shrink", action="store_true", help="development: the same widths with 2 vision and 6 Q-Former "
                    "and OPT layers")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="development: float32 runs several times faster on CPUs without bf16 instructions "
                    "(memory ratios alike)")
    ap.add_argument("--device", default="cpu", help="the recipe's device (cuda: each stage's peak GPU memory is "
                    "printed too)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="one more recipe override for every variant (repeatable), e.g. a metric list")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (about 30 GB at real size)")
    ap.add_argument("--report-only", action="store_true",
                    help="print the table and the tensor-name check again from the last run's results.json")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    config_dir, coco = args.config.resolve(), args.coco.resolve()
    kind = lm_type(config_dir)
    out: Path = args.out.resolve() / (("shrunk" if args.shrink else "real") + ("" if args.dtype == "bfloat16" else "-fp32")
                                      + ("" if kind == "opt" else f"-{kind}"))
    ckpt = out / "input"
    if args.write_only:
        write_model(config_dir, ckpt, args.shrink, args.dtype)
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    if not (ckpt / "model.safetensors.index.json").is_file():
        print(f"writing the random {args.dtype} checkpoint with the "
              f"{'published' if published_folder(config_dir) else 'stand-in'} processor (untimed) ...", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--config", str(config_dir), "--coco", str(coco), "--out", str(args.out),
               "--write-only", "--dtype", args.dtype, *(["--shrink"] if args.shrink else [])]
        subprocess.run(cmd, check=True, env=env)
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    size = checkpoint_bytes(ckpt)
    load = os.getloadavg()[0]
    print(f"checkpoint {size / 1e9:.2f} GB {args.dtype} ({'shrunk' if args.shrink else 'real size'}); 1-minute load {load:.1f} "
          f"on {os.cpu_count()} cores; {cpu_bf16()}", flush=True)
    results = {}
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
    else:
        for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
            results[name] = run_variant(name, ckpt, coco, out, env, args.dtype, REMOVAL_SETS[kind] + args.sets,
                                        args.device)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if not any("stages" in r for r in results.values()):
        print("every variant failed")
        return 1
    print()
    print(table(results, size))
    if any(s.get("peak_cuda_mb") for r in results.values() for s in r.get("stages", [])):
        print("peak GPU memory / checkpoint: " + "; ".join(
            f"{n}: " + ", ".join(f"{s['type']} {(s.get('peak_cuda_mb') or 0) * 1e6 / size:.2f}" for s in r.get("stages", []))
            for n, r in results.items()))
    want, source = expected_names(config_dir, args.shrink, ckpt)
    ok = True
    for name, r in results.items():
        if "final_names" not in r:
            ok = False
            continue
        got = set(r["final_names"])
        missing, extra = sorted(want - got), sorted(got - want)
        print(f"tensor names [{name}]: {len(got)} written, {len(want)} {source} minus removed layers: "
              + ("identical" if not missing and not extra else f"MISSING {missing[:5]} EXTRA {extra[:5]}"))
        ok &= not missing and not extra
    over = [(n, s["type"]) for n, r in results.items() for s in r.get("stages", [])
            if s["peak_rss_mb"] * 1e6 / size > (LIMIT_DISTILL if (n == "distill" and s["type"] == "heal") else LIMIT)]
    if over:
        print("over target: " + ", ".join(f"{n} {t}" for n, t in over))
    if not args.keep:
        for name in results:
            shutil.rmtree(out / f"run-{name}", ignore_errors=True)
    return 0 if ok and not over and all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
