"""Evaluation takes one target object: a captioner plus, where there is one, its PyTorch model,
its folder, a captioner per batch size, and an ONNX export's lazily loaded PyTorch source.

On the tiny BLIP-2 OPT preset (its captions differ per image: checked first), with metrics that
need no Java (ROUGE-1 through rouge-score; perplexity)."""

from __future__ import annotations

import json

import pytest

from compressor.recipe.schema import CharacteristicsSpec, GenerationSpec

GEN = GenerationSpec(max_new_tokens=6, batch_size=2)
NO_LATENCY = CharacteristicsSpec(latency=None, gflops=True, gflops_new_tokens=4)


@pytest.fixture(scope="module")
def preset():
    from compressor.models.presets import build_preset

    return build_preset("tiny-blip2-opt")


@pytest.fixture(scope="module")
def data():
    from compressor.data import Dataset
    from compressor.data.synthetic import synthetic_examples

    return Dataset(section="test", examples=synthetic_examples(0, 4, 32, "caption"), task="caption", fingerprint="fp")


@pytest.fixture(scope="module")
def folder(preset, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    model, processor = preset
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


class WrappedCaptioner:
    """Stands for an ONNX Runtime captioner: the same captions, through the protocol only."""

    def __init__(self, inner):
        self.inner = inner
        self.settings = {**inner.settings, "backend": "onnxruntime"}
        self.tokenizer = inner.processor.tokenizer

    def caption(self, images, prompts=None):
        return self.inner.caption(images, prompts)


def test_torch_target_evaluates_with_the_model_and_its_folder(preset, data, folder):
    from compressor.evaluation import EvalTarget, TorchCaptioner, evaluate

    model, processor = preset
    target = EvalTarget.torch(model, processor, GEN, "cpu", folder=folder)
    assert target.kind == "torch" and target.source_model() is None
    direct = TorchCaptioner(model, processor, GEN).caption([ex.load_image() for ex in data.examples])
    assert len(set(direct)) >= 3, "the preset gives one caption to every image: the test has no teeth"

    record, preds = evaluate(target, data, metrics=["rouge_1", "perplexity"], spec=NO_LATENCY, params_trainable=7)
    assert list(preds.values()) == direct and list(preds) == [ex.image_id for ex in data.examples]
    assert list(record["metrics"]) == ["rouge_1", "perplexity"] and record["metrics"]["perplexity"] > 1
    c = record["characteristics"]
    parts = ("vision", "qformer", "projection", "language_model")
    assert c["params_total"] == sum(p.numel() for p in model.parameters()) == sum(c[f"params_{p}"] for p in parts)
    assert c["gflops"] > 0 and c["gflops_new_tokens"] == 4 and c["params_trainable"] == 7
    assert c["size_mb"] > 0 and c["avg_inference_s"] > 0 and "latency_p50_s" not in c
    assert record["decoding"]["backend"] == "torch" and record["decoding"]["batch_size"] == 2
    assert record["data"] == {"resolved": "", "examples": 4, "fingerprint": "fp", "skipped": 0}

    bigger = target.make_captioner(3)  # latency at another batch size: same model and decoding
    assert bigger.settings["batch_size"] == 3 and bigger.caption([ex.load_image() for ex in data.examples]) == direct


def test_onnx_target_loads_its_pytorch_source_once_and_only_when_needed(preset, data, folder, tmp_path):
    from compressor.evaluation import EvalTarget, TorchCaptioner, evaluate

    model, processor = preset
    torch_record, _ = evaluate(EvalTarget.torch(model, processor, GEN), data, metrics=["rouge_1", "perplexity"],
                               spec=NO_LATENCY)
    export = tmp_path / "onnx"
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"characteristics": {"params_total": 123, "params_vision": 45}}))
    loads = []

    def source():
        loads.append(1)
        return model, processor

    made = []

    def make(bs):
        made.append(bs)
        return WrappedCaptioner(TorchCaptioner(model, processor, GEN.model_copy(update={"batch_size": bs})))

    def target():
        inner = TorchCaptioner(model, processor, GEN)
        return EvalTarget(WrappedCaptioner(inner), GEN, folder=export, make_captioner=make, source=source)

    # nothing needs the PyTorch model: it is never loaded
    rec, _ = evaluate(target(), data, metrics=["rouge_1"], spec=CharacteristicsSpec(latency=None, gflops=False))
    assert loads == [] and rec["characteristics"]["params_total"] == 123 and rec["characteristics"]["gflops"] is None
    assert rec["decoding"]["backend"] == "onnxruntime"

    # perplexity and GFLOPs are counted on the source, loaded once for both
    t = target()
    assert t.kind == "onnx"
    rec, _ = evaluate(t, data, metrics=["rouge_1", "perplexity"], spec=NO_LATENCY)
    assert loads == [1]
    assert rec["metrics"] == torch_record["metrics"]
    c = rec["characteristics"]
    assert c["gflops"] == torch_record["characteristics"]["gflops"] and c["params_vision"] == 45
    assert any("teacher-forced on the PyTorch model" in n for n in rec["notes"])
    assert any(n.startswith("gflops: counted on the PyTorch model") for n in rec["notes"])

    # latency times the captioner made for the largest batch size
    spec = CharacteristicsSpec(latency={"batch_sizes": [1, 3], "warmup": 0, "repeats": 1}, gflops=False)
    rec, _ = evaluate(target(), data, metrics=["rouge_1"], spec=spec)
    assert made == [3] and set(rec["characteristics"]["by_batch_size"]) == {"1", "3"}

    # without a source, both are left out with a note
    rec, _ = evaluate(EvalTarget(WrappedCaptioner(TorchCaptioner(model, processor, GEN)), GEN, folder=export), data,
                      metrics=["perplexity"], spec=NO_LATENCY)
    assert "perplexity" not in rec["metrics"] and rec["characteristics"]["gflops"] is None
    assert any("perplexity needs the PyTorch model" in n for n in rec["notes"])


