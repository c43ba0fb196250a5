"""The recipe schema: one YAML file is the whole experiment.

Every key is declared with its type, default and meaning (``Field(description=...)``); the
recipe reference in docs/recipe.md is generated from these models (``python -m
compressor.recipe.docs``). Unknown keys are errors (``extra="forbid"``). This module holds the
top level and what stages share; each stage's own config lives in its module
(``compressor/stages/<type>.py``) and :func:`recipe_model` builds the stage union from the
registry, so a new stage needs no edit here. Checks that need the model's config (layer indices
in range, a stack's layer rule) run in ``compressor.pipeline.preflight`` before any weight is
loaded.

Follows the pass-config style of Olive and llm-compressor: one pydantic model per stage, a
discriminated union on ``type``.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from compressor.data.formats import format_names
from compressor.families import lora_names, part_names, trainable_names
from compressor.models import assembly
from compressor.models.assemble import AssembleParts  # noqa: F401 - BLIP-2's `assemble:` keys, re-exported
from compressor.recipe.base import Strict
from eval.metrics import characteristic_keys, default_metrics, metric_keys

# --------------------------------------------------------------------------------------------
# Shared vocabularies (DESIGN.md "Conventions every part shares")
# --------------------------------------------------------------------------------------------

#: Part names of every registered model family (``params_<part>`` keys; compressor.families).
PARTS = part_names()
#: Metric and characteristic keys, from the one metric table (``eval.metrics``).
CAPTION_METRICS = default_metrics("caption")
METRIC_KEYS = metric_keys()
CHARACTERISTIC_KEYS = characteristic_keys()
GATE_KEYS = METRIC_KEYS + CHARACTERISTIC_KEYS
DTYPES = ("float32", "float16", "bfloat16")
#: Part-scoped LoRA target names (``parts:`` of lora_finetune / heal), over every family; each
#: expands to an anchored module pattern of the model's own family (``compressor.families``).
LORA_PARTS = lora_names()
#: Names ``trainable: parts`` / ``finetune.parts`` may use, over every family.
TRAINABLE_PARTS = trainable_names()

Dtype = Literal["float32", "float16", "bfloat16"]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ConfigModelSpec(Strict):
    """A model built from a config file with fresh weights (real-size dry runs, benchmarks)."""

    config: str = Field(
        description="Path to a config.json, or a Hub id whose architecture is known offline "
        "(Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl, Salesforce/blip-image-captioning-base, "
        "HuggingFaceTB/SmolVLM-256M-Instruct)."
    )
    init: Literal["random"] = Field("random", description="How the weights start: `random` (seeded).")
    processor: str | None = Field(
        None,
        description="Folder or preset whose processor (tokenizer + image processor) to use; "
        "without one, stages that need text (training, evaluation) exit 2.",
    )
    seed: int = Field(0, description="Seed of the random initialisation.")


class AssembleModelSpec(Strict):
    """`{assemble: {...}}`: a model built from a pretrained language model and other parts; the
    `family` key chooses the builder (default `blip2`; :mod:`compressor.models.assembly`)."""

    assemble: assembly.parts_type()


def _model_spec_tag(value: Any) -> str:
    if isinstance(value, str):
        return "name"
    if (isinstance(value, dict) and "assemble" in value) or isinstance(value, AssembleModelSpec):
        return "assemble"  # a dict when validating, the model instance when serialising
    return "config"


ModelSpec = Annotated[
    Union[
        Annotated[str, Tag("name")],
        Annotated[ConfigModelSpec, Tag("config")],
        Annotated[AssembleModelSpec, Tag("assemble")],
    ],
    Discriminator(_model_spec_tag),
]

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class DataSource(Strict):
    """One section of the data (train, val, eval, test, calibration, or the single `source`). Relative paths
    (`annotations`, `images`, `path`) resolve against the working folder `compress` runs in, not the recipe's folder
    (as `--set` and the command line do); write absolute paths to run a recipe from anywhere."""

    annotations: str | None = Field(
        None,
        description="coco: captions JSON; karpathy: the split JSON (dataset_coco.json, dataset_rsicd.json); "
        "csv: the CSV file (`image_name,question[,answer]` with `|`-separated answers and an optional "
        "`question_id` column, or `image_name,caption`).",
    )
    images: str | None = Field(None, description="Folder the image file names are relative to.")
    path: str | None = Field(
        None,
        description="imagefolder: the folder holding images and metadata.jsonl; hf: a `save_to_disk` folder, a "
        "Parquet / Arrow / JSON-lines file (or glob, or a folder of them), or a Hub dataset id.",
    )
    split: str | None = Field(
        None,
        description="karpathy: which split of the file to read (`train` includes `restval`; `val`, `test`; `a+b` reads both); "
        "hf: the dataset's split (`train`, `validation` …; default: its only split).",
    )
    streaming: bool | None = Field(
        None, description="hf: stream the rows instead of downloading the whole dataset (large Hub datasets; "
        "reads in stream order, stopping after `limit`)."
    )
    revision: str | None = Field(None, description="hf: the Hub dataset's revision (branch, tag or commit).")
    limit: int | None = Field(
        None, ge=1, description="Use only the first N examples after sorting by image id (images for captioning, questions for VQA)."
    )
    size: int | None = Field(None, ge=1, description="synthetic: number of images to generate.")
    seed: int | None = Field(
        None, description="synthetic: generator seed (default per section: train 0, val 1, test 2, eval 3, calibration 4)."
    )
    image_size: int = Field(64, ge=16, description="synthetic: generated image side in pixels.")


class SplitSpec(Strict):
    """Fractions used to split a `source` that has no split of its own (seeded, by image)."""

    train: float = Field(0.8, ge=0, le=1, description="Fraction for training.")
    val: float = Field(0.1, ge=0, le=1, description="Fraction for validation (best-checkpoint selection).")
    test: float = Field(0.1, ge=0, le=1, description="Fraction for the final evaluation.")
    seed: int = Field(0, description="Shuffle seed.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1.0, got {total:g}")
        return self


class ColumnsSpec(Strict):
    """Which columns of a Hugging Face dataset hold the image and the texts (format `hf`)."""

    image: str = Field("image", description="The image: a `datasets.Image` column, image bytes, or a file path.")
    caption: str | None = Field(
        None, description="Captions: a string or a list of strings per row (repeated rows of one `id` add up); "
        "default: the first of `captions`, `caption`, `text` the dataset has."
    )
    question: str = Field("question", description="VQA: the question.")
    answer: str | None = Field(
        None, description="VQA: the answer, or a list of human answers (strings or `{answer: …}`); "
        "default: `answers` or `answer`; none: unlabelled."
    )
    id: str | None = Field(
        None, description="The image id (rows sharing it are one image); default: the image file's name, else the row number."
    )
    question_id: str | None = Field(None, description="VQA: the question id; default `question_id` when present, else `<id>-<row>`.")


DataFormat = Literal[format_names()]  # the registry's formats, in its order
SECTIONS = ("train", "val", "eval", "test", "calibration")


class DataSpec(Strict):
    """The data of the experiment, by section."""

    format: DataFormat = Field(
        description="The data format, one of the registered formats (see `data formats` below): "
        + ", ".join(f"`{name}`" for name in format_names()) + "."
    )
    task: Literal["caption", "vqa"] = Field("caption", description="Captioning or visual question answering.")
    train: DataSource | None = Field(None, description="Training data.")
    val: DataSource | None = Field(None, description="Validation data (evaluation during training).")
    eval: DataSource | None = Field(None, description="Data the `evaluate` stages score (default: test, then val).")
    test: DataSource | None = Field(None, description="Held-out data (`predict`; evaluation if no `eval`).")
    calibration: DataSource | None = Field(None, description="Batches for importance scores (default: train).")
    source: DataSource | None = Field(None, description="One file without splits, divided by `split`.")
    split: SplitSpec | None = Field(None, description="How to divide `source` into train/val/test.")
    columns: ColumnsSpec | None = Field(None, description="hf: the dataset columns holding the image, captions, questions, answers.")
    skip_invalid: bool = Field(
        False, description="Skip bad rows (missing/corrupt image, empty caption …) and count them, instead of exit 2; "
        "an image that fails to decode later, while a stage reads it, is skipped and counted too."
    )
    verify_images: Literal["auto", "decode"] = Field(
        "auto", description="How pre-flight checks images: `auto` decodes every image of a section of up to 1000 "
        "images and, above that, checks each file's header and end (a truncated JPEG or PNG is found; other damage "
        "inside a file only when a stage decodes it); `decode` decodes every image.",
    )
    num_workers: int | None = Field(
        None, ge=0, description="Loader worker processes decoding and preprocessing images for training, evaluation "
        "and prediction (same batches, same order as 0). Default: a quarter of the CPUs, at most 4 (0 below 4 CPUs).",
    )

    @model_validator(mode="after")
    def _sections(self) -> DataSpec:
        if self.source is not None and self.split is None:
            raise ValueError("`source` needs `split: {train: 0.8, val: 0.1, test: 0.1, seed: 0}`")
        if self.split is not None and self.source is None:
            raise ValueError("`split` divides `source`: set `source: {...}` or use train/val/test sections")
        if self.source is None and not any(getattr(self, s) is not None for s in SECTIONS):
            raise ValueError("give at least one section (train, val, eval, test) or `source` + `split`")
        return self


# --------------------------------------------------------------------------------------------
# Generation and training
# --------------------------------------------------------------------------------------------


class GenerationSpec(Strict):
    """Decoding settings, named as in transformers' GenerationConfig."""

    num_beams: int = Field(1, ge=1, description="Beam width (1 = greedy).")
    max_new_tokens: int = Field(20, ge=1, description="Maximum generated tokens per caption.")
    min_new_tokens: int = Field(0, ge=0, description="Minimum generated tokens per caption.")
    prompt: str | None = Field(None, description="Text prompt before generation (VQA: built from the question).")
    batch_size: int = Field(8, ge=1, description="Images per generate call.")
    length_penalty: float = Field(1.0, description="Beam-search length penalty.")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty (1.0 = off).")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")


