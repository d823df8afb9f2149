"""The native ONNX Runtime custom-op library (runtime/csrc/ort_custom_ops.c, loaded by runtime/fused_scan.py):
it loads into the installed onnxruntime, its SelectiveScan matches a float64 reference, refuses bad shapes with
an ONNX Runtime error, gives the same bits on any thread count, and runs the whole plugin-form model."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from medmamba_edge.runtime import fused_scan, scan_cpu, scan_node
from tests.test_scan_cpu import make_inputs

ROOT = Path(__file__).resolve().parents[1]
NAMES = scan_node.INPUT_NAMES

try:
    LIBRARY = fused_scan.library_path()
except fused_scan.FusedScanUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)


def test_library_loads_into_the_installed_onnxruntime(record_property):
    record_property("onnxruntime", ort.__version__)
    print(f"onnxruntime {ort.__version__}, {LIBRARY}")
    options = fused_scan.fused_session_options(threads=1)
    session = ort.InferenceSession(scan_model(8, 4, 2).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(NAMES)


def scan_model(channels, d_state, groups, *, softplus: int | None = 1) -> onnx.ModelProto:
    """One SelectiveScan node as the exporter writes it (batch and length symbolic); softplus None leaves the
    attribute out."""
    dims = {"u": ["batch", channels, "L"], "delta": ["batch", channels, "L"], "A": [channels, d_state],
            "B": ["batch", groups, d_state, "L"], "C": ["batch", groups, d_state, "L"], "D": [channels],
            "delta_bias": [channels]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims[n]) for n in NAMES]
    attrs = scan_node.node_attributes(bool(softplus))
    if softplus is None:
        del attrs["delta_softplus"]
    node = helper.make_node(scan_node.OP_TYPE, list(NAMES), ["y"], name="scan", domain=scan_node.DOMAIN, **attrs)
    graph = helper.make_graph([node], "scan", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, "L"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(scan_node.DOMAIN, scan_node.DOMAIN_VERSION)])


def reference64(u, delta, A, B, C, D, delta_bias, softplus: bool) -> np.ndarray:
    """The scan in float64 (runtime/scan_node.py semantics), independent of every implementation under test."""
    u, delta, A, B, C, D, delta_bias = (np.asarray(x, dtype=np.float64) for x in (u, delta, A, B, C, D, delta_bias))
    batch, channels, length = u.shape
    per_group = channels // B.shape[1]
    dt = delta + delta_bias[:, None]
    if softplus:
        dt = np.where(dt > scan_node.SOFTPLUS_THRESHOLD, dt, np.logaddexp(0.0, dt))
    B, C = np.repeat(B, per_group, axis=1), np.repeat(C, per_group, axis=1)  # (batch, channels, N, L)
    h = np.zeros((batch, channels, A.shape[1]))
    y = np.empty_like(u)
    for t in range(length):
        h = np.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[..., t]
        y[:, :, t] = (h * C[..., t]).sum(-1)
    return y + u * D[:, None]


def session(model, threads=2):
    return fused_scan.make_fused_session(model, threads=threads)


def run_scan(sess, arrays):
    return sess.run(None, dict(zip(NAMES, arrays)))[0]


def assert_relative(y, ref, tol=1e-5):
    assert y.shape == ref.shape and y.dtype == np.float32
    err = float(np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max())
    assert err <= tol, f"max error {err:.3g} of max |y| > {tol:g}"


@pytest.mark.parametrize("softplus", [1, 0], ids=["softplus", "no-softplus"])
@pytest.mark.parametrize("batch,channels,length,groups,d_state", [
    pytest.param(2, 40, 77, 4, 16, id="b2-G4-10ch-per-group-L77"),  # a partial 16-channel block, a partial tile
    pytest.param(1, 384, 200, 4, 16, id="stage1-384ch-L200"),  # MedMamba-T's first stage, shorter sequence
    pytest.param(3, 37, 130, 1, 7, id="b3-G1-odd-N7-L130"),  # the generic-N path, L past two tiles
    pytest.param(2, 24, 1, 2, 16, id="L1"),
])
def test_matches_float64_reference(batch, channels, length, groups, d_state, softplus):
    sess = session(scan_model(channels, d_state, groups, softplus=softplus))
    arrays = make_inputs(batch, channels, length, groups, d_state, softplus=bool(softplus), seed=length)
    assert_relative(run_scan(sess, arrays), reference64(*arrays, softplus=bool(softplus)))


def test_absent_delta_softplus_means_softplus_on():
    sess = session(scan_model(16, 4, 2, softplus=None))
    arrays = make_inputs(1, 16, 20, 2, 4, seed=7)
    assert_relative(run_scan(sess, arrays), reference64(*arrays, softplus=True))


def test_delta_softplus_other_than_0_or_1_is_refused_when_the_session_is_made():
    model = scan_model(8, 4, 2)
    next(a for a in model.graph.node[0].attribute if a.name == "delta_softplus").i = 2
    with pytest.raises(Exception, match="SelectiveScan node 'scan': delta_softplus must be 0 or 1, got 2"):
        session(model)


def test_one_and_two_threads_give_the_same_bits():
    model = scan_model(64, 16, 4)
    arrays = make_inputs(2, 64, 150, 4, 16, seed=3)
    one, two = (run_scan(session(model, threads), arrays) for threads in (1, 2))
    np.testing.assert_array_equal(one, two)


def test_denormals_work_again_in_the_next_node():
    """The kernel flushes denormals to zero on ONNX Runtime's threads while it runs, and must leave them as it
    found them: a Mul after the scan, on the same thread, still produces denormals."""
    model = scan_model(16, 4, 1)
    model.graph.node.append(helper.make_node("Mul", ["y", "tiny"], ["z"]))
    model.graph.initializer.append(helper.make_tensor("tiny", TensorProto.FLOAT, [], [1e-39]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    y, z = session(model, threads=1).run(None, dict(zip(NAMES, make_inputs(1, 16, 30, 1, 4, seed=8))))
    # Looked at as bits: a leaked flush-to-zero would also flush this thread's own float maths.
    magnitude = z.view(np.uint32) & 0x7FFFFFFF
    assert ((magnitude != 0) & (magnitude < 0x00800000)).mean() > 0.5  # mostly denormals, not zeros
    np.testing.assert_array_equal(z, y * np.float32(1e-39))


def test_same_kernel_as_the_python_extension(monkeypatch):
    """Each compiled path this CPU runs, forced by MEDMAMBA_EDGE_SCAN_ISA, gives the extension's exact output."""
    if not scan_cpu.available():
        pytest.skip(scan_cpu.unavailable_reason())
    model = scan_model(42, 16, 2)
    arrays = make_inputs(1, 42, 77, 2, 16, seed=11)
    runnable = [isa for isa in scan_cpu.compiled_isas() if scan_cpu.cpu_supports(isa)]
    for isa in runnable:
        monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
        np.testing.assert_array_equal(run_scan(session(model), arrays), scan_cpu.selective_scan(*arrays), err_msg=isa)


