"""The model card (``README.md``) of a pushed model or adapter, with huggingface_hub's ModelCard.

Metadata (``ModelCardData``): base model (when it is a Hub id), datasets, licence, library,
pipeline tag, tags, and a ``model-index`` whose evaluation results hold the metrics of every
evaluate label of the run (baseline and candidate), told apart by the metric's ``config``
field (``config: baseline`` / ``config: candidate``) so :func:`card_metrics` parses them back.
Body: the headline change, the baseline-versus-candidate table (metrics, parameters, GFLOPs,
latency, size), how it was made (stages), how to load it (transformers or peft, and the ONNX
export when it is pushed), limitations (what was removed, what the gate allowed, how little
data the metrics rest on) and the resolved recipe.

Everything comes from ``report.json`` and ``recipe.resolved.yaml`` of the run: the card says
only what was measured. It holds no token and needs no network; huggingface_hub's
``ModelCard.validate`` calls the Hub, so the metadata is checked by the Hub on a real push
(``create_commit`` posts README.md to ``/api/validate-yaml`` first).

Reference: https://huggingface.co/docs/hub/model-cards (model-index specification).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.metrics import display_name
from eval.reports import comparison_markdown, fmt_value

TASKS = {
    "caption": ("image-to-text", "Image captioning"),
    "vqa": ("visual-question-answering", "Visual question answering"),
}



def card_labels(report: dict) -> tuple[str | None, str | None]:
    """``(baseline, candidate)`` labels: the gate's, else the first and the last evaluation."""
    labels = list(report.get("evaluations", {}))
    gate = report.get("gate") or {}
    cand = gate.get("candidate") or (labels[-1] if labels else None)
    base = gate.get("baseline") or (labels[0] if len(labels) > 1 else None)
    if base == cand:
        base = None
    return base, cand


def eval_results(report: dict, dataset_type: str, dataset_id_name: str | None = None) -> list:
    """``EvalResult`` per (evaluate label, metric): the model-index of the card.

    Args:
        report: the run's ``report.json``.
        dataset_type: the model-index ``dataset.type`` (a Hub dataset id when known, else the
            data format, e.g. ``coco`` or ``synthetic``).
        dataset_id_name: a human name for the evaluated data (default: section and size).

    Returns:
        ``huggingface_hub.EvalResult`` list; ``metric_config`` is the evaluate label.
    """
    from huggingface_hub import EvalResult

    out = []
    for label, ev in report.get("evaluations", {}).items():
        task_type, task_name = TASKS.get(ev.get("task", "caption"), TASKS["caption"])
        data = ev.get("data", {})
        name = dataset_id_name or f"{data.get('section', 'eval')} ({data.get('examples', '?')} examples)"
        for key, value in ev.get("metrics", {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            out.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=dataset_type,
                    dataset_name=name,
                    dataset_split=str(data.get("section", "eval")),
                    metric_type=key,
                    metric_value=round(float(value), 4),
                    metric_name=f"{display_name(key)} ({label})",
                    metric_config=label,
                )
            )
    return out


def card_metrics(card_or_path: Any) -> dict[str, dict[str, float]]:
    """Parse a card's model-index back into ``{label: {metric: value}}``.

    Args:
        card_or_path: a ``ModelCard`` or the path of a ``README.md``; the metadata is loaded with
            ``ignore_metadata_errors=False`` so a malformed model-index raises.

    Raises:
        ValueError: the card's metadata is invalid (from huggingface_hub).
    """
    from huggingface_hub import ModelCard

    card = card_or_path if isinstance(card_or_path, ModelCard) else ModelCard.load(Path(card_or_path), ignore_metadata_errors=False)
    out: dict[str, dict[str, float]] = {}
    for r in card.data.eval_results or []:
        out.setdefault(r.metric_config or "", {})[r.metric_type] = r.metric_value
    return out


