"""Graph passes applied to an exported ONNX graph before it is checked and validated.

:func:`fold_attention_layout` removes the head-splitting around opset-23 ``Attention``.
``torch.onnx`` writes transformers' attention as it is written in PyTorch. Each layer
reshapes q, k and v to ``(batch, seq, heads, head_dim)`` and transposes them to
``(batch, heads, seq, head_dim)``. Then come the ``RotaryEmbedding`` (Llama), the KV-cache
``Concat`` with the past, ``Attention``, and a transpose and reshape back. That is ten small
nodes per layer. At batch 1 each costs about as much as its launch.

The ONNX ``Attention`` operator (opset 23) also takes 3-D ``(batch, seq, heads × head_dim)``
inputs with ``q_num_heads`` / ``kv_num_heads``. It takes the past keys and values as inputs of
its own and returns the concatenated present. ``RotaryEmbedding`` takes 3-D input with
``num_heads``. The folded graph computes the same values: the ops are defined by the same
reshape (ONNX operator spec, Attention-23 and RotaryEmbedding-23; onnxruntime's CPU kernels
give bit-identical outputs on SmolLM2). Validation against PyTorch runs on the folded graph.
"""

from __future__ import annotations

import collections
from pathlib import Path

#: Transpose that moves heads in front of the sequence, and back.
_BHSD = [0, 2, 1, 3]


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _const_ints(graph, name: str) -> list[int] | None:
    """The int64 values of an initializer or ``Constant`` output ``name``, or None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            t = _attr(n, "value")
            if t is not None:
                return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
            ints = _attr(n, "value_ints")
            return [int(v) for v in ints] if ints is not None else None
    return None


def fold_attention_layout(model) -> int:
    """Rewrite every ``Attention`` fed by head-split 4-D tensors into 3-D ``Attention`` (in place).

    The pattern, per layer (the optional ``RotaryEmbedding`` is Llama's; OPT, the ViT and the
    Q-Former have none)::

        q = [Rope](Transpose(Reshape(xq)))          xq, xk, xv: (batch, seq, heads × head_dim)
        k = Concat(past_k, [Rope](Transpose(Reshape(xk))), axis=-2)      → present.i.key
        v = Concat(past_v, Transpose(Reshape(xv)), axis=-2)              → present.i.value
        y = Reshape(Transpose(Attention(q, k, v, mask)))

    becomes ``y3, present_k, present_v = Attention([Rope](xq), [Rope](xk), xv, mask, past_k,
    past_v)``, ``y = Reshape(y3)``, with ``q_num_heads`` / ``kv_num_heads`` set and each Rope given its 3-D input;
    without a KV cache (vision encoder, Q-Former) k and v are split directly and the past
    inputs are left out. Head counts come from the Rope's ``num_heads`` or the reshape's
    constant shape. An attention not matching exactly (a tensor used twice, heads unknown, an
    input not of rank 3, a transposed output used elsewhere) is left as it is. Graph outputs keep their names and
    shapes. Nodes no longer needed for any output are dropped.

    Args:
        model: an ``onnx.ModelProto`` (weights may stay external; only nodes change).

    Returns:
        The number of attentions folded.
    """
    import onnx
    from onnx import helper

    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return 0  # If/Loop/Scan bodies may read outer values the dead-code sweep cannot see
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    outs = {o.name for o in g.output}
    ranks = {
        vi.name: len(vi.type.tensor_type.shape.dim)
        for vi in [*g.input, *g.value_info]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
    }

    def only_to(name: str, node) -> bool:
        return name not in outs and len(cons[name]) == 1 and cons[name][0] is node

    def split_heads(name: str, consumer):
        """``Transpose(0,2,1,3)(Reshape(x, [b, s, heads, d]))`` feeding only ``consumer`` → (x, heads or None, nodes)."""
        t = prod.get(name)
        if t is None or t.op_type != "Transpose" or list(_attr(t, "perm", [])) != _BHSD or not only_to(name, consumer):
            return None
        r = prod.get(t.input[0])
        if r is None or r.op_type != "Reshape" or not only_to(t.input[0], t):
            return None
        if ranks.get(r.input[0], 3) != 3:  # x must be (batch, seq, hidden) to enter Attention as is
            return None
        shape = _const_ints(g, r.input[1])
        if shape is None:
            c = prod.get(r.input[1])
            if c is None or c.op_type != "Concat" or len(c.input) != 4:
                return None
            heads = _const_ints(g, c.input[2])
        elif len(shape) == 4:
            heads = shape[2:3]
        else:
            return None
        # transformers reshapes to (*input_shape, -1, head_dim): heads unknown here (None)
        n_heads = heads[0] if heads and len(heads) == 1 and heads[0] > 0 else None
        return r.input[0], n_heads, [t, r]

    def rope_of(name: str, consumer):
        """``[Rope](split_heads(x))`` feeding only ``consumer`` → (x, heads, rope or None, nodes)."""
        n = prod.get(name)
        if n is not None and n.op_type == "RotaryEmbedding":
            if not only_to(name, consumer) or len(n.input) > 3 and n.input[3]:  # position_ids: keep it simple
                return None
            got = split_heads(n.input[0], n)
            heads = _attr(n, "num_heads") or (got[1] if got else None)
            return None if got is None or not heads else (got[0], heads, n, got[2])
        got = split_heads(name, consumer)
        return None if got is None or got[1] is None else (got[0], got[1], None, got[2])

    remove: set[int] = set()
    replace: dict[int, list] = {}
    retyped: set[str] = set()
    for a in [n for n in g.node if n.op_type == "Attention"]:
        if len(a.input) < 3 or (len(a.input) > 4 and any(a.input[4:])) or any(o for o in a.output[1:]):
            continue
        kc, vc = prod.get(a.input[1]), prod.get(a.input[2])
        cached = [c is not None and c.op_type == "Concat" and len(c.input) == 2 and _attr(c, "axis") in (-2, 2) for c in (kc, vc)]
        if cached[0] != cached[1]:
            continue
        if cached[0]:  # self-attention with a KV cache: the past is concatenated in front
            k, v = rope_of(kc.input[1], kc), split_heads(vc.input[1], vc)
            past, present, concats = [kc.input[0], vc.input[0]], [kc.output[0], vc.output[0]], [kc, vc]
        else:  # no cache (vision, Q-Former, cross-attention on fixed features)
            k, v = rope_of(a.input[1], a), split_heads(a.input[2], a)
            past, present, concats = [], [], []
        q = rope_of(a.input[0], a)
        y = a.output[0]
        ot = cons[y][0] if len(cons[y]) == 1 and y not in outs else None
        if q is None or k is None or v is None or ot is None or ot.op_type != "Transpose" or list(_attr(ot, "perm", [])) != _BHSD:
            continue
        after = cons[ot.output[0]]
        orr = after[0] if after and only_to(ot.output[0], after[0]) else None
        if orr is None or orr.op_type != "Reshape" or v[1] not in (None, k[1]):
            continue
        new = []
        ins = []
        for x, _, rope, _ in (q, k):
            if rope is None:
                ins.append(x)
                continue
            r = helper.make_node("RotaryEmbedding", [x, *rope.input[1:]], [rope.output[0]], name=rope.name)
            r.attribute.extend(rope.attribute)
            new.append(r)
            retyped.add(rope.output[0])
            ins.append(rope.output[0])
        qin, kin = ins
        mask = a.input[3] if len(a.input) > 3 else ""
        inputs = [qin, kin, v[0], mask, *past]
        while not inputs[-1]:
            inputs.pop()
        # Y is (batch, seq, heads × head_dim) now: the merging Reshape after it stays (a Reshape
        # keeps element order, so it still yields what it did from the transposed 4-D output)
        att = helper.make_node("Attention", inputs, [ot.output[0], *present], name=a.name)
        retyped.add(ot.output[0])
        att.attribute.extend(x for x in a.attribute if x.name not in ("q_num_heads", "kv_num_heads"))
        att.attribute.extend([helper.make_attribute("q_num_heads", q[1]), helper.make_attribute("kv_num_heads", k[1])])
        new.append(att)
        replace[id(a)] = new
        gone = [*concats, ot, *q[3], *k[3], *v[2]] + [r for r in (q[2], k[2]) if r is not None]
        remove.update(id(n) for n in gone)
    if not replace:
        return 0
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes.extend(replace[id(n)])
        elif id(n) not in remove:
            nodes.append(n)
    # drop what no output needs any more (the shape arithmetic of the removed reshapes)
    need = set(outs)
    keep = []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input} | outs
    for init in [t for t in g.initializer if t.name not in used]:  # the removed reshapes' shapes
        g.initializer.remove(init)
    produced = {o for n in keep for o in n.output}
    stale = [vi for vi in g.value_info if vi.name in retyped or vi.name not in produced]
    for vi in stale:
        g.value_info.remove(vi)
    return len(replace)


def fold_attention_layout_file(path: Path) -> int:
    """:func:`fold_attention_layout` on a saved graph, rewritten in place (external weights untouched).

    Returns:
        The number of attentions folded (0: the file is not rewritten).
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    n = fold_attention_layout(m)
    if n:
        tmp = path.with_name(f".{path.name}.fold")
        onnx.save_model(m, str(tmp))
        tmp.replace(path)
    return n


