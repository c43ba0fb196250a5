"""Perplexity of reference captions (checked against the model's own loss), the up-front checks of
an evaluation (Java, metric model folders, metric names, data), and the result-file writers."""

from __future__ import annotations

import csv
import json
import math

import pytest

from compressor.errors import DataError, UserInputError


@pytest.fixture(scope="module")
def teacher():
    from compressor.models.loading import load_model
    from compressor.models.presets import SHIPPED

    return load_model(SHIPPED["shapes-teacher"])


def _dataset(examples, task="caption"):
    from compressor.data import Dataset

    return Dataset(section="test", examples=examples, task=task, fingerprint="x")


def test_perplexity_equals_exp_of_the_models_own_loss(teacher):
    import torch

    from compressor.data.synthetic import synthetic_examples
    from compressor.evaluation import perplexity
    from compressor.families import family_for_model
    from compressor.models.batches import training_batch
    from compressor.recipe.schema import GenerationSpec

    model, processor = teacher
    ex = synthetic_examples(2000, 1, 64, "caption")[0]
    ex1 = type(ex)(image_id=ex.image_id, captions=ex.captions[:1], render=ex.render)
    ppl = perplexity(model, processor, _dataset([ex1]), GenerationSpec(), "cpu")
    batch = training_batch(family_for_model(model), processor, [ex1.load_image()], [ex1.captions[0]], [""])
    with torch.inference_mode():
        loss = model(**batch).loss  # mean token NLL of the one caption
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_perplexity_is_lower_for_the_true_captions(teacher):
    from compressor.data.synthetic import synthetic_examples
    from compressor.evaluation import perplexity
    from compressor.recipe.schema import GenerationSpec

    model, processor = teacher
    exs = synthetic_examples(2000, 6, 64, "caption")
    shuffled = [type(e)(image_id=e.image_id, captions=exs[(i + 3) % 6].captions, render=e.render) for i, e in enumerate(exs)]
    gen = GenerationSpec()
    true_ppl = perplexity(model, processor, _dataset(exs), gen, "cpu", max_examples=12)
    wrong_ppl = perplexity(model, processor, _dataset(shuffled), gen, "cpu", max_examples=12)
    assert 1.0 < true_ppl < wrong_ppl


def test_java_missing_is_checked_up_front(monkeypatch, tmp_path):
    from compressor.evaluation import check_metric_requirements

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserInputError, match="`java` was not found on PATH"):
        check_metric_requirements(["cider"], "caption")
    with pytest.raises(UserInputError, match="java"):
        check_metric_requirements(["teacher_cider"], "caption", teacher=True)
    check_metric_requirements(["rouge_1", "rouge_2"], "caption")  # no Java needed
    check_metric_requirements(["vqa_accuracy"], "vqa")


def test_metric_models_and_names_are_checked_up_front(tmp_path):
    from compressor.evaluation import check_metric_requirements, resolve_metrics

    with pytest.raises(UserInputError, match="--clipscore-model"):
        check_metric_requirements(["clipscore"], "vqa")
    with pytest.raises(UserInputError, match="evaluate.bertscore.model"):
        check_metric_requirements(["bertscore_f1"], "vqa")
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(UserInputError, match="no config.json"):
        check_metric_requirements(["clipscore"], "vqa", clipscore_model=str(folder))
    with pytest.raises(UserInputError, match="teacher"):
        check_metric_requirements(["teacher_cider"], "vqa")
    with pytest.raises(UserInputError, match="Did you mean 'bleu_4'"):
        resolve_metrics(["bleu4"], "caption")
    assert resolve_metrics(None, "vqa") == ["vqa_accuracy"]
    assert resolve_metrics(["cider", "cider", "bleu_4"], "caption") == ["cider", "bleu_4"]


def test_data_checks_for_metrics():
    from compressor.data import Example
    from compressor.evaluation import check_data_for_metrics

    yes_no = [Example(image_id="a", question="is it red?", answers=("yes",) * 3, question_id="q1", render=(8, None))]
    other = [Example(image_id="a", question="what color?", answers=("red",) * 3, question_id="q2", render=(8, None))]
    check_data_for_metrics(["mme_acc"], _dataset(yes_no, "vqa"))
    with pytest.raises(DataError, match="q2"):
        check_data_for_metrics(["mme_acc_plus"], _dataset(other, "vqa"))
    with pytest.raises(UserInputError, match="holds captions"):
        check_data_for_metrics(["vqa_accuracy"], _dataset([Example(image_id="a", captions=("x",))]))
    with pytest.raises(DataError, match="compress predict"):
        check_data_for_metrics(["cider"], _dataset([Example(image_id="a")]))


def test_result_writers_round_trip(tmp_path):
    from eval.predictions import (
        load_answers_csv,
        load_predictions,
        write_answers_csv,
        write_captions_csv,
        write_vqa_results,
    )

    p = write_vqa_results(tmp_path / "a.json", {"7": "yes", "12": "two"})
    assert json.loads(p.read_text()) == [{"question_id": 7, "answer": "yes"}, {"question_id": 12, "answer": "two"}]
    assert load_predictions(p) == {"7": "yes", "12": "two"}
    rows = [("img 1.png", 'what is "it", then?', "a, b"), ("sub/x.jpg", "é?", "")]
    p = write_answers_csv(tmp_path / "a.csv", rows)
    assert load_answers_csv(p) == rows
    p = write_captions_csv(tmp_path / "c.csv", [("x.png", "a red circle")])
    assert list(csv.reader(p.open())) == [["image_name", "caption"], ["x.png", "a red circle"]]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_name,answer\nx.png,yes\n")
    with pytest.raises(DataError, match="missing question"):
        load_answers_csv(bad)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.csv", "a.json", "bad.csv", "c.csv"]  # no temp files
