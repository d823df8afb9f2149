"""SS2DScan plugin: what can be checked without a GPU.

Runs a NumPy transliteration of the CUDA kernel's indexing against the float64 reference, compiles the CUDA
kernel and the TensorRT wrapper (when nvcc / TensorRT headers exist), checks the C ABI through ctypes, runs
the CMake build through medmamba_edge.runtime.backends.tensorrt.plugin, and pins the plugin's identity to the ONNX node
contract. Numerical parity of the compiled kernel needs a GPU: plugins/selective_scan/gpu_check.py.
Set TENSORRT_ROOT to a TensorRT prefix (headers are enough) to include the plugin compile checks.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends.tensorrt import compat
from medmamba_edge.runtime.backends.tensorrt import plugin as build
from medmamba_edge.runtime.files import CACHE_ENV
from tests.ss2d_reference import make_ss2d_inputs, relative_error, ss2d_reference64

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "plugins" / "selective_scan"
# Jetson Orin; one architecture keeps each nvcc run around ten seconds.
TEST_ARCH = "87"
LAUNCHER_LIBRARY = "libmedmamba_scan_cuda.so"  # CMakeLists.txt's medmamba_scan_cuda target: the kernel, no TensorRT


def _load(name: str, path: Path):
    # A script of the checkout (run as `python plugins/selective_scan/gpu_check.py`), not a package module.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



NVCC = build.find_nvcc()
CMAKE = shutil.which("cmake")
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDACXX, CUDA_HOME, PATH, /usr/local/cuda)")
requires_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake not on PATH")


def _tensorrt_include(use_env: bool = True) -> Path | None:
    candidates = []
    if use_env and os.environ.get("TENSORRT_ROOT"):
        root = Path(os.environ["TENSORRT_ROOT"])
        candidates += [root / "include", root]
    candidates += [Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include")]
    return next((p for p in candidates if (p / "NvInferRuntime.h").is_file()), None)


TRT_INCLUDE = _tensorrt_include()
requires_tensorrt = pytest.mark.skipif(
    TRT_INCLUDE is None, reason="TensorRT headers not found (set TENSORRT_ROOT; headers alone are enough)"
)
C_SYMBOLS = ("medmamba_ss2d_scan_forward", "medmamba_ss2d_scan_workspace_size", "medmamba_ss2d_scan_plan",
             "medmamba_ss2d_scan_error_string", "medmamba_ss2d_scan_abi_version")
CUDA_ERROR_INVALID_VALUE = 1


def _exported_symbols(library: Path) -> set[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not available")
    out = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def _undefined_symbols(path: Path) -> set[str]:
    out = subprocess.run(["nm", "-u", "-C", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("(")[0] for line in out.splitlines() if line.strip()}


def _needed_libraries(library: Path) -> list[str]:
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not available")
    out = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


@pytest.fixture(scope="module")
def launcher_build(tmp_path_factory) -> tuple[Path, str]:
    """The launcher library and ptxas' report of every kernel's resources."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("nvcc") / LAUNCHER_LIBRARY
    command = build.launcher_nvcc_command(NVCC, TEST_ARCH, out) + ["-Xptxas", "-v"]
    return out, subprocess.run(command, check=True, capture_output=True, text=True).stderr


@pytest.fixture(scope="module")
def launcher(launcher_build) -> Path:
    return launcher_build[0]


# --- the kernel's indexing, transliterated -----------------------------------------------------------------

KERNEL_SOURCE = (SRC / "selective_scan_kernel.cu").read_text()
# The block shapes the launcher plans with, kShapes: (static d_state or 0, lanes per (direction, channel),
# channels per block, chunk length); the transliteration below runs each of them.
SHIPPED_SHAPES = sorted({tuple(int(v) for v in m) for m in re.findall(
    r"\{(\d+), (\d+), (\d+), (\d+)\}", re.search(r"kShapes\[\] = \{(.*?)\};", KERNEL_SOURCE, re.S).group(1))})
MAX_D_STATE = int(re.search(r"#define MEDMAMBA_SCAN_MAX_D_STATE (\d+)", (SRC / "selective_scan.h").read_text()).group(1))
K = scan_node.NUM_DIRECTIONS


def scan_position(k: int, t: np.ndarray, height: int, width: int) -> np.ndarray:
    """scanPosition() of the kernel."""
    length = height * width
    s = length - 1 - t if k & 2 else t
    return (s % height) * width + s // height if k & 1 else s


