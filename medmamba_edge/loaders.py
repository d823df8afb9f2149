"""Open any model the commands take, composing the floors below as Polygraphy hands a runner what a loader
made: a PyTorch checkpoint (torch lives on this floor, not in the runtime), an exported model through the
runtime's ``open_backend``, or an .onnx as a TensorRT engine, built once into the engine cache and then opened.
"""

from __future__ import annotations

from pathlib import Path

from medmamba_edge.runtime.backends import (ONNX_SUFFIXES, Backend, BackendError, is_checkpoint_name, open_backend,
                                            refuse_options)
from medmamba_edge.runtime.cpu import check_threads
from medmamba_edge.runtime.metadata import DEFAULT_INPUT_SIZE

BACKEND_CHOICES = ("auto", "tensorrt")


def open_model(path: str | Path, *, backend: str = "auto", precision: str | None = None, status=lambda message: None,
               threads: int | None = None, providers: list[str] | str | None = None, plugin: str | Path | None = None,
               input_size: int | tuple[int, int] | None = None, classes=None) -> Backend:
    """The backend for ``path``: by file type (``backend="auto"``), or ``"tensorrt"`` on an .onnx through the
    engine cache (one build per model, TensorRT version, GPU and precision; minutes the first time).
    ``input_size`` and ``classes`` apply to a checkpoint only: an exported model carries its own."""
    if backend not in BACKEND_CHOICES:
        raise BackendError(f"--backend {backend}: expected one of {', '.join(BACKEND_CHOICES)}")
    check_threads(threads)
    if is_checkpoint_name(path):
        refuse_options(path, "a PyTorch checkpoint", providers=providers, plugin=plugin, precision=precision,
                       backend=None if backend == "auto" else backend)
        try:
            from .torch_backend import PyTorchBackend
        except ImportError as exc:
            from .errors import install_hint

            raise BackendError(f"{path}: running a checkpoint needs PyTorch ({exc}): {install_hint('export')}") from None
        return PyTorchBackend(path, input_size=input_size or DEFAULT_INPUT_SIZE, classes=classes, threads=threads)
    refuse_options(path, "an exported model (it carries its own)", input_size=input_size, classes=classes)
    if backend == "tensorrt":
        if Path(path).suffix.lower() not in ONNX_SUFFIXES:
            raise BackendError(f"--backend tensorrt on {path}: expected an .onnx model to build an engine from")
        refuse_options(path, "a TensorRT engine", threads=threads, providers=providers)
        from medmamba_edge.runtime.backends.tensorrt.build import cached_engine
        from medmamba_edge.runtime.metadata import read_onnx_metadata

        status(f"looking up (or building) the TensorRT engine for {path}")
        path = cached_engine(path, precision or read_onnx_metadata(path).precision, plugin=plugin)
    elif precision is not None:
        refuse_options(path, "a model opened as it is (it is built at a precision only with --backend tensorrt)",
                       precision=precision)
    return open_backend(path, threads=threads, providers=providers, plugin=plugin, checkpoints=True)
