"""The one protocol evaluation scores through: images (+ prompts) in, captions out.

A PyTorch implementation lives in ``compressor.generation.TorchCaptioner`` and an ONNX Runtime
one in ``exporters.onnx``; evaluation never cares which it scores (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


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
