"""``compress plan``: parameters per part and GFLOPs before and after a recipe, on the meta device.

No weight is loaded or downloaded: the model is built from its config under
``torch.device("meta")`` (tensors with shapes and no storage), and every stage's declared
``plan`` hook applies the stage's effect to it (``remove_layers`` with the same surgery the
pipeline uses, which works on meta; LoRA stages with peft on meta to count their trainable
parameters); the counts are read off the result. The configs of ``Salesforce/blip2-opt-2.7b``, ``blip2-flan-t5-xl`` and
``blip-image-captioning-base`` ship with the project (``compressor/families/configs``); any other
Hub id needs ``--config FILE``.

GFLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta model, for
one image and ``gflops_new_tokens`` generated tokens, replaying the forward passes ``generate``
makes (transformers 5.x), the image path as the family runs it (its ``gflops_replay``), and the
language model at batch ``num_beams`` (:func:`language_model_flops`) — decoder-only: a prefill
over the image tokens and prompt that keeps the logits of the last position only
(``logits_to_keep=1``), then one step per further token with a KV cache; encoder-decoder: the
encoder once at batch 1, then one decoder step per token. ``generate`` itself cannot run on meta (its stopping checks read
values), hence the replay. On the tiny presets the figure equals the one ``evaluate`` measures
with FlopCounterMode around the real ``generate`` (a test checks it). Sampling and beam
bookkeeping (top-k, reordering the cache) are not FLOPs of matrix products and count 0 in both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import UserInputError

log = logging.getLogger(__name__)

#: A question used to size VQA prompts when planning.
PLAN_QUESTION = "What is in the image?"


@dataclass
class PlanModel:
    """A config resolved for planning.

    Attributes:
        config: the transformers config.
        processor: the model's processor when one is at hand without weights (presets, folders,
            assembled models), else None (prompt lengths are then estimated).
        source: where the config came from.
        notes: assumptions the plan made.
    """

    config: Any
    processor: Any
    source: str
    notes: list[str] = field(default_factory=list)


def plan_model(spec, config_file: str | Path | None = None) -> PlanModel:
    """Resolve a recipe ``model:`` to a config (and a processor when one is local), without weights.

    Args:
        spec: the recipe's model value.
        config_file: ``--config``: a config.json (or a folder holding one) that replaces the spec's.

    Raises:
        UserInputError: a Hub id whose architecture is not shipped, without ``--config`` (exit 2).
        ModelSpecError: a folder or file that does not exist.
    """
    from compressor.models.loading import (
        KNOWN_HUB_CONFIGS,
        classify,
        known_processor,
        load_config,
        load_processor,
    )
    from compressor.models.presets import PRESETS, SHIPPED, build_preset

    if config_file is not None:
        return PlanModel(load_config(str(config_file)), None, f"--config {config_file}")
    kind = classify(spec)
    if kind == "hub":
        if spec not in KNOWN_HUB_CONFIGS:
            known = ", ".join(KNOWN_HUB_CONFIGS)
            raise UserInputError(
                f"model '{spec}': its architecture is not known offline (shipped configs: {known}). Pass its "
                "config.json with `compress plan RECIPE --config FILE` (plan loads no weights and uses no network)."
            )
        return PlanModel(load_config(spec), known_processor(spec), f"shipped config of {spec}")
    if kind == "preset":
        if spec in SHIPPED:
            return PlanModel(load_config(str(SHIPPED[spec])), load_processor(SHIPPED[spec]), f"preset {spec}")
        model, proc = build_preset(spec)  # tiny: built in memory for its config and processor
        return PlanModel(model.config, proc, f"preset {spec}")
    if kind == "folder":
        return PlanModel(load_config(spec), load_processor(spec), f"folder {spec}")
    if kind == "config":
        proc = None
        if spec.processor:
            src = spec.processor
            proc = build_preset(src)[1] if src in PRESETS else (known_processor(src) or load_processor(SHIPPED.get(src, src)))
        return PlanModel(load_config(spec.config), proc, f"config {spec.config}")
    from compressor.models.assembly import assembled_config

    config, proc, sources = assembled_config(spec.assemble)
    return PlanModel(config, proc, f"assembled from {sources['language_model']}")


def meta_model(config):
    """The model of ``config`` on the meta device (no storage; building OPT-2.7B takes ~0.1 s)."""
    import torch

    from compressor.families import family_for_config
    from compressor.models.shapes import meta_skeleton
    from compressor.tokens import apply_token_options

    family = family_for_config(config)
    model = meta_skeleton(config)
    model.to(torch.float32)  # one dtype throughout (published configs say float16; FLOPs do not depend on it)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    apply_token_options(model)  # a folder's recorded token options (per-image query selection, merging)
    return model, family


def prompt_lengths(family, config, processor, prompt: str, image: str = "") -> tuple[int, int, bool]:
    """Token counts of the language-model input and of the image path's own text input for one image.

    Args:
        image: which of the family's images (``Family.gflops_images``; ``""``: the default one).

    Returns:
        ``(lm_tokens, image_text_tokens, exact)``: lm_tokens includes the image tokens the family
        puts before the prompt (BLIP-2's ``num_query_tokens``); image_text_tokens is what the
        image path reads (InstructBLIP's instruction, 0 otherwise); exact is False when estimated
        without a tokenizer (one special token plus one token per word).
    """
    return family.prompt_lengths(config, processor, prompt, image)


def flops_of(fn) -> tuple[int, Any]:
    """FLOPs of ``fn()`` and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def cache_of(out):
    """The KV cache of a model output (``.cache`` in transformers 5.x, ``.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def decode_flops(step, first: int, n: int) -> int:
    """FLOPs of ``n`` cached decoding steps, the first (already replayed) costing ``first`` FLOPs.

    From the second step on, each step attends to one more cached position than the one before,
    so its FLOPs grow by a constant (attention products are linear in the cache length; the rest
    is fixed). The first step can cost more (T5 projects the encoder states for cross-attention
    once, into the cache). So steps 2 and 3 are replayed and the rest summed in closed form:
    ``first + m·f2 + (f3 − f2)·m(m−1)/2`` with ``m = n − 1``.
    """
    if n <= 0:
        return 0
    if n == 1:
        return first
    second, _ = flops_of(step)
    if n == 2:
        return first + second
    third, _ = flops_of(step)
    m = n - 1
    return first + m * second + (third - second) * m * (m - 1) // 2


def language_model_flops(lm, decoder_only: bool, lm_tokens: int, new_tokens: int, num_beams: int) -> int:
    """FLOPs of a language model generating ``new_tokens`` from ``lm_tokens`` input embeddings, on meta.

    Decoder-only: a prefill over the whole input that keeps the last position's logits
    (``logits_to_keep=1``), then one cached step per further token, at batch ``num_beams``.
    Encoder-decoder: the encoder once at batch 1, then one decoder step per token at batch
    ``num_beams``. The replay of what transformers 5.x ``generate`` runs.

    Args:
        lm: a transformers causal LM or encoder-decoder (``T5ForConditionalGeneration``) on meta.
        decoder_only: which of the two.
        lm_tokens: input length (image tokens included).
        new_tokens: generated tokens.
        num_beams: beam width.

    Returns:
        FLOPs (multiply-add = 2).
    """
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    meta = torch.device("meta")
    B = num_beams
    hidden = lm.get_input_embeddings().weight.shape[1]
    state: dict[str, Any] = {}
    total = 0
    if decoder_only:
        state["cache"] = DynamicCache(config=lm.config)

        def prefill():
            out = lm(inputs_embeds=torch.zeros(B, lm_tokens, hidden, device=meta), cache=state["cache"],
                     use_cache=True, logits_to_keep=1)
            state["cache"] = cache_of(out)

        def step():
            out = lm(inputs_embeds=torch.zeros(B, 1, hidden, device=meta), cache=state["cache"],
                     use_cache=True, logits_to_keep=1)
            state["cache"] = cache_of(out)

        total += flops_of(prefill)[0]
        if new_tokens > 1:
            first, _ = flops_of(step)
            total += decode_flops(step, first, new_tokens - 1)
        return total
    f, enc_out = flops_of(lambda: lm.get_encoder()(inputs_embeds=torch.zeros(1, lm_tokens, hidden, device=meta)).last_hidden_state)
    total += f
    enc_out = enc_out.expand(B, -1, -1)
    state["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())

    def dec_step():
        out = lm(encoder_outputs=(enc_out,), decoder_input_ids=torch.zeros(B, 1, dtype=torch.long, device=meta),
                 cache=state["cache"], use_cache=True)
        state["cache"] = cache_of(out)

    first, _ = flops_of(dec_step)
    return total + decode_flops(dec_step, first, new_tokens)


def meta_gflops(model, family, lm_tokens: int, image_text_tokens: int, new_tokens: int, num_beams: int = 1) -> float:
    """GFLOPs (10^9, multiply-add = 2) of captioning one image, counted on the meta model.

    The family replays what its ``generate`` runs (its ``gflops_replay``), using
    :func:`language_model_flops` for the language model.

    Args:
        model: a model on the meta device.
        family: its family.
        lm_tokens: language-model input length (image tokens + special tokens + prompt).
        image_text_tokens: the image path's own text input (InstructBLIP's instruction; 0 otherwise).
        new_tokens: generated tokens (``min_new_tokens == max_new_tokens``).
        num_beams: beam width: the language model runs at this batch size.

    Returns:
        GFLOPs for the whole image → caption path (see the module docstring).
    """
    return family.gflops_replay(model, lm_tokens, image_text_tokens, new_tokens, num_beams)


def meta_gflops_by_part(model, family, lm_tokens: int, image_text_tokens: int, new_tokens: int, num_beams: int = 1) -> dict:
    """:func:`meta_gflops` in total and per part (``gflops``, ``gflops_<part>``).

    The replay runs under an outer ``FlopCounterMode`` that attributes what it sees to the parts
    (:func:`eval.characteristics.count_gflops_by_part`); the decode steps the replay sums in
    closed form (:func:`decode_flops`) are never run, and they are all the language model's, so
    ``gflops_language_model`` also gets the difference between the total and what was seen.
    """
    from eval.characteristics import count_gflops_by_part

    box: dict[str, float] = {}
    out = count_gflops_by_part(lambda: box.setdefault("total", meta_gflops(model, family, lm_tokens, image_text_tokens,
                                                                             new_tokens, num_beams)), model, family.parts)
    seen = sum(v for k, v in out.items() if k != "gflops")
    out["gflops"] = box["total"]
    if "gflops_language_model" in out:
        out["gflops_language_model"] += box["total"] - seen
    return out


@dataclass
class PlanContext:
    """What a stage's ``plan`` hook sees: the meta model (changed in place), its family, notes, the stage index.

    A stage that replaces the model (``distill``: the student) sets ``model``, ``family`` and
    ``processor`` (the new model's, or None); later stages and the "after" figures read them.

    Attributes:
        weight_bytes: module name → bytes its ``weight`` takes on disk when not ``numel ×
            dtype_bytes`` (a quantized linear: packed integers + scales); read by ``size_mb``.
        dtype_bytes: bytes per element of the saved weights (the recipe's dtype).
    """

    model: Any
    family: Any
    notes: list[str]
    index: int
    processor: Any = None
    weight_bytes: dict[str, float] = field(default_factory=dict)
    dtype_bytes: int = 4


def plan_recipe(loaded, config_file: str | Path | None = None, gflops: bool = True) -> dict:
    """The plan of a loaded recipe: parameters per part and GFLOPs before and after, per stage.

    Args:
        loaded: a :class:`~compressor.recipe.loader.LoadedRecipe`.
        config_file: ``--config FILE`` (needed for Hub ids whose architecture is not shipped).
        gflops: also count GFLOPs (the slow part: ~10 s for OPT-2.7B on 2 CPU cores).

    Returns:
        ``{"recipe", "model", "before", "after", "stages", "notes", "gflops_settings"}``; before and
        after hold ``params_total``, ``params_<part>``, ``gflops``, ``gflops_<part>``, ``size_mb`` and
        ``size_mb_<part>`` (MB = 10^6 bytes of the weights in the recipe's dtype; quantized linears as
        bits × parameters + scales and zero points).

    Raises:
        UserInputError: unknown architecture without ``--config``, invalid layer choices,
            LoRA parts this model does not have (all exit 2).
    """
    from compressor.families import family_for_config
    from compressor.models.batches import build_prompt
    from compressor.stages import declaration
    from eval.characteristics import count_parameters

    recipe = loaded.recipe
    pm = plan_model(recipe.model, config_file)
    model, family = meta_model(pm.config)
    notes = list(pm.notes)
    gen = recipe.generation
    new_tokens = next((st.characteristics.gflops_new_tokens for st in recipe.stages if hasattr(st, "characteristics")), 20)
    task = recipe.data.task if recipe.data is not None else "caption"
    prompt = build_prompt(gen.prompt, PLAN_QUESTION if task == "vqa" else None)
    if task == "vqa":
        notes.append(f"VQA prompt sized with the question {PLAN_QUESTION!r}")
    from compressor.quantization import dtype_bytes, part_bytes

    pc = PlanContext(model, family, notes, 0, pm.processor, {}, dtype_bytes(recipe.dtype))
    settings: dict[str, Any] = {}
    lengths: list[int] = []

    def measure() -> dict:
        """Parameters and bytes per part and, per image the family counts (``Family.gflops_images``),
        GFLOPs (the default image's also per part)."""
        # the family and the prompt length as the model now is: stages may change the image tokens
        # the language model reads (fewer queries), token options live in the config, and a stage may
        # replace the model (distill)
        m = pc.model
        fam = family_for_config(m.config)
        out: dict[str, Any] = dict(count_parameters(m, fam.parts))
        images = fam.gflops_images()
        for key, what in images.items():
            lm_tokens, q_tokens, exact = prompt_lengths(fam, m.config, pc.processor, prompt, key)
            if not exact:
                note = f"no tokenizer without weights: the prompt is taken as {lm_tokens} language-model tokens"
                notes.extend([note] if note not in notes else [])
            name = f"gflops_{key}" if key else "gflops"
            if not key:
                lengths.append(lm_tokens)
            if gflops and key:
                out[name] = meta_gflops(m, fam, lm_tokens, q_tokens, new_tokens, gen.num_beams)
            elif gflops:
                out.update(meta_gflops_by_part(m, fam, lm_tokens, q_tokens, new_tokens, gen.num_beams))
            if not settings or len(images) > 1:
                entry = {"lm_input_tokens": lm_tokens, "image_text_tokens": q_tokens}
                if not key:
                    settings.setdefault("gflops", entry)
                settings.setdefault("images", {}).setdefault(name, {"image": what, **entry})
        sizes = part_bytes(m, fam.parts, pc.dtype_bytes, pc.weight_bytes)
        out["size_mb"] = sizes.pop("total") / 1e6
        out.update({f"size_mb_{p}": b / 1e6 for p, b in sizes.items()})
        return out

    before = measure()
    stages = []
    for i, st in enumerate(recipe.stages):
        row: dict[str, Any] = {"index": i, "type": st.type, "label": st.label}
        decl = declaration(st.type)
        pc.index = i
        if decl.plan is not None:
            row.update(decl.plan(st, pc))
        row["params_total"] = sum(p.numel() for p in pc.model.parameters())
        stages.append(row)
    after = measure()
    first = settings["gflops"]
    gflops_settings = {"images": 1, "new_tokens": new_tokens, "num_beams": gen.num_beams, **first}
    if lengths[-1] != lengths[0]:
        gflops_settings["lm_input_tokens_after"] = lengths[-1]
    if len(settings["images"]) > 1:
        gflops_settings["per_image"] = settings["images"]
    return {
        "recipe": recipe.name,
        "model": {"source": pm.source, "family": family.name, "language_model": family.lm_model_type},
        "before": before,
        "after": after,
        "stages": stages,
        "gflops_settings": gflops_settings,
        "notes": notes,
    }


def _or_dash(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def format_plan(plan: dict) -> str:
    """A text table: parts before/after/change, GFLOPs, then the stages and notes."""

    def fmt(n: float) -> str:
        a = abs(n)
        if a >= 1e9:
            return f"{n / 1e9:.3f}B"
        if a >= 1e6:
            return f"{n / 1e6:.2f}M"
        if a >= 1e3:
            return f"{n / 1e3:.1f}k"
        return f"{n:.0f}"

    b, a = plan["before"], plan["after"]
    # a stage may replace the model by one of another family (distill): parts of either side
    parts = [k for k in dict.fromkeys([*b, *a]) if k.startswith("params_") and k != "params_total"]
    keys = parts + ["params_total"]
    lines = [f"plan for {plan['recipe']} ({plan['model']['source']}; {plan['model']['family']} with "
             f"{plan['model']['language_model']})", ""]
    lines.append(f"{'':24}{'before':>16}{'after':>16}{'change':>16}{'':>9}")
    for k in keys:
        bk, ak = b.get(k, 0), a.get(k, 0)
        d = ak - bk
        pct = f"{100 * d / bk:+.2f}%" if bk else ""
        lines.append(f"{k:24}{bk:>16,}{ak:>16,}{d:>+16,}{pct:>9}")
    lines.append(f"{'':24}{'(' + fmt(b['params_total']) + ')':>16}{'(' + fmt(a['params_total']) + ')':>16}"
                 f"{'(' + fmt(a['params_total'] - b['params_total']) + ')':>16}")
    for k in [k for k in dict.fromkeys([*b, *a]) if k.startswith("size_mb")]:
        bk, ak = b.get(k, 0.0), a.get(k, 0.0)
        d = ak - bk
        pct = f"{100 * d / bk:+.2f}%" if bk else ""
        lines.append(f"{k:24}{bk:>16,.2f}{ak:>16,.2f}{d:>+16,.2f}{pct:>9}")
    g = plan["gflops_settings"]
    for k in dict.fromkeys([*b, *a]):
        if not k.startswith("gflops"):
            continue
        if k in b and k in a:
            d = a[k] - b[k]
            pct = f"{100 * d / b[k]:>+8.2f}%" if b[k] else ""
            lines.append(f"{k:24}{b[k]:>16.3f}{a[k]:>16.3f}{d:>+16.3f}{pct}")
        else:  # a figure only one side's family counts (a distilled student of another family)
            lines.append(f"{k:24}{_or_dash(b.get(k)):>16}{_or_dash(a.get(k)):>16}")
    if "gflops" in b:
        after_tokens = f" ({g['lm_input_tokens_after']} after)" if "lm_input_tokens_after" in g else ""
        lines.append(f"  GFLOPs of one caption: 1 image, {g['new_tokens']} new tokens, {g['num_beams']} beam(s), "
                     f"{g['lm_input_tokens']} language-model input tokens{after_tokens}")
        for name, img in (g.get("per_image") or {}).items():
            lines.append(f"  {name}: {img['image']} ({img['lm_input_tokens']} language-model input tokens, "
                         f"image path input {img['image_text_tokens']})")
    lines.append("")
    lines.append("stages:")
    for s in plan["stages"]:
        extra = ""
        if "removed" in s:
            extra = "  removed " + ", ".join(f"{p} {r}" for p, r in s["removed"].items())
        if "quantized" in s:
            extra += "  quantized " + ", ".join(f"{p}: {d}" for p, d in s["quantized"].items())
        if "params_trainable" in s:
            extra += f"  trainable {fmt(s['params_trainable'])}"
        if "effect" in s:
            extra += f"  {s['effect']}"
        label = f" [{s['label']}]" if s["label"] else ""
        lines.append(f"  {s['index']:2d} {s['type']}{label}: {fmt(s['params_total'])} params{extra}")
    for n in plan["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
