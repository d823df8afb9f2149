"""FP32 vs INT8 latency of MedMamba-T at 224×224 in ONNX Runtime on the CPU, side by side in one run.

For each scan form (plugin form with the fused scan op, portable form) and batch size: the fp32 model,
the INT8 model in Q/DQ form (``--format qdq``, the TensorRT-ready default) and in QOperator form
(``--format qoperator``, ONNX Runtime CPU only). Rounds are interleaved (fp32, qdq, qoperator, fp32, ...)
so drift on a shared machine hits every model alike; every session has spinning off, or one session's
idle workers would steal the cores of the next.

    python benchmarks/bench_quantize_cpu.py [--checkpoint PTH] [--batches 1,8] [--iterations 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from medmamba_edge.exporters.onnx_export import trace_to_onnx
from medmamba_edge.exporters.portable import lower_selective_scan
from medmamba_edge.exporters.quantize import quantize_onnx
from medmamba_edge.runtime import scan_cpu
from medmamba_edge.runtime.metadata import write_onnx_metadata

from common import cpu_session, medmamba_t  # benchmarks/common.py, beside this script

SIZE = 224
SAMPLES = Path(__file__).resolve().parents[1] / "medmamba_edge" / "assets" / "samples"
def interleaved(runs: dict[str, callable], warmup: int, iterations: int) -> dict[str, list[float]]:
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in runs}
    for _ in range(iterations):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="official checkpoint (default: random MedMamba-T, 6 classes)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--forms", default="plugin,portable")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=scan_cpu.default_num_threads())
    args = parser.parse_args()

    loaded = medmamba_t(args.checkpoint)

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
    for form in args.forms.split(","):
        plugin = form == "plugin"
        sessions = {name: cpu_session(m if plugin else lower_selective_scan(m), args.threads, fused=plugin)
                    for name, m in models.items()}
        for batch in [int(b) for b in args.batches.split(",")]:
            feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)}
            runs = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
            samples = interleaved(runs, args.warmup, args.iterations)
            rows += [(form, batch, name, statistics.median(t), min(t)) for name, t in samples.items()]
        del sessions

    print(f"\nMedMamba-T {SIZE}×{SIZE}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"onnxruntime {ort.__version__}, {args.iterations} interleaved rounds\n")
    print("| form | batch | model | median ms | min ms | ms/image | fp32 / this (median) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    fp32 = {(form, batch): median for form, batch, name, median, _ in rows if name == "fp32"}
    for form, batch, name, median, best in rows:
        print(f"| {form} | {batch} | {name} | {median:.1f} | {best:.1f} | {median / batch:.1f} | "
              f"{fp32[(form, batch)] / median:.2f}× |")


if __name__ == "__main__":
    main()