def build_model_card(
    report: dict,
    *,
    repo_id: str,
    what: str = "model",
    recipe_yaml: str | None = None,
    base_model: str | None = None,
    base_model_desc: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] = (),
    config: dict | None = None,
    files: Sequence[str] = (),
    onnx_files: Sequence[str] = (),
    plots: Sequence[str] = (),
    adapter_note: str | None = None,
    stage_notes=None,
):
    """Build the card of one push.

    Args:
        report: the run's ``report.json`` (evaluations, gate, stages); ``{}`` for a folder
            pushed without a run (the card then says no metrics were measured).
        repo_id: the target repository (the card's title and the load snippets use it).
        what: ``model`` or ``adapter``.
        recipe_yaml: the resolved recipe (shown whole; data format and decoding read from it).
        base_model: the base model's Hub id (``base_model`` metadata), None when it is a
            preset or a local folder.
        base_model_desc: a sentence naming the base model when it is not a Hub id.
        license: the licence id (``apache-2.0`` …); None leaves it out.
        datasets: Hub dataset ids for the metadata.
        config: the pushed model's ``config.json`` (model type and architecture).
        files: every file of the upload (listed at the end).
        onnx_files: paths of ONNX graphs in the upload (a loading section is added).
        plots: paths of PNG plots in the upload (embedded).
        adapter_note: for adapters, what model the adapter applies to when it is not the base.
        stage_notes: ``record -> {"description", "details", "tags", "limitations"}`` for one of
            the report's stage records (the pipeline passes its stage registry's; exporters do not
            know stages); None: stages are listed by type only.

    Returns:
        A ``huggingface_hub.ModelCard``; ``str(card)`` is the README.md text.
    """
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    recipe = yaml.safe_load(recipe_yaml) if recipe_yaml else {}
    recipe = recipe if isinstance(recipe, dict) else {}
    config = config or {}
    model_type = config.get("model_type") or ""
    evals = report.get("evaluations", {})
    task = next((ev.get("task") for ev in evals.values() if ev.get("task")), "caption")
    fmt = ((recipe.get("data") or {}).get("format")) or "unknown"
    base, cand = card_labels(report)
    notes = [_notes(stage_notes, s) for s in report.get("stages", [])]
    tags = ["vlm-compress", "compressed"]
    if model_type:
        tags.append(model_type)
    for n in notes:
        tags += [t for t in n["tags"] if t not in tags]
    if what == "adapter":
        tags.append("peft")
    data = ModelCardData(
        base_model=base_model,
        datasets=list(datasets) or None,
        license=license,
        library_name="peft" if what == "adapter" else "transformers",
        pipeline_tag=TASKS.get(task, TASKS["caption"])[0],
        tags=tags,
        model_name=repo_id,
        eval_results=eval_results(report, datasets[0] if datasets else fmt) or None,
    )
    body = _body(report, repo_id, what, recipe, recipe_yaml, base_model, base_model_desc, config, files, onnx_files,
                 plots, adapter_note, base, cand, fmt, notes)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# ------------------------------------------------------------------------------------ body


def _notes(stage_notes, record: dict) -> dict:
    empty = {"description": "", "details": [], "tags": [], "limitations": [], "loading": None}
    return {**empty, **(stage_notes(record) if stage_notes is not None else {})}


