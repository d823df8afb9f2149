"""SS2D scan CPU timings for MedMamba-T at 224x224, side by side in one run.

Per stage and per image (the sum over the model's 10 SS2D blocks), batch 1 and batch 8 (per image):
the compiled kernel on 1 and 2 threads, the native op inside ONNX Runtime (one SS2DScan node run
by our custom-op library on ORT's intra-op threads), and the PyTorch reference (one stage only: it
loops over L in Python).

    python benchmarks/bench_scan_cpu.py [--repeats 20] [--no-batch8] [--ref-stage 2]

Times are the best of ``--repeats`` runs in milliseconds, wall clock and, in parentheses, process CPU
time (summed over threads; on a busy machine this is the number to trust for 1 thread).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from medmamba_edge.errors import plural
from medmamba_edge.runtime import scan_cpu, scan_node
from medmamba_edge.runtime.cpu import describe_cpu

from common import at_least  # benchmarks/common.py, beside this script

# MedMamba-T, 224x224, per stage: (channels D, side H = W, dt_rank R, SS2D blocks per image). N = 16 states.
STAGES = [(96, 56, 3, 2), (192, 28, 6, 2), (384, 14, 12, 4), (768, 7, 24, 2)]
D_STATE = 16


def make_inputs(batch, channels, side, dt_rank, seed=0):
    """Inputs of a trained block's magnitudes (the reference's maker, tests/ss2d_reference.py, minus onnx)."""
    rng = np.random.default_rng(seed)
    k = scan_node.NUM_DIRECTIONS
    return (
        rng.standard_normal((batch, channels, side, side), dtype=np.float32) * 0.7,
        rng.standard_normal((batch, k * (dt_rank + 2 * D_STATE), side * side), dtype=np.float32) * 0.5,
        rng.standard_normal((k, channels, dt_rank), dtype=np.float32) * 0.3,
        rng.uniform(-4.5, -1.0, (k, channels)).astype(np.float32),
        -np.tile(np.arange(1, D_STATE + 1, dtype=np.float32), (k * channels, 1)),
        rng.uniform(0.5, 1.5, k * channels).astype(np.float32),
    )


def timeit(fn, repeats, warmup=2):
    """(best wall ms, best process CPU ms): CPU time (all threads) is immune to other load on the box."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c = time.process_time()
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls) * 1e3, min(cpus) * 1e3


def fused_runner(threads):
    """A callable(arrays) running one SS2DScan node in ORT, or None with the reason."""
    try:
        from onnx import TensorProto, helper

        from medmamba_edge.runtime.backends.onnxruntime import custom_ops
    except ImportError as exc:
        return None, str(exc)
    names = scan_node.INPUT_NAMES
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    node = helper.make_node(scan_node.OP_TYPE, list(names), ["y"], domain=scan_node.DOMAIN,
                            **scan_node.node_attributes(delta_softplus=True))
    graph = helper.make_graph([node], "scan", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(  # IR 10, as exports are: onnx's default may be newer than the ONNX Runtime here
        graph, ir_version=10,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(scan_node.DOMAIN, scan_node.DOMAIN_VERSION)]
    )
    try:
        sess = custom_ops.make_fused_session(model, threads=threads)
    except (ImportError, RuntimeError) as exc:
        return None, str(exc)

    return lambda arrays: sess.run(None, dict(zip(names, arrays))), ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=at_least(1), default=20)
    ap.add_argument("--no-batch8", action="store_true", help="skip the batch-8 columns")
    ap.add_argument("--ref-stage", type=int, default=3, choices=range(len(STAGES) + 1),
                    help="1-4: the stage timed with the PyTorch reference; 0: none")
    args = ap.parse_args()
    if not scan_cpu.available():
        raise SystemExit(f"compiled kernel unavailable: {scan_cpu.unavailable_reason()}")

    fused = {}
    notes = []
    for threads in (1, 2):
        fused[threads], why = fused_runner(threads)
        if fused[threads] is None:
            notes.append(f"ONNX Runtime op unavailable: {why}")
            break

    batches = [1] if args.no_batch8 else [1, 8]
    columns = []  # (title, batch, fn(arrays))
    for batch in batches:
        suffix = "b1" if batch == 1 else f"b{batch}, per image"
        for threads in (1, 2):
            columns.append((f"kernel {threads}T {suffix}", batch,
                            lambda a, t=threads: scan_cpu.ss2d_scan(*a, num_threads=t)))
        for threads in (1, 2):
            if fused.get(threads) is not None:
                columns.append((f"ORT op {threads}T {suffix}", batch, fused[threads]))

    ref_fn = None
    if args.ref_stage:
        try:
            import torch

            from medmamba_edge.scan import ss2d_scan_ref

            torch.set_num_threads(2)

            def torch_reference(arrays):
                return ss2d_scan_ref(*(torch.from_numpy(x) for x in arrays))

            ref_fn = torch_reference
        except ImportError as exc:
            notes.append(f"PyTorch reference skipped: {exc}")

    header = ["stage (D, H×W, R)", "blocks/img"] + [c[0] for c in columns] + (["torch ref 2T b1"] if ref_fn else [])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows, totals, cpu_totals = [], [0.0] * len(columns), [0.0] * len(columns)
    for si, (channels, side, rank, count) in enumerate(STAGES, start=1):
        row = [f"{si}: ({channels}, {side}×{side}, {rank})", str(count)]
        for ci, (_, batch, fn) in enumerate(columns):
            arrays = make_inputs(batch, channels, side, rank, seed=si)
            repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
            best, cpu = timeit(lambda: fn(arrays), repeats)
            best /= batch
            cpu /= batch
            totals[ci] += best * count
            cpu_totals[ci] += cpu * count
            row.append(f"{best:.2f} ({cpu:.2f})")
        if ref_fn:
            if si == args.ref_stage:
                arrays = make_inputs(1, channels, side, rank, seed=si)
                best, cpu = timeit(lambda: ref_fn(arrays), 3, warmup=1)
                row.append(f"{best:.1f} ({cpu:.1f})")
            else:
                row.append("–")
        rows.append(row)
    rows.append(["**per image (10 blocks)**", "10"] + [f"**{t:.1f}** ({c:.1f})" for t, c in zip(totals, cpu_totals)]
                + (["–"] if ref_fn else []))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"SS2D scan, MedMamba-T 224x224 (N={D_STATE}); {plural(os.cpu_count(), 'CPU')} ({describe_cpu()}), "
          f"{scan_cpu.isa()} kernel path; "
          f"load average {load_before:.2f} -> {load_after:.2f}.\n"
          f"ms per image: best wall time of {plural(args.repeats, 'run')} (batch 8: of {max(3, args.repeats // 4)}), "
          "and in parentheses the best process CPU time (all threads; unaffected by other load)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
