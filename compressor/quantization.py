"""Weight quantization of chosen parts: RTN, GPTQ (a kept library), sensitivity, mixed precision, storage.

What the ``quantize`` stage (:mod:`compressor.stages.quantize`) and the loader use:

* **Targets.** The ``nn.Linear`` modules under the named parts (the family's ``parts`` prefixes);
  embeddings are never ``nn.Linear`` and stay, and the output projection (``lm_head``, tied to
  the input embeddings in OPT and SmolLM2) is kept unless asked for. Every other tensor is saved
  bit-identical.
* **Scheme.** Integer weights of ``bits`` (2, 3, 4, 8) in groups of ``group_size`` input
  channels with one scale per group (per output channel when ``group_size`` is None);
  symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``s = max|w| / ((2^b - 1) / 2)``;
  asymmetric adds an integer zero point per group. The grid is compressed-tensors' own (its
  ``calculate_qparams``), so the saved integers are exactly the ones computed here.
* **Clipping search** (``clip: true``): per group, the range ``p · max|w|`` (asymmetric: ``p · [min,
  max]``) with ``p`` in ``1, 0.99, …, 0.21`` whose rounded weights have the least ``Σ|Q(w) − w|^2.4``,
  as the GPTQ reference's ``Quantizer.find_params(mse=True)`` (grid 100, maxshrink 0.8, norm 2.4);
  for GPTQ it is the library's own ``mse`` option, the same search.
* **RTN** (round to nearest) is the formula above, here. **GPTQ** (Frantar et al. 2023, "GPTQ:
  Accurate Post-Training Quantization for Generative Pre-trained Transformers") is Intel Neural
  Compressor's port of the reference implementation (``neural_compressor.torch.algorithms.
  weight_only.gptq.GPTQ``: Hessian from calibration inputs, column-by-column rounding with error
  feedback, lazy batch updates); this module only feeds it the inputs of each layer, one layer of
  a stack at a time, with the layers before it already quantized (the paper's sequential order).
* **Sensitivity** (:func:`sensitivity`): for each unit (a stack layer's linears, or one linear),
  the KL divergence of the next-token distribution over the caption tokens of calibration
  batches, unquantized model → that unit alone quantized (RTN at the stage's bits).
  :func:`choose_high_precision` keeps the most sensitive units at the higher precision until the
  whole model meets ``max_kl`` (or a fixed ``fraction``).
* **Storage** (:func:`save_quantized`): the compressed-tensors ``pack-quantized`` format, vLLM's
  native format, with one config group per precision; plain ``transformers`` loads it when the
  ``compressed-tensors`` package is installed. :func:`check_quantized_folder` refuses a folder
  whose scale tensors are missing, mis-shaped or not finite and positive before any weight loads.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import CorruptInputError, UserInputError

log = logging.getLogger(__name__)

#: Bit widths the stage accepts.
BITS = (2, 3, 4, 8)
#: The format written (compressed-tensors' name) and its ``quant_method``.
FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
#: Extras (pyproject) that bring each library.
EXTRA_STORAGE = "quant"
EXTRA_GPTQ = "gptq"
#: Tolerance of the saved folder's logits against the stage's in-memory result: max |Δ| scaled
#: by max(1, |logits|) (fp32 weights; 16-bit weights get :data:`RELOAD_TOLERANCE_16`).
RELOAD_TOLERANCE = 1e-4
RELOAD_TOLERANCE_16 = 1e-2


@dataclass(frozen=True)
class Scheme:
    """One precision: ``bits`` integers in groups of ``group_size`` input channels (None: per channel)."""

    bits: int
    group_size: int | None
    symmetric: bool = True
    #: Search each group's clipping range (how the scales are chosen, not how they are stored: left
    #: out of equality, so one stored config group holds both).
    clip: bool = field(default=False, compare=False)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def describe(self) -> str:
        g = f"groups of {self.group_size}" if self.group_size else "per output channel"
        return f"int{self.bits} weights ({'symmetric' if self.symmetric else 'asymmetric'}, {g}{', clipped' if self.clip else ''})"


@dataclass
class QuantizedLinear:
    """The result for one linear: its scheme, scales ``(out, groups)`` and zero points (None when symmetric)."""

    scheme: Scheme
    scale: Any
    zero: Any = None


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def output_projection_name(model) -> str | None:
    """The module name of the model's output projection (``lm_head``), or None."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return None
    for name, mod in model.named_modules():
        if mod is out:
            return name
    return None


