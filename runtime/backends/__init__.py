"""Backends behind one small interface (as Polygraphy's runners): open a model file, read its metadata,
turn a preprocessed batch into logits. The run loop, evaluate, benchmark, compare and quantize all use
these. The backend is chosen from the file: ``.onnx`` → ONNX Runtime, ``.engine``/``.plan`` → TensorRT,
``.pth``/``.pt`` → PyTorch (needs torch; for comparisons with the original model). Heavy imports happen
in ``open_backend`` so that importing this package stays torch- and TensorRT-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from medmamba_edge.errors import UserError, install_hint
from medmamba_edge.runtime.metadata import DEFAULT_INPUT_SIZE, ModelMetadata

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
TORCH_SUFFIXES = (".pth", ".pt")


class BackendError(UserError):
    """A model that cannot be loaded or run by its backend."""


class Backend(Protocol):
    metadata: ModelMetadata
    path: Path

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a preprocessed float32 (N, C, H, W) batch of any N."""

    def describe(self) -> str:
        """One line: framework, device/providers, precision."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def run_in_fixed_batches(run_fixed, batch: np.ndarray, fixed: int | None) -> np.ndarray:
    """Feed a fixed-batch model whole batches, padding the last one with copies of its last image."""
    step = fixed or len(batch)
    outputs = []
    for start in range(0, len(batch), step):
        chunk = batch[start:start + step]
        if len(chunk) < step:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
        outputs.append(run_fixed(chunk)[: min(step, len(batch) - start)])
    return np.concatenate(outputs)


def open_backend(path: str | Path, **options) -> Backend:
    """The backend for a model file. Options are backend-specific (``threads``, ``providers``, ``plugin``,
    ``input_size``/``classes`` for checkpoints) and ignored where they do not apply."""
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        from medmamba_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, threads=options.get("threads"), providers=options.get("providers"))
    if suffix in TORCH_SUFFIXES:
        try:
            from medmamba_edge.torch_backend import PyTorchBackend
        except ImportError as exc:
            raise BackendError(f"{path}: running a checkpoint needs PyTorch ({exc}): {install_hint('export')}") from None
        return PyTorchBackend(path, input_size=options.get("input_size", DEFAULT_INPUT_SIZE), classes=options.get("classes"),
                              threads=options.get("threads"))
    if suffix in ENGINE_SUFFIXES:
        from medmamba_edge.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, plugin=options.get("plugin"))
    raise BackendError(f"{path}: unknown model type {suffix or '(no suffix)'}; expected .onnx, .engine/.plan or .pth/.pt")
