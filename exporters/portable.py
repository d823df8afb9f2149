"""Lower the ``SelectiveScan`` node to standard ONNX ops (opset 17-21), so any runtime runs the model unaided.

Outside the recurrence, vectorised over the sequence in float32: softplus(delta + bias), delta·u, and
time-major (L, batch, G, K·D/G, ·) views of delta, delta·u, B and C, so channels of a group share their
B/C row without copies. An ONNX ``Scan`` walks L; its body does, on (batch, G, K·D/G, N) slices,
h = exp(delta_t·A)·h + (delta·u)_t·B_t and y_t = h @ C_t.

Why exp(delta·A) and delta·u·B are formed per step instead of once outside: measured in ONNX Runtime 1.32
(CPU provider, this 2-core box, shared with other jobs so best-of-runs) for the stage-1 shape (batch 1,
K·D 384, L 3136, N 16, G 4), whole lowered node, 1 intra-op thread / default threads:
  - dA, dBu (L, batch, K·D, N) precomputed outside; body Mul·ReduceSum for y: 82 / 66 ms
  - same, body MatMul for y:                                                  68 / 53 ms
  - same, body emits the states; one MatMul with C outside:                   74 / 56 ms
  - dA, dBu formed in the body from (L, batch, K·D) inputs (kept):            57 / 60 ms
The kept form also never holds the two (L, batch, K·D, N) float32 tensors (154 MB per scan at stage 1,
batch 1). A bare Scan doing only h = a·h + b over that shape takes 19.5 ms, of which 2.7 ms is per-step
overhead (identity body); unrolling 2 or 4 steps per Scan iteration saved ~5% in that micro-benchmark,
not worth padding L to a multiple. ORT's Softplus alone took ~15 ms on (1, 384, 3136); see below.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from medmamba_edge.runtime import scan_node

# Scan-16's signature and the Shape start/end attributes (15) hold unchanged up to opset 21.
MIN_OPSET = 17


class _Names:
    """Fresh names under one prefix per lowered node, checked against everything already in the model."""

    def __init__(self, taken: set[str]):
        self.taken = taken
        self.prefix = ""

    def start(self, node: onnx.NodeProto, index: int) -> None:
        base = (node.name or f"{scan_node.OP_TYPE}_{index}") + "/lowered"
        prefix, n = base, 1
        while any(name.startswith(prefix + "/") for name in self.taken):
            n += 1
            prefix = f"{base}_{n}"
        self.prefix = prefix

    def __call__(self, local: str) -> str:
        name = f"{self.prefix}/{local}"
        if name in self.taken:
            raise AssertionError(f"duplicate name {name}")
        self.taken.add(name)
        return name


class _Graph:
    """Appends nodes and int64 constants; each op returns its output name."""

    def __init__(self, names: _Names):
        self.names = names
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, local: str, values, dtype=np.int64) -> str:
        name = self.names(local)
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], local: str, output: str | None = None, **attrs) -> str:
        output = output or self.names(local)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.names(local + "_node"), **attrs))
        return output


def _scan_body(names: _Names, a_grouped: str) -> onnx.GraphProto:
    """One time step on (batch, G, K·D/G, ·) slices: h = exp(delta·A)·h + (delta·u)·B, y = h @ C."""
    g = _Graph(names)
    h, dt, du, b, c = (names(f"body_{n}") for n in ("h", "delta", "delta_u", "B", "C"))
    dA = g.op("Exp", [g.op("Mul", [dt, a_grouped], "body_delta_A")], "body_dA")
    dBu = g.op("Mul", [du, b], "body_dBu")
    h_next = g.op("Add", [g.op("Mul", [dA, h], "body_dA_h"), dBu], "body_h_next")
    y = g.op("MatMul", [h_next, c], "body_y")
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    return helper.make_graph(g.nodes, names("body"), [io(n) for n in (h, dt, du, b, c)], [io(h_next), io(y)])


def _lower_node(g: _Graph, node: onnx.NodeProto, u_type: int | None) -> None:
    u, delta, A, B, C, D, delta_bias = node.input
    softplus = next((a.i for a in node.attribute if a.name == "delta_softplus"), 1)
    u_in = u
    if u_type != TensorProto.FLOAT:
        # Also when u's type is unknown: a float32 -> float32 Cast costs one cheap pass at worst.
        u, delta, B, C = (g.op("Cast", [x], f"{local}_f32", to=TensorProto.FLOAT)
                          for x, local in ((u, "u"), (delta, "delta"), (B, "B"), (C, "C")))

    axis1 = g.const("axis1", [1])
    dt = g.op("Add", [delta, g.op("Unsqueeze", [delta_bias, axis1], "delta_bias_col")], "delta_biased")
    if softplus:
        threshold = g.const("softplus_threshold", scan_node.SOFTPLUS_THRESHOLD, np.float32)
        # Softplus has no threshold; above it PyTorch and mamba_ssm return the input itself. ORT's Softplus
        # is ~5x slower than log(1 + exp(x)), which differs from log1p(exp(x)) only by rounding (< 1e-7).
        one = g.const("one", 1.0, np.float32)
        exp_dt = g.op("Exp", [dt], "exp_delta")
        softplus_dt = g.op("Log", [g.op("Add", [exp_dt, one], "one_plus_exp")], "softplus")
        dt = g.op("Where", [g.op("Greater", [dt, threshold], "above_threshold"), dt, softplus_dt], "delta_softplus")

    # Channel d belongs to group d // (K·D/G), so (.., K·D) reshapes to (.., G, K·D/G) and B, C broadcast
    # over the second axis without being copied per channel.
    batch = g.op("Shape", [u], "batch", start=0, end=1)
    channels = g.op("Shape", [A], "channels", start=0, end=1)
    d_state = g.op("Shape", [A], "d_state", start=1, end=2)
    groups = g.op("Shape", [B], "groups", start=1, end=2)
    per_group = g.op("Div", [channels, groups], "channels_per_group")
    a_grouped = g.op("Reshape", [A, g.op("Concat", [groups, per_group, d_state], "A_grouped_shape", axis=0)],
                     "A_grouped")
    # (L, batch, G, K·D/G, 1): Scan walks axis 0; Reshape's 0s keep L and batch.
    grouped = g.op("Concat", [g.const("zeros", [0, 0]), groups, per_group, g.const("one_dim", [1])],
                   "grouped_shape", axis=0)

    def time_major(x: str, local: str) -> str:  # (batch, K·D, L) -> (L, batch, G, K·D/G, 1)
        return g.op("Reshape", [g.op("Transpose", [x], local + "_t", perm=[2, 0, 1]), grouped], local + "_grouped")

    def time_major_bc(x: str, local: str, axis: int) -> str:  # (batch, G, N, L) -> (L, batch, G, N) + unit axis
        return g.op("Unsqueeze", [g.op("Transpose", [x], local + "_t", perm=[3, 0, 1, 2]),
                                  g.const(f"{local}_axis", [axis])], local + "_grouped")

    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    h0 = g.op("ConstantOfShape", [g.op("Concat", [batch, groups, per_group, d_state], "state_shape", axis=0)],
              "h0", value=zero)
    scan_inputs = [
        h0,
        time_major(dt, "delta"),
        time_major(g.op("Mul", [dt, u], "delta_u"), "delta_u"),
        time_major_bc(B, "B", 3),  # (L, batch, G, 1, N): a row per step
        time_major_bc(C, "C", 4),  # (L, batch, G, N, 1): a column, for the MatMul
    ]
    y_steps = g.names("y_steps")  # (L, batch, G, K·D/G, 1)
    g.nodes.append(helper.make_node(
        "Scan", scan_inputs, [g.names("h_last"), y_steps], name=g.names("scan_node"),
        num_scan_inputs=len(scan_inputs) - 1, body=_scan_body(g.names, a_grouped),
    ))

    y_flat = g.op("Reshape", [y_steps, g.const("flat_shape", [0, 0, -1])], "y_flat")
    y = g.op("Transpose", [y_flat], "y_scan", perm=[1, 2, 0])
    skip = g.op("Mul", [u, g.op("Unsqueeze", [D, axis1], "D_col")], "D_u")
    out = node.output[0]
    if u_type == TensorProto.FLOAT:
        g.op("Add", [y, skip], "y", output=out)
    else:
        g.op("CastLike", [g.op("Add", [y, skip], "y_f32"), u_in], "y", output=out)


def _all_names(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    names.update(i.name for i in graph.input)
    names.update(i.name for i in graph.initializer)
    names.update(v.name for v in graph.value_info)
    for n in graph.node:
        names.add(n.name)
        names.update(n.output)
        for sub in _subgraphs(n):
            _all_names(sub, names)
    return names


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [sub for a in node.attribute for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _uses_domain(nodes, domain: str) -> bool:
    return any(n.domain == domain or any(_uses_domain(sub.node, domain) for sub in _subgraphs(n)) for n in nodes)


def lower_selective_scan(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose top-level ``SelectiveScan`` nodes are standard-op subgraphs.

    A model without such a node comes back unchanged (as a copy).
    """
    is_scan = lambda n: n.domain == scan_node.DOMAIN and n.op_type == scan_node.OP_TYPE  # noqa: E731
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not any(is_scan(n) for n in model.graph.node):
        return out
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"lowering SelectiveScan needs default-domain opset >= {MIN_OPSET}, model has {opset}")

    # Element types let us skip the float32 round trip when u already is float32.
    inferred = onnx.shape_inference.infer_shapes(model)
    elem_types = {v.name: v.type.tensor_type.elem_type
                  for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    elem_types.update({t.name: t.data_type for t in model.graph.initializer})

    names = _Names(_all_names(model.graph, set()))
    nodes, initializers = [], []
    for index, node in enumerate(model.graph.node):
        if not is_scan(node):
            nodes.append(node)
            continue
        names.start(node, index)
        g = _Graph(names)
        _lower_node(g, node, elem_types.get(node.input[0]) or None)
        nodes.extend(g.nodes)
        initializers.extend(g.initializers)

    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    if not any(_uses_domain(nodes, scan_node.DOMAIN) for nodes in [out.graph.node, *(f.node for f in out.functions)]):
        kept = [o for o in out.opset_import if o.domain != scan_node.DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    return out
