"""The model card: huggingface_hub metadata that round-trips, the model-index carrying baseline and
candidate metrics, and a body that says what was measured, removed and allowed."""

from __future__ import annotations

import copy

import pytest

from exporters.model_card import build_model_card, card_labels, card_metrics


def _eval(label: str, cider: float, bleu: float, params: int, latency: float) -> dict:
    return {
        "label": label,
        "task": "caption",
        "metrics": {"bleu_4": bleu, "cider": cider, "meteor": float("nan")},
        "characteristics": {"params_total": params, "params_vision": 1000, "gflops": params / 1e5, "latency_p50_s": latency,
                            "latency_p95_s": latency * 1.2, "size_mb": params * 4 / 1e6, "gflops_new_tokens": 20,
                            "latency_batch_size": 1},
        "decoding": {"backend": "torch", "device": "cpu", "num_beams": 3, "max_new_tokens": 12, "prompt": "a photo of"},
        "data": {"section": "eval", "examples": 64, "fingerprint": "f" * 64},
    }


REPORT = {
    "recipe": "llm28_q8",
    "recipe_hash": "0123456789abcdef" * 4,
    "evaluations": {"baseline": _eval("baseline", 124.2, 41.5, 3_744_700_000, 2.1),
                    "candidate": _eval("candidate", 122.9, 40.1, 3_394_900_000, 0.66)},
    "gate": {"passed": True, "candidate": "candidate", "baseline": "baseline", "summary": "all rules passed",
             "verdicts": [{"key": "cider", "rule": "max_drop", "threshold": 2.0, "candidate": 122.9, "baseline": 124.2,
                           "observed": 1.3, "passed": True, "reason": "drop 1.30 ≤ 2"}]},
    "stages": [
        {"index": 0, "type": "lora_finetune", "label": None, "seconds": 10.0, "status": "ran",
         "summary": {"steps": 100, "lora": {"by_part": {"qformer": 36, "language_model": 128}}}},
        {"index": 1, "type": "remove_layers", "label": None, "seconds": 3.0, "status": "ran",
         "summary": {"removed": [{"part": "qformer", "before": 12, "after": 8, "removed": [8, 9, 10, 11]},
                                 {"part": "language_model", "before": 32, "after": 28, "removed": [28, 29, 30, 31]}]}},
        {"index": 2, "type": "heal", "label": None, "seconds": 30.0, "status": "ran", "summary": {"steps": 500, "loss": "distill"}},
    ],
}
RECIPE = "name: llm28_q8\nmodel: Salesforce/blip2-opt-2.7b\ndata:\n  format: coco\n"


def _card(report=REPORT, **kw):
    from compressor.pipeline.publish import stage_card

    args = dict(stage_notes=stage_card, repo_id="me/blip2-llm28-q8", recipe_yaml=RECIPE, base_model="Salesforce/blip2-opt-2.7b", license="mit",
                datasets=["coco"], config={"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"]},
                files=["README.md", "model.safetensors", "onnx/decoder.onnx"], onnx_files=["onnx/decoder.onnx"])
    args.update(kw)
    return build_model_card(report, **args)


def test_card_round_trips_with_strict_metadata_and_carries_both_labels(tmp_path):
    path = tmp_path / "README.md"
    _card().save(path)
    from huggingface_hub import ModelCard

    card = ModelCard.load(path, ignore_metadata_errors=False)
    assert card.data.base_model == "Salesforce/blip2-opt-2.7b"
    assert card.data.license == "mit" and card.data.datasets == ["coco"]
    assert card.data.pipeline_tag == "image-to-text" and card.data.library_name == "transformers"
    parsed = card_metrics(path)
    assert parsed == {"baseline": {"bleu_4": 41.5, "cider": 124.2}, "candidate": {"bleu_4": 40.1, "cider": 122.9}}
    # NaN metrics stay out of the model-index (the Hub rejects non-numbers)
    assert all(r.metric_type != "meteor" for r in card.data.eval_results)
    assert str(card) == path.read_text()


