"""Builds of the SS2DScan custom-op library side by side on MedMamba-T at 224×224 in ONNX Runtime on the CPU.

A kernel change is worth a few percent; these VMs drift by more than that between runs, so a change is only
measured against its parent in one run, the builds taking turns:

- whole-model latency: one session per library, spinning as `medmamba-edge run` has it, turns of a few runs
  with a pause between (as bench_quantize_cpu.py times its models);
- the node's share of ONNX Runtime's kernel time (the issue's "SS2DScan ≤ 25 %"): ``--profiles`` profiled
  sessions per library, taken in turns, each over 10 runs; the table gives their medians.

    git worktree add /tmp/parent HEAD~1 && (cd /tmp/parent && python setup.py build_ext --inplace)
    python benchmarks/bench_scan_libraries.py /tmp/parent/runtime/libmedmamba_ort_ops.so \\
        runtime/libmedmamba_ort_ops.so [--batch 1] [--iterations 50] [--profiles 5]

Each library must accept the plugin-form model this checkout exports (the same SS2DScan contract).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort

from medmamba_edge.errors import plural
from medmamba_edge.exporters.onnx_export import trace_to_onnx
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.cpu import describe_cpu

from common import BLOCK, at_least, interleaved, library_options, medmamba_t, profile_nodes, thread_count  # benchmarks/common.py, beside this script

SIZE = 224
PROFILED_RUNS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("libraries", type=Path, nargs="+", help="custom-op libraries; the first is the reference")
    parser.add_argument("--checkpoint", type=Path, help="official checkpoint (default: random MedMamba-T, 6 classes)")
    parser.add_argument("--batch", type=at_least(1), default=1)
    parser.add_argument("--iterations", type=at_least(1), default=50, help="timed runs per library")
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--profiles", type=at_least(1), default=5, help="profiled sessions per library")
    parser.add_argument("--threads", type=int, help="default: $MEDMAMBA_EDGE_SCAN_THREADS, or the usable CPUs")
    args = parser.parse_args()
    args.threads = thread_count(parser, args.threads)
    missing = [str(p) for p in args.libraries if not p.is_file()]
    if missing:
        parser.error(f"no such library: {', '.join(missing)}")
    names = [str(p) for p in args.libraries]
    if len(set(names)) < len(names):
        parser.error("a library is named twice")

    model = trace_to_onnx(medmamba_t(parser, args.checkpoint), (SIZE, SIZE), args.batch, opset=18)
    serialized = model.SerializeToString()
    feed = {"input": np.random.default_rng(0).standard_normal((args.batch, 3, SIZE, SIZE), dtype=np.float32)}

    sessions = {name: ort.InferenceSession(serialized, library_options(Path(name), args.threads),
                                           providers=["CPUExecutionProvider"]) for name in names}
    runs = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
    latency = interleaved(runs, args.warmup, args.iterations, BLOCK)
    del sessions, runs

    node_ms = {name: [] for name in names}
    total_ms = {name: [] for name in names}
    for _ in range(args.profiles):
        for name in names:
            profile = profile_nodes(model, feed, args.threads, PROFILED_RUNS, library=Path(name))
            node_ms[name].append(sum(ms for (_, op), ms in profile.items() if op == scan_node.OP_TYPE))
            total_ms[name].append(sum(profile.values()))

    print(f"\nMedMamba-T {SIZE}×{SIZE}, batch {args.batch}, {describe_cpu()}, {plural(args.threads, 'thread')}, "
          f"onnxruntime {ort.__version__}; {plural(args.iterations, 'timed run')} per library in turns of {BLOCK}, "
          f"{plural(args.profiles, 'profile')} of {PROFILED_RUNS} runs each in turns\n")
    print("| library | median ms | min ms | first / this | SS2DScan ms | kernel total ms | SS2DScan share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = statistics.median(latency[names[0]])
    for name in names:
        median = statistics.median(latency[name])
        node, total = statistics.median(node_ms[name]), statistics.median(total_ms[name])
        shares = sorted(n / t for n, t in zip(node_ms[name], total_ms[name]))
        print(f"| {name} | {median:.2f} | {min(latency[name]):.2f} | {reference / median:.3f}× | {node:.2f} | "
              f"{total:.2f} | {statistics.median(shares):.1%} ({shares[0]:.1%}–{shares[-1]:.1%}) |")
    print("\nSS2DScan and kernel total: medians over the profiles; share: the median of the profiles' shares, "
          "and their range.")


if __name__ == "__main__":
    main()
