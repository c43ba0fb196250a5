"""The recipe schema: one YAML file is the whole experiment.

Every key of DESIGN.md ("The recipe") and of the open issues is declared here, with its type,
default and meaning (``Field(description=...)``); the README's recipe reference is generated
from these models (``python -m compressor.recipe.docs``). Unknown keys are errors
(``extra="forbid"``). Checks that need the model's config (layer indices in range, the Q-Former
cross-attention pattern) live in ``compressor.pipeline.preflight`` and run before any weight is
loaded.

Follows the pass-config style of Olive and llm-compressor: one pydantic model per stage, a
discriminated union on ``type``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from eval.metrics import characteristic_keys, default_metrics, metric_keys

# --------------------------------------------------------------------------------------------
# Shared vocabularies (DESIGN.md "Conventions every part shares")
# --------------------------------------------------------------------------------------------

#: Model part names (per-part characteristics, LoRA targets, removal). Defined before the metric
#: keys: ``eval.metrics.part_names`` reads them while this module is being imported.
PARTS = ("vision", "qformer", "projection", "language_model")
#: Metric and characteristic keys, from the one metric table (``eval.metrics``).
CAPTION_METRICS = default_metrics("caption")
METRIC_KEYS = metric_keys()
CHARACTERISTIC_KEYS = characteristic_keys()
GATE_KEYS = METRIC_KEYS + CHARACTERISTIC_KEYS
DTYPES = ("float32", "float16", "bfloat16")

#: Part-scoped LoRA target names (``parts:`` of lora_finetune / heal); each expands to an
#: anchored module pattern per family (``compressor.families``).
LORA_PARTS = (
    "vision.attention",
    "vision.mlp",
    "qformer.self_attention",
    "qformer.cross_attention",
    "qformer.mlp",
    "projection",
    "language_model.attention",
    "language_model.mlp",
    "language_model.encoder.attention",
    "language_model.encoder.mlp",
    "language_model.decoder.attention",
    "language_model.decoder.cross_attention",
    "language_model.decoder.mlp",
)
#: Parts that ``trainable: parts`` / ``finetune.parts`` may name.
TRAINABLE_PARTS = (*PARTS, "language_model.encoder", "language_model.decoder", "query_tokens")

Dtype = Literal["float32", "float16", "bfloat16"]


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ConfigModelSpec(Strict):
    """A model built from a config file with fresh weights (real-size dry runs, benchmarks)."""

    config: str = Field(
        description="Path to a config.json, or a Hub id whose architecture is known offline "
        "(Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl, Salesforce/blip-image-captioning-base)."
    )
    init: Literal["random"] = Field("random", description="How the weights start: `random` (seeded).")
    processor: str | None = Field(
        None,
        description="Folder or preset whose processor (tokenizer + image processor) to use; "
        "without one, stages that need text (training, evaluation) exit 2.",
    )
    seed: int = Field(0, description="Seed of the random initialisation.")


class AssembleParts(Strict):
    """The parts of a BLIP-2 assembled from pretrained pieces (real-material.md)."""

    language_model: str = Field(
        description="A causal-LM folder (save_pretrained) or a GGUF file; becomes `language_model`."
    )
    qformer_init: str | None = Field(
        None, description="A BERT folder whose layers initialise the Q-Former (as in BLIP-2); none: random."
    )
    vision: str = Field(
        "vit-small",
        description="A vision preset (`vit-tiny`, `vit-small`) initialised so that features differ per "
        "image, or a folder holding a Blip2VisionModel / BlipVisionModel.",
    )
    num_query_tokens: int = Field(32, ge=1, description="Number of learned query tokens.")
    qformer_num_hidden_layers: int | None = Field(
        None, ge=1, description="Q-Former depth; default: the BERT's depth, or 4 without `qformer_init`."
    )
    cross_attention_frequency: int = Field(2, ge=1, description="A Q-Former layer i has cross-attention when i % this == 0.")
    image_size: int = Field(224, ge=16, description="Input image side in pixels.")
    seed: int = Field(0, description="Seed of every randomly initialised part.")


class AssembleModelSpec(Strict):
    """`{assemble: {...}}`: a BLIP-2 built from a pretrained language model and other parts."""

    assemble: AssembleParts


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
    """One section of the data (train, val, eval, test, calibration, or the single `source`)."""

    annotations: str | None = Field(
        None,
        description="coco: captions JSON; karpathy: the split JSON (dataset_coco.json, dataset_rsicd.json); "
        "csv: the CSV file (`image_name,question[,answer]` with `|`-separated answers and an optional "
        "`question_id` column, or `image_name,caption`).",
    )
    images: str | None = Field(None, description="Folder the image file names are relative to.")
    path: str | None = Field(None, description="imagefolder: the folder holding images and metadata.jsonl.")
    split: str | None = Field(
        None, description="karpathy: which split of the file to read (`train` includes `restval`; `val`, `test`; `a+b` reads both)."
    )
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


DataFormat = Literal["coco", "karpathy", "csv", "imagefolder", "synthetic"]
SECTIONS = ("train", "val", "eval", "test", "calibration")


class DataSpec(Strict):
    """The data of the experiment, by section."""

    format: DataFormat = Field(
        description="coco (captions JSON + image folder), karpathy (split JSON), csv, imagefolder "
        "(Hugging Face layout with metadata.jsonl), synthetic (built-in coloured shapes)."
    )
    task: Literal["caption", "vqa"] = Field("caption", description="Captioning or visual question answering.")
    train: DataSource | None = Field(None, description="Training data.")
    val: DataSource | None = Field(None, description="Validation data (evaluation during training).")
    eval: DataSource | None = Field(None, description="Data the `evaluate` stages score (default: test, then val).")
    test: DataSource | None = Field(None, description="Held-out data (`predict`; evaluation if no `eval`).")
    calibration: DataSource | None = Field(None, description="Batches for importance scores (default: train).")
    source: DataSource | None = Field(None, description="One file without splits, divided by `split`.")
    split: SplitSpec | None = Field(None, description="How to divide `source` into train/val/test.")
    skip_invalid: bool = Field(
        False, description="Skip bad rows (missing/corrupt image, empty caption …) and count them, instead of exit 2."
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


class QuantizationSpec(Strict):
    """A k-bit base for QLoRA (bitsandbytes; CUDA only)."""

    bits: Literal[4, 8] = Field(description="Load the base in 4 or 8 bits.")
    compute_dtype: Dtype = Field("bfloat16", description="Compute dtype of 4-bit layers.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit quantisation type.")


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class StageBase(Strict):
    label: str | None = Field(
        None, description="A name for this stage's output model (evaluate labels also name metrics); "
        "`heal.distill.teacher` and the gate refer to labels."
    )


class LoraFinetuneStage(StageBase):
    """LoRA finetune with peft on accelerate; writes the adapter (merged by `merge_adapters`)."""

    type: Literal["lora_finetune"]
    parts: list[str] = Field(
        default_factory=list,
        description=f"Part-scoped targets, expanded to anchored module patterns: {', '.join(LORA_PARTS)}.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="peft LoraConfig keys.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training settings.")
    quantization: QuantizationSpec | None = Field(None, description="QLoRA: a 4/8-bit base (CUDA only).")

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: list[str]) -> list[str]:
        return _check_names(v, LORA_PARTS, "LoRA part")


class FinetuneStage(StageBase):
    """Full (or per-part) finetune of the model's own weights."""

    type: Literal["finetune"]
    parts: list[str] | None = Field(None, description=f"Parts to train (default all): {', '.join(TRAINABLE_PARTS)}.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Training settings.")

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_names(v, TRAINABLE_PARTS, "part")


