"""``merge_adapters``: peft ``merge_and_unload``, verified.

Checks (DESIGN.md "Model surgery facts"): the adapter is not a no-op (an untrained LoRA has
``lora_B == 0``, which would merge to the base unchanged); after merging, the weights where
adapters applied differ from the base; and the merged model's logits equal the adapter model's
within ``tolerance`` on a fixed probe batch
(computed in float64 for models up to 300M parameters, so only the merge itself is compared). Merging into a 4/8-bit base is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from compressor.errors import UserInputError, VerificationError
from compressor.families import family_for_model
from compressor.models.folders import has_adapter, load_working_model, model_dir, save_model
from compressor.recipe.schema import StageBase
from compressor.stages import Declaration, StageCard

log = logging.getLogger(__name__)

ROWS = 4  # rows of each adapted weight remembered to show the merge changed it
FLOAT64_CHECK_MAX_PARAMS = 300_000_000


class MergeAdaptersStage(StageBase):
    """peft `merge_and_unload`, verified: touched weights change, outputs equal the adapter model's."""

    type: Literal["merge_adapters"]
    safe_merge: bool = Field(True, description="peft safe_merge: check for NaNs before merging.")
    tolerance: float = Field(
        1e-5, gt=0, description="Max abs logit difference merged vs adapter model (float64 check up to 300M parameters)."
    )


def probe_batch(model, processor, n: int = 3, seed: int = 0) -> dict:
    """A fixed batch (seeded noise images + short texts) to compare logits before and after a change."""
    import numpy as np
    from PIL import Image

    from compressor.models.batches import training_batch

    family = family_for_model(model)
    rng = np.random.default_rng(seed)
    size = 64
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    texts = ["a red circle on the left", "two people riding horses", "a bowl of fruit on a table"][:n]
    batch = training_batch(family, processor, images, texts, [""] * n)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def logits_of(model, batch):
    import torch

    with torch.inference_mode():
        return model(**batch).logits.float()


QUANTIZED_MESSAGE = (
    "merge_adapters: the base model is {what}; merging LoRA into quantised weights rounds the update away. "
    "Merge into an fp16/bf16 copy of the base (the full-precision model the adapter was trained on), then re-quantise "
    "the merged model"
)


def check_not_quantized_config(model_folder: Path) -> None:
    """Refuse a base saved quantised (``quantization_config`` in its config.json), before loading weights.

    Raises:
        UserInputError: the folder's config declares a quantisation method (exit 2).
    """
    import json

    cfg_file = Path(model_folder) / "config.json"
    try:
        q = json.loads(cfg_file.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return
    if q:
        method = q.get("quant_method", "quantised") if isinstance(q, dict) else "quantised"
        bits = "4-bit" if isinstance(q, dict) and q.get("load_in_4bit") else "8-bit" if isinstance(q, dict) and q.get("load_in_8bit") else ""
        raise UserInputError(QUANTIZED_MESSAGE.format(what=f"saved {bits} {method}-quantised ({cfg_file})".replace("  ", " ")))


def check_not_quantized(base) -> None:
    """Refuse a loaded 4/8-bit base (bitsandbytes, transformers' ``hf_quantizer``).

    Raises:
        UserInputError: the model is quantised (exit 2).
    """
    if getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None or any(
        type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in base.modules()
    ):
        raise UserInputError(QUANTIZED_MESSAGE.format(what="loaded in 4/8 bits"))


def run(cfg, ctx, input_dir: Path, out_dir: Path) -> dict:
    """Merge ``input_dir/adapter`` into the model and verify; writes ``model/``.

    Raises:
        UserInputError: no adapter, a never-trained adapter or one trained to nothing (merged weights
            equal the base: no-op), a quantised base.
        VerificationError: logits differ beyond tolerance.
    """
    import torch

    if not has_adapter(input_dir):
        raise UserInputError(f"merge_adapters: {input_dir} holds no adapter; put a lora_finetune or heal (lora) stage before it")
    check_not_quantized_config(input_dir)
    model, processor = load_working_model(input_dir, ctx)
    check_not_quantized(model.get_base_model())
    base = model.get_base_model()
    lora_modules = {n: m for n, m in base.named_modules() if hasattr(m, "lora_B") and len(m.lora_B) > 0}
    deltas = {}
    for name, mod in lora_modules.items():
        b = torch.cat([p.detach().flatten() for p in mod.lora_B.parameters()])
        deltas[name] = float(b.abs().max())
    trained = {n for n, d in deltas.items() if d > 0}
    if not trained:
        raise UserInputError(
            f"merge_adapters: the adapter in {input_dir / 'adapter'} never trained (every lora_B is zero), so merging "
            "would change nothing; give its training stage some steps (train.steps) or a higher learning_rate"
        )
    before_rows = {n: lora_modules[n].base_layer.weight.detach()[:ROWS].clone() for n in trained}
    # Verify in float64 where it fits: merged-vs-adapter then differs only by the merge itself,
    # not by float32 rounding of large activations; big models verify in their working dtype.
    work_dtype = next(model.parameters()).dtype
    n_params = sum(p.numel() for p in model.parameters())
    check_dtype = torch.float64 if n_params <= FLOAT64_CHECK_MAX_PARAMS else work_dtype
    model.to(check_dtype)
    batch = probe_batch(model, processor)
    ref = logits_of(model, batch)
    merged = model.merge_and_unload(safe_merge=cfg.safe_merge)
    out_logits = logits_of(merged, batch)
    merged.to(work_dtype)
    after = dict(merged.named_modules())
    unchanged = [n for n in trained if torch.equal(after[n].weight.detach()[:ROWS], before_rows[n])]
    if len(unchanged) == len(trained):
        raise UserInputError(
            f"merge_adapters: the adapter in {input_dir / 'adapter'} trained to nothing (its largest lora_B entry is "
            f"{max(deltas.values()):.3g}, too small to change any weight in {work_dtype}), so merging would change "
            "nothing; train it with a higher learning_rate or more steps (train.steps)"
        )
    diff = float((out_logits - ref).abs().max())
    tol = cfg.tolerance * float(torch.finfo(check_dtype).eps / torch.finfo(torch.float32).eps) ** (check_dtype != torch.float64)
    if not diff <= tol:
        raise VerificationError(
            f"merge_adapters: merged logits differ from the adapter model's by {diff:.3g} > {tol:.3g} (checked in {check_dtype})"
        )
    if any("lora_" in n for n, _ in merged.named_parameters()):
        raise VerificationError("merge_adapters: LoRA parameters remain after merge_and_unload")
    save_model(merged, processor, model_dir(out_dir))
    log.info("merged %d adapted modules (max |merged - adapter| logits %.2e)", len(trained), diff)
    return {"merged_modules": len(trained), "max_logit_diff": diff, "checked_in": str(check_dtype), "unchanged_rows_modules": len(unchanged)}


def card(record: dict) -> StageCard:
    summ = record.get("summary") or {}
    if "merged_modules" not in summ:
        return StageCard()
    return StageCard(details=[f"{summ['merged_modules']} modules merged (max logit difference {summ.get('max_logit_diff')})"])


STAGE = Declaration(
    config=MergeAdaptersStage,
    run=run,
    produces_model=True,
    adapter=lambda cfg: "merges",
    card=card,
)
