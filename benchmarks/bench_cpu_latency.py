"""CPU latency of MedMamba-T at 224×224, side by side in one run (ratios hold on noisy machines).

Rows: the official code's CPU path (its SS2D transcribed op for op in tests/official_ss2d.py: PyTorch eager,
mamba_ssm's ``selective_scan_ref`` maths), our PyTorch model (compiled scan), ONNX Runtime on the portable ONNX (standard
ops only), ONNX Runtime on the plugin-form ONNX with our native SS2DScan op, and the same model with each
scan replaced by a transpose of its input (dense layers only) to show where the time goes.

    python benchmarks/bench_cpu_latency.py [--checkpoint PTH] [--batches 1,8] [--iterations 10] [--baseline-runs 2]

It keeps the rows that need the model's internals (reference scan, dense-only graph); to time exported
models (any backend, precision, batch) with percentiles and peak memory, use `medmamba-edge benchmark`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from medmamba_edge.benchmarking import timed
from medmamba_edge.errors import plural
from medmamba_edge.exporters.onnx_export import trace_to_onnx
from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.cpu import describe_cpu

from common import at_least, cpu_session, int_list, medmamba_t, profile_by_op_type, thread_count  # benchmarks/common.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for tests/official_ss2d.py
from tests.official_ss2d import official_ss2d  # noqa: E402

SIZE = 224


def dense_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The plugin-form graph with each scan replaced by y = x transposed to y's layout: what the model costs
    without the scan."""
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    nodes = []
    for node in dense.graph.node:
        if scan_node.is_scan_node(node):
            nodes.append(onnx.helper.make_node("Transpose", [node.input[0]], list(node.output), perm=[0, 2, 3, 1]))
        else:
            nodes.append(node)
    del dense.graph.node[:]
    dense.graph.node.extend(nodes)
    return dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="official checkpoint (default: random MedMamba-T, 6 classes)")
    parser.add_argument("--batches", type=int_list(), default="1,8")
    parser.add_argument("--iterations", type=at_least(1), default=10)
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--baseline-runs", type=at_least(0), default=2,
                        help="runs of the official code (batch 1; ~5 s each): its time moves by ±10 %% between runs here")
    parser.add_argument("--threads", type=int, help="default: $MEDMAMBA_EDGE_SCAN_THREADS, or the usable CPUs")
    parser.add_argument("--skip-official", action="store_true", help="skip the slow reference-scan baseline")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the fused model's time goes (at batch 1, whatever --batches)")
    args = parser.parse_args()
    args.threads = thread_count(parser, args.threads)
    torch.set_num_threads(args.threads)

    loaded = medmamba_t(parser, args.checkpoint)

    rows = []
    profile = None
    for batch in args.batches:
        x = torch.randn(batch, 3, SIZE, SIZE)
        feed = {"input": x.numpy()}
        plugin_form = trace_to_onnx(loaded, (SIZE, SIZE), batch, opset=18)
        # Timed one after the other, so each with ONNX Runtime's default spinning, as `medmamba-edge run` runs.
        portable = cpu_session(lower_ss2d_scan(plugin_form), args.threads, spinning=True)
        fused = cpu_session(plugin_form, args.threads, fused=True, spinning=True)
        dense = cpu_session(dense_only(plugin_form), args.threads, spinning=True)
        size_mb = plugin_form.ByteSize() / 1e6
        if args.profile and batch == 1:
            profile = profile_by_op_type(plugin_form, feed, args.threads)

        def torch_ours():
            with torch.no_grad():
                loaded.model(x)

        def torch_official():
            with torch.no_grad(), official_ss2d(loaded.model):
                loaded.model(x)

        candidates = [
            ("official code, eager, reference scan (baseline)", torch_official, 0, args.baseline_runs if batch == 1 else 0),
            ("ours, PyTorch eager, compiled scan", torch_ours, args.warmup, args.iterations),
            ("ONNX Runtime, portable (standard ops)", lambda: portable.run(None, feed), args.warmup, args.iterations),
            ("ONNX Runtime, plugin form + native SS2DScan op", lambda: fused.run(None, feed), args.warmup, args.iterations),
            ("ONNX Runtime, dense layers only (scan → transpose)", lambda: dense.run(None, feed), args.warmup, args.iterations),
        ]
        for name, fn, warmup, iterations in candidates:
            if iterations == 0 or (args.skip_official and "baseline" in name):
                continue
            samples = timed(fn, warmup, iterations)
            rows.append((name, batch, statistics.median(samples), min(samples), len(samples)))

    if args.profile and profile is None:  # --batches without 1: the profile's own batch-1 model
        feed = {"input": torch.randn(1, 3, SIZE, SIZE).numpy()}
        profile = profile_by_op_type(trace_to_onnx(loaded, (SIZE, SIZE), 1, opset=18), feed, args.threads)

    print(f"\nMedMamba-T {SIZE}×{SIZE}, {describe_cpu()}, {plural(args.threads, 'thread')}, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, ONNX {size_mb:.0f} MB\n")
    print("| what | batch | median ms | min ms | runs | ms/image | × baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = {b: med for name, b, med, _, _ in rows if "baseline" in name}
    for name, batch, median, best, runs in rows:
        base = baseline.get(1)
        speedup = f"{base * batch / median:.1f}×" if base else ""
        print(f"| {name} | {batch} | {median:.1f} | {best:.1f} | {runs} | {median / batch:.1f} | {speedup} |")
    print("\n× baseline: images per second relative to the batch-1 baseline row.")
    if args.profile:
        total = sum(ms for _, ms in profile)
        print("\nWhere the time goes: ONNX Runtime profile of the fused model, batch 1, kernel time by op type\n")
        print("| op type | ms | share |")
        print("|---|---:|---:|")
        for op_type, ms in profile:
            if ms / total >= 0.01:
                print(f"| {op_type} | {ms:.1f} | {ms / total:.0%} |")
        print(f"| (total kernel time) | {total:.1f} | |")


if __name__ == "__main__":
    main()
