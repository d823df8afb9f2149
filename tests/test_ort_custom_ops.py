"""The native ONNX Runtime custom-op library (runtime/csrc/ort_custom_ops.c, loaded by
runtime/backends/onnxruntime/custom_ops.py):
it loads into the installed onnxruntime, its SS2DScan matches a float64 reference, refuses bad shapes with
an ONNX Runtime error, gives the same bits on any thread count, and runs the whole plugin-form model."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from medmamba_edge.runtime import scan_cpu, scan_node
from medmamba_edge.runtime.backends.onnxruntime import custom_ops
from tests.ss2d_reference import (BAD_DELTA_SOFTPLUS, make_ss2d_inputs, relative_error, ss2d_node_model,
                                  ss2d_reference64, with_delta_softplus)

ROOT = Path(__file__).resolve().parents[1]
NAMES = scan_node.INPUT_NAMES

try:
    LIBRARY = custom_ops.library_path()
except custom_ops.FusedScanUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)


def test_library_loads_into_the_installed_onnxruntime(record_property):
    record_property("onnxruntime", ort.__version__)
    print(f"onnxruntime {ort.__version__}, {LIBRARY}")
    options = custom_ops.fused_session_options(threads=1)
    session = ort.InferenceSession(ss2d_node_model(8, 2, 3, 1, 4).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(NAMES)


def test_the_library_stays_loaded_after_its_last_session():
    """ONNX Runtime dlcloses a custom-op library with its last session; each load made its op domain anew, which
    only the library could release (AddressSanitizer: 56 B a domain; ~1 KB per model reload). Linked -z nodelete,
    it stays, and so does its one domain."""
    script = f"""
import gc
import onnxruntime as ort
from medmamba_edge.runtime.backends.onnxruntime import custom_ops
from tests.ss2d_reference import ss2d_node_model
model = ss2d_node_model(8, 2, 3, 1, 4).SerializeToString()
for _ in range(3):
    session = ort.InferenceSession(model, custom_ops.fused_session_options(threads=1),
                                   providers=["CPUExecutionProvider"])
    del session
    gc.collect()
    print("MAPPED", {custom_ops.LIBRARY_NAME!r} in open("/proc/self/maps").read())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["MAPPED", "True"] * 3, result.stdout


def session(model, threads=2):
    return custom_ops.make_fused_session(model, threads=threads)


def run_scan(sess, arrays):
    return sess.run(None, dict(zip(NAMES, arrays)))[0]


def assert_relative(y, ref, tol=1e-5):
    assert y.shape == ref.shape and y.dtype == np.float32
    err = relative_error(y, ref)
    assert err <= tol, f"max error {err:.3g} of max |y| > {tol:g}"


@pytest.mark.parametrize("softplus", [1, 0], ids=["softplus", "no-softplus"])
@pytest.mark.parametrize("shape", [
    pytest.param((2, 40, 9, 11, 3, 16), id="b2-40ch-9x11"),  # a partial 16-channel block, partial tiles
    pytest.param((1, 96, 28, 28, 3, 16), id="stage1-96ch-28x28"),  # MedMamba-T's first stage at half size
    pytest.param((3, 37, 13, 10, 2, 7), id="b3-odd-N7"),  # the generic-N path, L past two tiles
    pytest.param((2, 24, 1, 1, 1, 16), id="L1"),
])
def test_matches_float64_reference(shape, softplus):
    batch, channels, height, width, dt_rank, d_state = shape
    sess = session(ss2d_node_model(channels, height, width, dt_rank, d_state, softplus=softplus))
    arrays = make_ss2d_inputs(*shape, softplus=bool(softplus), seed=height)
    assert_relative(run_scan(sess, arrays), ss2d_reference64(*arrays, delta_softplus=bool(softplus)))


def test_absent_delta_softplus_means_softplus_on():
    sess = session(ss2d_node_model(16, 4, 5, 2, 4, softplus=None))
    arrays = make_ss2d_inputs(1, 16, 4, 5, 2, 4, seed=7)
    assert_relative(run_scan(sess, arrays), ss2d_reference64(*arrays))