def kernel_in_numpy(x, x_dbl, dt_w, dt_b, A, Ds, delta_softplus, *, static_n, lanes, group, chunk):
    """ss2dScanKernel<float, static_n, lanes, group, chunk> step by step, in float32: one loop iteration per
    thread block (b, channels d0..d0+group-1), thread (k, r, lane) vectorised as axes (K, group, lanes) with
    its states n = s * lanes + lane along the last axis, the chunks staged at seq_k(t), the per-lane sums and
    the direction-by-direction accumulation exactly as the kernel orders them."""
    f32 = np.float32
    batch, channels, height, width = x.shape
    length, d_state, dt_rank = height * width, A.shape[1], dt_w.shape[2]
    states = -(-(static_n or MAX_D_STATE) // lanes)
    n_of = np.arange(states)[None, :] * lanes + np.arange(lanes)[:, None]  # (lanes, states)
    state_ok = n_of < d_state
    n_safe = np.where(state_ok, n_of, 0)
    rows = x_dbl.astype(f32).reshape(batch, K, dt_rank + 2 * d_state, length)
    u_all = x.astype(f32).reshape(batch, channels, length)
    y = np.zeros((batch, length, channels), f32)
    for b in range(batch):
        for d0 in range(0, channels, group):
            n_valid = min(group, channels - d0)
            A2 = np.zeros((K, group, lanes, states), f32)
            for k in range(K):
                A2[k, :n_valid] = A[k * channels + d0:k * channels + d0 + n_valid][:, n_safe] * f32(1.4426950408889634)
            A2 = np.where(state_ok, A2, f32(0))
            h = np.zeros_like(A2)
            ds_sum = np.zeros(group, f32)
            for k in range(K):
                ds_sum[:n_valid] += Ds[k * channels + d0:k * channels + d0 + n_valid]
            acc = np.zeros((group, length), f32)
            for t0 in range(0, length, chunk):
                t = t0 + np.arange(chunk)
                inside = t < length
                # 1. gather at seq_k(t); padding is 0
                u = np.zeros((K, group, chunk), f32)
                staged = np.zeros((K, dt_rank + 2 * d_state, chunk), f32)
                for k in range(K):
                    pos = scan_position(k, t[inside], height, width)
                    u[k, :n_valid, inside] = u_all[b, d0:d0 + n_valid][:, pos].T
                    staged[k][:, inside] = rows[b, k][:, pos]
                dt_low, B, C = np.split(staged, [dt_rank, dt_rank + d_state], axis=1)
                # 2. delta per (k, channel, t)
                delta = np.zeros((K, group, chunk), f32)
                for k in range(K):
                    for r in range(n_valid):
                        v = np.full(chunk, dt_b[k, d0 + r], f32)
                        for j in range(dt_rank):
                            v += dt_w[k, d0 + r, j] * dt_low[k, j]
                        if delta_softplus:
                            v = np.where(v <= scan_node.SOFTPLUS_THRESHOLD, np.log1p(np.exp(v)), v).astype(f32)
                        delta[k, r] = np.where(inside, v, f32(0))
                # 3. each thread's states through the chunk
                y_sum = np.zeros((K, group, lanes, chunk), f32)
                for i in range(chunk):
                    dt = delta[:, :, i, None, None]
                    du = (delta[:, :, i] * u[:, :, i])[:, :, None, None]
                    b_n = B[:, n_safe, i][:, None]  # (K, 1, lanes, states)
                    c_n = C[:, n_safe, i][:, None]
                    h = np.where(state_ok, np.exp2(dt * A2) * h + du * b_n, h)
                    for s in range(states):
                        y_sum[..., i] += np.where(state_ok[:, s], c_n[..., s] * h[..., s], f32(0))
                # 4. lane sums, added one direction at a time; Ds * x with direction 0
                for k in range(K):
                    v = np.zeros((group, chunk), f32)
                    for lane in range(lanes):
                        v += y_sum[k, :, lane]
                    if k == 0:
                        v += ds_sum[:, None] * u[0]
                    pos = scan_position(k, t[inside], height, width)
                    acc[:n_valid, pos] += v[:n_valid][:, inside]
            y[b, :, d0:d0 + n_valid] = acc[:n_valid].T
    return y.reshape(batch, height, width, channels)


def test_dispatch_launches_the_shapes_the_transliteration_covers():
    assert len(SHIPPED_SHAPES) >= 4, "kShapes not found in the kernel source"
    assert any(n == 16 for n, *_ in SHIPPED_SHAPES) and any(n == 0 for n, *_ in SHIPPED_SHAPES)
    for static_n, lanes, group, chunk in SHIPPED_SHAPES:
        assert 32 % lanes == 0 and chunk % 4 == 0
        assert static_n == 0 or static_n % lanes == 0  # the static path has no state masking to lean on


@pytest.mark.parametrize("shape", SHIPPED_SHAPES, ids=lambda s: "N{}-lanes{}-G{}-chunk{}".format(*s))
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
def test_kernel_indexing_matches_the_float64_reference(shape, softplus):
    static_n, lanes, group, chunk = shape
    # H != W so rows and columns cannot be confused, L spanning three chunks with a partial last one,
    # channels not a multiple of the block's group.
    d_state = static_n or 5
    arrays = make_ss2d_inputs(batch=2, channels=group + 3, height=7, width=11, dt_rank=3, d_state=d_state, seed=7)
    x, x_dbl, dt_w, dt_b, A, Ds = arrays
    if not softplus:  # without softplus the caller keeps delta positive (else exp(delta * A) overflows)
        dt_b = np.log1p(np.exp(dt_b)).astype(np.float32)
        dt_w = dt_w * np.float32(0.01)
    arrays = (x, x_dbl, dt_w, dt_b, A, Ds)
    y = kernel_in_numpy(*arrays, softplus, static_n=static_n, lanes=lanes, group=group, chunk=chunk)
    ref = ss2d_reference64(*arrays, delta_softplus=softplus)
    assert y.shape == ref.shape
    assert relative_error(y, ref) <= 1e-5


def test_generic_shape_masks_states_beyond_d_state():
    # d_state = 1 leaves all but one state of every thread idle in the generic instantiation.
    static_n, lanes, group, chunk = next(s for s in SHIPPED_SHAPES if s[0] == 0)
    arrays = make_ss2d_inputs(batch=1, channels=2, height=3, width=2, dt_rank=1, d_state=1, seed=3)
    y = kernel_in_numpy(*arrays, True, static_n=static_n, lanes=lanes, group=group, chunk=chunk)
    assert relative_error(y, ss2d_reference64(*arrays)) <= 1e-5


# --- the CUDA launcher ---------------------------------------------------------------------------------


@requires_nvcc
def test_launcher_exports_only_the_c_abi_and_links_cudart_statically(launcher):
    exported = {s for s in _exported_symbols(launcher) if not s.startswith("_")}
    assert set(C_SYMBOLS) <= exported
    assert not [s for s in exported if "selectiveScan" in s or "medmamba" in s and s not in C_SYMBOLS]
    assert not [lib for lib in _needed_libraries(launcher) if "cudart" in lib or lib.startswith("libcuda.")]


@requires_nvcc
def test_block_shape_sweep_builds_and_asks_which_shapes_fit_the_gpu(tmp_path):
    """tune_block_shapes.py skips a shape whose staged rows are over the GPU's shared memory per block (Orin's 163
    KiB, a T4's 64 KiB) instead of dying on its launch's refusal; two of its variants compiled as the sweep builds
    them (all 96 take a minute)."""
    sys.path.insert(0, str(SRC))  # the sweep imports gpu_check, beside it
    try:
        sweep = _load("tune_block_shapes", SRC / "tune_block_shapes.py")
    finally:
        sys.path.remove(str(SRC))
    source = tmp_path / "sweep.cu"
    source.write_text(sweep.sweep_source(SRC / "selective_scan_kernel.cu", [("float", 16, 8, 64), ("__half", 4, 1, 32)]))
    library = tmp_path / "libsweep.so"
    subprocess.run(build.launcher_nvcc_command(NVCC, TEST_ARCH, library, source), check=True, capture_output=True)
    assert {"medmamba_tune_launch", "medmamba_tune_shared_bytes"} <= _exported_symbols(library)


@requires_nvcc
def test_launcher_loads_without_a_gpu_and_rejects_bad_arguments_before_any_cuda_call(launcher):
    lib = ctypes.CDLL(str(launcher))
    header = (SRC / "selective_scan.h").read_text()
    abi = int(re.search(r"#define MEDMAMBA_SELECTIVE_SCAN_ABI_VERSION (\d+)", header).group(1))
    assert lib.medmamba_ss2d_scan_abi_version() == abi
    lib.medmamba_ss2d_scan_error_string.restype = ctypes.c_char_p
    assert lib.medmamba_ss2d_scan_error_string(CUDA_ERROR_INVALID_VALUE) == b"invalid argument"

    workspace_size = lib.medmamba_ss2d_scan_workspace_size
    workspace_size.restype = ctypes.c_size_t
    assert workspace_size(8, 96, 56, 56) == 4 * 8 * 96 * 56 * 56  # float32 accumulators of y
    assert workspace_size(-1, 96, 56, 56) == 0 and workspace_size(1, 0, 56, 56) == 0

    forward = lib.medmamba_ss2d_scan_forward
    forward.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_size_t] + [ctypes.c_int] * 8 + [ctypes.c_void_p]
    fake = [1] * 7  # never dereferenced: validation fails first
    good = dict(batch=1, channels=96, height=56, width=56, dt_rank=3, d_state=16, delta_softplus=1, dtype=0)

    def call(pointers=fake, **changes):
        args = {**good, **changes}
        return forward(*pointers, None, 0, *args.values(), None)

    assert call(pointers=[None] * 7) == CUDA_ERROR_INVALID_VALUE
    assert call(pointers=[1] * 6 + [None]) == CUDA_ERROR_INVALID_VALUE  # y
    assert call(d_state=65) == CUDA_ERROR_INVALID_VALUE
    assert call(d_state=0) == CUDA_ERROR_INVALID_VALUE
    assert call(dt_rank=0) == CUDA_ERROR_INVALID_VALUE
    assert call(dtype=2) == CUDA_ERROR_INVALID_VALUE
    assert call(batch=65536) == CUDA_ERROR_INVALID_VALUE
    assert call(channels=0) == CUDA_ERROR_INVALID_VALUE
    assert call(height=-1) == CUDA_ERROR_INVALID_VALUE
    assert call(height=65536, width=65536) == CUDA_ERROR_INVALID_VALUE  # positions must fit in int32
    assert call(dt_rank=2**31 - 11) == CUDA_ERROR_INVALID_VALUE  # 4 * (dt_rank + 2 * d_state) in 64 bits
    assert call(batch=0) == 0 and call(height=0) == 0  # empty: nothing to launch


