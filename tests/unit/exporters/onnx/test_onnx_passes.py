"""exporters.onnx.passes.fold_attention_layout on a hand-built one-layer graph (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

H, KVH, D = 4, 2, 8  # query heads, KV heads (grouped), head size


def _layer(extra_output: bool = False, rank2: bool = False):
    """q/k/v: Reshape → Transpose(0,2,1,3); k/v concatenated after the past; Attention; Transpose → Reshape.

    ``extra_output``: the transposed attention output is also a graph output (must not fold).
    ``rank2``: the projections are declared (batch·seq, hidden) (must not fold).
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H * D])
    past = [helper.make_tensor_value_info(f"past.{kv}", TensorProto.FLOAT, ["b", KVH, "p", D]) for kv in ("key", "value")]
    inits = [
        numpy_helper.from_array(rng.standard_normal((H * D, n)).astype(np.float32) * 0.3, f"w{t}")
        for t, n in (("q", H * D), ("k", KVH * D), ("v", KVH * D))
    ]
    inits += [
        numpy_helper.from_array(np.array([0, 0, h, D], dtype=np.int64), f"shape_{h}") for h in (H, KVH)
    ] + [numpy_helper.from_array(np.array([0, 0, H * D], dtype=np.int64), "shape_out")]
    nodes = []
    for t, h in (("q", H), ("k", KVH), ("v", KVH)):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{t}"], [f"{t}3"]),
            helper.make_node("Reshape", [f"{t}3", f"shape_{h}"], [f"{t}4"]),
            helper.make_node("Transpose", [f"{t}4"], [f"{t}t"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Concat", ["past.key", "kt"], ["present.key"], axis=-2),
        helper.make_node("Concat", ["past.value", "vt"], ["present.value"], axis=-2),
        helper.make_node("Attention", ["qt", "present.key", "present.value"], ["att"], scale=0.5),
        helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["att_t", "shape_out"], ["y"]),
    ]
    shapes = {"y": ["b", "s", H * D], "present.key": ["b", KVH, "t", D], "present.value": ["b", KVH, "t", D]}
    if extra_output:
        shapes["att_t"] = ["b", "s", H, D]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    vinfo = [helper.make_tensor_value_info("q3", TensorProto.FLOAT, ["bs", H * D])] if rank2 else []
    g = helper.make_graph(nodes, "layer", [x, *past], outs, initializer=inits, value_info=vinfo)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _run(model, feed):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))


@pytest.mark.parametrize("batch,seq,past", [(2, 3, 0), (1, 1, 5), (3, 4, 2)])
def test_fold_gives_the_same_outputs(batch, seq, past):
    import onnx

    from exporters.onnx.passes import fold_attention_layout

    rng = np.random.default_rng(1)
    feed = {
        "x": rng.standard_normal((batch, seq, H * D)).astype(np.float32),
        "past.key": rng.standard_normal((batch, KVH, past, D)).astype(np.float32),
        "past.value": rng.standard_normal((batch, KVH, past, D)).astype(np.float32),
    }
    before = _layer()
    ref = _run(before, feed)
    after = _layer()
    assert fold_attention_layout(after) == 1
    onnx.checker.check_model(after, full_check=True)
    ops = [n.op_type for n in after.graph.node]
    assert "Transpose" not in ops and "Concat" not in ops and ops.count("Reshape") == 1, ops
    assert {t.name for t in after.graph.initializer} == {"wq", "wk", "wv", "shape_out"}
    (att,) = [n for n in after.graph.node if n.op_type == "Attention"]
    assert list(att.input) == ["q3", "k3", "v3", "", "past.key", "past.value"]
    assert {a.name: a.i for a in att.attribute if a.name.endswith("num_heads")} == {"q_num_heads": H, "kv_num_heads": KVH}
    got = _run(after, feed)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", ["extra_output", "rank2", "subgraph"])
def test_fold_leaves_what_it_cannot_prove(case):
    from onnx import TensorProto, helper

    from exporters.onnx.passes import fold_attention_layout

    m = _layer(**({case: True} if case != "subgraph" else {}))
    if case == "subgraph":  # an If whose branch reads an outer value: the pass keeps out
        body = helper.make_graph(
            [helper.make_node("Identity", ["q3"], ["z"])], "b", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]
        )
        m.graph.initializer.append(helper.make_tensor("cond", TensorProto.BOOL, [], [True]))
        m.graph.node.append(helper.make_node("If", ["cond"], ["zz"], then_branch=body, else_branch=body))
    n = len(m.graph.node)
    assert fold_attention_layout(m) == 0
    assert len(m.graph.node) == n
