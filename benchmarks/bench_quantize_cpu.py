"""FP32 vs INT8 latency of MedMamba-T at 224×224 in ONNX Runtime on the CPU, side by side in one run.

For each scan form (plugin form with the fused scan op, portable form) and batch size: the fp32 model,
the INT8 model in Q/DQ form (``--format qdq``, the TensorRT-ready default) and in QOperator form
(``--format qoperator``, ONNX Runtime CPU only). The models take turns in blocks of a few runs (fp32, qdq,
qoperator, fp32, ...) so drift on a shared machine hits every model alike. Sessions spin as ONNX Runtime's
default has them, as `medmamba-edge run` runs, with a pause after each block so that one session's idle
workers have stopped spinning before the next one starts; ``--no-spinning`` times sessions with spinning
off instead, run by run, which charges every node a thread wake-up (the INT8 graphs have more nodes).

    python benchmarks/bench_quantize_cpu.py [--checkpoint PTH] [--batches 1,8] [--iterations 10] [--profile]

``--profile`` adds where each model's batch-1 time goes and the most any INT8 recipe that keeps the scan,
its inputs and the layout work in float can gain on this CPU (Amdahl's law on the fp32 profile).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from medmamba_edge.errors import plural
from medmamba_edge.exporters.onnx_export import trace_to_onnx
from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge.exporters.quantize import quantizable_nodes, quantize_onnx
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.metadata import write_onnx_metadata

from common import (BLOCK, at_least, choice_list, cpu_session, int_list,  # benchmarks/common.py,
                    interleaved, medmamba_t, profile_nodes, thread_count)  # beside this script

SIZE = 224
INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "QGemm"}
LAYOUT = {"Transpose", "Slice", "Split", "Concat", "Reshape", "ReorderInput", "ReorderOutput", "Gather", "Squeeze",
          "Unsqueeze", "Expand"}
GROUPS = ("SS2D scan", "Conv/MatMul, constant weight (fp32)", "INT8 kernels", "Q/DQ",
          "MatMul, no constant weight", "layout (Transpose/Slice/Split/Concat/...)", "other")
SAMPLES = Path(__file__).resolve().parents[1] / "medmamba_edge" / "assets" / "samples"
def time_by_group(profile: dict[tuple[str, str], float], constant_weight: set[str]) -> dict[str, float]:
    """Kernel time of one model by what the node is. ONNX Runtime renames the Convs it moves to its NCHWc
    layout, so every Conv counts as constant-weight (true of all of MedMamba's, the SS2D projections' 1×1 Convs
    among them); a MatMul counts when its name is one of the fp32 model's quantizable nodes."""
    groups = dict.fromkeys(GROUPS, 0.0)
    for (name, op_type), ms in profile.items():
        # By op type first: an INT8 kernel can keep the name of the float layer it replaced.
        if op_type == scan_node.OP_TYPE:
            group = GROUPS[0]
        elif op_type in INT8_KERNELS:
            group = GROUPS[2]
        elif op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            group = GROUPS[3]
        elif op_type in ("Conv", "FusedConv", "Gemm", "FusedGemm") or name in constant_weight:
            group = GROUPS[1]
        elif op_type in ("MatMul", "FusedMatMul"):
            group = GROUPS[4]
        elif op_type in LAYOUT:
            group = GROUPS[5]
        else:
            group = GROUPS[6]
        groups[group] += ms
    return groups


