"""PyTorch backend for a checkpoint (``.pth``): the original model, for comparisons and evaluation.

A checkpoint carries no preprocessing, so its metadata is the one ``export`` would write for the same
input size; the ONNX export of that checkpoint then sees exactly the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medmamba_edge.runtime.backends import Backend, BackendError
from medmamba_edge.runtime.cpu import confined_threads
from medmamba_edge.runtime.metadata import DEFAULT_INPUT_SIZE, height_width

from .checkpoint import load_checkpoint


class PyTorchBackend(Backend):
    def __init__(self, path: str | Path, input_size: int | tuple[int, int] = DEFAULT_INPUT_SIZE, classes=None, threads: int | None = None):
        self.path = Path(path)
        self.checkpoint = load_checkpoint(self.path, classes)
        self.metadata = self.checkpoint.metadata(height_width(input_size), scan_form="portable", batch=None)
        self.threads = threads or confined_threads()

    def describe(self) -> str:
        return f"PyTorch {torch.__version__} (CPU, float32)"

    def close(self) -> None:
        # The checkpoint holds the model's weights: dropping it is what frees them.
        self.checkpoint = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.checkpoint is None:
            raise BackendError(f"{self.path}: the model was closed")
        # torch's thread count is the process's: set for this model's calls only, so that an application's own
        # torch work (or another backend) after it keeps the count it had.
        held = torch.get_num_threads()
        change = bool(self.threads) and self.threads != held
        if change:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                return self.checkpoint.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()
        finally:
            if change:
                torch.set_num_threads(held)
