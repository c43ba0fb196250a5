"""What ``compress eval`` and ``compress predict`` share: the model (or ONNX export) to run, the
decoding settings, the data given by ``--data PATH``, and their click options.

A target is one of:

* an ONNX export folder (it holds ``export.json``): captioned by ``exporters.onnx.OnnxCaptioner``;
* a ``save_pretrained`` model folder (``config.json`` + ``*.safetensors``), with its processor,
  and its LoRA adapter in ``adapter/`` when present: captioned by ``TorchCaptioner``;
* a shipped preset name (``shapes-teacher``).

Decoding settings: the ``generation`` section of the folder's ``recipe.resolved.yaml`` (every
folder the pipeline writes carries one) when there is one, else the recipe defaults; then each
option given on the command line (``--prompt``, ``--num-beams``, ``--max-new-tokens``,
``--min-new-tokens``, ``--batch-size``). Where they came from is recorded as
``decoding.settings_from``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from compressor.data.formats import path_format_names
from compressor.errors import UserInputError

log = logging.getLogger(__name__)

DATA_FORMATS = path_format_names()


def data_options(f):
    """``--data``, ``--data-format``, ``--task``, ``--images``, ``--limit``, ``--skip-invalid``."""
    for dec in reversed(
        [
            click.option("--data", "data_path", metavar="PATH", help="Data file or folder (coco / karpathy JSON, csv, imagefolder)."),
            click.option("--data-format", type=click.Choice(DATA_FORMATS), help="Format of --data (default: detected)."),
            click.option("--task", type=click.Choice(["caption", "vqa"]), help="caption or vqa (default: detected)."),
            click.option("--images", metavar="DIR", help="Image folder for coco / karpathy / csv (default: beside the file)."),
            click.option("--limit", type=click.IntRange(min=1), help="Use the first N examples (sorted by image id)."),
            click.option("--skip-invalid", is_flag=True, help="Skip bad rows (missing/corrupt image, empty caption) instead of exit 2."),
        ]
    ):
        f = dec(f)
    return f


def model_options(f):
    """Decoding and device options of a model or ONNX target."""
    for dec in reversed(
        [
            click.option("--prompt", help="Text prompt (VQA: a template with {question})."),
            click.option("--num-beams", type=click.IntRange(min=1), help="Beam width (1 = greedy)."),
            click.option("--max-new-tokens", type=click.IntRange(min=1), help="Maximum generated tokens per caption."),
            click.option("--min-new-tokens", type=click.IntRange(min=0), help="Minimum generated tokens per caption."),
            click.option("--batch-size", type=click.IntRange(min=1), help="Images per generate call."),
            click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where to run."),
            click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Weights dtype (default: as saved)."),
        ]
    ):
        f = dec(f)
    return f


def draft_options(f):
    """Speculative decoding options of a model or ONNX target."""
    for dec in reversed(
        [
            click.option("--draft", metavar="DIR", help="Speculative decoding: DIR (an ONNX export or a model folder with the "
                         "same tokenizer, e.g. the compressed model) drafts tokens the model checks; same greedy captions."),
            click.option("--num-draft-tokens", type=click.IntRange(1, 16), help="Draft tokens per target call (default 4, "
                         "or the bundled draft's)."),
            click.option("--draft-variant", type=click.Choice(["plain", "optimized", "fp32", "fp16", "int8", "int4"]),
                         help="The draft export's variant (int8: its quantised decoder; DIR may be the model's own export)."),
            click.option("--draft-confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                         help="End a round's drafting once the draft's probability of its proposal is below this "
                         "(e.g. 0.4; helps weak drafts); same captions."),
            click.option("--no-draft", is_flag=True, help="Ignore a draft bundled in the ONNX export."),
        ]
    ):
        f = dec(f)
    return f


def draft_spec(draft: str | None, num_draft_tokens: int | None, draft_variant: str | None, no_draft: bool, generation,
               draft_confidence: float | None = None):
    """The :class:`~exporters.onnx.speculative.DraftSpec` of the draft options, checked before any model loads.

    Raises:
        UserInputError: ``--draft`` with ``--no-draft``, with beam search, or naming a folder
            that is neither an export nor a model folder (exit 2).
    """
    from compressor.models.loading import is_model_dir
    from exporters.onnx.metadata import is_onnx_dir
    from exporters.onnx.speculative import DraftSpec

    if draft is not None and no_draft:
        raise UserInputError("--draft and --no-draft contradict each other; give one")
    if draft is not None:
        p = Path(draft).expanduser()
        if not (is_onnx_dir(p) or is_onnx_dir(p / "onnx") or is_model_dir(p)):
            raise UserInputError(f"--draft {draft}: neither an ONNX export (a folder with export.json) nor a model folder")
        if generation.num_beams > 1:
            raise UserInputError(
                f"--draft with beam search (num_beams {generation.num_beams}): speculative decoding is greedy only; "
                "pass --num-beams 1 or leave --draft out"
            )
    return DraftSpec(path=draft, num_draft_tokens=num_draft_tokens, variant=draft_variant, bundled=not no_draft,
                     min_confidence=draft_confidence)


def resolve_target_path(target: str) -> tuple[Path, str]:
    """``(folder, kind)`` for a MODEL_OR_ONNX_DIR argument, checked without loading weights.

    Raises:
        UserInputError: the path is neither an ONNX export (``export.json``) nor a model folder
            nor a shipped preset (a folder holding ``onnx/`` or ``model/``, as an export or a
            stage folder does, stands for that).
    """
    from compressor.models.loading import is_model_dir
    from compressor.models.presets import PRESETS, SHIPPED

    if target in SHIPPED and not Path(target).exists():
        return Path(SHIPPED[target]), "torch"
    p = Path(target).expanduser()
    if not p.exists():
        hint = ""
        if target in PRESETS:
            hint = f" '{target}' is a preset built in code: use it in a recipe (`model: {target}`), or pass a folder."
        raise UserInputError(f"{target}: no such folder.{hint}")
    if p.is_dir() and (p / "export.json").is_file():
        return p.resolve(), "onnx"
    if is_model_dir(p):
        return p.resolve(), "torch"
    if p.is_dir() and (p / "onnx" / "export.json").is_file():
        return (p / "onnx").resolve(), "onnx"
    if is_model_dir(p / "model"):  # a run's stage folder (runs/x/stages/01-…/): its model/
        log.info("%s: using the model folder inside it, %s", target, p / "model")
        return (p / "model").resolve(), "torch"
    raise UserInputError(
        f"{target}: neither an ONNX export (a folder with export.json) nor a model folder "
        "(config.json and *.safetensors, as save_pretrained writes)"
    )


def generation_for(folder: Path, overrides: dict[str, Any]):
    """Decoding settings: the folder's recipe (if any), then the command-line ``overrides``.

    Returns:
        ``(GenerationSpec, settings_from)``.

    Raises:
        UserInputError: an override the schema refuses.
    """
    import yaml
    from pydantic import ValidationError

    from compressor.recipe.schema import GenerationSpec

    base: dict[str, Any] = {}
    origin: list[str] = []
    for cand in (folder / "recipe.resolved.yaml", folder.parent / "recipe.resolved.yaml"):
        if cand.is_file():
            try:
                data = yaml.safe_load(cand.read_text()) or {}
                gen = data.get("generation") if isinstance(data, dict) else None
                if isinstance(gen, dict):
                    GenerationSpec(**gen)
                    base, origin = dict(gen), [str(cand)]
                    break
            except (yaml.YAMLError, ValidationError, TypeError) as exc:
                log.warning("ignoring the generation settings of %s: %s", cand, str(exc).splitlines()[0])
    if not origin:
        origin = ["defaults"]
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        origin.append("command line: " + ", ".join(f"--{k.replace('_', '-')}" for k in given))
    try:
        return GenerationSpec(**{**base, **given}), origin
    except ValidationError as exc:
        raise UserInputError(f"decoding settings: {exc.errors()[0]['msg']}") from None


def load_target(target: str, overrides: dict[str, Any], device: str = "auto", dtype: str | None = None,
                draft: dict[str, Any] | None = None):
    """Load a model folder or an ONNX export for captioning.

    Args:
        target: MODEL_OR_ONNX_DIR (or a shipped preset name).
        overrides: decoding options from the command line (None = not given).
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: weights dtype, or None for the saved one.
        draft: the draft options (``draft``, ``num_draft_tokens``, ``draft_variant``,
            ``draft_confidence``, ``no_draft``; see :func:`draft_options`), or None (an export's bundled draft is used).

    Returns:
        A :class:`compressor.evaluation.EvalTarget` (``folder`` the resolved folder,
        ``settings_from`` where the decoding settings came from).

    Raises:
        UserInputError: see :func:`resolve_target_path`; ``cuda`` without a GPU; an ONNX export
            while ``exporters.onnx`` cannot be imported.
    """
    from compressor.evaluation import EvalTarget
    from compressor.models.loading import resolve_device

    folder, kind = resolve_target_path(target)
    generation, origin = generation_for(folder, overrides)
    dev = resolve_device(device)
    spec = draft_spec(**{"draft": None, "num_draft_tokens": None, "draft_variant": None, "no_draft": False, **(draft or {})},
                      generation=generation)
    if kind == "onnx":
        try:
            from exporters.onnx import OnnxCaptioner  # noqa: F401 - checked here, used by EvalTarget.onnx
        except ImportError as exc:
            raise UserInputError(f"{folder} is an ONNX export, but its runtime cannot be imported ({exc})") from None
        return EvalTarget.onnx(folder, generation, dev, settings_from=origin, draft=spec)
    from compressor.models.loading import load_model

    model, processor = load_model(folder, dtype=dtype, device=dev)
    if (folder / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder / "adapter")).to(dev)
        model.eval()
        origin.append("LoRA adapter in adapter/ applied")
    if spec.path is None and (spec.num_draft_tokens is not None or spec.variant is not None or spec.min_confidence is not None):
        raise UserInputError(f"--num-draft-tokens / --draft-variant / --draft-confidence need --draft DIR: {folder} is a model folder with no bundled draft")
    return EvalTarget.torch(model, processor, generation, dev, folder, settings_from=origin,
                            draft=spec if spec.path is not None else None)


def load_data(data_path: str, data_format: str | None, task: str | None, images: str | None, limit: int | None, skip_invalid: bool):
    """The dataset named by ``--data`` (read as the ``test`` section).

    Raises:
        UserInputError, DataError: the path, its format or its rows are bad (exit 2).
    """
    from compressor.data import infer_spec, load_section

    spec = infer_spec(data_path, data_format, task=task, images=images, limit=limit, skip_invalid=skip_invalid)
    data = load_section(spec, "test", limit=limit, label=f"--data {data_path}", skip_hint="pass --skip-invalid")
    if not len(data):
        raise UserInputError(f"--data {data_path}: no examples")
    return data


def trainable_from_run(folder: Path) -> int | None:
    """Parameters trained to make ``runs/<name>/final`` (from the run's manifest), else None."""
    manifest = folder.parent / "manifest.json"
    if folder.name != "final" or not manifest.is_file():
        return None
    try:
        stages = json.loads(manifest.read_text()).get("stages", [])
    except (OSError, ValueError):
        return None
    from compressor.stages import REGISTRY, declaration

    found = None
    for st in stages:
        count = declaration(st["type"]).trainable_params if st.get("type") in REGISTRY else None
        n = count(st.get("summary") or {}) if count is not None else None
        if n is not None:
            found = n
    return found


def check_out(path: Path, suffixes: tuple[str, ...], option: str = "--out") -> Path:
    """Check an output file name before any work (exit 2 on a folder or a wrong extension)."""
    p = Path(path)
    if p.is_dir():
        raise UserInputError(f"{option} {p} is a folder; give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserInputError(f"{option} {p}: expected a {' or '.join(suffixes)} file")
    return p