def linear_targets(model, family, parts: Sequence[str], lm_head: bool = False, ignore: Sequence[str] = ()) -> dict[str, str]:
    """The ``nn.Linear`` modules to quantize: module name → part, in module order.

    Args:
        model: the model (a real or ``meta`` one).
        family: its :class:`~compressor.families.Family`.
        parts: part names (``family.parts`` keys).
        lm_head: include the output projection.
        ignore: glob patterns over module names that stay unquantized.

    Raises:
        UserInputError: a part the family does not have, or parts that hold no linear layer.
    """
    import torch

    bad = [p for p in parts if p not in family.parts]
    if bad:
        raise UserInputError(
            f"quantize: {family.describe_model()} has no part {', '.join(map(repr, bad))}; its parts are: "
            f"{', '.join(family.parts)}"
        )
    head = output_projection_name(model)
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if name == head and not lm_head:
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in ignore):
            continue
        for part in parts:
            if any(name == pre or name.startswith(pre + ".") for pre in family.parts[part]):
                out[name] = part
                break
    if head is not None and lm_head and head not in out:
        out[head] = "language_model"
    if not out:
        raise UserInputError(f"quantize: parts {list(parts)} hold no linear layer to quantize (after `ignore`)")
    return out


def check_group_size(model, targets: dict[str, str], group_size: int | None) -> None:
    """Every target's input width must be a multiple of ``group_size``.

    Raises:
        UserInputError: naming the first modules that do not divide, their widths and group sizes that would.
    """
    if not group_size:
        return
    bad = []
    for name in targets:
        n = model.get_submodule(name).in_features
        if n % group_size:
            bad.append((name, n))
    if bad:
        widths = sorted({n for _, n in bad})
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in {model.get_submodule(t).in_features for t in targets})]
        raise UserInputError(
            f"quantize: group_size {group_size} does not divide the input width of {len(bad)} layer(s), e.g. "
            f"{bad[0][0]} ({bad[0][1]} inputs); widths {widths}. Use a group size that divides every width"
            + (f" ({', '.join(map(str, fits))})" if fits else "")
            + ", `group_size: null` (one scale per output channel), or leave those layers out with `ignore`"
        )


def unit_of(name: str, family) -> str:
    """The unit a linear belongs to for GPTQ's order and sensitivity: its stack layer
    (``language_model.model.layers.3``), else the module itself (the projection)."""
    for st in family.stacks.values():
        m = re.match(re.escape(st.layers) + r"\.(\d+)\.", name)
        if m:
            return f"{st.layers}.{m.group(1)}"
    return name


# --------------------------------------------------------------------------------------------
# RTN (ours) and GPTQ (Intel Neural Compressor)
# --------------------------------------------------------------------------------------------


def rtn_params(w, scheme: Scheme):
    """Scales and zero points of round-to-nearest for a weight ``(out, in)``.

    Returns:
        ``(scale (out, groups), zero (out, groups) int or None)``; float32, with the scale already
        rounded to the weight's dtype (the dtype it is stored in).
    """
    import torch

    g = w.float().reshape(w.shape[0], -1, scheme.group_size or w.shape[1])

    def params(shrink: float):
        if scheme.symmetric:
            scale = g.abs().amax(-1) * shrink / ((scheme.qmax - scheme.qmin) / 2)
        else:
            lo = g.amin(-1).clamp(max=0) * shrink
            hi = g.amax(-1).clamp(min=0) * shrink
            scale = (hi - lo) / (scheme.qmax - scheme.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(w.dtype).float()
        zero = None if scheme.symmetric else torch.clamp(torch.round(scheme.qmin - lo / scale), scheme.qmin, scheme.qmax)
        return scale, zero

    scale, zero = params(1.0)
    if scheme.clip:  # the GPTQ reference's find_params(mse=True): grid 100, maxshrink 0.8, norm 2.4
        w32 = w.float()

        def error(sc, zp):
            return (fake_quantize(w32, sc, zp, scheme).reshape(g.shape) - g).abs().pow(2.4).sum(-1)

        best = error(scale, zero)
        for i in range(1, 80):
            sc, zp = params(1 - i / 100)
            err = error(sc, zp)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, sc, scale)
            if zero is not None:
                zero = torch.where(better, zp, zero)
    return scale, zero


def fake_quantize(w, scale, zero, scheme: Scheme):
    """``w`` rounded to the grid of ``scale``/``zero`` and dequantized (same shape and dtype)."""
    import torch

    gs = scheme.group_size or w.shape[1]
    g = w.float().reshape(w.shape[0], -1, gs)
    z = zero[..., None] if zero is not None else 0.0
    q = torch.clamp(torch.round(g / scale[..., None]) + z, scheme.qmin, scheme.qmax)
    return ((q - z) * scale[..., None]).reshape(w.shape).to(w.dtype)


