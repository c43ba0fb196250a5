"""The one protocol evaluation scores through (images + prompts in, captions out) and its PyTorch implementation.

:class:`Captioner` is implemented by :class:`TorchCaptioner` (transformers ``generate``) and by
``exporters.onnx.OnnxCaptioner`` (ONNX Runtime); evaluation never cares which it scores
(DESIGN.md). :func:`generate_kwargs` turns the recipe's decoding settings into ``generate``
arguments, shared by both so they decode alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from compressor.families import family_for_model
from compressor.models.batches import build_prompt, caption_batch, decode, generation_inputs

log = logging.getLogger(__name__)


@runtime_checkable
class Captioner(Protocol):
    """Generates one caption (or answer) per image.

    Attributes:
        settings: what produced the captions, recorded in reports: backend (``torch`` /
            ``onnxruntime``), decoding settings (``num_beams``, ``max_new_tokens``,
            ``min_new_tokens``, ``prompt``), batch size, device, dtype.
    """

    settings: dict[str, Any]

    def caption(self, images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[str]:
        """Caption a batch.

        Args:
            images: PIL images, length ``batch``.
            prompts: one prompt per image (``""`` for none), or None for plain captioning.

        Returns:
            ``batch`` strings, prompt and special tokens stripped.
        """
        ...


def prompt_fn(generation):
    """Example → prompt text: the recipe's prompt, or the VQA template filled with the question."""
    return lambda ex: build_prompt(generation.prompt, ex.question)


def generate_kwargs(generation) -> dict[str, Any]:
    """transformers ``generate`` keyword arguments from a recipe ``GenerationSpec`` (greedy/beam, no sampling)."""
    kw: dict[str, Any] = {
        "num_beams": generation.num_beams,
        "max_new_tokens": generation.max_new_tokens,
        "min_new_tokens": generation.min_new_tokens,
        "do_sample": False,
    }
    if generation.num_beams > 1:
        kw["length_penalty"] = generation.length_penalty
        kw["early_stopping"] = True
    if generation.repetition_penalty != 1.0:
        kw["repetition_penalty"] = generation.repetition_penalty
    if generation.no_repeat_ngram_size:
        kw["no_repeat_ngram_size"] = generation.no_repeat_ngram_size
    return kw


class TorchCaptioner:
    """Captions with ``model.generate`` in batches (left padding for causal LMs).

    With a ``draft``, greedy captions come from speculative decoding instead
    (:mod:`exporters.onnx.speculative`): transformers' assisted generation
    (``generate(assistant_model=…)``) cannot serve BLIP-2 in transformers 5.24 (the full draft
    model is refused, ``pixel_values`` missing; its language model alone is fed the target's image
    embeddings and returned other tokens than the target's greedy ``generate`` on the tiny
    presets), so the model runs through its graph wrappers in PyTorch
    (:func:`exporters.onnx.modules.module_captioner`), with the same loop as under ONNX Runtime,
    and its captions are its own ``generate`` captions.

    Args:
        model: a BLIP-family model (or a peft model wrapping one), in eval mode.
        processor: its processor.
        generation: the recipe's ``GenerationSpec`` (decoding settings, batch size).
        device: ``cpu`` or ``cuda``.
        draft: an opened draft (:func:`exporters.onnx.speculative.resolve_draft`), or None.

    Attributes:
        stats: the speculative counters (:class:`~exporters.onnx.speculative.SpecStats`) with a
            draft, else None.

    Raises:
        ModelSpecError: no processor.
        UserInputError: a draft with beam search, or one that cannot draft for this model (exit 2).
    """

    def __init__(self, model, processor, generation, device: str = "cpu", draft=None):
        if processor is None:
            from compressor.errors import ModelSpecError

            raise ModelSpecError("this model folder has no processor (tokenizer + image processor); captioning needs one")
        self.model = model
        self.processor = processor
        self.generation = generation
        self.device = device
        self.family = family_for_model(model)
        self.config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.kwargs = generate_kwargs(generation)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.settings = {
            "backend": "torch",
            "device": device,
            "dtype": dtype,
            "batch_size": generation.batch_size,
            **{k: v for k, v in self.kwargs.items() if k != "do_sample"},
            "prompt": generation.prompt,
        }
        self.speculative = None
        if draft is not None:
            from exporters.onnx.modules import module_captioner
            from exporters.onnx.speculative import SpeculativeCaptioner

            target = module_captioner(model, processor, generation, scoring=True)
            self.speculative = SpeculativeCaptioner(target, draft.captioner, draft.num_draft_tokens, draft.name,
                                                    draft.min_confidence)
            self.settings["speculative"] = self.speculative.settings["speculative"]

    @property
    def stats(self):
        return self.speculative.stats if self.speculative is not None else None

    def caption(self, images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[str]:
        """Caption ``images`` (see :class:`Captioner`); batches of ``generation.batch_size``.

        BLIP batches with prompts of different token lengths run as sub-batches
        (:func:`compressor.models.batches.caption_batch`).
        """
        if self.speculative is not None:
            return self.speculative.caption(images, prompts)
        prompts = list(prompts) if prompts is not None else [self.generation.prompt or ""] * len(images)
        out: list[str] = []
        bs = self.generation.batch_size
        for i in range(0, len(images), bs):
            out.extend(caption_batch(self.family, self.processor, images[i : i + bs], prompts[i : i + bs], self._generate))
        return out

    def _generate(self, imgs: list, prm: list[str]) -> list[str]:
        import torch

        inputs = generation_inputs(self.family, self.processor, imgs, prm, self.device)
        self.family.check_inputs(self.config, inputs)  # never caption without the image tokens
        dtype = next(self.model.parameters()).dtype
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            seq = self.model.generate(**inputs, **self.kwargs)
        return decode(self.family, self.processor, seq, inputs, prm)
