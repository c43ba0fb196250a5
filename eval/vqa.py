"""VQA accuracy (VQA v2 evaluation) and MME yes/no accuracy.

Sources followed:

* VQA accuracy: the official evaluation script, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
  of https://github.com/GT-Vision-Lab/VQA (Antol et al. 2015; Goyal et al. 2017). The answer
  normalisation (``processPunctuation`` then ``processDigitArticle``: punctuation list, the
  period and comma rules, number words, articles, the contractions map) is copied unchanged,
  including its quirks (the contractions map has capitalised keys that never match lowercased
  text). Accuracy is ``min(#humans that said the answer / 3, 1)`` averaged over the leave-one-out
  subsets of the human answers.
* MME: the ``eval_tool/calculation.py`` script of MME (Fu et al. 2023, "MME: A Comprehensive
  Evaluation Benchmark for Multimodal Large Language Models"): yes/no parsing of the generated
  answer, ``acc`` over questions and ``acc+`` over images whose questions are all right.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from compressor.errors import DataError
from eval.predictions import match_ids

logger = logging.getLogger(__name__)

# --- verbatim from vqaEval.py (GT-Vision-Lab/VQA, master) ------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
# The official pattern: "(?!<=\d)" is a typo for a look-behind, kept as is (it never matches
# "<=", so a period is removed unless a digit follows it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCTUATION = (
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# ---------------------------------------------------------------------------------------------


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: drop or space out punctuation, remove periods.

    A punctuation mark is deleted when it touches a space somewhere in the text (or the text has
    a digit-comma-digit group) and replaced by a space otherwise; a period is removed unless a
    digit follows it (``"1.5"`` stays).

    Args:
        text: one answer.

    Returns:
        The answer with punctuation handled (case unchanged).
    """
    out = text
    comma_digits = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE as `count` (32), so at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lowercase, number words to digits, drop articles, contractions.

    Args:
        text: one answer (after :func:`process_punctuation`).

    Returns:
        Space-joined lowercase words.
    """
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official normalisation of a predicted answer.

    Newlines and tabs become spaces, the ends are stripped, then :func:`process_punctuation`
    and :func:`process_digit_article` run, as ``vqaEval.py`` does for ``resAns``.

    Args:
        text: a generated or human answer.

    Returns:
        The normalised answer, e.g. ``"Two"`` → ``"2"``, ``"the dog."`` → ``"dog"``,
        ``"isnt"`` → ``"isn't"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def question_accuracy(prediction: str, answers: Sequence[str], *, strict_official: bool = False) -> float:
    """VQA accuracy of one prediction, in [0, 1].

    With three or more human answers: the official formula, the mean over the leave-one-out
    subsets of ``min(#matching answers in the subset / 3, 1)`` (2 of 10 humans → 0.6, 3 → 0.9,
    4 or more → 1). With one or two answers: 1 when the normalised prediction equals any
    normalised answer, else 0.

    Args:
        prediction: the model's answer.
        answers: the human answers (usually 10 for VQA v2).
        strict_official: reproduce ``vqaEval.py`` exactly: human answers are only
            punctuation-processed, and only when they disagree (the VQA v2 annotations are
            already normalised). The default normalises every human answer fully, as it does
            the prediction, which is what free-form user answers need (``"Two"`` matches
            ``"2"``).

    Returns:
        The accuracy of this question, in [0, 1].

    Raises:
        DataError: ``answers`` is empty.
    """
    if not answers:
        raise DataError("a question has no human answers")
    pred = normalize_answer(prediction)
    if strict_official:
        gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    else:
        gts = [normalize_answer(a) for a in answers]
    if len(gts) < 3:
        return 1.0 if pred in gts else 0.0
    n_match = sum(g == pred for g in gts)
    # Leave-one-out: dropping a matching answer leaves n_match - 1 matches, any other n_match.
    total = sum(min(n_match - (g == pred), 3) for g in gts)
    return total / (3 * len(gts))


def vqa_per_question(
    predictions: Mapping[Any, str], answers: Mapping[Any, Sequence[str]], *, strict_official: bool = False
) -> dict[str, float]:
    """VQA accuracy of every question, on the 0-100 scale.

    Args:
        predictions: ``{question_id: answer}``.
        answers: ``{question_id: [human answers]}``; a single string counts as one answer.
        strict_official: see :func:`question_accuracy`.

    Returns:
        ``{question_id (str): accuracy in [0, 100]}`` in the order of ``predictions``.

    Raises:
        DataError: the two mappings do not cover the same ids (the rows list them), a question
            has no answers, or a prediction is not a string.
    """
    ids = match_ids(predictions, answers)
    preds = {str(k): v for k, v in predictions.items()}
    gts = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in answers.items()}
    bad = [i for i in ids if not isinstance(preds[i], str)]
    if bad:
        raise DataError("predicted answers must be strings; these question ids have something else:", bad)
    empty = [i for i in ids if not gts[i]]
    if empty:
        raise DataError("these questions have no human answers:", empty)
    return {i: 100.0 * question_accuracy(preds[i], gts[i], strict_official=strict_official) for i in ids}


def vqa_accuracy(
    predictions: Mapping[Any, str], answers: Mapping[Any, Sequence[str]], *, strict_official: bool = False
) -> float:
    """VQA accuracy (VQA v2 evaluation), the mean over questions, on the 0-100 scale.

    Args:
        predictions: ``{question_id: answer}``.
        answers: ``{question_id: [human answers]}``.
        strict_official: see :func:`question_accuracy`.

    Returns:
        The accuracy in [0, 100].

    Raises:
        DataError: see :func:`vqa_per_question`.
    """
    per_q = vqa_per_question(predictions, answers, strict_official=strict_official)
    acc = sum(per_q.values()) / len(per_q)
    logger.info("VQA accuracy %.2f over %d questions", acc, len(per_q))
    return acc


def parse_yes_no(text: str) -> str:
    """MME's ``parse_pred_ans``: map a generated answer to ``"yes"``, ``"no"`` or ``"other"``.

    The answer is lowercased and stripped; ``"yes"``/``"no"`` are taken as is, otherwise the
    first four characters decide (``"yes"`` in them → yes, else ``"no"`` in them → no).

    Args:
        text: the generated answer.

    Returns:
        ``"yes"``, ``"no"`` or ``"other"``.
    """
    ans = text.lower().strip()
    if ans in ("yes", "no"):
        return ans
    prefix = ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(
    predictions: Mapping[Any, str], answers: Mapping[Any, str], image_ids: Mapping[Any, Any]
) -> dict[str, float]:
    """MME accuracy and accuracy+ (Fu et al. 2023), on the 0-100 scale.

    ``mme_acc`` is the fraction of questions answered right; ``mme_acc_plus`` the fraction of
    images whose questions (two per image in MME) are all answered right. MME's per-subtask
    score is ``mme_acc + mme_acc_plus`` (0-200); call this once per subtask to get it.

    Args:
        predictions: ``{question_id: generated answer}``, parsed with :func:`parse_yes_no`.
        answers: ``{question_id: "yes" | "no"}`` (case-insensitive); a list of answers that all
            agree (``["yes"]``) is accepted too.
        image_ids: ``{question_id: image id}``; the image ids must be unique across subtasks if
            several are scored together.

    Returns:
        ``{"mme_acc": float, "mme_acc_plus": float}``.

    Raises:
        DataError: the mappings do not cover the same question ids, a question has no image id,
            or a ground-truth answer is not yes/no.
    """
    ids = match_ids(predictions, answers)
    preds = {str(k): v for k, v in predictions.items()}
    gts: dict[str, str] = {}
    for k, v in answers.items():
        # A list of answers (as VQA-style references come) is accepted when they all agree.
        labels = {str(a).strip().lower() for a in ([v] if isinstance(v, str) else v)}
        gts[str(k)] = labels.pop() if len(labels) == 1 else " / ".join(sorted(labels)) or "(none)"
    imgs = {str(k): str(v) for k, v in image_ids.items()}
    missing = [i for i in ids if i not in imgs]
    if missing:
        raise DataError("these questions have no image id:", missing)
    not_yes_no = [f"{i}: {gts[i]!r}" for i in ids if gts[i] not in ("yes", "no")]
    if not_yes_no:
        raise DataError("MME ground-truth answers must be 'yes' or 'no':", not_yes_no)
    right: dict[str, bool] = {}
    per_image: dict[str, list[bool]] = {}
    for i in ids:
        ok = parse_yes_no(preds[i]) == gts[i]
        right[i] = ok
        per_image.setdefault(imgs[i], []).append(ok)
    other = sum(parse_yes_no(preds[i]) == "other" for i in ids)
    if other:
        logger.info("MME: %d of %d answers are neither yes nor no (counted wrong)", other, len(ids))
    acc = 100.0 * sum(right.values()) / len(ids)
    acc_plus = 100.0 * sum(all(v) for v in per_image.values()) / len(per_image)
    return {"mme_acc": acc, "mme_acc_plus": acc_plus}
