"""ONNX Runtime sessions for our models, and the loading of our custom-op library: a plugin-form model's
``SS2DScan`` nodes (domain ``medmamba_edge``) run on the CPU with the compiled scan kernel. Torch-free.

The kernel comes as a native ONNX Runtime custom-op library, ``libmedmamba_ort_ops`` (runtime/csrc/
ort_custom_ops.c, built into medmamba_edge/runtime/ by ``pip install`` or ``python setup.py build_ext --inplace``,
beside the Python extension sharing its kernel): it
registers the domain ``medmamba_edge`` itself, so the model loads as exported, and inside ``session.run`` the
scan reads and writes ONNX Runtime's own buffers on the session's intra-op threads::

    sess = make_fused_session("medmamba_plugin.onnx", threads=2)
    logits = sess.run(None, {"input": x})[0]

docs/runtime.md shows how to load the same library from C++ and from Triton.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort

from medmamba_edge.errors import UserError, first_line

from ...cpu import check_threads, confined_threads
from ...scan_node import ORT_OPS_LIBRARY, has_scan_nodes

LIBRARY_NAME = ORT_OPS_LIBRARY + {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")  # as setup.py names it


class FusedScanUnavailable(UserError, ImportError):
    """The custom-op library is not built, or this ONNX Runtime cannot load it."""


def library_path() -> Path:
    """The built custom-op library, in medmamba_edge/runtime/ (FusedScanUnavailable if it is not there)."""
    path = Path(__file__).parents[2] / LIBRARY_NAME
    if not path.is_file():
        raise FusedScanUnavailable(
            f"a plugin-form model (the default of `medmamba-edge export`) runs its scan in ONNX Runtime through "
            f"{LIBRARY_NAME}, which is not built: install medmamba-edge again where a C compiler is present (pip "
            f"builds it; an editable install: python setup.py build_ext --inplace), or export with --scan portable"
        )
    return path


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions for any of our sessions: ``threads`` intra-op threads (None: ONNX Runtime's default, held to
    the CPUs and the CPU quota this process may use), and ONNX Runtime's own log quiet below FATAL: an error it
    logs (raw, coloured, naming its source file) comes back as the exception that the caller reports in one line."""
    check_threads(threads)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads is None:
        # ONNX Runtime's default counts the machine's physical cores, not those of the affinity mask (a container's
        # or taskset's share) nor the CPU quota (docker --cpus): on 1 of 2 CPUs it ran 2 threads, 16 ms a batch-1
        # run where 1 thread took 9, under benchmark's header 'threads: backend default (1)'. Its rule, one per
        # core, applied to the mask's CPUs and held to the quota.
        threads = confined_threads()
    if threads is not None:
        so.intra_op_num_threads = threads
    return so


def fused_session_options(threads: int | None = None) -> ort.SessionOptions:
    """session_options with the custom-op library registered; its scan runs on the intra-op threads too."""
    path = library_path()
    so = session_options(threads)
    try:
        so.register_custom_ops_library(str(path))
    # The library refuses ONNX Runtime < 1.17, saying so. ONNX Runtime raises its own Exception subclasses (Fail),
    # RuntimeError in older releases.
    except Exception as exc:
        raise FusedScanUnavailable(
            f"ONNX Runtime {ort.__version__} cannot load {LIBRARY_NAME} ({first_line(exc)}); "
            f"or export with --scan portable"
        ) from None
    return so


def _model_source(model) -> str | bytes:
    """What ONNX Runtime opens: a path (read by ONNX Runtime itself, external weights beside it included), or an
    ``onnx.ModelProto``'s bytes."""
    if not isinstance(model, (str, Path)):
        return model.SerializeToString()
    path = str(model)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a name's undecodable bytes, which ONNX Runtime's path (a str) cannot carry
        return Path(model).read_bytes()
    return path


def make_fused_session(model_or_path, threads: int | None = None,
                       providers: list | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session running the plugin-form model (an ``onnx.ModelProto`` or a path) with the compiled
    CPU scan."""
    return ort.InferenceSession(_model_source(model_or_path), sess_options=fused_session_options(threads),
                                providers=providers or ["CPUExecutionProvider"])


def make_session(model, threads: int | None = None, providers: list | None = None, *,
                 scan_nodes: bool | None = None) -> ort.InferenceSession:
    """A session for an exported model of either form, an ``onnx.ModelProto`` or a path: the plugin form's through
    make_fused_session, the portable form's with the same options (FusedScanUnavailable only for the plugin form).
    Which form a path holds, its metadata says (``scan_nodes``): its graph is not read here."""
    if scan_nodes if scan_nodes is not None else has_scan_nodes(model):
        return make_fused_session(model, threads=threads, providers=providers)
    return ort.InferenceSession(_model_source(model), sess_options=session_options(threads),
                                providers=providers or ["CPUExecutionProvider"])


__all__ = ["FusedScanUnavailable", "fused_session_options", "library_path", "make_fused_session", "make_session"]
