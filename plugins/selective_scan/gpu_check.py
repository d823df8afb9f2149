#!/usr/bin/env python3
"""GPU check of the CUDA SS2DScan: parity with the PyTorch and float64 references, and timings, in one run.

Needs PyTorch with CUDA and nvcc; no TensorRT, no network. The package is taken from this checkout when it is not
installed (pip install -e .), so a bare copy of the repository runs it with any Python that has PyTorch, NumPy
and onnx (tests/ss2d_reference.py imports it):

    python plugins/selective_scan/gpu_check.py

It compiles selective_scan_kernel.cu for the local GPU only, loads it with ctypes and, on CUDA tensors,
  * checks the MedMamba-T stage shapes at 224 px (D = 96·2^i, H = W = 56/2^i, R = 3·2^i, N = 16), float32
    and float16 I/O, batch 1 and 8, plus odd shapes that reach the other code paths (partial channel blocks,
    H != W, generic d_state, no softplus, accumulators in the workspace), against medmamba_edge.scan's
    ss2d_scan_ref and the float64 reference of tests/ss2d_reference.py; the launcher's own plan for each
    shape shows the path it took, and a path no case reached is a failure;
  * times the kernel (replayed from a CUDA graph, so the ctypes call that issues it is not timed) against
    ss2d_scan_ref on the same GPU (CUDA events), and every stage shape against its memory-bandwidth bound
    (bytes of x, x_dbl, weights read and y written / measured device copy bandwidth);
  * times a MedMamba-T forward pass (batch 1 and 8) with the reference scan and with the kernel.
Prints markdown tables; exits 1 when a parity check fails (timing goals are reported, not enforced).
Tolerances (max|y - ref| / max|ref| against float64): float32 1e-4, float16 I/O 1e-2.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

try:
    import medmamba_edge.runtime  # noqa: F401  installed (pip install -e . or a wheel)
except ModuleNotFoundError:
    # Not installed (a bare checkout, e.g. copied to a GPU machine with no network for pip's build backend): this
    # checkout's folders, as pyproject.toml's package-dir maps them (runtime/ -> medmamba_edge.runtime, ...).
    sys.path.insert(0, str(REPO))
    import medmamba_edge

    medmamba_edge.__path__.append(str(REPO))

from medmamba_edge.runtime.backends.tensorrt.plugin import find_nvcc, launcher_nvcc_command  # noqa: E402
from medmamba_edge.scan import ss2d_scan_ref  # noqa: E402
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
SPEEDUP_GOAL = 20.0
BANDWIDTH_GOAL = 3.0  # issue 13: stage 1 within 3x of the memory-bandwidth bound
# Cases whose float64 reference (a Python loop over positions) would take minutes are compared with
# ss2d_scan_ref only.
FLOAT64_LIMIT = 40_000_000
# Shapes that reach the kernel's other code paths on every GPU the tests plan for (T4 to H100, Jetson Orin):
# (name, batch, D, H, W, R, N, delta_softplus). 101 channels leave a partial block whatever the block's
# channel count; 2 x 30977 float32 accumulators exceed even an H100's 227 KiB of shared memory.
OTHER_CASES = (
    ("partial channel blocks, H != W", 3, 101, 9, 23, 5, 16, True),
    ("generic N=5, no softplus", 2, 24, 13, 7, 2, 5, False),
    ("generic N=64", 1, 12, 31, 33, 4, 64, True),
    ("1x1 map", 4, 40, 1, 1, 3, 16, True),
    ("L=30976: accumulators in the workspace", 1, 16, 176, 176, 1, 16, True),
)


# The float64 reference is the test suite's (tests/ is not installed): this script runs from a checkout.
sys.path.insert(0, str(REPO))
from tests import ss2d_reference as reference  # noqa: E402


def stage_shapes():
    """(stage, D, H, W, R) of MedMamba-T's SS2D blocks at 224x224."""
    return [(i + 1, 96 << i, 56 >> i, 56 >> i, 3 << i) for i in range(4)]


def cases():
    """Every parity case as (name, batch, D, H, W, R, N, delta_softplus)."""
    stages = [(f"stage {s} b{batch}", batch, d, h, w, r, 16, True)
              for batch in (1, 8) for s, d, h, w, r in stage_shapes()]
    return stages + list(OTHER_CASES)


def missing_paths(planned) -> list[str]:
    """The kernel's code paths that none of the (case, plan) pairs reaches."""
    reached = {
        "accumulators in shared memory": any(plan.accumulators_in_shared for _, plan in planned),
        "accumulators in the workspace": any(not plan.accumulators_in_shared for _, plan in planned),
        "partial channel blocks": any(case[2] % plan.channels_per_block for case, plan in planned),
        "generic d_state": any(case[6] != 16 for case, _ in planned),
    }
    return [path for path, ok in reached.items() if not ok]


