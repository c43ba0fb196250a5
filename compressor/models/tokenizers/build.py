"""Build the tiny tokenizers shipped with the presets (run once; the outputs are committed).

Usage::

    python -m compressor.models.tokenizers.build CORPUS.json [CORPUS.json ...]

Each corpus is a COCO captions file (``annotations[].caption``), e.g. the CC BY 4.0 captions in
``shared/data/coco-captions-val2014-subset.json``; the shapes vocabulary of the synthetic set
is always added. Writes ``bpe.json`` (byte-level BPE, as OPT/GPT-2), ``unigram.json``
(Unigram + Metaspace, as T5/SentencePiece) and ``wordpiece.json`` (BERT WordPiece) beside
this file; ``python -m compressor.models.tokenizers.build --smolvlm`` derives ``smolvlm.json``
from ``bpe.json`` alone (:func:`build_smolvlm`, deterministic). The WordPiece trainer is not deterministic across runs (stack-facts §1), which is
why the files are committed rather than rebuilt in tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 2000

SHAPES_WORDS = (
    "a an the one two there is are picture image photo of on in at to and side part small large "
    "red green blue yellow purple orange circle circles square squares triangle triangles shape shapes "
    "left right top bottom center middle above below next yes no what color colour how many"
)
#: BPE / Unigram special tokens; <image> is the BLIP-2 image placeholder (stack-facts §1).
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
UNIGRAM_SPECIALS = ["<pad>", "</s>", "<unk>", "<image>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def _corpus(paths: list[str]) -> list[str]:
    lines: list[str] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        lines += [a["caption"].strip() for a in data["annotations"]]
    words = SHAPES_WORDS.split()
    lines += [" ".join(words)] * 200  # keep the shapes vocabulary whole
    return lines


def build(paths: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    text = _corpus(paths)

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=BPE_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bpe.save(str(HERE / "bpe.json"))

    uni = Tokenizer(models.Unigram())
    uni.normalizer = normalizers.NFKC()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.train_from_iterator(
        text,
        trainers.UnigramTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=UNIGRAM_SPECIALS, unk_token="<unk>", show_progress=False
        ),
    )
    uni.save(str(HERE / "unigram.json"))

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(
        text,
        trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=WORDPIECE_SPECIALS, show_progress=False),
    )
    wp.save(str(HERE / "wordpiece.json"))


#: SmolLM2 / SmolVLM special tokens (HuggingFaceTB/SmolVLM-256M-Instruct's tokenizer): they replace
#: bpe.json's five specials at the same ids, and the image-layout tokens follow the vocabulary.
SMOLVLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<image>"]
SMOLVLM_ADDED = ["<fake_token_around_image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def build_smolvlm() -> None:
    """``smolvlm.json``: ``bpe.json`` with SmolLM2's special tokens and SmolVLM's image-layout tokens.

    The byte-level BPE merges are bpe.json's; the five specials are renamed in place (ids 0–4:
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<end_of_utterance>``, ``<image>``) and
    ``<fake_token_around_image>``, ``<global-img>`` and the 36 ``<row_i_col_j>`` tile tokens of the
    Idefics3 processor are appended as special added tokens: a vocabulary of its own (2,038 ids, a
    tokenizer other than the BLIP-2 presets'), built the same way every time.
    """
    data = json.loads((HERE / "bpe.json").read_text())
    vocab = data["model"]["vocab"]
    rename = dict(zip(BPE_SPECIALS, SMOLVLM_SPECIALS))
    data["model"]["vocab"] = {rename.get(k, k): v for k, v in vocab.items()}
    for tok in data["added_tokens"]:
        tok["content"] = rename.get(tok["content"], tok["content"])
    next_id = max(vocab.values()) + 1
    for i, content in enumerate(SMOLVLM_ADDED):
        data["added_tokens"].append(
            {"id": next_id + i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        )
    (HERE / "smolvlm.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--smolvlm"]:
        build_smolvlm()
    elif len(sys.argv) < 2:
        raise SystemExit(__doc__)
    else:
        build(sys.argv[1:])
