"""Lower the ``SS2DScan`` node (runtime/scan_node.py) to standard ONNX ops (opset 17-21), so any runtime runs the
model unaided.

Outside the recurrence, vectorised over all positions in float32: delta (one batched MatMul for the four
directions, bias included), softplus, delta·x; then one Gather per tensor, the scan orders its constant
indices, puts every direction's positions in its scan order. The four directions walk their sequences side
by side in one ONNX ``Scan`` of L steps, whose state is (K, batch, N, D) and whose body does
h = exp(delta_t·A)·h + (delta·x)_t·B_t and y_t = C_t @ h. D last because ONNX Runtime's broadcasting Mul
works per contiguous span and D spans are 6x longer than N ones (~15% faster at stage 1). Last, a Gather per
direction with the inverse order brings its outputs back to row-major positions, where one Sum adds them
and Ds·x.

Measured in ONNX Runtime 1.32 (CPU provider, a 2-core VM shared with other jobs, so best of interleaved runs
taken while the other core was idle), whole lowered node at batch 1, 1 / 2 intra-op threads:
  stage 1 (D 96, 56×56) 50 / 54 ms, stage 2 (192, 28×28) 19 / 20, stage 3 (384, 14×14) 8.5 / 10,
  stage 4 (768, 7×7) 3.9 / 4.6: 181 / 196 ms for the ten scans of a MedMamba-T image at 224×224.
Alternatives measured against this form at stage 1:
  - exp(delta·A) precomputed outside as an (L, K, batch, N, D) tensor (77 MB), the body without Mul·Exp:
    26% slower (7-19% at the other stages); streaming it from memory costs more than recomputing it.
  - the sequence cut into M chunks run side by side as M times larger nodes (a Scan for each chunk's end
    state from zero, a Scan over the chunks carrying the true state, a Scan rerunning each chunk from it):
    twice the arithmetic in L/M steps. M = 7: 35% slower on 1 thread, 20% on 2; M = 28, 49 on 2 threads:
    25%, 35% slower. Two threads gain nothing on ORT's per-step nodes even at 300k values, so fewer, bigger
    steps do not pay.
  - ORT's Softplus op: 2x the cost of the whole softplus chain used instead (_softplus).
The per-step nodes cost ~1.6 µs each, mostly ORT's per-node overhead; outside the Scan, about 45% of the time at
stage 1, a saved op is worth ~1 ms.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from medmamba_edge.runtime import scan_node

# Scan-16's signature, Split's and ReduceSum's axes-as-input forms (13) and the Shape start/end attributes (15)
# hold unchanged up to opset 21.
MIN_OPSET = 17
K = scan_node.NUM_DIRECTIONS


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
    """Appends nodes and constants; ``op`` returns its output's name, ``multi`` those of a multi-output op."""

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

    def multi(self, op_type: str, inputs: list[str], locals_: list[str], local: str, **attrs) -> list[str]:
        outputs = [self.names(n) for n in locals_]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.names(local + "_node"), **attrs))
        return outputs