def rtn_linear(mod, scheme: Scheme) -> QuantizedLinear:
    """Round one linear's weight to nearest, in place; returns its scales."""
    import torch

    with torch.no_grad():
        scale, zero = rtn_params(mod.weight.data, scheme)
        mod.weight.data.copy_(fake_quantize(mod.weight.data, scale, zero, scheme))
    return QuantizedLinear(scheme, scale, zero)


def gptq_available() -> bool:
    """Whether GPTQ's library (Intel Neural Compressor, the ``gptq`` extra) is importable."""
    import importlib.util

    return importlib.util.find_spec("neural_compressor") is not None


def require_gptq() -> None:
    """Raises:
    UserInputError: the library is not installed (names the extra, exit 2)."""
    if not gptq_available():
        raise UserInputError(
            "quantize: method gptq uses Intel Neural Compressor's GPTQ, which is not installed: "
            f"pip install 'vlm-compress[{EXTRA_GPTQ}]' (neural-compressor-pt; it also installs torchao), "
            "or use method: rtn"
        )


def require_storage() -> None:
    """Raises:
    UserInputError: compressed-tensors (the saved format's package) is not installed (exit 2)."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise UserInputError(
            "quantized models are stored in the compressed-tensors format (vLLM's), whose package is not installed: "
            f"pip install 'vlm-compress[{EXTRA_STORAGE}]' (compressed-tensors)"
        )


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once a unit's inputs are collected."""


def run_batches(model, batches: Sequence[dict]) -> None:
    """Forward every calibration batch (labels dropped), stopping early where a hook raises :class:`_Stop`."""
    import torch

    with torch.no_grad():
        for b in batches:
            try:
                model(**{k: v for k, v in b.items() if k != "labels"})
            except _Stop:
                pass


#: GPTQ Hessian positions in the language model: text tokens only, or every position.
GPTQ_POSITIONS = ("text", "all")


def image_token_id(model) -> int | None:
    """The id of the image placeholder token the processor puts in ``input_ids`` (BLIP-2 in
    transformers 5, InstructBLIP, SmolVLM), or None when images do not enter as tokens (BLIP)."""
    cfg = model.config
    for key in ("image_token_index", "image_token_id"):
        v = getattr(cfg, key, None)
        if v is not None:
            return int(v)
    return None


def text_positions(batch: dict, image_token: int | None, decoder_only: bool) -> dict[str, Any]:
    """Boolean masks of the language model's text positions in one calibration batch.

    Returns:
        ``{"encoder": (batch, seq)}`` — positions of ``input_ids`` that are neither padding
        (``attention_mask`` 0) nor image placeholders — and, for encoder-decoders, ``"decoder":
        (batch, target_len)``, the positions with a label (not -100).
    """
    import torch

    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    enc = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if image_token is not None:
        enc = enc & (ids != image_token)
    out = {"encoder": enc}
    if not decoder_only and batch.get("labels") is not None:
        out["decoder"] = batch["labels"] != -100
    return out


#: Linears whose input is the other stream (the encoder's output, image features): cross-attention
#: keys and values (T5's EncDecAttention.k/v, BLIP's crossattention key/value, *cross_attn k/v_proj).
_CROSS_KV = re.compile(r"(EncDecAttention\.[kv]|crossattention\.self\.(key|value)|(cross_attn|encoder_attn)\.[kv]_proj)$")


def hessian_positions(name: str, x, masks: dict, lm_prefixes: Sequence[str], head: str | None):
    """Which rows of a linear's input ``x`` build its GPTQ Hessian under ``positions: text``.

    Args:
        name: the linear's module name.
        x: its input, ``(batch, seq, in)`` or ``(batch × seq, in)`` (OPT flattens before its MLP).
        masks: :func:`text_positions` of the batch.
        lm_prefixes: the language model's module prefixes (other parts use every position).
        head: the output projection's name (an encoder-decoder's head reads the decoder stream).

    Returns:
        A boolean mask over ``x``'s rows; None for every position (not the language model, or
        a cross-attention key/value, whose input is the encoder's output or image features);
        False when the linear is the language model's but ``x`` matches no mask (every
        position is used; the caller warns).
    """
    if not any(name == p or name.startswith(p + ".") for p in lm_prefixes) and name != head:
        return None
    if _CROSS_KV.search(name):
        return None
    key = "decoder" if "decoder" in masks and (".decoder." in name or name == head) else "encoder"
    m = masks.get(key)
    if m is None:
        return False
    if x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
        return m
    if x.dim() == 2 and x.shape[0] == m.numel():
        return m.reshape(-1)
    return False


