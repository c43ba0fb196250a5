"""Greedy speculative decoding: a draft proposes tokens, the target checks them all in one decoder call.

Leviathan, Kalman & Matias 2023 ("Fast Inference from Transformers via Speculative Decoding"),
Chen et al. 2023 ("Accelerating Large Language Model Decoding with Speculative Sampling"), in
the greedy form of transformers' assisted generation (``_assisted_decoding`` with
``do_sample=False``). A batch-1 decode step reads every decoder weight once, so its time is
bounded by memory bandwidth; scoring ``k + 1`` tokens in one call reads the weights once too.

Each round, per row:

1. the draft proposes ``k`` tokens greedily from its own cache (``k`` draft calls; the first
   also feeds the tokens the draft has not seen yet);
2. the target's decoder scores ``[pending, d1 … dk]`` in ONE call (its scoring graph,
   :func:`exporters.onnx.passes.score_last_positions`): the logits of all ``k + 1`` positions;
3. the target's own greedy choices are taken position by position (argmax of its processed
   logits, exactly as :meth:`~exporters.onnx.captioner.OnnxCaptioner._greedy` takes them) while
   they agree with the draft: the agreeing prefix plus the target's next token are emitted;
4. both caches are cut back to what was accepted (:meth:`OnnxCaptioner.trim`). At batch 1 the
   cache is cut to the accepted length. In a batch, rows accept different numbers of tokens:
   the slots a row did not accept become holes its attention mask hides from every later call,
   and since positions are ``cumsum(mask) - 1`` a hole shifts nothing (per-row acceptance).

Every emitted token is the target's greedy choice given exactly the tokens emitted before it;
the draft only decides how many of those choices one call yields, so a draft with random weights
gives the same captions as a perfect one, only slower. What scoring several positions in one call
can change is float rounding (the logits of one call with ``k + 1`` positions against ``k + 1``
calls of one: about 1e-6 here), so captions are token-for-token the target's own greedy captions
wherever its top-1/top-2 margins exceed that, the same condition under which ONNX Runtime's greedy
captions equal PyTorch's.

Both models run their own image path once per image (a draft may have fewer Q-Former layers);
when the draft is a variant of the same export (its int8 decoder), the shared image graph runs
once, and the draft drafts on the target's own key/value cache (:func:`can_share_cache`): no
draft prefill, no draft cache, and proposals made from the target's exact keys and values. Greedy only: beam search and sampling keep their own paths, and a draft with beam search is
refused (:class:`SpeculativeCaptioner`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import UserInputError

log = logging.getLogger(__name__)

#: Default number of draft tokens per round.
DEFAULT_DRAFT_TOKENS = 4
#: ``export.json`` entry naming a bundled draft (``{"folder": "draft", "num_draft_tokens": k}``).
DRAFT_KEY = "draft"


@dataclass
class SpecStats:
    """Counters of speculative decoding, summed over rows and calls.

    Attributes:
        proposed: draft tokens proposed (``k`` per row per round).
        accepted: proposed tokens the target agreed with (emitted as proposed).
        tokens: tokens emitted.
        target_calls: target decoder calls per row (the prefill and one per round).
        draft_calls: draft decoder calls per row.
        captions: rows decoded.
    """

    proposed: int = 0
    accepted: int = 0
    tokens: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    captions: int = 0

    def reset(self) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, 0)

    @property
    def acceptance(self) -> float | None:
        """Accepted draft tokens / proposed (None before any proposal)."""
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_target_call(self) -> float | None:
        """Emitted tokens per target decoder call (plain greedy: 1.0)."""
        return self.tokens / self.target_calls if self.target_calls else None

    def record(self) -> dict[str, Any]:
        """The characteristics an evaluation record gets (``spec_acceptance`` …)."""
        acc, tpc = self.acceptance, self.tokens_per_target_call
        return {
            "spec_acceptance": None if acc is None else round(acc, 4),
            "spec_tokens_per_call": None if tpc is None else round(tpc, 3),
            "spec_target_calls_per_caption": round(self.target_calls / self.captions, 2) if self.captions else None,
        }


def _processors_on(generation) -> bool:
    """Whether any logits processor of :meth:`OnnxCaptioner._process` changes scores."""
    return (
        float(getattr(generation, "repetition_penalty", 1.0)) != 1.0
        or bool(getattr(generation, "no_repeat_ngram_size", 0))
        or bool(getattr(generation, "min_new_tokens", 0))
    )


def speculative_greedy(target, draft, target_inputs: dict, draft_inputs: dict, k: int, stats: SpecStats | None = None,
                       min_confidence: float | None = None, shared_cache: bool = False):
    """Greedy decoding of ``target`` with ``draft`` proposing ``k`` tokens a round (see the module docstring).

    Args:
        target: an :class:`~exporters.onnx.captioner.OnnxCaptioner` opened with ``scoring=True``
            (or a :func:`~exporters.onnx.modules.module_captioner` with ``scoring=True``).
        draft: a captioner of the same kind (no scoring needed), sharing the target's tokenizer.
        target_inputs: the target processor's numpy arrays (``input_ids``, ``attention_mask``,
            the image graph's inputs).
        draft_inputs: the draft processor's arrays for the same images and prompts.
        k: draft tokens per round (>= 1).
        stats: counters to add to, or None.
        min_confidence: stop a round's drafting early once every live row's draft probability of
            its last proposal (softmax of the draft's logits) is below this (transformers'
            ``assistant_confidence_threshold``, default 0.4 there); None drafts ``k`` every round.
            It only decides how many tokens are proposed: the captions are the same.
        shared_cache: the draft runs on the target's own key/value cache (:func:`can_share_cache`:
            a variant of the same export, e.g. its int8 decoder drafting for the fp32 one): no
            draft prefill, no draft cache to keep or trim; each round the draft starts from the
            target's cache of everything accepted so far (exact, the target's) and feeds only the
            target's last token; its own entries for the proposals are dropped after the round.
            ``draft_inputs`` is not read.

    Returns:
        ``(batch, n + new)`` int64: the prompt ids followed by the new tokens, finished rows
        padded with ``pad_token_id``: what :meth:`OnnxCaptioner.generate` returns for greedy.
    """
    import numpy as np

    max_new = int(target.kwargs["max_new_tokens"])
    eos = set(target.eos)
    processing = _processors_on(target.generation)
    logits, t_state, prompt = target.prefill(target_inputs)
    if shared_cache:
        d_state, d_prompt = None, prompt
    else:
        _, d_state, d_prompt = draft.prefill(draft_inputs)
    B, n = prompt.shape
    out: list[list[int]] = [[] for _ in range(B)]
    active = np.ones(B, dtype=bool)

    def choose(cap, r: int, scores, extra, base) -> int:
        if not processing:
            return int(np.argmax(scores))
        seq = np.array([[*base[r], *out[r], *extra]], dtype=np.int64)
        return int(cap._process(seq, scores[None].astype(np.float32).copy(), base.shape[1]).argmax(-1)[0])

    def emit(r: int, tok: int) -> None:
        out[r].append(tok)
        if tok in eos or len(out[r]) >= max_new:
            active[r] = False

    for r in range(B):
        emit(r, choose(target, r, logits[r], (), prompt))
    st = stats if stats is not None else SpecStats()
    st.captions += B
    st.target_calls += B
    st.tokens += B
    pending_t = np.array([o[-1] for o in out], dtype=np.int64)  # emitted, not in the target's cache
    pending_d = [[o[-1]] for o in out]  # emitted, not in the draft's cache
    ones = np.ones((B, 1), dtype=np.int64)
    while active.any():
        live = active.copy()
        # no more proposals than the longest remaining budget can use
        kk = max(0, min(k, max(max_new - len(out[r]) for r in np.flatnonzero(live)) - 1))
        props = np.full((B, kk), target.pad, dtype=np.int64)
        width = max(len(p) for p in pending_d)
        d_valid = np.zeros((B, width), dtype=np.int64)
        if kk:
            if shared_cache:
                # the draft starts from the target's cache (everything accepted) and its pending token
                d_logits, d_state = draft.extend(pending_t[:, None], ones, t_state)
            else:
                d_toks = np.full((B, width), target.pad, dtype=np.int64)
                for r, p in enumerate(pending_d):
                    d_toks[r, width - len(p) :] = p
                    d_valid[r, width - len(p) :] = 1
                d_logits, d_state = draft.extend(d_toks, d_valid, d_state)
            for i in range(kk):
                if i:
                    d_logits, d_state = draft.extend(props[:, i - 1 : i], ones, d_state)
                for r in np.flatnonzero(live):
                    props[r, i] = choose(draft, r, d_logits[r], props[r, :i], d_prompt)
                if min_confidence is not None and i + 1 < kk and all(
                    _probability(d_logits[r], props[r, i]) < min_confidence for r in np.flatnonzero(live)
                ):
                    kk = i + 1  # the draft doubts its last proposal on every row: score what it has
                    props = props[:, :kk]
                    break
            st.draft_calls += kk * int(live.sum())
        t_logits, t_state = target.extend(
            np.concatenate([pending_t[:, None], props], axis=1), np.ones((B, kk + 1), dtype=np.int64), t_state, all_logits=True
        )
        emitted = np.zeros(B, dtype=np.int64)
        for r in np.flatnonzero(live):
            accepted = 0
            for i in range(kk + 1):
                g = choose(target, r, t_logits[r, i], (), prompt)
                emit(r, g)
                emitted[r] += 1
                agree = i < kk and g == props[r, i]
                accepted += int(agree)
                if not active[r] or not agree:
                    break
            st.proposed += kk
            st.accepted += accepted
            st.tokens += int(emitted[r])
            st.target_calls += 1
        # the target's cache keeps [pending, d1 .. d(m-1)] of the m tokens a row emitted
        keep_t = (np.arange(kk + 1)[None, :] < emitted[:, None]).astype(np.int64)
        t_state = target.trim(t_state, keep_t)
        pending_t = np.array([o[-1] for o in out], dtype=np.int64)
        if shared_cache:
            d_state = None  # the next round starts from the target's cache again
        elif kk:
            # the draft's cache keeps its pending tokens and the proposals that were emitted
            consumed = np.minimum(np.maximum(emitted - 1, 0), kk - 1)
            keep_d = np.concatenate([d_valid, (np.arange(kk - 1)[None, :] < consumed[:, None]).astype(np.int64)], axis=1)
            keep_d[~live] = 0
            d_state = draft.trim(d_state, keep_d)
            pending_d = [out[r][len(out[r]) - int(emitted[r]) + int(consumed[r]) :] if live[r] else [target.pad] for r in range(B)]
        else:
            pending_d = [p + out[r][len(out[r]) - int(emitted[r]) :] for r, p in enumerate(pending_d)]
    length = max(len(o) for o in out)
    seqs = np.full((B, n + length), target.pad, dtype=np.int64)
    seqs[:, :n] = prompt
    for r, o in enumerate(out):
        seqs[r, n : n + len(o)] = o
    return seqs


def _probability(logits, token: int) -> float:
    """Softmax probability of ``token`` under one row's ``(vocab,)`` logits."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    m = z.max()
    return float(np.exp(z[token] - m) / np.exp(z - m).sum())


