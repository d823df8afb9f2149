"""The portable lowering of SelectiveScan must match the reference scan in plain ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from medmamba_edge.exporters.portable import lower_selective_scan
from medmamba_edge.runtime import scan_node
from medmamba_edge.scan import selective_scan_ref

STANDARD_DOMAINS = ("", "ai.onnx")


def make_model(channels, d_state, groups, length, *, softplus=1, dtype=TensorProto.FLOAT, n_scans=1, opset=18,
               seed=0) -> onnx.ModelProto:
    """u, delta, B, C are inputs with a symbolic batch (and L when ``length`` is a string); A, D, delta_bias
    are initializers, one set per scan node."""
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info(n, dtype, ["batch", channels, length]) for n in ("u", "delta")]
    inputs += [helper.make_tensor_value_info(n, dtype, ["batch", groups, d_state, length]) for n in ("B", "C")]
    nodes, outputs, initializers = [], [], []
    for i in range(n_scans):
        delta_bias = rng.normal(size=channels)
        if not softplus:  # delta + delta_bias must then stay positive, as in a real model, or the state explodes
            delta_bias = 0.3 + 0.1 * delta_bias
        initializers += [
            numpy_helper.from_array(-np.exp(rng.normal(0, 0.5, (channels, d_state))).astype(np.float32), f"A{i}"),
            numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), f"D{i}"),
            numpy_helper.from_array(delta_bias.astype(np.float32), f"delta_bias{i}"),
        ]
        nodes.append(helper.make_node(
            scan_node.OP_TYPE, ["u", "delta", f"A{i}", "B", "C", f"D{i}", f"delta_bias{i}"], [f"y{i}"],
            name="ssm/scan",  # the same name on every node: the lowering must still produce unique names
            domain=scan_node.DOMAIN, delta_softplus=softplus,
            plugin_version=scan_node.PLUGIN_VERSION, plugin_namespace=scan_node.PLUGIN_NAMESPACE,
        ))
        outputs.append(helper.make_tensor_value_info(f"y{i}", dtype, ["batch", channels, length]))
    graph = helper.make_graph(nodes, "scan_test", inputs, outputs, initializer=initializers)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(scan_node.DOMAIN, scan_node.DOMAIN_VERSION)]
    return helper.make_model(graph, opset_imports=opsets)


def make_inputs(batch, channels, d_state, groups, length, dtype=np.float32, softplus=1, seed=1):
    rng = np.random.default_rng(seed)
    delta = rng.normal(size=(batch, channels, length))
    if softplus:
        delta[:, : channels // 2, ::3] += 25.0  # above the softplus threshold once the bias is added
    else:  # delta is used as is: keep it small and positive, like the softplus output a real model feeds
        delta = np.abs(delta) * 0.5
    return {
        "u": rng.normal(size=(batch, channels, length)).astype(dtype),
        "delta": delta.astype(dtype),
        "B": rng.normal(size=(batch, groups, d_state, length)).astype(dtype),
        "C": rng.normal(size=(batch, groups, d_state, length)).astype(dtype),
    }


def reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray], index: int = 0) -> np.ndarray:
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    node = model.graph.node[index]
    softplus = bool(next(helper.get_attribute_value(a) for a in node.attribute if a.name == "delta_softplus"))
    y = selective_scan_ref(t["u"], t["delta"], init[f"A{index}"], t["B"], t["C"], init[f"D{index}"],
                           init[f"delta_bias{index}"], softplus)
    return y.numpy()


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def lower_checked(model: onnx.ModelProto) -> onnx.ModelProto:
    lowered = lower_selective_scan(model)
    onnx.checker.check_model(lowered, full_check=True)
    onnx.shape_inference.infer_shapes(lowered, check_type=True, strict_mode=True)
    assert all(n.domain in STANDARD_DOMAINS for n in all_nodes(lowered.graph))
    assert [o.domain for o in lowered.opset_import] == [""]
    return lowered


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("d_state", [16, 5])
@pytest.mark.parametrize("softplus", [0, 1])
def test_matches_reference_for_any_batch(groups, d_state, softplus):
    channels, length = 8, 11
    model = make_model(channels, d_state, groups, length, softplus=softplus)
    sess = session(lower_checked(model))
    for batch in (1, 3):  # one session: the batch is symbolic
        feeds = make_inputs(batch, channels, d_state, groups, length, softplus=softplus)
        (y,) = sess.run(None, feeds)
        assert y.shape == (batch, channels, length) and y.dtype == np.float32
        np.testing.assert_allclose(y, reference(model, feeds), rtol=0, atol=1e-4)


@pytest.mark.parametrize("opset", [17, 21])
def test_symbolic_length_and_opsets(opset):
    channels, d_state, groups = 12, 4, 3
    model = make_model(channels, d_state, groups, "L", opset=opset)
    sess = session(lower_checked(model))
    for batch, length in ((2, 7), (1, 30)):
        feeds = make_inputs(batch, channels, d_state, groups, length)
        (y,) = sess.run(None, feeds)
        np.testing.assert_allclose(y, reference(model, feeds), rtol=0, atol=1e-4)


def test_float16_inputs_give_float16_output():
    channels, d_state, groups, length = 8, 16, 2, 13
    model = make_model(channels, d_state, groups, length, dtype=TensorProto.FLOAT16)
    feeds = make_inputs(2, channels, d_state, groups, length, dtype=np.float16)
    (y,) = session(lower_checked(model)).run(None, feeds)
    assert y.dtype == np.float16
    ref = reference(model, feeds)
    np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_two_scans_get_unique_names():
    channels, d_state, groups, length = 8, 5, 2, 6
    model = make_model(channels, d_state, groups, length, n_scans=2)
    lowered = lower_checked(model)
    nodes = list(all_nodes(lowered.graph))
    node_names = [n.name for n in nodes]
    values = [o for n in nodes for o in n.output] + [t.name for t in lowered.graph.initializer]
    assert len(set(node_names)) == len(node_names) and len(set(values)) == len(values)
    assert sum(n.op_type == "Scan" for n in lowered.graph.node) == 2
    feeds = make_inputs(2, channels, d_state, groups, length)
    for index, y in enumerate(session(lowered).run(None, feeds)):
        np.testing.assert_allclose(y, reference(model, feeds, index), rtol=0, atol=1e-4)


def test_model_without_scan_is_unchanged():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert lower_selective_scan(model) == model


def test_old_opset_is_refused():
    with pytest.raises(ValueError, match="opset"):
        lower_selective_scan(make_model(4, 2, 1, 3, opset=16))