def _float_io(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _step_body(names: _Names, a: str) -> onnx.GraphProto:
    """One time step on (K, batch, ·, ·) slices: h = exp(delta·A)·h + (delta·x)·B, y = C @ h."""
    g = _Graph(names)
    h, dt, du, b, c = (names(f"step_{n}") for n in ("h", "delta", "delta_x", "B", "C"))
    dA = g.op("Exp", [g.op("Mul", [dt, a], "step_delta_A")], "step_dA")
    h_next = g.op("Add", [g.op("Mul", [dA, h], "step_dA_h"), g.op("Mul", [du, b], "step_dBx")], "step_h_next")
    y = g.op("MatMul", [c, h_next], "step_y")
    return helper.make_graph(g.nodes, names("step_body"), [_float_io(n) for n in (h, dt, du, b, c)],
                             [_float_io(n) for n in (h_next, y)])


def _softplus(g: _Graph, x: str) -> str:
    """softplus(x), x itself above the threshold as the contract says, in 9 ops. ORT's Softplus op is accurate
    but 2x slower than this whole chain (Log dominates both). Plain log(1 + e^x) loses the rounding of 1 + e^x,
    up to 6e-8 absolute: 5e-6 relative at softplus(-4.5) = 0.011 and 6e-5 at 0.001, the low end of mamba's dt
    init. So it is added back: log(1 + e) = log(u) + (e - (u - 1)) / u with u = fl(1 + e), 3e-7 relative
    from -30 to 30. Above the threshold softplus(t) rounds to t in float32, so clipping x there keeps e^x
    finite without changing a result, and the Max picks x, which is below softplus(x) everywhere else."""
    threshold = g.const("softplus_threshold", scan_node.SOFTPLUS_THRESHOLD, np.float32)
    one = g.const("one", 1.0, np.float32)
    e = g.op("Exp", [g.op("Min", [x, threshold], "delta_clipped")], "exp_delta")
    u = g.op("Add", [e, one], "one_plus_exp")
    lost = g.op("Sub", [e, g.op("Sub", [u, one], "one_plus_exp_minus_one")], "one_plus_exp_rounding")
    softplus = g.op("Add", [g.op("Log", [u], "log_one_plus_exp"), g.op("Div", [lost, u], "log_rounding")], "softplus")
    return g.op("Max", [softplus, x], "delta_softplus")


def _scan_indices(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(forward, inverse) Gather indices for batch item 0. forward (L, K): the row of a (K, L, ·) tensor that
    direction k reads at step t, k·L + seq_k(t). inverse (K, L): the (step, direction) of the scan output that
    holds direction k's output at position p, t·K + k where seq_k(t) = p."""
    length = height * width
    orders = np.stack(scan_node.scan_order(height, width))  # (K, L)
    forward = (orders + length * np.arange(K)[:, None]).T
    step_at = np.empty_like(orders)  # step_at[k, p]: the step at which direction k visits p
    np.put_along_axis(step_at, orders, np.arange(length)[None, :], axis=1)
    return forward, step_at * K + np.arange(K)[:, None]


def _lower_node(g: _Graph, node: onnx.NodeProto, shapes: dict, elem_types: dict) -> None:
    x_in, x_dbl, dt_w, dt_b, A, Ds = node.input
    _, channels, height, width = _static_dims(shapes, x_in, node, "x", 4, symbolic_first=True)
    dt_rank = _static_dims(shapes, dt_w, node, "dt_projs_weight", 3)[2]
    d_state = _static_dims(shapes, A, node, "A", 2)[1]
    softplus = scan_node.delta_softplus(node)
    length = height * width

    def as_float(name: str, local: str) -> str:
        # Also when the type is unknown: a float32 -> float32 Cast costs one cheap pass at worst.
        if elem_types.get(name) == TensorProto.FLOAT:
            return name
        return g.op("Cast", [name], f"{local}_f32", to=TensorProto.FLOAT)

    x, x_dbl, dt_w, dt_b, A, Ds = (as_float(n, local) for n, local in zip(node.input, scan_node.INPUT_NAMES))

    # Batch-major layouts throughout: their transposes swap the last two axes of contiguous matrices, which ONNX
    # Runtime does ~5x faster than moving the batch axis inward. The Gathers, with the batch folded into their
    # indices, then give the Scan its time-major (L, K, batch, ·) inputs and take its outputs back.
    rows_shape = g.const("x_dbl_rows_shape", [-1, dt_rank + 2 * d_state, length])
    rows = g.op("Transpose", [g.op("Reshape", [x_dbl, rows_shape], "x_dbl_rows")], "x_dbl_by_position",
                perm=[0, 2, 1])  # (b·K, L, R+2N)
    rows = g.op("Reshape", [rows, g.const("x_dbl_by_direction_shape", [-1, K, length, dt_rank + 2 * d_state])],
                "x_dbl_by_direction")
    dt_low, B, C = g.multi("Split", [rows, g.const("row_split", [dt_rank, d_state, d_state])],
                           ["dt_low", "B", "C"], "split_rows", axis=3)  # (b, K, L, R|N|N)
    x_by_position = g.op("Transpose", [g.op("Reshape", [x, g.const("x_flat_shape", [0, channels, length])],
                                            "x_flat")], "x_by_position", perm=[0, 2, 1])  # (b, L, D)

    # (b, K, L, R+1) @ (K, R+1, D): b·K GEMMs over every position, not L·K tiny ones; the ones column adds the
    # bias inside them, cheaper than a broadcast Add over (b, K, L, D).
    ones_shape = g.op("Concat", [g.op("Shape", [dt_low], "dt_low_shape", start=0, end=3),
                                 g.const("one_column", [1])], "ones_shape", axis=0)
    ones = g.op("ConstantOfShape", [ones_shape], "ones", value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    dt_weight_bias = g.op("Concat", [g.op("Transpose", [dt_w], "dt_projs_weight_t", perm=[0, 2, 1]),
                                     g.op("Unsqueeze", [dt_b, g.const("axis1", [1])], "dt_projs_bias_row")],
                          "dt_projs_weight_bias", axis=1)
    delta = g.op("MatMul", [g.op("Concat", [dt_low, ones], "dt_low_ones", axis=3), dt_weight_bias], "delta_proj")
    if softplus:
        delta = _softplus(g, delta)
    delta_x = g.op("Mul", [delta, g.op("Unsqueeze", [x_by_position, g.const("direction_axis", [1])],
                                       "x_each_direction")], "delta_x")  # (b, K, L, D)

    # Batch item i's rows of a (b·K·L, ·) tensor are item 0's plus i·K·L.
    batch = g.op("Shape", [x], "batch", start=0, end=1)
    batch_items = g.op("Range", [g.const("zero_int", 0), g.op("Squeeze", [batch], "batch_scalar"),
                                 g.const("one_int", 1)], "batch_items")
    forward, inverse = _scan_indices(height, width)
    forward = g.op("Add", [g.const("scan_order", forward[:, :, None]),
                           g.op("Mul", [batch_items, g.const("items_stride", K * length)], "item_offsets")],
                   "scan_order_per_item")  # (L, K, b)

    def in_scan_order(value: str, local: str, trailing: list[int]) -> str:  # (b, K, L, F) -> (L, K, b, ...)
        flat = g.op("Reshape", [value, g.const(f"{local}_flat_shape", [-1, *trailing])], f"{local}_flat")
        return g.op("Gather", [flat, forward], f"{local}_in_scan_order", axis=0)

    delta_steps = in_scan_order(delta, "delta", [1, channels])
    delta_x_steps = in_scan_order(delta_x, "delta_x", [1, channels])
    b_steps = in_scan_order(B, "B", [d_state, 1])
    c_steps = in_scan_order(C, "C", [1, d_state])  # a row, for the MatMul

    a_by_direction = g.op("Reshape", [A, g.const("A_shape", [K, channels, d_state])], "A_by_direction")
    a = g.op("Reshape", [g.op("Transpose", [a_by_direction], "A_t", perm=[0, 2, 1]),
                         g.const("A_state_shape", [K, 1, d_state, channels])], "A_state")  # broadcasts over b
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    state_shape = g.op("Concat", [g.const("state_shape_head", [K]), batch,
                                  g.const("state_shape_tail", [d_state, channels])], "state_shape", axis=0)
    h0 = g.op("ConstantOfShape", [state_shape], "h0", value=zero)  # (K, b, N, D)
    scan_inputs = [h0, delta_steps, delta_x_steps, b_steps, c_steps]
    y_steps = g.multi("Scan", scan_inputs, ["h_last", "y_steps"], "scan", num_scan_inputs=len(scan_inputs) - 1,
                      body=_step_body(g.names, a))[1]  # (L, K, b, 1, D)

    # y_steps row (t·K + k)·b + i holds item i's step t of direction k.
    y_rows = g.op("Reshape", [y_steps, g.const("y_rows_shape", [-1, channels])], "y_rows")
    batch_column = g.op("Unsqueeze", [batch_items, g.const("column_axis", [1])], "batch_column")

    def by_position(k: int) -> str:  # (b, L, D): direction k's outputs at row-major positions
        rows_at = g.op("Add", [g.op("Mul", [g.const(f"row_major_order{k}", inverse[k]), batch], f"order{k}_rows"),
                               batch_column], f"order{k}_per_item")
        return g.op("Gather", [y_rows, rows_at], f"y{k}_by_position", axis=0)

    # The four directions' skip terms Ds[k·D + d]·x[d, p] share x: sum the Ds first.
    ds_sum = g.op("ReduceSum", [g.op("Reshape", [Ds, g.const("Ds_shape", [K, channels])], "Ds_by_direction"),
                                g.const("Ds_axis", [0])], "Ds_sum", keepdims=0)
    # Four Gathers and one Sum rather than a (K, ·) Gather and a ReduceSum: the Sum takes the skip term too.
    y = g.op("Sum", [*(by_position(k) for k in range(K)), g.op("Mul", [x_by_position, ds_sum], "Ds_x")],
             "y_by_position")  # (b, L, D)
    out = node.output[0]
    y_shape = g.const("y_shape", [0, height, width, channels])
    if elem_types.get(x_in) == TensorProto.FLOAT:
        g.op("Reshape", [y, y_shape], "y", output=out)
    else:
        g.op("CastLike", [g.op("Reshape", [y, y_shape], "y_f32"), x_in], "y", output=out)


def _static_dims(shapes: dict, name: str, node: onnx.NodeProto, role: str, rank: int,
                 symbolic_first: bool = False) -> tuple:
    """The dims of ``name``, all known except the batch (when ``symbolic_first``); the scan orders and reshapes
    are built from them."""
    dims = shapes.get(name)
    known = dims is not None and len(dims) == rank and all(d is not None for d in dims[int(symbolic_first):])
    if not known:
        shown = "unknown" if dims is None else "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
        raise ValueError(f"lowering {scan_node.OP_TYPE} node {node.name!r} needs the static shape of its input "
                         f"{role} ({name!r}, rank {rank}{', batch may be symbolic' if symbolic_first else ''}), "
                         f"shape inference gave {shown}")
    return dims


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


def _value_types(model: onnx.ModelProto) -> tuple[dict, dict]:
    """Shapes (tuples of int or None) and element types of the model's values, as shape inference knows them."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    shapes = {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
              for v in values if v.type.tensor_type.HasField("shape")}
    elem_types = {v.name: v.type.tensor_type.elem_type for v in values}
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    elem_types.update({t.name: t.data_type for t in model.graph.initializer})
    return shapes, elem_types


def lower_ss2d_scan(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose top-level ``SS2DScan`` nodes are standard-op subgraphs, and whose opset
    imports drop our domain once nothing uses it. Every other value keeps its name.

    A model without such a node comes back unchanged (as a copy). Raises ValueError for a default-domain opset
    below MIN_OPSET or a node whose input shapes (all but the batch) shape inference cannot tell.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not scan_node.has_scan_nodes(model):
        return out
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"lowering {scan_node.OP_TYPE} needs default-domain opset >= {MIN_OPSET}, model has {opset}")

    shapes, elem_types = _value_types(model)
    names = _Names(_all_names(model.graph, set()))
    nodes, initializers = [], []
    for index, node in enumerate(model.graph.node):
        if not scan_node.is_scan_node(node):
            nodes.append(node)
            continue
        names.start(node, index)
        g = _Graph(names)
        _lower_node(g, node, shapes, elem_types)
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