#: The input :func:`score_last_positions` adds: how many trailing positions get logits.
NUM_LOGITS = "num_logits"
#: Nodes :func:`score_last_positions` walks back from the last-position selection to the
#: sequence slice in front of the language-model head (the head, and an int8 activation quantiser).
_HEAD_DEPTH = 4


def score_last_positions(model, logits: str = "logits") -> bool:
    """Let a decoder graph return the logits of its last ``n`` positions instead of the last one (in place).

    The decoder graphs of this project return ``logits (batch, vocab)`` of the last position:
    transformers' ``logits_to_keep=1`` slices the hidden states before the head
    (``Slice(starts=[-1], axes=[1])``) and the wrapper selects that position
    (``Gather(axis=1, index=-1)``), in both exporters, in the ORT_ENABLE_ALL copy and in the int8
    decoder. Speculative decoding (Leviathan et al. 2023) scores several draft tokens in one
    call, so the target needs every new position's logits; this pass derives that graph from
    the exported one, leaving the export itself as it is. The slice's start becomes
    ``-num_logits`` (a new int64 input of shape ``(1,)``) and the last-position selection an
    ``Identity``: ``logits (batch, num_logits, vocab)``. With ``num_logits = [1]`` the graph
    computes what the original computed (the head still runs on one position), so one session
    serves the prefill, single steps and scoring calls.

    Args:
        model: an ``onnx.ModelProto`` of a decoder (weights may stay external; only nodes change).
        logits: the logits output's name.

    Returns:
        True when rewritten; False when the graph does not end in that pattern (nothing changed).
    """
    import onnx
    from onnx import helper

    g = model.graph
    out = next((o for o in g.output if o.name == logits), None)
    if out is None or any(i.name == NUM_LOGITS for i in g.input):
        return False
    prod = {o: n for n in g.node for o in n.output}
    node = prod.get(logits)
    passed = []
    while node is not None and node.op_type in ("Cast", "Identity"):
        passed.append(node.output[0])
        node = prod.get(node.input[0])
    if node is None or node.op_type != "Gather" or _attr(node, "axis", 0) != 1 or _const_ints(g, node.input[1]) != [-1]:
        return False
    gather = node
    # the sequence slice in front of the head: breadth-first over the head's inputs
    found, frontier = None, [gather.input[0]]
    visited = set(frontier)
    for _ in range(_HEAD_DEPTH):
        nxt = []
        for t in frontier:
            visited.add(t)
            n = prod.get(t)
            if n is None:
                continue
            if n.op_type == "Slice" and len(n.input) >= 4 and _const_ints(g, n.input[1]) == [-1]:
                steps = _const_ints(g, n.input[4]) if len(n.input) > 4 and n.input[4] else [1]
                if _const_ints(g, n.input[3]) in ([1], [-2]) and steps == [1]:
                    found = n
                    break
            nxt += [i for i in n.input if i and i in prod]
        if found is not None or not nxt:
            break
        frontier = nxt
    if found is None:
        return False
    neg = f"{NUM_LOGITS}/neg"
    found.input[1] = neg
    nodes = list(g.node)
    nodes.insert(0, helper.make_node("Neg", [NUM_LOGITS], [neg], name=neg))
    i = next(j for j, n in enumerate(nodes) if n is gather)
    nodes[i] = helper.make_node("Identity", [gather.input[0]], [gather.output[0]], name=gather.name or "score/identity")
    del g.node[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(NUM_LOGITS, onnx.TensorProto.INT64, [1]))
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    batch, vocab = (dims[0], dims[-1]) if len(dims) == 2 else ("batch", None)
    out.CopyFrom(helper.make_tensor_value_info(logits, out.type.tensor_type.elem_type, [batch, NUM_LOGITS, vocab]))
    # shape hints that fixed the sequence axis to 1 (the head's output, the selection, casts)
    stale = {gather.output[0], found.output[0], *passed, *visited}
    for vi in [v for v in g.value_info if v.name in stale]:
        g.value_info.remove(vi)
    return True
