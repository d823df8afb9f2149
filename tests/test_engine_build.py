"""`build-engine` and the TensorRT backend: everything that does not need TensorRT runs here (presets,
manifests, cache keys, version dispatch, the float16 conversion on the real model in ONNX Runtime, CLI
errors); building and running an engine needs TensorRT and a GPU and is skipped without them."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator
from typer.testing import CliRunner

from medmamba_edge.cli import app
from medmamba_edge.runtime.backends.tensorrt import build as tb
from medmamba_edge.runtime.backends.tensorrt.float16 import convert_float16
from medmamba_edge.exporters.onnx_export import export_onnx
from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends import open_backend
from medmamba_edge.runtime.backends.tensorrt.manifest import (
    BuildOptions,
    EngineManifest,
    EngineManifestError,
    check_manifest,
    engine_cache_key,
    read_manifest,
    rebuild_command,
    write_manifest,
)
from medmamba_edge.runtime.metadata import ModelMetadata, read_onnx_metadata, write_onnx_metadata
from medmamba_edge.runtime.backends.tensorrt.compat import GpuInfo, TensorRTUnavailableError, tensorrt_generation
from medmamba_edge.runtime.backends.tensorrt.plugin import PLUGIN_ENV, PluginNotFoundError, find_plugin_library
from tests.shared_data import OFFICIAL_T32, require_shared
from tests.test_model import pneumoniamnist_val

runner = CliRunner()
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
ORIN = GpuInfo("Orin", "8.7", 8)  # an Orin NX 16GB


def tensorrt_or_skip():
    try:
        from medmamba_edge.runtime.backends.tensorrt.compat import current_gpu, import_tensorrt

        trt = import_tensorrt()
        current_gpu()
    except TensorRTUnavailableError:
        pytest.skip("TensorRT not installed: PyPI wheels here are stubs that download from an unreachable host; "
                    "runs on a Jetson (JetPack 6.1+) or an x86 GPU machine with TensorRT 10.3+")
    except Exception as exc:  # CudaError: no GPU
        pytest.skip(f"no CUDA GPU ({exc})")
    return trt


def tensorrt_missing() -> bool:
    try:
        from medmamba_edge.runtime.backends.tensorrt.compat import import_tensorrt

        import_tensorrt()
    except TensorRTUnavailableError:
        return True
    return False


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The official checkpoint at 32×32, dynamic batch: plugin form as exported, portable form lowered from it."""
    folder = tmp_path_factory.mktemp("engine")
    plugin_path = folder / "t32_plugin.onnx"
    # Verification against PyTorch is test_export's job; skipping it keeps this module fast.
    export_onnx(require_shared(*OFFICIAL_T32), plugin_path, input_size=32, batch=None, scan="plugin", verify=False)
    plugin = onnx.load(str(plugin_path))
    portable = lower_ss2d_scan(plugin)
    write_onnx_metadata(portable, read_onnx_metadata(plugin).replace(scan_form="portable"))
    portable_path = folder / "t32_portable.onnx"
    onnx.save(portable, str(portable_path))
    return {"plugin": plugin, "portable": portable, "plugin_path": plugin_path, "portable_path": portable_path}


# ---- presets and options -------------------------------------------------------------------------------

