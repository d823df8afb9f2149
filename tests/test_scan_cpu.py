"""The compiled CPU scan (runtime/csrc/selective_scan_cpu.c via runtime/scan_cpu.py) must match the reference
scan. Its ONNX Runtime form, the custom-op library, is tests/test_ort_custom_ops.py's."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medmamba_edge.runtime import scan_cpu, scan_node
from medmamba_edge.scan import ss2d_scan, ss2d_scan_ref
from tests import hidden_avx512
from tests.ss2d_reference import make_ss2d_inputs, relative_error, ss2d_reference64

pytestmark = pytest.mark.skipif(not scan_cpu.available(), reason=scan_cpu.unavailable_reason() or "not built")

NAMES = scan_node.INPUT_NAMES
ROOT = Path(__file__).resolve().parents[1]


def assert_close(y, ref, tol=1e-5):
    """The node's bound: max error relative to the largest output, against float64."""
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    err = relative_error(y, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def check(shape, softplus=True, seed=0, **call):
    arrays = make_ss2d_inputs(*shape, seed=seed, softplus=softplus)
    y = scan_cpu.ss2d_scan(*arrays, delta_softplus=softplus, **call)
    assert_close(y, ss2d_reference64(*arrays, delta_softplus=softplus))


SHAPES = [
    # (batch, channels, height, width, dt_rank, d_state)
    pytest.param((1, 96, 28, 28, 3, 16), id="stage1-96ch"),  # MedMamba-T stage shapes (stage 1 at half size)
    pytest.param((1, 192, 28, 28, 6, 16), id="stage2-192ch"),
    pytest.param((2, 384, 14, 14, 12, 16), id="stage3-384ch-b2"),
    pytest.param((1, 768, 7, 7, 24, 16), id="stage4-768ch"),
    pytest.param((2, 37, 9, 4, 2, 16), id="odd-channels-H>W"),  # a partial channel block, column walks of 9
    pytest.param((1, 24, 5, 71, 3, 16), id="W71-partial-tiles"),
    pytest.param((2, 24, 7, 10, 3, 7), id="N7"),
    pytest.param((1, 32, 6, 5, 2, 64), id="N64"),
    pytest.param((3, 8, 1, 1, 1, 16), id="L1"),
    pytest.param((1, 16, 1, 17, 1, 1), id="H1-N1"),
    pytest.param((1, 16, 17, 1, 1, 4), id="W1"),
]


@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, softplus):
    check(shape, softplus, num_threads=2)


# Every compiled path (x86-64: AVX-512, AVX2, baseline) is checked on any CPU able to run it, so an
# AVX2-only machine still tests the baseline path and an AVX-512 one all three.
ALL_ISAS = ("avx512", "avx2", "baseline")


def require_isa(isa: str) -> None:
    if isa not in scan_cpu.compiled_isas():
        pytest.skip(f"this build ({platform.machine()}) has no {isa} path, only {', '.join(scan_cpu.compiled_isas())}")
    if not scan_cpu.cpu_supports(isa):
        pytest.skip(f"this CPU lacks {scan_cpu.ISA_REQUIREMENTS[isa]} for the {isa} path")


@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
@pytest.mark.parametrize("shape", [
    pytest.param((2, 384, 7, 7, 12, 16), id="stage-b2"),  # N = 16: the constant-trip-count copy
    pytest.param((1, 42, 9, 11, 3, 16), id="partial-block-partial-tile"),
    pytest.param((2, 24, 7, 10, 3, 7), id="N7"),  # the generic-N copy
])
@pytest.mark.parametrize("isa", ALL_ISAS)
def test_each_forced_path_matches_reference(isa, shape, softplus, monkeypatch):
    require_isa(isa)
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    assert scan_cpu.isa() == isa
    check(shape, softplus, num_threads=2)


