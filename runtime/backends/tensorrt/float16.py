"""Float16 conversion of an exported graph, for strongly typed TensorRT (11+), where an FP16 engine needs
float16 tensors in the ONNX graph itself (there is no FP16 builder flag any more).

onnx + numpy only. Rules, in order:

* Constant subgraphs (initializers, ``Constant`` nodes, the shapes ``Shape``/``Size`` read, and everything
  computed only from those, such as the scan's ``A = -exp(A_logs)`` or its batch-dependent view) are left in
  float32; a float16 consumer gets a float16 copy of an initializer,
  or a ``Cast`` of a computed constant, which TensorRT folds at build time. So the scan's weights reach it
  in float32 and weights are rounded once.
* ``SS2DScan`` (plugin form) takes x and x_dbl and returns y in float16; its weights (dt_projs_weight,
  dt_projs_bias, A, Ds) stay float32. That is the plugin's contract (``runtime/scan_node.py``): it keeps state and accumulation in
  float32 either way.
* Numerically sensitive ops run in float32 between Casts: normalisation (statistics of float16 activations
  lose bits and overflow), Softmax, exp/log/pow-like ops, reductions, and control flow (the portable form's
  ``Scan`` carries the recurrent state h, which must not be rounded to float16 every step).
  Q/DQ stay float32: before opset 19 they accept float32 only. So does every op reading a DequantizeLinear
  output: TensorRT fuses DQ into the Conv/MatMul after it (an INT8 layer), which a Cast between them would
  break; the layer's float32 output is cast down after it.
* A computed float32 tensor that can leave float16's range (the output of exp-like ops, reductions, control
  flow) is clipped to ±65504 before its Cast down, as constants are: inf would turn the next subtraction into
  NaN (the portable form's softplus computes e^x up to x = 20).
* Everything else (Conv, MatMul/Gemm/Einsum, elementwise, data movement) runs in float16.
* The graph's inputs and outputs stay float32, so callers feed and read the same arrays as before.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from medmamba_edge.errors import plural

from ... import scan_node
from ...metadata import METADATA_KEY, read_onnx_metadata, write_onnx_metadata

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FLOAT16_MAX = float(np.finfo(np.float16).max)

FLOAT32_OPS = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization", "RMSNormalization",
    "LpNormalization", "Softmax", "LogSoftmax",
    "Exp", "Log", "Softplus", "Pow", "Sqrt", "Reciprocal", "Erf",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum",
    "Scan", "Loop", "If",
    "QuantizeLinear", "DequantizeLinear",
})
# Inputs that ONNX types as float32 whatever the data's type (Resize's scales).
FLOAT32_INPUTS = {"Resize": {2}}
# Ops that accept any input type, so need no Cast in front: Shape and Size read only the shape, and a Cast
# to int must see the float32 value (a float16 detour would round indices above 2048).
ANY_INPUT_TYPE_OPS = frozenset({"Shape", "Size", "Cast"})
SCAN_FLOAT32_INPUTS = {scan_node.INPUT_NAMES.index(name) for name in scan_node.FLOAT32_INPUTS}
# Ops whose output lies within float16's range whatever their input: nothing to saturate on the way down.
BOUNDED_OPS = frozenset({"LayerNormalization", "BatchNormalization", "InstanceNormalization",
                         "GroupNormalization", "RMSNormalization", "LpNormalization", "Softmax", "Erf"})
# Inputs that only read a shape: a tensor computed from them depends on the input's shape, not its values.
SHAPE_READERS = frozenset({"Shape", "Size"})


class _Converter:
    def __init__(self, graph: onnx.GraphProto, types: dict[str, int]):
        self.graph = graph
        self.types = types  # element type of every tensor in the float32 graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.constants = set(self.initializers)
        self.current: dict[str, int] = {}  # float tensors: their type in the converted graph
        self.producers: dict[str, str] = {}  # computed tensor -> the op type that computed it
        self.dequantized: set[str] = set()  # DequantizeLinear outputs
        self.limits: dict[int, str] = {}  # sign -> the initializer float16_limit made
        self.nodes: list[onnx.NodeProto] = []
        self.casts: dict[tuple[str, int], str] = {}
        self.new_initializers: list[onnx.TensorProto] = []
        self.taken = {n for node in graph.node for n in list(node.input) + list(node.output)} | set(self.initializers)

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def as_type(self, name: str, to: int) -> str:
        """``name`` as a tensor of type ``to``: itself, a float16 copy of an initializer, or a Cast."""
        if not self.is_float(name) or self.current.get(name, FLOAT) == to:
            return name
        if (name, to) in self.casts:
            return self.casts[(name, to)]
        suffix = "fp16" if to == FLOAT16 else "fp32"
        if name in self.initializers and to == FLOAT16:
            values = numpy_helper.to_array(self.initializers[name])
            # Out-of-range constants (masks like -1e9) saturate instead of becoming inf.
            converted = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
            new = self.fresh(f"{name}__{suffix}")
            self.new_initializers.append(numpy_helper.from_array(converted, new))
        else:
            new = self.fresh(f"{name}__{suffix}")
            source = name
            if to == FLOAT16 and self.producers.get(name) not in BOUNDED_OPS:
                source = self.fresh(f"{name}__saturated")
                self.nodes.append(helper.make_node("Clip", [name, self.float16_limit(-1), self.float16_limit(1)],
                                                   [source], name=self.fresh(f"{source}__clip")))
            self.nodes.append(helper.make_node("Cast", [source], [new], name=self.fresh(f"{new}__cast"), to=to))
        self.casts[(name, to)] = new
        return new

    def float16_limit(self, sign: int) -> str:
        """A float32 initializer holding ±65504, float16's largest finite magnitude (made once per sign)."""
        if sign not in self.limits:
            self.limits[sign] = self.fresh("float16_max" if sign > 0 else "float16_min")
            self.new_initializers.append(numpy_helper.from_array(np.array(sign * FLOAT16_MAX, np.float32),
                                                                 self.limits[sign]))
        return self.limits[sign]

    def convert(self) -> None:
        for value in self.graph.input:
            if self.is_float(value.name):
                self.current[value.name] = FLOAT
        for node in self.graph.node:
            self.convert_node(node)

    def convert_node(self, node: onnx.NodeProto) -> None:
        converted = onnx.NodeProto()
        converted.CopyFrom(node)
        subgraphs = list(_subgraphs(converted))
        if node.op_type in SHAPE_READERS or (
                not subgraphs and all(name in self.constants for name in node.input if name)):
            # Computed from constants and shapes only: stays as it is (see the module docstring). Every input
            # counts, not only the float ones: a DequantizeLinear of activations has one float input, its
            # scale, and its data is anything but constant.
            self.constants.update(node.output)
            self.nodes.append(node)
            return
        for name in node.output:
            self.producers[name] = node.op_type
        if node.op_type == "DequantizeLinear":
            self.dequantized.update(node.output)
        if scan_node.is_scan_node(node):
            wanted = [FLOAT if i in SCAN_FLOAT32_INPUTS else FLOAT16 for i in range(len(node.input))]
            output_type = FLOAT16
        elif node.op_type in FLOAT32_OPS or subgraphs or any(name in self.dequantized for name in node.input):
            wanted = [FLOAT] * len(node.input)
            output_type = FLOAT
            for body in subgraphs:
                self.feed_outer_scope_float32(body)
        elif node.op_type in ANY_INPUT_TYPE_OPS:
            wanted = [None] * len(node.input)
            output_type = FLOAT16  # matters only for a Cast to float, retyped to float16 here
            self.retype_attributes(converted)
        else:
            keep = FLOAT32_INPUTS.get(node.op_type, set())
            wanted = [FLOAT if i in keep else FLOAT16 for i in range(len(node.input))]
            output_type = FLOAT16
            self.retype_attributes(converted)
        for i, name in enumerate(node.input):
            if wanted[i] is not None:
                converted.input[i] = self.as_type(name, wanted[i])
        for name in node.output:
            if self.is_float(name):
                self.current[name] = output_type
        self.nodes.append(converted)

    @staticmethod
    def retype_attributes(node: onnx.NodeProto) -> None:
        """Float32 written into a float16 op's attributes: Cast's target, ConstantOfShape's fill value."""
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == FLOAT:
                attribute.i = FLOAT16
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == FLOAT:
                values = numpy_helper.to_array(attribute.t).astype(np.float16)
                attribute.t.CopyFrom(numpy_helper.from_array(values, attribute.t.name))

    def feed_outer_scope_float32(self, body: onnx.GraphProto) -> None:
        """A float32 subgraph that reads an outer tensor now in float16 reads a float32 Cast of it instead."""
        for outer in sorted(_outer_scope_names(body)):
            if self.is_float(outer) and self.current.get(outer) == FLOAT16:
                _rename_inputs(body, outer, self.as_type(outer, FLOAT))

    def finish(self) -> None:
        graph = self.graph
        for output in graph.output:
            if self.current.get(output.name) == FLOAT16:
                inner = self.fresh(f"{output.name}__fp16")
                for node in self.nodes:
                    node.output[:] = [inner if n == output.name else n for n in node.output]
                    node.input[:] = [inner if n == output.name else n for n in node.input]
                self.nodes.append(helper.make_node("Cast", [inner], [output.name], name=self.fresh(f"{output.name}__cast"),
                                                   to=FLOAT))
        del graph.node[:]
        graph.node.extend(self.nodes)
        graph.initializer.extend(self.new_initializers)
        used = _used_names(graph)
        kept = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        # The exporter's value_info records float32 everywhere; stale types would contradict the new graph.
        del graph.value_info[:]


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _outer_scope_names(body: onnx.GraphProto) -> set[str]:
    defined = {v.name for v in body.input} | {i.name for i in body.initializer}
    read: set[str] = set()
    for node in body.node:
        read.update(n for n in node.input if n)
        for inner in _subgraphs(node):
            read |= _outer_scope_names(inner)
        defined.update(node.output)
    return read - defined


def _rename_inputs(body: onnx.GraphProto, old: str, new: str) -> None:
    for node in body.node:
        node.input[:] = [new if n == old else n for n in node.input]
        for inner in _subgraphs(node):
            _rename_inputs(inner, old, new)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for inner in _subgraphs(node):
            used |= _used_names(inner)
    return used


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attribute.t.data_type
    return types


class Float16ConversionError(ValueError):
    """The graph has a float tensor whose type could not be inferred."""


def convert_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 model (rules in the module docstring); ``model`` is left unchanged."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    types = _element_types(result)
    untyped = [o for node in result.graph.node for o in node.output if o and o not in types]
    if untyped:
        raise Float16ConversionError(f"no type for {plural(len(untyped), 'tensor')} (first: {untyped[0]}); "
                                     "is the model from `medmamba-edge export`?")
    converter = _Converter(result.graph, types)
    converter.convert()
    converter.finish()
    if any(p.key == METADATA_KEY for p in result.metadata_props):
        metadata = read_onnx_metadata(result)
        if metadata.precision == "fp32":
            write_onnx_metadata(result, metadata.replace(precision="fp16"))
    return result