def test_presets_fill_defaults_and_explicit_options_win():
    nano = tb.resolve_options("orin-nano", fp16=True)
    assert (nano.workspace_mib, nano.opt_level, nano.dla_core, nano.preset) == (1024, 3, None, "orin-nano")
    assert tb.resolve_options("orin-nx", fp16=True).dla_core == 0
    assert tb.resolve_options("agx-orin", int8=True).dla_core == 0
    assert tb.resolve_options("thor", fp16=True).dla_core is None
    assert tb.resolve_options("orin-nx").dla_core is None, "DLA has no FP32: an FP32 build stays on the GPU"
    explicit = tb.resolve_options("agx-orin", fp16=True, workspace_mib=512, opt_level=1, dla_core=1)
    assert (explicit.workspace_mib, explicit.opt_level, explicit.dla_core) == (512, 1, 1)
    assert tb.resolve_options("orin-nx", fp16=True, dla_core=-1).dla_core is None
    # Where TensorRT offers no DLA (11.0-11.3) a build drops the preset's pick, never the user's own.
    assert tb.resolve_options("orin-nx", fp16=True).dla_from_preset
    assert not tb.resolve_options("orin-nx", fp16=True, dla_core=0).dla_from_preset
    assert "dla_from_preset" not in tb.resolve_options("orin-nx", fp16=True).key_fields()
    assert tb.resolve_options("dgpu").workspace_mib is None and tb.resolve_options(None) == BuildOptions()


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "xavier"}, "--preset must be one of orin-nano, orin-nx, agx-orin, thor, dgpu"),
    ({"dla_core": 0}, "DLA runs FP16 or INT8 only"),
    ({"opt_level": 6}, "--opt-level must be 0..5"),
    ({"workspace_mib": 0}, "--workspace must be a positive"),
    ({"max_batch": 0}, "--max-batch must be >= 1"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(tb.EngineBuildError, match=message.replace(".", r"\.")):
        tb.resolve_options(**kwargs)


def test_batch_profile_for_dynamic_and_fixed_models():
    assert tb.batch_profile(BuildOptions(), None) == (1, 1, 8)
    assert tb.batch_profile(BuildOptions(max_batch=32, opt_batch=16), None) == (1, 16, 32)
    assert tb.batch_profile(BuildOptions(min_batch=16), None) == (16, 16, 16)
    assert tb.batch_profile(BuildOptions(max_batch=4), 4) == (4, 4, 4)
    with pytest.raises(tb.EngineBuildError, match="fixed batch of 1, so --max-batch 8 cannot apply"):
        tb.batch_profile(BuildOptions(max_batch=8), 1)
    with pytest.raises(tb.EngineBuildError, match="min <= opt <= max"):
        tb.batch_profile(BuildOptions(min_batch=4, opt_batch=2, max_batch=8), None)


# ---- TensorRT generations ------------------------------------------------------------------------------

def test_version_dispatch():
    jetpack6 = tensorrt_generation("10.3.0")
    assert not jetpack6.strongly_typed and not jetpack6.plugin_override_flag
    assert jetpack6.builder_flags(fp16=True, int8=False) == ("FP16",)
    assert jetpack6.builder_flags(fp16=True, int8=True) == ("FP16", "INT8")
    assert not jetpack6.converts_graph_to_fp16(fp16=True)
    assert tensorrt_generation("10.13.1.26").version == (10, 13, 1)
    assert tensorrt_generation("10.15.1").plugin_override_flag
    trt11 = tensorrt_generation("11.0.0")
    assert trt11.strongly_typed and trt11.plugin_override_flag
    assert trt11.builder_flags(fp16=True, int8=True) == ()
    assert trt11.converts_graph_to_fp16(fp16=True) and not trt11.converts_graph_to_fp16(fp16=False)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT 8.6.1 is not supported.*JetPack 5"):
        tensorrt_generation("8.6.1")
    with pytest.raises(TensorRTUnavailableError, match="unrecognised TensorRT version"):
        tensorrt_generation("ten")


# ---- manifests and the engine cache --------------------------------------------------------------------

def make_manifest(**changes) -> EngineManifest:
    fields = dict(
        tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", gpu_multiprocessors=8, precision="fp16",
        profile={"input": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [8, 3, 32, 32]}},
        onnx_path="/models/t32 plugin.onnx", onnx_sha256="a" * 64, plugin_sha256="b" * 64,
        build=BuildOptions(fp16=True, max_batch=8, workspace_mib=2048, opt_level=3, preset="orin-nx"),
        metadata=ModelMetadata(input_size=(32, 32), class_names=("normal", "pneumonia"), batch=None, precision="fp16"),
    )
    return EngineManifest(**{**fields, **changes})


def test_manifest_round_trip_is_atomic(tmp_path):
    engine = tmp_path / "model.engine"
    manifest = make_manifest()
    path = write_manifest(engine, manifest)
    assert path.name == "model.engine.json" and [p.name for p in tmp_path.iterdir()] == ["model.engine.json"]
    assert read_manifest(engine) == manifest
    data = json.loads(path.read_text())
    assert data["metadata"]["class_names"] == ["normal", "pneumonia"] and data["build"]["fp16"] is True


