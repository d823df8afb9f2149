"""What the MedMamba-T 224×224 benchmark scripts share: the model under test and how sessions are made."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from medmamba_edge.checkpoint import LoadedCheckpoint, ModelConfig, load_checkpoint
from medmamba_edge.runtime import fused_scan


def medmamba_t(checkpoint: Path | None) -> LoadedCheckpoint:
    """The given checkpoint, or MedMamba-T with seeded random weights (speed does not depend on them)."""
    if checkpoint:
        return load_checkpoint(checkpoint)
    torch.manual_seed(0)
    config = ModelConfig(depths=[2, 2, 4, 2], dims=[96, 192, 384, 768], num_classes=6)
    return LoadedCheckpoint(config.build().eval(), config, [f"c{i}" for i in range(6)], Path("random"), "")


def cpu_session(model: onnx.ModelProto, threads: int, fused: bool = False) -> ort.InferenceSession:
    """A CPU session that can be timed beside others in one process: its idle workers do not spin (they
    would steal the cores of the session being timed). ``fused``: a plugin-form model on the C scan."""
    if fused:
        options = fused_scan.fused_session_options(threads)
        model = fused_scan.retarget_for_fused(model)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
