"""Layer importance on calibration batches, and importance-based layer choice.

Two scores, both from the hidden states entering and leaving each layer of a stack, measured
with forward hooks during ordinary forward passes of the whole model on labelled calibration
batches (image + caption, the same batches training uses):

* **block influence** (ShortGPT, Men et al. 2024, "ShortGPT: Layers in Large Language Models are
  More Redundant Than You Expect", eq. 1): ``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]`` where ``x_i`` is
  the input of layer ``i`` and ``x_i+1`` its output. A layer that barely turns its input has low
  influence; the ``count`` layers with the lowest scores are removed.
* **angular distance** (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers", eq. 7): ``d(x_l, x_l+n) = arccos(cos(x_l, x_l+n)) / π`` between the input of layer
  ``l`` and the output of layer ``l+n-1``; the contiguous block of ``n = count`` layers with the
  smallest distance is removed. The paper reads the last token; here the distance is averaged
  over every valid token, as block influence is (captions are short, so the last token alone
  is a noisy estimate).

Which positions count ("valid tokens"): language models and BLIP's text decoder, the positions
of ``attention_mask`` (image tokens included, padding excluded); T5's decoder,
``decoder_attention_mask``; the Q-Former, its query positions only (InstructBLIP's instruction
tokens never reach the language model); the vision encoder, every patch.

A stack with a rule (``Stack.rule``: a Q-Former keeps cross-attention at ``index %
cross_attention_frequency == 0``) restricts the choice to removals the rule accepts:
the valid set of ``count`` layers with the lowest summed block influence, or the valid
contiguous block with the smallest angular distance.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import UserInputError
from compressor.families import Family, get_module

log = logging.getLogger(__name__)

SELECTORS = ("block_influence", "angular_distance")


@dataclass
class StackScores:
    """Importance of the layers of one stack.

    Attributes:
        part: the stack (a key of the family's stacks: ``language_model``, ``vision`` …).
        block_influence: per layer, ``1 - mean cos(input, output)`` (0 = identity).
        angular_distance: ``{n: [d(x_l, x_l+n) for l in 0..L-n]}`` for every block length ``n``.
        tokens: number of token positions averaged over.
    """

    part: str
    block_influence: list[float]
    angular_distance: dict[int, list[float]] = field(default_factory=dict)
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "block_influence": [round(v, 8) for v in self.block_influence],
            "angular_distance": {str(n): [round(v, 8) for v in vals] for n, vals in self.angular_distance.items()},
            "tokens": self.tokens,
        }


class _Recorder:
    """Forward hooks that keep each layer's input and output hidden states for one batch."""

    def __init__(self, layers):
        self.inputs: dict[int, Any] = {}
        self.outputs: dict[int, Any] = {}
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i), with_kwargs=True))

    def _pre(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            self.inputs[i] = h.detach().float()

        return hook

    def _post(self, i):
        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self.outputs[i] = h.detach().float()

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _valid_mask(stack, batch: dict, hidden, num_queries: int):
    """``(batch, seq)`` bool mask of the positions that count for ``stack`` (its ``positions``)."""
    import torch

    b, s = hidden.shape[0], hidden.shape[1]
    mask = torch.ones(b, s, dtype=torch.bool, device=hidden.device)
    if stack.positions == "queries":
        mask[:, num_queries:] = False
    elif stack.positions in ("attention_mask", "decoder_attention_mask"):
        m = batch.get(stack.positions)
        if m is not None and m.shape[1] == s:
            mask = m.bool()
    return mask.to(hidden.device)


def _cos(a, b):
    """Cosine similarity along the last dimension, ``(batch, seq)``."""
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)


