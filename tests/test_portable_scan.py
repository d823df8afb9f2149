"""The portable lowering of SS2DScan must match the float64 reference in plain ONNX Runtime, with standard ops only."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge.runtime import scan_node

from tests.ss2d_reference import (BAD_DELTA_SOFTPLUS, make_ss2d_inputs, relative_error, ss2d_node_model,
                                  ss2d_reference64, with_delta_softplus)

STANDARD_DOMAINS = ("", "ai.onnx")
# float32 state and accumulation against float64: what is left is rounding.
FLOAT32_TOLERANCE = 1e-5
# The float16 output's own rounding (2^-11 relative) dominates.
FLOAT16_TOLERANCE = 1e-3


# Channels whose delta goes above the softplus threshold in test_softplus_threshold.
ABOVE_THRESHOLD = slice(None, None, 5)


def make_feeds(batch, channels, height, width, dt_rank, d_state, *, softplus=1, dtype=np.float32, seed=0,
               above_threshold=False):
    x, x_dbl, dt_w, dt_b, a, ds = make_ss2d_inputs(batch, channels, height, width, dt_rank, d_state, seed=seed,
                                                   dtype=dtype)
    if not softplus:  # delta is used as is: keep it positive, as the softplus output a real model feeds
        dt_b = dt_b + 5.0
    if above_threshold:
        dt_b[:, ABOVE_THRESHOLD] += 25.0
    return dict(zip(scan_node.INPUT_NAMES, (x, x_dbl, dt_w, dt_b, a, ds)))


def reference(feeds, softplus=1) -> np.ndarray:
    return ss2d_reference64(*(feeds[n] for n in scan_node.INPUT_NAMES), delta_softplus=bool(softplus))


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def lower_checked(model: onnx.ModelProto) -> onnx.ModelProto:
    lowered = lower_ss2d_scan(model)
    onnx.checker.check_model(lowered, full_check=True)
    onnx.shape_inference.infer_shapes(lowered, check_type=True, strict_mode=True)
    assert all(n.domain in STANDARD_DOMAINS for n in all_nodes(lowered.graph))
    assert [o.domain for o in lowered.opset_import] == [""]
    return lowered


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("softplus", [0, 1])
@pytest.mark.parametrize("shape", [(8, 5, 7, 2, 16), (6, 4, 3, 3, 5), (16, 12, 16, 3, 16)],
                         ids=["5x7", "4x3_d_state5", "12x16"])
def test_matches_reference_for_any_batch(shape, softplus):
    channels, height, width, dt_rank, d_state = shape
    sess = session(lower_checked(ss2d_node_model(channels, height, width, dt_rank, d_state, softplus=softplus)))
    for batch in (1, 2):  # one session: the batch is symbolic
        feeds = make_feeds(batch, channels, height, width, dt_rank, d_state, softplus=softplus, seed=batch)
        (y,) = sess.run(None, feeds)
        assert y.shape == (batch, height, width, channels) and y.dtype == np.float32
        assert relative_error(y, reference(feeds, softplus)) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("value", BAD_DELTA_SOFTPLUS.values(), ids=BAD_DELTA_SOFTPLUS.keys())
def test_delta_softplus_other_than_an_int_0_or_1_is_refused(value):
    """As the ONNX Runtime op refuses it: the float 0.0's int field, 0, was once read as softplus off."""
    with pytest.raises(ValueError, match="SS2DScan node 'ss2d': delta_softplus must be an int \\(0 or 1\\)"):
        lower_ss2d_scan(with_delta_softplus(ss2d_node_model(8, 5, 7, 2, 16), value))


def test_softplus_threshold():
    """Above the threshold delta passes through unchanged; those channels' outputs are ~25x larger, so the
    others are checked on their own too."""
    channels, height, width, dt_rank, d_state = 10, 4, 5, 2, 16
    sess = session(lower_checked(ss2d_node_model(channels, height, width, dt_rank, d_state)))
    feeds = make_feeds(2, channels, height, width, dt_rank, d_state, above_threshold=True)
    (y,) = sess.run(None, feeds)
    ref = reference(feeds)
    below = np.ones(channels, bool)
    below[ABOVE_THRESHOLD] = False
    assert relative_error(y, ref) <= FLOAT32_TOLERANCE
    assert relative_error(y[..., below], ref[..., below]) <= FLOAT32_TOLERANCE


def test_missing_softplus_attribute_means_softplus():
    channels, height, width, dt_rank, d_state = 8, 3, 4, 2, 4
    sess = session(lower_checked(ss2d_node_model(channels, height, width, dt_rank, d_state, softplus=None)))
    feeds = make_feeds(1, channels, height, width, dt_rank, d_state)
    assert relative_error(sess.run(None, feeds)[0], reference(feeds, softplus=1)) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("opset", [17, 21])