def test_unknown_isa_is_refused_when_the_session_is_made(monkeypatch):
    monkeypatch.setenv(scan_cpu.ISA_ENV, "avx1024")
    # ONNX Runtime's errors are its own Exception subclasses (Fail, InvalidArgument, ...), RuntimeError before 1.2x
    with pytest.raises(Exception, match=f"{scan_cpu.ISA_ENV}='avx1024': this build of the CPU scan has the paths"):
        session(scan_model(8, 4, 2))


@pytest.mark.parametrize("index,shape,message", [
    (0, (2, 40), r"u must be \(batch, channels, length\), got shape \(2, 40\)"),
    (1, (2, 40, 76), r"delta must have u's shape \(2, 40, 77\), got \(2, 40, 76\)"),
    (2, (39, 16), r"A must be \(channels=40, d_state\), got \(39, 16\)"),
    (3, (2, 3, 16, 77), r"C must be \(batch=2, groups=3, d_state=16, length=77\) like B"),
    (4, (2, 4, 16, 76), r"C must be \(batch=2, groups=4, d_state=16, length=77\) like B, got \(2, 4, 16, 76\)"),
    (5, (39,), r"D must be \(channels=40,\), got \(39,\)"),
    (6, (40, 1), r"delta_bias must be \(channels=40,\), got \(40, 1\)"),
])
def test_bad_shapes_are_an_onnxruntime_error(index, shape, message):
    """Bad shapes end in an ONNX Runtime error naming the node and the input, never in a crash; the session still
    works afterwards. Inputs are declared shapeless here so that the kernel, not ORT, sees them."""
    model = scan_model(40, 16, 4)
    for value in model.graph.input:
        value.type.tensor_type.ClearField("shape")
    sess = session(model)
    arrays = make_inputs(2, 40, 77, 4, 16)
    bad = list(arrays)
    bad[index] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(Exception, match=rf"SelectiveScan node 'scan': {message}") as caught:
        run_scan(sess, bad)
    assert "INVALID_ARGUMENT" in str(caught.value)
    assert_relative(run_scan(sess, arrays), reference64(*arrays, softplus=True))


def test_groups_must_divide_channels():
    sess = session(scan_model(10, 4, 3))
    with pytest.raises(Exception, match=r"SelectiveScan node 'scan': groups \(3\) must divide channels \(10\)"):
        run_scan(sess, make_inputs(1, 10, 5, 3, 4))


