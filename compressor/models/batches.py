"""Model inputs per family: generation inputs, training batches with labels, decoding.

Label layout (what the model's own loss expects, transformers 5.x):

* BLIP-2 / InstructBLIP with a causal LM: ``input_ids = [<image>×N, bos, prompt, target, eos]``;
  labels copy ``input_ids`` with image tokens, padding, BOS and prompt tokens set to -100
  (the model slices ``logits[:, -labels.size(1):]`` and shifts).
* BLIP-2 with T5: the encoder reads ``[<image>×N, prompt, </s>]``; labels are the target
  tokens ``[target, </s>]`` with padding -100 (the decoder input is shifted from them).
* BLIP: ``input_ids = [DEC] prompt target [SEP]`` (BLIP starts decoding from ``[DEC]``,
  Li et al. 2022); labels mask padding and prompt.
* InstructBLIP's Q-Former reads the instruction only (never the target).
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_VQA_PROMPT = "Question: {question} Answer:"


def build_prompt(template: str | None, question: str | None) -> str:
    """The text prompt for one example.

    Args:
        template: the recipe's ``generation.prompt`` (may contain ``{question}``), or None.
        question: the VQA question, or None for captioning.

    Returns:
        ``""`` for plain captioning; the filled template for VQA (default
        ``"Question: {question} Answer:"``, the BLIP-2 paper's VQA prompt).
    """
    if question is not None:
        tmpl = template or DEFAULT_VQA_PROMPT
        return tmpl.format(question=question) if "{question}" in tmpl else f"{tmpl} {question}".strip()
    return template or ""


def _tok(processor):
    return processor.tokenizer


def generation_inputs(family, processor, images: Sequence, prompts: Sequence[str], device: str = "cpu") -> dict:
    """Inputs for ``model.generate`` for a batch (left padding for causal LMs).

    Args:
        family: the model's :class:`~compressor.families.Family`.
        processor: its processor.
        images: PIL images, one per example.
        prompts: one prompt per example (``""`` for none).
        device: where to put the tensors.

    Returns:
        A dict of tensors: ``pixel_values (batch, 3, H, W)``, ``input_ids (batch, seq)``,
        ``attention_mask`` and, for InstructBLIP, ``qformer_input_ids`` / ``qformer_attention_mask``.
    """
    tok = _tok(processor)
    tok.padding_side = "left" if family.decoder_only else "right"
    if family.name == "blip":
        if any(prompts):
            enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
            # BLIP's generate replaces [CLS] with [DEC] and drops the trailing [SEP] itself.
        else:
            enc = processor(images=list(images), return_tensors="pt")
    else:
        enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
    tok.padding_side = "right"
    return {k: v.to(device) for k, v in enc.items()}


def decode(family, processor, sequences, inputs: dict, prompts: Sequence[str]) -> list[str]:
    """Generated token ids → captions, prompt and special tokens stripped.

    Args:
        sequences: ``generate`` output, ``(batch, seq)``.
        inputs: the inputs given to ``generate``.
        prompts: the prompts given.

    Returns:
        One stripped caption per example.
    """
    tok = _tok(processor)
    if family.name == "blip":
        texts = tok.batch_decode(sequences, skip_special_tokens=True)
        out = []
        for text, prompt in zip(texts, prompts):
            text = text.strip()
            p = prompt.strip().lower()
            if p and text.lower().startswith(p):
                text = text[len(p):]
            out.append(text.strip())
        return out
    if family.decoder_only:
        sequences = sequences[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tok.batch_decode(sequences, skip_special_tokens=True)]


def caption_batch(family, processor, images: Sequence, prompts: Sequence[str], run) -> list[str]:
    """Caption one batch with ``run(images, prompts) -> captions``, splitting BLIP batches by prompt length.

    BLIP's text decoder (transformers' ``BlipForConditionalGeneration.generate``) overwrites the
    first input column with ``[DEC]`` and drops the last column, which is only right when no
    prompt in the batch is padded; so BLIP prompts of different token lengths run as separate
    sub-batches (same captions, in the input order). Every other family runs the batch as is
    (left padding). Both the PyTorch and the ONNX Runtime captioner use this, so their captions
    are comparable row by row.

    Args:
        family: the model family.
        processor: its processor (the tokenizer counts prompt tokens).
        images: PIL images, length ``batch``.
        prompts: one prompt per image (``""`` for none).
        run: generates captions for a list of images and prompts.

    Returns:
        ``batch`` captions in the order of ``images``.
    """
    images, prompts = list(images), list(prompts)
    if family.name != "blip" or not any(prompts):
        return run(images, prompts)
    tok = _tok(processor)
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault(len(tok(p).input_ids) if p else 0, []).append(j)
    caps: list[str] = [""] * len(images)
    for idx in groups.values():
        for j, c in zip(idx, run([images[j] for j in idx], [prompts[j] for j in idx])):
            caps[j] = c
    return caps


def training_batch(family, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
    """A training batch with labels for the model's own loss.

    Args:
        family: the model family.
        processor: its processor.
        images: PIL images.
        targets: the caption (or answer) to learn, one per image.
        prompts: the prompt before it (``""`` for none); its tokens get label -100.

    Returns:
        Tensors for ``model(**batch)``: pixel values, input ids, attention masks, ``labels``
        (``(batch, seq)``, -100 where no loss is taken).
    """
    import torch

    tok = _tok(processor)
    tok.padding_side = "right"
    eos = tok.eos_token or tok.sep_token
    if family.name == "blip":
        full = [(p + " " + t).strip() if p else t for p, t in zip(prompts, targets)]
        enc = processor(images=list(images), text=full, padding=True, return_tensors="pt")
        enc["input_ids"][:, 0] = tok.bos_token_id
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        labels[:, 0] = -100
        for i, p in enumerate(prompts):
            if p:
                n = len(tok(p, add_special_tokens=False).input_ids)
                labels[i, 1 : 1 + n] = -100
        enc["labels"] = labels
        return dict(enc)
    if not family.decoder_only:  # T5: encoder gets image tokens + prompt, decoder learns the target
        enc = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
        lab = tok(list(targets), padding=True, return_tensors="pt")
        labels = lab["input_ids"].clone()
        labels[lab["attention_mask"] == 0] = -100
        enc["labels"] = labels
        enc["decoder_attention_mask"] = lab["attention_mask"]
        if family.has_qformer_text:
            _qformer_prompt(processor, enc, prompts)
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
    if family.has_qformer_text:
        _qformer_prompt(processor, enc, prompts)
    return {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in enc.items()}


def _qformer_prompt(processor, enc, prompts) -> None:
    """InstructBLIP: the Q-Former reads the instruction only, not the target."""
    qtok = processor.qformer_tokenizer
    q = qtok(list(prompts), padding=True, return_tensors="pt")
    enc["qformer_input_ids"] = q["input_ids"]
    enc["qformer_attention_mask"] = q["attention_mask"]