class MergeAdaptersStage(StageBase):
    """peft `merge_and_unload`, verified: touched weights change, outputs equal the adapter model's."""

    type: Literal["merge_adapters"]
    safe_merge: bool = Field(True, description="peft safe_merge: check for NaNs before merging.")
    tolerance: float = Field(
        1e-5, gt=0, description="Max abs logit difference merged vs adapter model (float64 check up to 300M parameters)."
    )


class LayerSelection(Strict):
    """Which layers of one stack to remove: exactly one of drop_top, layers, count."""

    drop_top: int | None = Field(None, ge=1, description="Remove the top k layers.")
    layers: list[int] | None = Field(None, description="Remove these layer indices (0-based).")
    count: int | None = Field(None, ge=1, description="Remove k layers chosen by `select` on calibration data.")
    select: Literal["block_influence", "angular_distance"] | None = Field(
        None,
        description="block_influence (ShortGPT, Men et al. 2024: 1 - cos(in, out), lowest removed) or "
        "angular_distance (Gromov et al. 2024: the contiguous block of `count` layers with the smallest angle).",
    )

    @model_validator(mode="after")
    def _one(self) -> LayerSelection:
        given = [k for k in ("drop_top", "layers", "count") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of drop_top, layers, count (got {', '.join(given) or 'none'})")
        if self.count is not None and self.select is None:
            raise ValueError("`count` needs `select: block_influence` or `select: angular_distance`")
        if self.count is None and self.select is not None:
            raise ValueError("`select` goes with `count`")
        return self


class EncoderDecoderSelection(Strict):
    """T5 language models: the encoder and decoder stacks, counted separately."""

    encoder: LayerSelection | None = Field(None, description="Encoder blocks to remove.")
    decoder: LayerSelection | None = Field(None, description="Decoder blocks to remove.")


def _lm_selection_tag(value: Any) -> str:
    if isinstance(value, dict) and ({"encoder", "decoder"} & set(value)):
        return "encoder_decoder"
    return "stack"


LanguageModelSelection = Annotated[
    Union[Annotated[LayerSelection, Tag("stack")], Annotated[EncoderDecoderSelection, Tag("encoder_decoder")]],
    Discriminator(_lm_selection_tag),
]


class CalibrationSpec(Strict):
    """Calibration batches for importance scores."""

    batches: int = Field(4, ge=1, description="Number of batches.")
    batch_size: int = Field(8, ge=1, description="Examples per batch.")
    data: Literal["train", "val", "eval", "test", "calibration"] = Field(
        "calibration", description="Data section (calibration falls back to train)."
    )


class RemoveLayersStage(StageBase):
    """Remove whole layers (depth pruning), fixing layer_idx and the config's layer counts."""

    type: Literal["remove_layers"]
    qformer: LayerSelection | None = Field(None, description="Q-Former layers; must keep the cross-attention pattern.")
    language_model: LanguageModelSelection | None = Field(
        None, description="Language-model layers; T5: {encoder: …, decoder: …}."
    )
    vision: LayerSelection | None = Field(None, description="Vision-encoder layers.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="For `count` + `select`.")

    @model_validator(mode="after")
    def _some(self) -> RemoveLayersStage:
        if self.qformer is None and self.language_model is None and self.vision is None:
            raise ValueError("name at least one part: qformer, language_model or vision")
        return self


class WidthRatio(Strict):
    ratio: float = Field(gt=0, lt=1, description="Fraction to remove.")


class PruneWidthStage(StageBase):
    """Remove attention heads and MLP channels of the language model with torch-pruning."""

    type: Literal["prune_width"]
    part: Literal["language_model"] = Field("language_model", description="The part to prune.")
    heads: WidthRatio | None = Field(
        None, description="Share of attention heads removed per layer; grouped KV heads go in whole groups (not T5)."
    )
    mlp: WidthRatio | None = Field(None, description="Share of MLP hidden units removed per layer.")
    importance: Literal["magnitude", "taylor"] = Field("magnitude", description="torch-pruning importance criterion.")
    ignored_layers: list[str] = Field(
        default_factory=list,
        description="Glob patterns over module names (e.g. `*.layers.0.*`, `*.fc1`): matching attentions / MLPs stay untouched.",
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Batches for `taylor`.")

    @model_validator(mode="after")
    def _some(self) -> PruneWidthStage:
        if self.heads is None and self.mlp is None:
            raise ValueError("give `heads: {ratio: …}` and/or `mlp: {ratio: …}`")
        return self


class DistillSpec(Strict):
    """Knowledge distillation from an earlier stage's model (Hinton et al. 2015)."""

    teacher: str = Field(description="Label of an earlier stage whose model is the teacher.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL term.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(teacher || student) * T^2.")
    ce_weight: float = Field(0.5, ge=0, description="Weight of the caption cross-entropy.")


class HealStage(StageBase):
    """Brief retraining after removal: LoRA, full or per-part; cross-entropy or distillation."""

    type: Literal["heal"]
    trainable: Literal["lora", "full", "parts"] = Field("lora", description="What trains.")
    parts: list[str] = Field(
        default_factory=list,
        description="trainable=lora: LoRA parts (as lora_finetune); trainable=parts: parts to train.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="peft LoraConfig keys (trainable=lora).")
    loss: Literal["ce", "distill"] = Field("ce", description="Cross-entropy on captions, or distillation.")
    distill: DistillSpec | None = Field(None, description="Teacher and weights (loss=distill).")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(steps=100), description="Training settings.")

    @model_validator(mode="after")
    def _consistent(self) -> HealStage:
        if self.loss == "distill" and self.distill is None:
            raise ValueError("loss: distill needs `distill: {teacher: <label>}`")
        if self.loss == "ce" and self.distill is not None:
            raise ValueError("`distill` is set but loss is ce: set `loss: distill` or remove `distill`")
        if self.trainable == "lora":
            _check_names(self.parts, LORA_PARTS, "LoRA part")
        elif self.trainable == "parts":
            if not self.parts:
                raise ValueError("trainable: parts needs `parts: [...]`")
            _check_names(self.parts, TRAINABLE_PARTS, "part")
        return self


class OnnxSpec(Strict):
    """ONNX export settings (split graphs: image_encoder, embed_tokens, decoder with past)."""

    opset: int | None = Field(None, ge=14, description="ONNX opset (default: 23 with the dynamo exporter, whose fused Attention and RMSNormalization need onnxruntime >= 1.23 on CPU, >= 1.26 on CUDA (grouped KV heads with a KV cache); the legacy exporter's own otherwise).")
    exporter: Literal["dynamo", "legacy"] = Field("dynamo", description="torch.onnx exporter.")
    optimize: bool = Field(True, description="Also save an ORT_ENABLE_ALL-optimised copy.")
    quantize: Literal["int8"] | None = Field(None, description="Dynamic int8 quantisation of the decoder.")
    tolerance: float | None = Field(None, gt=0, description="Max abs difference ORT vs PyTorch (default 1e-4 fp32).")
    external_data: Literal["auto", "always", "never"] = Field("auto", description="External weights (auto: above 2 GB).")
    twin_check: bool = Field(
        True, description="bf16 exports (not runnable by ORT on CPU): check numbers on an fp32 twin (needs an fp32 copy in memory)."
    )
    isolate_graphs: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Export each graph in a fresh subprocess that memory-maps the model, so peak memory follows the "
        "largest graph, not the model (auto: checkpoint weights above 1 GB).",
    )


class ExportStage(StageBase):
    """Write the model as safetensors and/or ONNX, verified after writing."""

    type: Literal["export"]
    formats: list[Literal["safetensors", "onnx"]] = Field(
        default_factory=lambda: ["safetensors"], description="What to write."
    )
    dtype: Dtype | None = Field(None, description="Weights dtype of the export (default: the recipe's).")
    max_shard_size: str = Field("5GB", description="safetensors shard size, e.g. 500MB, 5GB.")
    onnx: OnnxSpec = Field(default_factory=OnnxSpec, description="ONNX settings.")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)", v.strip(), re.IGNORECASE):
            raise ValueError(f"expected a size such as 500MB or 5GB, got '{v}'")
        return v


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


class EvaluateStage(StageBase):
    """Score the current model (or its ONNX export) with the same harness for every label."""

    type: Literal["evaluate"]
    label: str = Field(description="Name of this evaluation (the gate's candidate / baseline).")
    data: Literal["train", "val", "eval", "test", "calibration"] = Field("eval", description="Data section.")
    limit: int | None = Field(None, ge=1, description="Score the first N examples.")
    metrics: list[str] | None = Field(
        None, description="Metric keys (default: BLEU-1..4, METEOR, ROUGE-L, CIDEr for captions; vqa_accuracy for VQA)."
    )
    backend: Literal["torch", "onnx"] = Field("torch", description="Score the PyTorch model or the latest ONNX export.")
    characteristics: CharacteristicsSpec = Field(default_factory=CharacteristicsSpec, description="Params, GFLOPs, latency.")
    bertscore: MetricModelSpec | None = Field(None, description="bert-score model (needed for bertscore_f1).")
    clipscore: MetricModelSpec | None = Field(None, description="CLIP model (needed for clipscore).")
    teacher: str | None = Field(None, description="Label whose captions are references for `teacher_cider`.")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_names(v, METRIC_KEYS, "metric")


class PredictStage(StageBase):
    """Write predictions for unlabelled data: a COCO results list, or an answers CSV for VQA."""

    type: Literal["predict"]
    data: Literal["train", "val", "eval", "test", "calibration"] = Field("test", description="Data section.")
    limit: int | None = Field(None, ge=1, description="Predict for the first N examples.")
    backend: Literal["torch", "onnx"] = Field("torch", description="PyTorch model or the latest ONNX export.")
    out: str | None = Field(None, description="File name (default predictions.json, or answers.csv for VQA).")


Stage = Annotated[
    Union[
        LoraFinetuneStage,
        FinetuneStage,
        MergeAdaptersStage,
        RemoveLayersStage,
        PruneWidthStage,
        HealStage,
        ExportStage,
        EvaluateStage,
        PredictStage,
    ],
    Field(discriminator="type"),
]
STAGE_TYPES = (
    "lora_finetune",
    "finetune",
    "merge_adapters",
    "remove_layers",
    "prune_width",
    "heal",
    "export",
    "evaluate",
    "predict",
)

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


class Recipe(Strict):
    """A whole experiment: model, data, decoding, stages, gate and push."""

    name: str = Field(description="Run name; the run directory is runs/<name> unless --out is given.")
    model: ModelSpec = Field(
        description="A Hub id, a local save_pretrained folder, a preset (tiny-blip2-opt …), "
        "{config: FILE, init: random} or {assemble: {language_model: …, qformer_init: …, vision: …}}."
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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", v):
            raise ValueError(f"use letters, digits, '.', '_' or '-' (it names a folder), got '{v}'")
        return v


def cross_check(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Checks across stages that a single field cannot make: labels, data, merge order, gate labels.

    Args:
        recipe: a recipe that passed field validation.

    Returns:
        ``(field path, message)`` pairs, empty when the recipe is consistent. The loader turns the
        paths into YAML line numbers.
    """
    problems: list[tuple[tuple, str]] = []
    labels: dict[str, int] = {}
    eval_labels: set[str] = set()
    adapters_pending = False
    needs_data = {"lora_finetune", "finetune", "heal", "evaluate", "predict", "prune_width"}
    trains_weights = {"remove_layers", "prune_width", "lora_finetune", "finetune", "heal", "export"}
    for i, st in enumerate(recipe.stages):
        if st.label is not None:
            if st.label in labels:
                problems.append((("stages", i, "label"), f"'{st.label}' is already the label of stage {labels[st.label]}"))
            labels[st.label] = i
        if st.type in needs_data and recipe.data is None:
            if not (st.type == "prune_width" and st.importance == "magnitude"):
                problems.append((("stages", i, "type"), f"a {st.type} stage needs `data:` at the top level"))
        if st.type == "evaluate":
            eval_labels.add(st.label)
            if st.teacher is not None and st.teacher not in labels:
                problems.append((("stages", i, "teacher"), f"no earlier stage is labelled '{st.teacher}'{_dym(st.teacher, labels)}"))
        if st.type == "heal" and st.distill is not None and st.distill.teacher not in labels:
            problems.append(
                (("stages", i, "distill", "teacher"),
                 f"no earlier stage is labelled '{st.distill.teacher}'{_dym(st.distill.teacher, labels)}")
            )
        if st.type == "merge_adapters":
            if not adapters_pending:
                problems.append((("stages", i, "type"), "merge_adapters has no LoRA adapter before it to merge"))
            adapters_pending = False
            continue
        if adapters_pending and st.type in trains_weights:
            problems.append((("stages", i, "type"), f"merge the LoRA adapter before {st.type}: add a merge_adapters stage"))
            adapters_pending = False
        if st.type == "lora_finetune" or (st.type == "heal" and st.trainable == "lora"):
            adapters_pending = True
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