def test_manifests_read_across_versions(tmp_path):
    """A build-only field written into a manifest made every earlier reader refuse it; a build field a later
    version adds is left out, as an unknown top-level key is."""
    engine = tmp_path / "model.engine"
    path = write_manifest(engine, make_manifest(build=tb.resolve_options("orin-nx", fp16=True)))
    assert "dla_from_preset" not in json.loads(path.read_text())["build"]
    data = json.loads(path.read_text())
    data["build"]["from_a_later_version"] = 1
    path.write_text(json.dumps(data))
    assert read_manifest(engine).build.dla_core == 0


def test_missing_or_broken_manifest_is_a_clear_error(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(EngineManifestError, match="no manifest .model.engine.json.*medmamba-edge build-engine"):
        open_backend(engine)  # before TensorRT is even imported
    (tmp_path / "model.engine.json").write_text("{")
    with pytest.raises(EngineManifestError, match="not a valid engine manifest"):
        read_manifest(engine)


def test_mismatch_names_both_sides_and_the_rebuild_command():
    manifest = make_manifest()
    check_manifest(manifest, "m.engine", "10.3.0", ORIN)
    with pytest.raises(EngineManifestError) as error:
        check_manifest(manifest, "m.engine", "10.13.1", GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    message = str(error.value)
    assert "built with TensorRT 10.3.0, running 10.13.1" in message
    assert "built for Orin (compute capability 8.7, 8 SMs), running on NVIDIA H100 80GB HBM3 (compute capability 9.0)" in message
    command = "medmamba-edge build-engine '/models/t32 plugin.onnx' -o m.engine --fp16 --preset orin-nx --max-batch 8 --dla-core -1"
    assert message.endswith(f"rebuild it: {command}") and rebuild_command(manifest, "m.engine") == command


def test_jetson_orin_modules_are_told_apart_by_their_sm_count():
    """Every Orin module reports "Orin", 8.7: an engine built on an Orin NX ran unchecked on an Orin Nano."""
    with pytest.raises(EngineManifestError, match=r"built for Orin \(compute capability 8.7, 8 SMs\), running on "
                                                  r"Orin \(compute capability 8.7, 4 SMs\)"):
        check_manifest(make_manifest(), "m.engine", "10.3.0", GpuInfo("Orin", "8.7", 4))
    # A manifest written before the count was recorded is judged by name and capability, as it was then.
    check_manifest(make_manifest(gpu_multiprocessors=None), "m.engine", "10.3.0", GpuInfo("Orin", "8.7", 4))


def test_an_engine_on_a_dla_core_the_device_lacks_is_refused_with_its_rebuild_command():
    """An Orin NX's engine on DLA core 0 passed on an Orin Nano 8GB (the same 8-SM GPU, its DLA fused off) and failed
    inside TensorRT's deserialisation instead."""
    on_dla = make_manifest(build=BuildOptions(fp16=True, max_batch=8, workspace_mib=2048, opt_level=3,
                                              dla_core=0, preset="orin-nx"))
    check_manifest(on_dla, "m.engine", "10.3.0", ORIN, dla_cores=2)
    check_manifest(make_manifest(), "m.engine", "10.3.0", ORIN, dla_cores=0)  # a GPU engine runs on either board
    with pytest.raises(EngineManifestError, match=r"built for DLA core 0, and this device has 0 DLA cores\); "
                                                  r"rebuild it: .* --fp16 --preset orin-nx --max-batch 8$"):
        check_manifest(on_dla, "m.engine", "10.3.0", ORIN, dla_cores=0)


def test_compatibility_flags_relax_the_checks():
    versions = make_manifest(build=BuildOptions(fp16=True, version_compatible=True))
    check_manifest(versions, "m.engine", "11.0.0", ORIN)
    with pytest.raises(EngineManifestError, match="built with TensorRT 10.3.0, running 10.2.0"):
        check_manifest(versions, "m.engine", "10.2.0", ORIN)
    hardware = make_manifest(build=BuildOptions(hardware_compat=True))
    check_manifest(hardware, "m.engine", "10.3.0", GpuInfo("NVIDIA RTX A6000", "8.6"))
    with pytest.raises(EngineManifestError, match="built for an Ampere or newer GPU, running on Tesla T4"):
        check_manifest(hardware, "m.engine", "10.3.0", GpuInfo("Tesla T4", "7.5"))


def test_an_engine_from_another_cpu_architecture_is_refused_with_its_rebuild_command():
    """A plan runs only on the OS and CPU architecture it was built on (TensorRT's RuntimePlatform::kSAME_AS_BUILD),
    which the manifest did not record: a hardware-compatible engine from an x86_64 desktop passed the check on a
    Jetson Orin (compute capability 8.7: an Ampere GPU), to fail in TensorRT's deserialisation."""
    desktop = make_manifest(build=BuildOptions(fp16=True, hardware_compat=True), cpu_architecture="x86_64")
    check_manifest(desktop, "m.engine", "10.3.0", GpuInfo("NVIDIA RTX A6000", "8.6"), cpu_architecture="x86_64")
    with pytest.raises(EngineManifestError, match=r"\(built on an x86_64 machine, running on aarch64\); rebuild it: "
                                                  r"medmamba-edge build-engine .* --hardware-compat"):
        check_manifest(desktop, "m.engine", "10.3.0", ORIN, cpu_architecture="aarch64")
    assert desktop.runs_on == "TensorRT 10.3.0, on an Ampere or newer GPU in an x86_64 machine"
    check_manifest(make_manifest(), "m.engine", "10.3.0", ORIN, cpu_architecture="aarch64")  # not recorded: not judged


def test_where_an_engine_runs_names_the_cpu_architecture_it_is_held_to():
    """check_manifest holds every engine to the machine it was built on, and export-triton's README says where one
    runs from runs_on, which named the architecture only for a hardware-compatible plan: an A100's engine from an
    x86_64 server read 'on the GPU it was built on, NVIDIA A100' and was refused on an aarch64 one with that GPU."""
    a100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0", 108)
    server = make_manifest(gpu_name=a100.name, compute_capability=a100.compute_capability,
                           gpu_multiprocessors=a100.multiprocessors, cpu_architecture="x86_64")
    assert server.runs_on == ("TensorRT 10.3.0, on the GPU it was built on, NVIDIA A100-SXM4-80GB (compute capability "
                              "8.0, 108 SMs) in an x86_64 machine")
    with pytest.raises(EngineManifestError, match=r"built on an x86_64 machine, running on aarch64"):
        check_manifest(server, "m.engine", "10.3.0", a100, cpu_architecture="aarch64")
    assert make_manifest().runs_on.endswith("(compute capability 8.7, 8 SMs)")  # not recorded: not said


def test_rebuild_command_is_a_valid_cli_call(tmp_path):
    manifest = make_manifest(onnx_path=str(tmp_path / "absent.onnx"),
                             build=BuildOptions(int8=True, fp16=True, min_batch=2, opt_batch=4, max_batch=8,
                                                dla_core=1, version_compatible=True, hardware_compat=True,
                                                timing_cache=str(tmp_path / "t.cache")))
    args = shlex.split(rebuild_command(manifest, tmp_path / "m.engine"))[1:]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # 2 would be a usage error: an option the CLI does not know
    assert "absent.onnx: no such ONNX file" in result.output


@pytest.mark.parametrize("asked", [
    ["--fp16", "--preset", "orin-nx"],  # DLA core 0 from the preset: dropped by it where there is no DLA
    ["--fp16", "--preset", "orin-nx", "--dla-core", "-1"],
    ["--int8", "--preset", "agx-orin", "--dla-core", "1", "--workspace", "512"],
    ["--preset", "orin-nx"],  # fp32: no DLA
    ["--fp16", "--preset", "dgpu", "--opt-level", "5", "--max-batch", "16"],
    ["--fp16", "--workspace", "2048", "--dla-core", "0"],
])
def test_rebuild_command_gives_the_options_it_was_built_with(asked, tmp_path, monkeypatch):
    """The command an engine's mismatch prints spelled a preset's DLA core out as --dla-core 0, which fails on a
    device without DLA (TensorRT 11.0-11.3 on Jetson), where the preset drops it; and it left the preset out."""
    built = []
    monkeypatch.setattr(tb, "build_engine", lambda model, output, options, **_: built.append(options) or 1 / 0)
    model = tmp_path / "m.onnx"
    for args in (asked, None):
        if args is None:
            manifest = make_manifest(onnx_path=str(model), build=built[0])
            args = shlex.split(rebuild_command(manifest, tmp_path / "m.engine"))[5:]
        runner.invoke(app, ["build-engine", str(model), "-o", str(tmp_path / "m.engine"), *args])
    assert len(built) == 2 and built[1] == built[0], asked
    if asked[:3] == ["--fp16", "--preset", "orin-nx"] and len(asked) == 3:
        assert args == ["--fp16", "--preset", "orin-nx"]


def test_cache_key_is_stable_and_changes_with_every_input():
    options = BuildOptions(fp16=True)
    key = engine_cache_key("a" * 64, options, "10.3.0", ORIN, "b" * 64)
    assert key == engine_cache_key("a" * 64, BuildOptions(fp16=True), "10.3.0", GpuInfo("Orin", "8.7", 8), "b" * 64)
    variants = [
        engine_cache_key("c" * 64, options, "10.3.0", ORIN, "b" * 64),
        engine_cache_key("a" * 64, BuildOptions(), "10.3.0", ORIN, "b" * 64),
        engine_cache_key("a" * 64, BuildOptions(int8=True), "10.3.0", ORIN, "b" * 64),
        engine_cache_key("a" * 64, options, "10.3.1", ORIN, "b" * 64),
        engine_cache_key("a" * 64, options, "10.3.0", GpuInfo("Orin Nano", "8.7", 8), "b" * 64),
        engine_cache_key("a" * 64, options, "10.3.0", GpuInfo("Orin", "8.7", 4), "b" * 64),
        engine_cache_key("a" * 64, options, "10.3.0", GpuInfo("Orin", "8.6", 8), "b" * 64),
        engine_cache_key("a" * 64, options, "10.3.0", ORIN, None),
        engine_cache_key("a" * 64, BuildOptions(fp16=True, max_batch=16), "10.3.0", ORIN, "b" * 64),
        engine_cache_key("a" * 64, BuildOptions(fp16=True, workspace_mib=512), "10.3.0", ORIN, "b" * 64),
        engine_cache_key("a" * 64, BuildOptions(fp16=True, dla_core=0), "10.3.0", ORIN, "b" * 64),
    ]
    assert len({key, *variants}) == len(variants) + 1
    # Neither a timing cache nor a preset name changes the engine.
    assert key == engine_cache_key("a" * 64, BuildOptions(fp16=True, timing_cache="t", preset="dgpu"),
                                   "10.3.0", ORIN, "b" * 64)


def test_cache_key_changes_with_the_tool_version(monkeypatch):
    """A cached engine built by an earlier float16 conversion or build recipe is not reused by a later one."""
    import medmamba_edge.runtime.backends.tensorrt.manifest as manifest_module

    key = engine_cache_key("a" * 64, BuildOptions(fp16=True), "10.3.0", ORIN, "b" * 64)
    monkeypatch.setattr(manifest_module, "__version__", "99.0.0")
    assert engine_cache_key("a" * 64, BuildOptions(fp16=True), "10.3.0", ORIN, "b" * 64) != key


def test_cache_key_changes_with_the_cpu_architecture(monkeypatch):
    """A cache in a home shared by an x86_64 and an aarch64 server with the same GPU: each builds its own."""
    import platform

    key = engine_cache_key("a" * 64, BuildOptions(fp16=True), "10.3.0", ORIN, "b" * 64)
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert engine_cache_key("a" * 64, BuildOptions(fp16=True), "10.3.0", ORIN, "b" * 64) != key


def test_unusable_engine_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEDMAMBA_EDGE_CACHE", str(blocker))
    with pytest.raises(tb.EngineCacheError, match="set MEDMAMBA_EDGE_CACHE to a writable folder"):
        tb.engine_cache_dir()


# ---- float16 conversion --------------------------------------------------------------------------------

def element_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {i.name: i.data_type for i in inferred.graph.initializer}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    return types


def run_float32(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def run_float16(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnx's reference evaluator, which computes float16 ops in float16; ONNX Runtime's CPU kernels compute
    some of them (Exp, Add) in float32, which hid an overflow to inf."""
    return ReferenceEvaluator(model).run(None, {"input": x})[0]


def test_float16_portable_graph_matches_float32(exported):
    fp32 = exported["portable"]
    before = fp32.SerializeToString()
    fp16 = convert_float16(fp32)
    assert fp32.SerializeToString() == before, "the input model is left unchanged"
    onnx.checker.check_model(fp16, full_check=True)
    assert read_onnx_metadata(fp16).precision == "fp16" and read_onnx_metadata(fp32).precision == "fp32"
    types = element_types(fp16)
    assert types["input"] == types["logits"] == FLOAT, "graph I/O stays float32"
    assert any(t == FLOAT16 for t in types.values())
    images, _ = pneumoniamnist_val()
    x = images[:16].numpy()
    reference, converted = run_float32(fp32, x), run_float16(fp16, x)
    # Logits span about ±8 here; float16 (11-bit mantissa) costs a few 1e-3. Tolerance: 0.02 absolute.
    assert np.abs(converted - reference).max() <= 0.02
    assert (converted.argmax(1) == reference.argmax(1)).all()


def test_float16_softplus_saturates_instead_of_overflowing(exported, tmp_path):
    """The portable softplus computes e^x up to x = 20 in float32; cast down as it was, e^12 became inf and
    inf - inf NaN, for every dt projection above 11.09."""
    fp16 = tmp_path / "fp16.onnx"
    onnx.save(convert_float16(exported["portable"]), fp16)
    delta = [n for n in onnx.load(str(fp16)).graph.node if n.output[0].endswith("/delta_softplus")][0]
    softplus = tmp_path / "softplus.onnx"
    source = [n for n in delta.input if n.endswith("/delta_proj")][0]
    onnx.utils.extract_model(str(fp16), str(softplus), [source], [delta.output[0]])
    part = onnx.load(str(softplus))
    (value,) = part.graph.input
    shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
    x = np.zeros(int(np.prod(shape)), np.float16)
    probes = np.array([-8, 0, 8, 11, 11.1, 12, 15, 19.9, 25], np.float16)
    x[:len(probes)] = probes
    (y,) = ReferenceEvaluator(part).run(None, {value.name: x.reshape(shape)})
    y = y.ravel()[:len(probes)].astype(np.float64)
    expected = np.log1p(np.exp(probes.astype(np.float64)))
    assert np.isfinite(y).all() and np.abs(y - expected).max() < 2e-2, y


def test_float16_int8_graph_converts_around_its_int8_layers(exported, tmp_path):
    """A DequantizeLinear of activations reads float32 scales and int8 data: counted as a constant, it took
    every layer after it along, and --int8 --fp16 on TensorRT 11 converted nothing."""
    from medmamba_edge.exporters.quantize import quantize_onnx
    from tests.exported_models import quantizer_or_skip
    from tests.shared_data import PNEUMONIAMNIST

    quantizer_or_skip()
    int8_path = quantize_onnx(exported["portable_path"], tmp_path / "int8.onnx", require_shared(*PNEUMONIAMNIST),
                              num_samples=8).path
    int8 = onnx.load(str(int8_path))
    fp16 = convert_float16(int8)
    onnx.checker.check_model(fp16, full_check=True)
    types = element_types(fp16)
    assert sum(t == FLOAT16 for t in types.values()) > 100
    # TensorRT fuses DQ into the layer reading it (an INT8 Conv/MatMul): nothing may stand between them.
    dequantized = {n.output[0] for n in fp16.graph.node if n.op_type == "DequantizeLinear"}
    readers = [n for n in fp16.graph.node if dequantized & set(n.input)]
    assert readers and not any(n.op_type == "Cast" for n in readers)
    assert all(types[i] == FLOAT for n in readers for i in n.input if i and i in types and types[i] in (FLOAT, FLOAT16))
    images, _ = pneumoniamnist_val()
    x = images[:32].numpy()
    # ONNX Runtime: the reference evaluator has no opset-18 DequantizeLinear (its implementations start at 19).
    reference, converted = run_float32(int8, x), run_float32(fp16, x)
    # Float16 rounding moves an activation across a quantization level now and then (the INT8 model vs its
    # float32 twin differs by more): about 0.3 at most on logits of ±8 here.
    assert np.abs(converted - reference).max() <= 0.5 and (converted.argmax(1) == reference.argmax(1)).all()


def test_float16_plugin_graph_keeps_scan_parameters_float32(exported):
    fp16 = convert_float16(exported["plugin"])
    onnx.checker.check_model(fp16)
    types = element_types(fp16)
    scans = [n for n in fp16.graph.node if scan_node.is_scan_node(n)]
    assert len(scans) == 10
    expected = {name: FLOAT if name in scan_node.FLOAT32_INPUTS else FLOAT16 for name in scan_node.INPUT_NAMES}
    assert expected["x"] == expected["x_dbl"] == FLOAT16
    producers = {o: n for n in fp16.graph.node for o in n.output}
    for node in scans:
        assert {name: types[tensor] for name, tensor in zip(scan_node.INPUT_NAMES, node.input)} == expected
        # y is float16: its readers take it as it is or cast it up for a float32 op, never down.
        readers = [n for n in fp16.graph.node if node.output[0] in n.input]
        assert readers and not any(n.op_type == "Cast" and n.attribute[0].i == FLOAT16 for n in readers)
    # A = -exp(A_logs) is computed from float32 initializers, not from a rounded float16 copy.
    for node in scans:
        a = producers.get(node.input[scan_node.INPUT_NAMES.index("A")])
        assert a is None or all(types[i] == FLOAT for i in a.input)
    assert types["input"] == types["logits"] == FLOAT


# ---- CLI errors ----------------------------------------------------------------------------------------

def invoke(*args):
    result = runner.invoke(app, ["build-engine", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1, result.output
    return result.output


@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here")
@pytest.mark.parametrize("form", ["portable", "plugin"])
def test_cli_without_tensorrt_says_so_first_and_names_everything_the_path_needs(exported, tmp_path, monkeypatch, form):
    # No plugin anywhere either: the plugin form used to hear about the plugin first, never about TensorRT.
    monkeypatch.delenv("MEDMAMBA_EDGE_PLUGIN", raising=False)
    monkeypatch.setenv("MEDMAMBA_EDGE_CACHE", str(tmp_path / "cache"))
    output = invoke(exported[f"{form}_path"], "-o", tmp_path / "m.engine", "--fp16")
    assert output.strip().startswith("error: TensorRT is not installed"), output
    for needed in ("tensorrt Python package >= 10.3", "cuda-python", "nvidia-jetpack", "pip install tensorrt",
                   "headers", "libnvinfer-dev", "nvcc", "CMake", "build-plugin"):
        assert needed in output, needed
    assert not (tmp_path / "m.engine").exists()


def test_cli_garbage_onnx_is_one_line(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    assert "garbage.onnx: not a readable ONNX model (DecodeError" in invoke(garbage, "-o", tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_cli_engine_and_timing_cache_paths_are_checked_before_the_model(exported, tmp_path):
    (tmp_path / "folder").mkdir()
    assert "folder: is a folder, expected a file name" in invoke(exported["portable_path"], "-o", tmp_path / "folder")
    assert "/sys/timing.cache: cannot write in /sys" in invoke(exported["portable_path"], "-o", tmp_path / "m.engine",
                                                               "--timing-cache", "/sys/timing.cache")


def test_cli_refuses_to_overwrite_the_model_or_to_write_one_file_twice(exported, tmp_path):
    """`-o model.onnx` replaced the exported model with the plan, and a timing cache named as the model or the engine
    replaced that after the build, exit 0."""
    model = tmp_path / "victim.onnx"
    model.write_bytes(exported["portable_path"].read_bytes())
    assert "victim.onnx: the output would overwrite a file this command reads" in invoke(model, "-o", model)
    assert "victim.onnx: the output would overwrite a file this command reads" in invoke(
        model, "-o", tmp_path / "m.engine", "--timing-cache", model)
    assert "m.engine: given for two outputs" in invoke(model, "-o", tmp_path / "m.engine",
                                                       "--timing-cache", tmp_path / "m.engine")
    assert model.read_bytes() == exported["portable_path"].read_bytes() and not list(tmp_path.glob("m.engine*"))


def test_a_qoperator_model_is_refused_before_tensorrt_is_needed(exported, tmp_path):
    """TensorRT's parser takes INT8 as Q/DQ only; a QOperator model's QLinearConv would reach its plugin lookup
    ("Plugin not found") instead of this line."""
    from medmamba_edge.exporters.quantize import quantize_onnx
    from tests.exported_models import quantizer_or_skip
    from tests.shared_data import PNEUMONIAMNIST

    quantizer_or_skip()
    qoperator = quantize_onnx(exported["plugin_path"], tmp_path / "q.onnx", require_shared(*PNEUMONIAMNIST),
                              num_samples=8, quant_format="qoperator").path
    for int8 in ([], ["--int8"]):
        output = invoke(qoperator, "-o", tmp_path / "m.engine", *int8)
        assert f"{qoperator}: TensorRT does not take " in output and "QLinearConv" in output, output
        assert "--format qdq" in output
    assert not list(tmp_path.glob("m.engine*"))


def test_cli_input_errors(exported, tmp_path, monkeypatch):
    assert "missing.onnx: no such ONNX file" in invoke(tmp_path / "missing.onnx", "-o", tmp_path / "m.engine")
    output = invoke(exported["portable_path"], "-o", tmp_path / "m.engine", "--int8")
    assert "--int8 needs an explicitly quantized model" in output and "medmamba-edge quantize" in output
    monkeypatch.delenv("MEDMAMBA_EDGE_PLUGIN", raising=False)
    monkeypatch.setenv("MEDMAMBA_EDGE_CACHE", str(tmp_path / "cache"))
    from medmamba_edge.runtime.backends.tensorrt import plugin

    if (plugin.PLUGINS_DIR / plugin.PLUGIN_LIBRARY).is_file():
        pytest.skip("a plugin library is bundled in the package directory")
    if not tensorrt_missing():  # without TensorRT, that is said first (test above)
        assert "run `medmamba-edge build-plugin`" in invoke(exported["plugin_path"], "-o", tmp_path / "m.engine")
    assert "--preset must be one of" in invoke(exported["plugin_path"], "-o", tmp_path / "m.engine", "--preset", "tx2")
    assert not list(tmp_path.glob("*.engine*"))


# ---- with TensorRT and a GPU ---------------------------------------------------------------------------

def test_engine_builds_runs_and_matches_onnxruntime(exported, tmp_path):
    tensorrt_or_skip()
    engine = tmp_path / "t32.engine"
    result = tb.build_engine(exported["portable_path"], engine, BuildOptions(max_batch=4),
                             progress=tb.BuildProgress())
    assert result.manifest.metadata.class_names == read_onnx_metadata(exported["portable"]).class_names
    backend = open_backend(engine)
    images = pneumoniamnist_val()[0][:9].numpy()
    reference = ort.InferenceSession(exported["portable"].SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    assert np.abs(backend.run(images) - reference).max() <= 1e-3  # 9 images: chunks of 4, 4, 1


def test_a_version_compatible_engine_runs_on_the_plugin_library_it_carries(exported, tmp_path):
    """Its plan holds the library (for TensorRT's lean runtime): the process running it needs none built, and one
    that is built may be for another TensorRT major version than the plan's. The runner asked for one anyway."""
    tensorrt_or_skip()
    try:
        library = find_plugin_library()
    except PluginNotFoundError:
        pytest.skip("no plugin library built here (medmamba-edge build-plugin)")
    engine = tmp_path / "vc.engine"
    tb.build_engine(exported["plugin_path"], engine, BuildOptions(max_batch=4, version_compatible=True),
                    plugin=library, progress=tb.BuildProgress())
    images = pneumoniamnist_val()[0][:3].numpy()
    np.save(tmp_path / "images.npy", images)
    # A fresh process, where nothing has registered SS2DScan: only the plan's copy can run it.
    child = ("import sys, numpy as np; from medmamba_edge.runtime.backends import open_backend; "
             "np.save(sys.argv[3], open_backend(sys.argv[1]).run(np.load(sys.argv[2])))")
    result = subprocess.run([sys.executable, "-c", child, engine, tmp_path / "images.npy", tmp_path / "logits.npy"],
                            env={**os.environ, PLUGIN_ENV: str(tmp_path / "none.so")}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = open_backend(exported["plugin_path"]).run(images)
    assert np.abs(np.load(tmp_path / "logits.npy") - reference).max() <= 1e-3
