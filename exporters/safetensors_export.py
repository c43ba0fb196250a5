"""safetensors export: a verified save_pretrained folder with a SHA-256 manifest. Never pickle.

The folder holds the weights (sharded above ``max_shard_size``), config, generation config,
``shape_plan.json`` for a width-pruned model (:mod:`compressor.models.shapes`), processor, the resolved recipe when given, and ``SHA256SUMS`` (``sha256sum -c`` format) of
every file. After writing, the folder is reloaded with
``from_pretrained(output_loading_info=True)`` and any missing or unexpected key fails the export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.errors import VerificationError
from compressor.fileio import atomic_write_text, hash_files, sha256_file

log = logging.getLogger(__name__)

CHECKSUMS = "SHA256SUMS"


def write_checksums(folder: Path) -> dict[str, str]:
    """Write ``SHA256SUMS`` for every file under ``folder``; returns ``{relpath: sha256}``."""
    files = hash_files(folder, skip=(CHECKSUMS,))
    atomic_write_text(folder / CHECKSUMS, "".join(f"{h}  {rel}\n" for rel, h in files.items()))
    return files


def verify_checksums(folder: Path) -> list[str]:
    """Files whose bytes no longer match ``SHA256SUMS`` (or are missing); empty when intact.

    Raises:
        VerificationError: the folder has no ``SHA256SUMS``.
    """
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        raise VerificationError(f"{folder}: no {CHECKSUMS} manifest")
    bad = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        digest, rel = line.split("  ", 1)
        f = Path(folder) / rel
        if not f.is_file() or sha256_file(f) != digest:
            bad.append(rel)
    return bad


def verify_folder(folder: Path) -> None:
    """Raise unless every file of ``folder`` matches its ``SHA256SUMS`` (weights, ONNX, config …).

    Raises:
        VerificationError: no manifest, or files missing or changed (all of them named).
    """
    bad = verify_checksums(folder)
    if bad:
        raise VerificationError(
            f"{folder}: {len(bad)} file(s) do not match SHA256SUMS (corrupted, truncated or edited): {', '.join(bad)}. "
            "Re-export the folder."
        )


def saved_tensors(folder: Path):
    """``(name, tensor)`` for every tensor of the ``*.safetensors`` files in ``folder``, one at a time.

    The file is opened per tensor: ``safe_open`` maps the whole file, and every page a comparison
    reads stays resident until the mapping closes, so one open file per shard would end with the
    shard (5 GB) in resident memory; per tensor, only the tensor being compared is.
    """
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
        for k in keys:
            with safe_open(str(f), framework="pt") as fh:
                t = fh.get_tensor(k)
            yield k, t
            del t


def export_safetensors(
    model,
    processor,
    out: Path,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    extra_files: dict[str, str] | None = None,
) -> dict:
    """Write and verify a safetensors model folder.

    Args:
        model: a BLIP-family model (no peft wrapper).
        processor: its processor (saved beside), or None.
        out: the folder to create.
        dtype: ``float32`` / ``float16`` / ``bfloat16`` to cast to, or None to keep.
        max_shard_size: e.g. ``500MB``; larger models are split into shards with an index.
        extra_files: name → text written in the folder (e.g. ``recipe.resolved.yaml``).

    Returns:
        ``{"files": {relpath: sha256}, "shards": n, "dtype": str, "bytes": n}``.

    Raises:
        VerificationError: the reload reports missing or unexpected keys, or its weights differ.
    """
    import torch

    from compressor.families import family_for_config
    from compressor.models.loading import torch_dtype

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(torch_dtype(dtype))
    quantized = getattr(model, "vlmc_quantized", None)
    if quantized:  # loaded from a quantize stage's folder: the same integers again (compressed-tensors)
        from compressor.quantization import save_quantized

        save_quantized(model, processor, out, quantized)
    else:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(out)
    for name, text in (extra_files or {}).items():
        atomic_write_text(out / name, text)
    from compressor.models.shapes import load_planned, write_shape_plan

    if quantized:
        from compressor.models.loading import load_model

        reloaded, _ = load_model(out, with_processor=False)  # checks every scale against its weight
        dense = dict(model.state_dict())
        for k, v in reloaded.state_dict().items():
            if k not in dense or not torch.equal(dense[k], v):
                raise VerificationError(f"safetensors export {out}: quantized tensor {k} differs after reload")
    elif write_shape_plan(model, out) is not None:  # width-pruned: shapes the config cannot express
        reloaded = load_planned(out, next(model.parameters()).dtype)
    else:
        family = family_for_config(model.config)
        reloaded, info = family.model_cls().from_pretrained(str(out), output_loading_info=True, dtype=next(model.parameters()).dtype)
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise VerificationError(f"safetensors export {out}: reload reported {problems}")
    del reloaded  # memory-mapped and never read: the key check costs no memory
    # The weights are compared one saved tensor at a time (read, compared, freed): comparing with
    # the reloaded model would page its whole mapping in, a second copy of the weights in resident
    # memory (2x the checkpoint at real size; bench/real_size_apply.py).
    src = {} if quantized else model.state_dict()
    for k, v in saved_tensors(out):
        if k in src and not torch.equal(src[k].to(v.device), v):
            raise VerificationError(f"safetensors export {out}: tensor {k} differs after reload")
    files = write_checksums(out)
    shards = len([f for f in files if f.endswith(".safetensors")])
    return {
        "files": files,
        "shards": shards,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "bytes": sum((out / f).stat().st_size for f in files),
    }
