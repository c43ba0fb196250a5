"""Model inputs: prompts, generation inputs, training batches with labels, decoding.

The layout of a batch belongs to the model's family (``compressor/families/<name>.py``: where
the image tokens go, which tokens are masked from the loss, how generated ids are stripped);
these functions are the stable entry points the captioners, the training loop and the
importance scores call, and dispatch to the family.
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
        ``attention_mask`` and whatever else the family's model reads.
    """
    return family.generation_inputs(processor, images, prompts, device)


def decode(family, processor, sequences, inputs: dict, prompts: Sequence[str]) -> list[str]:
    """Generated token ids ``(batch, seq)`` → one caption per example, prompt and special tokens stripped."""
    return family.decode(processor, sequences, inputs, prompts)


def caption_batch(family, processor, images: Sequence, prompts: Sequence[str], run) -> list[str]:
    """Caption one batch with ``run(images, prompts) -> captions``, split where the family needs it.

    Both the PyTorch and the ONNX Runtime captioner call this, so their captions are comparable
    row by row.

    Returns:
        ``batch`` captions in the order of ``images``.
    """
    return family.caption_batch(processor, images, prompts, run)


def training_batch(family, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
    """A training batch with labels for the model's own loss.

    Args:
        family: the model family.
        processor: its processor.
        images: PIL images.
        targets: the caption (or answer) to learn, one per image.
        prompts: the prompt before it (``""`` for none); its tokens get label -100.

    Returns:
        Tensors for ``model(**batch)``, with ``labels (batch, seq)`` (-100 where no loss is taken).
    """
    return family.training_batch(processor, images, targets, prompts)
