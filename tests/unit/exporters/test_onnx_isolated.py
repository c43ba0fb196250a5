"""ONNX export one graph per subprocess (``isolate_graphs``): the same folder as in-process, the
parent never loads weights, a child's failure is the in-process error and leaves no folder.

Each child starts a fresh interpreter (about 5 s of imports here), so the tests use tiny-blip (two
graphs) and make the failing children fail on the first graph.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from compressor.errors import UserInputError, VerificationError

HELPERS = Path(__file__).resolve().parent
OPTS = {"exporter": "legacy", "opset": 18}  # as the session fixture exports tiny-blip


@pytest.fixture(scope="module")
def blip_dir(onnx_export, tmp_path_factory):
    """The session fixture's tiny-blip model saved as a folder, and its in-process export."""
    model, proc, ref = onnx_export("tiny-blip")
    folder = tmp_path_factory.mktemp("isolated") / "model"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model, folder, ref


def _wrap_child(monkeypatch, tmp_path, patch: str) -> None:
    """Run every child through a script that applies ``patch`` (Python source) first."""
    from exporters import onnx_isolated

    script = tmp_path / "child.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(HELPERS)!r})\nfrom exporters import onnx_export, onnx_isolated\n"
        + textwrap.dedent(patch)
        + "\nraise SystemExit(onnx_isolated.main(sys.argv[1:]))\n"
    )
    monkeypatch.setattr(onnx_isolated, "child_command", lambda req, res: [sys.executable, str(script), str(req), str(res)])


def _no_output(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".tmp-{name}-*"))


