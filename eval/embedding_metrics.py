"""Embedding-based caption metrics: BERTScore and CLIPScore, from local model folders only.

Sources followed:

* BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT") through the
  ``bert-score`` package (``bert_score.score``): greedy token matching of contextual
  embeddings; with several references per candidate the best F1 over the references counts. No
  IDF weighting and no baseline rescaling (the package defaults).
* CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning", reference implementation https://github.com/jmhessel/clipscore):
  ``w * max(cos(image embedding, text embedding), 0)`` with ``w = 2.5``, the text being the
  caption after the prefix ``"A photo depicts "``, averaged over pairs. Here it is x100, so in
  [0, 250].

Nothing is downloaded: the model must be a local folder (recipe ``evaluate.bertscore.model`` /
``evaluate.clipscore.model``; CLI ``--bertscore-model`` / ``--clipscore-model``). torch,
transformers and bert_score are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.errors import DataError, UserInputError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

#: Hessel et al. 2021: CLIP-S = w * max(cos, 0), w = 2.5.
CLIPSCORE_W = 2.5
#: The prompt prefix of the CLIPScore reference implementation.
CLIPSCORE_PREFIX = "A photo depicts "


def _model_folder(model_dir: str | Path | None, metric: str, option: str, cli: str, what: str) -> Path:
    if model_dir is None:
        raise UserInputError(
            f"{metric} needs a local {what} folder: set `{option}` in the recipe or pass `{cli} PATH` "
            "(nothing is downloaded)."
        )
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserInputError(f"{metric}: the model folder {path} does not exist (`{option}` / `{cli}`).")
    if not (path / "config.json").is_file():
        raise UserInputError(
            f"{metric}: {path} has no config.json; point `{option}` / `{cli}` at a folder written by "
            "save_pretrained (a Hugging Face model snapshot)."
        )
    return path


def require_model_folder(model_dir: str | Path | None, metric: str) -> Path:
    """Check, before any work, that a metric's local model folder is given and looks loadable.

    Args:
        model_dir: the folder given by the user, or None.
        metric: ``bertscore_f1`` or ``clipscore``.

    Returns:
        The folder.

    Raises:
        UserInputError: the folder is not given, does not exist or has no ``config.json``; the
            message names the recipe key and the CLI option to set.
    """
    from eval.metrics import lookup

    opt = lookup(metric).model_folder
    return _model_folder(model_dir, metric, opt.recipe_key, opt.cli_option, opt.what)


def _device(device: str | None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bertscore_f1(
    candidates: Sequence[str],
    references: Sequence[Sequence[str] | str],
    model_dir: str | Path | None,
    num_layers: int | None = None,
    *,
    batch_size: int = 64,
    device: str | None = None,
) -> float:
    """Mean BERTScore F1 of candidates against their references, on the 0-100 scale.

    Candidates and references that are empty (or whitespace) are handled here, because
    bert-score 0.3.13 crashes on them with transformers 5 (``build_inputs_with_special_tokens``
    is gone): an empty candidate scores 0, empty references are dropped, and a candidate with
    no non-empty reference scores 0.

    Args:
        candidates: N generated captions.
        references: N lists of reference captions (a single string counts as one reference);
            each candidate's F1 is its best over its references.
        model_dir: a local Hugging Face model folder (e.g. a saved ``roberta-large``).
        num_layers: the layer whose embeddings are compared. None means the model's last layer;
            bert-score's published defaults pick a middle layer per model (e.g. 17 of 24 for
            roberta-large), so pass it to match published numbers.
        batch_size: sentences per forward pass.
        device: ``"cpu"``, ``"cuda"``, ...; None picks CUDA when available.

    Returns:
        The mean F1 x100 (usually 80-95 for related sentences with roberta-large; BERTScore is
        not rescaled, so unrelated text still scores well above 0).

    Raises:
        UserInputError: ``model_dir`` is None, missing or not a model folder (naming
            ``evaluate.bertscore.model`` / ``--bertscore-model``), or bert-score is not installed.
        DataError: the two lists differ in length, or are empty.
    """
    path = _model_folder(model_dir, "bertscore_f1", "evaluate.bertscore.model", "--bertscore-model", "model")
    if len(candidates) != len(references):
        raise DataError(f"bertscore_f1: {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise DataError("bertscore_f1: nothing to score (no candidates)")
    try:
        import bert_score
    except ImportError as e:
        raise UserInputError("bertscore_f1 needs bert-score: `pip install 'vlm-compress[metrics]'`.") from e

    ref_lists = [[r] if isinstance(r, str) else list(r) for r in references]
    keep: list[int] = []
    cands: list[str] = []
    refs: list[list[str]] = []
    for n, (c, rs) in enumerate(zip(candidates, ref_lists, strict=True)):
        good = [r for r in rs if r.strip()]
        if c.strip() and good:
            keep.append(n)
            cands.append(c)
            refs.append(good)
    if len(keep) < len(candidates):
        logger.warning(
            "bertscore_f1: %d of %d candidates are empty or have only empty references and score 0",
            len(candidates) - len(keep),
            len(candidates),
        )
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "t5" in str(path) and cfg.get("model_type") != "t5":
        # bert-score picks T5EncoderModel for any model_type containing "t5", even a folder path.
        raise UserInputError(
            f"bertscore_f1: bert-score loads any model whose path contains 't5' as a T5 model, but {path} "
            f"is a {cfg.get('model_type')!r} model; move or link it to a path without 't5'."
        )
    if num_layers is None:
        num_layers = cfg.get("num_hidden_layers") or cfg.get("n_layers") or cfg.get("num_layers")
        if not num_layers:
            raise UserInputError(
                f"bertscore_f1: cannot tell how many layers {path} has; set `evaluate.bertscore.num_layers`."
            )
    f1 = [0.0] * len(candidates)
    if keep:
        t0 = time.perf_counter()
        _, _, scores = bert_score.score(
            cands,
            refs,
            model_type=str(path),
            num_layers=int(num_layers),
            batch_size=batch_size,
            device=_device(device),
            verbose=False,
        )
        for n, s in zip(keep, scores.tolist(), strict=True):
            f1[n] = float(s)
        logger.info("BERTScore of %d candidates: %.2f s", len(keep), time.perf_counter() - t0)
    return 100.0 * sum(f1) / len(f1)


def _load_clip(path: Path, device: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    try:
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserInputError(
            f"clipscore: cannot load a CLIP model and processor from {path} (`evaluate.clipscore.model` / "
            f"`--clipscore-model`): {e}"
        ) from e
    return model.to(device).eval(), processor


def clip_scores(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    model_dir: str | Path | None,
    *,
    prefix: str = CLIPSCORE_PREFIX,
    batch_size: int = 32,
    device: str | None = None,
) -> list[float]:
    """CLIPScore of every (image, caption) pair, on the 0-250 scale.

    Args:
        images: N PIL images (converted to RGB).
        captions: N captions; pair i is ``(images[i], captions[i])``.
        model_dir: a local folder holding a ``CLIPModel`` and its ``CLIPProcessor``.
        prefix: text put before each caption (the reference implementation's
            ``"A photo depicts "``; ``""`` for none).
        batch_size: pairs per forward pass.
        device: ``"cpu"``, ``"cuda"``, ...; None picks CUDA when available.

    Returns:
        N scores ``100 * 2.5 * max(cos, 0)``, each in [0, 250].

    Raises:
        UserInputError: ``model_dir`` is None, missing or not loadable (naming
            ``evaluate.clipscore.model`` / ``--clipscore-model``).
        DataError: the two lists differ in length, or are empty.
    """
    path = _model_folder(
        model_dir, "clipscore", "evaluate.clipscore.model", "--clipscore-model", "CLIP model"
    )
    if len(images) != len(captions):
        raise DataError(f"clipscore: {len(images)} images but {len(captions)} captions")
    if not images:
        raise DataError("clipscore: nothing to score (no images)")
    import torch

    dev = _device(device)
    model, processor = _load_clip(path, dev)
    max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))
    out: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            imgs = [im.convert("RGB") for im in images[start : start + batch_size]]
            texts = [prefix + c for c in captions[start : start + batch_size]]
            inputs = processor(
                text=texts,
                images=imgs,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_len,
            ).to(dev)
            o = model(**inputs)
            img = torch.nn.functional.normalize(o.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(o.text_embeds.float(), dim=-1)
            cos = (img * txt).sum(dim=-1)
            out += (100.0 * CLIPSCORE_W * cos.clamp(min=0)).tolist()
    logger.info("CLIPScore of %d pairs: %.2f s", len(out), time.perf_counter() - t0)
    return out


def clip_score(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    model_dir: str | Path | None,
    *,
    prefix: str = CLIPSCORE_PREFIX,
    batch_size: int = 32,
    device: str | None = None,
) -> float:
    """Mean CLIPScore (Hessel et al. 2021) over (image, caption) pairs, on the 0-250 scale.

    Args:
        images: N PIL images.
        captions: N captions.
        model_dir: a local CLIP folder (model and processor).
        prefix: see :func:`clip_scores`.
        batch_size: see :func:`clip_scores`.
        device: see :func:`clip_scores`.

    Returns:
        The mean of ``100 * 2.5 * max(cos(image, text), 0)``.

    Raises:
        UserInputError, DataError: see :func:`clip_scores`.
    """
    scores = clip_scores(images, captions, model_dir, prefix=prefix, batch_size=batch_size, device=device)
    return sum(scores) / len(scores)
