"""Caption metrics: hand-checked values, parity with pycocoevalcap's own pipeline, and robustness."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from compressor.errors import DataError, StageError, UserInputError
from eval.captioning import DEFAULT_CAPTION_METRICS, CaptionScorer, score_captions
from eval.coco_tools import (
    PTB_JAR,
    check_java,
    find_pycocoevalcap_dir,
    meteor_safe,
    ptb_tokenize,
    run_spice,
    spice_status,
)

# Three images with disjoint vocabularies: two captions copied from their reference, one wrong.
PREDS = {
    "1": "two dogs run across green grass",
    "2": "red car parked near old building",
    "3": "purple elephant juggling shiny oranges",
}
REFS = {
    "1": ["two dogs run across green grass"],
    "2": ["red car parked near old building"],
    "3": ["man reading newspaper under umbrella"],
}

# Realistic COCO-style captions with casing, punctuation and several references per image.
COCO_PREDS = {
    "318219": "A man riding a wave on top of a surfboard.",
    "574769": "a plate of food with broccoli and rice",
    "60623": "Two giraffes standing next to each other in a field!",
    "224736": "A cat laying on a couch, next to a remote.",
}
COCO_REFS = {
    "318219": [
        "A surfer rides a large wave in the ocean.",
        "a man on a surfboard riding a wave",
        "A person surfing on top of a big wave.",
    ],
    "574769": [
        "A white plate topped with rice and broccoli.",
        "Food on a plate: rice, chicken and broccoli",
        "a plate of food that has broccoli on it",
        "A meal of rice & vegetables on a plate",
        "Broccoli and rice (with sauce) on a dish.",
    ],
    "60623": ["Two giraffes in a grassy field.", "Giraffes standing together near trees"],
    "224736": [
        "A cat lying on a sofa beside a TV remote.",
        "The cat is sleeping on the couch",
        "a grey cat laying on a brown couch",
        "A cat that's resting on a couch's arm.",
    ],
}

TRICKY = [
    'A man\'s dog, (big) and "quoted"!',
    "It isn't the U.S. e-mail -- ok... fine; yes: no?",
    "Café naïve crème brûlée",
    "一只猫在沙发上",
    "a dog 😀 with emoji – en dash",
    "a|||b ||| c",
    "   leading and trailing   ",
    "{braces} [brackets] `ticks' ``quotes''",
]


def _site_packages_writable() -> bool:
    return os.access(find_pycocoevalcap_dir() / "tokenizer", os.W_OK)


def _pycocoevalcap_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's own PTBTokenizer (writes its temp file into the package folder)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({str(n): [{"caption": c}] for n, c in enumerate(captions)})
    return [out[str(n)][0] for n in range(len(captions))]


# --- Java ----------------------------------------------------------------------------------


def test_check_java_missing_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserInputError) as e:
        check_java()
    msg = str(e.value)
    assert "java" in msg and "apt install default-jre-headless" in msg and "PATH" in msg


def test_check_java_found():
    if shutil.which("java") is None:
        pytest.skip("no java")
    assert os.path.isabs(check_java())


def test_score_without_java_raises_before_work_and_rouge_n_needs_no_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    scorer = CaptionScorer()
    with pytest.raises(UserInputError, match="default-jre-headless"):
        scorer.score(PREDS, REFS)
    assert scorer._meteor is None  # nothing was started
    res = scorer.score(PREDS, REFS, metrics=["rouge_1"])
    assert res.metrics["rouge_1"] == pytest.approx(200.0 / 3)
    scorer.close()


# --- hand-checked values -----------------------------------------------------------------


def test_hand_checked_identical_and_wrong_captions(caption_scorer):
    res = caption_scorer.score(PREDS, REFS)
    assert list(res.metrics) == list(DEFAULT_CAPTION_METRICS)
    assert res.num_images == 3 and res.notes == [] and res.skipped == {}
    m, per = res.metrics, res.per_image
    # Copied captions: BLEU-n, ROUGE-L and METEOR of the image are 100.
    for i in ("1", "2"):
        for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor"):
            assert per[i][k] == pytest.approx(100.0, rel=1e-6), (i, k)
        # CIDEr-D: cosine 1 for n = 1..4, no length penalty, x10 -> 10, i.e. 1000 on our scale.
        assert per[i]["cider"] == pytest.approx(1000.0)
    # No word in common: CIDEr, ROUGE-L, METEOR are exactly 0, BLEU is 0 up to smoothing.
    assert per["3"]["cider"] == 0.0 and per["3"]["rouge_l"] == 0.0 and per["3"]["meteor"] == 0.0
    assert per["3"]["bleu_1"] < 1e-9
    # Corpus BLEU by hand: clipped matches / candidate n-grams, brevity penalty 1 (17 vs 17 words).
    p = [12 / 17, 10 / 14, 8 / 11, 6 / 8]
    for n in range(1, 5):
        assert m[f"bleu_{n}"] == pytest.approx(100 * math.prod(p[:n]) ** (1 / n), rel=1e-8)
    assert m["rouge_l"] == pytest.approx(200 / 3)
    assert m["cider"] == pytest.approx(2000 / 3)
    assert 0 < m["meteor"] < 100


def test_matches_pycocoevalcap_pipeline(caption_scorer):
    """Same numbers as PTBTokenizer + Bleu/Meteor/Rouge/Cider run the pycocoevalcap way."""
    if not _site_packages_writable():
        pytest.skip("pycocoevalcap's own PTBTokenizer needs a writable package folder")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in rs] for i, rs in COCO_REFS.items()})
    res = tok.tokenize({i: [{"caption": c}] for i, c in COCO_PREDS.items()})
    res = {i: res[i] for i in gts}
    expected = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        expected[f"bleu_{n + 1}"] = 100 * bleu[n]
    expected["meteor"] = 100 * caption_scorer._get_meteor().compute_score(gts, res)[0]
    expected["rouge_l"] = 100 * Rouge().compute_score(gts, res)[0]
    expected["cider"] = 100 * Cider().compute_score(gts, res)[0]

    got = caption_scorer.score(COCO_PREDS, COCO_REFS).metrics
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    assert 10 < got["cider"] < 1000 and 0 < got["bleu_4"] < 100  # the 0-100 (x100) scale


def test_rouge_n_by_hand_with_stemming_and_best_reference():
    preds = {"a": "the cat sat on the mat", "b": "dogs running"}
    refs = {"a": ["dogs", "the cat sat on a mat"], "b": ["dog runs"]}
    res = score_captions(preds, refs, metrics=["rouge_1", "rouge_2"])
    # a: unigrams overlap 5 of 6 both ways -> F 5/6; bigrams overlap 3 of 5 -> F 0.6.
    assert res.per_image["a"]["rouge_1"] == pytest.approx(500 / 6)
    assert res.per_image["a"]["rouge_2"] == pytest.approx(60.0)
    # b: with the Porter stemmer "dogs running" == "dog runs".
    assert res.per_image["b"]["rouge_1"] == pytest.approx(100.0)
    assert res.metrics == {"rouge_1": pytest.approx((500 / 6 + 100) / 2), "rouge_2": pytest.approx(80.0)}


# --- PTB tokenization ----------------------------------------------------------------------


def test_ptb_tokenize_matches_pycocoevalcap_on_tricky_strings():
    if shutil.which("java") is None:
        pytest.skip("no java")
    if not _site_packages_writable():
        pytest.skip("pycocoevalcap's own PTBTokenizer needs a writable package folder")
    ours = ptb_tokenize(TRICKY)
    assert ours == _pycocoevalcap_tokenize(TRICKY)
    # pycocoevalcap's quirk kept: "-LRB-" is in its punctuation list but -lowerCase emits "-lrb-".
    assert ours[0] == "a man 's dog -lrb- big -rrb- and quoted"
    assert ours[2] == "café naïve crème brûlée"
    assert ours[4] == "a dog with emoji en dash"  # emoji and en dash dropped


def test_ptb_tokenize_keeps_alignment_with_any_line_break():
    if shutil.which("java") is None:
        pytest.skip("no java")
    caps = ["a dog\rruns", "second\u2028line\nhere", "form\ffeed", "", "   ", "last\vone"]
    assert ptb_tokenize(caps) == ["a dog runs", "second line here", "form feed", "", "", "last one"]
    if _site_packages_writable():
        # pycocoevalcap only replaces "\n": the others split lines and shift later captions.
        assert _pycocoevalcap_tokenize(caps[:3]) != ["a dog runs", "second line here", "form feed"]


def test_meteor_safe():
    assert meteor_safe("a ||| b\nc\r\nd  e|||f") == "a b c d e f"


# --- robustness -----------------------------------------------------------------------------


def test_empty_predictions_score_zero_and_are_counted(caption_scorer):
    preds = {**PREDS, "1": "", "2": "   \n "}
    res = caption_scorer.score(preds, REFS, metrics=[*DEFAULT_CAPTION_METRICS, "rouge_1", "rouge_2"])
    for i in ("1", "2"):
        assert res.per_image[i] and all(v == 0.0 for v in res.per_image[i].values()), res.per_image[i]
    assert all(math.isfinite(v) and v >= 0 for v in res.metrics.values())
    assert any(n.startswith("2 of 3 predictions are empty") for n in res.notes), res.notes


def test_separators_and_newlines_inside_captions_keep_alignment(caption_scorer):
    plain = caption_scorer.score(COCO_PREDS, COCO_REFS, metrics=["meteor", "bleu_4"])
    weird_preds = {**COCO_PREDS, "318219": "A man ||| riding\na wave|||on top\r\nof a surfboard."}
    weird_refs = {
        **COCO_REFS,
        "318219": ["A surfer rides ||| a large\nwave in the ocean.", "a|||man\u2028on a surfboard"],
    }
    weird = caption_scorer.score(weird_preds, weird_refs, metrics=["meteor", "bleu_4"])
    assert 0 <= weird.metrics["meteor"] <= 100 and 0 < weird.per_image["318219"]["meteor"] <= 100
    # Per-image METEOR and BLEU depend only on the image's own captions: any shift would show.
    for i in ("574769", "60623", "224736"):
        assert weird.per_image[i] == pytest.approx(plain.per_image[i], rel=1e-12), i
    # The METEOR process is still in sync afterwards.
    again = caption_scorer.score(COCO_PREDS, COCO_REFS, metrics=["meteor", "bleu_4"])
    assert again.metrics == pytest.approx(plain.metrics, rel=1e-12)


def test_non_ascii_captions(caption_scorer):
    preds = {"fr": "café crème brûlée sur la table", "zh": "一只猫 在 沙发 上", "emoji": "😀😀"}
    refs = {
        "fr": ["café crème brûlée sur la table"],
        "zh": ["一只猫 在 沙发 上", "猫"],
        "emoji": ["a happy face"],
    }
    res = caption_scorer.score(preds, refs, metrics=[*DEFAULT_CAPTION_METRICS, "rouge_1"])
    assert res.per_image["fr"]["bleu_1"] == pytest.approx(100.0, rel=1e-6)
    assert res.per_image["zh"]["bleu_1"] == pytest.approx(100.0, rel=1e-6)
    assert res.per_image["fr"]["meteor"] > 90
    assert all(math.isfinite(v) for v in res.metrics.values())
    assert any("empty after PTB tokenization" in n for n in res.notes)  # emoji-only caption
    assert any("non-ASCII" in n for n in res.notes)  # rouge-score drops non a-z0-9


def test_mismatched_ids_are_listed():
    preds = {"1": "a", "2": "b", "7": "c"}
    refs = {"1": ["a"], "2": ["b"], "8": ["c"], 9: ["d"]}
    with pytest.raises(DataError) as e:
        score_captions(preds, refs)
    msg = str(e.value)
    assert "1 ids in predictions without references: 7" in msg
    assert "2 ids in references without predictions: 8, 9" in msg


def test_bad_inputs():
    with pytest.raises(UserInputError, match="Did you mean 'cider'"):
        score_captions(PREDS, REFS, metrics=["cidr"])
    with pytest.raises(UserInputError, match="unknown caption metric 'vqa_accuracy'"):
        score_captions(PREDS, REFS, metrics=["vqa_accuracy"])
    with pytest.raises(DataError, match="no references"):
        score_captions({"1": "a"}, {"1": []}, metrics=["rouge_1"])
    with pytest.raises(DataError, match="not a string"):
        score_captions({"1": None}, {"1": ["a"]}, metrics=["rouge_1"])
    with pytest.raises(DataError, match="nothing to score"):
        score_captions({}, {}, metrics=["rouge_1"])


def test_int_ids_and_single_string_reference_and_json_ready(caption_scorer):
    res = caption_scorer.score({1: "two dogs run", 2: "red car"}, {"1": "two dogs run", "2": ["a red car"]})
    assert set(res.per_image) == {"1", "2"}
    assert res.per_image["1"]["bleu_1"] == pytest.approx(100.0, rel=1e-6)
    assert any("cider" in n for n in res.notes) is False
    json.dumps(res.to_dict())


def test_one_image_cider_note(caption_scorer):
    res = caption_scorer.score({"1": "two dogs run"}, {"1": ["two dogs run"]}, metrics=["cider"])
    assert res.metrics["cider"] == 0.0
    assert any("one image only" in n for n in res.notes)


def test_meteor_failure_is_a_stage_error():
    if shutil.which("java") is None:
        pytest.skip("no java")
    scorer = CaptionScorer()
    meteor = scorer._get_meteor()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    with pytest.raises(StageError, match="METEOR process failed"):
        scorer.score(PREDS, REFS, metrics=["meteor"])
    assert scorer._meteor is None  # closed; the next score starts a fresh one
    scorer.close()


# --- read-only package folder -------------------------------------------------------------


def _tree_state(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}


def test_read_only_pycocoevalcap_folder(tmp_path):
    """Tokenizing never writes into the package folder (pycocoevalcap itself does)."""
    if shutil.which("java") is None:
        pytest.skip("no java")
    copy = tmp_path / "pycocoevalcap"
    shutil.copytree(find_pycocoevalcap_dir() / "tokenizer", copy / "tokenizer")
    for p in [*copy.rglob("*"), copy]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        before = _tree_state(copy)
        with CaptionScorer(coco_dir=copy) as scorer:
            res = scorer.score(PREDS, REFS, metrics=["bleu_1", "rouge_l", "cider", "spice"])
        assert res.metrics["cider"] == pytest.approx(2000 / 3)
        assert "spice" in res.skipped and "spice" not in res.metrics  # no spice/ in the copy
        assert any(n.startswith("spice skipped") for n in res.notes)
        assert _tree_state(copy) == before
        # Teeth: pycocoevalcap's own tokenizer (the copy's ptbtokenizer.py) writes into the folder.
        spec = importlib.util.spec_from_file_location("_ptb_copy", copy / "tokenizer" / "ptbtokenizer.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if os.geteuid() == 0:  # root ignores permissions: the write shows as a new mtime
            mod.PTBTokenizer().tokenize({"1": [{"caption": "a dog"}]})
            assert _tree_state(copy) != before
        else:
            with pytest.raises(PermissionError):
                mod.PTBTokenizer().tokenize({"1": [{"caption": "a dog"}]})
    finally:
        for p in [copy, *copy.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


# --- SPICE ------------------------------------------------------------------------------------


def test_spice_plumbing_with_a_stand_in_java(tmp_path):
    """Files present -> SPICE runs with our temp files; the JSON it writes is read back x100."""
    spice = tmp_path / "pycocoevalcap" / "spice"
    (spice / "lib").mkdir(parents=True)
    for name in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"):
        (spice / name).write_bytes(b"")
    ok, why = spice_status(tmp_path / "pycocoevalcap")
    assert ok and why == ""
    fake_java = tmp_path / "java"
    fake_java.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[:3] == ['-jar', '-Xmx8G', args[2]] and args[2].endswith('spice-1.0.jar'), args\n"
        "rows = json.load(open(args[3], encoding='utf-8'))\n"
        "out = args[args.index('-out') + 1]\n"
        "res = [{'image_id': r['image_id'], 'scores': {'All': {'f': 0.25 if r['test'] == r['refs'][0] else 'NaN'}}} for r in rows]\n"
        "json.dump(res, open(out, 'w'))\n"
    )
    fake_java.chmod(0o755)
    got = run_spice(
        {"a": ["two dogs"], "b": ["a cat"]},
        {"a": "two dogs", "b": "no"},
        coco_dir=tmp_path / "pycocoevalcap",
        java=str(fake_java),
    )
    assert got["a"] == pytest.approx(25.0) and math.isnan(got["b"])
    ok, why = spice_status(tmp_path)  # no spice/ there
    assert not ok and "stanford-corenlp-3.6.0.jar" in why


def test_ptb_jar_name_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer import ptbtokenizer

    assert ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR == PTB_JAR
    from eval.coco_tools import PTB_PUNCTUATIONS

    assert list(PTB_PUNCTUATIONS) == ptbtokenizer.PUNCTUATIONS