@pytest.mark.parametrize("value", BAD_DELTA_SOFTPLUS.values(), ids=BAD_DELTA_SOFTPLUS.keys())
def test_delta_softplus_other_than_an_int_0_or_1_is_refused_when_the_session_is_made(value):
    model = with_delta_softplus(ss2d_node_model(8, 2, 3, 1, 4), value)
    expected = "must be 0 or 1, got 2" if value == 2 else "must be an int \\(0 or 1\\)"
    with pytest.raises(Exception, match=f"SS2DScan node 'ss2d': delta_softplus {expected}"):
        session(model)


@pytest.mark.parametrize("value,message", [
    ("3", "plugin_version '3', but this library runs SS2DScan of plugin version 2; export the model again"),
    ("", "plugin_version '', but this library runs SS2DScan of plugin version 2"),
    ("2" * 40, "plugin_version '\\(a longer string, or one of other characters than printable ASCII\\)', but"),
    (b"3\xff", "plugin_version '\\(a longer string, or one of other characters than printable ASCII\\)', but"),
    (2, "plugin_version must be a string \\('2'\\)"),
], ids=["string-3", "empty", "long", "not-utf-8", "int-2"])
def test_another_plugin_version_is_refused_when_the_session_is_made(value, message):
    """A node of another contract version (a newer medmamba-edge's) ran as version 2's, though quantize,
    build-engine and export-triton refuse it; an absent plugin_version is the contract's own node."""
    model = ss2d_node_model(8, 2, 3, 1, 4)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "plugin_version"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("plugin_version", value)])
    with pytest.raises(Exception, match=f"SS2DScan node 'ss2d': {message}"):
        session(model)
    del node.attribute[-1]
    session(model)


def test_one_and_two_threads_give_the_same_bits():
    model = ss2d_node_model(64, 12, 13, 3, 16)
    arrays = make_ss2d_inputs(2, 64, 12, 13, 3, 16, seed=3)
    one, two = (run_scan(session(model, threads), arrays) for threads in (1, 2))
    np.testing.assert_array_equal(one, two)


def test_denormals_work_again_in_the_next_node():
    """The kernel flushes denormals to zero on ONNX Runtime's threads while it runs, and must leave them as it
    found them: a Mul after the scan, on the same thread, still produces denormals."""
    model = ss2d_node_model(16, 5, 6, 2, 4)
    model.graph.node.append(helper.make_node("Mul", ["y", "tiny"], ["z"]))
    model.graph.initializer.append(helper.make_tensor("tiny", TensorProto.FLOAT, [], [1e-39]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    y, z = session(model, threads=1).run(None, dict(zip(NAMES, make_ss2d_inputs(1, 16, 5, 6, 2, 4, seed=8))))
    # Looked at as bits: a leaked flush-to-zero would also flush this thread's own float maths.
    magnitude = z.view(np.uint32) & 0x7FFFFFFF
    assert ((magnitude != 0) & (magnitude < 0x00800000)).mean() > 0.5  # mostly denormals, not zeros
    np.testing.assert_array_equal(z, y * np.float32(1e-39))


def test_same_kernel_as_the_python_extension(monkeypatch):
    """Each compiled path this CPU runs, forced by MEDMAMBA_EDGE_SCAN_ISA, gives the extension's exact output."""
    if not scan_cpu.available():
        pytest.skip(scan_cpu.unavailable_reason())
    model = ss2d_node_model(42, 9, 11, 3, 16)
    arrays = make_ss2d_inputs(1, 42, 9, 11, 3, 16, seed=11)
    runnable = [isa for isa in scan_cpu.compiled_isas() if scan_cpu.cpu_supports(isa)]
    for isa in runnable:
        monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
        np.testing.assert_array_equal(run_scan(session(model), arrays), scan_cpu.ss2d_scan(*arrays), err_msg=isa)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "minus-inf"])
