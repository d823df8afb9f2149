"""Run a plugin-form ONNX model (``SelectiveScan`` nodes, domain ``medmamba_edge``) in ONNX Runtime on
the CPU, with the compiled scan kernel (``scan_cpu``) as the node's implementation. Torch-free.

The kernel is plugged in through onnxruntime-extensions' Python custom-op hook (``PyOp``), whose ops
live in the domain ``ai.onnx.contrib``: ``retarget_for_fused`` moves the SelectiveScan nodes there,
``fused_session_options`` registers the extensions library, and ``make_fused_session`` does both::

    sess = make_fused_session("medmamba_plugin.onnx", threads=2)
    logits = sess.run(None, {"input": x})[0]

Inside ``session.run`` ONNX Runtime calls back into Python for each scan (the GIL is taken there, and
released again by the C kernel while it computes). The extensions' stock callback would turn every
output into a Python list; we install a thin callback that hands our op's numpy output back as is
(ORT copies it with one memcpy) and forwards every other PyOp to the stock callback unchanged.
"""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from medmamba_edge.errors import UserError, install_hint
from medmamba_edge.runtime import scan_cpu
from medmamba_edge.runtime.scan_node import DOMAIN, INPUT_NAMES, OP_TYPE

FUSED_DOMAIN = "ai.onnx.contrib"  # onnxruntime_extensions.default_opset_domain()
FUSED_DOMAIN_VERSION = 1

_lock = threading.Lock()
_registered_id: int | None = None
_num_threads: int | None = None  # kernel threads for the PyOp; None: scan_cpu's default


class FusedScanUnavailable(UserError, ImportError):
    """The fused scan's parts (onnxruntime-extensions, the compiled kernel) are not installed."""


def _extensions():
    # onnxruntime-extensions imports torch, when it is installed, for converters we never use; hiding it
    # during that import (the package guards it with try/except ImportError) keeps the runtime torch-free.
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise FusedScanUnavailable(
            f"a plugin-form model (the default of `medmamba-edge export`) runs on CPU through the fused scan, which "
            f"needs onnxruntime-extensions ({exc}): {install_hint('fused')}, or export with --scan portable"
        ) from None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return onnxruntime_extensions


def _parse_softplus(value) -> bool:
    # The extensions pass attributes as strings; a node without the attribute gives "".
    if value is None or value == "":
        return True
    return bool(int(value))


_out_cache = threading.local()
_OUT_CACHE_MAX = 8


def _out_buffer(shape: tuple) -> np.ndarray:
    """A per-thread output array per shape, reused across calls: ORT copies the result out before the
    callback returns, and reusing the pages saves the page faults of a fresh multi-MB array."""
    cache = getattr(_out_cache, "arrays", None)
    if cache is None:
        cache = _out_cache.arrays = {}
    buf = cache.get(shape)
    if buf is None:
        if len(cache) >= _OUT_CACHE_MAX:
            cache.clear()
        buf = cache[shape] = np.empty(shape, dtype=np.float32)
    return buf


def _scan_op(*inputs, delta_softplus=None, reuse_output=False):
    if len(inputs) != len(INPUT_NAMES):
        raise ValueError(f"SelectiveScan takes {len(INPUT_NAMES)} inputs {INPUT_NAMES}, got {len(inputs)}")
    out = None
    if reuse_output and getattr(inputs[0], "ndim", 0) == 3:
        out = _out_buffer(tuple(inputs[0].shape))
    return scan_cpu.selective_scan(
        *inputs, delta_softplus=_parse_softplus(delta_softplus), num_threads=_num_threads, out=out
    )


def _register() -> None:
    """Register the SelectiveScan PyOp and our callback, once per process."""
    global _registered_id
    with _lock:
        if _registered_id is not None:
            return
        if not scan_cpu.available():
            raise FusedScanUnavailable(f"fused scan: {scan_cpu.unavailable_reason()}; or export with --scan portable")
        ext = _extensions()
        from onnxruntime_extensions import _ocos

        dt_float = ext.PyOp.dt_float
        opdef = ext.onnx_op(
            op_type=OP_TYPE,
            inputs=[dt_float] * len(INPUT_NAMES),
            outputs=[dt_float],
            attrs={"delta_softplus": ext.PyOp.dt_int64},
        )(_scan_op)
        stock = _ocos._on_pyop_invocation
        op_id = id(opdef)

        def invoke(k_id, feed, attributes):
            if k_id != op_id:
                return stock(k_id, feed, attributes)
            y = _scan_op(*feed, delta_softplus=attributes.get("delta_softplus"), reuse_output=True)
            return (k_id, y.shape, y)  # ORT takes np.ascontiguousarray(y) and memcpys it

        ext.PyOp.install_hooker(invoke)
        _registered_id = op_id


def retarget_for_fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its SelectiveScan nodes (also inside subgraphs) in the PyOp domain, and
    ``delta_softplus=1`` made explicit where a node leaves it out."""
    model = copy.deepcopy(model)
    found = False

    def visit(graph: onnx.GraphProto) -> None:
        nonlocal found
        for node in graph.node:
            if node.op_type == OP_TYPE and node.domain == DOMAIN:
                node.domain = FUSED_DOMAIN
                found = True
                # the PyOp kernel requires every declared attribute; the op's default is softplus on
                if not any(a.name == "delta_softplus" for a in node.attribute):
                    node.attribute.append(onnx.helper.make_attribute("delta_softplus", 1))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(model.graph)
    if found and not any(op.domain == FUSED_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(FUSED_DOMAIN, FUSED_DOMAIN_VERSION))
    return model


def fused_session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions with the extensions library (and our PyOp) registered.

    ``threads``: ORT's intra-op threads and the scan kernel's threads (None: ORT's default and
    scan_cpu's default, i.e. $MEDMAMBA_EDGE_SCAN_THREADS or the CPUs available). The kernel's thread
    count is process-wide: the latest call sets it for every fused session. ORT's worker threads do not
    spin, so they leave the cores to the scan kernel while it runs.
    """
    global _num_threads
    _register()
    so = ort.SessionOptions()
    so.register_custom_ops_library(_extensions().get_library_path())
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        threads = int(threads)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
    _num_threads = threads
    return so


def make_fused_session(
    model_or_path: onnx.ModelProto | str | Path,
    threads: int | None = None,
    providers: list | None = None,
) -> ort.InferenceSession:
    """An ORT session running the plugin-form model with the compiled CPU scan."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    model = retarget_for_fused(model)
    so = fused_session_options(threads)
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=so, providers=providers or ["CPUExecutionProvider"]
    )


__all__ = ["FUSED_DOMAIN", "fused_session_options", "make_fused_session", "retarget_for_fused"]
