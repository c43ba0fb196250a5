"""ONNX Runtime captioner: greedy and beam search over the split graphs, with no PyTorch model.

``OnnxCaptioner(onnx_dir, generation)`` implements :class:`eval.captioner.Captioner` for a folder
written by :func:`exporters.onnx.export_onnx` (one holding ``export.json``), so ``compress eval`` /
``compress predict`` and the ``evaluate`` stage score an export exactly like a PyTorch model::

    from exporters.onnx import OnnxCaptioner
    cap = OnnxCaptioner("runs/demo/onnx", recipe.generation)          # CPU, export's default variant
    cap = OnnxCaptioner(d, gen, providers=["CUDAExecutionProvider"])  # onnxruntime-gpu ([gpu] extra)
    captions = cap.caption(images, prompts)

Inputs are built by the same code as PyTorch generation (``compressor.models.batches``: the
processor saved in the folder, left padding for causal LMs), and the decoding loop reproduces
transformers 5.x ``generate`` step for step so that the tokens agree: greedy (``_sample`` with
``do_sample=False``) and the vectorised beam search (``_beam_search``: top ``2 × num_beams``
continuations, length-penalised finished hypotheses, ``early_stopping``), with the repetition
penalty, no-repeat n-gram and minimum-new-tokens processors, finished rows padded with
``pad_token_id``. The first forward and each decode step are the folder's topology's
(:mod:`exporters.onnx.topologies`, found by ``export.json``'s ``kind``); the KV cache goes
through the decoder graph (past in, present out); beams reorder it with ``take`` on the batch
axis. Nothing here calls a ``torch.nn.Module``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from compressor.errors import ModelSpecError, UserInputError, VerificationError
from exporters.onnx.metadata import read_export_json, verify_onnx_dir
from exporters.onnx.passes import NUM_LOGITS

log = logging.getLogger(__name__)

#: Decoding defaults when no generation spec is given (the recipe's GenerationSpec defaults).
DEFAULT_GENERATION = dict(
    num_beams=1,
    max_new_tokens=20,
    min_new_tokens=0,
    prompt=None,
    batch_size=8,
    length_penalty=1.0,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
)
NEG = -1.0e9
#: numpy dtypes of the signature's element types (``model``: the export dtype).
_NP_DTYPES = {"float32": "float32", "int64": "int64", "float16": "float16"}


class OnnxCaptioner:
    """Captions with the split ONNX graphs under ONNX Runtime (the Captioner protocol).

    Args:
        onnx_dir: a folder written by ``compress export --onnx`` (holds ``export.json``).
        generation: decoding settings (a recipe ``GenerationSpec`` or any object with its
            fields); None for the defaults (greedy, 20 new tokens, batch 8).
        providers: ONNX Runtime execution providers, e.g. ``["CPUExecutionProvider"]``; None:
            CUDA first when this onnxruntime has it (the ``[gpu]`` extra), then CPU.
        variant: which files to run: ``plain`` (``<graph>.onnx``), ``optimized``
            (``<graph>.opt.onnx``), ``int8`` (the quantised decoder, other graphs optimised), or
            None for the export's default (int8 if it was quantised, else optimised).
        threads: intra-op threads per session (None: ONNX Runtime's default, one per core).
        verify: check ``SHA256SUMS`` before loading (a corrupted file raises).
        spinning: intra-op threads spin-wait between the nodes of a call and stop when it
            returns (see :func:`exporters.onnx.runtime.make_session`): the faster choice, and a
            pool never holds the cores between calls. False: no spinning at all, for a machine
            shared with other busy processes.
        scoring: run the decoder as its scoring graph (:func:`exporters.onnx.passes.score_last_positions`,
            derived in memory; the export is not changed): :meth:`extend` can then return the
            logits of every new position (a speculative target, :mod:`exporters.onnx.speculative`).
            Greedy and beam decoding are unchanged (one position's logits per call).

    Raises:
        ModelSpecError: not an ONNX export folder, or a variant it does not hold (exit 2);
            ``scoring`` on an export whose topology or decoder cannot score several positions.
        UserInputError: the export's dtype cannot run on these providers (bf16 on CPU).
        VerificationError: a file does not match ``SHA256SUMS``.
    """

    #: the decoder graph run as its scoring graph (``scoring``), else None
    scoring_graph: str | None = None

    def __init__(
        self,
        onnx_dir: Path | str,
        generation=None,
        providers: Sequence[str] | None = None,
        variant: str | None = None,
        threads: int | None = None,
        verify: bool = True,
        spinning: bool = True,
        scoring: bool = False,
    ):
        import numpy as np
        import onnxruntime as ort
        from transformers import AutoConfig, AutoProcessor

        from compressor.evaluation.captioner import generate_kwargs
        from compressor.families import family_for_config
        from exporters.onnx.passes import score_last_positions
        from exporters.onnx.runtime import make_session
        from exporters.onnx.topologies import by_kind

        self.dir = Path(onnx_dir)
        self.meta = read_export_json(self.dir)
        if verify:
            verify_onnx_dir(self.dir)
        self.generation = generation if generation is not None else SimpleNamespace(**DEFAULT_GENERATION)
        self.kwargs = generate_kwargs(self.generation)
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = ["CUDAExecutionProvider", *providers]
        self.providers = list(providers)
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise UserInputError(
                f"ONNX Runtime providers {missing} are not available here ({ort.get_available_providers()}); "
                "CUDA needs the [gpu] extra (onnxruntime-gpu)"
            )
        self.dtype = self.meta["dtype"]
        on_cuda = any(p.startswith("CUDA") for p in self.providers)
        if self.dtype == "bfloat16":
            raise UserInputError(
                f"{self.dir}: a bfloat16 export cannot be run by this captioner (ONNX Runtime's CPU provider has no "
                "bf16 kernels and numpy no bf16 type); export with --dtype float32 or float16 to caption with it"
            )
        self.np_dtype = np.float16 if self.dtype == "float16" else np.float32
        self.kind = self.meta["kind"]
        #: the folder's topology (its first forward and decode step)
        self.topology = by_kind(self.kind)
        self.variant = variant or self.meta.get("default_variant", "plain")
        if self.variant not in ("plain", "optimized", "int8"):
            raise ModelSpecError(f"variant '{self.variant}': expected plain, optimized or int8")
        self.sessions: dict[str, Any] = {}
        #: graph name → the file this captioner runs (the variant's choice)
        self.graph_files: dict[str, str] = {}
        self.scoring_graph = None
        if scoring:
            if not getattr(self.topology, "SPECULATIVE", False):
                raise ModelSpecError(
                    f"{self.dir}: speculative decoding runs decoder-only exports (kind causal); this export is "
                    f"kind {self.kind}"
                )
            self.scoring_graph = self.topology.DECODER
        for name, g in self.meta["graphs"].items():
            file, optimized = g["onnx"], False
            if self.variant in ("optimized", "int8") and g.get("optimized"):
                file, optimized = g["optimized"], True
            if self.variant == "int8" and g.get("int8"):
                file, optimized = g["int8"], False
            if self.variant == "int8" and not any(x.get("int8") for x in self.meta["graphs"].values()):
                raise ModelSpecError(f"{self.dir}: this export has no int8 decoder; export with --quantize int8")
            self.graph_files[name] = file
            try:
                # a token embedding is one Gather: a single thread; no pool spins between
                # the sessions that take turns every step (they would steal each other's cores)
                self.sessions[name] = make_session(
                    self.dir / file,
                    self.providers,
                    optimize=not optimized,
                    threads=1 if name in self.topology.SINGLE_THREAD_GRAPHS else threads,
                    spinning=spinning,
                    rewrite=score_last_positions if name == self.scoring_graph else None,
                )
            except ModelSpecError:
                raise
            except Exception as exc:  # onnxruntime raises its own exception types for bad files
                raise VerificationError(f"{self.dir / file}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        self.config = AutoConfig.from_pretrained(str(self.dir))
        self.processor = AutoProcessor.from_pretrained(str(self.dir))
        # an older-style processor config (no num_query_tokens …) is completed from the model config
        family_for_config(self.config).reconcile(self.config, self.dir, self.processor)
        self.family = family_for_config(self.config)
        ids = self.meta["token_ids"]
        self.eos = [int(e) for e in ids["eos_token_id"]]
        pad = ids.get("pad_token_id")
        self.pad = int(pad) if pad is not None else (self.eos[0] if self.eos else 0)
        self.settings = {
            "backend": "onnxruntime",
            "device": "cuda" if on_cuda else "cpu",
            "providers": self.providers,
            "dtype": self.dtype,
            "variant": self.variant,
            "batch_size": self.generation.batch_size,
            **{k: v for k, v in self.kwargs.items() if k != "do_sample"},
            "prompt": self.generation.prompt,
        }

    # ---------------------------------------------------------------- protocol

    def caption(self, images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[str]:
        """Caption ``images`` (see :class:`eval.captioner.Captioner`), ``generation.batch_size`` at a time.

        Args:
            images: PIL images, length ``batch``.
            prompts: one prompt per image (``""`` for none), or None for ``generation.prompt``.

        Returns:
            ``batch`` captions, prompt and special tokens stripped.
        """
        from compressor.models.batches import caption_batch, decode, generation_inputs

        def run(imgs: list, prm: list[str]) -> list[str]:
            inputs = {k: v.numpy() for k, v in generation_inputs(self.family, self.processor, imgs, prm, "cpu").items()}
            self.family.check_inputs(self.config, inputs)  # never caption without the image tokens
            return decode(self.family, self.processor, self.generate(inputs), inputs, prm)

        prompts = list(prompts) if prompts is not None else [self.generation.prompt or ""] * len(images)
        out: list[str] = []
        bs = self.generation.batch_size
        for i in range(0, len(images), bs):
            out.extend(caption_batch(self.family, self.processor, images[i : i + bs], prompts[i : i + bs], run))
        return out

    # ---------------------------------------------------------------- generation

    def generate(self, inputs: dict) -> Any:
        """Token ids as ``model.generate`` returns them (prompt included for causal LMs).

        Args:
            inputs: numpy arrays from the processor: ``input_ids`` / ``attention_mask (batch,
                seq)`` and what the image graph reads (``pixel_values (batch, 3, H, W)``, an
                instruction's ids …, named by its signature).

        Returns:
            ``(batch, seq)`` int64: for causal LMs and BLIP the prompt ids followed by the new
            tokens; for T5 the decoder start token followed by the new tokens.
        """
        logits, state, prompt = self.prefill(inputs)
        k = self.kwargs
        if k["num_beams"] > 1:
            return self._beam_search(logits, state, prompt, k)
        return self._greedy(logits, state, prompt, k)

    def prefill(self, inputs: dict):
        """The first forward (the topology's): ``(logits (batch, vocab), state, prompt ids (batch, n))``.

        Args:
            inputs: numpy arrays from the processor (see :meth:`generate`).
        """
        return self.topology.prefill(self, inputs)

    def step(self, tokens, state: dict):
        """One decode step (the topology's) for ``tokens (batch,)``: ``(logits (batch, vocab), new state)``."""
        return self.topology.step(self, tokens, state)

    # ---------------------------------------------------------------- what the topologies use

    def run(self, graph: str, feed: dict) -> list:
        """Run one graph's session: its outputs in signature order (numpy arrays).

        The scoring decoder (``scoring``) is fed ``num_logits = 1`` when the caller does not say
        how many positions it wants, and then answers ``logits (batch, vocab)`` as the exported
        decoder does: the topologies' prefill and step run on it unchanged.
        """
        if graph != self.scoring_graph or NUM_LOGITS in feed:
            return self.sessions[graph].run(None, feed)
        import numpy as np

        out = self.sessions[graph].run(None, {**feed, NUM_LOGITS: np.ones(1, dtype=np.int64)})
        return [out[0][:, -1], *out[1:]]

    def extend(self, tokens, valid, state: dict, all_logits: bool = False):
        """Feed several tokens in one decoder call (speculative decoding; decoder-only topologies).

        Args:
            tokens: ``(batch, n)`` int64 token ids.
            valid: ``(batch, n)`` 0/1: 0 marks a slot that is a hole (masked for this call and
                every later one; its logits and cache entries are never read).
            state: the state of :meth:`prefill` / :meth:`step` / :meth:`extend`.
            all_logits: return every new position's logits (needs ``scoring``); else the last one's.

        Returns:
            ``(logits, new state)``: ``(batch, n, vocab)`` with ``all_logits``, else ``(batch, vocab)``.
        """
        if all_logits and self.scoring_graph is None:
            raise ModelSpecError(f"{self.dir}: this captioner was not opened with scoring=True")
        return self.topology.extend(self, tokens, valid, state, tokens.shape[1] if all_logits else None)

    def trim(self, state: dict, keep) -> dict:
        """Mask the newest cache slots per row and drop trailing slots no row keeps.

        Args:
            state: a decoder-only state.
            keep: ``(batch, n)`` 0/1 for the last ``n`` cache slots (1: keep).
        """
        return self.topology.trim(self, state, keep)

    def graph_feed(self, graph: str, inputs: dict) -> dict:
        """The feed of ``graph`` from the processor's arrays, by the input names and element types of
        its signature in ``export.json`` (an image path may read any inputs its family declares).

        Raises:
            UserInputError: the processor gave no array the graph reads.
        """
        import numpy as np

        feed = {}
        for t in self.meta["graphs"][graph]["signature"]["inputs"]:
            if t["name"] not in inputs:
                raise UserInputError(
                    f"graph {graph} reads '{t['name']}', which the processor in {self.dir} does not produce "
                    f"(it gives {', '.join(inputs)})"
                )
            dtype = self.np_dtype if t["dtype"] == "model" else np.dtype(_NP_DTYPES[t["dtype"]])
            feed[t["name"]] = inputs[t["name"]].astype(dtype)
        return feed

    def empty_past(self, batch: int) -> list:
        """``2 × num_layers`` empty key/value arrays ``(batch, kv_heads, 0, head_dim)`` in the export dtype
        (a width-pruned model's layers have their own ``kv_heads``)."""
        import numpy as np

        from exporters.onnx.graphs import layer_kv_heads

        m = self.meta
        return [np.zeros((batch, h, 0, m["head_dim"]), dtype=self.np_dtype) for h in layer_kv_heads(m) for _ in "kv"]

    def past_feed(self, past: list, cross: list | None = None) -> dict:
        """``past.{i}.key/value`` (and ``cross.{i}.key/value``) feed entries from per-layer lists."""
        L = self.meta["num_layers"]
        feed = {f"past.{i}.{kv}": past[2 * i + j] for i in range(L) for j, kv in enumerate(("key", "value"))}
        if cross is not None:
            feed.update({f"cross.{i}.{kv}": cross[2 * i + j] for i in range(L) for j, kv in enumerate(("key", "value"))})
        return feed

    @staticmethod
    def _take(state: dict, idx) -> dict:
        """Rows ``idx`` of every batch-major array in the state (beam expansion and reordering)."""
        out = {}
        for k, v in state.items():
            out[k] = [a[idx] for a in v] if isinstance(v, list) else v[idx]
        return out

    # ---------------------------------------------------------------- logits processors

    def _process(self, seqs, scores, prompt_len: int):
        """transformers' processors in its order: repetition penalty, no-repeat n-gram, min new tokens.

        Args:
            seqs: ``(rows, cur_len)`` ids so far (prompt included, as ``generate`` passes them).
            scores: ``(rows, vocab)`` float32 logits (greedy) or log-probabilities (beam).
            prompt_len: the prompt length (``min_new_tokens`` counts from it).
        """
        import numpy as np

        g = self.generation
        if g.repetition_penalty != 1.0:
            p = float(g.repetition_penalty)
            rows = np.arange(seqs.shape[0])[:, None]
            sel = scores[rows, seqs]
            scores[rows, seqs] = np.where(sel < 0, sel * p, sel / p)
        n = int(g.no_repeat_ngram_size or 0)
        cur = seqs.shape[1]
        if n and cur + 1 >= n:
            for r in range(seqs.shape[0]):
                toks = seqs[r].tolist()
                prev = tuple(toks[cur + 1 - n : cur])
                banned = {toks[i + n - 1] for i in range(cur - n + 1) if tuple(toks[i : i + n - 1]) == prev}
                if banned:
                    scores[r, list(banned)] = -np.inf
        if g.min_new_tokens and cur - prompt_len < g.min_new_tokens and self.eos:
            scores[:, self.eos] = -np.inf
        return scores

    # ---------------------------------------------------------------- greedy

    def _greedy(self, logits, state, prompt, k):
        """transformers' greedy loop (``_sample`` with ``do_sample=False``): argmax of the processed
        logits, finished rows padded with ``pad_token_id``, stop at EOS in every row or at
        ``max_new_tokens``."""
        import numpy as np

        seqs = prompt
        max_len = prompt.shape[1] + int(k["max_new_tokens"])
        unfinished = np.ones(seqs.shape[0], dtype=bool)
        while True:
            scores = self._process(seqs, logits.astype(np.float32).copy(), prompt.shape[1])
            nxt = scores.argmax(-1).astype(np.int64)
            nxt = np.where(unfinished, nxt, self.pad)
            seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
            unfinished &= ~np.isin(nxt, self.eos)
            if not unfinished.any() or seqs.shape[1] >= max_len:
                return seqs
            logits, state = self.step(nxt, state)

    # ---------------------------------------------------------------- beam search

    def _beam_search(self, logits, state, prompt, k):
        """transformers 5.x ``GenerationMixin._beam_search`` (vectorised), ported to numpy."""
        import numpy as np

        nb = int(k["num_beams"])
        lp = float(k.get("length_penalty", 1.0))
        early = k.get("early_stopping", False)
        B, n = prompt.shape
        max_length = n + int(k["max_new_tokens"])
        beams_to_keep = max(2, 1 + len(self.eos)) * nb
        top_mask = np.array([True] * nb + [False] * (beams_to_keep - nb))
        fill = (self.pad or self.eos[0]) if self.eos else -1  # generate's `pad or eos[0]` (a pad of 0 falls to eos)

        running = np.full((B, nb, max_length), fill, dtype=np.int64)
        running[:, :, :n] = prompt[:, None, :]
        sequences = running.copy()
        running_scores = np.zeros((B, nb), dtype=np.float32)
        running_scores[:, 1:] = NEG
        beam_scores = np.full((B, nb), NEG, dtype=np.float32)
        finished = np.zeros((B, nb), dtype=bool)
        unsat = np.ones((B, 1), dtype=bool)
        running_idx = np.full((B, nb, max_length - n), -1, dtype=np.int64)
        beam_idx_out = running_idx.copy()
        rep = np.repeat(np.arange(B), nb)
        state = self._take(state, rep)
        logits = logits[rep]
        cur = n
        first = True
        while True:
            if not first:
                logits, state = self.step(running[:, :, cur - 1].reshape(-1), state)
            first = False
            x = logits.astype(np.float32)
            x = x - x.max(-1, keepdims=True)
            logp = (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)
            logp = self._process(running[:, :, :cur].reshape(B * nb, cur), logp, n)
            V = logp.shape[-1]
            acc = (logp.reshape(B, nb, V) + running_scores[:, :, None]).reshape(B, nb * V)
            top_lp, top_i = _topk(acc, beams_to_keep)
            cur_beam = top_i // V
            top_ids = top_i % V
            top_running_idx = np.take_along_axis(running_idx, cur_beam[:, :, None], axis=1)
            top_running = np.take_along_axis(running, cur_beam[:, :, None], axis=1)
            top_running[:, :, cur] = top_ids
            top_running_idx[:, :, cur - n] = cur_beam + np.arange(B)[:, None] * nb
            hits = np.isin(top_ids, self.eos) | (cur + 1 >= max_length)
            # e. running beams for the next step
            top_running_lp = (top_lp + hits.astype(np.float32) * np.float32(NEG)).astype(np.float32)
            nxt = _topk(top_running_lp, nb)[1]
            running = np.take_along_axis(top_running, nxt[:, :, None], axis=1)
            running_scores = np.take_along_axis(top_running_lp, nxt, axis=1)
            running_idx = np.take_along_axis(top_running_idx, nxt[:, :, None], axis=1)
            # f. finished hypotheses
            did = hits & top_mask[None, :]
            fin_lp = (top_lp / np.float32((cur + 1 - n) ** lp)).astype(np.float32)
            full = finished.all(-1, keepdims=True) & (early is True)
            fin_lp = fin_lp + full.astype(np.float32) * np.float32(NEG)
            fin_lp = fin_lp + (~unsat).astype(np.float32) * np.float32(NEG)
            fin_lp = fin_lp + (~did).astype(np.float32) * np.float32(NEG)
            m_seq = np.concatenate([sequences, top_running], axis=1)
            m_scores = np.concatenate([beam_scores, fin_lp], axis=1)
            m_idx = np.concatenate([beam_idx_out, top_running_idx], axis=1)
            m_fin = np.concatenate([finished, did], axis=1)
            keep = _topk(m_scores, nb)[1]
            sequences = np.take_along_axis(m_seq, keep[:, :, None], axis=1)
            beam_scores = np.take_along_axis(m_scores, keep, axis=1)
            beam_idx_out = np.take_along_axis(m_idx, keep[:, :, None], axis=1)
            finished = np.take_along_axis(m_fin, keep, axis=1)
            # g. reorder the cache, stopping condition
            state = self._take(state, running_idx[:, :, cur - n].reshape(-1))
            cur += 1
            if early == "never" and lp > 0.0:
                best_len = max_length - n
            else:
                best_len = cur - n
            best_possible = running_scores[:, :1] / np.float32(best_len**lp)
            worst_finished = np.where(finished, beam_scores.min(1, keepdims=True), np.float32(NEG))
            unsat = unsat & (best_possible > worst_finished).any(-1, keepdims=True)
            improvement = unsat.any()
            open_beam = not (finished.all() and early is True)
            valid = not hits.all()
            if not (improvement and open_beam and valid):
                break
        best = sequences[:, 0, :]
        gen_len = int((beam_idx_out[:, 0, :] + 1 != 0).sum(-1).max())
        return best[:, : n + gen_len]


def _topk(x, k: int):
    """Largest ``k`` per row, sorted descending (ties: lower index first), like ``torch.topk``."""
    import numpy as np

    if k >= x.shape[1]:
        idx = np.argsort(-x, axis=1, kind="stable")[:, :k]
    else:
        part = np.argpartition(-x, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(x, part, axis=1)
        idx = np.take_along_axis(part, _row_lexsort(part, vals), axis=1)
    return np.take_along_axis(x, idx, axis=1), idx


def _row_lexsort(part, vals):
    import numpy as np

    return np.stack([np.lexsort((p, -v)) for p, v in zip(part, vals)])