def test_nan_or_plus_inf_in_A_makes_its_channel_nan_minus_inf_the_reference_on_every_path(monkeypatch, value):
    """A NaN in A (a corrupt A_logs) gave finite outputs on every compiled path, which a model then turned into
    plausible logits (a NaN in the first block's A of the trained checkpoint: `run` classified every image, exit 0);
    the reference gives NaN for that channel, and the run refuses non-finite logits. Other channels are unchanged.
    A = -inf (an A_logs whose exp overflows) is a state that forgets at once, finite in the reference, and stays
    so: the first marking made it NaN on every path."""
    model = ss2d_node_model(40, 7, 9, 3, 16)
    arrays = make_ss2d_inputs(2, 40, 7, 9, 3, 16, seed=5)
    arrays[4][2 * 40 + 21, 6] = value  # direction 2, channel 21
    with np.errstate(invalid="ignore"):  # +inf: exp(inf) times a state of 0 is the NaN the test expects
        ref = ss2d_reference64(*arrays)
    assert np.isfinite(np.delete(ref, 21, axis=-1)).all()
    finite = np.isfinite(ref[..., 21])
    assert finite.all() if value < 0 else not finite.any()
    for isa in [isa for isa in scan_cpu.compiled_isas() if scan_cpu.cpu_supports(isa)]:
        monkeypatch.setenv(scan_cpu.ISA_ENV, isa)
        for y in (run_scan(session(model), arrays), scan_cpu.ss2d_scan(*arrays)):
            if value < 0:
                assert_relative(y, ref)
            else:
                assert np.isnan(y[..., 21]).all(), isa
                assert_relative(np.delete(y, 21, axis=-1), np.delete(ref, 21, axis=-1))


@pytest.mark.parametrize("value,shown", [("avx1024", "avx1024"), ("avx512" + " " * 30 + "bogus", "avx512 +[.][.][.]"),
                                        ("avx2\x1c", "avx2\x1c")],
                         ids=["unknown", "known-prefix-of-a-long-value", "a-separator-python-calls-space"])
def test_unknown_isa_is_refused_when_the_session_is_made(monkeypatch, value, shown):
    monkeypatch.setenv(scan_cpu.ISA_ENV, value)
    # ONNX Runtime's errors are its own Exception subclasses (Fail, InvalidArgument, ...), RuntimeError before 1.2x
    with pytest.raises(Exception, match=f"{scan_cpu.ISA_ENV}='{shown}': this build of the CPU scan has the paths"):
        session(ss2d_node_model(8, 2, 3, 1, 4))
    with pytest.raises(ValueError, match="this build of the CPU scan has the paths"):
        scan_cpu.isa()  # the Python path refuses the same values


@pytest.mark.parametrize("index,shape,message", [
    (0, (2, 40, 63), r"x must be \(batch, channels, height, width\), got \(2, 40, 63\)"),
    (1, (2, 140, 62), r"x_dbl must be \(batch = 2, 4 \* \(dt_rank \+ 2 \* d_state\) = 140, height \* width = 63\), "
                      r"got \(2, 140, 62\)"),
    (2, (4, 39, 3), r"dt_projs_weight must be \(4, channels = 40, dt_rank\), got \(4, 39, 3\)"),
    (3, (4, 40, 1), r"dt_projs_bias must be \(4, channels = 40\), got \(4, 40, 1\)"),
    (4, (160, 15), r"x_dbl must be \(batch = 2, 4 \* \(dt_rank \+ 2 \* d_state\) = 132"),  # N from A
    (4, (159, 16), r"A must be \(4 \* channels = 160, d_state\), got \(159, 16\)"),
    (5, (40,), r"Ds must be \(4 \* channels = 160,\), got \(40,\)"),
    (0, (2, 0, 2**40, 1), r"x is too large \(height \* width at most 2\^26\), got \(2, 0, 1099511627776, 1\)"),
])
def test_bad_shapes_are_an_onnxruntime_error(index, shape, message):
    """Bad shapes end in an ONNX Runtime error naming the node and the input, never in a crash; the session still
    works afterwards. Inputs are declared shapeless here so that the kernel, not ORT, sees them."""
    model = ss2d_node_model(40, 7, 9, 3, 16)
    for value in model.graph.input:
        value.type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    sess = session(model)
    arrays = make_ss2d_inputs(2, 40, 7, 9, 3, 16)
    bad = list(arrays)
    bad[index] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(Exception, match=rf"SS2DScan node 'ss2d': {message}") as caught:
        run_scan(sess, bad)
    assert "INVALID_ARGUMENT" in str(caught.value)
    assert_relative(run_scan(sess, arrays), ss2d_reference64(*arrays))


