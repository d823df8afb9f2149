#!/usr/bin/env python3
"""Sweep the CUDA SS2DScan's block shapes on this GPU and compare the best with what the dispatcher picks.

    python plugins/selective_scan/tune_block_shapes.py

Needs what gpu_check.py needs (PyTorch with CUDA, nvcc, the package installed). Every shape is compiled into
one library next to the dispatcher (the kernel file is #included, so the variants are the shipped kernel),
checked against the dispatcher's output, and timed on the MedMamba-T stage shapes at batch 1 and 8, float32
and float16 I/O. The shapes the kernel's plan uses (kShapes, planLaunch) are a first choice by block count; run this on
the GPUs that matter (H200, Jetson Orin: 16 SMs) and move them to the winners.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import torch

import gpu_check  # the script beside this one (a script's own folder is first on sys.path)

# Lanes per (direction, channel): d_state = 16 states split as 16 lanes x 1, 8 x 2 or 4 x 4 per thread.
LANES = (16, 8, 4)
CHANNELS_PER_BLOCK = (1, 2, 4, 8)
CHUNKS = (32, 64)
DTYPES = {"float": torch.float32, "__half": torch.float16}


def variants():
    return [(ctype, lanes, channels, chunk)
            for ctype in DTYPES for lanes in LANES for channels in CHANNELS_PER_BLOCK for chunk in CHUNKS
            if 4 * channels * lanes <= 1024]


def sweep_source(kernel: Path, shapes) -> str:
    table = ",\n".join(f"    {{&launch<{c}, 16, {lanes}, {g}, {chunk}>, {{16, {lanes}, {g}, {chunk}}}}}"
                       for c, lanes, g, chunk in shapes)
    return f"""#include "{kernel}"
namespace {{
struct Variant {{
    cudaError_t (*launch)(ScanParams, DeviceInfo const&, size_t, cudaStream_t);
    BlockShape shape;
}};
Variant const kVariants[] = {{
{table}
}};
}}
// The dynamic shared memory the variant needs for this problem on this device, 0 where it does not fit (its launch
// would refuse it: cudaErrorInvalidValue).
extern "C" __attribute__((visibility("default"))) size_t medmamba_tune_shared_bytes(int index, int dt_rank,
    int length)
{{
    DeviceInfo device{{}};
    bool accInShared = false;
    if (deviceInfo(&device) != cudaSuccess)
        return 0;
    return sharedBytes(kVariants[index].shape, dt_rank, 16, length, device.sharedOptin, &accInShared);
}}
extern "C" __attribute__((visibility("default"))) int medmamba_tune_launch(int index, void const* x,
    void const* x_dbl, float const* dt_w, float const* dt_b, float const* A, float const* Ds, void* y,
    void* workspace, size_t workspace_bytes, int batch, int channels, int height, int width, int dt_rank,
    cudaStream_t stream)
{{
    DeviceInfo device{{}};
    cudaError_t const err = deviceInfo(&device);
    if (err != cudaSuccess)
        return err;
    ScanParams const p{{x, x_dbl, dt_w, dt_b, A, Ds, y, static_cast<float*>(workspace), batch, channels, height,
        width, dt_rank, 16, 1, 0}};
    return kVariants[index].launch(p, device, workspace_bytes, stream);
}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    gpu_check.require_cuda()
    shapes = variants()
    with tempfile.TemporaryDirectory(prefix="medmamba-tune-") as temp:
        source = Path(temp) / "scan_block_shapes.cu"
        source.write_text(sweep_source(gpu_check.HERE / "selective_scan_kernel.cu", shapes))
        library, seconds, arch = gpu_check.compile_launcher(Path(temp), source)
        print(f"# block-shape sweep on {torch.cuda.get_device_name()} ({arch}, {len(shapes)} variants, "
              f"built in {seconds:.0f} s)\n")
        scan = gpu_check.Launcher(library)  # the dispatcher, as shipped
        tune = scan.lib.medmamba_tune_launch
        tune.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 8 + [ctypes.c_size_t] + [ctypes.c_int] * 5 + [ctypes.c_void_p]
        shared_bytes = scan.lib.medmamba_tune_shared_bytes
        shared_bytes.argtypes, shared_bytes.restype = [ctypes.c_int] * 3, ctypes.c_size_t
        print("| dtype | batch | D x H x W | dispatcher us | best shape (lanes, channels/block, chunk) | best us "
              "| dispatcher / best | shapes over this GPU's shared memory |")
        print("|---|---|---|---|---|---|---|---|")
        mismatches = []
        for ctype, dtype in DTYPES.items():
            for batch in (1, 8):
                for _, channels, height, width, dt_rank in gpu_check.stage_shapes():
                    arrays = gpu_check.make_arrays(batch, channels, height, width, dt_rank, 16, True)
                    inputs = gpu_check.to_cuda(arrays, dtype)
                    expected = scan(*inputs)
                    y = torch.empty_like(expected)
                    dispatcher = gpu_check.cuda_time(lambda: scan(*inputs, out=y), args.iters, warmup=3)
                    workspace = scan.workspace  # sized for this shape by the call above
                    timings, too_large = [], 0
                    for index, shape in enumerate(shapes):
                        if shape[0] != ctype:
                            continue
                        # Staged rows grow with dt_rank and chunk: a shape that fits an H100's 227 KiB per block
                        # may not fit Orin's 163 KiB or a T4's 64 KiB.
                        if shared_bytes(index, dt_rank, height * width) == 0:
                            too_large += 1
                            continue

                        def launch():
                            status = tune(index, *(t.data_ptr() for t in (*inputs, y)), workspace.data_ptr(),
                                          workspace.numel(), batch, channels, height, width, dt_rank,
                                          torch.cuda.current_stream().cuda_stream)
                            if status:
                                raise RuntimeError(f"variant {shape}: CUDA error {status}")

                        launch()
                        # Every variant sums the four directions in the same order: only the float32 rounding
                        # of the per-lane sums differs.
                        _, rel = gpu_check.rel_error(y.float().cpu().numpy(), expected.float().cpu().numpy())
                        if not rel <= gpu_check.TOLERANCE[dtype]:
                            mismatches.append((shape, batch, channels, height))
                        timings.append((gpu_check.cuda_time(launch, args.iters, warmup=3), shape))
                    best, shape = min(timings)
                    print(f"| {str(dtype)[6:]} | {batch} | {channels} x {height} x {width} | {dispatcher * 1e6:.1f} "
                          f"| {', '.join(map(str, shape[1:]))} | {best * 1e6:.1f} | {dispatcher / best:.2f} "
                          f"| {too_large} |")
    if mismatches:
        print(f"\n**MISMATCH** against the dispatcher: {mismatches}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