@pytest.mark.parametrize("a_jitter", [1e-3, 0.0], ids=["trained-A", "A-exactly-linear"])
@pytest.mark.parametrize("shape", [
    pytest.param((1, 96, 28, 28, 3, 16), id="stage1-96ch"),
    pytest.param((2, 384, 14, 14, 12, 16), id="stage3-384ch-b2"),
    pytest.param((1, 42, 9, 11, 3, 16), id="partial-block-partial-tile"),
    pytest.param((2, 24, 7, 10, 3, 7), id="N7"),
    pytest.param((1, 32, 6, 5, 2, 64), id="N64"),  # more states than the chain takes
    pytest.param((3, 8, 1, 1, 1, 16), id="L1"),
])
@pytest.mark.parametrize("isa", ALL_ISAS)
def test_A_close_to_its_init_matches_reference(isa, shape, a_jitter, monkeypatch):
    """A as training leaves it, close to -(n + 1) per channel: where the AVX2 and AVX-512 paths scan by the power
    chain (one exp per step, its powers and a correction per state) in the tiles whose deltas keep the correction accurate. At
    stage 1 one delta of one block passes that bound (307 at stage 3), so both scans meet in one call there;
    exactly linear A needs no correction at all."""
    require_isa(isa)
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    arrays = make_ss2d_inputs(*shape, seed=0, a_jitter=a_jitter)
    y = scan_cpu.ss2d_scan(*arrays, num_threads=2)
    assert_close(y, ss2d_reference64(*arrays))


@pytest.mark.parametrize("isa", ALL_ISAS)
def test_slowly_decaying_states_match_reference(isa, monkeypatch):
    """delta |A| ~ 0.01-0.3 (delta ~ 0.7, A a fiftieth of its init): a state remembers up to ~100 steps, so a bias in
    the exp2 near 2^0 adds up over them. The degree-4 fit with p(0) = 1 - 7e-7 put the AVX2 and baseline paths
    1.8e-5 off, and the AVX-512 path's x - floor(x) (which rounds away the low bits of x just below 0) 4.3e-5."""
    require_isa(isa)
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    x, x_dbl, dt_w, dt_b, a, ds = make_ss2d_inputs(1, 32, 56, 56, 4, 16, seed=0)
    arrays = (x, x_dbl, dt_w, np.zeros_like(dt_b), a * np.float32(0.02), ds)
    assert_close(scan_cpu.ss2d_scan(*arrays, num_threads=2), ss2d_reference64(*arrays))


@pytest.mark.parametrize("paths", [("avx2", "baseline"), ("avx512", "avx2")], ids=lambda p: "-vs-".join(p))
def test_forcing_a_path_changes_the_code_that_runs(paths, monkeypatch):
    # The AVX2 path contracts multiply-adds into FMAs, the baseline (SSE2) cannot; the AVX-512 path computes exp2
    # with vreduceps/vscalefps and its own polynomial: each pair's last bits differ.
    require_isa(paths[0])
    arrays = make_ss2d_inputs(1, 64, 12, 13, 3, 16, seed=9)
    outputs = {}
    for isa in paths:
        monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
        outputs[isa] = scan_cpu.ss2d_scan(*arrays, num_threads=1)
    assert not np.array_equal(*outputs.values())


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_forcing_a_path_the_cpu_lacks_is_refused(isa, monkeypatch):
    if isa not in scan_cpu.compiled_isas():
        pytest.skip(f"this build ({platform.machine()}) has no {isa} path")
    if scan_cpu.cpu_supports(isa):
        pytest.skip(f"this CPU runs the {isa} path; the refusal needs one without {scan_cpu.ISA_REQUIREMENTS[isa]}")
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    with pytest.raises(RuntimeError, match=f"{scan_cpu.ISA_ENV}={isa}: this CPU cannot run it, it lacks"):
        scan_cpu.ss2d_scan(*make_ss2d_inputs(1, 16, 2, 3, 1, 4))


FORCED_AVX512 = """
from medmamba_edge.runtime import scan_cpu
from tests.ss2d_reference import make_ss2d_inputs
print(scan_cpu.isa())
scan_cpu.ss2d_scan(*make_ss2d_inputs(1, 16, 2, 3, 1, 4))
"""


def test_forcing_avx512_where_cpuid_hides_it_is_refused(tmp_path):
    """The refusal above on an AVX-512 CPU: with AVX-512 hidden from CPUID (benchmarks/hide_avx512.c) the
    default is the AVX2 path and forcing AVX-512 is refused, naming what is missing."""
    library = hidden_avx512.build(tmp_path)
    default = hidden_avx512.run_python(library, "from medmamba_edge.runtime import scan_cpu; print(scan_cpu.isa())")
    assert default.returncode == 0 and default.stdout.split() == ["avx2"], default.stderr
    forced = hidden_avx512.run_python(library, FORCED_AVX512, env={scan_cpu.ISA_ENV: "avx512"})
    assert forced.returncode != 0
    assert f"{scan_cpu.ISA_ENV}=avx512: this CPU cannot run it, it lacks" in forced.stderr