def test_an_onnxruntime_without_c_api_17_is_refused_with_its_version():
    """RegisterCustomOps against an OrtApiBase that offers versions up to 16 only (ONNX Runtime 1.16's): a status
    saying what is needed, not a crash, and without asking for version 17 (1.16's GetApi prints a line of its own
    then). The real runtime's table answers for versions <= 16."""
    capi = Path(ort.__file__).parent / "capi"
    runtime = ctypes.CDLL(str(next(capi.glob("libonnxruntime.so*"))))
    runtime.OrtGetApiBase.restype = ctypes.POINTER(ctypes.c_void_p * 2)
    get_api_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_type = ctypes.CFUNCTYPE(ctypes.c_void_p)  # a char* that must outlive the callback: our buffer's
    real_get_api = get_api_type(runtime.OrtGetApiBase().contents[0])
    asked = []
    fake_get_api = get_api_type(lambda version: asked.append(version) or (real_get_api(version) if version <= 16 else None))
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
    assert 17 not in asked


def test_the_library_names_no_folder_of_the_machine_that_built_it():
    """It is copied into Triton model repositories and C++ deployments; Python's link flags (pyenv's) carried a
    -rpath to its own lib folder."""
    try:
        dynamic = subprocess.run(["readelf", "-d", str(LIBRARY)], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        pytest.skip("readelf (binutils) is not installed")
    assert "NEEDED" in dynamic
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic


def test_run_paths_are_dropped_from_the_link_however_they_are_spelled():
    """Dropping only the argument that began -Wl,-rpath left a split pair's folder (LDFLAGS="-Wl,-rpath -Wl,/x"),
    which ld read as an input file: the library was not built, and pip said nothing."""
    import runpy
    from unittest import mock

    import setuptools

    with mock.patch.object(setuptools, "setup"):
        without_run_paths = runpy.run_path(str(Path(__file__).parents[1] / "setup.py"))["without_run_paths"]
    assert without_run_paths(["gcc", "-shared", "-L/a", "-Wl,-rpath,/a", "-Wl,-rpath=/b", "-pthread"]) == [
        "gcc", "-shared", "-L/a", "-pthread"]
    assert without_run_paths(["gcc", "-Wl,-rpath", "-Wl,/opt/lib", "-Wl,-z,nodelete"]) == ["gcc", "-Wl,-z,nodelete"]
    assert without_run_paths(["gcc", "-Wl,--enable-new-dtags,-rpath,/x", "-Wl,-R,/y", "-Xlinker", "-rpath",
                              "-Xlinker", "/z", "-Xlinker", "-O1", "-Wl,-O1,--rpath,/w,--as-needed", "-Wl,-R/v"]) == [
        "gcc", "-Wl,--enable-new-dtags", "-Xlinker", "-O1", "-Wl,-O1,--as-needed"]


def test_the_library_is_not_linked_to_python_on_windows(monkeypatch):
    """build_ext links what it builds on Windows against pythonXY where the compiler is not MSVC (MinGW-w64, the one
    that builds the library there): the DLL then needed that Python's DLL, and a C++ host or Triton could not load
    it. Read as Windows would, with MinGW's compiler; the scan extension, a Python module, still links Python."""
    import runpy
    from unittest import mock

    import setuptools
    from setuptools import Distribution

    with mock.patch.object(setuptools, "setup") as setup:
        runpy.run_path(str(Path(__file__).parents[1] / "setup.py"))
    scan, library = setup.call_args.kwargs["ext_modules"]
    command = setup.call_args.kwargs["cmdclass"]["build_ext"](Distribution())
    command.compiler = mock.Mock(compiler_type="mingw32")
    monkeypatch.setattr(sys, "platform", "win32")
    assert command.get_libraries(library) == []
    assert command.get_libraries(scan) == [f"python{sys.version_info.major}{sys.version_info.minor}"]


def test_a_missing_library_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(custom_ops, "LIBRARY_NAME", "libmedmamba_ort_ops_absent.so")
    with pytest.raises(custom_ops.FusedScanUnavailable, match=r"^a plugin-form model .* runs its scan in ONNX "
                       r"Runtime through libmedmamba_ort_ops_absent.so, which is not built: .*setup.py build_ext "
                       r"--inplace.*--scan portable$"):
        custom_ops.make_fused_session(ss2d_node_model(8, 2, 3, 1, 4))


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
    broken = tmp_path / custom_ops.LIBRARY_NAME
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(custom_ops, "library_path", lambda: broken)
    with pytest.raises(custom_ops.FusedScanUnavailable, match=rf"^ONNX Runtime {ort.__version__} cannot load "
                       rf"{custom_ops.LIBRARY_NAME} \(.+\); or export with --scan portable$"):
        custom_ops.fused_session_options()


def test_run_without_the_library_is_one_line(bundled_forms, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from medmamba_edge.cli import app
    from medmamba_edge.runtime.bundled import sample_image_paths

    monkeypatch.setattr(custom_ops, "LIBRARY_NAME", "libmedmamba_ort_ops_absent.so")
    result = CliRunner().invoke(app, ["run", str(bundled_forms["plugin"]), str(sample_image_paths()[0]),
                                      "--jsonl", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 1, result.output
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output, result.output
    # The model named: `evaluate portable.onnx plugin.onnx` did not say which of the two needs the library.
    assert f"{bundled_forms['plugin']}: a plugin-form model" in result.output.replace("\n", "")
    assert "libmedmamba_ort_ops_absent.so, which is not built" in result.output
    assert "--scan portable" in result.output


def test_onnx_runtimes_own_log_stays_quiet_under_our_one_line(bundled_forms, tmp_path):
    """ONNX Runtime logged the failure itself too, raw and coloured, before our line (a process's real stderr)."""
    from medmamba_edge.runtime.bundled import sample_image_paths

    result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "run", str(bundled_forms["plugin"]),
                             str(sample_image_paths()[0])], capture_output=True, text=True,
                            env={**os.environ, scan_cpu.ISA_ENV: "avx9"}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr


@pytest.mark.parametrize("form", ["plugin", "portable"])
def test_both_forms_check_threads_alike(bundled_forms, form):
    from medmamba_edge.errors import UserError
    from medmamba_edge.runtime.backends import open_backend

    for threads in (0, -1, 2.5, "2", True):
        with pytest.raises(UserError, match="threads must be between 1 and"):
            open_backend(bundled_forms[form], threads=threads)
    with open_backend(bundled_forms[form], threads=1) as backend:
        assert backend.run(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 2)


def test_a_model_replaced_while_it_is_opened_is_not_paired_with_the_metadata_read_before(bundled_forms, tmp_path,
                                                                                         monkeypatch):
    """`export` renames a new file over the model. Its metadata is read from the file's header and its graph by
    ONNX Runtime: a file replaced between the two reads would pair one version's class names with the other's
    graph, unless the session's own metadata is checked against the one read."""
    import shutil

    import onnxruntime

    from medmamba_edge.runtime.backends.onnxruntime import custom_ops
    from medmamba_edge.runtime.backends import BackendError, open_backend
    from medmamba_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata

    path, other = tmp_path / "m.onnx", tmp_path / "other.onnx"
    shutil.copyfile(bundled_forms["portable"], path)
    model = onnx.load(str(path))
    write_onnx_metadata(model, read_onnx_metadata(model).replace(class_names=("b", "a")))
    onnx.save(model, str(other))

    real_session = onnxruntime.InferenceSession

    def replaced_first(source, *args, **kwargs):  # the export's rename, between the two reads
        os.replace(other, path)
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(custom_ops.ort, "InferenceSession", replaced_first)
    with pytest.raises(BackendError, match="m.onnx: the file changed while it was opened"):
        open_backend(path)

    def removed_after(source, *args, **kwargs):  # `rm model.onnx; cp new.onnx model.onnx`, caught in between
        session = real_session(source, *args, **kwargs)
        os.remove(path)
        return session

    monkeypatch.setattr(custom_ops.ort, "InferenceSession", removed_after)
    with pytest.raises(BackendError, match="m.onnx: the file changed while it was opened"):  # a traceback before
        open_backend(path)


def _varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
    return out + bytes([value])


def test_metadata_read_from_the_file_header_as_onnx_reads_it(bundled_forms, tmp_path):
    """Another tool's metadata entry in Latin-1 (proto2 strings may hold any bytes; onnx and ONNX Runtime load it),
    after the graph; and a graph whose scan nodes its metadata does not own to, said as such."""
    from medmamba_edge.runtime.backends import BackendError, open_backend
    from medmamba_edge.runtime.metadata import MetadataError, read_onnx_metadata, write_onnx_metadata

    value = "Universit\xe9 Hospital".encode("latin-1")
    entry = b"\x0a\x04site\x12" + bytes([len(value)]) + value
    latin = tmp_path / "latin.onnx"
    latin.write_bytes(bundled_forms["portable"].read_bytes() + b"\x72" + bytes([len(entry)]) + entry)
    assert onnx.load(str(latin)).metadata_props[-1].key == "site"
    with open_backend(latin) as backend:  # "not a readable ONNX model (UnicodeDecodeError ...)" before
        assert backend.metadata == read_onnx_metadata(onnx.load(str(bundled_forms["portable"])))
    # Our own entry in Latin-1 (appended: the last of a key is the one read): refused by every reader, where the
    # file reader passed its class names on as escapes and export-triton and quantize raised UnicodeDecodeError.
    ours = dict((p.key, p.value) for p in onnx.load(str(latin)).metadata_props)["medmamba_edge"]
    value = ours.replace('"normal"', '"norm\xe9"').encode("latin-1")
    key = b"medmamba_edge"
    entry = b"\x0a" + bytes([len(key)]) + key + b"\x12" + _varint(len(value)) + value
    (tmp_path / "ours.onnx").write_bytes(latin.read_bytes() + b"\x72" + _varint(len(entry)) + entry)
    for read in (lambda: read_onnx_metadata(tmp_path / "ours.onnx"),
                 lambda: read_onnx_metadata(onnx.load(str(tmp_path / "ours.onnx")), "ours.onnx")):
        with pytest.raises(MetadataError, match=r"ours\.onnx: its medmamba-edge metadata is not UTF-8 text"):
            read()
    model = onnx.load(str(bundled_forms["plugin"]))
    write_onnx_metadata(model, read_onnx_metadata(model).replace(scan_form="portable"))
    onnx.save(model, str(tmp_path / "says_portable.onnx"))
    with pytest.raises(BackendError, match=r"says_portable\.onnx: its graph holds SS2DScan nodes, though its "
                                           r"metadata says scan_form 'portable'"):
        open_backend(tmp_path / "says_portable.onnx")


def test_closing_a_backend_while_another_thread_runs_it_never_breaks_that_run(bundled_forms, tmp_path):
    from medmamba_edge.runtime.backends import BackendError, open_backend
    from medmamba_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata

    model = onnx.load(str(bundled_forms["portable"]))  # a fixed batch of 1: a batch of 3 runs as three chunks
    write_onnx_metadata(model, read_onnx_metadata(model).replace(batch=1))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(tmp_path / "b1.onnx"))
    backend = open_backend(tmp_path / "b1.onnx")

    class ClosingOnFirstRun:  # the other thread's close(), between the first chunk and the second
        def __init__(self, session):
            self.session = session

        def run(self, *args):
            backend.close()
            return self.session.run(*args)

    backend.session = ClosingOnFirstRun(backend.session)
    assert backend.run(np.zeros((3, 3, 32, 32), np.float32)).shape == (3, 2)  # the run that had started finishes
    with pytest.raises(BackendError, match="the model was closed"):
        backend.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(BackendError, match="the model was closed"):
        backend.describe()


def test_run_with_an_unknown_scan_path_forced_is_one_line(bundled_forms, monkeypatch, tmp_path):
    """ONNX Runtime's own exception types (Fail, not RuntimeError since 1.2x) end as one line too."""
    from typer.testing import CliRunner

    from medmamba_edge.cli import app
    from medmamba_edge.runtime.bundled import sample_image_paths

    monkeypatch.setenv(scan_cpu.ISA_ENV, "avx1024")
    result = CliRunner().invoke(app, ["run", str(bundled_forms["plugin"]), str(sample_image_paths()[0]),
                                      "--jsonl", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 1, result.output
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert f"{bundled_forms['plugin']}: ONNX Runtime cannot load it" in result.output
    assert f"{scan_cpu.ISA_ENV}='avx1024'" in result.output
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("version,shown", [(b"3", "3"), (b"3\xff", "3\\xff")], ids=["3", "not-utf-8"])
def test_run_refuses_an_ss2dscan_node_of_another_plugin_version_in_one_line(bundled_forms, tmp_path, version, shown):
    """`run` classified with a node of plugin version 3 (exit 0) where quantize refused the same model by name; one
    whose bytes are not UTF-8 ended in a UnicodeDecodeError's traceback, from ONNX Runtime's binding decoding the
    library's refusal, then from ours reading the attribute."""
    from typer.testing import CliRunner

    from medmamba_edge.cli import app
    from medmamba_edge.runtime.bundled import sample_image_paths

    model = onnx.load(str(bundled_forms["plugin"]))
    node = next(n for n in model.graph.node if scan_node.is_scan_node(n))
    next(a for a in node.attribute if a.name == "plugin_version").s = version
    newer = tmp_path / "newer.onnx"
    onnx.save(model, str(newer))
    result = CliRunner().invoke(app, ["run", str(newer), str(sample_image_paths()[0]),
                                      "--jsonl", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 1, result.output
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert (f"{newer}: it holds a SS2DScan node of plugin version {shown}, which this medmamba-edge (plugin version 2, "
            f"SS2DScan) does not run; export it again from its checkpoint with this medmamba-edge") in result.output
    assert not (tmp_path / "r.jsonl").exists()


def test_a_model_with_the_retired_selective_scan_node_is_one_line(bundled_forms, tmp_path):
    """Version 1's SelectiveScan node (before SS2DScan) is refused by name, with what to do, when the model is
    opened: by `run` (ONNX Runtime), by `quantize` before its calibration (whose ONNX Runtime session ended in a
    traceback) and by `build-engine` before TensorRT is needed."""
    from typer.testing import CliRunner

    from medmamba_edge.cli import app
    from medmamba_edge.runtime.bundled import sample_image_paths

    model = onnx.load(str(bundled_forms["plugin"]))
    node = next(n for n in model.graph.node if scan_node.is_scan_node(n))
    node.op_type = "SelectiveScan"
    next(a for a in node.attribute if a.name == "plugin_version").s = b"1"
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    for args in (["run", str(old), str(sample_image_paths()[0]), "--jsonl", str(tmp_path / "r.jsonl")],
                 ["quantize", str(old), "--calib", str(sample_image_paths()[0].parent), "-o", str(tmp_path / "q.onnx")],
                 ["build-engine", str(old), "-o", str(tmp_path / "old.engine")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output, result.output
        assert (f"{old}: it holds a SelectiveScan node of plugin version 1, which this medmamba-edge (plugin "
                f"version 2, SS2DScan) no longer runs; export it again from its checkpoint") in result.output
    assert not any((tmp_path / name).exists() for name in ("r.jsonl", "q.onnx", "old.engine"))


def test_a_model_failing_in_its_scan_node_is_one_line_in_evaluate_and_compare(bundled_forms, tmp_path):
    """A graph that loads and then fails in an SS2DScan node (its x reshaped to rank 3 by an edit) ended evaluate
    and compare in ONNX Runtime's traceback; run went on, naming no model. Each now names the file."""
    from typer.testing import CliRunner

    from medmamba_edge.cli import app
    from medmamba_edge.runtime.bundled import sample_image_paths
    from tests.shared_data import PNEUMONIAMNIST, require_shared

    model = onnx.load(str(bundled_forms["plugin"]))
    node = next(n for n in model.graph.node if scan_node.is_scan_node(n))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, -1], np.int64), "rank3"))
    model.graph.node.insert(list(model.graph.node).index(node),
                            helper.make_node("Reshape", [node.input[0], "rank3"], ["x_rank3"]))
    node.input[0] = "x_rank3"
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    failure = (f"{re.escape(str(edited))}: ONNX Runtime failed running it \\(.*SS2DScan node '{node.name}': "
               r"x must be \(batch, channels, height, width\), got \(\d+, \d+, \d+\)\)")
    for args in (["evaluate", str(edited), "--data", str(require_shared(*PNEUMONIAMNIST)), "--batch", "1"],
                 ["compare", str(bundled_forms["plugin"]), str(edited)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
        assert re.search(f"^error: {failure}$", result.output.strip()), result.output
    result = CliRunner().invoke(app, ["run", str(edited), str(sample_image_paths()[0])])
    assert result.exit_code == 1 and re.search(f"the model failed on this batch \\(BackendError: {failure}\\)",
                                               result.output), result.output