def test_isolated_export_equals_in_process_and_parent_loads_no_weights(blip_dir, tmp_path, monkeypatch):
    import transformers

    import compressor.models.loading as loading
    from exporters import onnx_export as ox
    from exporters.onnx_export import OnnxOptions, export_onnx, make_session, sample_cases

    model, folder, ref = blip_dir

    def no_weights(*a, **k):
        raise AssertionError("the parent process loaded weights")

    monkeypatch.setattr(loading, "load_model", no_weights)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    seen = []
    real_meta = ox._export_meta

    def spy(m, *a, **k):
        seen.append(all(p.is_meta for p in m.parameters()))
        return real_meta(m, *a, **k)

    monkeypatch.setattr(ox, "_export_meta", spy)
    stats: dict = {}
    out = tmp_path / "onnx"
    meta = export_onnx(folder, out, OnnxOptions(**OPTS, isolate_graphs="always"), stats=stats)
    assert seen == [True]  # export.json's plan, signatures and parameter counts came from the meta skeleton
    assert stats["isolated"] and list(stats["children"]) == ["vision_encoder", "text_decoder"]
    assert all(c["peak_rss_bytes"] > 0 for c in stats["children"].values())

    ref_meta = json.loads((ref / "export.json").read_text())
    for m in (meta, ref_meta):
        m.pop("seconds"), m.pop("source")
    assert meta == ref_meta == {k: v for k, v in json.loads((out / "export.json").read_text()).items() if k not in ("seconds", "source")}
    assert json.loads((out / "validation.json").read_text()) == json.loads((ref / "validation.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".tmp-*"))

    from compressor.families.onnx_graphs import export_plan

    plan = export_plan(model)
    cases = sample_cases(plan, model)
    for g in plan.graphs:
        for variant in ("onnx", "optimized"):
            a = make_session(ref / ref_meta["graphs"][g.spec.name][variant], ["CPUExecutionProvider"], optimize=False)
            b = make_session(out / meta["graphs"][g.spec.name][variant], ["CPUExecutionProvider"], optimize=False)
            for _, inputs in cases[g.spec.name]:
                feed = {n: t.numpy() for n, t in zip(g.spec.input_names, inputs)}
                for x, y in zip(a.run(None, feed), b.run(None, feed)):
                    np.testing.assert_array_equal(x, y)


PERTURB = """
from onnx_helpers import perturb_initializer
_export = onnx_export._export_graph
def _perturbed(graph, args, folder, opts, dtype):
    f = _export(graph, args, folder, opts, dtype)
    perturb_initializer(folder / f["onnx"], 1.01)  # a 1% weight change
    return f
onnx_export._export_graph = _perturbed
"""
BAD_SIGNATURE = """
from compressor.errors import VerificationError
def _reject(path, spec, dtype):
    raise VerificationError(f"{path.name}: signature differs from the declared graph (test)")
onnx_export._check_signature = _reject
"""


def test_perturbed_child_raises_the_typed_validation_error_and_leaves_no_folder(blip_dir, tmp_path, monkeypatch):
    from exporters.onnx_export import OnnxOptions, OnnxValidationError, export_onnx

    _, folder, _ = blip_dir
    _wrap_child(monkeypatch, tmp_path, PERTURB)
    out = tmp_path / "exports" / "onnx"
    with pytest.raises(OnnxValidationError) as err:
        export_onnx(folder, out, OnnxOptions(**OPTS, isolate_graphs="always"))
    e = err.value
    assert e.graph == "vision_encoder" and e.max_diff > 1e-3 and e.scaled_diff > e.tolerance and e.variant == ""
    assert "vision_encoder" in str(e) and e.output in str(e) and e.exit_code == 3
    assert _no_output(out.parent, "onnx")


def test_child_errors_surface_typed_and_leave_no_folder(blip_dir, tmp_path, monkeypatch):
    from exporters.onnx_export import OnnxOptions, export_onnx
    from exporters.onnx_isolated import GraphSubprocessError

    _, folder, _ = blip_dir
    out = tmp_path / "exports" / "onnx"
    opts = OnnxOptions(**OPTS, isolate_graphs="always")
    _wrap_child(monkeypatch, tmp_path, BAD_SIGNATURE)
    with pytest.raises(VerificationError, match=r"vision_encoder.onnx: signature differs from the declared graph \(test\)"):
        export_onnx(folder, out, opts)
    assert _no_output(out.parent, "onnx")
    out.mkdir(parents=True)
    (out / "old.txt").write_text("a previous export")
    _wrap_child(monkeypatch, tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(GraphSubprocessError, match="killed by signal 9 .*out of memory") as err:
        export_onnx(folder, out, opts)
    assert err.value.task == "vision_encoder" and err.value.returncode == -9 and err.value.exit_code == 3
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and not list(out.parent.glob(".tmp-*"))  # old folder kept
    _wrap_child(monkeypatch, tmp_path, "onnx_isolated.run_task = lambda request: 1 / 0\n")
    with pytest.raises(GraphSubprocessError, match="ZeroDivisionError: division by zero") as err:
        export_onnx(folder, out, opts)
    assert "Traceback" in str(err.value) and sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_auto_isolates_large_checkpoints_only(blip_dir, monkeypatch):
    from compressor.stages.export import ExportStage
    from exporters import onnx_export as ox

    stage = ExportStage(type="export", formats=["onnx"], onnx={"isolate_graphs": "always"})
    assert ox.OnnxOptions.from_stage(stage).isolate_graphs == "always"  # the recipe's setting reaches the exporter

    _, folder, _ = blip_dir
    assert not ox.should_isolate(folder, ox.OnnxOptions())  # a tiny checkpoint: in-process
    assert ox.should_isolate(folder, ox.OnnxOptions(isolate_graphs="always"))
    monkeypatch.setattr(ox, "ISOLATE_ABOVE_BYTES", 1000)
    assert ox.should_isolate(folder, ox.OnnxOptions())
    assert not ox.should_isolate(folder, ox.OnnxOptions(isolate_graphs="never"))


def test_in_memory_export_refuses_always_and_bad_choices(blip_dir, tmp_path):
    from exporters.onnx_export import OnnxOptions, export_model_onnx, export_onnx

    model, folder, _ = blip_dir
    with pytest.raises(UserInputError, match="model folder"):
        export_model_onnx(model, None, tmp_path / "x", OnnxOptions(isolate_graphs="always"))
    with pytest.raises(UserInputError, match="isolate_graphs 'sometimes'"):
        export_onnx(folder, tmp_path / "x", OnnxOptions(isolate_graphs="sometimes"))
    assert not list(tmp_path.iterdir())


def test_child_write_error_is_raised_as_export_write_error():
    """A child's full disk reaches the parent as the same ExportWriteError, message intact."""
    from exporters.onnx_export import ExportWriteError
    from exporters.onnx_isolated import _rebuild_error

    msg = "writing decoder.onnx (external data) into /x failed: No space left on device (0.10 GB free there); …"
    err = _rebuild_error("decoder", 1, {"type": "exporters.onnx_export:ExportWriteError", "message": msg})
    assert isinstance(err, ExportWriteError) and str(err) == msg