def test_model_index_follows_the_report(tmp_path):
    """Teeth: a different candidate value in the report is a different value parsed from the card."""
    other = copy.deepcopy(REPORT)
    other["evaluations"]["candidate"]["metrics"]["cider"] = 99.5
    _card(other).save(tmp_path / "README.md")
    assert card_metrics(tmp_path / "README.md")["candidate"]["cider"] == 99.5


def test_body_says_what_was_measured_removed_and_allowed():
    text = str(_card())
    for needle in (
        "| params_total | 3744.700M | 3394.900M | ×0.907 |",  # before/after table
        "| latency_p50_s | 2.1000 | 0.6600 | ×0.314 |",
        "| gflops |", "| size_mb |",
        "qformer: removed layers [8, 9, 10, 11] of 12 (8 kept)",
        "language_model: removed layers [28, 29, 30, 31] of 32 (28 kept)",
        "`cider` may drop at most 2 points below the baseline: drop 1.30 ≤ 2 — pass",
        'Blip2ForConditionalGeneration.from_pretrained("me/blip2-llm28-q8")',
        'text="a photo of"', "num_beams=3, max_new_tokens=12",
        "onnx/decoder.onnx", "compress predict",
        "```yaml\nname: llm28_q8\nmodel: Salesforce/blip2-opt-2.7b",
        "64 examples", "20 generated tokens",
    ):
        assert needle in text, needle


def test_adapter_card_loads_with_peft_and_says_what_it_applies_to():
    note = "This adapter was trained on the model after stage 1 (`remove_layers`)"
    text = str(_card(what="adapter", adapter_note=note, onnx_files=[]))
    assert "library_name: peft" in text and "PeftModel.from_pretrained(base, \"me/blip2-llm28-q8\")" in text
    assert note in text and "### ONNX" not in text


def test_card_without_a_hub_base_model_leaves_base_model_out(tmp_path):
    card = _card(base_model=None, base_model_desc="the vlm-compress preset `tiny-blip2-opt`", license=None, datasets=[])
    card.save(tmp_path / "README.md")
    from huggingface_hub import ModelCard

    loaded = ModelCard.load(tmp_path / "README.md", ignore_metadata_errors=False)
    assert loaded.data.base_model is None and loaded.data.license is None
    assert "the vlm-compress preset `tiny-blip2-opt`, is not a Hub repository" in str(card)
    # without datasets the model-index names the data format
    assert {r.dataset_type for r in loaded.data.eval_results} == {"coco"}


def test_labels_come_from_the_gate_else_first_and_last():
    assert card_labels(REPORT) == ("baseline", "candidate")
    no_gate = {"evaluations": {"a": {}, "b": {}, "c": {}}}
    assert card_labels(no_gate) == ("a", "c")
    assert card_labels({"evaluations": {"only": {}}}) == (None, "only")


def test_malformed_model_index_is_an_error_when_loaded_strictly(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n# x\n")
    with pytest.raises(ValueError):
        card_metrics(path)


def test_card_explains_speculative_decoding():
    """An evaluation with a draft and an export bundling one are explained (and none is when absent)."""
    report = copy.deepcopy(REPORT)
    assert "Speculative decoding" not in _card(report).text and "speculative" not in _card(report).text
    cand = report["evaluations"]["candidate"]
    cand["decoding"]["speculative"] = {"draft": "runs/cand/onnx", "draft_backend": "onnxruntime", "num_draft_tokens": 4}
    cand["characteristics"]["spec_acceptance"] = 0.72
    report["stages"].append({"index": 3, "type": "export", "label": None, "seconds": 9.0, "status": "ran", "summary": {
        "onnx": {"graphs": {}, "draft": {"folder": "draft", "num_draft_tokens": 4, "source": "runs/cand/final"}}}})
    text = _card(report).text
    assert "speculative decoding with the draft `runs/cand/onnx` (4 tokens per call, 72% accepted)" in text
    assert "its own greedy captions" in text and "bundles a speculative-decoding draft (runs/cand/final" in text