def stack_scores(model, family: Family, parts: list[str], batches: list[dict]) -> dict[str, StackScores]:
    """Block influence and angular distances of every layer (block) of ``parts``, in one pass per batch.

    Args:
        model: a BLIP-family model (not a peft wrapper), eval mode, on the batches' device.
        family: its family.
        parts: stack names (``family.stacks`` keys).
        batches: model inputs with ``labels`` (:func:`compressor.models.batches.training_batch`);
            each is run through ``model(**batch)`` once.

    Returns:
        ``{part: StackScores}``; block influence in [0, 2], angular distances in [0, 1].

    Raises:
        UserInputError: a part this model does not have, or no batches.
    """
    import torch

    if not batches:
        raise UserInputError("importance scores need at least one calibration batch")
    stacks = {part: get_module(model, family.stack(part).layers) for part in parts}
    recorders = {part: _Recorder(layers) for part, layers in stacks.items()}
    sums_bi = {p: torch.zeros(len(stacks[p]), dtype=torch.float64) for p in parts}
    sums_ang = {p: torch.zeros(len(stacks[p]) + 1, len(stacks[p]) + 1, dtype=torch.float64) for p in parts}
    tokens = dict.fromkeys(parts, 0)
    try:
        with torch.inference_mode():
            for batch in batches:
                for rec in recorders.values():
                    rec.clear()
                model(**batch)
                for part, rec in recorders.items():
                    n = len(stacks[part])
                    if len(rec.inputs) != n or len(rec.outputs) != n:
                        raise UserInputError(f"{part}: the forward pass did not run every layer ({len(rec.inputs)} of {n})")
                    mask = _valid_mask(family.stack(part), batch, rec.inputs[0], family.num_queries)
                    tokens[part] += int(mask.sum())
                    for i in range(n):
                        sums_bi[part][i] += float((1.0 - _cos(rec.inputs[i], rec.outputs[i]))[mask].sum())
                    # x_l: input of layer l (l < n) or output of the last layer (l = n).
                    states = [rec.inputs[i] for i in range(n)] + [rec.outputs[n - 1]]
                    for lo in range(n):
                        for hi in range(lo + 1, n + 1):
                            c = _cos(states[lo], states[hi])[mask].clamp(-1.0, 1.0)
                            sums_ang[part][lo, hi] += float((torch.arccos(c) / math.pi).sum())
    finally:
        for rec in recorders.values():
            rec.remove()
    out: dict[str, StackScores] = {}
    for part in parts:
        n, t = len(stacks[part]), max(tokens[part], 1)
        bi = (sums_bi[part] / t).tolist()
        ang = {k: [float(sums_ang[part][lo, lo + k] / t) for lo in range(n - k + 1)] for k in range(1, n)}
        out[part] = StackScores(part, bi, ang, tokens[part])
    return out


def _valid(family: Family, part: str, n: int, removed) -> bool:
    """Whether removing ``removed`` keeps the stack's rule (a Q-Former's cross-attention pattern)."""
    return family.stack(part).keep_ok([i for i in range(n) if i not in set(removed)])


def select_layers(scores: StackScores, count: int, select: str, family: Family) -> list[int]:
    """The layers to remove: the ``count`` least important, under the stack's constraints.

    Args:
        scores: the stack's scores.
        count: how many layers to remove.
        select: ``block_influence`` or ``angular_distance`` (module docstring).
        family: the model family (its stacks' rules).

    Returns:
        Sorted layer indices.

    Raises:
        UserInputError: ``count`` leaves no layer, or no removal of ``count`` layers keeps the
            stack's rule.
    """
    n = len(scores.block_influence)
    part = scores.part
    if not 1 <= count < n:
        raise UserInputError(f"{part}: count {count} must be between 1 and {n - 1} (the stack has {n} layers)")
    ruled = family.stack(part).rule is not None
    if select == "block_influence":
        if not ruled:
            order = sorted(range(n), key=lambda i: (scores.block_influence[i], -i))
            return sorted(order[:count])
        best: tuple[float, list[int]] | None = None
        for cand in itertools.combinations(range(n), count):
            if _valid(family, part, n, cand):
                total = sum(scores.block_influence[i] for i in cand)
                if best is None or total < best[0] - 1e-12:
                    best = (total, list(cand))
        if best is None:
            raise UserInputError(f"{part}: no set of {count} layers can be removed while keeping the stack's layer pattern")
        return best[1]
    if select == "angular_distance":
        dists = scores.angular_distance[count]
        starts = [lo for lo in range(n - count + 1) if _valid(family, part, n, range(lo, lo + count))]
        if not starts:
            raise UserInputError(f"{part}: no block of {count} contiguous layers can be removed while keeping the stack's layer pattern")
        lo = min(starts, key=lambda s: (dists[s], -s))
        return list(range(lo, lo + count))
    raise UserInputError(f"unknown selection '{select}'; expected one of {', '.join(SELECTORS)}")


