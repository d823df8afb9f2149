#!/usr/bin/env python3
"""GPU check of the CUDA selective scan: parity with ``selective_scan_ref`` and timings, in one run.

Needs PyTorch with CUDA and nvcc; no TensorRT, no network, no installed package (run it from a checkout):

    python plugins/selective_scan/gpu_check.py

It compiles selective_scan_kernel.cu for the local GPU only, loads it with ctypes and, on CUDA tensors,
  * checks every MedMamba-T stage shape (K*D, L) = (384, 3136), (768, 784), (1536, 196), (3072, 49) with
    N = 16, G = 4, float32 and float16 I/O, batch 1 and 8, plus a few odd shapes that reach the other code
    paths (partial channel blocks, generic d_state, no softplus), against the PyTorch reference;
  * times the kernel against the reference on the same GPU (CUDA events), and stage 1 against its
    memory-bandwidth bound (bytes of u, delta, B, C read and y written / measured device copy bandwidth);
  * times a MedMamba-T forward pass (batch 1 and 8) with the reference scan and with the kernel.
Prints markdown tables; exits 1 when a parity check fails (timing goals are reported, not enforced).
Tolerances: float32 max|y - ref| / max|ref| <= 1e-4, float16 I/O <= 1e-2.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGES = ((384, 3136), (768, 784), (1536, 196), (3072, 49))  # MedMamba-T at 224x224: (K*D, L)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
SPEEDUP_GOAL = 20.0
BANDWIDTH_GOAL = 2.0
# Shapes that reach the kernel's other code paths: (name, batch, K*D, L, G, N, delta_softplus).
OTHER_CASES = (
    ("partial channel blocks", 8, 1000, 64, 8, 16, True),
    ("odd L, groups of 32", 2, 96, 1000, 3, 16, True),
    ("groups of 5", 3, 10, 300, 2, 16, True),
    ("generic N=32, no softplus", 1, 64, 200, 2, 32, False),
    ("generic N=64", 1, 24, 2000, 4, 64, True),
    ("generic N=1, L=5", 1, 12, 5, 1, 1, True),
)


def import_medmamba():
    """medmamba_edge from the installed package or, failing that, from this checkout.

    pyproject.toml maps the repository's top-level runtime/, plugins/, exporters/ into the medmamba_edge
    namespace; without an installation, adding the repository root to the package's __path__ does the same.
    """
    try:
        import medmamba_edge.scan  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
        for name in [m for m in sys.modules if m == "medmamba_edge" or m.startswith("medmamba_edge.")]:
            del sys.modules[name]
        import medmamba_edge

        medmamba_edge.__path__.append(str(REPO))
        import medmamba_edge.scan  # noqa: F401
    import medmamba_edge

    return medmamba_edge


def load_build_module():
    spec = importlib.util.spec_from_file_location("_medmamba_plugin_build", HERE.parent / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_launcher(out_dir: Path, source: Path = HERE / "selective_scan_kernel.cu") -> tuple[Path, float, str]:
    """Build `source` (the kernel, or a file that includes it) for the local GPU into a shared library."""
    build = load_build_module()
    nvcc = build.find_nvcc()
    if nvcc is None:
        sys.exit("nvcc not found (set CUDACXX or CUDA_HOME)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    library = out_dir / f"lib{source.stem}.so"
    command = build.launcher_nvcc_command(nvcc, arch, library, source) + ["-Xptxas", "-v"]  # -v: spills
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(" ".join(command))
        print(result.stdout + result.stderr)
        sys.exit("nvcc failed")
    spills = [line.strip() for line in result.stderr.splitlines() if "spill" in line and " 0 bytes spill stores" not in line]
    return library, seconds, f"sm_{arch}" + (f" ({len(spills)} kernels spill registers)" if spills else "")


class Launcher:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.medmamba_selective_scan_forward
        f.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
        f.restype = ctypes.c_int
        self.lib.medmamba_selective_scan_error_string.restype = ctypes.c_char_p
        self.lib.medmamba_selective_scan_error_string.argtypes = [ctypes.c_int]

    def __call__(self, u, delta, A, B, C, D, delta_bias, delta_softplus=True, out=None):
        batch, channels, length = u.shape
        y = torch.empty_like(u) if out is None else out
        tensors = (u, delta, A, B, C, D, delta_bias, y)
        assert all(t.is_cuda and t.is_contiguous() for t in tensors)
        dtype = {torch.float32: 0, torch.float16: 1}[u.dtype]
        status = self.lib.medmamba_selective_scan_forward(
            *(t.data_ptr() for t in tensors), batch, channels, length, B.shape[1], A.shape[1],
            int(delta_softplus), dtype, torch.cuda.current_stream().cuda_stream,
        )
        if status != 0:
            raise RuntimeError(f"scan failed: {self.lib.medmamba_selective_scan_error_string(status).decode()}")
        return y


def make_inputs(batch, channels, length, groups, d_state, dtype, seed=0, delta_softplus=True, device="cuda"):
    """Inputs with MedMamba/Mamba's initialisation statistics: dt in [1e-3, 0.1] keeps the decays close to 1,
    so the state carries over the whole sequence (what makes a wrong carry visible). Without softplus the
    caller owns positivity, so delta + delta_bias is made positive (a negative step makes exp(delta * A)
    grow without bound, and then both kernel and reference overflow)."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(batch, channels, length, device=device, generator=g)
    delta = 0.1 * torch.randn(batch, channels, length, device=device, generator=g)
    A = -torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(channels, 1)
    A = A * (0.5 + torch.rand(channels, d_state, device=device, generator=g))
    B = torch.randn(batch, groups, d_state, length, device=device, generator=g)
    C = torch.randn(batch, groups, d_state, length, device=device, generator=g)
    D = torch.randn(channels, device=device, generator=g)
    dt = torch.exp(torch.rand(channels, device=device, generator=g) * math.log(100.0) + math.log(1e-3))  # [1e-3, 0.1]
    if delta_softplus:
        delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    else:
        delta, delta_bias = delta.abs(), dt
    return u.to(dtype), delta.to(dtype), A, B.to(dtype), C.to(dtype), D, delta_bias