def _cuda_include() -> Path:
    include = Path(NVCC).resolve().parent.parent / "include"
    return include if (include / "cuda_runtime_api.h").is_file() else Path("/usr/local/cuda/include")


# --- the TensorRT plugin ---------------------------------------------------------------------------------


@requires_nvcc
@requires_tensorrt
def test_plugin_compiles_warning_free_and_links_without_libnvinfer(launcher, tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++") or pytest.skip("no C++ compiler")
    cuda_include = _cuda_include()
    obj = tmp_path / "plugin.o"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
         "-I", str(SRC), "-isystem", str(TRT_INCLUDE), "-isystem", str(cuda_include),
         "-c", str(SRC / "selective_scan_plugin.cpp"), "-o", str(obj)],
        check=True, capture_output=True, text=True,
    )
    plugin = tmp_path / build.PLUGIN_LIBRARY
    # --no-undefined: everything resolves against the launcher; TensorRT is only reached through vtables.
    subprocess.run(
        [cxx, "-shared", str(obj), str(launcher), "-Wl,--no-undefined", "-o", str(plugin)],
        check=True, capture_output=True, text=True,
    )
    assert {"getCreators", "setLoggerFinder"} <= _exported_symbols(plugin)
    assert not [lib for lib in _needed_libraries(plugin) if "nvinfer" in lib]
    assert "getPluginRegistry" not in _undefined_symbols(obj)  # registered by loadLibrary, never at load


