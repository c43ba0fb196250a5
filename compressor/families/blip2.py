"""BLIP-2: ``Blip2ForConditionalGeneration`` with an OPT, Llama-architecture or T5 language model.

Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
Large Language Models"; transformers 5.x attribute paths (shared/notes/stack-facts.md §2):

* parts: ``vision`` (``vision_model``), ``qformer`` (``qformer`` + ``query_tokens``),
  ``projection`` (``language_projection``), ``language_model`` (T5: ``language_model.encoder`` /
  ``language_model.decoder`` stacks too);
* stacks: the vision encoder's layers, the Q-Former's layers (cross-attention where
  ``index % cross_attention_frequency == 0``: :class:`CrossAttentionPattern`), and the language
  model's (:mod:`compressor.families.language_models`);
* batches: the language model reads ``[<image>×N, bos, prompt, target, eos]`` (causal) or the
  encoder reads ``[<image>×N, prompt, </s>]`` and the decoder learns the target (T5); the model
  ``masked_scatter``s the projected query outputs into the ``<image>`` positions;
* token reduction (:mod:`compressor.tokens`): the learned ``query_tokens`` (``reduce_queries``
  slices them; ``num_query_tokens`` lives in the config and in the processor), CATP's votes from
  the Q-Former's cross-attention ``query`` / ``key`` projections (:func:`query_scores`; at
  inference, :func:`apply_token_options` makes the Q-Former return only the k best query outputs
  per image, so the prompt carries k ``<image>`` tokens), and ToMe in the ViT (BLIP's encoder:
  :func:`compressor.families.blip.vit_token_merging`).

:mod:`compressor.families.instructblip` reuses everything here and adds the instruction that its
Q-Former reads.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

from compressor.errors import ModelSpecError, UserInputError
from compressor.families.base import Family, Stack
from compressor.families.language_models import SUPPORTED_LANGUAGE_MODELS, language_model_kind

MODEL_CLASS = "Blip2ForConditionalGeneration"
MODEL_TYPES = ("blip-2",)

#: Recipe keys of ``remove_layers`` this family reads, with their reference text.
REMOVAL_KEYS = {
    "qformer": "Q-Former layers; must keep the cross-attention pattern.",
    "language_model": "Language-model layers; T5: {encoder: …, decoder: …}.",
    "vision": "Vision-encoder layers.",
}

#: Removal keys that also take ``{encoder: …, decoder: …}`` (T5 language models).
ENCODER_DECODER_KEYS = ("language_model",)

VISION_LORA = {
    "vision.attention": r"vision_model\.encoder\.layers\.\d+\.self_attn\.(qkv|projection)",
    "vision.mlp": r"vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)",
}
QFORMER_LORA = {
    "qformer.self_attention": r"qformer\.encoder\.layer\.\d+\.attention\.attention\.(query|key|value)",
    "qformer.cross_attention": r"qformer\.encoder\.layer\.\d+\.crossattention\.attention\.(query|key|value)",
    "qformer.mlp": r"qformer\.encoder\.layer\.\d+\.(intermediate_query|output_query|intermediate|output)\.dense",
    "projection": r"language_projection",
}
#: Every LoRA name a model of this family can accept (the language model decides which apply).
LORA_NAMES = (
    *VISION_LORA,
    *QFORMER_LORA,
    "language_model.attention",
    "language_model.mlp",
    "language_model.encoder.attention",
    "language_model.encoder.mlp",
    "language_model.decoder.attention",
    "language_model.decoder.cross_attention",
    "language_model.decoder.mlp",
)
PARTS = {
    "vision": ("vision_model",),
    "qformer": ("qformer", "query_tokens"),
    "projection": ("language_projection",),
    "language_model": ("language_model",),
}
#: Display labels of parts (reports, plots) where the name itself does not read well.
PART_LABELS = {"qformer": "Q-Former"}
#: Names ``finetune.parts`` / ``heal: {trainable: parts}`` may use.
TRAINABLE_NAMES = (*PARTS, "language_model.encoder", "language_model.decoder", "query_tokens")
#: The model-assembly module of this family (``model: {assemble: {…}}``, the default family).
ASSEMBLY = "compressor.models.assemble"


class CrossAttentionPattern:
    """The Q-Former's rule: layer ``i`` has cross-attention iff ``i % frequency == 0``.

    ``Blip2QFormerLayer.__init__`` creates ``crossattention`` from the layer's index and the config's
    ``cross_attention_frequency``; a kept set of layers must keep that pattern under its new
    numbering, or the saved model reloads with random cross-attention weights (stack-facts §3).
    """

    #: Why importance choices counted as the top layers are approximate (``compress plan``'s note).
    uneven_layers = "Q-Former layers with and without cross-attention"

    def __init__(self, frequency: int):
        self.frequency = int(frequency)

    def ok(self, keep: list[int]) -> bool:
        """Whether keeping these layers preserves ``has_cross_attention == (new_idx % freq == 0)``."""
        f = self.frequency
        return all((old % f == 0) == (new % f == 0) for new, old in enumerate(keep))

    def nearest(self, n: int, removed: list[int], limit: int = 3) -> list[list[int]]:
        """Valid removal sets of the same size closest to ``removed`` (fewest differing indices)."""
        want = set(removed)
        out = []
        for cand in itertools.combinations(range(n), len(removed)):
            keep = [i for i in range(n) if i not in cand]
            if keep and self.ok(keep):
                out.append((len(want.symmetric_difference(cand)), list(cand)))
        out.sort()
        return [c for _, c in out[:limit]]

    def check(self, n: int, removed: list[int]) -> None:
        """Refuse a removal that breaks the cross-attention pattern (exit 2).

        Raises:
            UserInputError: naming the nearest valid choices (e.g. ``drop_top``).
        """
        keep = [i for i in range(n) if i not in removed]
        if self.ok(keep):
            return
        hints = self.nearest(n, removed)
        hint = ", ".join(f"layers: {h}" for h in hints) if hints else "a drop_top removal"
        pattern = "".join("X" if i % self.frequency == 0 else "-" for i in keep)
        raise UserInputError(
            f"qformer: removing layers {removed} leaves cross-attention at kept positions {pattern!r} (X = has "
            f"cross-attention), but a Q-Former config can only express cross-attention every {self.frequency} layers "
            f"starting at 0; the saved model would reload with random cross-attention weights. Nearest valid choice: "
            f"{hint} (removing the top k layers always works)."
        )

    def describe(self, layers) -> dict[str, Any]:
        """For ``compress inspect``: which layers cross-attend, and the frequency."""
        return {
            "cross_attention": [i for i, layer in enumerate(layers) if getattr(layer, "has_cross_attention", False)],
            "cross_attention_frequency": self.frequency,
        }


def describe(
    config,
    name: str = "blip2",
    model_class: str = "Blip2ForConditionalGeneration",
    config_class: str = "Blip2Config",
    impl=None,
    extra: dict | None = None,
) -> Family:
    """The :class:`Family` of a BLIP-2 config (InstructBLIP's too, through the other arguments).

    Raises:
        ModelSpecError: a language model this toolchain does not know (exit 2).
    """
    import sys

    from compressor.families.blip import vision_output_tokens, vision_tokens
    from compressor.tokens import token_record

    options = token_record(config)
    text_type = config.text_config.model_type
    try:
        lm = language_model_kind(text_type)
    except KeyError:
        raise ModelSpecError(
            f"{config.model_type} with a '{text_type}' language model is not supported; supported language models: "
            f"{', '.join(SUPPORTED_LANGUAGE_MODELS)}"
        ) from None
    stacks = {
        "vision": Stack("vision", "vision_model.encoder.layers", ("vision_config.num_hidden_layers",)),
        "qformer": Stack(
            "qformer",
            "qformer.encoder.layer",
            ("qformer_config.num_hidden_layers",),
            rule=CrossAttentionPattern(config.qformer_config.cross_attention_frequency),
            positions="queries",
        ),
    }
    for st in lm.stacks:
        stacks[st.part] = st
    trainable = dict(PARTS)
    trainable["query_tokens"] = ("query_tokens",)
    for part, st in stacks.items():
        if part.startswith("language_model."):
            trainable[part] = (st.layers.rsplit(".", 1)[0],)
    return Family(
        name=name,
        model_type=config.model_type,
        model_class=model_class,
        config_class=config_class,
        parts=dict(PARTS),
        stacks=stacks,
        lora={**VISION_LORA, **QFORMER_LORA, **lm.lora},
        trainable=trainable,
        lm=lm,
        decoder_only=lm.decoder_only,
        impl=impl or sys.modules[__name__],
        width=lm.width,
        num_queries=int(config.num_query_tokens),
        image_tokens=int((options.get("query_tokens") or {}).get("keep", config.num_query_tokens)),
        vision_tokens=vision_tokens(config.vision_config),
        vision_output_tokens=vision_output_tokens(config, options),
        token_options=options,
        config_mirrors={"language_model": "text_config"},
        plan_checks=lm.plan_checks,
        onnx_topology="decoder_only" if lm.decoder_only else "encoder_decoder",
        extra=dict(extra or {}),
    )


# --------------------------------------------------------------------------------------------
# Older configs: the fields the processor and the model must agree on
# --------------------------------------------------------------------------------------------


def _read_json(path) -> dict:
    import json

    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _query_tokens_in_weights(folder) -> int | None:
    """``num_query_tokens`` from the saved ``query_tokens (1, n, hidden)`` (safetensors headers only)."""
    import json
    import struct

    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        owner = _read_json(index).get("weight_map", {}).get("query_tokens")
        files = [folder / owner] if owner else []
    for f in files:
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        except (OSError, ValueError, struct.error):
            continue
        if "query_tokens" in header:
            return int(header["query_tokens"]["shape"][1])
    return None


def reconcile(family: Family, config, folder, processor=None) -> list[str]:
    """Fill what an older-style BLIP-2 / InstructBLIP folder leaves out, as transformers does, or refuse.

    Configs written before transformers moved the image tokens into the processor
    (transformers#34223, #42203) lack ``num_query_tokens`` in ``processor_config.json`` (the
    processor then inserts no ``<image>`` token: the language model never sees the image and
    captions are empty), ``image_token_index`` in ``config.json`` (the model cannot find the image
    positions) or ``num_query_tokens`` in ``config.json`` (the default 32 does not fit the saved
    queries). A missing field is filled from the other file (or the saved ``query_tokens``'s shape),
    with a warning; two files that disagree are refused.

    Args:
        family: the family of ``config``.
        config: the loaded config (changed in place).
        folder: the model folder (its raw ``config.json`` / ``processor_config.json`` are read).
        processor: the loaded processor (changed in place), or None.

    Returns:
        One line per field filled in (also logged as warnings).

    Raises:
        ModelSpecError: a field that cannot be recovered, or the two files disagree (exit 2),
            naming the field and the fix.
    """
    import logging
    from pathlib import Path

    log = logging.getLogger(__name__)
    folder = Path(folder)
    raw = _read_json(folder / "config.json")
    raw_proc = _read_json(folder / "processor_config.json")
    fixed: list[str] = []
    if not raw:
        return fixed
    nq_cfg = raw.get("num_query_tokens")
    nq_proc = raw_proc.get("num_query_tokens")
    if processor is not None and getattr(processor, "num_query_tokens", None) is not None:
        nq_proc = processor.num_query_tokens
    if nq_cfg is None:
        weights = _query_tokens_in_weights(folder)
        nq = nq_proc if nq_proc is not None else weights
        if nq is None:
            raise ModelSpecError(
                f"{folder / 'config.json'} has no num_query_tokens (an older-style config) and neither the processor "
                f"nor the weights say how many; add \"num_query_tokens\": N (the Q-Former's learned queries) to it"
            )
        if weights is not None and weights != nq:
            raise ModelSpecError(
                f"{folder / 'processor_config.json'} says num_query_tokens {nq} but the saved query_tokens hold {weights}; "
                f"set \"num_query_tokens\": {weights} in both {folder / 'config.json'} and processor_config.json"
            )
        config.num_query_tokens = int(nq)
        fixed.append(f"config.json has no num_query_tokens: using {nq} from the "
                     f"{'processor' if nq_proc is not None else 'saved query_tokens'}")
    if processor is not None:
        if getattr(processor, "num_query_tokens", None) is None:
            processor.num_query_tokens = int(config.num_query_tokens)
            fixed.append(f"processor_config.json has no num_query_tokens: using the model config's "
                         f"{config.num_query_tokens} (without it the processor inserts no image token)")
        elif int(processor.num_query_tokens) != int(config.num_query_tokens):
            raise ModelSpecError(
                f"{folder}: processor_config.json says num_query_tokens {processor.num_query_tokens} but config.json "
                f"says {config.num_query_tokens}; make them equal (the model reads {config.num_query_tokens} image tokens)"
            )
    if getattr(config, "image_token_index", None) is None and getattr(config, "image_token_id", None) is None:
        token_id = None
        tok = getattr(processor, "tokenizer", None)
        if tok is None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
        image_token = str(getattr(processor, "image_token", None) or "<image>")
        if tok is not None and image_token in tok.get_vocab():
            token_id = int(tok.convert_tokens_to_ids(image_token))
        if token_id is None:
            raise ModelSpecError(
                f"{folder / 'config.json'} has no image_token_index (an older-style config) and the tokenizer has no "
                f"'{image_token}' token; add \"image_token_index\": <the id of {image_token}> to config.json"
            )
        config.image_token_index = token_id
        fixed.append(f"config.json has no image_token_index: using {token_id}, the tokenizer's '{image_token}'")
    for line in fixed:
        log.warning("%s: %s (an older-style config, transformers#34223)", folder, line)
    return fixed


def check_inputs(family: Family, config, inputs: dict) -> None:
    """Refuse a batch in which the processor did not put the model's image tokens in every row.

    That is ``num_query_tokens``, or the k of a per-image query selection (``family.image_tokens``).

    A row without them captions without the image (empty or generic captions, with no error).

    Args:
        config: the model's config.
        inputs: the processor's output (torch tensors or numpy arrays), ``input_ids (batch, seq)``.

    Raises:
        ModelSpecError: naming the counts and the fix.
    """
    ids = inputs.get("input_ids")
    image = getattr(config, "image_token_id", None)
    if image is None:
        image = getattr(config, "image_token_index", None)
    if ids is None or image is None:
        return
    counts = [int(c) for c in (ids == int(image)).sum(1).tolist()]
    want = int(family.image_tokens or config.num_query_tokens)  # a per-image query selection's k
    if any(c != want for c in counts):
        raise ModelSpecError(
            f"the processor put {sorted(set(counts))} image token(s) per row but the model reads {want}: captions would "
            f"ignore the image. Set \"num_query_tokens\": {want} in the model folder's processor_config.json"
        )


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def generation_inputs(family: Family, processor, images: Sequence, prompts: Sequence[str], device: str = "cpu") -> dict:
    """Inputs for ``model.generate`` for a batch (left padding for causal LMs).

    Returns:
        ``pixel_values (batch, 3, H, W)``, ``input_ids (batch, seq)`` (``num_query_tokens``
        ``<image>`` tokens first), ``attention_mask`` and, for InstructBLIP,
        ``qformer_input_ids`` / ``qformer_attention_mask``.
    """
    tok = processor.tokenizer
    tok.padding_side = "left" if family.decoder_only else "right"
    with image_tokens_of(family, processor):
        enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
    tok.padding_side = "right"
    return {k: v.to(device) for k, v in enc.items()}


@contextlib.contextmanager
def image_tokens_of(family: Family, processor):
    """The processor prepends ``family.image_tokens`` ``<image>`` tokens while inside.

    A model folder with a per-image query selection keeps the processor of all ``N`` queries
    (so plain transformers runs it unchanged); the toolchain's batches carry the ``k`` image
    tokens its language model reads. Other models: the processor's own count, unchanged.
    """
    old = getattr(processor, "num_query_tokens", None)
    if old is None or not family.image_tokens or old == family.image_tokens:
        yield processor
        return
    processor.num_query_tokens = family.image_tokens
    try:
        yield processor
    finally:
        processor.num_query_tokens = old


def decode(family: Family, processor, sequences, inputs: dict, prompts: Sequence[str]) -> list[str]:
    """Generated ids → captions: a causal LM's output repeats the prompt, which is cut off."""
    if family.decoder_only:
        sequences = sequences[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def caption_batch(family: Family, processor, images: Sequence, prompts: Sequence[str], run) -> list[str]:
    """The batch runs as is (left padding keeps every row's prompt aligned)."""
    return run(list(images), list(prompts))


def training_batch(family: Family, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
    """A training batch with labels for the model's own loss.

    * causal LM: ``input_ids = [<image>×N, bos, prompt, target, eos]``; labels copy ``input_ids``
      with image tokens, padding, BOS and prompt tokens set to -100 (the model slices
      ``logits[:, -labels.size(1):]`` and shifts);
    * T5: the encoder reads ``[<image>×N, prompt, </s>]``; labels are the target tokens
      ``[target, </s>]`` with padding -100 (the decoder input is shifted from them).

    Returns:
        Tensors for ``model(**batch)``, ``labels (batch, seq)`` with -100 where no loss is taken.
    """
    with image_tokens_of(family, processor):
        return _training_batch(family, processor, images, targets, prompts)


def _training_batch(family: Family, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
    import torch

    tok = processor.tokenizer
    tok.padding_side = "right"
    eos = tok.eos_token or tok.sep_token
    if not family.decoder_only:
        enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
        lab = tok(list(targets), padding=True, return_tensors="pt")
        labels = lab["input_ids"].clone()
        labels[lab["attention_mask"] == 0] = -100
        enc["labels"] = labels
        enc["decoder_attention_mask"] = lab["attention_mask"]
        return dict(enc)
    full = [((p + " " + t) if p else (" " + t if not t.startswith(" ") else t)) + eos for p, t in zip(prompts, targets)]
    enc = processor(images=list(images), text=full, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    labels = ids.clone()
    labels[enc["attention_mask"] == 0] = -100
    image_id = getattr(processor, "image_token_id", None) or tok.convert_tokens_to_ids("<image>")
    labels[ids == image_id] = -100
    num_query = int(getattr(processor, "num_query_tokens", 0) or 0)
    for i, p in enumerate(prompts):
        n_prefix = len(tok(p).input_ids) if p else len(tok("").input_ids)  # bos (+ prompt)
        labels[i, : num_query + n_prefix] = -100
    enc["labels"] = labels
    return {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in enc.items()}


# --------------------------------------------------------------------------------------------
# Planning: prompt lengths and the GFLOPs replay of generate (compress plan)
# --------------------------------------------------------------------------------------------


def prompt_lengths(family: Family, config, processor, prompt: str) -> tuple[int, int, bool]:
    """Language-model input length (``num_query_tokens`` image tokens + special tokens + prompt) and
    the Q-Former's instruction length (InstructBLIP; 0 otherwise), for one image.

    Returns:
        ``(lm_tokens, qformer_tokens, exact)``: exact is False when estimated without a
        tokenizer (one special token plus one token per word).
    """
    if processor is not None:
        from PIL import Image

        side = int(config.vision_config.image_size)
        enc = generation_inputs(family, processor, [Image.new("RGB", (side, side))], [prompt], "cpu")
        q = int(enc["qformer_input_ids"].shape[1]) if "qformer_input_ids" in enc else 0
        return int(enc["input_ids"].shape[1]), q, True
    words = len(prompt.split())
    qtext = 2 + words if family.extra.get("qformer_text") else 0
    return family.image_tokens + 1 + words, qtext, False


def gflops_replay(family: Family, model, lm_tokens: int, qformer_tokens: int, new_tokens: int, num_beams: int = 1) -> float:
    """GFLOPs of captioning one image on the meta model: vision encoder, Q-Former and projection
    once; the language model at batch ``num_beams`` (:mod:`compressor.planning` replays it).

    Args:
        model: the model on the meta device.
        lm_tokens: language-model input length.
        qformer_tokens: the instruction length the Q-Former reads (InstructBLIP; 0 otherwise).
        new_tokens: generated tokens.
        num_beams: beam width.
    """
    import torch

    from compressor.planning import flops_of, language_model_flops

    meta = torch.device("meta")
    side = int(model.config.vision_config.image_size)
    with torch.inference_mode():
        total, image = flops_of(lambda: model.vision_model(torch.zeros(1, 3, side, side, device=meta)).last_hidden_state)
        query = model.query_tokens.expand(1, -1, -1)
        if family.extra.get("qformer_text"):
            ids = torch.zeros(1, qformer_tokens, dtype=torch.long, device=meta)
            f, q_out = flops_of(lambda: model.qformer(input_ids=ids, query_embeds=query, encoder_hidden_states=image).last_hidden_state)
            q_out = q_out[:, : query.shape[1]]
        else:
            f, q_out = flops_of(lambda: model.qformer(query_embeds=query, encoder_hidden_states=image).last_hidden_state)
        total += f + flops_of(lambda: model.language_projection(q_out))[0]
        total += language_model_flops(model.language_model, family.decoder_only, lm_tokens, new_tokens, num_beams)
    return total / 1e9


# --------------------------------------------------------------------------------------------
# Token reduction: CATP votes, query ablation, static query reduction, inference-time options
# --------------------------------------------------------------------------------------------


def _cross_attentions(qformer) -> list:
    """The Q-Former's cross-attention modules (``crossattention.attention``: ``query``, ``key``, ``scaling``)."""
    return [layer.crossattention.attention for layer in qformer.encoder.layer if getattr(layer, "has_cross_attention", False)]


def _voting_forward(qformer, *args, **kwargs):
    """The Q-Former's own forward (never a patched one), and CATP's votes of its queries.

    Forward hooks on every cross-attention's ``query`` and ``key`` projections keep their outputs
    (the queries ``(batch, N, heads·d)``, the image keys ``(batch, patches, heads·d)``); the
    votes are :func:`compressor.tokens.catp_votes` of them, so the attention itself runs as
    configured (sdpa or eager) and only the logits ``q kᵀ`` are computed a second time.

    Returns:
        ``(output, votes (batch, N))``.
    """
    from compressor.tokens import catp_votes

    mods = _cross_attentions(qformer)
    caught: dict = {}
    handles = []

    def keep(key):
        def hook(module, args, output):
            caught[key] = output

        return hook

    for i, m in enumerate(mods):
        handles += [m.query.register_forward_hook(keep((i, "q"))), m.key.register_forward_hook(keep((i, "k")))]
    try:
        out = type(qformer).forward(qformer, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    layers = [(caught[(i, "q")], caught[(i, "k")], float(m.scaling)) for i, m in enumerate(mods)]
    return out, catp_votes(layers, int(mods[0].num_attention_heads))


def _catp_qformer_forward(self, *args, **kwargs):
    """The Q-Former's forward, returning only the ``self._vlmc_keep`` query outputs with the highest
    CATP vote per image, in their original order: ``last_hidden_state (batch, k, hidden)`` (an
    InstructBLIP instruction's positions are dropped: only query outputs reach the language model)."""
    from compressor.tokens import gather_tokens, select_top

    out, votes = _voting_forward(self, *args, **kwargs)
    hidden = out[0]
    selected = gather_tokens(hidden[:, : votes.shape[1]], select_top(votes, int(self._vlmc_keep)))
    if isinstance(out, tuple):
        return (selected, *out[1:])
    out.last_hidden_state = selected
    return out


def query_scores(family: Family, model, batch: dict):
    """CATP votes ``(batch, num_queries)`` of every learned query for the images of ``batch``
    (vision encoder + Q-Former only; InstructBLIP's Q-Former also reads ``qformer_input_ids``)."""
    import torch

    pixel = batch["pixel_values"].to(next(model.vision_model.parameters()).dtype)
    image = model.vision_model(pixel_values=pixel, return_dict=True).last_hidden_state
    mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
    query = model.query_tokens.expand(image.shape[0], -1, -1)
    kw: dict = {"query_embeds": query, "encoder_hidden_states": image, "encoder_attention_mask": mask, "return_dict": True}
    if family.extra.get("qformer_text"):
        qmask = torch.ones(query.shape[:-1], dtype=torch.long, device=image.device)
        kw.update(input_ids=batch["qformer_input_ids"], attention_mask=torch.cat([qmask, batch["qformer_attention_mask"]], 1))
    return _voting_forward(model.qformer, **kw)[1]


def mask_query(family: Family, model, batch: dict, index: int) -> dict:
    """``batch`` with the ``index``-th ``<image>`` token of every row masked in ``attention_mask``:
    the language model no longer sees that query's output (query ablation)."""
    where = batch["input_ids"] == _image_token_id(model)
    target = where & (where.long().cumsum(1) == index + 1)
    mask = batch["attention_mask"].clone()
    mask[target] = 0
    return {**batch, "attention_mask": mask}


def _image_token_id(model) -> int:
    cfg = model.config
    return int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index)


def with_image_tokens(family: Family, model, batch: dict, tokens: int) -> dict:
    """The batch with ``tokens`` ``<image>`` tokens per row (the processor puts them first in every
    row, before any padding): image columns are added at the front (attention 1, label -100) or
    the first ones dropped; ``labels`` of a causal LM follow (T5's labels are the decoder's).

    Raises:
        ModelSpecError: the batch's rows do not start with their image tokens.
    """
    import torch

    ids = batch["input_ids"]
    image = _image_token_id(model)
    have = int((ids[0] == image).sum())
    if have == tokens:
        return batch
    if not bool((ids[:, :have] == image).all()):
        raise ModelSpecError("the batch's rows do not start with their <image> tokens; cannot change their number")
    out = dict(batch)
    if tokens > have:
        extra = tokens - have
        out["input_ids"] = torch.cat([torch.full((ids.shape[0], extra), image, dtype=ids.dtype, device=ids.device), ids], 1)
        mask = batch["attention_mask"]
        out["attention_mask"] = torch.cat([torch.ones((ids.shape[0], extra), dtype=mask.dtype, device=mask.device), mask], 1)
        if "labels" in batch and batch["labels"].shape == ids.shape:
            lab = batch["labels"]
            out["labels"] = torch.cat([torch.full((ids.shape[0], extra), -100, dtype=lab.dtype, device=lab.device), lab], 1)
        return out
    drop = have - tokens
    out["input_ids"], out["attention_mask"] = ids[:, drop:], batch["attention_mask"][:, drop:]
    if "labels" in batch and batch["labels"].shape == ids.shape:
        out["labels"] = batch["labels"][:, drop:]
    return out


def reduce_queries(family: Family, model, processor, keep: list[int]) -> None:
    """Keep the learned queries ``keep`` for good: ``query_tokens (1, k, hidden)``,
    ``config.num_query_tokens`` and the processor's ``num_query_tokens`` become k (the saved folder
    loads with plain transformers: ``AutoProcessor`` gives k ``<image>`` tokens)."""
    import torch
    from torch import nn

    old = model.query_tokens
    with torch.no_grad():
        new = nn.Parameter(old[:, list(keep)].clone(), requires_grad=old.requires_grad)
    model.query_tokens = new
    model.config.num_query_tokens = len(keep)
    if processor is not None:
        processor.num_query_tokens = len(keep)


def apply_token_options(family: Family, model) -> None:
    """Run the recorded options: CATP selection after the Q-Former (``query_tokens``: the Q-Former's
    ``forward`` is replaced on the instance by :func:`_catp_qformer_forward`) and ToMe in the ViT
    (``token_merging``). Options absent from the record are switched off."""
    import types

    from compressor.families.blip import vit_token_merging

    opts = family.token_options
    qformer = model.qformer
    keep = (opts.get("query_tokens") or {}).get("keep")
    if keep and int(keep) < family.num_queries:
        qformer._vlmc_keep = int(keep)
        qformer.forward = types.MethodType(_catp_qformer_forward, qformer)
    elif "forward" in vars(qformer):
        del qformer.forward
        vars(qformer).pop("_vlmc_keep", None)
    vit_token_merging(model.vision_model.encoder, (opts.get("token_merging") or {}).get("r"))


# --------------------------------------------------------------------------------------------
# Token ids (what generate reads; recorded in ONNX exports)
# --------------------------------------------------------------------------------------------


def token_ids(family: Family, model, processor) -> dict[str, Any]:
    """bos / eos (a list) / pad (and T5's decoder start) from the language model's generation config."""
    gc = model.language_model.generation_config
    top = model.generation_config
    tok = processor.tokenizer

    def pick(name):
        for src in (gc, top):
            v = getattr(src, name, None)
            if v is not None:
                return v
        return getattr(tok, name, None)

    eos = pick("eos_token_id")
    pad = pick("pad_token_id")
    bos = pick("bos_token_id")
    out = {
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None],
        "pad_token_id": None if pad is None else int(pad),
    }
    if not family.decoder_only:
        start = pick("decoder_start_token_id")
        out["decoder_start_token_id"] = int(start if start is not None else model.config.text_config.decoder_start_token_id)
    return out


# --------------------------------------------------------------------------------------------
# ONNX: the image path and the language model for the decoder-only (OPT, Llama …) or the
# encoder-decoder (T5) topology of exporters.onnx.topologies
# --------------------------------------------------------------------------------------------


_ONNX_CLASSES: dict[str, Any] = {}


def _onnx_wrappers():
    """The image-path wrapper class, built on first use (this module imports without torch)."""
    if "ImageEncoder" in _ONNX_CLASSES:
        return _ONNX_CLASSES["ImageEncoder"]
    import torch
    from torch import nn

    class ImageEncoder(nn.Module):
        """BLIP-2 / InstructBLIP: pixels (+ instruction) → language-model inputs.

        ``(batch, 3, H, W)`` float32 [+ ``qformer_input_ids`` / ``qformer_attention_mask``
        ``(batch, q)``] → ``image_embeds (batch, image_tokens, lm_hidden)``: the vision
        encoder, the Q-Former over the learned queries (and the instruction), the projection,
        as ``get_image_features`` / ``generate`` of transformers 5.x compute them. Only those
        parts are registered: the dynamo exporter keeps every registered parameter. Recorded
        token options run inside (they are applied to the model's modules): ToMe in the vision
        encoder, and CATP's TopK + Gather after the Q-Former (``image_tokens`` = its k).
        """

        def __init__(self, model, with_text: bool):
            super().__init__()
            self.vision_model = model.vision_model
            self.qformer = model.qformer
            self.query_tokens = model.query_tokens
            self.language_projection = model.language_projection
            self.with_text = with_text
            self.dtype_ = next(model.vision_model.parameters()).dtype
            self.out_dtype = model.language_projection.weight.dtype

        def forward(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
            image_embeds = self.vision_model(pixel_values=pixel_values.to(self.dtype_), return_dict=True).last_hidden_state
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            if self.with_text:  # InstructBLIP: the Q-Former also reads the instruction
                query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image_embeds.device)
                out = self.qformer(
                    input_ids=qformer_input_ids,
                    attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
                    query_embeds=query_tokens,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_mask,
                    return_dict=True,
                )
                query_output = out[0][:, : query_tokens.shape[1], :]
            else:
                out = self.qformer(
                    query_embeds=query_tokens,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_mask,
                    return_dict=True,
                )
                query_output = out[0]
            if query_output.dtype != image_embeds.dtype:  # the Q-Former may be kept in fp32
                query_output = query_output.to(image_embeds.dtype)
            return self.language_projection(query_output).to(self.out_dtype)

    _ONNX_CLASSES["ImageEncoder"] = ImageEncoder
    return ImageEncoder


def _onnx_image_sample(size: int, qformer_vocab: int | None, batch: int, gen) -> list:
    """Sample image-path inputs: ``pixel_values (batch, 3, size, size)`` and, for InstructBLIP, a
    5-token instruction (ids in ``[4, qformer_vocab)``; rows 1 and 2 padded at the end)."""
    import torch

    pix = torch.randn((batch, 3, size, size), generator=gen)
    if qformer_vocab is None:
        return [pix]
    qmask = torch.ones((batch, 5), dtype=torch.long)
    qmask[1, 3:] = 0
    qmask[2, 4:] = 0
    return [pix, torch.randint(4, max(5, qformer_vocab), (batch, 5), generator=gen), qmask]


def onnx_graph_parts(family: Family, model):
    """The ONNX parts of a BLIP-2 / InstructBLIP model (``family.onnx_topology``'s ``Parts``).

    The image path is vision encoder + Q-Former + projection (InstructBLIP: the Q-Former also
    reads ``qformer_input_ids`` / ``qformer_attention_mask (batch, qformer_seq)``), giving
    ``num_query_tokens`` embeddings per image that replace the ``<image>`` tokens; the language
    model is fed to the decoder-only topology as is, and a T5 through its language-model kind's
    encoder/decoder wrappers (:func:`compressor.families.language_models.onnx_text_graphs`).
    """
    from exporters.onnx.graphs import ImageGraph, TensorSpec

    cfg = model.config
    size = int(cfg.vision_config.image_size)
    nq = family.image_tokens  # num_query_tokens, or the k of a per-image query selection
    instruction = bool(family.extra.get("qformer_text"))
    inputs = [TensorSpec("pixel_values", ("batch", 3, size, size), "float32")]
    if instruction:
        inputs += [
            TensorSpec("qformer_input_ids", ("batch", "qformer_seq"), "int64"),
            TensorSpec("qformer_attention_mask", ("batch", "qformer_seq"), "int64"),
        ]
    qformer_vocab = int(cfg.qformer_config.vocab_size) if instruction else None
    image = ImageGraph(
        module=_onnx_wrappers()(model, instruction),
        inputs=tuple(inputs),
        sample=lambda batch, gen: _onnx_image_sample(size, qformer_vocab, batch, gen),
        num_tokens=nq,
    )
    image_token = cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index
    meta = {"num_query_tokens": nq, "image_token_id": int(image_token), "image_size": size}
    lm = model.language_model
    if family.decoder_only:
        from exporters.onnx.topologies.decoder_only import Parts

        return Parts(image=image, language_model=lm, text_config=cfg.text_config, meta=meta,
                     kv_heads=family.layer_kv_heads(model))
    from compressor.families.language_models import onnx_text_graphs
    from exporters.onnx.topologies.encoder_decoder import Parts as EncoderDecoderParts

    return EncoderDecoderParts(image=image, language_model=lm, text=onnx_text_graphs(family.lm, lm, cfg.text_config), meta=meta)