def make_arrays(batch, channels, height, width, dt_rank, d_state, softplus, seed=0):
    """NumPy float32 inputs of trained magnitudes; without softplus delta is kept positive (the caller's job),
    since a negative step makes exp(delta * A) grow without bound in every implementation."""
    x, x_dbl, dt_w, dt_b, A, Ds = reference.make_ss2d_inputs(batch, channels, height, width, dt_rank, d_state, seed)
    if not softplus:
        dt_b = np.log1p(np.exp(dt_b)).astype(np.float32)
        dt_w = dt_w * np.float32(0.01)
    return x, x_dbl, dt_w, dt_b, A, Ds


def compile_launcher(out_dir: Path, source: Path = HERE / "selective_scan_kernel.cu") -> tuple[Path, float, str]:
    """Build `source` (the kernel, or a file that includes it) for the local GPU into a shared library."""
    nvcc = find_nvcc()
    if nvcc is None:
        sys.exit("nvcc not found (set CUDACXX or CUDA_HOME)")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    library = out_dir / f"lib{source.stem}.so"
    command = launcher_nvcc_command(nvcc, arch, library, source) + ["-Xptxas", "-v"]  # -v: spills
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(" ".join(command))
        print(result.stdout + result.stderr)
        sys.exit("nvcc failed")
    spills = [line.strip() for line in result.stderr.splitlines() if "spill" in line and " 0 bytes spill stores" not in line]
    return library, seconds, f"sm_{arch}" + (f" ({len(spills)} kernels spill registers)" if spills else "")


class ScanPlan(ctypes.Structure):
    """medmamba_scan_plan of selective_scan.h."""

    _fields_ = [(name, ctypes.c_int) for name in
                ("block_shape", "channels_per_block", "chunk", "shared_bytes", "accumulators_in_shared")]

    def __str__(self):
        where = "shared" if self.accumulators_in_shared else "workspace"
        return f"G{self.channels_per_block} chunk {self.chunk}, {self.shared_bytes} B, acc in {where}"