def test_an_unknown_path_is_refused(monkeypatch):
    arrays = make_ss2d_inputs(1, 16, 2, 3, 1, 4)
    monkeypatch.setenv(scan_cpu.ISA_ENV, "avx1024")
    with pytest.raises(ValueError, match=f"{scan_cpu.ISA_ENV}='avx1024': this build of the CPU scan has the paths"):
        scan_cpu.ss2d_scan(*arrays)
    # The extension refuses too, so no caller can reach code this CPU cannot run.
    from medmamba_edge.runtime import _scan_cpu

    with pytest.raises(ValueError, match="unknown scan path 'avx1024'"):
        _scan_cpu.ss2d_scan(*arrays, np.empty((1, 2, 3, 16), np.float32), True, 1, "avx1024")


@pytest.mark.parametrize("a_jitter", [0.5, 1e-3, 0.0], ids=["A-spread", "trained-A", "A-exactly-linear"])
@pytest.mark.parametrize("isa", ALL_ISAS)
def test_large_deltas_and_softplus_threshold(isa, a_jitter, monkeypatch):
    """Also tiles whose delta * A leaves exp2's clamp-free range (the first tile of batch 0, every tile of batch 1)
    beside tiles that stay in it, on every path; with A close to its init, tiles past the power chain's bound
    beside tiles within it, and (exactly linear A) the chain's base underflowing."""
    require_isa(isa)
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    x, x_dbl, dt_w, dt_b, A, Ds = make_ss2d_inputs(2, 48, 10, 16, 1, 16, seed=1, a_jitter=a_jitter)
    # delta = dt_b + dt_w * dt_low: right at and around softplus' threshold of 20, and far beyond it both ways
    dt_w[:] = 1.0
    dt_b[:] = 0.0
    rows = scan_node.NUM_DIRECTIONS * (1 + 2 * 16)
    x_dbl[0, ::rows // 4, :9] = [-100.0, -30.0, 19.9, 19.999, 20.0, 20.001, 20.5, 35.0, 200.0]
    x_dbl[1, ::rows // 4] *= 15.0
    y = scan_cpu.ss2d_scan(x, x_dbl, dt_w, dt_b, A, Ds, num_threads=2)
    assert_close(y, ss2d_reference64(x, x_dbl, dt_w, dt_b, A, Ds))


@pytest.mark.parametrize("isa", ALL_ISAS)
def test_states_that_grow_are_still_within_the_bound(isa, monkeypatch):
    """A > 0, or delta < 0 without softplus, is outside Mamba's range but allowed by the contract: exp must still
    be right while finite. A growing state grows the exp's error with it: the degree-4 exp put A·0.1 at 9.5e-5 of the
    largest output (A·0.01 passed), a negative delta at 1e-4; and the AVX-512 path took its power chain and degree-4
    exp for A > 0 too, never having looked at A's signs."""
    require_isa(isa)
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    x, x_dbl, dt_w, dt_b, A, Ds = make_ss2d_inputs(1, 16, 5, 8, 2, 4, seed=3)
    for grown in (np.abs(A) * np.float32(0.01), np.abs(A) * np.float32(0.1),
                  np.tile(np.arange(1, 5, dtype=np.float32), (A.shape[0], 1)) * np.float32(0.05),  # chain-shaped
                  (A * np.where(np.arange(4) % 2, -1, 0.05)).astype(np.float32)):  # some states grow, some decay
        y = scan_cpu.ss2d_scan(x, x_dbl, dt_w, dt_b, grown, Ds)
        assert_close(y, ss2d_reference64(x, x_dbl, dt_w, dt_b, grown, Ds))
    # Longer: softplus's delta error multiplies the exponent a growing state carries (3.9e-4 at 28 x 28 with
    # softplus's degree-4 exp; 1.6e-5 at 14 x 14)
    for shape in ((1, 16, 14, 14, 2, 16), (1, 32, 28, 28, 3, 16)):
        x, x_dbl, dt_w, dt_b, A, Ds = make_ss2d_inputs(*shape, seed=3)
        grown = np.abs(A) * np.float32(0.01)
        assert_close(scan_cpu.ss2d_scan(x, x_dbl, dt_w, dt_b, grown, Ds), ss2d_reference64(x, x_dbl, dt_w, dt_b, grown, Ds))
    x, x_dbl, dt_w, dt_b, A, Ds = make_ss2d_inputs(1, 16, 5, 8, 2, 4, seed=3, softplus=False)
    y = scan_cpu.ss2d_scan(x, x_dbl, dt_w, -dt_b, A, Ds, delta_softplus=False)
    assert_close(y, ss2d_reference64(x, x_dbl, dt_w, -dt_b, A, Ds, delta_softplus=False))


@pytest.mark.parametrize("threads", [2, 3, 7, 64])
def test_thread_count_does_not_change_results(threads):
    arrays = make_ss2d_inputs(2, 100, 11, 13, 3, 16, seed=2)
    y1 = scan_cpu.ss2d_scan(*arrays, num_threads=1)
    yn = scan_cpu.ss2d_scan(*arrays, num_threads=threads)
    np.testing.assert_array_equal(y1, yn)


def test_default_threads_from_env(monkeypatch):
    monkeypatch.setenv(scan_cpu.THREADS_ENV, "3")
    assert scan_cpu.default_num_threads() == 3
    monkeypatch.setenv(scan_cpu.THREADS_ENV, "zero")
    with pytest.raises(ValueError, match=scan_cpu.THREADS_ENV):
        scan_cpu.default_num_threads()
    monkeypatch.delenv(scan_cpu.THREADS_ENV)
    assert scan_cpu.default_num_threads() >= 1


def test_converts_dtype_and_layout_and_fills_out():
    arrays = make_ss2d_inputs(2, 32, 6, 7, 2, 16, seed=4)
    ref = ss2d_reference64(*arrays)
    x, x_dbl, dt_w, dt_b, A, Ds = arrays
    x64 = x.astype(np.float64)
    x_dbl_f = np.asfortranarray(x_dbl)
    dt_w_strided = np.concatenate([dt_w, dt_w], axis=2)[..., ::2]  # a non-contiguous view
    dt_w_strided[...] = dt_w
    out = np.full((2, 6, 7, 32), np.nan, dtype=np.float32)
    y = scan_cpu.ss2d_scan(x64, x_dbl_f, dt_w_strided, dt_b, A, Ds, out=out)
    assert y is out
    assert_close(y, ref)


@pytest.mark.parametrize("shape", [(0, 8, 3, 3, 1, 4), (1, 8, 0, 3, 1, 4), (1, 8, 3, 0, 1, 4), (1, 0, 3, 3, 1, 4)])
def test_empty_inputs(shape):
    batch, channels, height, width = shape[:4]
    y = scan_cpu.ss2d_scan(*make_ss2d_inputs(*shape))
    assert y.shape == (batch, height, width, channels)


def test_bad_shapes_raise_value_error():
    good = make_ss2d_inputs(1, 8, 2, 5, 2, 4)

    def call(**replace):
        return scan_cpu.ss2d_scan(*[replace.get(n, a) for n, a in zip(NAMES, good)])

    with pytest.raises(ValueError, match=r"x must be \(batch, channels, height, width\)"):
        call(x=good[0][0])
    with pytest.raises(ValueError, match=r"x_dbl must be \(batch = 1, 4 \* \(dt_rank \+ 2 \* d_state\) = 40, "
                                         r"height \* width = 10\), got \(1, 40, 9\)"):
        call(x_dbl=good[1][:, :, :9])
    with pytest.raises(ValueError, match="x_dbl must be"):
        call(x_dbl=good[1][:, :39])
    with pytest.raises(ValueError, match=r"dt_projs_weight must be \(4, channels = 8, dt_rank\)"):
        call(dt_projs_weight=good[2][:3])
    with pytest.raises(ValueError, match=r"dt_projs_bias must be \(4, channels = 8\), got \(4, 7\)"):
        call(dt_projs_bias=good[3][:, :7])
    with pytest.raises(ValueError, match=r"A must be \(4 \* channels = 32, d_state\), got \(31, 4\)"):
        call(A=good[4][:31])
    with pytest.raises(ValueError, match=r"Ds must be \(4 \* channels = 32,\), got \(1, 32\)"):
        call(Ds=good[5][None])
    with pytest.raises(ValueError, match="out must be"):
        scan_cpu.ss2d_scan(*good, out=np.empty((1, 2, 5, 8), np.float64))
    with pytest.raises(ValueError, match="out must be"):
        scan_cpu.ss2d_scan(*good, out=np.empty((1, 8, 2, 5), np.float32))
    with pytest.raises(ValueError, match="out must not share memory"):
        x = np.zeros((1, 8, 8, 8), np.float32)  # (b, H, W, D) = (b, D, H, W) for this shape
        scan_cpu.ss2d_scan(x, np.zeros((1, 40, 64), np.float32), *good[2:], out=x)
    # Empty arrays may have any other extent: the limits come before any product of sizes (int64 overflow).
    with pytest.raises(ValueError, match=r"x is too large \(height \* width at most 2\^26\), got \(1, 0, 1099511627776, 1\)"):
        call(x=np.empty((1, 0, 2**40, 1), np.float32))
    with pytest.raises(ValueError, match="d_state = 1152921504606846976 or dt_rank = 144115188075855872 is too large"):
        scan_cpu.ss2d_scan(np.empty((1, 0, 2, 2), np.float32), np.empty((1, 0, 4), np.float32),
                           np.empty((4, 0, 2**57), np.float32), np.empty((4, 0), np.float32),
                           np.empty((0, 2**60), np.float32), np.empty((0,), np.float32))


def test_extension_validates_its_buffers():
    from medmamba_edge.runtime import _scan_cpu

    good = list(make_ss2d_inputs(1, 8, 2, 5, 2, 4))
    out = np.empty((1, 2, 5, 8), np.float32)
    with pytest.raises(ValueError, match="x must be float32"):
        _scan_cpu.ss2d_scan(good[0].astype(np.float64), *good[1:], out)
    with pytest.raises(ValueError, match="x_dbl must be a C-contiguous"):
        _scan_cpu.ss2d_scan(good[0], np.asfortranarray(good[1]), *good[2:], out)
    with pytest.raises(ValueError, match="writable"):
        ro = np.empty_like(out)
        ro.flags.writeable = False
        _scan_cpu.ss2d_scan(*good, ro)
    with pytest.raises(ValueError, match=r"out must be \(batch, height, width, channels\) = \(1, 2, 5, 8\)"):
        _scan_cpu.ss2d_scan(*good, out[:, :1])
    with pytest.raises(ValueError, match="A must be aligned to 4 bytes"):
        _scan_cpu.ss2d_scan(*good[:4], at_odd_offset(good[4]), good[5], out)
    assert _scan_cpu.ss2d_scan(*good, out, True, 1) is out


def at_odd_offset(a: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy of ``a`` one byte into its buffer: numpy's "not aligned"."""
    view = np.frombuffer(np.zeros(a.nbytes + 1, np.uint8), np.float32, a.size, offset=1).reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous and not view.flags.aligned
    return view


def test_unaligned_arrays_are_copied_not_read_through_float_pointers():
    arrays = make_ss2d_inputs(2, 40, 9, 7, 3, 16)
    y = scan_cpu.ss2d_scan(*[at_odd_offset(a) for a in arrays])
    np.testing.assert_array_equal(y, scan_cpu.ss2d_scan(*arrays))
    with pytest.raises(ValueError, match="out must be a writable aligned C-contiguous float32 array"):
        scan_cpu.ss2d_scan(*arrays, out=at_odd_offset(y))


def test_torch_custom_op_uses_the_kernel():
    arrays = make_ss2d_inputs(1, 64, 6, 9, 3, 16, seed=5)
    tensors = [torch.from_numpy(a) for a in arrays]
    y = ss2d_scan(*tensors, delta_softplus=True)
    np.testing.assert_array_equal(y.numpy(), scan_cpu.ss2d_scan(*arrays, num_threads=torch.get_num_threads()))
    assert_close(ss2d_scan_ref(*tensors).numpy(), ss2d_reference64(*arrays))


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import medmamba_edge.runtime.scan_cpu, medmamba_edge.runtime.backends.onnxruntime.custom_ops, medmamba_edge.runtime.cpu\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_floating_point_mode_is_restored():
    """The kernel flushes denormals to zero while it runs, and must leave the caller's FP mode as it was."""
    x, x_dbl, dt_w, dt_b, A, Ds = make_ss2d_inputs(1, 16, 5, 6, 2, 4, seed=8)
    dt_b[:] = 60.0  # exp(delta * A) far below the normal range
    y = scan_cpu.ss2d_scan(x, x_dbl, dt_w, dt_b, A, Ds, num_threads=1)
    assert_close(y, ss2d_reference64(x, x_dbl, dt_w, dt_b, A, Ds))
    tiny = np.array([1e-40], dtype=np.float32)
    assert (tiny * np.float32(1.0))[0] != 0.0  # denormals still work in this thread


@pytest.mark.parametrize("compiler", ["gcc-11", "gcc-12", "gcc", "clang"])
def test_every_gcc_from_11_and_clang_from_14_builds_the_x86_paths(compiler, tmp_path):
    """gcc 11 (Ubuntu 22.04, RHEL 9) built the baseline path alone, silently ~44 % slower: only gcc 12 had the
    level names __builtin_cpu_supports was asked with. clang (CC=clang, macOS) had the baseline alone, 4.3x slower."""
    import ctypes
    import shutil

    if platform.machine() != "x86_64" or shutil.which(compiler) is None:
        pytest.skip(f"{compiler} on x86-64 needed (not here)")
    version = subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True).stdout.strip()
    oldest = 14 if compiler == "clang" else 11
    if int(version.split(".")[0]) < oldest:
        pytest.skip(f"{compiler} is {version}: the x86 paths need {compiler} >= {oldest}")
    kernel = scan_cpu.__file__.rsplit("/", 1)[0] + "/csrc/selective_scan_kernel.c"
    subprocess.run([compiler, "-O1", "-std=c11", "-shared", "-fPIC", "-o", str(tmp_path / "k.so"), kernel], check=True)
    library = ctypes.CDLL(str(tmp_path / "k.so"))
    library.mm_scan_path_name.restype = ctypes.c_char_p
    names = [library.mm_scan_path_name(k).decode() for k in range(library.mm_scan_path_count())]
    assert names == ["avx512", "avx2", "baseline"]
    assert [bool(library.mm_scan_path_supported(k)) for k in range(3)] == [scan_cpu.cpu_supports(n) for n in names]


@pytest.mark.parametrize("library", ["extension", "onnxruntime-library", "clang-build"])
def test_every_path_computes_its_exps_in_vector_registers(library, tmp_path):
    """exp2_product puts 2^k into a float's exponent with a shift by 23: pslld on vectors, a scalar shl where gcc left
    a lane loop scalar. That happened twice unseen, the scan then several times slower on AVX2 and the baseline path:
    a degree chosen at run time inside the loop (69de823), and Python's -fwrapv in the build flags (setup.py).
    clang's build (CC=clang, setup.py's flags) had one more: a scalar copy of chain_bases' lane loop, kept beside the
    vector one behind a run-time overlap test."""
    import shutil

    from medmamba_edge.runtime.backends.onnxruntime import custom_ops

    objdump = shutil.which("objdump")
    if platform.machine() != "x86_64" or objdump is None:
        pytest.skip("objdump on x86-64 needed (not here)")
    if library == "clang-build":
        version = subprocess.run(["clang", "-dumpversion"], capture_output=True, text=True).stdout.strip() \
            if shutil.which("clang") else "0"
        if int(version.split(".")[0]) < 14:
            pytest.skip("clang >= 14 needed (not here)")
        path = str(tmp_path / "kernel.so")
        extension = setup_extensions()[0]
        subprocess.run(["clang", *extension.extra_compile_args, "-shared", "-fPIC", "-o", path,
                        *(str(ROOT / s) for s in extension.sources if s.endswith("_kernel.c"))], check=True)
    else:
        path = scan_cpu._ext.__file__ if library == "extension" else str(custom_ops.library_path())
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                             check=True).stdout
    functions = {name: body for name, body in re.findall(r"<(scan_block_\w+)>:\n(.*?)\n\n", listing, re.S)}
    if not functions:
        pytest.skip(f"{path}: no symbols for the scan paths (a stripped build)")
    assert set(functions) == {f"scan_block_{isa}" for isa in scan_cpu.compiled_isas()}
    scalar = {name: len(re.findall(r"\bshl\s+\$0x17,%[er]", body)) for name, body in functions.items()}
    assert not any(scalar.values()), f"scalar exponent shifts (a lane loop left scalar): {scalar}"


def setup_extensions():
    """setup.py's own Extension list: its sources and flags, as pip builds them."""
    import runpy
    from unittest import mock

    import setuptools

    with mock.patch.object(setuptools, "setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"))
    return setup.call_args.kwargs["ext_modules"]


