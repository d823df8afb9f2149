"""Our exports against the official MedMamba code at 224×224, for every variant: the largest logit difference
between the official forward (tests/official_ss2d.py: the official SS2D op for op, mamba_ssm's reference scan
maths) and our plugin-form ONNX in ONNX Runtime with the native SS2DScan op, and the portable form.

    python benchmarks/bench_parity_official.py [--variants medmamba_t,medmamba_s,medmamba_b] [--images 2]

Seeded random weights with trained-like dt biases (the parity test's, tests/test_official_parity.py, which
covers 32×32 and odd sizes). Goal: ≤ 1e-4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from medmamba_edge.exporters.onnx_export import export_onnx
from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge.model import VARIANTS
from medmamba_edge.runtime.backends.onnxruntime import custom_ops
from medmamba_edge.runtime.cpu import describe_cpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for tests/official_ss2d.py
from tests.official_ss2d import official_ss2d, random_checkpoint  # noqa: E402

from common import at_least, choice_list  # noqa: E402  benchmarks/common.py, beside this script

GOAL = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=choice_list(VARIANTS), default="medmamba_t,medmamba_s,medmamba_b")
    parser.add_argument("--images", type=at_least(1), default=2)
    parser.add_argument("--size", type=at_least(1), default=224)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for variant in args.variants:
        checkpoint = random_checkpoint(variant)
        if args.size < checkpoint.model.min_input_size():  # the official forward would fail deep inside
            parser.error(f"--size {args.size} is too small: {variant} needs at least {checkpoint.model.min_input_size()}")
        images = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
        started = time.perf_counter()
        with torch.no_grad(), official_ss2d(checkpoint.model):
            official = checkpoint.model(images).numpy()
        official_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{variant}.onnx"
            export_onnx(checkpoint, path, input_size=args.size, batch=None, scan="plugin", verify=False)
            plugin = custom_ops.make_fused_session(path, threads=2).run(None, {"input": images.numpy()})[0]
            portable_model = lower_ss2d_scan(onnx.load(str(path)))
        portable = ort.InferenceSession(portable_model.SerializeToString(),
                                        providers=["CPUExecutionProvider"]).run(None, {"input": images.numpy()})[0]
        rows.append((variant, float(np.abs(official).max()), float(np.abs(plugin - official).max()),
                     float(np.abs(portable - official).max()), official_s / args.images))

    print(f"\nOur exports vs the official MedMamba code, {args.size}×{args.size}, {args.images} random images, "
          f"{describe_cpu()}, torch {torch.__version__}, onnxruntime {ort.__version__}\n")
    print("| variant | largest official logit (abs) | max diff, plugin form (native op) | max diff, portable form | "
          "official s/image |")
    print("|---|---:|---:|---:|---:|")
    for variant, scale, plugin, portable, seconds in rows:
        marks = ["" if d <= GOAL else " (over 1e-4)" for d in (plugin, portable)]
        print(f"| {variant} | {scale:.3g} | {plugin:.2e}{marks[0]} | {portable:.2e}{marks[1]} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
