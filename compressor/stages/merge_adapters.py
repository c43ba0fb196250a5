"""``merge_adapters``: peft ``merge_and_unload``, verified.

Checks (DESIGN.md "Model surgery facts"): the adapter is not a no-op (an untrained LoRA has
``lora_B == 0``, which would merge to the base unchanged); after merging, the weights where
adapters applied differ from the base; every merged weight is finite (``safe_merge``); and the
merged model's logits equal the adapter model's within ``tolerance`` on a fixed probe batch
(computed in float64 for models up to 300M parameters, so only the merge itself is compared; the
norms that transformers computes in float32 compute in float64 there too: :data:`FLOAT32_NORMS`). Merging into a 4/8-bit base is refused.

Memory: the base weights are memory-mapped copy-on-write from the input folder, and the adapters
are merged into them in place, one module at a time, so a merged weight replaces its page of the
mapping instead of adding a copy (peft's own ``safe_merge`` clones every adapted weight first:
0.22x the checkpoint of BLIP-2 OPT-2.7B with LoRA on the OPT attention); the input folder is never
written. The finiteness check of ``safe_merge`` runs on the merged weights instead, before anything
is saved. The probe batch is three small images: its activations are megabytes.
"""

from __future__ import annotations

import contextlib
import logging
import types
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
#: transformers' norms that compute in float32 whatever their input's dtype (the RMSNorm of
#: Llama-architecture language models, T5's layer norm; ``weight * x * rsqrt(mean(x²) + eps)``).
#: In a float64 check they round every activation back to float32, and a value on a float32
#: rounding boundary flips one ulp in one model and not the other; thirty layers grow that flip
#: into a logit difference above the tolerance (4e-5 on the SmolLM2 BLIP-2), which is not the merge's.
FLOAT32_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "T5LayerNorm"})


def _rms_norm_in_input_dtype(self, hidden_states):
    """The same RMS norm as the classes of :data:`FLOAT32_NORMS`, in the input's dtype."""
    import torch

    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@contextlib.contextmanager
def norms_in_input_dtype(model):
    """Within the block, every norm of :data:`FLOAT32_NORMS` in ``model`` computes in its input's
    dtype (float64 in the merge check), so the check compares the merge alone. Yields how many were
    switched; on exit each module has its class's ``forward`` again."""
    patched = [m for m in model.modules() if type(m).__name__ in FLOAT32_NORMS and hasattr(m, "variance_epsilon")]
    for m in patched:
        m.forward = types.MethodType(_rms_norm_in_input_dtype, m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


class MergeAdaptersStage(StageBase):
    """peft `merge_and_unload`, verified: touched weights change, outputs equal the adapter model's."""

    type: Literal["merge_adapters"]
    safe_merge: bool = Field(True, description="Check that every merged weight is finite (no NaN / inf) before saving.")
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
        return model(**batch).logits.double()  # exact for float32 and bf16 logits; float64 stays float64


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
    exact = norms_in_input_dtype(model) if check_dtype == torch.float64 else contextlib.nullcontext()
    with exact:
        ref = logits_of(model, batch)
        merged = model.merge_and_unload(safe_merge=False)  # in place (the same modules): see the module docstring
        out_logits = logits_of(merged, batch)
    after = dict(merged.named_modules())
    if cfg.safe_merge:
        broken = [n for n in lora_modules if not bool(torch.isfinite(after[n].weight).all())]
        if broken:
            raise VerificationError(
                f"merge_adapters: merging gives non-finite weights (NaN or inf) in {len(broken)} module(s), e.g. "
                f"{', '.join(broken[:3])}: the adapter is broken (train it with a lower learning_rate); nothing was written"
            )
    merged.to(work_dtype)  # in place: ``after`` still holds the same modules
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