def gptq_quantize(model, targets: dict[str, Scheme], family, batches: Sequence[dict], damp: float = 0.01,
                  act_order: bool = False, positions: str = "text") -> dict[str, QuantizedLinear]:
    """GPTQ on ``targets``, one unit (stack layer) at a time, in forward order.

    Each unit's linears see the calibration inputs produced by the units before it, already
    quantized; their Hessians ``2 X Xᵀ`` are accumulated by the library's ``GPTQ.add_batch`` and the
    weights quantized by its ``fasterquant`` (blocks of 128 columns, dampening ``damp`` × the mean
    diagonal, optional ``act_order`` with static groups).

    ``positions="text"`` builds the language model's Hessians from its text positions only
    (:func:`text_positions`: not padding, not image placeholders; for an encoder-decoder's
    decoder, the labelled positions): a VLM's image tokens are a few dozen vectors per image whose
    statistics differ from text (on an untuned model, random), and in ``X Xᵀ`` they outweigh the
    caption tokens whose predictions the model is scored on. On the SmolLM2 BLIP-2 (4-bit, groups
    of 64, 4 batches of 8) this takes held-out perplexity from ×2.22 (all positions) to ×1.13;
    with 30 batches, ``act_order`` and ``damp=0.1`` to ×1.084 (docs/experiments.md). Other parts (Q-Former, vision) always use every position.

    Args:
        model: the model, changed in place (weights replaced by their quantized values).
        targets: module name → scheme.
        family: its family (stack layers decide the units).
        batches: calibration batches (``model(**batch)`` inputs).
        damp: GPTQ's ``percdamp``.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        positions: ``text`` or ``all`` (see above).

    Returns:
        module name → its scales and zero points.

    Raises:
        UserInputError: the library is not installed.
    """
    import torch

    require_gptq()
    from neural_compressor.torch.algorithms.weight_only.gptq import GPTQ

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    if positions not in GPTQ_POSITIONS:
        raise UserInputError(f"gptq positions {positions!r}: expected one of {', '.join(GPTQ_POSITIONS)}")
    lm = tuple(family.parts.get("language_model", ()))
    image_token = image_token_id(model)
    current: dict[str, Any] = {}

    head = output_projection_name(model)
    warned: set[str] = set()

    def stream(name: str, x):
        m = hessian_positions(name, x, current.get("masks") or {}, lm, head) if positions == "text" else None
        if m is False:
            if name not in warned:
                log.warning("gptq: %s's input %s matches no text mask; its Hessian uses every position",
                            name, tuple(x.shape))
                warned.add(name)
            return None
        return m

    units: dict[str, list[str]] = {}
    for name in targets:
        units.setdefault(unit_of(name, family), []).append(name)
    done: dict[str, QuantizedLinear] = {}
    for unit, names in units.items():
        mods = {n: model.get_submodule(n) for n in names}
        work = {n: GPTQ(m, m.weight.data, device=m.weight.device) for n, m in mods.items()}
        seen: set[str] = set()

        def hook(name, work=work, seen=seen, count=len(names)):
            def fn(_mod, inp, out):
                x = inp[0].data
                m = stream(name, x)
                if m is not None:
                    x = x[m.to(x.device)].unsqueeze(0)  # (1, text positions, in)
                elif x.dim() == 2:
                    x = x.unsqueeze(0)
                if x.numel():
                    work[name].add_batch(x, out.data)
                seen.add(name)
                if len(seen) == count:  # every linear of the unit has its input: the rest of the forward is not needed
                    raise _Stop

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
        try:
            for b in batches:
                seen.clear()
                current["masks"] = text_positions(b, image_token, family.decoder_only)
                run_batches(model, [b])
        finally:
            for h in handles:
                h.remove()
        for n, m in mods.items():
            s = targets[n]
            g = work[n]
            g.quantizer.configure({
                "bits": s.bits, "sym": s.symmetric, "perchannel": True, "mse": s.clip, "dtype": "int",
                "group_size": s.group_size or -1, "use_double_quant": False, "double_quant_dtype": "int",
                "double_quant_bits": 8, "double_quant_sym": True, "double_quant_group_size": 256,
            })
            if g.nsamples == 0:
                log.warning("gptq: %s saw no calibration input; rounded to nearest", n)
                done[n] = rtn_linear(m, s)
                continue
            static = _static_group_params(g, m.weight.data, s.group_size) if act_order and s.group_size else None
            scale, _, zero, q = g.fasterquant(
                m.weight.data.clone(), blocksize=128, percdamp=damp, groupsize=s.group_size or -1,
                act_order=act_order, static_groups=act_order,
            )
            g.free()
            if static is not None:  # the library returns the last group's parameters only
                scale, zero = static
                _check_on_grid(n, q, scale, zero, s)
            scale = scale.float().reshape(q.shape[0], -1)
            zero = zero.float().reshape(q.shape[0], -1) + s.qmin  # unsigned → signed grid
            with torch.no_grad():
                m.weight.data.copy_(q.to(m.weight.dtype))
            done[n] = QuantizedLinear(s, scale, None if s.symmetric else zero)
        log.debug("gptq: %s (%d linears) quantized", unit, len(names))
    return done