def test_an_onnxruntime_without_c_api_17_is_refused_with_its_version():
    """RegisterCustomOps against an OrtApiBase that offers versions up to 16 only (ONNX Runtime 1.16's): a status
    saying what is needed, not a crash. The real runtime's table answers for versions <= 16."""
    capi = Path(ort.__file__).parent / "capi"
    runtime = ctypes.CDLL(str(next(capi.glob("libonnxruntime.so*"))))
    runtime.OrtGetApiBase.restype = ctypes.POINTER(ctypes.c_void_p * 2)
    get_api_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_type = ctypes.CFUNCTYPE(ctypes.c_void_p)  # a char* that must outlive the callback: our buffer's
    real_get_api = get_api_type(runtime.OrtGetApiBase().contents[0])
    fake_get_api = get_api_type(lambda version: real_get_api(version) if version <= 16 else None)
    version_string = ctypes.create_string_buffer(b"1.16.3")
    fake_version = version_type(lambda: ctypes.addressof(version_string))
    fake_base = (ctypes.c_void_p * 2)(ctypes.cast(fake_get_api, ctypes.c_void_p),
                                      ctypes.cast(fake_version, ctypes.c_void_p))
    library = ctypes.CDLL(str(LIBRARY))
    library.RegisterCustomOps.restype = ctypes.c_void_p
    status = library.RegisterCustomOps(None, ctypes.byref(fake_base))
    assert status
    api = ctypes.cast(real_get_api(1), ctypes.POINTER(ctypes.c_void_p * 100)).contents
    message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(api[2])(status).decode()  # GetErrorMessage
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(api[93])(status)  # ReleaseStatus
    assert message == "libmedmamba_ort_ops needs ONNX Runtime >= 1.17 (C API version 17); this is ONNX Runtime 1.16.3"


def test_a_missing_library_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(fused_scan, "LIBRARY_NAME", "libmedmamba_ort_ops_absent.so")
    with pytest.raises(fused_scan.FusedScanUnavailable, match=r"^a plugin-form model .* runs its scan in ONNX "
                       r"Runtime through libmedmamba_ort_ops_absent.so, which is not built: .*setup.py build_ext "
                       r"--inplace.*--scan portable$"):
        fused_scan.make_fused_session(scan_model(8, 4, 2))


# ---------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_forms(tmp_path_factory):
    """The bundled checkpoint exported at 32×32 in plugin and portable form."""
    from medmamba_edge.exporters.onnx_export import export_onnx
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    folder = tmp_path_factory.mktemp("bundled")
    paths = {}
    for form in ("plugin", "portable"):
        paths[form] = folder / f"bundled32_{form}.onnx"
        export_onnx(bundled_checkpoint(), paths[form], input_size=32, batch=None, scan=form, verify=False)
    return paths


def test_plugin_form_model_matches_portable_through_the_backend(bundled_forms):
    from medmamba_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    plugin = OnnxRuntimeBackend(bundled_forms["plugin"], threads=2, providers="cpu")
    portable = OnnxRuntimeBackend(bundled_forms["portable"], threads=2, providers="cpu")
    assert "plugin scan" in plugin.describe()
    logits = plugin.run(images)
    np.testing.assert_allclose(logits, portable.run(images), rtol=0, atol=1e-4)
    assert np.abs(logits).max() > 1e-3  # not a model of zeros


def test_the_runtime_path_imports_neither_torch_nor_onnxruntime_extensions(bundled_forms):
    script = f"""
import sys
import numpy as np
from medmamba_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
backend = OnnxRuntimeBackend({str(bundled_forms["plugin"])!r}, threads=1, providers="cpu")
assert backend.run(np.zeros((1, 3, 32, 32), np.float32)).shape[0] == 1
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime_extensions")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_a_library_onnxruntime_cannot_load_is_one_clear_error(monkeypatch, tmp_path):
    broken = tmp_path / fused_scan.LIBRARY_NAME
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(fused_scan, "library_path", lambda: broken)
    with pytest.raises(fused_scan.FusedScanUnavailable, match=rf"^ONNX Runtime {ort.__version__} cannot load "
                       rf"{fused_scan.LIBRARY_NAME} \(.+\); or export with --scan portable$"):
        fused_scan.fused_session_options()


def test_run_without_the_library_is_one_line(bundled_forms, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from medmamba_edge.cli import app
    from medmamba_edge.runtime.bundled import sample_image_paths

    monkeypatch.setattr(fused_scan, "LIBRARY_NAME", "libmedmamba_ort_ops_absent.so")
    result = CliRunner().invoke(app, ["run", str(bundled_forms["plugin"]), str(sample_image_paths()[0]),
                                      "--jsonl", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert "libmedmamba_ort_ops_absent.so, which is not built" in result.output
    assert "--scan portable" in result.output


def test_run_with_an_unknown_scan_path_forced_is_one_line(bundled_forms, monkeypatch, tmp_path):
    """ONNX Runtime's own exception types (Fail, not RuntimeError since 1.2x) end as one line too."""
    from typer.testing import CliRunner

    from medmamba_edge.cli import app
    from medmamba_edge.runtime.bundled import sample_image_paths

    monkeypatch.setenv(scan_cpu.ISA_ENV, "avx1024")
    result = CliRunner().invoke(app, ["run", str(bundled_forms["plugin"]), str(sample_image_paths()[0]),
                                      "--jsonl", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert f"{bundled_forms['plugin']}: ONNX Runtime cannot load it" in result.output
    assert f"{scan_cpu.ISA_ENV}='avx1024'" in result.output
    assert not (tmp_path / "r.jsonl").exists()