class TrainSpec(Strict):
    """A training run (accelerate): length, optimiser, schedule, precision, evaluation."""

    epochs: float | None = Field(None, gt=0, description="Passes over the training data (default 1 when `steps` is unset).")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides `epochs`.")
    learning_rate: float = Field(1.0e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(8, ge=1, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warm-up as a fraction of all steps (if `warmup_steps` is 0).")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="transformers' get_scheduler name."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm (null = off).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision (GPU).")
    seed: int | None = Field(None, description="Seed (default: the recipe's `seed`).")
    eval_every: int | None = Field(None, ge=1, description="Evaluate on `val` every N optimizer steps.")
    select_best_by: str | None = Field(
        None, description="Keep the checkpoint with the best value of this metric on `val` (e.g. cider)."
    )
    eval_limit: int | None = Field(None, ge=1, description="Validation examples per in-training evaluation.")
    resume_from: str | None = Field(None, description="Adapter folder to continue training from.")
    # Checkpoints change no result (a resumed stage ends byte-identical): they are not part of the stage key.
    save_every: int | None = Field(
        None, ge=1, description="Save the training state every N optimizer steps (`compress apply --resume` continues from it).",
        json_schema_extra={"cache_key": False},
    )
    save_every_minutes: float | None = Field(
        30.0, gt=0, description="Also save it every N minutes of training (null = off).", json_schema_extra={"cache_key": False},
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Saved training states kept (the newest); deleted when the stage completes.",
        json_schema_extra={"cache_key": False},
    )
    log_every: int = Field(10, ge=1, description="Log the loss every N steps.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    data: Literal["train", "val", "eval", "test", "calibration"] = Field("train", description="Data section to train on.")

    @field_validator("select_best_by")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and v not in METRIC_KEYS:
            from compressor.errors import did_you_mean

            raise ValueError(f"unknown metric '{v}'.{did_you_mean(v, METRIC_KEYS)}")
        return v


class LoraSpec(Strict):
    """peft LoraConfig keys, passed unchanged (https://huggingface.co/docs/peft)."""

    r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str | None = Field(
        None, description="peft target_modules (names, a regex string, or 'all-linear'), added to what `parts` expands to."
    )
    exclude_modules: list[str] | str | None = Field(None, description="peft exclude_modules.")
    modules_to_save: list[str] | None = Field(None, description="Modules trained fully and saved with the adapter.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling lora_alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init_lora_weights: bool | str = Field(True, description="peft init_lora_weights.")
    layers_to_transform: list[int] | int | None = Field(None, description="peft layers_to_transform.")
    rank_pattern: dict[str, int] | None = Field(None, description="peft rank_pattern.")
    alpha_pattern: dict[str, float] | None = Field(None, description="peft alpha_pattern.")


# --------------------------------------------------------------------------------------------
# What stages share (each stage's own config lives in its module, compressor/stages/<type>.py)
# --------------------------------------------------------------------------------------------


class StageBase(Strict):
    """Base of every stage config: the optional label."""

    label: str | None = Field(
        None, description="A name for this stage's output model (evaluate labels also name metrics); "
        "`heal.distill.teacher` and the gate refer to labels."
    )


class CalibrationSpec(Strict):
    """Calibration batches for importance scores."""

    batches: int = Field(4, ge=1, description="Number of batches.")
    batch_size: int = Field(8, ge=1, description="Examples per batch.")
    data: Literal["train", "val", "eval", "test", "calibration"] = Field(
        "calibration", description="Data section (calibration falls back to train)."
    )


class LatencySpec(Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], description="Batch sizes to time.")
    warmup: int = Field(1, ge=0, description="Untimed warm-up calls per batch size.")
    repeats: int = Field(5, ge=1, description="Timed calls per batch size.")


class CharacteristicsSpec(Strict):
    """Model characteristics measured by `evaluate`."""

    latency: LatencySpec | None = Field(default_factory=LatencySpec, description="Latency per caption (null = skip).")
    gflops: bool = Field(True, description="GFLOPs of image-to-caption (torch FlopCounterMode).")
    gflops_new_tokens: int = Field(20, ge=1, description="Generated tokens the GFLOPs figure assumes.")


class MetricModelSpec(Strict):
    model: str | None = Field(None, description="Local model folder (nothing is downloaded).")
    num_layers: int | None = Field(None, ge=1, description="bert-score: layer whose embeddings are compared.")


# --------------------------------------------------------------------------------------------
# Gate, push, recipe
# --------------------------------------------------------------------------------------------


class GateRule(Strict):
    """Rules for one metric; every rule given must hold. Missing or NaN values fail."""

    min: float | None = Field(None, description="Candidate value at least this.")
    max: float | None = Field(None, description="Candidate value at most this.")
    max_drop: float | None = Field(None, ge=0, description="Baseline - candidate at most this (points, 0-100 scale).")
    min_recovery: float | None = Field(None, gt=0, description="Candidate / baseline at least this.")
    max_ratio: float | None = Field(None, gt=0, description="Candidate / baseline at most this (latency, size, perplexity).")

    @model_validator(mode="after")
    def _some(self) -> GateRule:
        if all(getattr(self, k) is None for k in ("min", "max", "max_drop", "min_recovery", "max_ratio")):
            raise ValueError("give at least one of min, max, max_drop, min_recovery, max_ratio")
        return self

    def needs_baseline(self) -> bool:
        return any(getattr(self, k) is not None for k in ("max_drop", "min_recovery", "max_ratio"))


class GateSpec(Strict):
    """Regression gate checked after the last stage; a failure writes the report, skips the push, exits 1."""

    candidate: str = Field(description="Evaluate label of the compressed model.")
    baseline: str | None = Field(None, description="Evaluate label to compare with (needed by relative rules).")
    rules: dict[str, GateRule] = Field(description="Metric or characteristic key → rules.")

    @field_validator("rules")
    @classmethod
    def _keys(cls, v: dict[str, GateRule]) -> dict[str, GateRule]:
        _check_names(list(v), GATE_KEYS, "gate key")
        from eval.gates import rule_problems

        problems = [p for k, r in v.items() for kind, t in r.model_dump(exclude_none=True).items() for p in rule_problems(k, kind, t)]
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _baseline(self) -> GateSpec:
        relative = [k for k, r in self.rules.items() if r.needs_baseline()]
        if relative and self.baseline is None:
            raise ValueError(f"rules on {', '.join(relative)} compare with a baseline: set `baseline: <label>`")
        return self


class PushSpec(Strict):
    """Push to the Hugging Face Hub (huggingface_hub). The token comes from HF_TOKEN or the login."""

    repo_id: str = Field(description="Target repository, `user/name`.")
    private: bool = Field(True, description="Create the repository private.")
    what: Literal["model", "adapter"] = Field("model", description="Push the final model, or the last LoRA adapter.")
    revision: str | None = Field(None, description="Branch to commit to (default main).")
    commit_message: str | None = Field(None, description="Default: the recipe name and hash.")
    dry_run: bool = Field(False, description="Write the folder that would be uploaded, upload nothing.")
    license: str | None = Field(None, description="Model-card licence (default: the base model's, if known).")
    datasets: list[str] = Field(default_factory=list, description="Model-card datasets.")

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", v):
            raise ValueError(f"expected `user/name`, got '{v}'")
        return v


class ReportSpec(Strict):
    plots: bool = Field(True, description="Draw PNG plots beside report.md.")


class SearchBudget(Strict):
    """Successive halving of `compress search`: a short rung first, the full run only for promising trials."""

    reduction_factor: int = Field(
        3, ge=2, description="Optuna SuccessiveHalvingPruner's η: about 1 in η trials of the short rung go on to the full run."
    )
    short_fraction: float = Field(
        0.25, gt=0, le=1, description="Training steps (or epochs) of the short rung's training stages after the first "
        "searched stage, as a fraction of the recipe's."
    )
    short_eval_limit: int | None = Field(
        16, ge=1, description="Examples every evaluate stage scores in the short rung (null: all)."
    )
    short_torch: bool = Field(
        True, description="Short rung: evaluate the PyTorch model (`backend: torch`) and skip export stages."
    )


class SearchSpec(Strict):
    """`compress search`: an Optuna multi-objective search over the recipe's own stage fields."""

    space: dict[str, list[Any]] = Field(
        description="Searched key → its values. A key names a stage field by its `--set` path (`stages.3.language_model.drop_top`) "
        "or by the stage's type or label instead of `stages.N` (`remove_layers.language_model.drop_top`, when one "
        "stage has that type)."
    )
    objectives: list[str] | None = Field(
        None, description="Metric or characteristic keys of the gate's candidate evaluation, quality first, then "
        "cost (default: the gate's first metric rule, then `params_total`)."
    )
    trials: int = Field(20, ge=1, description="Trials of the study (`--trials` overrides).")
    sampler: Literal["auto", "tpe", "nsga2", "random", "grid"] = Field(
        "auto", description="Optuna sampler; auto: grid when the whole space fits in `trials`, else TPE "
        "(multi-objective, with the gate's rules as constraints)."
    )
    budget: SearchBudget = Field(default_factory=SearchBudget, description="Successive halving.")

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("the search space is empty: name at least one stage field and its values")
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"no values for {', '.join(empty)}")
        for k, vals in v.items():
            if len({repr(x) for x in vals}) != len(vals):
                raise ValueError(f"{k}: a value is listed twice")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 1:
            raise ValueError("give at least one objective")
        if len(set(v)) != len(v):
            raise ValueError("an objective is listed twice")
        _check_names(v, GATE_KEYS, "objective (metric or characteristic key)")
        return v


def search_key_stage(recipe, key: str) -> tuple[int, tuple[str, ...]] | str:
    """The stage a ``search.space`` key addresses and the field path below it.

    Args:
        recipe: a validated recipe.
        key: ``stages.N.a.b``, ``<type>.a.b`` (one stage of that type) or ``<label>.a.b``.

    Returns:
        ``(stage index, field path)``, or a message saying why the key names no stage.
    """
    parts = key.split(".")
    if len(parts) < 2 or any(p == "" for p in parts):
        return "expected <stage>.<field>, e.g. remove_layers.language_model.drop_top or stages.3.train.steps"
    n = len(recipe.stages)
    if parts[0] == "stages":
        if len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) >= n:
            return f"stages has {n} items (0..{n - 1}); expected stages.N.<field>"
        return int(parts[1]), tuple(parts[2:])
    by_label = [i for i, st in enumerate(recipe.stages) if st.label == parts[0]]
    if by_label:
        return by_label[0], tuple(parts[1:])
    by_type = [i for i, st in enumerate(recipe.stages) if st.type == parts[0]]
    if len(by_type) == 1:
        return by_type[0], tuple(parts[1:])
    if len(by_type) > 1:
        return (f"{len(by_type)} stages are {parts[0]} (stages {', '.join(map(str, by_type))}); "
                f"write stages.N.{'.'.join(parts[1:])} or give the stage a label")
    from compressor.errors import did_you_mean

    names = [st.type for st in recipe.stages] + [st.label for st in recipe.stages if st.label]
    return f"no stage of this recipe has the type or label '{parts[0]}'.{did_you_mean(parts[0], names)}"


@functools.cache
def recipe_model() -> type[BaseModel]:
    """The ``Recipe`` model: the fields below, with ``stages`` the discriminated union of every
    registered stage's config (:mod:`compressor.stages`). Rebuilt when a stage is registered."""
    from compressor.stages import declarations

    configs = tuple(d.config for d in declarations())
    Stage = Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007 - a runtime tuple of classes

    class Recipe(Strict):
        """A whole experiment: model, data, decoding, stages, gate and push."""

        name: str = Field(description="Run name; the run directory is runs/<name> unless --out is given.")
        model: ModelSpec = Field(
            description="A Hub id, a local save_pretrained folder, a preset (tiny-blip2-opt …), "
            "{config: FILE, init: random} or {assemble: {language_model: …, vision: …, …}}."
        )
        dtype: Dtype = Field("float32", description="Weights dtype while working.")
        device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
        seed: int = Field(0, description="Global seed.")
        data: DataSpec | None = Field(None, description="Data by section (needed by training and evaluation stages).")
        generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Decoding settings.")
        stages: list[Stage] = Field(min_length=1, description="Stages in order.")
        gate: GateSpec | None = Field(None, description="Regression gate after the last stage.")
        push: PushSpec | None = Field(None, description="Hub push after a passing gate.")
        report: ReportSpec = Field(default_factory=ReportSpec, description="Report options.")
        search: SearchSpec | None = Field(None, description="`compress search`: the space, objectives and budget.")

        @field_validator("name")
        @classmethod
        def _name(cls, v: str) -> str:
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", v):
                raise ValueError(f"use letters, digits, '.', '_' or '-' (it names a folder), got '{v}'")
            return v

    return Recipe


def __getattr__(name: str):
    """``Recipe`` (the model of :func:`recipe_model`) and ``STAGE_TYPES``, built from the registry on use."""
    if name == "Recipe":
        return recipe_model()
    if name == "STAGE_TYPES":
        from compressor.stages import stage_types

        return stage_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cross_check(recipe) -> list[tuple[tuple, str]]:
    """Checks across stages that a single field cannot make: labels, data, merge order, gate labels.

    Reads each stage's :class:`~compressor.stages.Declaration` (the data it reads, the labels it
    refers to, the adapters it writes or merges), never its type.

    Args:
        recipe: a recipe that passed field validation.

    Returns:
        ``(field path, message)`` pairs, empty when the recipe is consistent. The loader turns the
        paths into YAML line numbers.
    """
    from compressor.stages import declaration

    problems: list[tuple[tuple, str]] = []
    labels: dict[str, int] = {}
    eval_labels: set[str] = set()
    adapters_pending = False
    for i, st in enumerate(recipe.stages):
        decl = declaration(st.type)
        if st.label is not None:
            if st.label in labels:
                problems.append((("stages", i, "label"), f"'{st.label}' is already the label of stage {labels[st.label]}"))
            labels[st.label] = i
        if decl.data(st) and recipe.data is None:
            article = "an" if st.type[:1] in "aeiou" else "a"
            problems.append((("stages", i, "type"), f"{article} {st.type} stage needs `data:` at the top level"))
        if decl.output == "evaluation":
            eval_labels.add(st.label)
        for label, field_path in decl.references(st).values():
            if label not in labels:
                problems.append((("stages", i, *field_path), f"no earlier stage is labelled '{label}'{_dym(label, labels)}"))
        effect = decl.adapter(st)
        if effect == "merges":
            if not adapters_pending:
                problems.append((("stages", i, "type"), f"{st.type} has no LoRA adapter before it to merge"))
            adapters_pending = False
            continue
        if adapters_pending and decl.needs_merged:
            problems.append((("stages", i, "type"), f"merge the LoRA adapter before {st.type}: add a merge_adapters stage"))
            adapters_pending = False
        if effect == "writes":
            adapters_pending = True
    if recipe.search is not None:
        for key in recipe.search.space:
            where = search_key_stage(recipe, key)
            if isinstance(where, str):
                problems.append((("search", "space", key), where))
    if recipe.gate is not None:
        for role in ("candidate", "baseline"):
            lab = getattr(recipe.gate, role)
            if lab is not None and lab not in eval_labels:
                problems.append((("gate", role), f"no evaluate stage is labelled '{lab}'{_dym(lab, eval_labels)}"))
    return problems


# --------------------------------------------------------------------------------------------


def _check_names(values: list[str], valid: tuple[str, ...], what: str) -> list[str]:
    from compressor.errors import did_you_mean

    bad = [v for v in values if v not in valid]
    if bad:
        raise ValueError(
            "; ".join(f"unknown {what} '{b}'.{did_you_mean(b, valid)}" for b in bad)
            + f" Valid: {', '.join(valid)}"
        )
    return values


def _dym(name: str, choices) -> str:
    from compressor.errors import did_you_mean

    return did_you_mean(name, list(choices))