def _static_group_params(g, weight, group_size: int):
    """Per-group ``(scale, zero)`` ``(out, in / group_size)`` that the library's ``fasterquant`` uses
    with ``static_groups`` (``act_order``): each group's quantizer fitted on the original weight,
    after the columns no calibration input reached are zeroed, as it does (it returns only the
    last group's). Call before ``fasterquant``, which frees the Hessian."""
    import copy

    import torch

    w = weight.detach().float().clone()
    w[:, torch.diag(g.H) == 0] = 0
    scales, zeros = [], []
    for i in range(0, w.shape[1], group_size):
        qz = copy.deepcopy(g.quantizer)
        qz.find_params(w[:, i : i + group_size], weight=True)
        scales.append(qz.scale.reshape(-1, 1))
        zeros.append(qz.zero.reshape(-1, 1))
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def _check_on_grid(name: str, q, scale, zero, s: Scheme) -> None:
    """``q`` (dequantized ``(out, in)``) must sit on the grid of ``scale``/``zero`` (unsigned zero
    points, the library's) group by group, or the stored integers would not give it back.

    Raises:
        VerificationError: naming the module and the largest distance from the grid (in steps).
    """

    from compressor.errors import VerificationError

    g = s.group_size
    sc = scale.float().repeat_interleave(g, 1)
    zp = zero.float().repeat_interleave(g, 1)
    steps = q.float() / sc + zp
    off = float((steps - steps.round()).abs().max())
    top = 2 ** s.bits - 1
    # the library returns the weight in the model's dtype: a 16-bit weight is rounded by up to eps × its
    # integer (in steps); beyond that, and beyond a tenth of a step, the scale is wrong
    import torch

    tol = max(0.1, 2 ** (s.bits - 1) * float(torch.finfo(q.dtype).eps)) if q.dtype.is_floating_point else 0.1
    if off > tol or float(steps.round().min()) < 0 or float(steps.round().max()) > top:
        raise VerificationError(f"gptq: {name}'s quantized weight is off its group grid by {off:.3g} steps "
                                "(act_order's static groups); quantize without act_order")


def quantize_modules(model, targets: dict[str, Scheme], method: str, family, batches: Sequence[dict] = (),
                     damp: float = 0.01, act_order: bool = False, positions: str = "text") -> dict[str, QuantizedLinear]:
    """Quantize ``targets`` in place by ``method`` (``rtn`` or ``gptq``); returns every module's scales."""
    if method == "gptq":
        return gptq_quantize(model, targets, family, batches, damp=damp, act_order=act_order, positions=positions)
    return {n: rtn_linear(model.get_submodule(n), s) for n, s in targets.items()}


# --------------------------------------------------------------------------------------------
# Sensitivity and mixed precision
# --------------------------------------------------------------------------------------------


def next_token_logprobs(model, batches: Sequence[dict], decoder_only: bool) -> list:
    """Log-probabilities of the next token at every caption position: one ``(positions, vocab)`` per batch.

    Decoder-only models predict the token at ``t`` from position ``t - 1``; encoder-decoders
    predict decoder position ``t`` from ``t``. Positions whose label is -100 (image, prompt,
    padding) are dropped.
    """
    import torch

    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
            labels = b["labels"]
            if decoder_only:
                logits, labels = logits[:, :-1], labels[:, 1:]
            keep = labels != -100
            out.append(torch.log_softmax(logits[keep], dim=-1))
    return out


def kl_from(ref: list, model, batches: Sequence[dict], decoder_only: bool) -> float:
    """Mean KL(reference ‖ model) per caption token (nats)."""
    import torch

    got = next_token_logprobs(model, batches, decoder_only)
    total, n = 0.0, 0
    for p, q in zip(ref, got):
        total += float(torch.sum(p.exp() * (p - q)))
        n += p.shape[0]
    return total / max(n, 1)


def sensitivity(model, targets: dict[str, Scheme], family, batches: Sequence[dict], granularity: str = "layer") -> dict[str, float]:
    """KL of each unit quantized alone (RTN at its scheme), the rest unquantized.

    Args:
        model: the unquantized model (restored after each unit).
        targets: module name → the scheme it would get.
        family: its family.
        batches: labelled calibration batches.
        granularity: ``layer`` (a stack layer's linears together) or ``module`` (each linear).

    Returns:
        unit → mean KL per caption token (nats), in module order.
    """
    import torch

    ref = next_token_logprobs(model, batches, family.decoder_only)
    units: dict[str, list[str]] = {}
    for name in targets:
        units.setdefault(unit_of(name, family) if granularity == "layer" else name, []).append(name)
    out: dict[str, float] = {}
    for unit, names in units.items():
        saved = {n: model.get_submodule(n).weight.data.clone() for n in names}
        for n in names:
            rtn_linear(model.get_submodule(n), targets[n])
        out[unit] = kl_from(ref, model, batches, family.decoder_only)
        with torch.no_grad():
            for n, w in saved.items():
                model.get_submodule(n).weight.data.copy_(w)
    return out


