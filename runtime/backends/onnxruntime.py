"""ONNX Runtime backend. Plugin-form models (``SelectiveScan`` nodes) run through the fused CPU scan
(onnxruntime-extensions); portable models need nothing but ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends import BackendError, run_in_fixed_batches
from medmamba_edge.runtime.metadata import ModelMetadata, read_onnx_metadata


class OnnxRuntimeBackend:
    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata: ModelMetadata = read_onnx_metadata(self.path)
        model = onnx.load(str(self.path))
        providers = providers or ["CPUExecutionProvider"]
        try:
            if any(n.op_type == scan_node.OP_TYPE and n.domain == scan_node.DOMAIN for n in model.graph.node):
                from medmamba_edge.runtime import fused_scan

                self.session = fused_scan.make_fused_session(model, threads=threads, providers=providers)
            else:
                options = ort.SessionOptions()
                if threads:
                    options.intra_op_num_threads = threads
                self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except RuntimeError as exc:  # ORT's Fail, InvalidGraph, NoSuchFile, ... all derive from it
            raise BackendError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def describe(self) -> str:
        return f"ONNX Runtime ({', '.join(self.session.get_providers())}, {self.metadata.scan_form} scan)"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return run_in_fixed_batches(lambda chunk: self.session.run(None, {self.input_name: chunk})[0],
                                    batch, self.metadata.batch)