def test_options_carry_the_model_metric_settings(preset, data, monkeypatch):
    """EvalOptions reaches the model-based metrics; a given teacher is always scored against."""
    import compressor.evaluation.model_metrics as MM
    from compressor.evaluation import EvalOptions, EvalTarget, evaluate

    model, processor = preset
    seen = {}

    def fake_teacher_cider(preds, teacher, scorer=None):
        seen["teacher"] = teacher
        return 42.0

    monkeypatch.setattr(MM, "teacher_cider", fake_teacher_cider)
    teacher = {ex.image_id: "a caption" for ex in data.examples}
    rec, _ = evaluate(EvalTarget.torch(model, processor, GEN), data, metrics=["rouge_1"],
                      options=EvalOptions(teacher_predictions=teacher), spec=CharacteristicsSpec(latency=None, gflops=False))
    assert rec["metrics"]["teacher_cider"] == 42.0 and seen["teacher"] == teacher
    assert list(rec["metrics"]) == ["rouge_1", "teacher_cider"]


def test_every_compute_group_of_the_table_has_its_function():
    """The evaluation dispatches from the table: each ``compute`` group of a metric row is implemented."""
    from compressor.evaluation.harness import PREDICTION_SCORERS
    from compressor.evaluation.model_metrics import MODEL_SCORERS
    from eval.metrics import rows

    assert {m.compute for m in rows(("caption", "vqa"))} == set(PREDICTION_SCORERS)
    assert {m.compute for m in rows("model")} == set(MODEL_SCORERS)


def test_model_metrics_alone_score_no_caption_metric_and_need_no_java(preset, data, monkeypatch):
    """`metrics: [perplexity]` computes perplexity only: no PTB tokenizer, METEOR or Java (an empty
    caption-metric list once meant the task's defaults)."""
    import eval.captioning
    import eval.coco_tools
    from compressor.evaluation import EvalTarget, evaluate

    def no_java():
        raise AssertionError("Java was looked for")

    monkeypatch.setattr(eval.coco_tools, "check_java", no_java)
    monkeypatch.setattr(eval.captioning, "check_java", no_java)
    model, processor = preset
    record, _ = evaluate(EvalTarget.torch(model, processor, GEN), data, metrics=["perplexity"], spec=NO_LATENCY)
    assert list(record["metrics"]) == ["perplexity"] and record["metrics"]["perplexity"] > 1