# ------------------------------------------------------------------------------ compatibility


def image_tokens_expected(cap) -> int:
    """Image tokens per image the captioner's image graph writes (its ``image_embeds`` positions)."""
    from exporters.onnx.topologies import image_tokens

    return int(cap.meta["graphs"][image_tokens.IMAGE_GRAPH]["signature"]["outputs"][0]["dims"][1])


def image_tokens_in_prompt(cap) -> int:
    """Image placeholder tokens the captioner's own processor puts in one image's prompt."""
    import numpy as np
    from PIL import Image

    from compressor.models.batches import generation_inputs

    size = int(cap.meta.get("image_size") or 32)
    inputs = generation_inputs(cap.family, cap.processor, [Image.new("RGB", (size, size))], [""], "cpu")
    return int((np.asarray(inputs["input_ids"]) == int(cap.meta["image_token_id"])).sum())


#: Text whose token ids two tokenizers must agree on (special tokens added as for a prompt).
PROBE_TEXT = "A photo of 2 cats: one is sleeping, the other one isn't."


def tokenizer_difference(a, b) -> str | None:
    """How tokenizer ``b`` differs from ``a`` (token → id maps, then the ids of :data:`PROBE_TEXT`
    with special tokens, which also catches another BOS/EOS convention), or None when they agree."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va.items()) - set(vb.items()), key=lambda x: x[1])[:3]
        only_b = sorted(set(vb.items()) - set(va.items()), key=lambda x: x[1])[:3]
        return f"{len(vb)} against {len(va)} tokens; only in the first: {only_a}, only in the second: {only_b}"
    ia, ib = a(PROBE_TEXT).input_ids, b(PROBE_TEXT).input_ids
    if list(ia) != list(ib):
        return f"the same vocabulary, but {PROBE_TEXT!r} encodes to {list(ib)[:6]}… against {list(ia)[:6]}…"
    return None


def check_pair(target, draft, draft_name: str) -> None:
    """Refuse a draft that cannot draft for ``target`` (before anything is captioned).

    Raises:
        UserInputError: either model is not decoder-only (kind causal); the tokenizers differ
            (token → id maps) or the vocabularies (logit widths) do; the draft's processor puts
            another number of image tokens in a prompt than its image path writes.
    """
    for cap, who in ((target, "the target"), (draft, f"draft {draft_name}")):
        if not getattr(cap.topology, "SPECULATIVE", False):
            raise UserInputError(
                f"{who} ({cap.dir}) is a {cap.kind} model; speculative decoding runs decoder-only models (kind causal)"
            )
    problem = tokenizer_difference(target.processor.tokenizer, draft.processor.tokenizer)
    if problem:
        raise UserInputError(f"draft {draft_name}: its tokenizer differs from the target's ({problem}); a draft must share "
                             "the target's tokenizer")
    if int(target.meta["vocab_size"]) != int(draft.meta["vocab_size"]):
        raise UserInputError(
            f"draft {draft_name}: its vocabulary has {draft.meta['vocab_size']} logits against the target's "
            f"{target.meta['vocab_size']}; a draft must share the target's vocabulary"
        )
    want, got = image_tokens_expected(draft), image_tokens_in_prompt(draft)
    if want != got:
        raise UserInputError(
            f"draft {draft_name}: its processor puts {got} image tokens in a prompt but its image path writes {want}; "
            "save the draft's processor with its model (num_query_tokens must match the model's)"
        )


class _SharedImage:
    """One image-graph session serving target and draft: the second identical call is not run again."""

    def __init__(self, session):
        self.session = session
        self._feed: dict | None = None
        self._out: list | None = None

    def run(self, names, feed: dict) -> list:
        import numpy as np

        last = self._feed
        if last is not None and last.keys() == feed.keys() and all(
            last[k].shape == feed[k].shape and np.array_equal(last[k], feed[k]) for k in feed
        ):
            return self._out
        self._out = self.session.run(names, feed)
        self._feed = {k: v.copy() for k, v in feed.items()}
        return self._out


def _file_sums(folder) -> dict[str, str]:
    """``{relative path: sha256}`` of an export's ``SHA256SUMS`` (empty when it has none)."""
    path = Path(str(folder)) / "SHA256SUMS"
    if not path.is_file():
        return {}
    return {rel: digest for digest, rel in (line.split("  ", 1) for line in path.read_text().splitlines() if line.strip())}


