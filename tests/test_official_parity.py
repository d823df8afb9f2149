"""Our export against the official MedMamba code (tests/official_ss2d.py): every variant at an odd size, and the
official MedMamba-T checkpoint at the smallest input, run by ONNX Runtime with the native SS2DScan op. The benchmark
benchmarks/bench_parity_official.py does the same at 224×224."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from medmamba_edge.checkpoint import load_checkpoint
from medmamba_edge.exporters.onnx_export import export_onnx
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends.onnxruntime import custom_ops
from tests.exported_models import official_onnx
from tests.official_ss2d import official_ss2d, random_checkpoint
from tests.shared_data import OFFICIAL_T32, require_shared


# Each export costs 25-40 s: every variant at an odd size (H ≠ W, so the column-major orders are tested).
@pytest.mark.parametrize("variant,size", [("medmamba_t", (36, 44)), ("medmamba_s", (36, 44)), ("medmamba_b", (44, 36))])
def test_export_matches_the_official_code(variant, size, tmp_path):
    checkpoint = random_checkpoint(variant)
    path = tmp_path / f"{variant}.onnx"
    export_onnx(checkpoint, path, input_size=size, batch=None, scan="plugin", verify=False)
    assert_matches_the_official_code(checkpoint, path, size)


def test_official_checkpoint_export_matches_the_official_code_at_the_smallest_input(tmp_path_factory):
    """32×32 leaves stage 4 a single position; the session's shared export of the trained checkpoint."""
    checkpoint = load_checkpoint(require_shared(*OFFICIAL_T32))
    assert_matches_the_official_code(checkpoint, official_onnx(tmp_path_factory), (32, 32))


def assert_matches_the_official_code(checkpoint, path, size):
    assert scan_node.has_scan_nodes(onnx.load(str(path)))
    images = torch.randn(3, 3, *size)
    with torch.no_grad(), official_ss2d(checkpoint.model):
        official = checkpoint.model(images).numpy()
    session = custom_ops.make_fused_session(path, threads=2)
    ours = session.run(None, {"input": images.numpy()})[0]
    assert np.abs(official).max() > 1e-2  # logits that say something
    assert np.abs(ours - official).max() <= 1e-4
