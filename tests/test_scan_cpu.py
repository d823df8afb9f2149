"""The compiled CPU scan (runtime/csrc/selective_scan_cpu.c via runtime/scan_cpu.py) must match the reference
scan. Its ONNX Runtime form, the custom-op library, is tests/test_ort_custom_ops.py's."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from medmamba_edge.runtime import scan_cpu, scan_node
from medmamba_edge.scan import selective_scan, selective_scan_ref

pytestmark = pytest.mark.skipif(not scan_cpu.available(), reason=scan_cpu.unavailable_reason() or "not built")

NAMES = scan_node.INPUT_NAMES


def make_inputs(batch, channels, length, groups, d_state, *, softplus=True, delta_scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((batch, channels, length)).astype(np.float32)
    delta = (delta_scale * rng.standard_normal((batch, channels, length))).astype(np.float32)
    A = -np.exp(rng.normal(0.0, 0.7, (channels, d_state))).astype(np.float32)
    B = rng.standard_normal((batch, groups, d_state, length)).astype(np.float32)
    C = rng.standard_normal((batch, groups, d_state, length)).astype(np.float32)
    D = rng.standard_normal(channels).astype(np.float32)
    delta_bias = rng.standard_normal(channels).astype(np.float32)
    if not softplus:  # without softplus delta + bias must stay positive (as in a real model) or h explodes
        delta = np.abs(delta) * 0.2
        delta_bias = np.abs(delta_bias) * 0.1
    return u, delta, A, B, C, D, delta_bias


def reference(arrays, softplus=True) -> np.ndarray:
    return selective_scan_ref(*(torch.from_numpy(a) for a in arrays), delta_softplus=softplus).numpy()


def assert_close(y, ref):
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(y.astype(np.float64) - ref).max())
    assert err <= 1e-4 * scale, f"max abs error {err:.3g} > 1e-4 * {scale:.3g}"


SHAPES = [
    # (batch, channels, length, groups, d_state)
    pytest.param(1, 384, 392, 4, 16, id="stage1-384ch"),  # MedMamba-T stage shapes, shorter L
    pytest.param(1, 768, 196, 4, 16, id="stage2-768ch"),
    pytest.param(2, 1536, 49, 4, 16, id="stage3-1536ch-b2"),
    pytest.param(1, 3072, 49, 4, 16, id="stage4-3072ch"),
    pytest.param(2, 37, 100, 1, 16, id="odd-channels-G1"),
    pytest.param(1, 42, 77, 2, 16, id="G2-21-per-group"),
    pytest.param(1, 100, 67, 4, 16, id="G4-25-per-group"),
    pytest.param(2, 24, 70, 2, 7, id="N7"),
    pytest.param(1, 32, 65, 4, 64, id="N64"),
    pytest.param(3, 8, 1, 2, 16, id="L1"),
    pytest.param(1, 16, 17, 1, 1, id="N1"),
]


@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
@pytest.mark.parametrize("batch,channels,length,groups,d_state", SHAPES)
def test_matches_reference(batch, channels, length, groups, d_state, softplus):
    arrays = make_inputs(batch, channels, length, groups, d_state, softplus=softplus)
    y = scan_cpu.selective_scan(*arrays, delta_softplus=softplus, num_threads=2)
    assert_close(y, reference(arrays, softplus))


# Every compiled path (x86-64: AVX-512, AVX2, baseline) is checked on any CPU able to run it, so an
# AVX2-only machine still tests the baseline path and an AVX-512 one all three.
ALL_ISAS = ("avx512", "avx2", "baseline")


def require_isa(isa: str) -> None:
    if isa not in scan_cpu.compiled_isas():
        pytest.skip(f"this build ({platform.machine()}) has no {isa} path, only {', '.join(scan_cpu.compiled_isas())}")
    if not scan_cpu.cpu_supports(isa):
        pytest.skip(f"this CPU lacks {scan_cpu.ISA_REQUIREMENTS[isa]} for the {isa} path")


@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
@pytest.mark.parametrize("batch,channels,length,groups,d_state", [
    pytest.param(2, 1536, 49, 4, 16, id="stage3-1536ch-b2"),  # N = 16: the constant-trip-count copy
    pytest.param(1, 42, 77, 2, 16, id="G2-21-per-group"),  # a partial channel block, a partial tile
    pytest.param(2, 24, 70, 2, 7, id="N7"),  # the generic-N copy
])
@pytest.mark.parametrize("isa", ALL_ISAS)
def test_each_forced_path_matches_reference(isa, batch, channels, length, groups, d_state, softplus, monkeypatch):
    require_isa(isa)
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    assert scan_cpu.isa() == isa
    arrays = make_inputs(batch, channels, length, groups, d_state, softplus=softplus)
    y = scan_cpu.selective_scan(*arrays, delta_softplus=softplus, num_threads=2)
    assert_close(y, reference(arrays, softplus))


def test_forcing_a_path_changes_the_code_that_runs(monkeypatch):
    # The AVX2 path contracts multiply-adds into FMAs, the baseline (SSE2) cannot: their last bits differ.
    require_isa("avx2")
    arrays = make_inputs(1, 64, 200, 4, 16, seed=9)
    outputs = {}
    for isa in ("avx2", "baseline"):
        monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
        outputs[isa] = scan_cpu.selective_scan(*arrays, num_threads=1)
    assert not np.array_equal(outputs["avx2"], outputs["baseline"])


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_forcing_a_path_the_cpu_lacks_is_refused(isa, monkeypatch):
    if isa not in scan_cpu.compiled_isas():
        pytest.skip(f"this build ({platform.machine()}) has no {isa} path")
    if scan_cpu.cpu_supports(isa):
        pytest.skip(f"this CPU runs the {isa} path; the refusal needs one without {scan_cpu.ISA_REQUIREMENTS[isa]}")
    monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
    with pytest.raises(RuntimeError, match=f"{scan_cpu.ISA_ENV}={isa}: this CPU cannot run it, it lacks"):
        scan_cpu.selective_scan(*make_inputs(1, 16, 8, 1, 4))


def test_an_unknown_path_is_refused(monkeypatch):
    monkeypatch.setenv(scan_cpu.ISA_ENV, "avx1024")
    with pytest.raises(ValueError, match=f"{scan_cpu.ISA_ENV}='avx1024': this build of the CPU scan has the paths"):
        scan_cpu.selective_scan(*make_inputs(1, 16, 8, 1, 4))
    # The extension refuses too, so no caller can reach code this CPU cannot run.
    from medmamba_edge.runtime import _scan_cpu

    arrays = make_inputs(1, 16, 8, 1, 4)
    with pytest.raises(ValueError, match="unknown scan path 'avx1024'"):
        _scan_cpu.selective_scan(*arrays, np.empty_like(arrays[0]), True, 1, "avx1024")


def test_large_deltas_and_softplus_threshold():
    arrays = list(make_inputs(2, 48, 160, 4, 16, delta_scale=15.0, seed=1))
    # values right at and around softplus' threshold of 20, and far beyond it both ways
    arrays[1][0, :, :9] = [-100.0, -30.0, 19.9, 19.999, 20.0, 20.001, 20.5, 35.0, 200.0]
    arrays[6][:] = 0.0
    y = scan_cpu.selective_scan(*arrays, delta_softplus=True, num_threads=2)
    assert_close(y, reference(arrays))


def test_positive_A_is_clamped_not_garbage():
    """A > 0 is outside Mamba's range but allowed by the contract: exp must still be right while finite."""
    u, delta, A, B, C, D, delta_bias = make_inputs(1, 16, 40, 1, 4, seed=3)
    A = np.abs(A) * 0.01
    y = scan_cpu.selective_scan(u, delta, A, B, C, D, delta_bias)
    assert_close(y, reference((u, delta, A, B, C, D, delta_bias)))