def _share_image_graph(target, draft) -> bool:
    """Let ``draft`` reuse ``target``'s image session when both run the same graph: the same file
    of the same export (a variant drafting for its export), or files with the same SHA-256 (a
    candidate whose image path was not changed, e.g. only language-model layers removed)."""
    from exporters.onnx.topologies import image_tokens

    name = image_tokens.IMAGE_GRAPH
    tf, df = getattr(target, "graph_files", {}).get(name), getattr(draft, "graph_files", {}).get(name)
    if not tf or not df:
        return False
    same = tf == df and Path(str(target.dir)).resolve() == Path(str(draft.dir)).resolve()
    if not same:
        ts, ds = _file_sums(target.dir), _file_sums(draft.dir)
        same = all(ts.get(f) is not None and ts.get(f) == ds.get(g) for f, g in ((tf, df), (tf + ".data", df + ".data"))
                   if f in ts or g in ds)
    if not same:
        return False
    shared = _SharedImage(target.sessions[name])
    target.sessions[name] = draft.sessions[name] = shared
    return True


def can_share_cache(target, draft) -> bool:
    """Whether ``draft`` can run on ``target``'s key/value cache: both are ONNX captioners of the
    same export folder (the draft one of its variants, e.g. the int8 decoder), so every cache
    entry has the same layer, head, dtype and meaning. A draft from another export (a candidate
    with fewer layers, or other weights) keeps its own cache."""
    from exporters.onnx.captioner import OnnxCaptioner

    if not (isinstance(target, OnnxCaptioner) and isinstance(draft, OnnxCaptioner)):
        return False
    if Path(str(target.dir)).resolve() != Path(str(draft.dir)).resolve():
        return False
    return target.np_dtype == draft.np_dtype and target.meta.get("num_layers") == draft.meta.get("num_layers")