def units_of(targets: Sequence[str], family, granularity: str) -> dict[str, list[str]]:
    """unit → its module names (``layer``: stack layers; ``module``: each linear)."""
    units: dict[str, list[str]] = {}
    for name in targets:
        units.setdefault(unit_of(name, family) if granularity == "layer" else name, []).append(name)
    return units


def choose_high_precision(model, low: dict[str, Scheme], high: Scheme, scores: dict[str, float], family,
                          batches: Sequence[dict], granularity: str, max_kl: float | None = None,
                          fraction: float | None = None) -> tuple[list[str], list[dict]]:
    """The most sensitive units kept at ``high``: a fixed ``fraction``, or the fewest that make the
    whole model (RTN) meet ``max_kl``, found by bisection over the count (KL falls as more units stay
    high: checked at every probe and recorded).

    Returns:
        ``(units kept high, trials)``; each trial ``{"kept": k, "kl": whole-model KL}``.
    """
    import torch

    ranked = sorted(scores, key=lambda u: -scores[u])
    units = units_of(low, family, granularity)
    if fraction is not None:
        return ranked[: round(fraction * len(ranked))], []
    ref = next_token_logprobs(model, batches, family.decoder_only)
    saved = {n: model.get_submodule(n).weight.data.clone() for n in low}
    trials: list[dict] = []

    def kl_with(k: int) -> float:
        keep = set(ranked[:k])
        for u, names in units.items():
            for n in names:
                model.get_submodule(n).weight.data.copy_(saved[n])
                rtn_linear(model.get_submodule(n), high if u in keep else low[n])
        kl = kl_from(ref, model, batches, family.decoder_only)
        trials.append({"kept": k, "kl": kl})
        return kl

    try:
        lo, hi = 0, len(ranked)
        if kl_with(0) <= max_kl:
            return [], trials
        if kl_with(hi) > max_kl:
            log.warning("quantize: even with every unit at %d bits the KL is %.4g > max_kl %.4g", high.bits, trials[-1]["kl"], max_kl)
            return ranked, trials
        while hi - lo > 1:  # kl(lo) > max_kl >= kl(hi)
            mid = (lo + hi) // 2
            if kl_with(mid) <= max_kl:
                hi = mid
            else:
                lo = mid
        return ranked[:hi], trials
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                model.get_submodule(n).weight.data.copy_(w)


def plot_sensitivity(scores: dict[str, float], high: Sequence[str], out_png: Path) -> bool:
    """Bar chart of per-unit KL (log scale), units kept at high precision in red. Never raises."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt


        names = list(scores)
        fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(names)), 3), dpi=100)
        ax.bar(range(len(names)), [max(scores[n], 1e-12) for n in names],
               color=["tab:red" if n in set(high) else "tab:blue" for n in names])
        ax.set_yscale("log")
        ax.set_ylabel("KL (nats / token)")
        ax.set_title("quantize sensitivity: each unit quantized alone" + ("; red = kept at high precision" if high else ""), fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("language_model", "lm") for n in names], rotation=90, fontsize=5)
        fig.tight_layout()
        from eval.plots import save_png

        try:
            save_png(fig, Path(out_png))
        finally:
            plt.close(fig)
        return True
    except Exception as exc:  # a plot must not fail the stage
        log.warning("sensitivity plot not written: %s", exc)
        return False


# --------------------------------------------------------------------------------------------
# Storage: compressed-tensors pack-quantized
# --------------------------------------------------------------------------------------------


def _qargs(scheme: Scheme):
    from compressed_tensors.quantization import QuantizationArgs

    if scheme.group_size:
        return QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy="group",
                                group_size=scheme.group_size)
    return QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy="channel")


def save_quantized(model, processor, out: Path, done: dict[str, QuantizedLinear], extra_files: dict[str, str] | None = None) -> Path:
    """Save ``model`` (quantized weights in place) as a compressed-tensors ``pack-quantized`` folder.

    One config group per scheme, targeting its modules by anchored name; every other tensor is
    saved as it is. The library compresses the quantized linears in memory to write them; they
    are swapped back for copies taken before (plain ``nn.Linear``, the dequantized weights), so
    the model is unchanged afterwards (at the cost of one extra copy of the quantized linears).

    Raises:
        UserInputError: compressed-tensors is not installed (exit 2).
    """
    import torch

    require_storage()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    by_scheme: dict[Scheme, list[str]] = {}
    for name, q in done.items():
        by_scheme.setdefault(q.scheme, []).append(name)
    groups = {
        f"group_{i}": QuantizationScheme(targets=["re:^" + re.escape(n) + "$" for n in names], weights=_qargs(s))
        for i, (s, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: (kv[0].bits, kv[0].group_size or 0)))
    }
    import copy

    originals = {n: copy.deepcopy(model.get_submodule(n)) for n in done}
    had_config = hasattr(model.config, "quantization_config")
    qc = QuantizationConfig(config_groups=groups, quantization_status=QuantizationStatus.FROZEN, ignore=[])
    apply_quantization_config(model, qc)
    with torch.no_grad():
        for name, q in done.items():
            mod = model.get_submodule(name)
            mod.weight_scale.data.copy_(q.scale.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype))
            if q.zero is not None and hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(q.zero.reshape(mod.weight_zero_point.shape).to(mod.weight_zero_point.dtype))
    comp = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    try:
        comp.compress_model(model)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(out)
        for name, text in (extra_files or {}).items():
            (out / name).write_text(text)
        comp.update_config(str(out))
    finally:
        comp.remove_decompression_hook(model)
        for n, mod in originals.items():
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod)
        if not had_config and hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
    return Path(out)


def quantization_config_of(folder: Path) -> dict | None:
    """The ``quantization_config`` of a folder's config.json (None when it has none)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) and q else None