SHAPE_CHECK_HARNESS = r"""
#include "selective_scan_plugin.cpp"
#include <cstdio>
#include <initializer_list>

nvinfer1::Dims dims(std::initializer_list<int64_t> values)
{
    nvinfer1::Dims result{};
    for (int64_t v : values)
        result.d[result.nbDims++] = v;
    return result;
}

int main()
{
    // x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds for D = 40, 7 x 9, R = 3, N = 16; -1: not known yet
    int64_t const cases[][2] = {{2, 2}, {-1, -1}, {2, -1}, {2, 1}};
    for (auto const& batches : cases)
    {
        nvinfer1::Dims const shapes[] = {dims({batches[0], 40, 7, 9}), dims({batches[1], 140, 63}), dims({4, 40, 3}),
            dims({4, 40}), dims({160, 16}), dims({160})};
        std::printf("%s|\n", medmamba_edge::checkShapes(shapes).c_str());
    }
}
"""


@requires_nvcc
@requires_tensorrt
def test_plugin_shape_check_refuses_an_x_dbl_of_another_batch(launcher, tmp_path):
    """The kernel reads x_dbl for every batch element of x; a smaller x_dbl would be read past its end."""
    cxx = shutil.which("g++") or shutil.which("c++") or pytest.skip("no C++ compiler")
    (tmp_path / "harness.cpp").write_text(SHAPE_CHECK_HARNESS)
    cuda_include = _cuda_include()
    subprocess.run([cxx, "-std=c++17", "-I", str(SRC), "-isystem", str(TRT_INCLUDE), "-isystem", str(cuda_include),
                    str(tmp_path / "harness.cpp"), str(launcher), f"-Wl,-rpath,{launcher.parent}",
                    "-o", str(tmp_path / "harness")], check=True, capture_output=True, text=True)
    lines = subprocess.run([str(tmp_path / "harness")], check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines == ["|", "|", "|", "x_dbl.shape[0] must be x's batch|"]


@requires_tensorrt
def test_autoload_build_registers_its_creator_when_loaded(tmp_path):
    """The build for loaders that only dlopen (Triton's `plugins=`, LD_PRELOAD, DeepStream) compiles warning-free
    and calls libnvinfer's getPluginRegistry from a static initializer; linking and running it need libnvinfer."""
    cxx = shutil.which("g++") or shutil.which("c++") or pytest.skip("no C++ compiler")
    cuda_include = Path(NVCC or "/usr/local/cuda/bin/nvcc").resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        cuda_include = Path("/usr/local/cuda/include")
    obj = tmp_path / "plugin_autoload.o"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
         "-DMEDMAMBA_REGISTER_AT_LOAD", "-I", str(SRC), "-isystem", str(TRT_INCLUDE), "-isystem", str(cuda_include),
         "-c", str(SRC / "selective_scan_plugin.cpp"), "-o", str(obj)],
        check=True, capture_output=True, text=True,
    )
    # getLogger: its errors reach libnvinfer's logger, as no dlopen-only loader calls setLoggerFinder.
    assert {"getPluginRegistry", "getLogger"} <= set(_undefined_symbols(obj))
    sections = subprocess.run(["objdump", "-h", str(obj)], capture_output=True, text=True, check=True).stdout
    assert ".init_array" in sections  # the registrar runs when the library is loaded


def test_plugin_identity_matches_the_onnx_node_contract():
    header = (SRC / "selective_scan_plugin.h").read_text()
    identity = dict(re.findall(r'constexpr char (kPlugin\w+)\[\] = "([^"]*)";', header))
    assert identity == {
        "kPluginName": scan_node.OP_TYPE,
        "kPluginVersion": scan_node.PLUGIN_VERSION,
        "kPluginNamespace": scan_node.PLUGIN_NAMESPACE,
    }
    enum = re.search(r"enum Input : int32_t\s*\{(.*?)\};", header, re.S).group(1)
    names = [n.strip().split(" ")[0] for n in enum.split(",") if n.strip()]
    # One enumerator per node input, in node order (kX = x, kXDbl = x_dbl, ...), then the count.
    assert [n.lower() for n in names[:-1]] == ["k" + i.replace("_", "").lower() for i in scan_node.INPUT_NAMES]
    assert names[-1] == "kNbInputs"


def test_plugin_fields_are_the_node_attributes_tensorrt_passes_through():
    source = (SRC / "selective_scan_plugin.cpp").read_text()
    table = re.search(r"constexpr FieldSpec kFields\[\] = \{(.*?)\n\};", source, re.S).group(1)
    fields = re.findall(r'\{"(\w+)", PluginFieldType::kINT32,', table)
    assert len(fields) == len(set(fields))
    # The ONNX parser consumes plugin_version / plugin_namespace to find the creator; the rest are fields.
    assert set(fields) == set(scan_node.FIELD_ATTRIBUTES)
    assert set(scan_node.node_attributes(True)) == {*scan_node.FIELD_ATTRIBUTES, "plugin_version", "plugin_namespace"}


# --- CMake and medmamba_edge.runtime.backends.tensorrt.plugin -----------------------------------------------------------------


def build_launcher(build_dir, cuda_arch=None, progress=None) -> Path:
    """plugin.py's CMake build of the launcher target alone: it needs no TensorRT, so the build's error lines are
    tested without it. Tools build the launcher with launcher_nvcc_command (plugins/selective_scan/gpu_check.py)."""
    return build._cmake_build("medmamba_scan_cuda", LAUNCHER_LIBRARY, build_dir=build_dir, cuda_arch=cuda_arch,
                              tensorrt_root=None, jobs=None, progress=progress)


