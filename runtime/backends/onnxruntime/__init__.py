"""ONNX Runtime backend. Plugin-form models (``SS2DScan`` nodes) run through the fused CPU scan
(our custom-op library, loaded by custom_ops.py); portable models need nothing but ONNX Runtime.

Execution providers are chosen from what this onnxruntime build offers, fastest first (TensorRT, CUDA,
CPU), unless ``providers`` names them (``tensorrt``, ``cuda``, ``cpu`` or ORT's full names). The CPU
provider always comes last, so nodes a GPU provider cannot take still run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medmamba_edge.errors import first_line

from ... import scan_node
from ...cpu import describe_cpu
from ...files import cache_root
from ...metadata import MetadataError, ModelMetadata, check_against_graph, load_onnx, read_onnx_metadata
from .. import Backend, BackendError, run_in_fixed_batches

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises for a model it cannot load or run: its own Fail, InvalidGraph, InvalidArgument, ...
    (plain Exception subclasses since 1.2x, RuntimeError before), none of them a bug of ours."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (RuntimeError, *(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)))


def provider_options(name: str, metadata: ModelMetadata) -> dict:
    if name != "TensorrtExecutionProvider":
        return {}
    # The TensorRT EP builds an engine on the first run (minutes on a Jetson): cache it across runs.
    cache = cache_root() / "ort-tensorrt"
    cache.mkdir(parents=True, exist_ok=True)
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_fp16_enable": metadata.precision == "fp16"}


def choose_providers(requested: list[str] | str | None, metadata: ModelMetadata) -> list[tuple[str, dict]]:
    """``(provider, options)`` pairs for a session: the requested ones (validated) or the best available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if isinstance(requested, str):
        requested = [p for p in requested.split(",") if p.strip()]
    if requested:
        names = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in requested]
        missing = [n for n in names if n not in available]
        if missing:
            raise BackendError(f"execution provider {', '.join(missing)} is not in this onnxruntime build "
                               f"(it has {', '.join(available)}); GPU providers need onnxruntime-gpu "
                               f"(on Jetson: the JetPack wheel from jetson-ai-lab / NVIDIA)")
    else:
        names = [p for p in PREFERRED_PROVIDERS if p in available]
    names = list(dict.fromkeys(names + ["CPUExecutionProvider"]))
    return [(name, provider_options(name, metadata)) for name in names]


def _identity(path: Path) -> tuple[int, ...] | None:
    """The file as it is now (None: gone), to tell whether it was replaced between two reads."""
    try:
        info = path.stat()
    except OSError:  # removed: the read that follows, or the comparison, says so in words
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _not_loaded(path: Path, metadata: ModelMetadata, error: Exception) -> str:
    """Why ONNX Runtime did not load the model, where its graph says more (read for that only now, on the way out):
    a node of ours from a retired contract, or scan nodes its metadata does not own to; else ONNX Runtime's reason."""
    try:
        graph = load_onnx(path, external_data=False)
    except MetadataError:
        graph = None
    retired = graph is not None and scan_node.retired_scan_node(graph)
    if retired:
        return retired
    if graph is not None and metadata.scan_form != "plugin" and scan_node.has_scan_nodes(graph):
        return (f"its graph holds {scan_node.OP_TYPE} nodes, though its metadata says scan_form "
                f"{metadata.scan_form!r} (changed by another tool?); export it again")
    return f"ONNX Runtime cannot load it ({first_line(error)})"


class NotLoaded(BackendError):
    """ONNX Runtime did not load the model; ``error`` is its own exception (quantize words the refusal its way)."""

    def __init__(self, message: str, error: Exception):
        super().__init__(message)
        self.error = error


class OnnxRuntimeBackend(Backend):
    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | str | None = None):
        from . import custom_ops

        self.path = Path(path)
        # The metadata from the file's header fields, the graph read by ONNX Runtime alone: not by onnx too, whose
        # import took a second and whose copy of the model a third of run's peak memory. Two reads, of one file:
        # one replaced in between (an export renames a new file over it) would pair its metadata with another graph.
        before = _identity(self.path)
        self.metadata: ModelMetadata = read_onnx_metadata(self.path)
        providers = choose_providers(providers, self.metadata)
        try:
            self.session = custom_ops.make_session(self.path, threads=threads, providers=providers,
                                                   scan_nodes=self.metadata.scan_form == "plugin")
        except onnxruntime_errors() as exc:
            raise NotLoaded(f"{self.path}: {_not_loaded(self.path, self.metadata, exc)}", exc) from None
        except custom_ops.FusedScanUnavailable as exc:  # which of evaluate's models needs it
            raise BackendError(f"{self.path}: {exc}") from None
        if _identity(self.path) != before:
            raise BackendError(f"{self.path}: the file changed while it was opened (replaced by an export?); "
                               f"open it again")
        self.input_name = self.session.get_inputs()[0].name
        check_against_graph(self.metadata, self.session.get_inputs()[0].shape, self.session.get_outputs()[0].shape,
                            str(self.path))

    def describe(self) -> str:
        return f"ONNX Runtime ({', '.join(self._open_session().get_providers())}, {self.metadata.scan_form} scan)"

    def cpu(self) -> str | None:
        # The first provider takes every node it can; the CPU one, always listed, only what a GPU one leaves.
        on_cpu = self._open_session().get_providers()[0] == "CPUExecutionProvider"
        return describe_cpu() if on_cpu else None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        session = self._open_session()  # once: another thread may close the backend between two chunks
        try:
            return run_in_fixed_batches(lambda chunk: session.run(None, {self.input_name: chunk})[0],
                                        batch, self.metadata.batch)
        # A graph that loads and fails on its first batch (an SS2DScan node given inputs of another shape by an edit)
        # ended evaluate and compare in a traceback.
        except onnxruntime_errors() as exc:
            raise BackendError(f"{self.path}: ONNX Runtime failed running it ({first_line(exc)})") from None

    def _open_session(self):
        session = self.session
        if session is None:
            raise BackendError(f"{self.path}: the model was closed")
        return session

    def close(self) -> None:
        self.session = None
