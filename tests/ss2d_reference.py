"""The SS2DScan node (runtime/scan_node.py) in float64 NumPy, independent of every implementation under test, with
inputs of realistic magnitudes and the one-node ONNX model the exporter's node amounts to. Torch-free."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from medmamba_edge.runtime import scan_node

K = scan_node.NUM_DIRECTIONS


def make_ss2d_inputs(batch=1, channels=24, height=5, width=7, dt_rank=3, d_state=16, seed=0, dtype=np.float32,
                     softplus=True, a_jitter=0.5):
    """x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds as a trained MedMamba block sees them: delta around
    softplus(-4..-1) (mamba's dt init), A = -exp(A_logs) near -(1..N), x the size of SiLU outputs.
    ``softplus`` False: inputs for delta_softplus=0, where delta itself must stay positive (as softplus
    would make it) or the state grows without bound.
    ``a_jitter``: A = -(n + 1) times uniform(1 - a_jitter, 1 + a_jitter) per element. Trained models stay far
    closer to -(n + 1) than the default (|A log2(e) - (n + 1) s| <= 0.07 in MedMamba-T on PneumoniaMNIST, s fitted
    per channel, about what 1e-3 gives), which is what the power chain (AVX2 and AVX-512 paths) relies on."""
    rng = np.random.default_rng(seed)
    length = height * width
    x = (rng.standard_normal((batch, channels, height, width)) * 0.7).astype(dtype)
    x_dbl = (rng.standard_normal((batch, K * (dt_rank + 2 * d_state), length)) * 0.5).astype(dtype)
    dt_w = (rng.standard_normal((K, channels, dt_rank)) * 0.3).astype(np.float32)
    dt_b = rng.uniform(-4.5, -1.0, (K, channels)).astype(np.float32)
    a = -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (K * channels, 1))
    a *= rng.uniform(1.0 - a_jitter, 1.0 + a_jitter, a.shape).astype(np.float32)
    ds = rng.uniform(0.5, 1.5, K * channels).astype(np.float32)
    if not softplus:
        dt_b = (np.logaddexp(0.0, dt_b) + 0.05).astype(np.float32)
        dt_w *= np.float32(0.02)
    return x, x_dbl, dt_w, dt_b, a, ds


def ss2d_reference64(x, x_dbl, dt_w, dt_b, A, Ds, delta_softplus=True) -> np.ndarray:
    """y (batch, H, W, D) in float64, step by step as the contract states it."""
    x, x_dbl, dt_w, dt_b, A, Ds = (np.asarray(a, dtype=np.float64) for a in (x, x_dbl, dt_w, dt_b, A, Ds))
    batch, channels, height, width = x.shape
    length, d_state, dt_rank = height * width, A.shape[1], dt_w.shape[2]
    u = x.reshape(batch, channels, length)
    rows = x_dbl.reshape(batch, K, dt_rank + 2 * d_state, length)
    y = np.zeros((batch, channels, length))
    for k, order in enumerate(scan_node.scan_order(height, width)):
        dt_low, B, C = rows[:, k, :dt_rank], rows[:, k, dt_rank:dt_rank + d_state], rows[:, k, dt_rank + d_state:]
        delta = np.einsum("dr,brl->bdl", dt_w[k], dt_low) + dt_b[k][None, :, None]
        if delta_softplus:
            delta = np.where(delta > scan_node.SOFTPLUS_THRESHOLD, delta, np.logaddexp(0.0, delta))
        a = A[k * channels:(k + 1) * channels]
        h = np.zeros((batch, channels, d_state))
        for p in order:
            h = np.exp(delta[:, :, p, None] * a) * h + (delta[:, :, p] * u[:, :, p])[:, :, None] * B[:, None, :, p]
            y[:, :, p] += (h * C[:, None, :, p]).sum(-1)
        y += Ds[k * channels:(k + 1) * channels][None, :, None] * u
    return y.reshape(batch, channels, height, width).transpose(0, 2, 3, 1)


def ss2d_node_model(channels, height, width, dt_rank, d_state, *, softplus: int | None = 1,
                    elem_type=TensorProto.FLOAT, opset=17) -> onnx.ModelProto:
    """One SS2DScan node as the exporter writes it, batch symbolic; the weights are graph inputs so one model
    serves any values. ``softplus`` None leaves the attribute out."""
    length, rows = height * width, K * (dt_rank + 2 * d_state)
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", elem_type, ["batch", channels, height, width]),
              helper.make_tensor_value_info("x_dbl", elem_type, ["batch", rows, length]),
              helper.make_tensor_value_info("dt_projs_weight", f32, [K, channels, dt_rank]),
              helper.make_tensor_value_info("dt_projs_bias", f32, [K, channels]),
              helper.make_tensor_value_info("A", f32, [K * channels, d_state]),
              helper.make_tensor_value_info("Ds", f32, [K * channels])]
    attrs = scan_node.node_attributes(bool(softplus))
    if softplus is None:
        del attrs["delta_softplus"]
    node = helper.make_node(scan_node.OP_TYPE, list(scan_node.INPUT_NAMES), ["y"], name="ss2d",
                            domain=scan_node.DOMAIN, **attrs)
    graph = helper.make_graph([node], "ss2d", inputs,
                              [helper.make_tensor_value_info("y", elem_type, ["batch", height, width, channels])])
    # IR 10, as exports are: onnx's default (14 with onnx 1.23) is newer than ONNX Runtime < 1.24 reads (Python 3.10's).
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", opset),
                                            helper.make_opsetid(scan_node.DOMAIN, scan_node.DOMAIN_VERSION)])


# delta_softplus values every implementation refuses (the contract: an int, 0 or 1), by name. A float 0.0 once ran
# in ONNX Runtime with softplus on (its int getter failed as for an absent attribute).
BAD_DELTA_SOFTPLUS = {"int-2": 2, "float-0": 0.0, "string-0": "0", "ints-0": [0]}


def with_delta_softplus(model: onnx.ModelProto, value) -> onnx.ModelProto:
    """The model with its SS2DScan node's delta_softplus replaced by ``value`` (of the attribute type it implies)."""
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "delta_softplus"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("delta_softplus", value)])
    return model


def relative_error(y, ref) -> float:
    """max |y - ref| / max |ref|, in float64."""
    return float(np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max())