@pytest.fixture(scope="module")
def cmake_build_dir(tmp_path_factory) -> Path:
    if NVCC is None or CMAKE is None:
        pytest.skip("nvcc and cmake needed")
    return tmp_path_factory.mktemp("cmake")


@requires_nvcc
@requires_cmake
def test_build_launcher_with_cmake(cmake_build_dir):
    lines = []
    library = build_launcher(build_dir=cmake_build_dir, cuda_arch=f"sm_{TEST_ARCH}", progress=lines.append)
    assert library == cmake_build_dir / LAUNCHER_LIBRARY and library.is_file()
    assert any(f"architectures {TEST_ARCH}" in line for line in lines)
    assert set(C_SYMBOLS) <= _exported_symbols(library)
    assert (cmake_build_dir / build.BUILD_LOG).is_file()


@requires_nvcc
@requires_cmake
@requires_tensorrt
def test_build_plugin_with_cmake_reuses_the_kernel_objects(cmake_build_dir, monkeypatch):
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    root = TRT_INCLUDE.parent if TRT_INCLUDE.name == "include" else TRT_INCLUDE
    library = build.build_plugin(build_dir=cmake_build_dir, cuda_arch=TEST_ARCH, tensorrt_root=root)
    assert library.name == build.PLUGIN_LIBRARY and library.is_file()
    assert {"getCreators", "setLoggerFinder", "medmambaTensorRTMajor", *C_SYMBOLS} <= _exported_symbols(library)
    headers_major = int(re.search(r"define (?:NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE) (\d+)",
                                  (TRT_INCLUDE / "NvInferVersion.h").read_text()).group(1))
    try:
        assert compat.built_for_tensorrt_major(library) == headers_major
    except OSError as exc:  # its CUDA runtime is not on this machine's loader path
        pytest.skip(f"the plugin library does not load here ({exc})")


def test_the_tensorrt_major_a_library_was_built_for_is_read_from_it(tmp_path):
    # A plugin's calls into TensorRT's logger follow its headers' class layouts, which changed in TensorRT 11:
    # load_plugin_library refuses a library built for another major version, by what this reads.
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "says.c").write_text("int medmambaTensorRTMajor(void) { return 11; }\n")
    (tmp_path / "silent.c").write_text("int other(void) { return 0; }\n")
    for name in ("says", "silent"):
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / f"{name}.so"), str(tmp_path / f"{name}.c")],
                       check=True)
    assert compat.built_for_tensorrt_major(tmp_path / "says.so") == 11
    assert compat.built_for_tensorrt_major(tmp_path / "silent.so") is None  # built before it said: TensorRT's load decides
    assert compat.built_for_tensorrt_major(tmp_path / "missing.so") is None


@requires_nvcc
@requires_cmake
def test_default_cuda_architectures_are_accepted_by_this_nvcc(tmp_path):
    result = subprocess.run([CMAKE, "-S", str(SRC), "-B", str(tmp_path), f"-DCMAKE_CUDA_COMPILER={NVCC}"],
                            capture_output=True, text=True, check=True)
    match = re.search(r"medmamba: CUDA ([\d.]+), architectures (\S+)", result.stdout)
    version, archs = tuple(int(x) for x in match.group(1).split(".")[:2]), match.group(2).split(";")
    numbers = [a.split("-")[0] for a in archs]
    assert {"75", "80", "86", "87"} <= set(numbers)
    assert ("110" in numbers) == (version >= (13, 0))
    assert archs[-1].isdigit() and all(a.endswith("-real") for a in archs[:-1])  # PTX for the newest only
    listed = subprocess.run([str(NVCC), "--list-gpu-arch"], capture_output=True, text=True)
    if listed.returncode == 0:
        supported = {a.split("_")[1] for a in listed.stdout.split()}
        assert set(numbers) <= supported


