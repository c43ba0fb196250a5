"""What an evaluation scores (:class:`EvalTarget`) and how its model-based metrics are set up (:class:`EvalOptions`).

A target is a :class:`~compressor.evaluation.captioner.Captioner` plus what only some backends
have: the PyTorch model and processor behind it (perplexity, parameters, GFLOPs), the folder it
was loaded from (size on disk; an ONNX export's ``export.json``), a way to make a captioner for
another batch size (latency), and for an ONNX export a lazily loaded PyTorch source (GFLOPs and
perplexity counted on the model the graphs were exported from). Build one with
:meth:`EvalTarget.torch` or :meth:`EvalTarget.onnx`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EvalTarget:
    """A model ready to caption, with what evaluation may measure on it.

    Attributes:
        captioner: a :class:`~compressor.evaluation.captioner.Captioner` (PyTorch or ONNX Runtime).
        generation: the decoding settings the captioner uses (the recipe's ``GenerationSpec``).
        model: the PyTorch model behind ``captioner`` (a BLIP-family model, or a peft model
            around one), or None for an ONNX export.
        processor: its processor (None for an ONNX export).
        device: ``cpu`` or ``cuda`` (also where an ONNX export's PyTorch source runs).
        folder: the model folder (its size is ``size_mb``) or the ONNX export folder (holds
            ``export.json``); None: no folder (no ``size_mb``).
        make_captioner: batch size → a captioner generating that many captions in one call
            (latency at several batch sizes); None: ``captioner`` as is.
        source: for an ONNX export, a zero-argument callable returning ``(model, processor)`` of
            the PyTorch model it was exported from, called at most once and only when needed
            (:meth:`source_model`); None: GFLOPs and perplexity are left out, with a note.
        settings_from: where the decoding settings came from (recorded by ``compress eval``).
    """

    captioner: Any
    generation: Any
    model: Any = None
    processor: Any = None
    device: str = "cpu"
    folder: Path | None = None
    make_captioner: Callable[[int], Any] | None = None
    source: Callable[[], tuple[Any, Any]] | None = None
    settings_from: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.source is not None:
            self.source = functools.cache(self.source)  # loaded once, when first needed

    @property
    def kind(self) -> str:
        """``torch`` when the PyTorch model is at hand, else ``onnx``."""
        return "torch" if self.model is not None else "onnx"

    def source_model(self) -> tuple[Any, Any] | None:
        """``(model, processor)`` of the ONNX export's PyTorch source (loaded on first call), or None."""
        return self.source() if self.source is not None else None

    @classmethod
    def torch(cls, model, processor, generation, device: str = "cpu", folder: Path | None = None, draft=None,
              **kw) -> EvalTarget:
        """A PyTorch model, captioned by a :class:`~compressor.evaluation.captioner.TorchCaptioner`.

        Args:
            model: a BLIP-family model (or a peft model around one), in eval mode.
            processor: its processor.
            generation: the decoding settings (``GenerationSpec``).
            device: ``cpu`` or ``cuda``.
            folder: the folder it was loaded from (``size_mb``), or None.
            draft: a :class:`~exporters.onnx.speculative.DraftSpec` (speculative decoding with
                that draft, opened once and shared by every captioner of the target), or None.
            **kw: other :class:`EvalTarget` fields (``settings_from``).

        Raises:
            ModelSpecError: ``processor`` is None (captioning needs a tokenizer).
            UserInputError: a draft that cannot draft for this model, or with beam search (exit 2).
        """
        from compressor.evaluation.captioner import TorchCaptioner

        opened = _open_draft(draft, generation, None, device)
        captioner = TorchCaptioner(model, processor, generation, device, draft=opened)
        return cls(
            captioner,
            generation,
            model=model,
            processor=processor,
            device=device,
            folder=folder,
            make_captioner=functools.partial(torch_captioner_for_batch, model, processor, generation, device, draft=opened),
            **kw,
        )

    @classmethod
    def onnx(cls, folder: Path, generation, device: str = "cpu", source=None, draft=None, **kw) -> EvalTarget:
        """An ONNX export, captioned by ``exporters.onnx.OnnxCaptioner``.

        Args:
            folder: the export folder (``export.json`` and the graphs).
            generation: the decoding settings (``GenerationSpec``).
            device: where ``source`` runs.
            source: a zero-argument callable returning the PyTorch ``(model, processor)`` the
                graphs were exported from, or None.
            draft: a :class:`~exporters.onnx.speculative.DraftSpec`; None: the export's bundled
                draft when it has one (``DraftSpec(bundled=False)``: none).
            **kw: other :class:`EvalTarget` fields (``settings_from``).

        Raises:
            ImportError: the ONNX runtime cannot be imported.
            UserInputError: a draft that cannot draft for this export, or with beam search (exit 2).
        """
        opened = _open_draft(draft, generation, folder, device)
        from exporters.onnx.speculative import onnx_captioner

        return cls(
            onnx_captioner(folder, generation, opened),
            generation,
            device=device,
            folder=folder,
            make_captioner=functools.partial(_onnx_for_batch, folder, generation, opened),
            source=source,
            **kw,
        )


def _open_draft(spec, generation, target_dir, device: str):
    """The draft a :class:`~exporters.onnx.speculative.DraftSpec` names, opened (None: no draft)."""
    if spec is None and target_dir is None:
        return None
    from exporters.onnx.speculative import resolve_draft

    return resolve_draft(spec, generation, target_dir, device=device)


def torch_captioner_for_batch(model, processor, generation, device: str, batch_size: int, draft=None):
    """A :class:`~compressor.evaluation.captioner.TorchCaptioner` generating ``batch_size`` captions per call."""
    from compressor.evaluation.captioner import TorchCaptioner

    return TorchCaptioner(model, processor, generation.model_copy(update={"batch_size": batch_size}), device, draft=draft)


def _onnx_for_batch(folder, generation, draft, batch_size: int):
    from exporters.onnx.speculative import onnx_captioner

    return onnx_captioner(folder, generation.model_copy(update={"batch_size": batch_size}), draft)


@dataclass
class EvalOptions:
    """Settings of the model-based metrics (see ``eval.metrics``: rows that need a model or a teacher).

    Attributes:
        bertscore_model: local model folder for ``bertscore_f1``.
        bertscore_layers: its layer (None: the last).
        clipscore_model: local CLIP folder for ``clipscore``.
        teacher_predictions: ``{key: caption}`` of a teacher, the references of
            ``teacher_cider``; when given, ``teacher_cider`` is computed even if not asked for.
    """

    bertscore_model: str | None = None
    bertscore_layers: int | None = None
    clipscore_model: str | None = None
    teacher_predictions: dict[str, str] | None = None