def calibration_batches(model, processor, dataset, calibration, prompt_template: str | None, device: str) -> list[dict]:
    """``calibration.batches`` labelled batches of ``calibration.batch_size`` (image, caption) pairs.

    Args:
        model: the model (for its family and dtype).
        processor: its processor.
        dataset: the calibration :class:`~compressor.data.Dataset`.
        calibration: the recipe's ``CalibrationSpec`` (or anything with ``batches``/``batch_size``).
        prompt_template: the recipe's ``generation.prompt``.
        device: where the tensors go.

    Raises:
        UserInputError: the dataset has no captions or answers to build batches from.
    """
    from compressor.families import family_for_model
    from compressor.models.batches import build_prompt, training_batch

    pairs = dataset.training_pairs()
    if not pairs:
        raise UserInputError(f"calibration data ({dataset.section}) has no captions or answers to score layers on")
    family = family_for_model(model)
    dtype = next(model.parameters()).dtype
    want = calibration.batches * calibration.batch_size
    # One pair per image first (spread over many images), then further captions.
    seen, first, rest = set(), [], []
    for ex, t in pairs:
        (rest if ex.image_id in seen else first).append((ex, t))
        seen.add(ex.image_id)
    chosen = (first + rest)[:want]
    out = []
    for i in range(0, len(chosen), calibration.batch_size):
        # with skip_invalid, a pair whose image cannot be decoded leaves the batch (counted by the dataset)
        loaded = [(ex, t, dataset.load_image(ex)) for ex, t in chosen[i : i + calibration.batch_size]]
        chunk = [(ex, t) for ex, t, img in loaded if img is not None]
        if not chunk:
            continue
        batch = training_batch(
            family,
            processor,
            [img for _, _, img in loaded if img is not None],
            [t for _, t in chunk],
            [build_prompt(prompt_template, ex.question) for ex, _ in chunk],
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        out.append(batch)
    return out


def choose_layers(model, processor, family: Family, part: str, selection, ctx, calibration) -> tuple[list[int], dict]:
    """Score one stack on the recipe's calibration data and choose what to remove.

    Convenience wrapper of :func:`calibration_batches`, :func:`stack_scores` and
    :func:`select_layers` for one part (the ``remove_layers`` stage scores all parts in one pass).

    Returns:
        ``(removed, scores_json)``.
    """
    data = ctx.data(calibration.data)
    batches = calibration_batches(model, processor, data, calibration, ctx.recipe.generation.prompt, ctx.device)
    scores = stack_scores(model, family, [part], batches)[part]
    return select_layers(scores, selection.count, selection.select, family), scores.to_json()


def plot_importance(parts: dict[str, dict], out_png) -> bool:
    """Bar chart of block influence per layer (one panel per part), removed layers highlighted.

    Args:
        parts: ``{part: {"block_influence": [...], "removed": [...] (optional)}}``.
        out_png: the PNG to write (atomically).

    Returns:
        True when written; False when matplotlib failed (logged, never raised: a plot must not
        fail a stage).
    """
    from pathlib import Path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(parts)
        fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * max(1, len(names))), dpi=100, squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            bi = parts[name]["block_influence"]
            removed = set(parts[name].get("removed") or [])
            colors = ["tab:red" if i in removed else "tab:blue" for i in range(len(bi))]
            ax.bar(range(len(bi)), bi, color=colors)
            ax.set_title(f"{name}: block influence (1 - cos(in, out))" + ("; red = removed" if removed else ""), fontsize=9)
            ax.set_xlabel("layer")
            ax.set_xticks(range(len(bi)))
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        out_png = Path(out_png)
        tmp = out_png.with_name("." + out_png.name + ".tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(out_png)
        return True
    except Exception as exc:  # plotting must never fail a stage
        log.warning("could not draw %s: %s", out_png, exc)
        return False