def _body(report, repo_id, what, recipe, recipe_yaml, base_model, base_model_desc, config, files, onnx_files, plots,
          adapter_note, base, cand, fmt, notes) -> str:
    evals = report.get("evaluations", {})
    name = report.get("recipe") or recipe.get("name") or "?"
    rhash = report.get("recipe_hash") or ""
    origin = f"`{base_model}`" if base_model else (base_model_desc or "an unnamed base model")
    kind = "LoRA adapter" if what == "adapter" else "compressed model"
    p = [f"# {repo_id.split('/')[-1]}", ""]
    p.append(
        f"A {kind} made from {origin} by vlm-compress with the recipe `{name}`"
        + (f" (hash `{rhash[:12]}`)" if rhash else "") + "."
    )
    chain = " → ".join(s["type"] for s in report.get("stages", []))
    if chain:
        p.append(f"Stages: {chain}.")
    p.append("")
    if base and cand and base in evals and cand in evals:
        p += [_headline(evals[base], evals[cand], base, cand), ""]
    p += ["## Results", ""]
    if evals:
        labels = [lab for lab in (base, cand) if lab] + [lab for lab in evals if lab not in (base, cand)]
        p += [comparison_markdown(labels, evals)]
        speculative = False
        for lab in labels:
            ev = evals[lab]
            dec = ev.get("decoding", {})
            d = ev.get("data", {})
            line = (
                f"- **{lab}**: {d.get('examples', '?')} examples of the `{d.get('section', '?')}` data ({fmt}); "
                + ", ".join(f"{k}={dec[k]}" for k in ("backend", "device", "dtype", "num_beams", "max_new_tokens", "prompt") if k in dec)
            )
            spec = dec.get("speculative")
            if isinstance(spec, dict):
                speculative = True
                acc = _num(ev.get("characteristics", {}).get("spec_acceptance"))
                line += (f"; speculative decoding with the draft `{spec.get('draft')}` ({spec.get('num_draft_tokens')} tokens "
                         f"per call" + (f", {acc:.0%} accepted" if acc is not None else "") + ")")
            p.append(line)
        p.append("")
        if speculative:
            p.append("Speculative decoding (Leviathan et al. 2023): a draft model (here typically the compressed one) "
                     "proposes several tokens, the evaluated model checks them all in one call and keeps the agreeing "
                     "ones plus its own next token, so its captions are its own greedy captions, with fewer calls of it. "
                     "`spec_acceptance` is the share of proposed draft tokens it accepted, `spec_tokens_per_call` the "
                     "tokens it emitted per call (1 without a draft).")
            p.append("")
        ch = evals[labels[-1]].get("characteristics", {})
        toks = ch.get("gflops_new_tokens", "the stated number of")
        p.append("Metrics are on the 0–100 scale (COCO caption evaluation, pycocoevalcap); parameters are counted "
                 f"once for tied weights; GFLOPs are for one image and {toks} generated tokens; latency is the "
                 f"median (p50) and p95 wall time per caption at batch size {ch.get('latency_batch_size', 1)}.")
        p.append("")
    else:
        p += ["No evaluation was recorded for this upload.", ""]
    for img in plots:
        p += [f"![{Path(img).stem}]({img})", ""]
    gate = report.get("gate")
    if gate:
        p += ["## Gate", "", f"The regression gate **{'passed' if gate.get('passed') else 'FAILED'}** "
              f"(candidate `{gate.get('candidate')}` against baseline `{gate.get('baseline')}`):", ""]
        p += [f"- {_rule_sentence(v)}" for v in gate.get("verdicts", [])] + [""]
    p += ["## How it was made", ""] + _stage_lines(report, notes) + [""]
    loading = next((n["loading"] for n in notes if n.get("loading")), None)
    if loading is None and "shape_plan.json" in files:  # a width-pruned folder pushed without its run
        from compressor.models.shapes import LOADING as loading
    p += ["## How to use it", ""] + _load_section(repo_id, what, config, evals.get(cand, {}) if cand else {}, base_model,
                                                  adapter_note, loading)
    if onnx_files:
        p += _onnx_section(repo_id, onnx_files)
    p += ["## Limitations", ""] + _limitations(report, notes, base_model, base_model_desc, base, cand, fmt) + [""]
    if recipe_yaml:
        p += ["## Recipe", "", "The resolved recipe (every default made explicit); rerun it with "
              "`compress apply recipe.resolved.yaml`.", "", "<details><summary>recipe.resolved.yaml</summary>", "",
              "```yaml", recipe_yaml.rstrip(), "```", "", "</details>", ""]
    if files:
        p += ["## Files", "", ", ".join(f"`{f}`" for f in files), ""]
    return "\n".join(p)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _headline(b: dict, c: dict, base: str, cand: str) -> str:
    parts = []
    bc, cc = b.get("characteristics", {}), c.get("characteristics", {})
    for key, name in (("params_total", "parameters"), ("gflops", "GFLOPs"), ("latency_p50_s", "latency p50 (s)"),
                      ("size_mb", "size (MB)")):
        x, y = _num(bc.get(key)), _num(cc.get(key))
        if x is not None and y is not None and x:
            parts.append(f"{name} {fmt_value(key, x)} → {fmt_value(key, y)} (×{y / x:.3f})")
    for key, x in b.get("metrics", {}).items():
        x, y = _num(x), _num(c.get("metrics", {}).get(key))
        if x is not None and y is not None:
            parts.append(f"{display_name(key)} {x:.2f} → {y:.2f} ({y - x:+.2f})")
    return f"**{base} → {cand}:** " + "; ".join(parts) + "." if parts else ""


RULE_WORDS = {
    "min": "at least {t}",
    "max": "at most {t}",
    "max_drop": "may drop at most {t} points below the baseline",
    "min_recovery": "must keep at least {t}× the baseline",
    "max_ratio": "must be at most {t}× the baseline",
}


def _rule_sentence(v: dict) -> str:
    key, rule, t = v.get("key"), v.get("rule"), v.get("threshold")
    words = RULE_WORDS.get(rule, f"{rule} {{t}}").format(t=f"{t:g}" if isinstance(t, (int, float)) else t)
    obs = v.get("reason") or ""
    return f"`{key}` {words}: {obs} — {'pass' if v.get('passed') else 'FAIL'}"


