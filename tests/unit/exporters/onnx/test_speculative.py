"""Speculative decoding (exporters.onnx.speculative): the target's own greedy captions whatever the draft.

The target is the tiny Llama BLIP-2 preset (re-initialised: its captions differ per image and hold
many distinct tokens). Drafts: the target itself (every token accepted), another seed of the preset
(random weights: almost nothing accepted) and the target with 3% noise on its decoder weights
(some tokens accepted, so rows of a batch accept different numbers of tokens per call).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from onnx_helpers import PROMPTS

from compressor.errors import ModelSpecError, UserInputError

TARGET = "tiny-blip2-llama"


def _gen(**kw):
    from compressor.recipe.schema import GenerationSpec

    return GenerationSpec(**{"max_new_tokens": 16, "batch_size": 4, **kw})


def _noisy(model, scale: float, seed: int = 0):
    """A copy of ``model`` whose language-model layer matrices get ``scale`` × their std of noise."""
    import torch

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.language_model.named_parameters():
            if "layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return m


@pytest.fixture(scope="module")
def pair(onnx_export, tmp_path_factory):
    """The target's export, the drafts' models, and the exports of two drafts: the target's own
    (``equal``) and the noisy one (``near``, legacy exporter, no optimised copy). The random
    draft runs in PyTorch (:func:`module_captioner`): drafts of either backend serve an ONNX target."""
    from compressor.models.presets import build_preset
    from exporters.onnx import OnnxOptions, export_model_onnx

    model, proc, out = onnx_export(TARGET)
    root = tmp_path_factory.mktemp("drafts")
    models = {"random": build_preset(TARGET, seed=1)[0], "near": _noisy(model, 0.03)}
    export_model_onnx(models["near"], proc, root / "near", OnnxOptions(exporter="legacy", optimize=False))
    dirs = {"equal": out, "near": root / "near"}
    return {"model": model, "proc": proc, "target": out, "dirs": dirs, "models": models, "root": root, "opened": {}}


def _onnx(pair, folder, gen, scoring: bool = False):
    """An OnnxCaptioner of ``folder`` (its default variant), opened once per settings in the module."""
    from exporters.onnx import OnnxCaptioner

    key = (str(folder), scoring, gen.model_dump_json())
    if key not in pair["opened"]:
        pair["opened"][key] = OnnxCaptioner(folder, gen, scoring=scoring)
    return pair["opened"][key]


def _draft(pair, draft: str, gen):
    from exporters.onnx.modules import module_captioner

    if draft in pair["dirs"]:
        return _onnx(pair, pair["dirs"][draft], gen)
    return module_captioner(pair["models"][draft], pair["proc"], gen)


def _spec(pair, draft: str, k: int, gen, share_cache: bool | None = None):
    from exporters.onnx.speculative import SpeculativeCaptioner

    return SpeculativeCaptioner(_onnx(pair, pair["target"], gen, scoring=True), _draft(pair, draft, gen), k, draft,
                                share_cache=share_cache)


def test_scoring_graph_is_the_decoder_with_every_new_position(pair):
    """The graph pass keeps the exported decoder's numbers and adds the positions before the last."""
    import onnx
    import onnxruntime as ort

    from exporters.onnx.passes import NUM_LOGITS, score_last_positions

    folder = pair["target"]
    for file in ("decoder.onnx", "decoder.opt.onnx"):
        m = onnx.load(str(folder / file))
        plain = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        assert score_last_positions(m) and not score_last_positions(m)  # applied once
        scoring = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in plain.get_inputs()}
        hidden, kv = ins["inputs_embeds"].shape[2], ins["past.0.key"].shape
        names = [n for n in ins if n.startswith("past.")]
        rng = np.random.default_rng(0)
        emb = rng.standard_normal((2, 9, hidden)).astype(np.float32)
        mask = np.ones((2, 9), dtype=np.int64)
        mask[1, :2] = 0  # left padding in row 1
        past = {n: np.zeros((2, kv[1], 0, kv[3]), np.float32) for n in names}
        ref = plain.run(None, {"inputs_embeds": emb[:, :5], "attention_mask": mask[:, :5], **past})
        one = scoring.run(None, {"inputs_embeds": emb[:, :5], "attention_mask": mask[:, :5], NUM_LOGITS: np.array([1]), **past})
        np.testing.assert_array_equal(one[0][:, -1], ref[0])  # the same graph, bit for bit
        steps, pres = [], ref[1:]
        for j in range(5, 9):
            o = plain.run(None, {"inputs_embeds": emb[:, j : j + 1], "attention_mask": mask[:, : j + 1], **dict(zip(names, pres))})
            steps.append(o[0])
            pres = o[1:]
        four = scoring.run(None, {"inputs_embeds": emb[:, 5:], "attention_mask": mask, NUM_LOGITS: np.array([4]),
                                  **dict(zip(names, ref[1:]))})
        assert four[0].shape == (2, 4, ref[0].shape[1])
        np.testing.assert_allclose(four[0], np.stack(steps, 1), atol=1e-5)  # one call = four steps (float rounding)
        np.testing.assert_allclose(four[-1], pres[-1], atol=1e-5)
    image = onnx.load(str(folder / "image_encoder.onnx"))
    assert not score_last_positions(image)  # not a decoder: left as it is


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("draft", ["equal", "equal/own-cache", "random", "near"])
def test_speculative_tokens_are_the_targets_greedy_tokens(pair, images, draft, k):
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs

    gen = _gen()
    inputs = {k_: v.numpy() for k_, v in generation_inputs(family_for_model(pair["model"]), pair["proc"], images, PROMPTS).items()}
    ref = _onnx(pair, pair["target"], gen).generate(inputs)
    new = ref[:, inputs["input_ids"].shape[1]:]
    # teeth: long captions with several distinct tokens, different across the batch
    assert len({tuple(r) for r in new.tolist()}) == 4 and all(len(set(r.tolist())) >= 4 for r in new)
    own = draft.endswith("/own-cache")
    draft = draft.removesuffix("/own-cache")
    sc = _spec(pair, draft, k, gen, share_cache=False if own else None)
    assert sc.shared_cache is (draft == "equal" and not own)
    got = sc.generate(inputs, inputs)
    np.testing.assert_array_equal(got, ref)
    acc = sc.stats.acceptance
    if draft == "equal":  # 16 tokens: the prefill's, then k + 1 per call (fewer in the last)
        assert acc == 1.0 and sc.stats.tokens_per_target_call == 16 / (1 + -(-15 // (k + 1)))
    elif draft == "random":
        own = _draft(pair, "random", gen).generate(inputs)
        assert not (own[:, -new.shape[1]:] == new).all(1).any()  # the draft alone writes other captions
        assert acc < 0.1
    else:
        assert 0.1 < acc < 0.95
    assert sc.stats.captions == 4 and sc.stats.proposed > 0


@pytest.mark.parametrize("draft", ["random", "near"])
def test_a_confidence_cut_drafts_fewer_tokens_and_keeps_the_captions(pair, images, draft):
    """``min_confidence`` (transformers' assistant_confidence_threshold) ends a round's drafting
    when the draft doubts its proposal: fewer draft calls and proposals, the same tokens."""
    from compressor.families import family_for_model
    from compressor.models.batches import generation_inputs
    from exporters.onnx.speculative import SpeculativeCaptioner

    gen = _gen()
    inputs = {k_: v.numpy() for k_, v in generation_inputs(family_for_model(pair["model"]), pair["proc"], images, PROMPTS).items()}
    ref = _onnx(pair, pair["target"], gen).generate(inputs)
    target = _onnx(pair, pair["target"], gen, scoring=True)
    full, cut = (SpeculativeCaptioner(target, _draft(pair, draft, gen), 6, draft, min_confidence=c) for c in (None, 0.999))
    np.testing.assert_array_equal(full.generate(inputs, inputs), ref)
    np.testing.assert_array_equal(cut.generate(inputs, inputs), ref)
    assert cut.stats.draft_calls < full.stats.draft_calls and cut.stats.proposed < full.stats.proposed
    assert cut.settings["speculative"]["min_confidence"] == 0.999 and "min_confidence" not in full.settings["speculative"]
    with pytest.raises(UserInputError, match="min_confidence"):
        SpeculativeCaptioner(target, _draft(pair, draft, gen), 4, draft, min_confidence=1.5)


def test_rows_of_a_batch_accept_independently(pair, images):
    """Batch 4 takes exactly the calls four batch-1 runs take: each row keeps its own accepted
    tokens (the slots it rejected are masked holes), none waits for the slowest row."""
    one, four = _spec(pair, "near", 3, _gen(batch_size=1)), _spec(pair, "near", 3, _gen(batch_size=4))
    a, b = one.caption(images, PROMPTS), four.caption(images, PROMPTS)
    assert a == b
    assert one.stats.tokens == four.stats.tokens and one.stats.target_calls == four.stats.target_calls
    assert 1.0 < four.stats.tokens_per_target_call < 4.0


def test_logits_processors_apply_at_every_checked_position(pair, images):

    gen = _gen(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=6)
    ref = _onnx(pair, pair["target"], gen).caption(images, PROMPTS)
    assert ref != _onnx(pair, pair["target"], _gen()).caption(images, PROMPTS)  # they act
    sc = _spec(pair, "near", 3, gen)
    assert sc.caption(images, PROMPTS) == ref and 0 < sc.stats.acceptance < 1


def test_pytorch_speculative_captions_are_generate_captions(pair, images):
    """PyTorch target (its graph wrappers): the captions of model.generate, with a PyTorch or an ONNX draft."""
    from compressor.evaluation.captioner import TorchCaptioner
    from exporters.onnx.modules import module_captioner
    from exporters.onnx.speculative import OpenDraft

    model, proc, gen = pair["model"], pair["proc"], _gen()
    ref = TorchCaptioner(model, proc, gen).caption(images, PROMPTS)
    for draft in (module_captioner(pair["models"]["random"], proc, gen), _onnx(pair, pair["dirs"]["near"], gen)):
        tc = TorchCaptioner(model, proc, gen, draft=OpenDraft(draft, 3, "d"))
        assert tc.caption(images, PROMPTS) == ref
        assert tc.settings["backend"] == "torch" and tc.settings["speculative"]["num_draft_tokens"] == 3
    assert 0.1 < tc.stats.acceptance < 0.95  # the noisy ONNX draft, last in the loop


def test_drafts_that_cannot_draft_are_refused(pair):
    from compressor.models.presets import build_preset
    from exporters.onnx.modules import module_captioner
    from exporters.onnx.speculative import DraftSpec, SpeculativeCaptioner, check_pair, resolve_draft

    gen = _gen()
    target = _onnx(pair, pair["target"], gen, scoring=True)
    good = module_captioner(pair["models"]["near"], pair["proc"], gen)
    check_pair(target, good, "near")  # the control: a compatible draft passes
    # another tokenizer: the OPT preset's has the same vocabulary but another BOS
    opt, opt_proc = build_preset("tiny-blip2-opt")
    with pytest.raises(UserInputError, match="tokenizer differs"):
        SpeculativeCaptioner(target, module_captioner(opt, opt_proc, gen), 4, "opt")
    # another vocabulary (logit width) with the same tokenizer
    wide = copy.deepcopy(pair["model"])
    wide.language_model.resize_token_embeddings(wide.language_model.get_input_embeddings().weight.shape[0] + 8)
    with pytest.raises(UserInputError, match="vocabulary has"):
        check_pair(target, module_captioner(wide, pair["proc"], gen), "wide")
    # a processor saved with another number of image tokens: the family's batches carry the model's
    # count (the model's config decides, as for an older-style folder), so the draft still drafts
    from exporters.onnx.speculative import image_tokens_expected, image_tokens_in_prompt

    proc = copy.deepcopy(pair["proc"])
    proc.num_query_tokens = pair["proc"].num_query_tokens - 2
    short = module_captioner(pair["models"]["near"], proc, gen)
    check_pair(target, short, "short")
    assert image_tokens_in_prompt(short) == image_tokens_expected(short) == pair["proc"].num_query_tokens
    # beam search with a draft
    with pytest.raises(UserInputError, match="greedy only"):
        resolve_draft(DraftSpec(path=str(pair["dirs"]["near"])), _gen(num_beams=2))
    with pytest.raises(UserInputError, match="greedy only"):
        SpeculativeCaptioner(_onnx(pair, pair["target"], _gen(num_beams=2), scoring=True), good, 4)
    # an encoder-decoder (T5) model has no scoring decoder
    t5, t5_proc = build_preset("tiny-blip2-t5")
    with pytest.raises(ModelSpecError, match="decoder-only"):
        module_captioner(t5, t5_proc, gen, scoring=True)
    with pytest.raises(UserInputError, match="decoder-only"):
        check_pair(target, module_captioner(t5, t5_proc, gen), "t5")
    with pytest.raises(UserInputError, match="neither an ONNX export"):
        resolve_draft(DraftSpec(path=str(pair["root"])), gen)


def test_export_bundles_a_draft_that_captioning_uses(pair, images, tmp_path, monkeypatch):
    """``export_onnx_with_draft``: the draft in ``draft/`` (an export is linked as it is), named in
    export.json, covered by SHA256SUMS, checked before anything is written, used by the captioner
    unless told not to. The target's own export is the session's export of the same preset
    (``export_onnx`` is tested on its own)."""
    from compressor.evaluation import EvalTarget
    from compressor.fileio import link_tree
    from compressor.models.presets import save_preset
    from exporters.onnx import OnnxCaptioner, OnnxOptions, verify_onnx_dir
    from exporters.onnx import export as export_module
    from exporters.onnx.export import export_onnx_with_draft
    from exporters.onnx.speculative import DraftSpec, SpeculativeCaptioner

    def linked_export(model_dir, out, opts, device="cpu", extra_files=None):
        link_tree(pair["target"], out)
        return json.loads((out / "export.json").read_text())

    monkeypatch.setattr(export_module, "export_onnx", linked_export)
    model_dir = save_preset(TARGET, tmp_path / "model")
    out = tmp_path / "bundle"
    opts = OnnxOptions(exporter="legacy", optimize=False)
    # refused before anything is written: another tokenizer
    with pytest.raises(UserInputError, match="tokenizer differs"):
        export_onnx_with_draft(model_dir, out, opts, save_preset("tiny-blip2-opt", tmp_path / "opt"))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    meta = export_onnx_with_draft(model_dir, out, opts, pair["dirs"]["near"], num_draft_tokens=3, min_confidence=0.3)
    assert meta["draft"]["folder"] == "draft" and meta["draft"]["num_draft_tokens"] == 3
    assert meta["draft"]["min_confidence"] == 0.3
    assert json.loads((out / "export.json").read_text())["draft"] == meta["draft"]
    sums = (out / "SHA256SUMS").read_text()
    assert "draft/decoder.onnx" in sums and "draft/export.json" in sums
    verify_onnx_dir(out)
    gen = _gen()
    plain = EvalTarget.onnx(out, gen, draft=DraftSpec(bundled=False)).captioner
    auto = EvalTarget.onnx(out, gen).captioner
    assert isinstance(auto, SpeculativeCaptioner) and auto.k == 3 and not isinstance(plain, SpeculativeCaptioner)
    ref = plain.caption(images, PROMPTS)
    assert auto.caption(images, PROMPTS) == ref and 0.1 < auto.stats.acceptance < 0.95
    assert auto.settings["speculative"]["draft"] == str(out / "draft") and auto.min_confidence == 0.3
    assert isinstance(EvalTarget.onnx(out, _gen(num_beams=2)).captioner, OnnxCaptioner)  # beams: their own path
    same = EvalTarget.onnx(out, gen, draft=DraftSpec(path=str(out))).captioner  # its own export drafts: one image path
    assert same.shared_image and same.caption(images, PROMPTS) == ref and same.stats.acceptance == 1.0


def test_an_unchanged_image_path_runs_once(pair, images):
    """The noisy draft's image graph is byte-identical to the target's (only decoder weights
    changed): it runs once per batch for both models, and the captions stay the target's."""
    from exporters.onnx import OnnxCaptioner
    from exporters.onnx.speculative import SpeculativeCaptioner

    gen = _gen()
    target = OnnxCaptioner(pair["target"], gen, variant="plain", scoring=True)
    sc = SpeculativeCaptioner(target, _onnx(pair, pair["dirs"]["near"], gen), 3, "near")
    assert sc.shared_image
    shared = target.sessions["image_encoder"]
    calls = []
    inner = shared.session.run
    shared.session.run = lambda names, feed: calls.append(1) or inner(names, feed)
    assert sc.caption(images, PROMPTS) == _onnx(pair, pair["target"], gen).caption(images, PROMPTS)
    assert len(calls) == 1  # one batch of 4: the draft's prefill reused the target's image features


def test_a_variant_of_the_target_drafts_on_the_targets_cache(onnx_export, images):
    """The int8 decoder of the same export drafts on the fp32 target's own key/value cache: no
    draft prefill (every draft call has a non-empty past), no draft cache of its own, the
    target's captions at batch 4 (rows with holes) and batch 1; ``share_cache=False`` keeps the
    old path (a draft prefill) with the same captions."""
    from exporters.onnx import OnnxCaptioner
    from exporters.onnx.speculative import SpeculativeCaptioner, can_share_cache

    _, _, folder = onnx_export("tiny-blip2-opt")  # exported with an int8 decoder variant
    for bs in (4, 1):
        gen = _gen(batch_size=bs)
        ref = OnnxCaptioner(folder, gen).caption(images, PROMPTS)
        assert len(set(ref)) > 1
        pasts = {}
        for share in (None, False):
            target = OnnxCaptioner(folder, gen, scoring=True)
            draft = OnnxCaptioner(folder, gen, variant="int8")
            assert can_share_cache(target, draft)
            inner = draft.run
            seen = pasts.setdefault(share, [])
            draft.run = lambda graph, feed, inner=inner, seen=seen: (
                seen.append(feed["past.0.key"].shape[2]) if graph == "decoder" else None) or inner(graph, feed)
            sc = SpeculativeCaptioner(target, draft, 3, "int8", share_cache=share)
            assert sc.shared_cache is (share is None) and sc.settings["speculative"].get("shared_cache", False) is sc.shared_cache
            assert sc.caption(images, PROMPTS) == ref
            assert sc.stats.proposed > 0 and 0 < sc.stats.acceptance <= 1.0
        assert min(pasts[None]) > 0 and min(pasts[False]) == 0  # shared: the draft never prefills


def test_a_draft_from_another_export_keeps_its_own_cache(pair):
    """Another export (here with other decoder weights) cannot run on the target's cache: the
    automatic choice keeps its own cache; asking for sharing is refused."""
    from exporters.onnx.speculative import SpeculativeCaptioner

    gen = _gen()
    target = _onnx(pair, pair["target"], gen, scoring=True)
    assert not SpeculativeCaptioner(target, _draft(pair, "near", gen), 3, "near").shared_cache
    with pytest.raises(UserInputError, match="not a variant of the same export"):
        SpeculativeCaptioner(target, _draft(pair, "near", gen), 3, "near", share_cache=True)
