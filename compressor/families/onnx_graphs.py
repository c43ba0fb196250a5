"""The split ONNX graphs of each BLIP family, declared as data, with their PyTorch wrappers.

optimum has no ONNX export for BLIP, BLIP-2 or InstructBLIP, so the graphs are cut here by hand
(shared/notes/stack-facts.md §5). Every graph is a small ``torch.nn.Module`` around the loaded
transformers model plus a :class:`GraphSpec` (input/output names, symbolic axes, which positions
are valid for comparison, tolerance), the way optimum declares its ``OnnxConfig`` as data.

Graphs per family (``kind`` in ``export.json``):

=============  ==================================================================================
kind           graphs
=============  ==================================================================================
``causal``     BLIP-2 / InstructBLIP with a decoder-only LM (OPT, Llama with grouped KV heads):
               ``image_encoder`` (vision + Q-Former + projection; InstructBLIP also reads the
               instruction ids), ``embed_tokens``, ``decoder`` (one graph for prefill and decode:
               past length 0 on the first call)
``seq2seq``    BLIP-2 / InstructBLIP with T5: ``image_encoder``, ``embed_tokens``, ``encoder``
               (also emits every decoder layer's cross-attention key/value, computed once per
               image), ``decoder`` (self-attention past + cross-attention past)
``blip``       BLIP: ``vision_encoder`` (ViT, plus every text-decoder layer's cross-attention
               key/value), ``text_decoder`` (input ids, self-attention past + cross past)
=============  ==================================================================================

Position ids follow ``GenerationMixin._prepare_position_ids_for_generation`` of transformers 5.x
(``cumsum(mask) - 1``, 0 at padding, sliced to the current tokens), so a left-padded batch gets
the same positions as ``model.generate``. Decoders return the logits of the last position only
(``logits_to_keep=1``): generation needs nothing else, and the language-model head is not run on
the whole prompt. Floating inputs and outputs other than ``pixel_values`` and ``logits`` (always
float32) are in the export dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compressor.families import Family, family_for_model

#: Default max |ORT − PyTorch| per graph for an fp32 export (issue 5: at most 1e-4).
FP32_TOLERANCE = 1e-4
#: fp16 exports are checked against the fp16 PyTorch model (half-precision rounding).
FP16_TOLERANCE = 2e-2


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: the ONNX name.
        dims: axis names (symbolic, dynamic) or sizes (static), e.g. ``("batch", "seq", 576)``.
        dtype: ``float32``, ``int64``, or ``model`` (the export dtype).
    """

    name: str
    dims: tuple[Any, ...]
    dtype: str = "model"