def is_quantized_folder(folder: Path) -> bool:
    """Whether a model folder is compressed-tensors quantized (what :func:`save_quantized` writes)."""
    q = quantization_config_of(folder)
    return q is not None and q.get("quant_method") == QUANT_METHOD


def schemes_of_config(q: dict) -> list[tuple[Scheme, list[str]]]:
    """``(scheme, target patterns)`` per config group of a compressed-tensors ``quantization_config``."""
    out = []
    for g in (q.get("config_groups") or {}).values():
        w = g.get("weights") or {}
        out.append((Scheme(int(w.get("num_bits", 0)), w.get("group_size"), bool(w.get("symmetric", True))), list(g.get("targets") or [])))
    return out


def check_quantized_folder(folder: Path) -> dict[str, Scheme]:
    """Refuse a quantized folder whose tensors do not match its ``quantization_config`` (before loading).

    For every targeted module: ``weight_packed`` (int32), ``weight_shape`` and ``weight_scale``
    present; the scale's shape ``(out, in / group_size)`` (``(out, 1)`` per channel); every scale
    finite and positive; asymmetric schemes a zero point of the scale's group count.

    Returns:
        module name → its scheme.

    Raises:
        CorruptInputError: naming the file, the tensor and what is wrong (exit 2).
    """
    from safetensors import safe_open

    folder = Path(folder)
    q = quantization_config_of(folder) or {}
    groups = schemes_of_config(q)
    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                where[k] = f
    modules = sorted({k.rsplit(".", 1)[0] for k in where if k.endswith(".weight_packed")})
    found: dict[str, Scheme] = {}
    for mod in modules:
        scheme = next((s for s, pats in groups if any(_matches(mod, p) for p in pats)), None)
        if scheme is None:
            raise CorruptInputError(f"{folder}: {mod} holds packed weights but no config group of its quantization_config targets it")
        found[mod] = scheme
    for _, pats in groups:
        for p in pats:
            if p.startswith("re:") and not any(_matches(m, p) for m in modules):
                raise CorruptInputError(
                    f"{folder}: the quantization_config targets {p[3:]} but no packed weight of it is saved (missing tensors)"
                )
    for mod, s in found.items():
        def get(key, mod=mod):
            name = f"{mod}.{key}"
            if name not in where:
                raise CorruptInputError(f"{folder}: {name} is missing; the quantized folder is incomplete")
            with safe_open(str(where[name]), framework="pt") as fh:
                return fh.get_tensor(name)

        shape = [int(v) for v in get("weight_shape").tolist()]
        scale = get("weight_scale")
        groups_n = math.ceil(shape[1] / s.group_size) if s.group_size else 1
        if list(scale.shape) != [shape[0], groups_n]:
            raise CorruptInputError(
                f"{where[mod + '.weight_scale']}: {mod}.weight_scale has shape {list(scale.shape)}, expected "
                f"[{shape[0]}, {groups_n}] for a {shape[0]}×{shape[1]} weight in {s.describe()}; the scale does not "
                "match the weight (mismatched or corrupted file): re-run the quantize stage"
            )
        sf = scale.float()
        if not bool((sf.isfinite() & (sf > 0)).all()):
            raise CorruptInputError(
                f"{where[mod + '.weight_scale']}: {mod}.weight_scale has non-finite or non-positive values; the "
                "file is corrupted: re-run the quantize stage"
            )
        packed = get("weight_packed")
        want_cols = math.ceil(shape[1] * s.bits / 32)
        if packed.shape[0] != shape[0] or packed.shape[1] not in (want_cols, math.ceil(shape[1] / 32) * s.bits):
            raise CorruptInputError(
                f"{where[mod + '.weight_packed']}: {mod}.weight_packed has shape {list(packed.shape)}, which does not "
                f"hold a {shape[0]}×{shape[1]} int{s.bits} weight"
            )
        if not s.symmetric:
            zp = get("weight_zero_point")
            if zp.shape[-1] == 0 or zp.numel() == 0:
                raise CorruptInputError(f"{folder}: {mod}.weight_zero_point is empty")
    return found


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def load_quantized(path: Path, family, dtype=None):
    """Load a compressed-tensors folder with plain ``transformers`` (the library decompresses it),
    then make every quantized linear a plain ``nn.Linear`` holding its dequantized weight.

    The scales and schemes are kept on the model as ``vlmc_quantized`` (module name →
    :class:`QuantizedLinear`) so that :func:`save_quantized` writes the same integers again; the
    model's ``config.quantization_config`` is removed (the in-memory model is dense).

    Raises:
        CorruptInputError: scales that do not match their weights (:func:`check_quantized_folder`).
        UserInputError: compressed-tensors is not installed.
    """
    import torch

    schemes = check_quantized_folder(path)
    require_storage()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = family.model_cls().from_pretrained(str(path), **kwargs)
    # Decompressed by the library now (it would on the first forward, by a hook). transformers
    # 5.24's `run_compressed=False` converter applies one config group's scheme to every module and
    # fails on mixed precision, hence this route.
    model.hf_quantizer.compressor.decompress_model(model)
    # Loading also dispatched every module through compressed-tensors' offload cache (a wrapped
    # forward that moves inputs, parameters held in an OffloadCache). The model is dense from here
    # on, and torch.export (the ONNX export) cannot trace through that wrapper: take it off.
    from compressed_tensors.offload import remove_dispatch

    remove_dispatch(model, onload_tensors=True)
    kept: dict[str, QuantizedLinear] = {}
    for name, s in schemes.items():
        mod = model.get_submodule(name)
        scale = mod.weight_scale.detach().float().clone()
        zp = getattr(mod, "weight_zero_point", None)
        zero = zp.detach().float().clone() if (zp is not None and not s.symmetric) else None
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              dtype=mod.weight.dtype, device=mod.weight.device)
        with torch.no_grad():
            lin.weight.copy_(mod.weight)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
        kept[name] = QuantizedLinear(s, scale, zero)
    model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    model.vlmc_quantized = kept
    return model