def cuda_time(fn, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (read + write)."""
    n = 256 * 1024 * 1024  # 1 GiB of float32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), iters=20, warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / seconds


def scan_bytes(batch, channels, length, groups, d_state, dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return (3 * batch * channels * length + 2 * batch * groups * d_state * length) * elem


def rel_error(y, ref) -> tuple[float, float]:
    diff = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    return diff, diff / max(scale, 1e-30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, help="keep the compiled library here (default: a temp dir)")
    parser.add_argument("--skip-model", action="store_true", help="skip the MedMamba-T forward timing")
    parser.add_argument("--kernel-iters", type=int, default=100)
    parser.add_argument("--ref-iters", type=int, default=2)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to PyTorch")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's einsums must stay float32
    torch.backends.cudnn.allow_tf32 = False
    import_medmamba()
    from medmamba_edge.scan import selective_scan_ref

    props = torch.cuda.get_device_properties(0)
    print(f"# selective scan GPU check\n\nGPU: **{props.name}** ({props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    temp = None
    if args.build_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="medmamba-scan-")
        build_dir = Path(temp.name)
    else:
        build_dir = args.build_dir
        build_dir.mkdir(parents=True, exist_ok=True)
    library, compile_seconds, arch = compile_launcher(build_dir)
    print(f"compiled {library.name} for {arch} in {compile_seconds:.1f} s")
    scan = Launcher(library)
    bandwidth = copy_bandwidth()
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s\n")

    failures = []

    def check(label, batch, channels, length, groups, d_state, dtype, softplus=True, time_it=False):
        inputs = make_inputs(batch, channels, length, groups, d_state, dtype, delta_softplus=softplus)
        ref = selective_scan_ref(*inputs, delta_softplus=softplus)
        y = scan(*inputs, delta_softplus=softplus)
        torch.cuda.synchronize()
        abs_err, rel = rel_error(y, ref)
        ok = rel <= TOLERANCE[dtype] and torch.isfinite(y).all().item()
        if not ok:
            failures.append(label)
        row = {"abs": abs_err, "rel": rel, "ok": ok}
        if time_it:
            out = torch.empty_like(inputs[0])
            row["kernel"] = cuda_time(lambda: scan(*inputs, delta_softplus=softplus, out=out), args.kernel_iters, warmup=5)
            row["ref"] = cuda_time(lambda: selective_scan_ref(*inputs, delta_softplus=softplus), args.ref_iters, warmup=0)
        return row

    print("## MedMamba-T stage shapes (N = 16, G = 4)\n")
    print("| stage | batch | K*D | L | dtype | max abs err | rel err | tol | parity | kernel us | reference ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    stage1 = {}
    for dtype in (torch.float32, torch.float16):
        for batch in (1, 8):
            for stage, (channels, length) in enumerate(STAGES, start=1):
                label = f"stage {stage} b{batch} {str(dtype)[6:]}"
                r = check(label, batch, channels, length, 4, 16, dtype, time_it=True)
                speedup = r["ref"] / r["kernel"]
                if stage == 1:
                    stage1[(dtype, batch)] = r["kernel"]
                print(f"| {stage} | {batch} | {channels} | {length} | {str(dtype)[6:]} | {r['abs']:.2e} | {r['rel']:.2e} "
                      f"| {TOLERANCE[dtype]:.0e} | {'PASS' if r['ok'] else 'FAIL'} | {r['kernel'] * 1e6:.1f} "
                      f"| {r['ref'] * 1e3:.1f} | {speedup:.0f}x {'' if speedup >= SPEEDUP_GOAL else '(goal 20x: MISS)'} |")

    print("\n## Other code paths\n")
    print("| case | batch | K*D | L | G | N | softplus | dtype | rel err | parity |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float16):
        for name, batch, channels, length, groups, d_state, softplus in OTHER_CASES:
            r = check(f"{name} {dtype}", batch, channels, length, groups, d_state, dtype, softplus=softplus)
            print(f"| {name} | {batch} | {channels} | {length} | {groups} | {d_state} | {int(softplus)} "
                  f"| {str(dtype)[6:]} | {r['rel']:.2e} | {'PASS' if r['ok'] else 'FAIL'} |")

    print("\n## Stage 1 against the memory-bandwidth bound\n")
    print(f"bound = bytes(u, delta, B, C read + y written) / {bandwidth / 1e9:.0f} GB/s (measured copy)\n")
    print("| dtype | batch | MB moved | bound us | kernel us | kernel / bound | goal <= 2x |")
    print("|---|---|---|---|---|---|---|")
    for (dtype, batch), seconds in stage1.items():
        nbytes = scan_bytes(batch, *STAGES[0], 4, 16, dtype)
        bound = nbytes / bandwidth
        ratio = seconds / bound
        print(f"| {str(dtype)[6:]} | {batch} | {nbytes / 1e6:.1f} | {bound * 1e6:.1f} | {seconds * 1e6:.1f} | {ratio:.2f} "
              f"| {'MET' if ratio <= BANDWIDTH_GOAL else 'MISS'} |")

    if not args.skip_model:
        print("\n## MedMamba-T forward (3x224x224, float32, random weights, PyTorch eager)\n")
        try:
            model_forward_table(scan)
        except Exception as exc:  # the model module belongs to another part of the project
            print(f"skipped: {type(exc).__name__}: {exc}")

    print()
    if failures:
        print(f"**PARITY FAIL**: {', '.join(failures)}")
        return 1
    print("**PARITY PASS** (all shapes within tolerance)")
    return 0


def model_forward_table(scan: Launcher, batches=(1, 8)) -> None:
    from medmamba_edge import model as model_module
    from medmamba_edge import scan as scan_module

    model = model_module.medmamba_t(num_classes=1000).cuda().eval()
    inputs = {batch: torch.randn(batch, 3, 224, 224, device="cuda") for batch in batches}
    reference = {}
    with torch.no_grad():
        for batch, x in inputs.items():
            out = model(x)  # also the warm-up
            reference[batch] = (out, cuda_time(lambda: model(x), iters=2, warmup=0))

        # From here on the custom op runs the kernel on CUDA tensors (as the exported engine would).
        def cuda_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True):
            return scan(*(t.contiguous() for t in (u, delta, A, B, C, D, delta_bias)), delta_softplus=delta_softplus)

        scan_module.selective_scan.register_kernel("cuda")(cuda_scan)
        print("| batch | reference scan ms | CUDA kernel ms | speedup | images/s with kernel | logits rel err |")
        print("|---|---|---|---|---|---|")
        for batch, x in inputs.items():
            ref_out, ref_seconds = reference[batch]
            out = model(x)
            kernel_seconds = cuda_time(lambda: model(x), iters=20, warmup=3)
            _, rel = rel_error(out, ref_out)
            print(f"| {batch} | {ref_seconds * 1e3:.1f} | {kernel_seconds * 1e3:.2f} | {ref_seconds / kernel_seconds:.0f}x "
                  f"| {batch / kernel_seconds:.0f} | {rel:.2e} |")


if __name__ == "__main__":
    sys.exit(main())
