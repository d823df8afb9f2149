"""Models exported once per test session for the evaluate/compare/benchmark tests.

Exports take tens of seconds on a small CPU, so each is written once under pytest's session base
folder and reused by every module that asks for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medmamba_edge.exporters.onnx_export import export_onnx
from tests.shared_data import OFFICIAL_T32, PNEUMONIAMNIST, require_shared


def _cached(tmp_path_factory, name: str, make) -> Path:
    path = tmp_path_factory.getbasetemp() / "exported_models" / name
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        make(path)
    return path


def official_onnx(tmp_path_factory) -> Path:
    """The official checkpoint at 32×32, plugin form (fused scan in ONNX Runtime), dynamic batch."""
    checkpoint = require_shared(*OFFICIAL_T32)
    # Verification against PyTorch is test_export's job; the comparisons here check parity anyway.
    return _cached(tmp_path_factory, "official32.onnx",
                   lambda path: export_onnx(checkpoint, path, input_size=32, batch=None, verify=False))


def bundled_onnx(tmp_path_factory) -> Path:
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    return _cached(tmp_path_factory, "bundled32.onnx",
                   lambda path: export_onnx(bundled_checkpoint(), path, input_size=32, batch=None, verify=False))


def quantizer_problem() -> str | None:
    """Why this onnxruntime cannot quantize (< 1.27: Python 3.10's newest is 1.23), or None."""
    from medmamba_edge.exporters.quantize import QuantizeError, check_quantizer

    try:
        check_quantizer()
    except QuantizeError as exc:
        return str(exc)
    return None


def quantizer_or_skip() -> None:
    if problem := quantizer_problem():
        pytest.skip(problem)


def official_int8_onnx(tmp_path_factory) -> Path:
    """The official export quantized by `medmamba-edge quantize` (calibrated on 64 train images)."""
    from medmamba_edge.exporters.quantize import quantize_onnx

    quantizer_or_skip()
    fp32 = official_onnx(tmp_path_factory)
    return _cached(tmp_path_factory, "official32.int8.onnx",
                   lambda path: quantize_onnx(fp32, path, require_shared(*PNEUMONIAMNIST), split="train", num_samples=64))