# --------------------------------------------------------------------------------------------
# Bytes (compress plan)
# --------------------------------------------------------------------------------------------


def quantized_bytes(out_features: int, in_features: int, scheme: Scheme, scale_bytes: int) -> float:
    """Bytes on disk of one quantized linear's weight: packed integers + scales (+ zero points).

    ``bits × parameters / 8`` (packed in int32 words of 32 elements per row), plus one scale per
    group in the weight's dtype (``scale_bytes``), plus, asymmetric, one packed zero point per
    group; the stored ``weight_shape`` (2 int64) included. The bias is not counted here (it stays
    in the weight dtype).
    """
    words = math.ceil(in_features / 32) * scheme.bits
    groups = math.ceil(in_features / scheme.group_size) if scheme.group_size else 1
    b = out_features * words * 4 + out_features * groups * scale_bytes + 16
    if not scheme.symmetric:
        b += math.ceil(out_features * scheme.bits / 32) * 4 * groups
    return float(b)


def part_bytes(model, parts: dict[str, Sequence[str]], dtype_bytes: int, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Bytes of every parameter (tied ones once) in total and per part; a parameter named in
    ``overrides`` (module name → bytes of its ``weight``) counts those bytes instead."""
    overrides = overrides or {}
    out = {"total": 0.0, **{p: 0.0 for p in parts}}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        mod, _, leaf = name.rpartition(".")
        b = overrides[mod] if (leaf == "weight" and mod in overrides) else p.numel() * dtype_bytes
        out["total"] += b
        for part, prefixes in parts.items():
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
                out[part] += b
                break
    return out


def dtype_bytes(dtype: str | None) -> int:
    """Bytes per element of a dtype name (float32 when None)."""
    return {"float16": 2, "bfloat16": 2, "float32": 4}.get(dtype or "float32", 4)