def _stage_lines(report: dict, notes: list[dict]) -> list[str]:
    out = []
    for s, n in zip(report.get("stages", []), notes):
        bits = []
        if s.get("label"):
            bits.append(f"label `{s['label']}`")
        bits += n["details"]
        sec = s.get("seconds")
        desc = f" — {n['description'].rstrip('.')}" if n["description"] else ""
        out.append(f"{s.get('index', '?')}. `{s.get('type')}`{desc}" + (f": {'; '.join(bits)}" if bits else "")
                   + (f" ({sec:.1f} s)" if isinstance(sec, (int, float)) else ""))
    return out or ["(no stage record)"]


def _load_section(repo_id, what, config, cand_eval, base_model, adapter_note, loading: str | None = None) -> list[str]:
    """How to load the upload: transformers (or peft for an adapter), or, for a model a stage made
    unloadable by ``from_pretrained`` (``loading``: a width-pruned model's shape plan), the loader
    that works."""
    from compressor.families import model_class_for

    cls = (config.get("architectures") or [None])[0] or model_class_for(config.get("model_type", "")) or "AutoModelForImageTextToText"
    dec = cand_eval.get("decoding", {})
    beams, new = dec.get("num_beams", 1), dec.get("max_new_tokens", 30)
    prompt = dec.get("prompt")
    text_arg = f", text={json.dumps(prompt)}" if prompt else ""
    if what == "adapter":
        base = base_model or "<the base model folder>"
        lines = [
            "With transformers and peft:", "", "```python", "from peft import PeftModel",
            f"from transformers import AutoProcessor, {cls}", "",
            f'base = {cls}.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'processor = AutoProcessor.from_pretrained("{base}")', "```", "",
        ]
        if adapter_note:
            lines += [adapter_note, ""]
        return lines
    if loading:
        return [loading.format(repo_id=repo_id, cls=cls, text_arg=text_arg, beams=beams, new=new).rstrip(), "",
                "Decoder-only language models (OPT, Llama) return the prompt followed by the caption; the settings "
                "above are the ones the metrics were measured with.", ""]
    return [
        "With transformers:", "", "```python", "from PIL import Image",
        f"from transformers import AutoProcessor, {cls}", "",
        f'processor = AutoProcessor.from_pretrained("{repo_id}")',
        f'model = {cls}.from_pretrained("{repo_id}")',
        f"inputs = processor(images=Image.open(\"photo.jpg\"){text_arg}, return_tensors=\"pt\")",
        f"out = model.generate(**inputs, num_beams={beams}, max_new_tokens={new})",
        "print(processor.batch_decode(out, skip_special_tokens=True)[0].strip())", "```", "",
        "Decoder-only language models (OPT, Llama) return the prompt followed by the caption; the settings "
        "above are the ones the metrics were measured with.", "",
    ]


def _onnx_section(repo_id: str, onnx_files: Sequence[str]) -> list[str]:
    folder = str(Path(onnx_files[0]).parent)
    return [
        "### ONNX", "",
        f"The ONNX export (graphs: {', '.join(f'`{f}`' for f in onnx_files)}) runs with ONNX Runtime through "
        "vlm-compress's generator:", "",
        "```bash", f"hf download {repo_id} --include '{folder}/*' --local-dir model",
        f"compress predict model/{folder} --data images/ --out predictions.json", "```", "",
        "Each graph also loads on its own with `onnxruntime.InferenceSession(path)`.", "",
    ]


def _limitations(report, notes, base_model, base_model_desc, base, cand, fmt) -> list[str]:
    out = [f"- {line}" for n in notes for line in n["limitations"]]
    gate = report.get("gate")
    if gate:
        allowed = "; ".join(_rule_sentence(v) for v in gate.get("verdicts", []))
        out.append(f"- What the gate allowed: {allowed}.")
    else:
        out.append("- No regression gate was set for this run.")
    evals = report.get("evaluations", {})
    if cand in evals:
        d = evals[cand].get("data", {})
        n = d.get("examples")
        out.append(f"- The metrics rest on {n} examples of the `{d.get('section')}` data ({fmt}). CIDEr's document "
                   "frequencies come from the evaluated set, so small sets are noisy and not comparable with "
                   "published numbers.")
        dev = evals[cand].get("decoding", {}).get("device")
        if dev:
            out.append(f"- Latency was measured on `{dev}` on the machine that ran the recipe; compare the ratios, "
                       "not the absolute times.")
    if not base_model:
        out.append(f"- The base model, {base_model_desc or 'unknown'}, is not a Hub repository: `base_model` is "
                   "left out of the metadata.")
    return out
