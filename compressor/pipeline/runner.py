"""The pipeline runner: recipe → run directory (DESIGN.md "The run directory").

::

    runs/<name>/
      recipe.resolved.yaml
      manifest.json                 per stage: type, key, input/output hashes, seconds, peak memory, versions
      inputs/                       models built from presets / configs (cached by spec)
      stages/00-lora_finetune-<key>/  each stage writes a NEW folder, never changes its input
      final/                        the last model (hard links) + recipe.resolved.yaml
      onnx/                         the last ONNX export (hard links)
      report.json  report.md        metrics per evaluate label, characteristics, gate verdicts

A stage folder's name carries a hash of its config, its input model's key, the fingerprints
of the data it reads, any teacher's key, the decoding settings, and the library versions.
A rerun reuses a folder whose ``stage.json`` exists and whose files still match the hashes
recorded there; anything else reruns. Stage folders are built under ``.tmp-<folder name>`` and
renamed when complete, so a run killed mid-stage (even by SIGKILL) leaves no folder that looks done;
``--resume`` continues such a run. A training stage saves its state into its temporary folder
(``checkpoints/``, :mod:`compressor.training_state`): ``--resume`` continues that stage from its
newest saved step instead of step 0; a run without ``--resume`` starts over.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import GateFailed, UserInputError
from compressor.fileio import (
    atomic_write_json,
    atomic_write_text,
    canonical_hash,
    hash_files,
    link_tree,
    make_tmp_dir,
    publish_dir,
    tree_hash,
)
from compressor.recipe.loader import LoadedRecipe
from compressor.training_state import checkpoint_step

log = logging.getLogger(__name__)

LOCK = ".lock"
STAGE_RECORD = "stage.json"
CHECKPOINTS = "checkpoints"  # a training stage's saved states, in its temporary folder


def library_versions() -> dict[str, str]:
    """Versions that change results; part of every stage key."""
    import importlib.metadata as md

    import compressor

    out = {"vlm-compress": compressor.__version__}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "onnx", "onnxruntime", "pycocoevalcap"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclass
class StageRecord:
    index: int
    type: str
    label: str | None
    key: str
    folder: str
    status: str  # ran | reused
    seconds: float
    peak_rss_mb: float | None
    summary: dict = field(default_factory=dict)


class RunLock:
    """``runs/<name>/.lock`` holding the PID; a live holder means another run uses the folder."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK

    def stale_pid(self) -> int | None:
        """PID of a previous run that died while holding the lock (None: no lock or still alive)."""
        if not self.path.exists():
            return None
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0
        if pid and _alive(pid) and pid != os.getpid():
            raise UserInputError(f"{self.path.parent} is in use by another run (pid {pid}); wait for it or use --out")
        return pid

    def acquire(self) -> None:
        atomic_write_text(self.path, str(os.getpid()))

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _verify_stage(folder: Path) -> dict | None:
    """The stage record if the folder is complete and its files match their recorded hashes."""
    import json

    rec = folder / STAGE_RECORD
    if not rec.is_file():
        return None
    try:
        data = json.loads(rec.read_text())
    except (OSError, ValueError):
        return None
    recorded = data.get("outputs", {})
    current = hash_files(folder, skip=(STAGE_RECORD,))
    return data if current == recorded else None


