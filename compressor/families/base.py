"""The shapes every family module fills in: :class:`Family`, :class:`Stack`, :class:`Width`.

A family module (``compressor/families/<name>.py``) describes one model family for one loaded
config with :class:`Family` (data: parts, stacks and their rules, LoRA patterns, widths) and
implements the family's behaviour as plain functions that :class:`Family` dispatches to (batch
layout, token ids, the GFLOPs replay of ``generate``, the ONNX topology and its wrappers). Code
outside ``compressor/families`` only ever goes through these two: it never tests a family's
name or walks a model's attribute paths itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from compressor.errors import ModelSpecError


@dataclass(frozen=True)
class Stack:
    """One removable stack of layers.

    Attributes:
        part: the stack's name everywhere (``language_model``, ``language_model.encoder`` …).
        layers: dotted path of the ``nn.ModuleList`` relative to the model root.
        count_fields: dotted config paths (relative to the model's config) holding the layer count.
        stack_config: dotted path of a module whose private ``.config`` also holds the count
            (T5 stacks hold deep copies), or None.
        layer_idx_modules: paths, relative to one layer, of modules whose ``layer_idx`` must equal
            the layer's new position (KV-cache slots, stack-facts §3).
        per_layer_fields: config list fields with one entry per layer (e.g. ``layer_types``) to trim.
        relative_bias: T5: the path, relative to a layer, of the attention holding
            ``relative_attention_bias`` in block 0 (must move to the new block 0).
        rule: a constraint on which layers may be kept (an object with ``ok(keep) -> bool``,
            ``check(n, removed)`` raising ``UserInputError``, and ``describe() -> dict``), or None.
        positions: which token positions importance scores average over: ``all``, ``queries``
            (the first ``Family.num_queries`` positions), ``attention_mask`` or
            ``decoder_attention_mask`` (the batch's mask, when its length matches).
    """

    part: str
    layers: str
    count_fields: tuple[str, ...]
    stack_config: str | None = None
    layer_idx_modules: tuple[str, ...] = ()
    per_layer_fields: tuple[str, ...] = ()
    relative_bias: str | None = None
    rule: Any = None
    positions: str = "all"

    def keep_ok(self, keep: Sequence[int]) -> bool:
        """Whether keeping these (old) indices satisfies the stack's rule."""
        return self.rule is None or self.rule.ok(list(keep))

    def check_removal(self, n: int, removed: Sequence[int]) -> None:
        """Raise ``UserInputError`` when removing ``removed`` of ``n`` layers breaks the stack's rule."""
        if self.rule is not None:
            self.rule.check(n, list(removed))


@dataclass(frozen=True)
class Width:
    """Where the prunable widths of one stack's layers live (``prune_width``), relative to a layer.

    Attributes:
        part: the stack (a key of the family's stacks).
        mlp_in: linears whose *output* channels are the MLP's hidden units (``fc1``; gate and up).
        mlp_out: linears whose *input* channels are those units (``fc2``; down).
        q, k, v, o: the self-attention projections (None: heads cannot be pruned in this stack).
        head_attrs: attention-module attributes to set after head pruning: name → what it
            counts (``heads``, ``kv_heads``, ``kv_groups``, ``width`` = heads × head_dim).
        attention: path of the attention module (relative to a layer) holding ``head_attrs``.
        heads_refused: why heads cannot be pruned here (None when they can).
    """

    part: str
    mlp_in: tuple[str, ...]
    mlp_out: tuple[str, ...]
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    attention: str | None = None
    head_attrs: tuple[tuple[str, str], ...] = ()
    heads_refused: str | None = None


@dataclass(frozen=True)
class Family:
    """Knowledge of one model family, specialised to one config.

    Attributes:
        name: the family module's name (``blip2``, ``instructblip``, ``blip`` …).
        model_type: the top-level ``config.model_type``.
        model_class: the transformers class name that loads it.
        config_class: the transformers config class name.
        parts: part name → module/parameter name prefixes (relative to the model root); the
            names of ``params_<part>`` / ``gflops_<part>``.
        stacks: removable layer stacks, by part name.
        lora: part-scoped LoRA name → regex (full match, peft semantics) over module names.
        trainable: name → prefixes that ``finetune.parts`` / ``heal: {trainable: parts}`` may
            name (the parts, some stacks, single parameters such as learned queries).
        aliases: a stack name a removal selection may use → the stack it means (BLIP's
            ``language_model: {decoder: …}`` is its only text stack).
        lm: language-model knowledge (:class:`~compressor.families.language_models.LanguageModelKind`),
            or None when the text side is the family's own.
        decoder_only: whether generation output repeats the prompt (causal LM).
        width: prunable widths (heads, MLP units) of the language model's stacks (``prune_width``).
        num_queries: learned query tokens the image path runs (BLIP-2's ``num_query_tokens``:
            the query positions of its Q-Former's stacks); 0 when the model has none.
        image_tokens: image tokens per image that reach the language model: ``num_queries``, or
            fewer when a per-image query selection is recorded (``select_queries``); 0 when the
            text side cross-attends to the image instead.
        vision_tokens: tokens entering the vision encoder per image (patches + class token): what
            token merging (``merge_tokens``) works on; 0 when the family cannot merge them.
        vision_output_tokens: tokens leaving the vision encoder per image: ``vision_tokens``, or
            fewer when token merging is recorded.
        token_options: the inference-time token options recorded in the config
            (:data:`compressor.tokens.RECORD_KEY`: ``query_tokens``, ``token_merging``).
        config_mirrors: module path → config path whose layer counts must be copied to the
            module's own ``config`` after a removal when the two are different objects.
        plan_checks: functions ``check(depths: {stack: layers after removal}, changed stacks)`` raising
            ``UserInputError`` for combinations of stacks that cannot work (T5's decoder deeper
            than its encoder).
        onnx_topology: the ONNX topology this family exports to (:mod:`exporters.onnx.topologies`).
        impl: the family module; the methods below dispatch to its functions.
        extra: family-specific facts its own functions read.
    """

    name: str
    model_type: str
    model_class: str
    config_class: str
    parts: dict[str, tuple[str, ...]]
    stacks: dict[str, Stack]
    lora: dict[str, str]
    trainable: dict[str, tuple[str, ...]]
    lm: Any
    decoder_only: bool
    impl: ModuleType
    aliases: dict[str, str] = field(default_factory=dict)
    width: tuple[Width, ...] = ()
    num_queries: int = 0
    image_tokens: int = 0
    vision_tokens: int = 0
    vision_output_tokens: int = 0
    token_options: dict[str, Any] = field(default_factory=dict)
    config_mirrors: dict[str, str] = field(default_factory=dict)
    plan_checks: tuple[Callable[[dict[str, int], set[str]], None], ...] = ()
    onnx_topology: str = "decoder_only"
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ lookups
    @property
    def lm_model_type(self) -> str:
        """The language model's ``model_type`` (``opt``, ``llama``, ``t5`` …; the family's own text model otherwise)."""
        return self.lm.model_type if self.lm is not None else self.extra.get("text_model_type", self.name)

    def describe_model(self) -> str:
        """``a blip2 model with a opt language model``: how messages name the model."""
        return f"a {self.name} model with a {self.lm_model_type} language model"

    def stack(self, part: str) -> Stack:
        """The stack of ``part`` (aliases resolved).

        Raises:
            ModelSpecError: the model has no such stack (names the valid ones).
        """
        try:
            return self.stacks[self.aliases.get(part, part)]
        except KeyError:
            raise ModelSpecError(
                f"{self.describe_model()} has no removable part '{part}'; its parts are: {', '.join(self.stacks)}"
            ) from None

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def config_cls(self):
        import transformers

        return getattr(transformers, self.config_class)

    # ------------------------------------------------------------------ behaviour (the family module's functions)
    def generation_inputs(self, processor, images: Sequence, prompts: Sequence[str], device: str = "cpu") -> dict:
        """Inputs for ``model.generate`` for a batch (see the family module)."""
        return self.impl.generation_inputs(self, processor, images, prompts, device)

    def decode(self, processor, sequences, inputs: dict, prompts: Sequence[str]) -> list[str]:
        """Generated token ids → captions, prompt and special tokens stripped."""
        return self.impl.decode(self, processor, sequences, inputs, prompts)

    def caption_batch(self, processor, images: Sequence, prompts: Sequence[str], run) -> list[str]:
        """Caption one batch with ``run(images, prompts)``, split where the family's generate needs it."""
        return self.impl.caption_batch(self, processor, images, prompts, run)

    def training_batch(self, processor, images: Sequence, targets: Sequence[str], prompts: Sequence[str]) -> dict:
        """A labelled batch for the model's own loss."""
        return self.impl.training_batch(self, processor, images, targets, prompts)

    def gflops_images(self) -> dict[str, str]:
        """The images ``compress plan`` counts GFLOPs for: key suffix → what the image is.

        ``""`` is the ``gflops`` figure; a family whose cost depends on the image's layout adds
        others (SmolVLM's ``split``: an image split into tiles → ``gflops_split``). Default: one
        image (the family module's ``GFLOPS_IMAGES`` otherwise).
        """
        return dict(getattr(self.impl, "GFLOPS_IMAGES", {"": "one image"}))

    def prompt_lengths(self, config, processor, prompt: str, image: str = "") -> tuple[int, int, bool]:
        """``(lm_tokens, image_path_input, exact)`` for one image (``compress plan``).

        ``image_path_input`` is what the image path reads besides the pixels, family by family
        (InstructBLIP: the instruction's tokens; SmolVLM: the number of tiles; else 0); ``image``
        is a key of :meth:`gflops_images`.
        """
        if image:
            return self.impl.prompt_lengths(self, config, processor, prompt, image)
        return self.impl.prompt_lengths(self, config, processor, prompt)

    def gflops_replay(self, model, lm_tokens: int, image_text_tokens: int, new_tokens: int, num_beams: int) -> float:
        """GFLOPs of captioning one image, replayed on the meta model (``compress plan``);
        ``image_text_tokens`` is :meth:`prompt_lengths`' ``image_path_input``."""
        return self.impl.gflops_replay(self, model, lm_tokens, image_text_tokens, new_tokens, num_beams)

    def token_ids(self, model, processor) -> dict[str, Any]:
        """The ids generation uses (bos, eos list, pad, decoder start): what ``generate`` reads."""
        return self.impl.token_ids(self, model, processor)

    def reconcile(self, config, folder, processor=None) -> list[str]:
        """Fill in place what an older-style model folder's ``config.json`` / processor config leave
        out (from the other file), as transformers does; returns what was filled (see the family
        module; nothing for families without such fields).

        Raises:
            ModelSpecError: a field that cannot be recovered, or the files disagree (exit 2).
        """
        fn = getattr(self.impl, "reconcile", None)
        return fn(self, config, folder, processor) if fn is not None else []

    def check_inputs(self, config, inputs: dict) -> None:
        """Refuse generation inputs the model cannot caption from (BLIP-2: a row without its image
        tokens would caption without the image); both captioners call this on every batch.

        Raises:
            ModelSpecError: naming what is wrong and the fix.
        """
        fn = getattr(self.impl, "check_inputs", None)
        if fn is not None:
            fn(self, config, inputs)

    def layer_kv_heads(self, model, part: str = "language_model") -> tuple[int, ...] | None:
        """Key/value heads of each self-attention of stack ``part`` as the weights are (width pruning
        gives every layer its own), or None when the stack's heads are not described (T5).

        Args:
            model: a model of this family (not a peft wrapper; the meta device is enough).
            part: the stack.
        """
        from compressor.families import get_module
        from compressor.pruning import head_layout

        w = next((w for w in self.width if w.part == part and w.k is not None), None)
        if w is None or part not in self.stacks:
            return None
        return tuple(head_layout(layer, w)["kv_heads"] for layer in get_module(model, self.stack(part).layers))

    def onnx_graph_parts(self, model):
        """What this family's ONNX topology (``onnx_topology``) needs of a loaded model: the image
        path's wrapper and inputs, the language model or its wrappers, facts for ``export.json``
        (the ``Parts`` of :mod:`exporters.onnx.topologies`)."""
        return self.impl.onnx_graph_parts(self, model)

    # ------------------------------------------------------------------ token reduction (compressor.tokens)
    def _token_impl(self, name: str, what: str):
        fn = getattr(self.impl, name, None)
        if fn is None:
            raise ModelSpecError(f"{self.describe_model()}: {what} is not available for this family")
        return fn

    def query_scores(self, model, batch: dict):
        """CATP votes of every learned query for every image of ``batch``: ``(batch, num_queries)``
        (:func:`compressor.tokens.catp_votes` over the family's cross-attention).

        Raises:
            ModelSpecError: the family has no learned queries.
        """
        return self._token_impl("query_scores", "query scoring (CATP)")(self, model, batch)

    def mask_query(self, model, batch: dict, index: int) -> dict:
        """``batch`` with the image token of query ``index`` masked out of the language model's input (ablation)."""
        return self._token_impl("mask_query", "query ablation")(self, model, batch, index)

    def with_image_tokens(self, model, batch: dict, tokens: int) -> dict:
        """``batch`` (built for this family's model) rewritten to carry ``tokens`` image tokens per row
        in the language model's input: what another model of the same layout but another number
        of image tokens reads (a distillation teacher with all its queries). Unchanged when the
        counts agree or the family has no image tokens in its language model's input."""
        if not self.image_tokens:
            return batch
        return self._token_impl("with_image_tokens", "image-token relayout")(self, model, batch, tokens)

    def reduce_queries(self, model, processor, keep: Sequence[int]) -> None:
        """Keep only the learned queries ``keep`` (old indices, ascending), for good: weights, config
        and processor (``processor`` may be None), in place; works on the meta device.

        Raises:
            ModelSpecError: the family has no learned queries.
        """
        self._token_impl("reduce_queries", "query reduction")(self, model, processor, list(keep))

    def apply_token_options(self, model) -> None:
        """Make ``model`` run the options of ``token_options`` (per-image query selection, token
        merging), in place and idempotently; the weights and their names do not change.

        Raises:
            ModelSpecError: an option this family cannot run.
        """
        self._token_impl("apply_token_options", "inference-time token options")(self, model)
