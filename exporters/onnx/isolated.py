"""ONNX export of large models, one graph per fresh subprocess (``isolate_graphs``).

``from_pretrained`` memory-maps safetensors weights stored in the dtype they are loaded in, and a
page becomes resident only when a graph's export reads it. In one process those pages stay
resident until the process ends, so every graph exported adds its weights to the peak; in a fresh
process per graph the peak follows the largest graph. Dropping and reloading the model between
graphs in one process doubled the peak instead (the model stays referenced after
``torch.onnx.export``). Here:

* the parent builds the model on the ``meta`` device from the folder's config
  (:func:`compressor.models.loading.load_skeleton`): the plan, graph signatures and parameter
  counts of ``export.json``, and never reads a weight;
* each graph is exported by a fresh ``python -m exporters.onnx.isolated REQUEST RESULT`` that
  loads the folder (safetensors, memory-mapped), runs
  :func:`exporters.onnx.export.export_checked_graph` for that one graph into the shared
  temporary folder, and writes a small JSON result (files, seconds, validation records, its dtype,
  its peak RSS); a bf16 export's fp32 twin check runs in one more child;
* the parent merges the results with the same functions as the in-process path
  (:func:`~exporters.onnx.export.merge_graph_results`, :func:`~exporters.onnx.export.publish_export`),
  so export.json and validation.json hold what the in-process export writes (timings aside).

Measured (``bench/real_size_export.py``, the pruned BLIP-2 OPT-2.7B, 7.05 GB of bf16 weights):
children peak at 2.79 / 1.68 / 5.32 GB for the image encoder (2.12 GB), embed_tokens (0.26 GB)
and decoder (4.67 GB), the parent at 0.40 GB: at most 0.81x the weights. What isolation cannot
save: weights stored in another dtype than the one loaded (a checkpoint with a float16 part loaded
as bf16, or ``dtype:`` set to another dtype) are converted by ``from_pretrained``, i.e. copied
whole, in every child: with a float16 language model beside a bf16 ViT, every child peaked at
10-12 GB.

A child's failure is raised in the parent as the error the in-process export raises
(:class:`~exporters.onnx.errors.OnnxValidationError` with its fields, ``VerificationError``,
``UserInputError`` … with the child's message); a child that dies (killed, out of memory) or fails
with any other exception raises :class:`GraphSubprocessError`. Either way the temporary folder is
removed: no half-written export is left.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compressor.errors import CompressError, VerificationError
from exporters.onnx import export as ox
from exporters.onnx import metadata as md
from exporters.onnx import validation
from exporters.onnx.errors import OnnxValidationError
from exporters.onnx.options import OnnxOptions
from exporters.onnx.runtime import ort_can_run

log = logging.getLogger(__name__)

#: Task name of the child that runs the fp32 twin check of a bf16 export.
TWIN_CHECK = "twin_check"
_ROOT = Path(__file__).resolve().parents[2]
#: Library loggers whose levels the child copies from the parent (the CLI quiets them).
_LIBRARY_LOGGERS = ("transformers", "accelerate", "torch", "onnx_ir", "onnxscript", "filelock", "huggingface_hub")


class GraphSubprocessError(CompressError):
    """An isolated export subprocess died or failed with an error of no project type (exit 3).

    Attributes:
        task: the graph name (or ``twin_check``).
        returncode: the child's exit status (negative: killed by that signal).
    """

    def __init__(self, task: str, returncode: int, message: str):
        self.task, self.returncode = task, returncode
        super().__init__(message)


def export_isolated(
    model_dir: Path,
    out_dir: Path,
    opts: OnnxOptions,
    device: str = "cpu",
    extra_files: dict[str, str] | None = None,
    stats: dict | None = None,
) -> dict:
    """Export a model folder one graph per subprocess (see the module docstring).

    Args:
        model_dir: a ``save_pretrained`` folder of a registered family, with its processor.
        out_dir: the ONNX folder to create (replaced atomically if it exists).
        opts: export settings (:class:`~exporters.onnx.options.OnnxOptions`).
        device: where validation runs ONNX Runtime (``cpu`` / ``cuda``).
        extra_files: name → text written into the folder.
        stats: if given, ``stats["children"][task] = {"seconds", "peak_rss_bytes"}`` per child.

    Returns:
        The ``export.json`` summary.

    Raises:
        ModelSpecError: no processor in ``model_dir``, or not a folder of a registered family (exit 2).
        OnnxValidationError, VerificationError, UserInputError: as the in-process export.
        GraphSubprocessError: a child died or failed with an unexpected error.
    """
    from compressor.families import family_for_model
    from compressor.fileio import make_tmp_dir
    from compressor.models.loading import load_processor, load_skeleton
    from exporters.onnx.topologies import export_plan

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    processor = load_processor(model_dir)
    ox.require_processor(processor, model_dir)
    skeleton = load_skeleton(model_dir)
    family = family_for_model(skeleton)
    plan = export_plan(skeleton)
    children = stats.setdefault("children", {}) if stats is not None else {}
    tmp = make_tmp_dir(out_dir.parent, out_dir.name)
    t_start = time.perf_counter()
    request = {"model_dir": str(model_dir), "folder": str(tmp), "options": asdict(opts), "device": device}
    try:
        results = {}
        for i, g in enumerate(plan.graphs):
            name = g.spec.name
            results[name] = _run_child({**request, "task": name, "save_config": i == 0}, children)
        dtypes = {r["dtype"] for r in results.values()}
        if len(dtypes) != 1:
            raise VerificationError(f"the graph subprocesses loaded {model_dir} in different dtypes: {sorted(dtypes)}")
        dtype = dtypes.pop()
        runnable = ort_can_run(dtype, device)
        numbers = ox.numbers_record(
            dtype, runnable, opts, lambda: _run_child({**request, "task": TWIN_CHECK}, children)["numbers"]
        )
        files, timings, val = ox.merge_graph_results(plan, results, dtype, device, numbers)
        meta = md.export_meta(skeleton, processor, family, plan, files, dtype, opts, str(model_dir))
        ox.publish_export(tmp, out_dir, processor, meta, val, timings, t_start, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _run_child(request: dict, children: dict) -> dict:
    """Run one task in a fresh interpreter; its result, or its error raised here.

    Records ``children[task] = {"seconds", "peak_rss_bytes"}`` (the child's own ``ru_maxrss``).
    The child inherits stdout/stderr (its log lines and warnings show as the in-process ones
    would) and the environment, with this package's root put on ``PYTHONPATH``.
    """
    task = request["task"]
    request = {**request, "logging": _logging_settings()}
    with tempfile.TemporaryDirectory(prefix="vlmc-onnx-child-") as scratch:
        req, res = Path(scratch) / "request.json", Path(scratch) / "result.json"
        req.write_text(json.dumps(request))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)}
        t0 = time.perf_counter()
        log.info("onnx export: %s in a fresh subprocess …", task)
        proc = subprocess.run(child_command(req, res), env=env, cwd=str(_ROOT), check=False)
        seconds = round(time.perf_counter() - t0, 3)
        out = json.loads(res.read_text()) if res.is_file() else None
    if out is None:
        how = f"was killed by signal {-proc.returncode} ({_signal_name(-proc.returncode)})" if proc.returncode < 0 else (
            f"exited with status {proc.returncode}"
        )
        hint = "; SIGKILL usually means the system ran out of memory" if proc.returncode == -signal.SIGKILL else ""
        raise GraphSubprocessError(task, proc.returncode, f"ONNX export of '{task}' in a subprocess {how} without a result{hint}")
    children[task] = {"seconds": seconds, "peak_rss_bytes": out["peak_rss_bytes"]}
    log.info("onnx export: %s done in %.1f s, subprocess peak RSS %.2f GB", task, seconds, out["peak_rss_bytes"] / 1e9)
    if "error" in out:
        raise _rebuild_error(task, proc.returncode, out["error"])
    return out["result"]


def child_command(request: Path, result: Path) -> list[str]:
    """The command line of one child (a function so tests can wrap the child)."""
    return [sys.executable, "-m", "exporters.onnx.isolated", str(request), str(result)]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _logging_settings() -> dict:
    """The parent's logging level and format, and whether warnings and transformers' progress
    bars are silenced (the CLI silences both), for the child to mirror."""
    import warnings

    root = logging.getLogger()
    fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
    except ImportError:
        bars = True
    blanket = [f for f in warnings.filters if f[0] == "ignore" and f[1] is None and f[2] is Warning and f[3] is None]
    return {
        "level": root.getEffectiveLevel(),
        "format": fmt,
        "loggers": {n: logging.getLogger(n).getEffectiveLevel() for n in _LIBRARY_LOGGERS},
        "progress_bars": bars,
        "ignore_warnings": bool(blanket),
    }


# --------------------------------------------------------------------------------------------
# Errors across the process boundary
# --------------------------------------------------------------------------------------------


def _describe_error(exc: BaseException) -> dict[str, Any]:
    """JSON form of a child's exception: type (``module:Class``), message, fields, traceback."""
    out: dict[str, Any] = {"type": f"{type(exc).__module__}:{type(exc).__qualname__}", "message": str(exc)}
    if isinstance(exc, OnnxValidationError):
        out["fields"] = {
            k: getattr(exc, k) for k in ("graph", "output", "max_diff", "tolerance", "case", "variant", "scaled_diff")
        }
    if not isinstance(exc, CompressError):
        out["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
    return out


def _rebuild_error(task: str, returncode: int, err: dict) -> BaseException:
    """The child's error as the parent raises it: the same project error type and message, or a
    :class:`GraphSubprocessError` naming the child's exception (with its traceback's tail)."""
    module, _, name = err["type"].partition(":")
    if "fields" in err:
        return OnnxValidationError(**err["fields"])
    cls = None
    if module.startswith(("compressor.", "exporters.", "eval.")):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            cls = None
    if isinstance(cls, type) and issubclass(cls, CompressError):
        try:
            return cls(err["message"])
        except TypeError:  # an error type whose constructor takes more than a message
            pass
    tail = "\n".join(err.get("traceback", "").strip().splitlines()[-12:])
    first = err["message"].strip().splitlines()[0] if err["message"].strip() else ""
    return GraphSubprocessError(
        task, returncode, f"ONNX export of '{task}' failed in its subprocess: {name}: {first}" + (f"\n{tail}" if tail else "")
    )


# --------------------------------------------------------------------------------------------
# The child
# --------------------------------------------------------------------------------------------


def run_task(request: dict) -> dict:
    """What a child does: load the folder, then export one graph or run the fp32 twin check.

    Returns:
        ``{"dtype", **export_checked_graph(...)}`` for a graph, ``{"dtype", "numbers"}`` for the
        twin check. The first graph's child also saves the loaded model's config.json.
    """
    from compressor.models.loading import load_model

    opts = OnnxOptions(**request["options"])
    device, folder = request["device"], Path(request["folder"])
    model, _ = load_model(request["model_dir"], dtype=opts.dtype, device="cpu", with_processor=False)
    model, dtype = ox.prepare_model(model, opts)
    if request["task"] == TWIN_CHECK:
        return {"dtype": dtype, "numbers": validation.twin_check(model, opts, device)}
    plan, runnable, cases = ox.plan_and_cases(model, dtype, device)
    fp64 = validation.Float64Reference(model)
    res = ox.export_checked_graph(plan, request["task"], cases, folder, opts, dtype, device, runnable, fp64)
    if request.get("save_config"):
        model.config.save_pretrained(folder)
    return {"dtype": dtype, **res}


def main(argv: list[str] | None = None) -> int:
    """``python -m exporters.onnx.isolated REQUEST.json RESULT.json``; exit 0, or 1 with the error
    described in RESULT.json. RESULT.json also holds the child's peak RSS (bytes)."""
    import warnings

    req_path, res_path = (argv if argv is not None else sys.argv[1:])[:2]
    request = json.loads(Path(req_path).read_text())
    cfg = request.get("logging", {})
    logging.basicConfig(level=cfg.get("level", logging.INFO), format=cfg.get("format") or logging.BASIC_FORMAT, stream=sys.stderr)
    for name, level in cfg.get("loggers", {}).items():
        logging.getLogger(name).setLevel(level)
    if cfg.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if not cfg.get("progress_bars", True):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out: dict[str, Any]
    try:
        out = {"result": run_task(request)}
    except BaseException as exc:  # reported to the parent, which raises it as its own
        out = {"error": _describe_error(exc)}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    tmp = Path(res_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, default=str))
    os.replace(tmp, res_path)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    raise SystemExit(main())
