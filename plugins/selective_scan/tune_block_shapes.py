#!/usr/bin/env python3
"""Sweep the CUDA scan's block shapes on this GPU and compare the best with what the dispatcher picks.

    python plugins/selective_scan/tune_block_shapes.py

Needs what gpu_check.py needs (PyTorch with CUDA, nvcc). Every shape is compiled into one library next to
the dispatcher (the kernel file is #included, so the variants are the shipped kernel), checked against the
dispatcher's output, and timed on the MedMamba-T stage shapes at batch 1 and 8, float32 and float16 I/O.
The shapes the kernel uses (selective_scan_kernel.cu: fitsOneWave, launchThroughputShape) came from this
sweep on an H200; on a GPU with far fewer SMs (Jetson Orin: 16) run it again before trusting them.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_medmamba_gpu_check", HERE / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

# (states per warp, warps per channel): the d_state = 16 recurrences split over a channel's warps.
STATE_SPLITS = ((2, 8), (4, 4), (8, 2))
CHANNELS_PER_BLOCK = (1, 2, 3, 4)
ITEMS_PER_LANE = (2, 4, 7)
DTYPES = {"float": torch.float32, "__half": torch.float16}


def variants():
    return [(ctype, states, warps, channels, items)
            for ctype in DTYPES for states, warps in STATE_SPLITS
            for channels in CHANNELS_PER_BLOCK for items in ITEMS_PER_LANE]


def sweep_source(kernel: Path, shapes) -> str:
    table = ",\n".join(
        f"    {{&launch<{c}, 16, {s}, {w}, {r}, {i}>}}" for c, s, w, r, i in shapes
    )
    return f"""#include "{kernel}"
namespace {{
struct Variant {{ cudaError_t (*launch)(ScanParams const&, cudaStream_t); }};
Variant const kVariants[] = {{
{table}
}};
}}
extern "C" __attribute__((visibility("default"))) int medmamba_tune_launch(int index, void const* u, void const* delta,
    float const* A, void const* B, void const* C, float const* D, float const* delta_bias, void* y, int batch,
    int channels, int length, int groups, cudaStream_t stream)
{{
    ScanParams const p{{u, delta, A, B, C, D, delta_bias, y, batch, channels, length, groups, 16, 1}};
    return kVariants[index].launch(p, stream);
}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to PyTorch")
    gpu_check.import_medmamba()  # plugins/build.py (nvcc lookup) reports through medmamba_edge.errors
    shapes = variants()
    with tempfile.TemporaryDirectory(prefix="medmamba-tune-") as temp:
        source = Path(temp) / "scan_block_shapes.cu"
        source.write_text(sweep_source(HERE / "selective_scan_kernel.cu", shapes))
        library, seconds, arch = gpu_check.compile_launcher(Path(temp), source)
        print(f"# block-shape sweep on {torch.cuda.get_device_name()} ({arch}, {len(shapes)} variants, "
              f"built in {seconds:.0f} s)\n")
        scan = gpu_check.Launcher(library)  # the dispatcher, as shipped
        tune = scan.lib.medmamba_tune_launch
        tune.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 8 + [ctypes.c_int] * 4 + [ctypes.c_void_p]
        print("| dtype | batch | K*D x L | dispatcher us "
              "| best shape (states/warp, warps/channel, channels/block, items) | best us | dispatcher / best |")
        print("|---|---|---|---|---|---|---|")
        mismatches = []
        for ctype, dtype in DTYPES.items():
            for batch in (1, 8):
                for channels, length in gpu_check.STAGES:
                    inputs = gpu_check.make_inputs(batch, channels, length, 4, 16, dtype)
                    expected = scan(*inputs)
                    y = torch.empty_like(expected)
                    dispatcher = gpu_check.cuda_time(lambda: scan(*inputs, out=y), args.iters, warmup=3)
                    timings = []
                    for index, shape in enumerate(shapes):
                        if shape[0] != ctype:
                            continue

                        def launch():
                            status = tune(index, *(t.data_ptr() for t in (*inputs, y)), batch, channels, length, 4,
                                          torch.cuda.current_stream().cuda_stream)
                            if status:
                                raise RuntimeError(f"variant {shape}: CUDA error {status}")

                        launch()
                        _, rel = gpu_check.rel_error(y, expected)
                        if not rel <= gpu_check.TOLERANCE[dtype]:
                            mismatches.append((shape, batch, channels, length))
                        timings.append((gpu_check.cuda_time(launch, args.iters, warmup=3), shape))
                    best, shape = min(timings)
                    print(f"| {str(dtype)[6:]} | {batch} | {channels} x {length} | {dispatcher * 1e6:.1f} "
                          f"| {', '.join(map(str, shape[1:]))} | {best * 1e6:.1f} | {dispatcher / best:.2f} |")
    if mismatches:
        print(f"\n**MISMATCH** against the dispatcher: {mismatches}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