@dataclass(frozen=True)
class GraphSpec:
    """A graph's signature and comparison rules, as data (optimum's OnnxConfig idea).

    Attributes:
        name: graph (and file) name, e.g. ``decoder`` → ``decoder.onnx``.
        inputs: inputs, in the wrapper's positional order.
        outputs: outputs, in the wrapper's return order.
        valid: output name → ``(axis, mask input)``: along ``axis``, only positions where the
            mask input is 1 are compared (padded positions are never read by generation, and
            exporters may compute them differently, stack-facts §5).
        tolerance: max |ORT − PyTorch| for an fp32 export.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    valid: dict[str, tuple[int, str]] = field(default_factory=dict)
    tolerance: float = FP32_TOLERANCE

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{name: {axis: label}}`` for every symbolic axis (torch.onnx's ``dynamic_axes``)."""
        out: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            axes = {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    def signature(self) -> dict[str, Any]:
        """JSON form written to ``export.json``."""
        return {
            "inputs": [{"name": t.name, "dims": list(t.dims), "dtype": t.dtype} for t in self.inputs],
            "outputs": [{"name": t.name, "dims": list(t.dims), "dtype": t.dtype} for t in self.outputs],
            "tolerance": self.tolerance,
        }


@dataclass
class GraphDef:
    """A graph to export: its spec and the PyTorch module computing exactly its outputs."""

    spec: GraphSpec
    module: Any


@dataclass
class ExportPlan:
    """Everything the exporter and the ONNX Runtime generator need to know about one model.

    Attributes:
        kind: ``causal``, ``seq2seq`` or ``blip``.
        graphs: in export order.
        meta: JSON-able facts for ``export.json`` (layer counts, KV heads, head size, hidden
            size, image token id, number of query tokens, …).
    """

    kind: str
    graphs: list[GraphDef]
    meta: dict[str, Any]

    def graph(self, name: str) -> GraphDef:
        return next(g for g in self.graphs if g.spec.name == name)


def past_names(prefix: str, layers: int) -> list[str]:
    """``[f"{prefix}.0.key", f"{prefix}.0.value", …]`` (the layout every decoder graph uses)."""
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def generation_position_ids(attention_mask, seq_len: int):
    """Position ids of the last ``seq_len`` tokens as ``GenerationMixin`` builds them.

    Args:
        attention_mask: ``(batch, past + seq)`` of 0/1.
        seq_len: current tokens.

    Returns:
        ``(batch, seq)`` int64: ``cumsum(mask) - 1``, 0 where the mask is 0.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos[:, -seq_len:]


# --------------------------------------------------------------------------------------------
# Wrappers (nn.Modules built lazily so this module imports without torch)
# --------------------------------------------------------------------------------------------


def _modules():
    import torch
    from torch import nn
    from transformers import DynamicCache, EncoderDecoderCache

    class ImageEncoder(nn.Module):
        """BLIP-2 / InstructBLIP: pixels (+ instruction) → language-model inputs.

        ``(batch, 3, H, W)`` float32 [+ ``qformer_input_ids`` / ``qformer_attention_mask``
        ``(batch, q)``] → ``image_embeds (batch, num_query_tokens, lm_hidden)``: the vision
        encoder, the Q-Former over the learned queries (and the instruction), the projection,
        as ``get_image_features`` / ``generate`` of transformers 5.x compute them. Only those
        parts are registered: the dynamo exporter keeps every registered parameter.
        """

        def __init__(self, model, with_text: bool):
            super().__init__()
            self.vision_model = model.vision_model
            self.qformer = model.qformer
            self.query_tokens = model.query_tokens
            self.language_projection = model.language_projection
            self.with_text = with_text
            self.dtype_ = next(model.vision_model.parameters()).dtype
            self.out_dtype = model.language_projection.weight.dtype

        def forward(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
            image_embeds = self.vision_model(pixel_values=pixel_values.to(self.dtype_), return_dict=True).last_hidden_state
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            if self.with_text:  # InstructBLIP: the Q-Former also reads the instruction
                query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image_embeds.device)
                out = self.qformer(
                    input_ids=qformer_input_ids,
                    attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
                    query_embeds=query_tokens,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_mask,
                    return_dict=True,
                )
                query_output = out[0][:, : query_tokens.shape[1], :]
            else:
                out = self.qformer(
                    query_embeds=query_tokens,
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_mask,
                    return_dict=True,
                )
                query_output = out[0]
            if query_output.dtype != image_embeds.dtype:  # the Q-Former may be kept in fp32
                query_output = query_output.to(image_embeds.dtype)
            return self.language_projection(query_output).to(self.out_dtype)

    class EmbedTokens(nn.Module):
        """``input_ids (batch, seq)`` → ``inputs_embeds (batch, seq, hidden)``."""

        def __init__(self, embed):
            super().__init__()
            self.embed = embed

        def forward(self, input_ids):
            return self.embed(input_ids)

    class CausalDecoder(nn.Module):
        """Decoder-only LM with past: one graph for prefill (past 0) and each decode step.

        ``inputs_embeds (batch, seq, hidden)``, ``attention_mask (batch, past + seq)``,
        ``past.{i}.key/value (batch, kv_heads, past, head_dim)`` → ``logits (batch, vocab)`` of the
        last position (float32), ``present.{i}.key/value (batch, kv_heads, past + seq, head_dim)``.
        """

        def __init__(self, lm, layers: int):
            super().__init__()
            self.lm = lm
            self.layers = layers

        def forward(self, inputs_embeds, attention_mask, *past):
            cache = DynamicCache(config=self.lm.config)
            for i in range(self.layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            pos = generation_position_ids(attention_mask, inputs_embeds.shape[1])
            out = self.lm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            return (out.logits[:, -1, :].float(), *presents)

    def _cross_kv(attn_modules, states, key_attr: str, value_attr: str, head_dim: int):
        out = []
        b, n = states.shape[:2]
        for attn in attn_modules:
            k = getattr(attn, key_attr)(states).view(b, n, -1, head_dim).transpose(1, 2)
            v = getattr(attn, value_attr)(states).view(b, n, -1, head_dim).transpose(1, 2)
            out += [k, v]
        return out

    class T5Encoder(nn.Module):
        """T5 encoder over the spliced inputs, plus every decoder layer's cross-attention K/V.

        ``inputs_embeds (batch, seq, d_model)``, ``attention_mask (batch, seq)`` →
        ``encoder_hidden_states (batch, seq, d_model)``, ``cross.{i}.key/value (batch, heads, seq,
        d_kv)`` (``EncDecAttention.k/v`` of each decoder block, as T5Attention computes them).
        """

        def __init__(self, lm):
            super().__init__()
            self.encoder = lm.encoder
            self.attn = nn.ModuleList([blk.layer[1].EncDecAttention for blk in lm.decoder.block])
            self.head_dim = lm.config.d_kv

        def forward(self, inputs_embeds, attention_mask):
            h = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
            return (h, *_cross_kv(self.attn, h, "k", "v", self.head_dim))

    class T5Decoder(nn.Module):
        """T5 decoder step with self-attention past and precomputed cross-attention K/V.

        ``inputs_embeds (batch, seq, d_model)``, ``encoder_attention_mask (batch, enc)``,
        ``past.{i}.key/value (batch, heads, past, d_kv)``, ``cross.{i}.key/value (batch, heads,
        enc, d_kv)`` → ``logits (batch, vocab)`` (last position), ``present.{i}.key/value``.
        The decoder stack and head as ``T5ForConditionalGeneration.forward`` runs them
        (output scaled by ``d_model ** -0.5`` when the embeddings are tied).
        """

        def __init__(self, lm, layers: int):
            super().__init__()
            self.decoder = lm.decoder
            self.lm_head = lm.lm_head
            self.config = lm.config
            self.layers = layers

        def forward(self, inputs_embeds, encoder_attention_mask, *past):
            L = self.layers
            self_cache, cross_cache = DynamicCache(config=self.config), DynamicCache(config=self.config)
            for i in range(L):
                self_cache.update(past[2 * i], past[2 * i + 1], i)
                cross_cache.update(past[2 * L + 2 * i], past[2 * L + 2 * i + 1], i)
            cache = EncoderDecoderCache(self_cache, cross_cache)
            for i in range(L):
                cache.is_updated[i] = True
            k0 = past[2 * L]
            # only the shape of the encoder states is read (cross K/V come from the cache)
            dummy = torch.zeros(
                (k0.shape[0], k0.shape[2], self.config.d_model), dtype=inputs_embeds.dtype, device=k0.device
            )
            out = self.decoder(
                inputs_embeds=inputs_embeds,
                cache=cache,
                encoder_hidden_states=dummy,
                encoder_attention_mask=encoder_attention_mask,
                use_cache=True,
            )
            h = out[0][:, -1:, :]
            if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
                h = h * (self.config.d_model**-0.5)
            presents = [t for layer in out.cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
            return (self.lm_head(h)[:, -1, :].float(), *presents)

    class BlipVisionEncoder(nn.Module):
        """BLIP: ``pixel_values (batch, 3, H, W)`` float32 → ``image_embeds (batch, patches + 1,
        vision_hidden)`` and every text-decoder layer's cross-attention K/V
        ``cross.{i}.key/value (batch, heads, patches + 1, head_dim)``."""

        def __init__(self, model):
            super().__init__()
            self.vision_model = model.vision_model
            self.dtype_ = next(model.vision_model.parameters()).dtype
            layers = model.text_decoder.bert.encoder.layer
            self.attn = nn.ModuleList([layer.crossattention.self for layer in layers])
            self.head_dim = self.attn[0].attention_head_size

        def forward(self, pixel_values):
            h = self.vision_model(pixel_values=pixel_values.to(self.dtype_))[0]
            return (h, *_cross_kv(self.attn, h, "key", "value", self.head_dim))

    class BlipTextDecoder(nn.Module):
        """BLIP text decoder with past and precomputed cross-attention K/V.

        ``input_ids (batch, seq)``, ``attention_mask (batch, past + seq)``,
        ``past.{i}.key/value (batch, heads, past, head_dim)``, ``cross.{i}.key/value`` →
        ``logits (batch, vocab)`` (last position), ``present.{i}.key/value``.
        """

        def __init__(self, text_decoder, layers: int, vision_hidden: int):
            super().__init__()
            self.dec = text_decoder
            self.layers = layers
            self.vision_hidden = vision_hidden

        def forward(self, input_ids, attention_mask, *past):
            L = self.layers
            self_cache, cross_cache = DynamicCache(), DynamicCache()
            for i in range(L):
                self_cache.update(past[2 * i], past[2 * i + 1], i)
                cross_cache.update(past[2 * L + 2 * i], past[2 * L + 2 * i + 1], i)
            cache = EncoderDecoderCache(self_cache, cross_cache)
            for i in range(L):
                cache.is_updated[i] = True
            k0 = past[2 * L]
            dummy = torch.zeros((k0.shape[0], k0.shape[2], self.vision_hidden), dtype=k0.dtype, device=k0.device)
            pos = generation_position_ids(attention_mask, input_ids.shape[1])
            out = self.dec(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=pos,
                encoder_hidden_states=dummy,
                cache=cache,
                use_cache=True,
                is_decoder=True,
            )
            presents = [t for layer in out.cache.self_attention_cache.layers for t in (layer.keys, layer.values)]
            return (out.logits[:, -1, :].float(), *presents)

    return {
        "ImageEncoder": ImageEncoder,
        "EmbedTokens": EmbedTokens,
        "CausalDecoder": CausalDecoder,
        "T5Encoder": T5Encoder,
        "T5Decoder": T5Decoder,
        "BlipVisionEncoder": BlipVisionEncoder,
        "BlipTextDecoder": BlipTextDecoder,
    }


# --------------------------------------------------------------------------------------------
# Plans per family
# --------------------------------------------------------------------------------------------


def _kv(prefix: str, layers: int, heads: int, head_dim: int, length: str | int) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, ("batch", heads, length, head_dim)) for n in past_names(prefix, layers))


def _blip2_plan(model, family: Family, M) -> ExportPlan:
    cfg = model.config
    text = cfg.text_config
    lm = model.language_model
    hidden = int(lm.get_input_embeddings().weight.shape[1])
    vocab = int(lm.get_output_embeddings().weight.shape[0]) if lm.get_output_embeddings() is not None else int(text.vocab_size)
    nq = int(cfg.num_query_tokens)
    vc = cfg.vision_config
    image_inputs = [TensorSpec("pixel_values", ("batch", 3, int(vc.image_size), int(vc.image_size)), "float32")]
    if family.extra.get("qformer_text"):
        image_inputs += [
            TensorSpec("qformer_input_ids", ("batch", "qformer_seq"), "int64"),
            TensorSpec("qformer_attention_mask", ("batch", "qformer_seq"), "int64"),
        ]
    graphs = [
        GraphDef(
            GraphSpec("image_encoder", tuple(image_inputs), (TensorSpec("image_embeds", ("batch", nq, hidden)),)),
            M["ImageEncoder"](model, bool(family.extra.get("qformer_text"))),
        ),
        GraphDef(
            GraphSpec(
                "embed_tokens",
                (TensorSpec("input_ids", ("batch", "seq"), "int64"),),
                (TensorSpec("inputs_embeds", ("batch", "seq", hidden)),),
            ),
            M["EmbedTokens"](lm.get_input_embeddings()),
        ),
    ]
    meta: dict[str, Any] = {
        "hidden_size": hidden,
        "vocab_size": vocab,
        "num_query_tokens": nq,
        "image_token_id": int(cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index),
        "image_size": int(vc.image_size),
    }
    if family.decoder_only:
        L = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        dec = GraphSpec(
            "decoder",
            (
                TensorSpec("inputs_embeds", ("batch", "seq", hidden)),
                TensorSpec("attention_mask", ("batch", "total"), "int64"),
                *_kv("past", L, kv_heads, head_dim, "past"),
            ),
            (TensorSpec("logits", ("batch", vocab), "float32"), *_kv("present", L, kv_heads, head_dim, "total")),
            valid={n: (2, "attention_mask") for n in past_names("present", L)},
        )
        graphs.append(GraphDef(dec, M["CausalDecoder"](lm, L)))
        meta.update(num_layers=L, num_kv_heads=kv_heads, head_dim=head_dim)
        return ExportPlan("causal", graphs, meta)
    # T5 encoder-decoder
    L_dec = int(getattr(text, "num_decoder_layers", None) or text.num_layers)
    heads, d_kv = int(text.num_heads), int(text.d_kv)
    enc = GraphSpec(
        "encoder",
        (TensorSpec("inputs_embeds", ("batch", "enc_seq", hidden)), TensorSpec("attention_mask", ("batch", "enc_seq"), "int64")),
        (TensorSpec("encoder_hidden_states", ("batch", "enc_seq", hidden)), *_kv("cross", L_dec, heads, d_kv, "enc_seq")),
        valid={"encoder_hidden_states": (1, "attention_mask"), **{n: (2, "attention_mask") for n in past_names("cross", L_dec)}},
    )
    dec = GraphSpec(
        "decoder",
        (
            TensorSpec("inputs_embeds", ("batch", "seq", hidden)),
            TensorSpec("encoder_attention_mask", ("batch", "enc_seq"), "int64"),
            *_kv("past", L_dec, heads, d_kv, "past"),
            *_kv("cross", L_dec, heads, d_kv, "enc_seq"),
        ),
        (TensorSpec("logits", ("batch", vocab), "float32"), *_kv("present", L_dec, heads, d_kv, "total")),
    )
    graphs += [GraphDef(enc, M["T5Encoder"](lm)), GraphDef(dec, M["T5Decoder"](lm, L_dec))]
    meta.update(num_layers=L_dec, num_kv_heads=heads, head_dim=d_kv)
    return ExportPlan("seq2seq", graphs, meta)


def _blip_plan(model, M) -> ExportPlan:
    cfg = model.config
    text, vc = cfg.text_config, cfg.vision_config
    layers = model.text_decoder.bert.encoder.layer
    L = len(layers)
    heads = int(text.num_attention_heads)
    head_dim = int(layers[0].attention.self.attention_head_size)
    vh = int(vc.hidden_size)
    patches = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
    vocab = int(model.text_decoder.cls.predictions.decoder.weight.shape[0])
    venc = GraphSpec(
        "vision_encoder",
        (TensorSpec("pixel_values", ("batch", 3, int(vc.image_size), int(vc.image_size)), "float32"),),
        (TensorSpec("image_embeds", ("batch", patches, vh)), *_kv("cross", L, heads, head_dim, patches)),
    )
    tdec = GraphSpec(
        "text_decoder",
        (
            TensorSpec("input_ids", ("batch", "seq"), "int64"),
            TensorSpec("attention_mask", ("batch", "total"), "int64"),
            *_kv("past", L, heads, head_dim, "past"),
            *_kv("cross", L, heads, head_dim, patches),
        ),
        (TensorSpec("logits", ("batch", vocab), "float32"), *_kv("present", L, heads, head_dim, "total")),
        valid={n: (2, "attention_mask") for n in past_names("present", L)},
    )
    graphs = [
        GraphDef(venc, M["BlipVisionEncoder"](model)),
        GraphDef(tdec, M["BlipTextDecoder"](model.text_decoder, L, vh)),
    ]
    meta = {
        "hidden_size": int(text.hidden_size),
        "vocab_size": vocab,
        "num_layers": L,
        "num_kv_heads": heads,
        "head_dim": head_dim,
        "image_size": int(vc.image_size),
        "num_patches": patches,
    }
    return ExportPlan("blip", graphs, meta)


def export_plan(model) -> ExportPlan:
    """The graphs (wrappers + specs) of a loaded BLIP-family model.

    Args:
        model: ``Blip2ForConditionalGeneration``, ``InstructBlipForConditionalGeneration`` or
            ``BlipForConditionalGeneration`` (no peft wrapper), in eval mode.

    Returns:
        An :class:`ExportPlan`.

    Raises:
        ModelSpecError: not a BLIP-family model.
    """
    family = family_for_model(model)
    M = _modules()
    plan = _blip_plan(model, M) if family.name == "blip" else _blip2_plan(model, family, M)
    # wrappers must be in eval mode too: torch.onnx.export restores the wrapper's own mode
    # recursively after exporting, which would switch the model's dropout on (train mode)
    for g in plan.graphs:
        g.module.eval()
    return plan