class SpeculativeCaptioner:
    """Captions a target's greedy captions with a draft proposing tokens (the Captioner protocol).

    Args:
        target: the target captioner, opened with ``scoring=True`` (an
            :class:`~exporters.onnx.captioner.OnnxCaptioner` or a
            :func:`~exporters.onnx.modules.module_captioner`).
        draft: the draft captioner (same kinds; may differ from the target's backend).
        num_draft_tokens: ``k``, draft tokens per round (at most).
        draft_name: how settings and messages name the draft (its folder).
        min_confidence: end a round's drafting early below this draft probability
            (:func:`speculative_greedy`); None: always ``k``.
        share_cache: run the draft on the target's key/value cache (:func:`speculative_greedy`'s
            ``shared_cache``): None (default) where :func:`can_share_cache` allows it, False never.

    Attributes:
        stats: :class:`SpecStats` of every caption since creation (or the last ``stats.reset()``).
        settings: the target's settings plus ``speculative`` (draft, its backend and variant, k).

    Raises:
        UserInputError: beam search (``num_beams > 1``) with a draft, ``k < 1``, or a draft
            :func:`check_pair` refuses (exit 2).
    """

    def __init__(self, target, draft, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS, draft_name: str | None = None,
                 min_confidence: float | None = None, share_cache: bool | None = None):
        name = draft_name or str(draft.dir)
        if int(target.kwargs["num_beams"]) > 1:
            raise UserInputError(
                f"beam search (num_beams {target.kwargs['num_beams']}) with draft {name}: speculative decoding is greedy "
                "only; set num_beams: 1 or leave the draft out"
            )
        if int(num_draft_tokens) < 1:
            raise UserInputError(f"num_draft_tokens {num_draft_tokens}: expected at least 1")
        if getattr(target, "scoring_graph", None) is None:
            raise UserInputError(f"{target.dir}: a speculative target must be opened with scoring=True")
        check_pair(target, draft, name)
        if min_confidence is not None and not 0.0 < float(min_confidence) < 1.0:
            raise UserInputError(f"min_confidence {min_confidence}: expected a probability between 0 and 1 (exclusive)")
        self.target, self.draft, self.k = target, draft, int(num_draft_tokens)
        self.min_confidence = None if min_confidence is None else float(min_confidence)
        self.generation = target.generation
        self.family, self.processor = target.family, target.processor
        self.shared_image = _share_image_graph(target, draft)
        self.shared_cache = share_cache is not False and can_share_cache(target, draft)
        if share_cache and not self.shared_cache:
            raise UserInputError(f"draft {name} cannot run on the target's cache: it is not a variant of the same export")
        self.stats = SpecStats()
        self.settings = {
            **target.settings,
            "speculative": {
                "draft": name,
                "draft_backend": draft.settings.get("backend"),
                "draft_variant": getattr(draft, "variant", None),
                "num_draft_tokens": self.k,
                **({"shared_cache": True} if self.shared_cache else {}),
                **({"min_confidence": self.min_confidence} if self.min_confidence is not None else {}),
            },
        }

    def caption(self, images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[str]:
        """Caption ``images`` (the Captioner protocol), ``generation.batch_size`` at a time."""
        from compressor.models.batches import caption_batch, decode, generation_inputs

        t, d = self.target, self.draft

        def run(imgs: list, prm: list[str]) -> list[str]:
            ti = {k: _np(v) for k, v in generation_inputs(t.family, t.processor, imgs, prm, "cpu").items()}
            di = ti if self.shared_cache else {
                k: _np(v) for k, v in generation_inputs(d.family, d.processor, imgs, prm, "cpu").items()}
            return decode(t.family, t.processor, self.generate(ti, di), ti, prm)

        prompts = list(prompts) if prompts is not None else [self.generation.prompt or ""] * len(images)
        out: list[str] = []
        bs = self.generation.batch_size
        for i in range(0, len(images), bs):
            out.extend(caption_batch(t.family, t.processor, images[i : i + bs], prompts[i : i + bs], run))
        return out

    def generate(self, target_inputs: dict, draft_inputs: dict):
        """Token ids as the target's greedy :meth:`~OnnxCaptioner.generate` returns them (prompt included)."""
        return speculative_greedy(self.target, self.draft, target_inputs, draft_inputs, self.k, self.stats,
                                  self.min_confidence, self.shared_cache)


def _np(v):
    return v.detach().cpu().numpy() if hasattr(v, "detach") else v


# ------------------------------------------------------------------------------ opening drafts


@dataclass(frozen=True)
class DraftSpec:
    """Which draft a captioner uses (``compress eval --draft``, the ``evaluate`` stage's ``speculative``).

    Attributes:
        path: the draft's folder (an ONNX export, a model folder, or a run folder holding
            ``onnx/``); None: the target export's bundled draft, if it has one and ``bundled``.
        num_draft_tokens: ``k`` (None: the bundled draft's recorded value, else
            :data:`DEFAULT_DRAFT_TOKENS`).
        variant: the draft export's variant (``plain`` / ``optimized`` / ``int8``; None: its default).
        bundled: use an export's bundled draft when ``path`` is None (``--no-draft``: False).
        min_confidence: end a round's drafting below this draft probability
            (:func:`speculative_greedy`); None: always ``k``.
    """

    path: str | None = None
    num_draft_tokens: int | None = None
    variant: str | None = None
    bundled: bool = True
    min_confidence: float | None = None


@dataclass
class OpenDraft:
    """An opened draft: its captioner, ``k``, the name settings record and the confidence cut."""

    captioner: Any
    num_draft_tokens: int
    name: str
    min_confidence: float | None = None


def resolve_draft(spec: DraftSpec | None, generation, target_dir=None, device: str = "cpu", dtype: str | None = None,
                  threads: int | None = None) -> OpenDraft | None:
    """Open the draft ``spec`` names, or the bundled draft of the export ``target_dir``.

    A bundled draft is not used for beam search (its captions keep their own path); a draft
    given explicitly with beam search is refused.

    Returns:
        The opened draft, or None (no draft).

    Raises:
        UserInputError: beam search with an explicit draft, ``num_draft_tokens < 1``, or a draft
            folder that is neither an export nor a model folder (exit 2).
    """
    from exporters.onnx.metadata import is_onnx_dir

    spec = spec or DraftSpec()
    path, k = spec.path, spec.num_draft_tokens
    if k is not None and int(k) < 1:
        raise UserInputError(f"num_draft_tokens {k}: expected at least 1")
    if spec.min_confidence is not None and not 0.0 < float(spec.min_confidence) < 1.0:
        raise UserInputError(f"min_confidence {spec.min_confidence}: expected a probability between 0 and 1 (exclusive)")
    if path is None:
        found = bundled_draft(target_dir) if spec.bundled and target_dir is not None and is_onnx_dir(target_dir) else None
        if found is None:
            if k is not None or spec.variant is not None or spec.min_confidence is not None:
                raise UserInputError(
                    f"num_draft_tokens / draft variant / draft confidence given, but there is no draft: {target_dir or 'the model'} bundles "
                    "none; name one (--draft DIR)"
                )
            return None
        if int(generation.num_beams) > 1:
            log.info("%s: its bundled draft is not used with beam search (num_beams %s)", target_dir, generation.num_beams)
            return None
        path, k = found[0], k or found[1]
        conf = spec.min_confidence if spec.min_confidence is not None else found[3]
        spec = DraftSpec(path=str(path), num_draft_tokens=k, variant=spec.variant or found[2], min_confidence=conf)
    elif int(generation.num_beams) > 1:
        raise UserInputError(
            f"beam search (num_beams {generation.num_beams}) with draft {path}: speculative decoding is greedy only; "
            "set num_beams: 1 or leave the draft out"
        )
    draft = open_draft(path, generation, spec.variant, threads, device, dtype)
    return OpenDraft(draft, int(k or DEFAULT_DRAFT_TOKENS), str(path), spec.min_confidence)


def onnx_captioner(onnx_dir, generation, draft: OpenDraft | None = None, **kwargs):
    """The captioner of an export: an :class:`~exporters.onnx.captioner.OnnxCaptioner`, or with
    ``draft`` a :class:`SpeculativeCaptioner` whose target is the export opened with ``scoring``.

    Args:
        onnx_dir: the export folder.
        generation: decoding settings.
        draft: an opened draft (:func:`resolve_draft`), or None.
        **kwargs: :class:`~exporters.onnx.captioner.OnnxCaptioner` options (variant, threads …).
    """
    import exporters.onnx

    if draft is None:
        return exporters.onnx.OnnxCaptioner(onnx_dir, generation, **kwargs)
    target = exporters.onnx.OnnxCaptioner(onnx_dir, generation, scoring=True, **kwargs)
    return SpeculativeCaptioner(target, draft.captioner, draft.num_draft_tokens, draft.name, draft.min_confidence)


def bundled_draft(onnx_dir: Path | str) -> tuple[Path, int, str | None, float | None] | None:
    """``(draft folder, num_draft_tokens, variant, min_confidence)`` of a draft bundled in an export
    (``export.json``'s ``draft`` entry, :func:`exporters.onnx.export.export_onnx_with_draft`), or None."""
    import json

    try:
        entry = json.loads((Path(onnx_dir) / "export.json").read_text()).get(DRAFT_KEY)
    except (OSError, ValueError, AttributeError):
        return None  # the captioner itself reports an unreadable export.json
    if not entry:
        return None
    return (Path(onnx_dir) / entry["folder"], int(entry.get("num_draft_tokens") or DEFAULT_DRAFT_TOKENS), entry.get("variant"),
            entry.get("min_confidence"))


def _folder_facts(path: Path) -> dict[str, Any]:
    """What :func:`check_folders` compares, read from a folder without its weights."""
    from transformers import AutoProcessor

    from compressor.families import family_for_config
    from compressor.models.loading import is_model_dir, load_config
    from exporters.onnx.metadata import is_onnx_dir, read_export_json
    from exporters.onnx.topologies import by_kind, topology

    facts: dict[str, Any] = {"path": path}
    if is_onnx_dir(path):
        meta = read_export_json(path)
        facts["causal"] = bool(getattr(by_kind(meta["kind"]), "SPECULATIVE", False))
        facts["kind"] = meta["kind"]
        facts["meta"] = meta
    elif is_model_dir(path):
        family = family_for_config(load_config(str(path)))
        facts["causal"] = bool(getattr(topology(family.onnx_topology), "SPECULATIVE", False))
        facts["kind"] = family.describe_model()
    else:
        raise UserInputError(f"{path}: neither an ONNX export (a folder with export.json) nor a model folder")
    try:
        facts["tokenizer"] = AutoProcessor.from_pretrained(str(path)).tokenizer
    except Exception as exc:  # noqa: BLE001 - any load failure means no usable tokenizer
        raise UserInputError(f"{path}: its processor (tokenizer) cannot be loaded ({str(exc).splitlines()[0]})") from None
    return facts


def check_folders(target_dir: Path | str, draft_dir: Path | str) -> None:
    """The checks of :func:`check_pair` that need no weights, on two folders (model or export):
    decoder-only kinds and the same tokenizer; run before an export bundles a draft.

    Raises:
        UserInputError: naming the folder and what differs (exit 2).
    """
    t, d = _folder_facts(Path(target_dir)), _folder_facts(Path(draft_dir))
    for f, who in ((t, "the model"), (d, "the draft")):
        if not f["causal"]:
            raise UserInputError(f"{who} ({f['path']}) is {f['kind']}; speculative decoding runs decoder-only models")
    problem = tokenizer_difference(t["tokenizer"], d["tokenizer"])
    if problem:
        raise UserInputError(f"draft {draft_dir}: its tokenizer differs from the model's ({problem}); a draft must share "
                             "the model's tokenizer")


def open_draft(path: Path | str, generation, variant: str | None = None, threads: int | None = None, device: str = "cpu",
               dtype: str | None = None):
    """A draft captioner from a folder: an ONNX export (ONNX Runtime) or a model folder (PyTorch).

    Args:
        path: an export folder (``export.json``), a ``save_pretrained`` model folder, or a run's
            folder holding ``onnx/``.
        generation: the decoding settings (the target's).
        variant: the export's variant to run (``plain`` / ``optimized`` / ``int8``; None: its default).
        threads: ONNX Runtime intra-op threads.
        device: where a PyTorch draft runs.
        dtype: a PyTorch draft's weights dtype (None: as saved).

    Raises:
        UserInputError: the folder is neither (exit 2); a variant given for a PyTorch draft.
    """
    from compressor.models.loading import is_model_dir
    from exporters.onnx.metadata import is_onnx_dir

    p = Path(path).expanduser()
    if p.is_dir() and not is_onnx_dir(p) and is_onnx_dir(p / "onnx") and not is_model_dir(p):
        p = p / "onnx"
    if is_onnx_dir(p):
        from exporters.onnx.captioner import OnnxCaptioner

        return OnnxCaptioner(p, generation, variant=variant, threads=threads, providers=["CPUExecutionProvider"] if device == "cpu" else None)
    if is_model_dir(p):
        if variant is not None:
            raise UserInputError(f"draft {p} is a model folder (PyTorch): --draft-variant {variant} applies to ONNX exports")
        from compressor.models.loading import load_model
        from exporters.onnx.modules import module_captioner

        model, processor = load_model(p, dtype=dtype, device=device)
        if processor is None:
            raise UserInputError(f"draft {p}: no processor saved with the model; a draft needs its tokenizer")
        return module_captioner(model, processor, generation, source=str(p))
    raise UserInputError(
        f"draft {path}: neither an ONNX export (a folder with export.json) nor a model folder (config.json and *.safetensors)"
    )