def print_ceiling(models: dict[str, onnx.ModelProto], threads: int) -> None:
    """Where each model's batch-1 time goes, and what INT8 could reach at best while the scan and the layout
    work stay float (Amdahl: only the constant-weight layers get faster)."""
    constant_weight = {n.name for n in quantizable_nodes(models["fp32"])}
    feed = {"input": np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)}
    table = {name: time_by_group(profile_nodes(m, feed, threads, runs=12), constant_weight) for name, m in models.items()}
    print("\nWhere the time goes (plugin form, batch 1, ONNX Runtime kernel time in ms per run):\n")
    print("| group | " + " | ".join(table) + " |")
    print("|---|" + "---:|" * len(table))
    for group in GROUPS:
        print(f"| {group} | " + " | ".join(f"{t[group]:.1f}" for t in table.values()) + " |")
    totals = {name: sum(t.values()) for name, t in table.items()}
    print("| total | " + " | ".join(f"{v:.1f}" for v in totals.values()) + " |")
    fp32 = table["fp32"]
    total = totals["fp32"]
    quantizable = fp32[GROUPS[1]]
    print(f"\nCeiling of fp32 / INT8 with the fp32 profile (Amdahl): constant-weight layers (the SS2D projections "
          f"among them) and Q/DQ free {total / (total - quantizable):.2f}×; each one twice as fast "
          f"{total / (total - quantizable / 2):.2f}×. Measured (kernel time): "
          + ", ".join(f"{name} {total / v:.2f}×" for name, v in totals.items() if name != "fp32") + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="official checkpoint (default: random MedMamba-T, 6 classes)")
    parser.add_argument("--batches", type=int_list(), default="1,8")
    parser.add_argument("--forms", type=choice_list(("plugin", "portable")), default="plugin,portable")
    parser.add_argument("--iterations", type=at_least(1), default=20, help="timed runs per model and batch")
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--no-spinning", action="store_true",
                        help="sessions with spinning off, taking turns run by run (the script's method before)")
    parser.add_argument("--threads", type=int, help="default: $MEDMAMBA_EDGE_SCAN_THREADS, or the usable CPUs")
    parser.add_argument("--profile", action="store_true",
                        help="also print where each model's time goes and the Amdahl ceiling of the INT8 speedup")
    args = parser.parse_args()
    args.threads = thread_count(parser, args.threads)

    loaded = medmamba_t(parser, args.checkpoint)

    with tempfile.TemporaryDirectory(prefix="bench-quantize.") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        plugin_form = trace_to_onnx(loaded, (SIZE, SIZE), None, opset=18)  # dynamic batch: one model for all
        write_onnx_metadata(plugin_form, loaded.metadata((SIZE, SIZE), scan_form="plugin", batch=None))
        onnx.save(plugin_form, fp32_path)
        models = {"fp32": plugin_form}
        for fmt in ("qdq", "qoperator"):
            # Speed does not depend on the ranges: a few bundled images and min-max keep this quick.
            quantize_onnx(fp32_path, Path(tmp) / f"{fmt}.onnx", SAMPLES, num_samples=8, method="minmax", quant_format=fmt)
            models[f"int8 {fmt}"] = onnx.load(str(Path(tmp) / f"{fmt}.onnx"))

    rows = []
    for form in args.forms:
        plugin = form == "plugin"
        sessions = {name: cpu_session(m if plugin else lower_ss2d_scan(m), args.threads, fused=plugin,
                                      spinning=not args.no_spinning)
                    for name, m in models.items()}
        for batch in args.batches:
            feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)}
            runs = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
            samples = interleaved(runs, args.warmup, args.iterations, 1 if args.no_spinning else BLOCK)
            rows += [(form, batch, name, statistics.median(t), min(t)) for name, t in samples.items()]
        del sessions

    method = ("spinning off, turns of 1 run" if args.no_spinning
              else f"ONNX Runtime's default spinning, turns of {BLOCK} runs")
    print(f"\nMedMamba-T {SIZE}×{SIZE}, {describe_cpu()}, {plural(args.threads, 'thread')}, "
          f"onnxruntime {ort.__version__}, {plural(args.iterations, 'timed run')} per model ({method})\n")
    print("| form | batch | model | median ms | min ms | ms/image | fp32 / this (median) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    fp32 = {(form, batch): median for form, batch, name, median, _ in rows if name == "fp32"}
    for form, batch, name, median, best in rows:
        print(f"| {form} | {batch} | {name} | {median:.1f} | {best:.1f} | {median / batch:.1f} | "
              f"{fp32[(form, batch)] / median:.2f}× |")
    if args.profile:
        print_ceiling(models, args.threads)


if __name__ == "__main__":
    main()
