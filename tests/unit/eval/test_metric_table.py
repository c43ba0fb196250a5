"""The metric table is the one source of the metric vocabulary: the schema's keys, the gate's
directions, the report order, the model card's names and the plots all follow it (a row added
to the table shows up everywhere), and the orders users have seen stay as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

import eval.metrics as M
from tests.conftest import REPO

#: The orders as released before the table existed (the README reference and the reports).
LISTED_METRICS = (
    "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "rouge_1", "rouge_2", "spice",
    "vqa_accuracy", "bertscore_f1", "clipscore", "mme_acc", "mme_acc_plus", "perplexity", "teacher_cider",
)
# a family's part adds its params_/gflops_/size_mb_ rows after the others' (SmolVLM's connector last)
PARTS = ("vision", "qformer", "projection", "language_model", "connector")
LISTED_CHARS = (
    "params_total", "params_trainable", *(f"params_{p}" for p in PARTS),
    "gflops", *(f"gflops_{p}" for p in PARTS),
    "latency_p50_s", "latency_p95_s", "tokens_per_s", "avg_inference_s", "peak_rss_mb", "peak_cuda_mb", "size_mb",
    "spec_acceptance", "spec_tokens_per_call", *(f"size_mb_{p}" for p in PARTS),
)
REPORT_METRICS = (
    "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "rouge_1", "rouge_2", "cider", "spice",
    "vqa_accuracy", "mme_acc", "mme_acc_plus", "bertscore_f1", "clipscore", "teacher_cider", "perplexity",
)
REPORT_CHARS = (
    "params_total", "params_trainable", *(f"params_{p}" for p in PARTS),
    "gflops", *(f"gflops_{p}" for p in PARTS),
    "avg_inference_s", "latency_p50_s", "latency_p95_s", "tokens_per_s", "spec_acceptance", "spec_tokens_per_call",
    "peak_rss_mb", "peak_cuda_mb", "size_mb", *(f"size_mb_{p}" for p in PARTS),
)
RUNS_COLUMNS = (
    "params_total", *(f"params_{p}" for p in PARTS),
    "gflops", "latency_p50_s", "latency_p95_s", "tokens_per_s", "size_mb", "peak_rss_mb",
)
CARD_NAMES = {
    "bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "meteor": "METEOR",
    "rouge_l": "ROUGE-L", "rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "cider": "CIDEr", "spice": "SPICE",
    "vqa_accuracy": "VQA accuracy", "mme_acc": "MME acc", "mme_acc_plus": "MME acc+", "bertscore_f1": "BERTScore F1",
    "clipscore": "CLIPScore", "teacher_cider": "CIDEr against the baseline's captions", "perplexity": "Perplexity",
}
LOWER = {"perplexity", "latency_p50_s", "latency_p95_s", "avg_inference_s", "peak_rss_mb", "peak_cuda_mb", "size_mb",
         "gflops", "params_total", "params_trainable"}

FAKE = M.Metric("fake_score", "Fake Score", M.LOWER, "caption", "caption_scorer", description="a test row")


@pytest.fixture
def fake_table(monkeypatch):
    """The table with one more caption metric (lower is better), placed after CIDEr."""
    table = list(M.TABLE)
    table.insert([r.key for r in table].index("cider") + 1, FAKE)
    monkeypatch.setattr(M, "TABLE", tuple(table))
    return FAKE


def test_rows_are_well_formed():
    keys = [m.key for m in M.rows()]
    assert len(keys) == len(set(keys)), "a key twice"
    for m in M.rows():
        assert m.kind in ("caption", "vqa", "model", "characteristic"), m
        assert m.needs <= set(M.NEEDS), m
        assert m.compute and m.name and m.description, m
        assert (m.model_folder is not None) == ("model_folder" in m.needs), m
        assert m.key == m.key.lower() and " " not in m.key
    assert M.default_metrics("caption") == ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
    assert M.default_metrics("vqa") == ("vqa_accuracy",)
    assert M.headline_keys() == ("params_total", "params_trainable", "gflops", "avg_inference_s")
    assert not M.higher_is_better("perplexity") and M.higher_is_better("spec_acceptance")


def test_orders_users_have_seen_are_kept():
    assert M.metric_keys() == LISTED_METRICS
    assert M.characteristic_keys() == LISTED_CHARS
    assert M.display_keys("metrics") == REPORT_METRICS
    assert M.display_keys("characteristics") == REPORT_CHARS
    assert M.runs_table_columns() == RUNS_COLUMNS
    assert {k: M.display_name(k) for k in CARD_NAMES} == CARD_NAMES


def test_schema_vocabulary_is_the_table():
    from compressor.recipe import schema as S

    assert S.METRIC_KEYS == M.metric_keys()
    assert S.CHARACTERISTIC_KEYS == M.characteristic_keys()
    assert S.GATE_KEYS == M.gate_keys() == S.METRIC_KEYS + S.CHARACTERISTIC_KEYS
    assert S.CAPTION_METRICS == M.default_metrics("caption")
    assert tuple(S.PARTS) == M.part_names()


def test_a_row_added_to_the_table_reaches_the_schema():
    """In a fresh process (the schema derives its keys at import): patch the table, then import."""
    code = (
        "import eval.metrics as M\n"
        "M.TABLE = M.TABLE + (M.Metric('fake_score', 'Fake', M.HIGHER, 'caption', 'caption_scorer'),"
        " M.Metric('fake_char_s', 'Fake (s)', M.LOWER, 'characteristic', 'latency'))\n"
        "from compressor.recipe import schema as S\n"
        "import json; print(json.dumps([S.METRIC_KEYS, S.CHARACTERISTIC_KEYS, S.GATE_KEYS]))\n"
        "from eval.captioning import CAPTION_METRICS\n"
        "print('fake_score' in CAPTION_METRICS)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    metric_keys, char_keys, gate_keys = json.loads(lines[0])
    assert metric_keys[-1] == "fake_score" and char_keys[-1] == "fake_char_s"
    assert "fake_score" in gate_keys and "fake_char_s" in gate_keys
    assert lines[1] == "True"  # the caption scorer accepts it as one of its metrics


def test_gate_directions_come_from_the_table(fake_table):
    from eval.gates import lower_is_better, rule_problems

    for m in M.rows():
        assert lower_is_better(m.key) is (not m.higher_is_better), m.key
    gate_lower = {k for k in M.gate_keys() if lower_is_better(k)}
    assert gate_lower == LOWER | {"fake_score"} | {k for k in M.gate_keys() if k.startswith(("params_", "gflops_", "size_mb_"))}
    assert not lower_is_better("tokens_per_s") and not lower_is_better("cider")
    assert lower_is_better("params_connector") and lower_is_better("gflops_connector")  # another family's part
    assert rule_problems("fake_score", "max_drop", 1.0)  # refused: lower is better, as the table says
    assert not rule_problems("cider", "max_drop", 1.0)


def test_report_rows_follow_the_table(fake_table):
    from eval.reports import comparison_rows, experiment_columns

    ev = {"metrics": {"fake_score": 1.0, "perplexity": 2.0, "cider": 3.0, "bleu_1": 4.0, "spice": 5.0},
          "characteristics": {"size_mb": 1.0, "params_total": 10}}
    keys = [k for k, _ in comparison_rows(["a"], {"a": ev})]
    assert keys[:5] == ["bleu_1", "cider", "fake_score", "spice", "perplexity"]
    # the headline rows always come with a measured model, in table order
    assert keys[5:] == ["params_total", "params_trainable", "gflops", "avg_inference_s", "size_mb"]
    mets, chars = experiment_columns([{"eval": ev}])
    assert mets == ["bleu_1", "cider", "fake_score", "spice", "perplexity"] and chars == ["params_total", "size_mb"]


def test_card_names_and_plots_follow_the_table(fake_table):
    from eval.plots import _metric_keys
    from exporters.model_card import _headline, eval_results

    report = {"evaluations": {"b": {"metrics": {"fake_score": 2.0, "cider": 1.0}, "data": {}},
                              "c": {"metrics": {"fake_score": 1.0, "cider": 2.0}, "data": {}}}}
    names = {r.metric_name for r in eval_results(report, "synthetic")}
    assert {"Fake Score (b)", "CIDEr (c)"} <= names
    assert "Fake Score 2.00 → 1.00" in _headline(report["evaluations"]["b"], report["evaluations"]["c"], "b", "c")
    assert _metric_keys(list(report["evaluations"].values())) == ["cider", "fake_score"]


def test_part_names_are_read_in_one_place(monkeypatch):
    """Other part names (SmolVLM's: vision, connector, language_model) give their per-part keys everywhere."""
    import compressor.families as F
    from eval.plots import _parts
    from eval.reports import comparison_rows

    monkeypatch.setattr(F, "part_names", lambda: ("vision", "connector", "language_model"))  # what part_names() reads
    assert M.part_names() == ("vision", "connector", "language_model")
    chars = M.characteristic_keys()
    assert "params_connector" in chars and "gflops_connector" in chars and "params_qformer" not in chars
    assert M.display_name("params_connector") == "Parameters (connector)"
    assert _parts() == [("params_vision", "vision"), ("params_connector", "connector"),
                        ("params_language_model", "language model")]
    ev = {"metrics": {}, "characteristics": {"params_connector": 5, "params_total": 9}}
    assert [k for k, _ in comparison_rows(["a"], {"a": ev})][:2] == ["params_total", "params_trainable"]
    assert "params_connector" in [k for k, _ in comparison_rows(["a"], {"a": ev})]


def test_requirements_are_the_tables_needs(monkeypatch, tmp_path):
    """A metric's needs, not its name, decide the up-front checks."""
    from compressor.errors import UserInputError
    from compressor.evaluation import check_metric_requirements

    rows = tuple(replace(r, needs=r.needs | {"teacher"}) if r.key == "rouge_1" else r for r in M.TABLE)
    monkeypatch.setattr(M, "TABLE", rows)
    with pytest.raises(UserInputError, match="rouge_1 scores against a teacher's captions"):
        check_metric_requirements(["rouge_1"], "caption")
    check_metric_requirements(["rouge_1"], "caption", teacher=True)