@requires_nvcc
@requires_cmake
def test_a_build_without_cuda_arch_is_every_gpu_again_after_one_with_it(tmp_path):
    # One build folder serves every run (the default one every machine of a shared home): an earlier --cuda-arch
    # must not stay cached as the architectures of a later build that names none.
    def configured_archs(arch):
        command = build.configure_command(CMAKE, tmp_path, NVCC, arch, build.PLUGIN_TARGET, None)
        command = [part for part in command if "TENSORRT" not in part] + ["-DMEDMAMBA_REQUIRE_TENSORRT=OFF"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return re.search(r"medmamba: CUDA [\d.]+, architectures (\S+)", result.stdout).group(1)

    assert configured_archs("87") == "87"
    assert "80-real" in configured_archs(None).split(";")


@requires_nvcc
@requires_cmake
def test_an_arch_this_nvcc_lacks_is_named_in_the_error_line(tmp_path):
    # nvcc says why in a "fatal" line; CMake's and make's "error" lines around it only say that a step failed.
    build_launcher(build_dir=tmp_path, cuda_arch="75")
    with pytest.raises(build.PluginBuildError, match="Unsupported gpu architecture 'compute_99'"):
        build_launcher(build_dir=tmp_path, cuda_arch="99")  # configured: the build step fails
    with pytest.raises(build.PluginBuildError, match="Unsupported gpu architecture 'compute_99'"):
        build_launcher(build_dir=tmp_path / "fresh", cuda_arch="99")


@requires_nvcc
@requires_cmake
def test_native_arch_without_a_gpu_or_before_cmake_3_24_says_why(tmp_path):
    """The reason was lost: CMake 3.24+ without a GPU gave its header line alone ("CMake Error in CMakeLists.txt:"),
    and CMake 3.18-3.23 passed 'native' on to nvcc as "compute_," (nvcc: "Unsupported gpu architecture 'compute_'")."""
    version = re.search(r"version (\d+)\.(\d+)", subprocess.run([CMAKE, "--version"], capture_output=True,
                                                                text=True).stdout)
    try:
        build_launcher(build_dir=tmp_path, cuda_arch="native")
    except build.PluginBuildError as exc:
        message = str(exc)
    else:
        pytest.skip("a GPU is visible here: a native build succeeds")
    expected = ("CUDA architecture 'native' needs CMake >= 3.24" if (int(version[1]), int(version[2])) < (3, 24)
                else 'CMake Error in CMakeLists.txt: CUDA_ARCHITECTURES is set to "native", but no GPU was detected.')
    assert expected in message and "\n" not in message, message


@requires_nvcc
@requires_cmake
def test_build_plugin_without_tensorrt_is_one_clear_line(tmp_path, monkeypatch):
    if _tensorrt_include(use_env=False) is not None:
        pytest.skip("TensorRT headers are installed system-wide here")
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    with pytest.raises(build.PluginBuildError) as info:
        build.build_plugin(build_dir=tmp_path / "b", cuda_arch=TEST_ARCH, tensorrt_root=tmp_path / "no-trt")
    message = str(info.value)
    assert "TensorRT" in message and f"TENSORRT_ROOT={tmp_path / 'no-trt'}" in message and "\n" not in message


def test_build_plugin_on_a_machine_without_tensorrt_says_so_before_cmake_or_nvcc(tmp_path, monkeypatch):
    if build.tensorrt_installed():
        pytest.skip("TensorRT is installed here")
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no nvcc: still TensorRT is what the user hears first
    monkeypatch.setenv("CUDACXX", str(tmp_path / "missing-nvcc"))
    with pytest.raises(build.PluginBuildError) as info:
        build.build_plugin(build_dir=tmp_path / "b")
    message = str(info.value)
    assert message.startswith("TensorRT is not installed") and "\n" not in message
    for needed in ("tensorrt Python package >= 10.3", "cuda-python", "libnvinfer-dev", "nvcc", "CMake >= 3.18"):
        assert needed in message, needed
    assert not (tmp_path / "b").exists()


def test_a_bad_cuda_arch_is_named_before_anything_else(tmp_path, monkeypatch):
    """It was checked after the build folder was made, and never where TensorRT is missing."""
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    with pytest.raises(build.PluginBuildError, match="bogus"):
        build.build_plugin(build_dir=tmp_path / "b", cuda_arch="bogus")
    assert not (tmp_path / "b").exists()


@requires_cmake
def test_a_build_folder_that_cannot_be_one_is_one_line(tmp_path):
    if NVCC is None:
        pytest.skip("nvcc needed: the folder is made after the tools are found")
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(build.PluginBuildError, match=r"afile: cannot use it as the build folder \(File exists\)"):
        build_launcher(build_dir=tmp_path / "afile")


def test_build_without_cmake_or_nvcc_says_which(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.PluginBuildError, match="cmake not found"):
        build.build_plugin(build_dir=tmp_path / "b", tensorrt_root=tmp_path)
    fake_cmake = tmp_path / "cmake"
    fake_cmake.write_text("#!/bin/sh\nexit 1\n")
    fake_cmake.chmod(0o755)
    monkeypatch.setenv("CUDACXX", str(tmp_path / "missing-nvcc"))
    with pytest.raises(build.PluginBuildError, match="nvcc not found"):
        build_launcher(build_dir=tmp_path / "b")


def test_find_nvcc_order(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("")
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert build.find_nvcc() == home / "bin" / "nvcc"
    monkeypatch.setenv("CUDACXX", str(tmp_path / "elsewhere"))
    assert build.find_nvcc() is None  # an explicit CUDACXX is not second-guessed
    monkeypatch.delenv("CUDACXX")
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(build, "CUDA_HOME_CANDIDATES", (str(home),))
    assert build.find_nvcc() == home / "bin" / "nvcc"
    monkeypatch.setattr(build, "CUDA_HOME_CANDIDATES", ())
    assert build.find_nvcc() is None


def test_normalize_cuda_arch():
    assert build.normalize_cuda_arch("87") == "87"
    assert build.normalize_cuda_arch(87) == "87"
    assert build.normalize_cuda_arch("8.7") == "87"
    assert build.normalize_cuda_arch(["sm_87", "9.0", 110]) == "87;90;110"
    assert build.normalize_cuda_arch("87, 90;native") == "87;90;native"
    assert build.normalize_cuda_arch("90-real") == "90-real"
    with pytest.raises(build.PluginBuildError):
        build.normalize_cuda_arch("turing")
    with pytest.raises(build.PluginBuildError):
        build.normalize_cuda_arch([])


# --- finding a built library -------------------------------------------------------------------------------


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    for var in (build.PLUGIN_ENV, CACHE_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # The package-directory fallback, pointed away from the real checkout.
    monkeypatch.setattr(build, "PLUGINS_DIR", tmp_path / "pkg")
    return tmp_path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    return path


def test_find_plugin_library_search_order(clean_env, monkeypatch):
    tmp = clean_env
    packaged = _touch(tmp / "pkg" / build.PLUGIN_LIBRARY)
    assert build.find_plugin_library() == packaged

    home_default = tmp / "home" / ".cache" / "medmamba-edge" / "plugins"
    assert build.default_build_dir().parent == home_default
    built = _touch(build.default_build_dir() / build.PLUGIN_LIBRARY)
    assert build.find_plugin_library() == built  # the build directory beats the packaged copy

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
    assert build.default_build_dir().parent == tmp / "xdg" / "medmamba-edge" / "plugins"
    monkeypatch.setenv(CACHE_ENV, str(tmp / "cache"))
    assert build.default_build_dir().parent == tmp / "cache" / "plugins"
    cached = _touch(build.default_build_dir() / build.PLUGIN_LIBRARY)
    assert build.find_plugin_library() == cached

    explicit = _touch(tmp / "explicit" / "custom.so")
    monkeypatch.setenv(build.PLUGIN_ENV, str(explicit))
    assert build.find_plugin_library() == explicit  # the environment variable beats everything


def test_find_plugin_library_errors_say_what_to_do(clean_env, monkeypatch):
    with pytest.raises(build.PluginNotFoundError) as info:
        build.find_plugin_library()
    message = str(info.value)
    assert "medmamba-edge build-plugin" in message and build.PLUGIN_ENV in message and "\n" not in message
    assert isinstance(info.value, FileNotFoundError)

    _touch(build.default_build_dir() / build.PLUGIN_LIBRARY)
    monkeypatch.setenv(build.PLUGIN_ENV, str(clean_env / "missing.so"))
    with pytest.raises(build.PluginNotFoundError, match=build.PLUGIN_ENV):
        build.find_plugin_library()  # a wrong explicit path is an error, not a silent fallback


def test_gpu_check_cases_have_finite_reference():
    # Every case the GPU check compares must have a finite reference (a case whose inputs overflow would
    # "pass" or fail on both sides for the wrong reason).
    gpu_check = _load("_medmamba_gpu_check", SRC / "gpu_check.py")
    for name, batch, channels, height, width, dt_rank, d_state, softplus in gpu_check.cases():
        arrays = gpu_check.make_arrays(batch, channels, height, width, dt_rank, d_state, softplus)
        if batch * channels * height * width * d_state <= 2_000_000:  # the float64 reference is a Python loop
            assert np.isfinite(ss2d_reference64(*arrays, delta_softplus=softplus)).all(), name


@pytest.mark.parametrize("script", ["gpu_check.py", "tune_block_shapes.py"])
def test_gpu_scripts_under_a_cpu_only_pytorch_say_so(script):
    """`make setup` installs PyTorch's CPU build (6966d59), on a GPU machine too, where both scripts then said 'no
    CUDA device visible to PyTorch', as if the machine had no GPU."""
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip(f"PyTorch {torch.__version__} is a CUDA build")
    result = subprocess.run([sys.executable, str(SRC / script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == "", result
    assert result.stderr == (f"PyTorch {torch.__version__} is a CPU-only build (what `make setup` installs by "
                             f"default); this needs a CUDA build, e.g. in a new venv: "
                             f"TORCH_INDEX=https://download.pytorch.org/whl/cu130 make setup\n"), result.stderr


def test_gpu_check_reports_a_failing_case_and_goes_on(monkeypatch, capsys):
    """On a GPU machine lent for minutes, one case's exception (no plan, a launch error, a failed graph capture) is an
    ERROR row and in the FAIL summary, not a traceback that loses every later row and the timing table. Run on the CPU: CUDA
    calls replaced, the kernel stood in for by ss2d_scan_ref."""
    import argparse

    import torch

    gpu_check = _load("_medmamba_gpu_check_errors", SRC / "gpu_check.py")
    cases = [("stage 1 tiny", 1, 8, 3, 4, 2, 16, True), ("no plan", 1, 6, 2, 2, 1, 16, True),
             ("launch error", 1, 4, 2, 3, 1, 5, True), ("fine", 2, 3, 2, 2, 1, 16, False)]

    class FakeScan:
        def plan(self, batch, channels, height, width, dt_rank, d_state):
            if channels == 6:
                raise RuntimeError("no plan: invalid argument")
            return gpu_check.ScanPlan(0, 2, 32, 1024, int(channels != 3))

        def __call__(self, *inputs, delta_softplus=True, out=None):
            if inputs[0].shape[1] == 4 and inputs[0].dtype == torch.float16:
                raise RuntimeError("scan failed: an illegal memory access | was encountered")
            if out is not None:
                raise RuntimeError("operation not permitted when stream is capturing")
            return gpu_check.ss2d_scan_ref(*inputs, delta_softplus=delta_softplus)

    monkeypatch.setattr(gpu_check, "cases", lambda: cases)
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(gpu_check, "cuda_time", lambda fn, iters, warmup=2, graph=False: (fn(), 1e-3)[1])
    monkeypatch.setattr(gpu_check, "to_cuda", lambda arrays, dtype: tuple(
        torch.from_numpy(a).to(dtype if i < 2 else torch.float32) for i, a in enumerate(arrays)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    args = argparse.Namespace(kernel_iters=1, ref_iters=1, skip_model=True)
    assert gpu_check.run_checks(FakeScan(), args) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()

    def rows(name, dtype):
        return [line for line in lines if line.startswith(f"| {name} | ") and f" | {dtype} | " in line]

    assert [row.endswith("| PASS |") for row in rows("fine", "float32") + rows("fine", "float16")] == [True, True]
    assert [row.endswith("| PASS |") for row in rows("launch error", "float32")] == [True]
    assert [row.endswith("illegal memory access / was encountered | | | ERROR |")
            for row in rows("launch error", "float16")] == [True]
    # parity passed, then the timing's graph capture failed: a PASS row and an ERROR row
    assert [row[-7:] for row in rows("stage 1 tiny", "float32")] == [" PASS |", "ERROR |"]
    assert "| no plan | 1 | 6 | 2 x 2 | 1 | 16 | 1 | no plan: invalid argument | | | | | ERROR |" in lines
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("**PARITY FAIL**") and "launch error float16 (RuntimeError)" in summary
    assert "no plan (no plan: invalid argument)" in summary and "stage 1 tiny float32 (RuntimeError)" in summary


# In a child Python that finds medmamba_edge only on sys.path outside site-packages (no editable finder, no wheel):
# what a bare copy of the checkout on a GPU machine is, with no network for pip's build backend.
_BARE_CHECKOUT_IMPORT = """
import importlib.machinery, runpy, sys
class OnlyTheCheckout:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] != "medmamba_edge":
            return None
        if path is None:
            path = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return spec
sys.meta_path.insert(0, OnlyTheCheckout)
module = runpy.run_path(sys.argv[1], run_name="gpu_check_imported")
import medmamba_edge.runtime, medmamba_edge.scan
print(medmamba_edge.runtime.__file__, medmamba_edge.scan.__file__, module["reference"].__file__,
      module["find_nvcc"].__module__)
"""


def test_gpu_check_imports_from_a_bare_checkout(tmp_path):
    """gpu_check.py (and tune_block_shapes.py, which imports it) runs from a checkout where medmamba_edge is not
    installed: runtime/ is medmamba_edge.runtime only through pyproject.toml's package-dir, so the script maps this
    checkout's folders itself. Before, it died with ModuleNotFoundError: No module named 'medmamba_edge' (or
    'medmamba_edge.runtime' with the checkout on sys.path)."""
    result = subprocess.run([sys.executable, "-c", _BARE_CHECKOUT_IMPORT, str(SRC / "gpu_check.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runtime, scan, reference, plugin_module = result.stdout.split()
    assert Path(runtime) == REPO / "runtime" / "__init__.py"
    assert Path(scan) == REPO / "medmamba_edge" / "scan.py"
    assert Path(reference) == REPO / "tests" / "ss2d_reference.py"
    assert plugin_module == "medmamba_edge.runtime.backends.tensorrt.plugin"

# --- the launch plan, for GPUs this machine does not have ------------------------------------------------

# (multiprocessors, opt-in shared memory per block in bytes), from NVIDIA's specifications and the CUDA C++
# programming guide's table of compute capabilities.
GPUS = {
    "T4 (sm_75)": (40, 64 * 1024),
    "A100 (sm_80)": (108, 163 * 1024),
    "L4 (sm_89)": (58, 99 * 1024),
    "H100 SXM (sm_90)": (132, 227 * 1024),
    "Jetson AGX Orin (sm_87)": (16, 163 * 1024),
    "Jetson Orin Nano (sm_87)": (8, 163 * 1024),
}


def _planner(launcher):
    gpu_check = _load("_medmamba_gpu_check", SRC / "gpu_check.py")
    lib = ctypes.CDLL(str(launcher))
    lib.medmamba_ss2d_scan_plan.argtypes = [ctypes.c_int] * 8 + [ctypes.POINTER(gpu_check.ScanPlan)]

    def plan(gpu, batch, channels, height, width, dt_rank, d_state):
        result = gpu_check.ScanPlan()
        status = lib.medmamba_ss2d_scan_plan(batch, channels, height, width, dt_rank, d_state, *GPUS[gpu],
                                             ctypes.byref(result))
        return status, result

    return gpu_check, plan


@requires_nvcc
def test_kernels_use_no_static_shared_memory(launcher_build):
    """The plan weighs a launch's dynamic shared memory against the device's opt-in (and 48 KiB without one);
    a static array beside it would push a shape that just fits past the limit, and the launch would fail."""
    log = launcher_build[1]
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    assert len(kernels) == 2 * len(SHIPPED_SHAPES)  # float32 and float16 I/O
    assert not re.findall(r"\b[1-9]\d* bytes smem", log)


@requires_nvcc
@pytest.mark.parametrize("gpu", GPUS)
def test_every_d_state_the_contract_allows_gets_a_plan(launcher, gpu):
    """A large d_state stages fewer steps per chunk where its B/C rows would not fit (64 KiB on a T4 once
    refused d_state 56..64)."""
    _, plan = _planner(launcher)
    for d_state in range(1, MAX_D_STATE + 1):
        for dt_rank in (1, 8, 48):
            status, result = plan(gpu, 1, 12, 31, 33, dt_rank, d_state)
            assert status == 0, (d_state, dt_rank)
            assert result.shared_bytes <= GPUS[gpu][1] and result.chunk % 4 == 0
    sizes = {plan(gpu, 1, 12, 31, 33, 1, n)[1].chunk for n in (16, 64)}
    assert gpu != "T4 (sm_75)" or sizes == {32, 16}


@requires_nvcc
@pytest.mark.parametrize("gpu", GPUS)
def test_gpu_check_reaches_every_code_path_on_every_gpu(launcher, gpu):
    gpu_check, plan = _planner(launcher)
    planned = [(case, plan(gpu, *case[1:7])[1]) for case in gpu_check.cases()]
    assert gpu_check.missing_paths(planned) == []
    stages = [(case, result) for case, result in planned if case[0].startswith("stage")]
    assert {"partial channel blocks", "generic d_state"} <= set(gpu_check.missing_paths(stages))  # it would notice