def test_opsets(opset):
    channels, height, width, dt_rank, d_state = 8, 4, 6, 2, 4
    sess = session(lower_checked(ss2d_node_model(channels, height, width, dt_rank, d_state, opset=opset)))
    feeds = make_feeds(2, channels, height, width, dt_rank, d_state)
    assert relative_error(sess.run(None, feeds)[0], reference(feeds)) <= FLOAT32_TOLERANCE


def test_float16_inputs_give_float16_output():
    channels, height, width, dt_rank, d_state = 8, 5, 7, 2, 16
    model = ss2d_node_model(channels, height, width, dt_rank, d_state, elem_type=TensorProto.FLOAT16)
    feeds = make_feeds(2, channels, height, width, dt_rank, d_state, dtype=np.float16)
    (y,) = session(lower_checked(model)).run(None, feeds)
    assert y.dtype == np.float16 and y.shape == (2, height, width, channels)
    assert relative_error(y, reference(feeds)) <= FLOAT16_TOLERANCE


def two_scan_model(channels, height, width, dt_rank, d_state) -> onnx.ModelProto:
    """Two SS2DScan nodes of the same name on shared inputs, the second reading the first's output through
    standard ops, so the lowering must keep the names around it and make its own unique."""
    single = ss2d_node_model(channels, height, width, dt_rank, d_state)
    first = single.graph.node[0]
    second = onnx.NodeProto()
    second.CopyFrom(first)
    second.input[0], second.output[0] = "x2", "y2"
    glue = [helper.make_node("Transpose", ["y"], ["y_channel_first"], name="to_channel_first", perm=[0, 3, 1, 2]),
            helper.make_node("Neg", ["y_channel_first"], ["x2"], name="negate")]
    graph = helper.make_graph([first, *glue, second], "two_scans", single.graph.input,
                              [*single.graph.output, helper.make_tensor_value_info(
                                  "y2", TensorProto.FLOAT, ["batch", height, width, channels])])
    return helper.make_model(graph, ir_version=single.ir_version, opset_imports=single.opset_import)


def test_two_scans_get_unique_names_and_keep_the_others():
    channels, height, width, dt_rank, d_state = 8, 4, 5, 2, 4
    model = two_scan_model(channels, height, width, dt_rank, d_state)
    lowered = lower_checked(model)
    nodes = list(all_nodes(lowered.graph))
    node_names = [n.name for n in nodes]
    values = [o for n in nodes for o in n.output] + [t.name for t in lowered.graph.initializer]
    assert len(set(node_names)) == len(node_names) and len(set(values)) == len(values)
    assert {"y", "y_channel_first", "x2", "y2"} <= set(values)
    assert {"to_channel_first", "negate"} <= set(node_names)

    feeds = make_feeds(2, channels, height, width, dt_rank, d_state)
    y, y2 = session(lowered).run(None, feeds)
    ref = reference(feeds)
    assert relative_error(y, ref) <= FLOAT32_TOLERANCE
    second = dict(feeds, x=-ref.transpose(0, 3, 1, 2))
    assert relative_error(y2, reference(second)) <= 10 * FLOAT32_TOLERANCE  # y's own rounding goes in


def test_model_without_scan_is_unchanged():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    assert lower_ss2d_scan(model) == model


def test_old_opset_is_refused():
    with pytest.raises(ValueError, match="opset >= 17"):
        lower_ss2d_scan(ss2d_node_model(4, 2, 3, 1, 2, opset=16))


def test_unknown_spatial_size_is_refused():
    """The scan orders are constants built from H and W, so they must be known; the batch need not be."""
    model = ss2d_node_model(4, 2, 3, 1, 2)
    x_dims = model.graph.input[0].type.tensor_type.shape.dim
    x_dims[2].dim_param = "height"
    with pytest.raises(ValueError, match=r"static shape of its input x .*\(\?, 4, \?, 3\)"):
        lower_ss2d_scan(model)


def test_weights_are_read_from_inputs_of_any_name():
    """The exporter's weights are initializers with its own names, not the contract's input names."""
    channels, height, width, dt_rank, d_state = 8, 3, 5, 2, 4
    model = ss2d_node_model(channels, height, width, dt_rank, d_state)
    feeds = make_feeds(1, channels, height, width, dt_rank, d_state)
    weights = scan_node.INPUT_NAMES[2:]
    renamed = {name: f"block0.{name}" for name in weights}
    node = model.graph.node[0]
    node.input[:] = [renamed.get(name, name) for name in node.input]
    kept_inputs = [i for i in model.graph.input if i.name not in renamed]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(feeds.pop(name), renamed[name]) for name in weights)
    (y,) = session(lower_checked(model)).run(None, feeds)
    full = make_feeds(1, channels, height, width, dt_rank, d_state)
    assert relative_error(y, reference(full)) <= FLOAT32_TOLERANCE