class Runner:
    """Runs a loaded recipe into a run directory.

    Args:
        loaded: the validated recipe.
        run_dir: the run directory (default ``runs/<name>``).
        resume: continue a run that was interrupted (required when one is found).
        progress: draw progress bars.
        stage_cache: a folder of complete stage folders shared by several run directories (the
            trials of ``compress search``): a stage whose folder is there (same name, so same index
            and key) and verifies is hard-linked into this run instead of run again, and every stage
            this run completes is hard-linked there.
    """

    def __init__(self, loaded: LoadedRecipe, run_dir: Path | None = None, resume: bool = False, progress: bool = True,
                 stage_cache: Path | None = None):
        self.loaded = loaded
        self.stage_cache = Path(stage_cache) if stage_cache is not None else None
        self.recipe = loaded.recipe
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / self.recipe.name
        self.resume = resume
        self.progress = progress
        self.records: list[StageRecord] = []
        self.versions = library_versions()
        #: set when the run was interrupted (Ctrl-C): ``(stage index, type, saved step or None)``
        self.interrupted: tuple[int, str, int | None] | None = None

    # ---------------------------------------------------------------- pre-flight (writes nothing)
    def preflight(self):
        from compressor.models.loading import resolve_device
        from compressor.pipeline import distributed
        from compressor.pipeline.preflight import run_preflight

        self.device = resolve_device(self.recipe.device)
        self.dist = distributed.init(self.device)
        self.pf = run_preflight(self.loaded)
        if not self.dist.main:  # the main process owns the run directory and its lock
            return self.pf
        lock = RunLock(self.run_dir)
        stale = lock.stale_pid()
        if stale is not None and not self.resume:
            raise UserInputError(
                f"{self.run_dir} holds an interrupted run (pid {stale} stopped before finishing); continue it with "
                "--resume, or choose another --out"
            )
        return self.pf

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        """Run every stage, then report, gate and push.

        Returns:
            The report dict.

        Raises:
            GateFailed: the gate failed (the report is written first; no push).
            CompressError: any stage failure (exit 3 unless more specific).
        """

        if not hasattr(self, "pf"):
            self.preflight()
        run_dir = self.run_dir
        lock = RunLock(run_dir)
        if self.dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        self.dist.barrier()
        interrupted = False
        try:
            return self._run(lock)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            # A run that ends (even with an error) releases its lock; a killed or interrupted
            # (Ctrl-C) run leaves it, which is what --resume is for.
            if self.dist.main and not interrupted:
                lock.release()

    def _run(self, lock: RunLock) -> dict:
        from compressor.models.loading import materialize
        from compressor.pipeline.context import StageContext

        run_dir = self.run_dir
        t_run = time.perf_counter()
        if self.dist.main:
            (run_dir / "stages").mkdir(exist_ok=True)
            for tmp in (run_dir / "stages").glob(".tmp-*"):
                # Half-written stages of a killed run are never trusted; with --resume, only the
                # training states saved in them are kept (a stage continues from its newest).
                if self.resume and checkpoint_step(tmp / CHECKPOINTS) is not None:
                    for p in tmp.iterdir():
                        if p.name != CHECKPOINTS:
                            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                else:
                    saved = checkpoint_step(tmp / CHECKPOINTS)
                    if saved is not None:
                        log.warning("%s: discarding its training state saved at step %d (--resume would continue "
                                    "from it)", tmp.name, saved)
                    shutil.rmtree(tmp, ignore_errors=True)
            atomic_write_text(run_dir / "recipe.resolved.yaml", self.loaded.resolved_yaml())
            resolved = materialize(self.recipe.model, run_dir / "inputs", self.recipe.dtype)
        self.dist.barrier()  # the other processes find the model the main one materialised
        if not self.dist.main:
            resolved = materialize(self.recipe.model, run_dir / "inputs", self.recipe.dtype)
        current_dir = resolved.path
        current_key = canonical_hash({"model": resolved.key, "files": self._input_hash(resolved.path)})
        ctx = StageContext(recipe=self.recipe, index=0, run_dir=run_dir, device=self.device, progress=self.progress,
                           dist=self.dist)
        ctx._data_cache.update(self.pf.datasets)
        try:
            return self._stages(ctx, resolved, current_dir, current_key, t_run)
        finally:
            ctx.close()

    def _stages(self, ctx, resolved, current_dir: Path, current_key: str, t_run: float) -> dict:
        from compressor.models.folders import model_dir
        from compressor.stages import declaration

        run_dir = self.run_dir
        label_keys: dict[str, str] = {}
        export_keys: list[str] = []
        evals: dict[str, dict] = {}
        self._write_manifest(resolved, current_key, t_run)
        for i, st in enumerate(self.recipe.stages):
            ctx.index = i
            decl = declaration(st.type)
            key_parts = self._key_parts(decl, st, ctx, current_key, label_keys, export_keys)
            key = canonical_hash(key_parts)
            folder = run_dir / "stages" / f"{i:02d}-{st.type}-{key[:10]}"
            self.dist.barrier()  # every process sees the same stage folders
            if self.dist.main and not folder.exists():
                self._from_cache(folder)
            rec = _verify_stage(folder) if folder.exists() else None
            self.dist.barrier()
            if rec is not None:
                status, seconds, peak, summary = "reused", rec.get("seconds", 0.0), rec.get("peak_rss_mb"), rec.get("summary", {})
                log.info("stage %d %s: reusing %s", i, st.type, folder.name)
            elif not self.dist.main:
                status, seconds, peak, summary = self._follow_stage(decl, st, ctx, current_dir, folder)
            else:
                if folder.exists():
                    log.warning("stage %d %s: %s is incomplete or changed; running it again", i, st.type, folder.name)
                    shutil.rmtree(folder)
                status = "ran"
                seconds, peak, summary = self._run_stage(decl, st, ctx, current_dir, folder, key, key_parts)
                self._to_cache(folder)
                self.dist.barrier()
            self.records.append(StageRecord(i, st.type, st.label, key, folder.name, status, seconds, peak, summary))
            if decl.produces_model:
                current_dir, current_key = model_dir(folder), key
                if decl.trainable_params is not None:
                    ctx.last_trainable = decl.trainable_params(summary) or 0
            if decl.output == "export":
                ctx.exports.append(folder)
                export_keys.append(key)
            elif decl.output == "evaluation":
                import json

                evals[st.label] = json.loads((folder / "eval.json").read_text())
            if st.label is not None:
                ctx.labels[st.label] = current_dir
                ctx.label_outputs[st.label] = folder
                label_keys[st.label] = ctx.label_keys[st.label] = current_key
            self._write_manifest(resolved, current_key, t_run)

        if not self.dist.main:
            return {}
        for tmp in (run_dir / "stages").glob(".tmp-*"):  # saved states of stages this recipe no longer has
            shutil.rmtree(tmp, ignore_errors=True)
        final = run_dir / "final"
        tmp = make_tmp_dir(run_dir, "final")
        link_tree(current_dir, tmp)
        atomic_write_text(tmp / "recipe.resolved.yaml", self.loaded.resolved_yaml())
        publish_dir(tmp, final)
        if ctx.exports and (ctx.exports[-1] / "onnx").is_dir():
            tmp = make_tmp_dir(run_dir, "onnx")
            link_tree(ctx.exports[-1] / "onnx", tmp)
            publish_dir(tmp, run_dir / "onnx")

        from compressor.pipeline.report import build_report, write_report

        report = build_report(self.recipe, self.loaded.hash(), self.records, evals, time.perf_counter() - t_run)
        dev = getattr(self.loaded, "fast_dev_run", None)
        if dev is not None:
            from compressor.recipe.dev_run import note

            report["fast_dev_run"] = {"steps": dev, "note": note(dev)}
        gate_ok = True
        if self.recipe.gate is not None:
            # a fast dev run's metrics mean nothing: its gate is checked and reported, never enforced
            gate_ok = report["gate"]["passed"] or dev is not None
        write_report(run_dir, report, plots=self.recipe.report.plots)
        self._write_manifest(resolved, current_key, t_run, done=True)
        if not gate_ok:
            raise GateFailed(f"the gate failed: {report['gate']['summary']}; no push. See {run_dir / 'report.md'}")
        if self.recipe.push is not None:
            from compressor.pipeline.publish import push_run

            report["push"] = push_run(self.recipe, run_dir, report, self.loaded)
            write_report(run_dir, report, plots=False)
        return report

    # ---------------------------------------------------------------- helpers
    def _from_cache(self, folder: Path) -> None:
        """Hard-link a verified copy of ``folder`` from the shared stage cache, if there is one."""
        if self.stage_cache is None:
            return
        cached = self.stage_cache / folder.name
        if not cached.is_dir() or _verify_stage(cached) is None:
            return
        tmp = make_tmp_dir(folder.parent, folder.name)
        link_tree(cached, tmp)
        publish_dir(tmp, folder)
        log.info("stage %s: linked from the stage cache %s", folder.name, self.stage_cache)

    def _to_cache(self, folder: Path) -> None:
        """Hard-link a completed stage folder into the shared stage cache (first writer wins)."""
        if self.stage_cache is None or (self.stage_cache / folder.name).exists():
            return
        tmp = make_tmp_dir(self.stage_cache, folder.name)
        link_tree(folder, tmp)
        try:
            os.rename(tmp, self.stage_cache / folder.name)  # fails if another run published it meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)

    def _key_parts(self, decl, st, ctx, input_key: str, label_keys: dict, export_keys: list) -> dict[str, Any]:
        """What a stage's cache key hashes: its config, its input, the fingerprints of the data it
        reads, library versions, and what its declaration says it also reads (decoding settings,
        earlier stages by label, the latest export, the number of training processes)."""
        parts: dict[str, Any] = {
            "type": st.type,
            "config": key_config(st),
            "input": input_key,
            "data": {s: self._data_fp(ctx, s, st) for s in decl.data(st)},
            "versions": self.versions,
            "dtype": self.recipe.dtype,
            "seed": self.recipe.seed,
        }
        if decl.uses_generation:
            parts["generation"] = self.recipe.generation.model_dump(mode="json")
        for role, (label, _) in decl.references(st).items():
            parts[role] = label_keys[label]
        for role, folder in decl.folders(st).items():
            parts[role] = self._input_hash(Path(folder)) if Path(folder).is_dir() else str(folder)
        if self.dist.enabled and decl.trains:
            parts["processes"] = self.dist.world  # each step sees batch_size × processes examples
        if decl.reads_export(st):
            parts["export"] = export_keys[-1] if export_keys else None
        return parts

    def _run_stage(self, decl, st, ctx, input_dir: Path, folder: Path, key: str, key_parts: dict):
        from eval.characteristics import PeakMemory

        tmp = stage_tmp_dir(folder)
        if tmp.exists():  # kept by --resume: only its saved training states remain in it
            log.info("stage %d %s: continuing in %s (training state saved at step %s)", ctx.index, st.type, tmp.name,
                     checkpoint_step(tmp / CHECKPOINTS))
        else:
            tmp.mkdir(parents=True)
        log.info("stage %d %s: running into %s", ctx.index, st.type, folder.name)
        release_memory()  # what earlier stages left must not count as this stage's memory (nor stay resident)
        seed_everything(self.recipe.seed + ctx.index)
        ctx.checkpoint_dir = tmp / CHECKPOINTS if decl.trains else None
        t0 = time.perf_counter()
        try:
            with PeakMemory() as mem:
                summary = decl.run(st, ctx, input_dir, tmp) or {}
        except BaseException as exc:
            saved = checkpoint_step(tmp / CHECKPOINTS)
            if isinstance(exc, KeyboardInterrupt):
                self.interrupted = (ctx.index, st.type, saved)
            if saved is not None:  # --resume continues this stage from there
                log.warning("stage %d %s stopped; its training state at step %d is kept for --resume", ctx.index,
                            st.type, saved)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            ctx.checkpoint_dir = None
        shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)  # the stage is complete: its saved states are not outputs
        seconds = time.perf_counter() - t0
        outputs = hash_files(tmp, skip=(STAGE_RECORD,))
        record = {
            "index": ctx.index,
            "type": st.type,
            "label": st.label,
            "key": key,
            "key_parts": {k: v for k, v in key_parts.items() if k != "config"},
            "config": st.model_dump(mode="json"),
            "input_dir": str(input_dir),
            "outputs": outputs,
            "output_hash": tree_hash(outputs),
            "seconds": round(seconds, 3),
            "peak_rss_mb": round(mem.rss_mb, 1),
            "peak_rss_reset": mem.reset,
            "peak_cuda_mb": mem.cuda_mb,
            "summary": summary,
        }
        atomic_write_json(tmp / STAGE_RECORD, record)
        publish_dir(tmp, folder)
        return round(seconds, 3), round(mem.rss_mb, 1), summary

    def _follow_stage(self, decl, st, ctx, input_dir: Path, folder: Path):
        """A non-main process: train, or caption its share, with the others (output discarded), or wait
        for the main one."""
        if decl.trains or decl.sharded:
            scratch = self.dist.scratch_dir(self.run_dir, folder.name)
            release_memory()
            try:
                seed_everything(self.recipe.seed + ctx.index)
                ctx.checkpoint_dir = stage_tmp_dir(folder) / CHECKPOINTS  # saved together with the main process
                decl.run(st, ctx, input_dir, scratch)
            finally:
                ctx.checkpoint_dir = None
                self.dist.drop(scratch)
        self.dist.barrier()  # the main process has published the stage folder
        rec = _verify_stage(folder) or {}
        return "ran", rec.get("seconds", 0.0), rec.get("peak_rss_mb"), rec.get("summary", {})

    def _data_fp(self, ctx, section: str, st) -> str:
        from compressor.data import section_fingerprint

        return section_fingerprint(self.recipe.data, section)

    def _input_hash(self, path: Path) -> str:
        """Content hash of the input model folder, cached by (path, size, mtime) of each file."""
        import json

        cache_file = self.run_dir / "inputs" / ".hash-cache.json"
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        from compressor.fileio import sha256_file

        files = {}
        for p in sorted(Path(path).rglob("*")):
            if not p.is_file() or any(part.startswith(".tmp") for part in p.relative_to(path).parts):
                continue
            st = p.stat()
            ck = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            if ck not in cache:
                cache[ck] = sha256_file(p)
            files[p.relative_to(path).as_posix()] = cache[ck]
        if self.dist.main:
            atomic_write_json(cache_file, cache)
        return tree_hash(files)

    def _write_manifest(self, resolved, input_key: str, t0: float, done: bool = False) -> None:
        import dataclasses

        if not self.dist.main:
            return
        manifest = {
            "recipe": self.recipe.name,
            "recipe_hash": self.loaded.hash(),
            "overrides": self.loaded.overrides,
            "model": {"kind": resolved.kind, "key": resolved.key, "path": str(resolved.path)},
            "device": self.device,
            "versions": self.versions,
            "status": "complete" if done else "running",
            "seconds": round(time.perf_counter() - t0, 3),
            "stages": [dataclasses.asdict(r) for r in self.records],
        }
        atomic_write_json(self.run_dir / "manifest.json", manifest)


def stage_tmp_dir(folder: Path) -> Path:
    """Where stage ``folder`` is built (and its training states saved) before it is renamed into place."""
    return folder.parent / f".tmp-{folder.name}"


def key_config(cfg) -> dict:
    """A stage config as its cache key sees it: without its label and without the fields marked
    ``json_schema_extra={"cache_key": False}`` (settings that change no result, e.g. how often a
    training state is saved)."""
    from pydantic import BaseModel

    def walk(model, data: dict) -> dict:
        for name, info in type(model).model_fields.items():
            if name not in data:
                continue
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("cache_key") is False:
                del data[name]
                continue
            value = getattr(model, name)
            if isinstance(value, BaseModel) and isinstance(data[name], dict):
                walk(value, data[name])
        return data

    return walk(cfg, cfg.model_dump(mode="json", exclude={"label"}))


def release_memory() -> None:
    """Give back what finished stages left: unreachable objects (a model kept alive by a reference
    cycle through its hooks would keep its weights' pages mapped), CUDA's cached blocks, and the C
    heap's free pages (glibc ``malloc_trim``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a stage's output depends only on its key."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