def aarch64_compilers() -> dict[str, list[str]]:
    """C compilers for aarch64 Linux here: Debian/Ubuntu's cross gcc, and zig's clang (pip's ziglang, the dev extra)
    for Ubuntu 22.04's glibc (JetPack 6)."""
    import importlib.util
    import shutil

    compilers = {}
    if shutil.which("aarch64-linux-gnu-gcc"):
        compilers["gcc"] = ["aarch64-linux-gnu-gcc"]
    if importlib.util.find_spec("ziglang"):
        compilers["zig-clang"] = [sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-linux-gnu.2.35"]
    return compilers


@pytest.mark.parametrize("compiler", ["gcc", "zig-clang"])
def test_both_artefacts_build_for_aarch64_without_a_warning(compiler, tmp_path):
    """The Jetson's build, as setup.py runs it and warning-free, and linking nothing but libc (and Python for the
    extension).  No one had compiled the aarch64 branches: there posix_memalign was undeclared under -std=c11 (x86's
    intrinsics headers declare it), an implicit declaration gcc 11 warns of and gcc >= 14 and clang >= 16 refuse, so
    the optional kernel was not built at all."""
    import shutil
    import sysconfig

    command = aarch64_compilers().get(compiler)
    if command is None:
        pytest.skip(f"no aarch64 {compiler} here (apt's gcc-aarch64-linux-gnu, pip's ziglang)")
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    for extension in setup_extensions():
        is_python = extension.name.endswith("_scan_cpu")
        # Python's headers of this (x86-64) interpreter: an LP64 little-endian pyconfig.h, as aarch64's
        includes = ["-I", sysconfig.get_paths()["include"]] if is_python else []
        out = tmp_path / (extension.name.rpartition(".")[2] + ".so")
        build = subprocess.run([*command, *extension.extra_compile_args, "-Wall", "-Wextra", "-Werror", "-fPIC",
                                "-shared", *includes, *(str(ROOT / s) for s in extension.sources),
                                *extension.extra_link_args, "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
        assert build.returncode == 0, build.stderr
        symbols = subprocess.run(["readelf", "-W", "--dyn-syms", "-d", str(out)], capture_output=True, text=True,
                                 check=True).stdout
        assert "AArch64" in subprocess.run(["readelf", "-h", str(out)], capture_output=True, text=True).stdout
        assert set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", symbols)) <= {"libc.so.6", "libm.so.6",
                                                                                    "libpthread.so.0"}
        undefined = re.findall(r"\bGLOBAL +DEFAULT +UND (\S+)", symbols)  # WEAK: the C runtime's optional hooks
        foreign = [s for s in undefined if "@GLIBC_" not in s and not (is_python and s.startswith(("Py", "_Py")))]
        assert undefined and not foreign, f"{out.name} needs {foreign}"


# zig's targets for the systems the library is cross-built for, and what llvm-readobj calls each one's format
OTHER_SYSTEMS = {"x86_64-windows-gnu": "COFF-x86-64", "aarch64-windows-gnu": "COFF-ARM64",
                 "x86_64-macos": "Mach-O 64-bit x86-64", "aarch64-macos": "Mach-O arm64"}
# Linking for Windows first builds MinGW-w64's C runtime from source: a minute or two per architecture on CI's fresh
# machine, the suite's largest cost. Windows builds are compiled, not linked: their objects must ask a DLL's linker to
# export RegisterCustomOps alone, and need only what the runtime gives (windows_runtime_names).


def zig_build(target: str, out: Path, *, link: bool) -> list[Path]:
    """The ONNX Runtime op library built for target by zig, as setup.py builds it and warning-free: the library at
    out, or (link=False) its objects in the folder out."""
    extension, = [e for e in setup_extensions() if e.name.endswith("libmedmamba_ort_ops")]
    # The baseline alone on x86-64, as setup.py's second try under zig (its -target overrides target() attributes).
    zig = [sys.executable, "-m", "ziglang", "cc", "-target", target, "-DMM_SCAN_BASELINE_ONLY",
           *extension.extra_compile_args, "-Wall", "-Wextra", "-Werror"]
    sources = [ROOT / source for source in extension.sources]
    if link:
        builds = {out: [*zig, "-shared", *map(str, sources), *extension.extra_link_args, "-o", str(out)]}
    else:
        out.mkdir()
        builds = {out / f"{source.stem}.o": [*zig, "-c", str(source), "-o", str(out / f"{source.stem}.o")]
                  for source in sources}
    for command in builds.values():
        build = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        assert build.returncode == 0, build.stderr
    return list(builds)


def unresolved(objects: list[Path]) -> set[str]:
    """What objects need that none of them defines, a DLL's imports without their __imp_ prefix."""
    def names(*options):
        return {name.removeprefix("__imp_") for obj in objects for name in subprocess.run(
            ["llvm-nm", "--format=just-symbols", *options, str(obj)], capture_output=True, text=True,
            check=True).stdout.split()}
    return names("-u") - names("-g", "-U")


def windows_runtime_names() -> set[str]:
    """What zig's MinGW-w64 gives a DLL to link against: the Universal C runtime's functions (its api-ms-win-crt
    import definitions) and MinGW's stdio over them (its stdio/ucrt_*.c); winpthreads' pthread_* and MinGW's own
    __mingw_* are told by their prefix."""
    import ziglang

    mingw = Path(ziglang.__file__).parent / "lib" / "libc" / "mingw"
    names = {source.stem.removeprefix("ucrt_") for source in (mingw / "stdio").glob("ucrt_*.c")}
    for definitions in (mingw / "lib-common").glob("api-ms-win-crt-*.def*"):
        names |= set(re.findall(r"^\s*([A-Za-z_]\w*)\b(?!\()", definitions.read_text(), re.MULTILINE))
    return names - {"LIBRARY", "EXPORTS"}  # the files' own keywords


@pytest.mark.parametrize("target", OTHER_SYSTEMS)
def test_the_onnx_runtime_library_cross_builds_for_windows_and_macos(target, tmp_path):
    """Only Linux had built it. For Windows the kernel called posix_memalign, which Windows' C runtime has not (the
    build failed), and RegisterCustomOps was marked with ELF's visibility, which a DLL ignores: MinGW then exported
    every symbol, and a compiler that does not would export none. Built as setup.py builds it, warning-free, it must
    export RegisterCustomOps alone and need nothing but the system's C runtime. Cross-built only: not run there."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("ziglang") is None:
        pytest.skip("pip's ziglang (the dev extra) is not installed")
    windows = "windows" in target
    outputs = zig_build(target, tmp_path / "library", link=not windows)
    # CI's fresh machine: the build is checked, what it exports is not
    if shutil.which("llvm-readobj") is None or shutil.which("llvm-nm") is None:
        pytest.skip(f"built for {target}; llvm-readobj and llvm-nm (LLVM) are not installed to read its exports")
    facts = subprocess.run(["llvm-readobj", "--coff-directives", "--needed-libs", *map(str, outputs)],
                           capture_output=True, text=True, check=True).stdout
    assert facts.count(f"Format: {OTHER_SYSTEMS[target]}") == len(outputs), facts
    if windows:
        exported = re.findall(r"-export:(\S+)", facts)  # the directives a compiler leaves for a DLL's linker
        needed = unresolved(outputs)
        foreign = {name for name in needed - windows_runtime_names() if not name.startswith(("pthread_", "__mingw_"))}
        assert needed and not foreign, f"Windows' C runtime has no {sorted(foreign)}"
    else:
        out, = outputs
        exported = subprocess.run(["llvm-nm", "-gU", "--format=just-symbols", str(out)], capture_output=True,
                                  text=True, check=True).stdout.split()
        exported = [name for name in exported if name not in ("___dso_handle", "__mh_dylib_header")]  # the linker's
        needed = re.findall(r"^\s+(/\S+)$", facts.partition("NeededLibraries")[2], re.MULTILINE)
        assert set(needed) - {str(out)} == {"/usr/lib/libSystem.B.dylib"}, facts  # out: its own install name
    assert exported == ["RegisterCustomOps" if windows else "_RegisterCustomOps"]


def test_a_compiler_that_refuses_the_x86_paths_still_builds_the_baseline(tmp_path):
    """zig cc given a -target or -mcpu passes every CPU feature explicitly, which overrides the kernel's target()
    attributes: the AVX-512 and AVX2 paths do not compile, and neither optional binary was built where the baseline
    would have been. setup.py now tries once more without them and says so."""
    import importlib.util
    import shlex

    if platform.machine() != "x86_64" or importlib.util.find_spec("ziglang") is None:
        pytest.skip("pip's ziglang on x86-64 needed (not here)")
    zig = shlex.join([sys.executable, "-m", "ziglang", "cc", "-target", "x86_64-linux-gnu"])
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "temp")], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "CC": zig, "LDSHARED": f"{zig} -shared"})
    assert build.returncode == 0, build.stderr
    assert "trying once more without the scan's AVX-512 and AVX2 paths" in build.stderr
    runtime = tmp_path / "lib" / "medmamba_edge" / "runtime"
    assert (runtime / "libmedmamba_ort_ops.so").is_file()
    extension, = runtime.glob("_scan_cpu.*")
    check = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_scan_cpu', sys.argv[1]); "
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.ISAS)")
    isas = subprocess.run([sys.executable, "-c", check, str(extension)], capture_output=True, text=True, check=True)
    assert isas.stdout.strip() == "('baseline',)"