@pytest.mark.parametrize("threads", [2, 3, 7, 64])
def test_thread_count_does_not_change_results(threads):
    arrays = make_inputs(2, 100, 150, 4, 16, seed=2)
    y1 = scan_cpu.selective_scan(*arrays, num_threads=1)
    yn = scan_cpu.selective_scan(*arrays, num_threads=threads)
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
    arrays = make_inputs(2, 32, 50, 2, 16, seed=4)
    ref = reference(arrays)
    u, delta, A, B, C, D, delta_bias = arrays
    u64 = u.astype(np.float64)
    delta_f = np.asfortranarray(delta)
    B_strided = np.ascontiguousarray(np.concatenate([B, B], axis=3))[..., ::2]  # non-contiguous view
    B_strided[...] = B
    out = np.full(u.shape, np.nan, dtype=np.float32)
    y = scan_cpu.selective_scan(u64, delta_f, A, B_strided, C, D, delta_bias, out=out)
    assert y is out
    assert_close(y, ref)


def test_empty_inputs():
    for shape in [(0, 8, 10, 2, 4), (1, 8, 0, 2, 4)]:
        y = scan_cpu.selective_scan(*make_inputs(*shape))
        assert y.shape == shape[:3]


def test_bad_shapes_raise_value_error():
    good = make_inputs(1, 8, 10, 2, 4)

    def call(**replace):
        arrays = [replace.get(n, a) for n, a in zip(NAMES, good)]
        return scan_cpu.selective_scan(*arrays)

    with pytest.raises(ValueError, match="u must be"):
        call(u=good[0][0])
    with pytest.raises(ValueError, match="delta must have u's shape"):
        call(delta=good[1][:, :, :5])
    with pytest.raises(ValueError, match="A must be"):
        call(A=good[2][:4])
    with pytest.raises(ValueError, match="B must be"):
        call(B=good[3][:, :, :3])
    with pytest.raises(ValueError, match="C must be"):
        call(C=good[4][..., :9])
    with pytest.raises(ValueError, match="C must be"):
        call(C=np.concatenate([good[4]] * 2, axis=1))  # groups differ from B's
    with pytest.raises(ValueError, match="groups .3. must divide channels .8."):
        call(B=np.zeros((1, 3, 4, 10), np.float32), C=np.zeros((1, 3, 4, 10), np.float32))
    with pytest.raises(ValueError, match="D must be"):
        call(D=good[5][:7])
    with pytest.raises(ValueError, match="delta_bias must be"):
        call(delta_bias=good[6][None])
    with pytest.raises(ValueError, match="out must be"):
        scan_cpu.selective_scan(*good, out=np.empty((1, 8, 10), np.float64))
    with pytest.raises(ValueError, match="out must be"):
        scan_cpu.selective_scan(*good, out=np.empty((1, 8, 11), np.float32))
    with pytest.raises(ValueError, match="out must not share memory"):
        scan_cpu.selective_scan(*good, out=good[0])