class Launcher:
    """medmamba_ss2d_scan_forward through ctypes, on CUDA tensors and the current stream."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.medmamba_ss2d_scan_forward
        f.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_size_t] + [ctypes.c_int] * 8 + [ctypes.c_void_p]
        f.restype = ctypes.c_int
        self.lib.medmamba_ss2d_scan_workspace_size.argtypes = [ctypes.c_int] * 4
        self.lib.medmamba_ss2d_scan_workspace_size.restype = ctypes.c_size_t
        self.lib.medmamba_ss2d_scan_error_string.restype = ctypes.c_char_p
        self.lib.medmamba_ss2d_scan_error_string.argtypes = [ctypes.c_int]
        self.lib.medmamba_ss2d_scan_plan.argtypes = [ctypes.c_int] * 8 + [ctypes.POINTER(ScanPlan)]
        self.workspace = torch.empty(0, dtype=torch.uint8, device="cuda")

    def plan(self, batch, channels, height, width, dt_rank, d_state, sm_count=0, shared_optin=0) -> ScanPlan:
        """How forward launches these shapes on a GPU of sm_count SMs and shared_optin bytes (0, 0: this one)."""
        plan = ScanPlan()
        status = self.lib.medmamba_ss2d_scan_plan(batch, channels, height, width, dt_rank, d_state, sm_count,
                                                  shared_optin, ctypes.byref(plan))
        if status != 0:
            raise RuntimeError(f"no plan: {self.lib.medmamba_ss2d_scan_error_string(status).decode()}")
        return plan

    def __call__(self, x, x_dbl, dt_w, dt_b, A, Ds, delta_softplus=True, out=None):
        batch, channels, height, width = x.shape
        y = x.new_empty((batch, height, width, channels)) if out is None else out
        tensors = (x, x_dbl, dt_w, dt_b, A, Ds, y)
        assert all(t.is_cuda and t.is_contiguous() for t in tensors)
        nbytes = self.lib.medmamba_ss2d_scan_workspace_size(batch, channels, height, width)
        if self.workspace.numel() < nbytes:
            self.workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dtype = {torch.float32: 0, torch.float16: 1}[x.dtype]
        status = self.lib.medmamba_ss2d_scan_forward(
            *(t.data_ptr() for t in tensors), self.workspace.data_ptr(), self.workspace.numel(),
            batch, channels, height, width, dt_w.shape[2], A.shape[1], int(delta_softplus), dtype,
            torch.cuda.current_stream().cuda_stream,
        )
        if status != 0:
            raise RuntimeError(f"scan failed: {self.lib.medmamba_ss2d_scan_error_string(status).decode()}")
        return y


def to_cuda(arrays, dtype):
    """x and x_dbl in the I/O dtype, the weights float32 (as the exported node has them)."""
    x, x_dbl, *weights = (torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in arrays)
    return (x.to(dtype), x_dbl.to(dtype), *weights)


def cuda_time(fn, iters: int, warmup: int = 2, graph: bool = False) -> float:
    """Mean seconds per call. graph: the calls are captured once and replayed, so that only the GPU's work is
    timed; a small stage's kernel takes a few microseconds, about what the Python call that launches it takes."""
    for _ in range(warmup):
        fn()

    def run():
        for _ in range(iters):
            fn()

    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            run()
        run = captured.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (read + write)."""
    n = 256 * 1024 * 1024  # 1 GiB of float32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), iters=20, warmup=3)
    src = dst = None  # freed before empty_cache returns their memory
    torch.cuda.empty_cache()
    return 2 * n * 4 / seconds


def scan_bytes(batch, channels, height, width, dt_rank, d_state, dtype) -> int:
    """Bytes the node must move at least: x, x_dbl and the weights read once, y written once."""
    elem = torch.tensor([], dtype=dtype).element_size()
    length, k = height * width, 4
    io = (2 * batch * channels * length + batch * k * (dt_rank + 2 * d_state) * length) * elem
    weights = (k * channels * dt_rank + k * channels + k * channels * d_state + k * channels) * 4
    return io + weights


def require_cuda() -> None:
    """Exit, saying why, where PyTorch cannot reach a GPU. A CPU-only build (`make setup` installs one, from
    PyTorch's CPU index) sees no device on a GPU machine either: told as such, not as a machine without one."""
    if torch.version.cuda is None:
        sys.exit(f"PyTorch {torch.__version__} is a CPU-only build (what `make setup` installs by default); this "
                 f"needs a CUDA build, e.g. in a new venv: TORCH_INDEX=https://download.pytorch.org/whl/cu130 make setup")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to PyTorch")


def rel_error(y, ref) -> tuple[float, float]:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    diff = float(np.abs(y - ref).max())
    return diff, diff / max(float(np.abs(ref).max()), 1e-30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, help="keep the compiled library here (default: a temp dir)")
    parser.add_argument("--skip-model", action="store_true", help="skip the MedMamba-T forward timing")
    parser.add_argument("--kernel-iters", type=int, default=100)
    parser.add_argument("--ref-iters", type=int, default=2)
    args = parser.parse_args()

    require_cuda()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's matmuls must stay float32
    torch.backends.cudnn.allow_tf32 = False

    props = torch.cuda.get_device_properties(0)
    print(f"# SS2DScan GPU check\n\nGPU: **{props.name}** ({props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory(prefix="medmamba-scan-") as temp:
        build_dir = args.build_dir or Path(temp)
        build_dir.mkdir(parents=True, exist_ok=True)
        library, compile_seconds, arch = compile_launcher(build_dir)
        print(f"compiled {library.name} for {arch} in {compile_seconds:.1f} s")
        scan = Launcher(library)
        return run_checks(scan, args)


def run_checks(scan: Launcher, args) -> int:
    bandwidth = copy_bandwidth()
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s\n")
    failures = []
    stage_rows = []
    print("## Parity (rel err = max|y - ref| / max|ref|)\n")
    print("| case | batch | D | H x W | R | N | softplus | plan | dtype | vs float64 | vs ss2d_scan_ref | tol | parity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    planned = []
    for case in cases():
        name, batch, channels, height, width, dt_rank, d_state, softplus = case
        columns = f"| {name} | {batch} | {channels} | {height} x {width} | {dt_rank} | {d_state} | {int(softplus)} "
        try:
            plan = scan.plan(batch, channels, height, width, dt_rank, d_state)
        except RuntimeError as exc:
            failures.append(f"{name} ({exc})")
            print(f"{columns}| {exc} | | | | | ERROR |")
            continue
        planned.append((case, plan))
        arrays = make_arrays(batch, channels, height, width, dt_rank, d_state, softplus)
        ref64 = None
        if batch * channels * height * width * d_state <= FLOAT64_LIMIT:
            ref64 = reference.ss2d_reference64(*arrays, delta_softplus=softplus)
        for dtype in (torch.float32, torch.float16):
            # One case's exception (a launch error, a failed graph capture) is reported and the run goes on: a
            # GPU machine's minutes are few, and the other cases' rows and the timings still come out.
            try:
                inputs = to_cuda(arrays, dtype)
                y = scan(*inputs, delta_softplus=softplus)
                ref_torch = ss2d_scan_ref(*inputs, delta_softplus=softplus)
                torch.cuda.synchronize()
                y_np = y.float().cpu().numpy()
                rel64 = rel_error(y_np, ref64)[1] if ref64 is not None else float("nan")
                rel_torch = rel_error(y_np, ref_torch.float().cpu().numpy())[1]
                ok = bool(np.isfinite(y_np).all()) and rel_torch <= TOLERANCE[dtype]
                ok = ok and (ref64 is None or rel64 <= TOLERANCE[dtype])
                if not ok:
                    failures.append(f"{name} {str(dtype)[6:]}")
                print(f"{columns}| {plan} | {str(dtype)[6:]} | {rel64:.2e} | {rel_torch:.2e} | {TOLERANCE[dtype]:.0e} "
                      f"| {'PASS' if ok else 'FAIL'} |")
                if name.startswith("stage"):
                    out = torch.empty_like(y)
                    kernel = cuda_time(lambda: scan(*inputs, delta_softplus=softplus, out=out), args.kernel_iters,
                                       warmup=5, graph=True)
                    ref = cuda_time(lambda: ss2d_scan_ref(*inputs, delta_softplus=softplus), args.ref_iters, warmup=0)
                    nbytes = scan_bytes(batch, channels, height, width, dt_rank, d_state, dtype)
                    stage_rows.append((name, dtype, kernel, ref, nbytes))
            except Exception as exc:  # noqa: BLE001
                message = " ".join(f"{type(exc).__name__}: {exc}".replace("|", "/").split())[:300]
                failures.append(f"{name} {str(dtype)[6:]} ({type(exc).__name__})")
                print(f"{columns}| {plan} | {str(dtype)[6:]} | {message} | | | ERROR |")

    missing = missing_paths(planned)
    if missing:
        failures.append(f"no case reached: {', '.join(missing)}")

    print("\n## Speed: kernel vs ss2d_scan_ref, and against the memory-bandwidth bound\n")
    print(f"bound = bytes(x, x_dbl, weights read + y written) / {bandwidth / 1e9:.0f} GB/s (measured copy)\n")
    print("| case | dtype | kernel us | reference ms | speedup | MB moved | bound us | kernel / bound |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dtype, kernel, ref, nbytes in stage_rows:
        speedup, bound = ref / kernel, nbytes / bandwidth
        print(f"| {name} | {str(dtype)[6:]} | {kernel * 1e6:.1f} | {ref * 1e3:.1f} "
              f"| {speedup:.0f}x{'' if speedup >= SPEEDUP_GOAL else f' (goal {SPEEDUP_GOAL:g}x: MISS)'} | {nbytes / 1e6:.2f} "
              f"| {bound * 1e6:.1f} | {kernel / bound:.1f}{'' if kernel / bound <= BANDWIDTH_GOAL else f' (goal {BANDWIDTH_GOAL:g}x: MISS)'} |")

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
    reference_runs = {}
    with torch.no_grad():
        for batch, x in inputs.items():
            out = model(x)  # also the warm-up
            reference_runs[batch] = (out, cuda_time(lambda: model(x), iters=2, warmup=0))

        # From here on the custom op runs the kernel on CUDA tensors (as the exported engine would).
        def cuda_scan(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds, delta_softplus=True):
            tensors = (x, x_dbl, dt_projs_weight.float(), dt_projs_bias.float(), A.float(), Ds.float())
            return scan(*(t.contiguous() for t in tensors), delta_softplus=delta_softplus)

        scan_module.ss2d_scan.register_kernel("cuda")(cuda_scan)
        print("| batch | reference scan ms | CUDA kernel ms | speedup | images/s with kernel | logits rel err |")
        print("|---|---|---|---|---|---|")
        for batch, x in inputs.items():
            ref_out, ref_seconds = reference_runs[batch]
            out = model(x)
            kernel_seconds = cuda_time(lambda: model(x), iters=20, warmup=3)
            _, rel = rel_error(out.cpu().numpy(), ref_out.cpu().numpy())
            print(f"| {batch} | {ref_seconds * 1e3:.1f} | {kernel_seconds * 1e3:.2f} | {ref_seconds / kernel_seconds:.0f}x "
                  f"| {batch / kernel_seconds:.0f} | {rel:.2e} |")


if __name__ == "__main__":
    sys.exit(main())
