"""ONNX Runtime backend: loads an exported model, reads its metadata, runs batches.

Plugin-form models (``SelectiveScan`` nodes) run through the fused CPU scan (onnxruntime-extensions);
portable models need nothing but ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medmamba_edge.errors import UserError
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.metadata import ModelMetadata, read_onnx_metadata


class BackendError(UserError):
    """A model that cannot be loaded or run by this backend."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class OnnxRuntimeBackend:
    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such model file")
        self.metadata: ModelMetadata = read_onnx_metadata(self.path)
        model = onnx.load(str(self.path))
        providers = providers or ["CPUExecutionProvider"]
        if any(node.op_type == scan_node.OP_TYPE and node.domain == scan_node.DOMAIN for node in model.graph.node):
            from medmamba_edge.runtime import fused_scan

            self.session = fused_scan.make_fused_session(model, threads=threads, providers=providers)
        else:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.fixed_batch = self.metadata.batch

    def describe(self) -> str:
        return f"ONNX Runtime ({', '.join(self.session.get_providers())}, {self.metadata.scan_form} scan)"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a preprocessed (N, C, H, W) float32 batch; fixed-batch models get padded chunks."""
        step = self.fixed_batch or len(batch)
        outputs = []
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)]) if len(chunk) < step else chunk
            outputs.append(self.session.run(None, {self.input_name: padded})[0][: len(chunk)])
        return np.concatenate(outputs)

    def classify(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.run(batch))
