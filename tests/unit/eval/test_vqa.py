"""VQA accuracy (official VQA v2 normalisation and formula) and MME acc / acc+."""

from __future__ import annotations

import pytest

from compressor.errors import DataError
from eval.vqa import (
    mme_scores,
    normalize_answer,
    parse_yes_no,
    process_punctuation,
    question_accuracy,
    vqa_accuracy,
    vqa_per_question,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("isnt", "isn't"),
        ("A Red Car!", "red car"),
        ("none", "0"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation is deleted, not spaced
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("yes.", "yes"),
        ("black/white", "black white"),  # no space next to "/": it becomes a space
        ("black / white", "black white"),  # a space next to "/": it is deleted
        ("hot-dog", "hot dog"),
        ("  Ten\tDogs\n", "10 dogs"),
        ("Im", "im"),  # the official map has "Im" capitalised, which never matches lowercased text
        ("what's", "what's"),  # "'" is not in the punctuation list
    ],
)
def test_official_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_keeps_case():
    # "," touches a space: deleted; "!" does not: replaced by a space (kept, as in the official code).
    assert process_punctuation("Hello, World!") == "Hello World "


@pytest.mark.parametrize(
    ("n_humans", "expected"),
    # Leave-one-out over 10 annotators of min(matches among the other 9 / 3, 1):
    # k of 10 gave the answer -> (k * min(k-1, 3) + (10-k) * min(k, 3)) / 30.
    [(0, 0.0), (1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (10, 100.0)],
)
def test_ten_answer_formula(n_humans, expected):
    answers = ["cat"] * n_humans + ["dog"] * (10 - n_humans)
    assert 100 * question_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_fewer_than_three_answers_is_exact_match_after_normalisation():
    assert question_accuracy("Dog.", ["the dog"]) == 1.0
    assert question_accuracy("cat", ["the dog"]) == 0.0
    assert question_accuracy("Blue", ["red", "blue"]) == 1.0  # not 1/3: no leave-one-out below 3


def test_strict_official_mode_reproduces_the_quirk():
    # The official script does not normalise human answers that all agree.
    answers = ["Two"] * 10
    assert question_accuracy("two", answers) == 1.0
    assert question_accuracy("two", answers, strict_official=True) == 0.0
    # When they disagree it only processes their punctuation (no number words, no articles):
    mixed = ["2."] * 3 + ["the two"] * 7
    assert question_accuracy("two", mixed, strict_official=True) == pytest.approx(0.9)  # 3 of 10 say "2"
    assert question_accuracy("two", mixed) == 1.0  # fully normalised, all 10 say "2"


def test_vqa_accuracy_mean_and_ids():
    preds = {1: "yes", 2: "Two", 3: "blue"}
    answers = {"1": ["yes"] * 10, "2": ["2"] * 2 + ["3"] * 8, "3": ["red"]}
    assert vqa_per_question(preds, answers) == {"1": 100.0, "2": pytest.approx(60.0), "3": 0.0}
    assert vqa_accuracy(preds, answers) == pytest.approx(160 / 3)


def test_vqa_errors():
    with pytest.raises(DataError, match="ids in predictions without references: 2"):
        vqa_accuracy({"1": "a", "2": "b"}, {"1": ["a"]})
    with pytest.raises(DataError, match="no human answers"):
        vqa_accuracy({"1": "a"}, {"1": []})
    with pytest.raises(DataError, match="must be strings"):
        vqa_accuracy({"1": 3}, {"1": ["3"]})


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("yes", "yes"),
        ("No.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("  YES\n", "yes"),
        ("no there is not", "no"),
        ("I think yes", "other"),  # only the first four characters count
        ("nope", "no"),
        ("maybe", "other"),
        ("", "other"),
    ],
)
def test_parse_yes_no(raw, label):
    assert parse_yes_no(raw) == label


def test_mme_hand_case():
    # Three images, two questions each: img1 both right, img2 one right, img3 none right.
    preds = {"q1": "Yes", "q2": "no.", "q3": "yes", "q4": "yes", "q5": "I don't know", "q6": "No"}
    answers = {"q1": "yes", "q2": "No", "q3": "yes", "q4": "no", "q5": "yes", "q6": "yes"}
    images = {"q1": "img1", "q2": "img1", "q3": "img2", "q4": "img2", "q5": "img3", "q6": "img3"}
    got = mme_scores(preds, answers, images)
    assert got == {"mme_acc": pytest.approx(50.0), "mme_acc_plus": pytest.approx(100 / 3)}


def test_mme_accepts_agreeing_answer_lists():
    got = mme_scores({"q1": "yes", "q2": "no"}, {"q1": ["Yes"], "q2": ["yes", "YES"]}, {"q1": "i", "q2": "i"})
    assert got == {"mme_acc": 50.0, "mme_acc_plus": 0.0}
    with pytest.raises(DataError, match="'no / yes'"):
        mme_scores({"q": "yes"}, {"q": ["yes", "no"]}, {"q": "i"})


def test_mme_errors():
    with pytest.raises(DataError, match="'yes' or 'no'"):
        mme_scores({"q": "yes"}, {"q": "maybe"}, {"q": "i"})
    with pytest.raises(DataError, match="no image id"):
        mme_scores({"q": "yes"}, {"q": "yes"}, {})