def test_extension_validates_its_buffers():
    from medmamba_edge.runtime import _scan_cpu

    good = list(make_inputs(1, 8, 10, 2, 4))
    out = np.empty_like(good[0])
    with pytest.raises(ValueError, match="float32"):
        _scan_cpu.selective_scan(good[0].astype(np.float64), *good[1:], out)
    with pytest.raises(ValueError, match="C-contiguous"):
        _scan_cpu.selective_scan(np.asfortranarray(good[0]), *good[1:], out)
    with pytest.raises(ValueError, match="writable"):
        ro = np.empty_like(good[0])
        ro.flags.writeable = False
        _scan_cpu.selective_scan(*good, ro)
    with pytest.raises(ValueError, match="out must have u's shape"):
        _scan_cpu.selective_scan(*good, out[:, :4])
    assert _scan_cpu.selective_scan(*good, out, True, 1) is out


def test_torch_custom_op_uses_the_kernel():
    arrays = make_inputs(1, 64, 33, 4, 16, seed=5)
    tensors = [torch.from_numpy(a) for a in arrays]
    y = selective_scan(*tensors, delta_softplus=True)
    np.testing.assert_array_equal(y.numpy(), scan_cpu.selective_scan(*arrays, num_threads=torch.get_num_threads()))
    assert_close(y.numpy(), reference(arrays))


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import medmamba_edge.runtime.scan_cpu, medmamba_edge.runtime.fused_scan, medmamba_edge.runtime.cpu\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_floating_point_mode_is_restored():
    """The kernel flushes denormals to zero while it runs, and must leave the caller's FP mode as it was."""
    arrays = list(make_inputs(1, 16, 30, 1, 4, seed=8))
    arrays[1] = np.abs(arrays[1]) * 50 + 50  # exp(delta * A) far below the normal range
    y = scan_cpu.selective_scan(*arrays, num_threads=1)
    assert_close(y, reference(arrays))
    tiny = np.array([1e-40], dtype=np.float32)
    assert (tiny * np.float32(1.0))[0] != 0.0  # denormals still work in this thread
