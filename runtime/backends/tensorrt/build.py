"""ONNX → TensorRT engine, with a manifest beside it, for TensorRT 10.3+ and 11 behind one function.

``build_engine`` parses the exported ONNX (plugin or portable form) with the SS2DScan plugin loaded,
applies the build options (presets for Jetson boards and desktop GPUs, precision, batch profile,
workspace, timing cache, optimisation level, DLA, version/hardware compatibility) and writes the engine and
``<engine>.json`` atomically. ``cached_engine`` does the same into the engine cache, keyed so that a model is
built once per TensorRT version, GPU and option set. Version differences live in
``runtime/backends/tensorrt/compat.py``. torch-free: this runs on a Jetson next to TensorRT.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import onnx

from medmamba_edge import __version__
from medmamba_edge.errors import UserError

from ... import scan_node
from .. import local_model_file
from ...files import cache_root, check_writable, local_output, sha256_file, write_bytes_atomically
from ...metadata import PRECISIONS, ModelMetadata, load_onnx, onnx_runtime_only_ops, read_onnx_metadata
from .compat import (
    current_gpu,
    import_cudart,
    import_tensorrt,
    load_plugin_library,
    tensorrt_generation,
    tensorrt_logger,
)
from .float16 import convert_float16
from .manifest import (
    NO_DLA,
    PRESETS,
    BuildOptions,
    EngineManifest,
    engine_cache_key,
    manifest_path,
    write_manifest,
)
from .plugin import find_plugin_library

DEFAULT_BATCH_PROFILE = (1, 1, 8)  # min, opt, max of a dynamic-batch model: tuned for single images


class EngineBuildError(UserError):
    """The engine could not be built; nothing was written."""


def resolve_options(preset: str | None = None, **explicit) -> BuildOptions:
    """Build options from a preset, with every explicit (non-None) value taking precedence."""
    names = {f.name for f in fields(BuildOptions)}
    unknown = sorted(set(explicit) - names)
    if unknown:
        raise EngineBuildError(f"unknown build options {unknown}")
    values = {k: v for k, v in explicit.items() if v is not None}
    if preset is not None:
        if preset not in PRESETS:
            raise EngineBuildError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        chosen = PRESETS[preset]
        values.setdefault("workspace_mib", chosen.workspace_mib)
        values.setdefault("opt_level", chosen.opt_level)
        if (values.get("fp16") or values.get("int8")) and "dla_core" not in values and chosen.dla_core is not None:
            values["dla_core"], values["dla_from_preset"] = chosen.dla_core, True
        values["preset"] = preset
    if values.get("dla_core") == NO_DLA:
        values["dla_core"] = None
    options = BuildOptions(**{k: v for k, v in values.items() if v is not None})
    _check_options(options)
    return options


def _check_options(options: BuildOptions) -> None:
    if options.opt_level is not None and not 0 <= options.opt_level <= 5:
        raise EngineBuildError(f"--opt-level must be 0..5, got {options.opt_level}")
    if options.workspace_mib is not None and options.workspace_mib < 1:
        raise EngineBuildError(f"--workspace must be a positive number of MiB, got {options.workspace_mib}")
    if options.dla_core is not None:
        if options.dla_core < 0:
            raise EngineBuildError(f"--dla-core must be 0, 1 or -1 (GPU only), got {options.dla_core}")
        if options.precision == "fp32":
            raise EngineBuildError("DLA runs FP16 or INT8 only: add --fp16 (or --int8), or drop --dla-core")
    for name in ("min_batch", "opt_batch", "max_batch"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise EngineBuildError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def batch_profile(options: BuildOptions, model_batch: int | None) -> tuple[int, int, int]:
    """(min, opt, max) batch: the model's own for a fixed-batch model (which the options must agree with)."""
    given = {n: getattr(options, n) for n in ("min_batch", "opt_batch", "max_batch") if getattr(options, n) is not None}
    if model_batch is not None:
        wrong = {n: v for n, v in given.items() if v != model_batch}
        if wrong:
            name, value = next(iter(wrong.items()))
            raise EngineBuildError(
                f"the model was exported with a fixed batch of {model_batch}, so --{name.replace('_', '-')} {value} "
                "cannot apply; re-export with `medmamba-edge export --dynamic-batch` for a batch range"
            )
        return model_batch, model_batch, model_batch
    low = options.min_batch or DEFAULT_BATCH_PROFILE[0]
    high = options.max_batch or max(DEFAULT_BATCH_PROFILE[2], low)
    opt = options.opt_batch or min(max(DEFAULT_BATCH_PROFILE[1], low), high)
    if not low <= opt <= high:
        raise EngineBuildError(f"the batch profile needs min <= opt <= max, got {low} / {opt} / {high}")
    return low, opt, high


def has_quantize_nodes(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def parser_error_summary(parser) -> str:
    """Every ONNX parser error on one line: node name, op type and TensorRT's description."""
    parts = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        if error.node() >= 0:
            parts.append(f"node {error.node_name() or error.node()} ({error.node_operator()}): {error.desc()}")
        else:
            parts.append(error.desc())
    return "; ".join(parts)


class BuildProgress:
    """What the builder reports; the CLI renders it (rich progress bars, or a spinner with status lines)."""

    def status(self, message: str) -> None:
        """A build stage or a TensorRT warning."""

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None:
        """TensorRT's IProgressMonitor phases (10.x, 11.x)."""

    def step_complete(self, phase: str, step: int) -> None:
        pass

    def phase_finish(self, phase: str) -> None:
        pass


def _progress_monitor(trt, progress: BuildProgress):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            progress.step_complete(phase_name, step)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return Monitor()


@dataclass
class _Inputs:
    model: onnx.ModelProto
    metadata: ModelMetadata
    onnx_sha256: str
    plugin: Path | None
    plugin_sha256: str | None


def _read_inputs(onnx_path: Path, options: BuildOptions, plugin: str | Path | None) -> _Inputs:
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path}: no such ONNX file")
    model = load_onnx(onnx_path)
    metadata = read_onnx_metadata(model, onnx_path)  # a clear error for ONNX files `medmamba-edge export` did not write
    retired = scan_node.retired_scan_node(model)
    if retired:
        raise EngineBuildError(f"{onnx_path}: {retired}")
    runtime_only = onnx_runtime_only_ops(model)
    if runtime_only:  # TensorRT's parser would look for a plugin of that name and report that instead
        raise EngineBuildError(
            f"{onnx_path}: TensorRT does not take {', '.join(runtime_only)} (a `quantize --format qoperator` model, "
            "for ONNX Runtime); quantize with --format qdq for TensorRT"
        )
    if options.int8 and not has_quantize_nodes(model):
        raise EngineBuildError(
            f"{onnx_path}: --int8 needs an explicitly quantized model (QuantizeLinear/DequantizeLinear nodes) and "
            "this one has none; make one with `medmamba-edge quantize`"
        )
    # Before the plugin: without TensorRT, a missing plugin (and then its missing headers) is not the news.
    import_tensorrt()
    import_cudart()
    library = None
    if scan_node.has_scan_nodes(model):
        library = Path(plugin) if plugin is not None else find_plugin_library()
        if not library.is_file():
            raise EngineBuildError(f"{library}: no such plugin library; build it with `medmamba-edge build-plugin`")
    return _Inputs(model, metadata, sha256_file(onnx_path), library, sha256_file(library) if library else None)


@dataclass
class BuildResult:
    engine: Path
    manifest: EngineManifest
    seconds: float


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions | None = None, *,
                 plugin: str | Path | None = None, progress: BuildProgress | None = None) -> BuildResult:
    """Build ``engine_path`` (and ``<engine_path>.json``) from an exported ONNX model."""
    options = options or BuildOptions()
    _check_options(options)
    onnx_path, engine_path = local_model_file(onnx_path, "build-engine"), local_output(engine_path, "build-engine")
    for output in filter(None, (engine_path, options.timing_cache)):  # both are written after a build of minutes
        check_writable(output, command="build-engine")
    inputs = _read_inputs(onnx_path, options, plugin)
    return _build(onnx_path, engine_path, options, inputs, progress or BuildProgress())


def _build(onnx_path: Path, engine_path: Path, options: BuildOptions, inputs: _Inputs,
           progress: BuildProgress) -> BuildResult:
    started = time.perf_counter()
    trt = import_tensorrt()
    generation = tensorrt_generation(trt.__version__)
    gpu = current_gpu()
    logger = tensorrt_logger(trt)
    logger.take_errors()
    logger.forward = progress.status
    metadata = inputs.metadata
    low, opt, high = batch_profile(options, metadata.batch)

    model, fp16_graph = inputs.model, generation.converts_graph_to_fp16(fp16=options.fp16)
    if fp16_graph:
        progress.status("converting the graph to float16 (strongly typed TensorRT)")
        model = convert_float16(model)
    if inputs.plugin is not None:
        load_plugin_library(trt, inputs.plugin)

    progress.status(f"parsing {onnx_path.name} (TensorRT {trt.__version__})")
    builder = trt.Builder(logger.trt_logger)
    # TensorRT 10 networks are explicit-batch without a flag; 11 makes every network strongly typed (the
    # STRONGLY_TYPED flag is deprecated there), so 0 is right for both.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger.trt_logger)
    if generation.plugin_override_flag:
        # Our nodes carry plugin_namespace, which already makes 10.15+ prefer the plugin; the flag also covers a
        # SS2DScan node whose attributes a graph tool dropped.
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse(model.SerializeToString(), path=str(onnx_path)):
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {parser_error_summary(parser)}")

    config = builder.create_builder_config()
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    for flag in generation.builder_flags(fp16=options.fp16, int8=options.int8):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if options.dla_from_preset and builder.num_DLA_cores == 0:
        # TensorRT 11.0-11.3 has no DLA at all, and JetPack 6 boards with TensorRT 11 none either: a preset for
        # an Orin board must still build there.
        progress.status(f"TensorRT {trt.__version__} offers no DLA here: building the {options.preset} preset "
                        f"for the GPU only")
        options = replace(options, dla_core=None, dla_from_preset=False)
    if options.dla_core is not None:
        if options.dla_core >= builder.num_DLA_cores:
            raise EngineBuildError(f"--dla-core {options.dla_core}: this device has {builder.num_DLA_cores} DLA cores "
                                   "(use --dla-core -1 for GPU only)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        # Our plugin, LayerNorm, batched MatMul and dynamic shapes have no DLA implementation: they run on the GPU.
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if inputs.plugin is not None:
            # The plan carries its own lean runtime, which must find the plugin: ship the library inside it.
            config.plugins_to_serialize = [str(inputs.plugin)]
    if options.hardware_compat:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

    input_tensor = network.get_input(0)
    shape = tuple(input_tensor.shape)
    shapes = {"min": [low, *shape[1:]], "opt": [opt, *shape[1:]], "max": [high, *shape[1:]]}
    if shape[0] < 0:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_tensor.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)

    timing_cache_path = Path(options.timing_cache) if options.timing_cache else None
    if timing_cache_path is not None:
        cached = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        # createTimingCache returns nullptr (None) for contents it cannot read, as TensorRT's own samples check
        # (samples/utils/timingCache.cpp); set_timing_cache takes a reference and would raise on None.
        cache = config.create_timing_cache(cached)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            logger.take_errors()  # about the old cache, not the build; they would stand for a later build failure
            progress.status(f"{timing_cache_path} is not a timing cache for this TensorRT/GPU: starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    config.progress_monitor = _progress_monitor(trt, progress)
    progress.status(f"building a {options.precision} engine for {gpu.name}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build the engine{logger.failure()}")

    if timing_cache_path is not None:
        write_bytes_atomically(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    manifest = EngineManifest(
        tensorrt_version=trt.__version__,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        gpu_multiprocessors=gpu.multiprocessors,
        cpu_architecture=platform.machine(),
        precision=options.precision,
        profile={input_tensor.name: shapes},
        onnx_path=str(onnx_path.resolve()),
        onnx_sha256=inputs.onnx_sha256,
        plugin_sha256=inputs.plugin_sha256,
        build=options,
        metadata=metadata.replace(precision=options.precision),
        fp16_graph=fp16_graph,
        tool_version=__version__,
    )
    # The engine first: a manifest never describes an engine that is not there.
    write_bytes_atomically(engine_path, bytes(plan))
    write_manifest(engine_path, manifest)
    return BuildResult(engine_path, manifest, time.perf_counter() - started)


class EngineCacheError(UserError):
    """The engine cache folder cannot be used."""


def engine_cache_dir() -> Path:
    """``$MEDMAMBA_EDGE_CACHE/engines`` (default ``~/.cache/medmamba-edge/engines``), created and writable."""
    folder = cache_root() / "engines"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineCacheError(f"cannot create the engine cache {folder} ({exc.strerror}); "
                               "set MEDMAMBA_EDGE_CACHE to a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EngineCacheError(f"the engine cache {folder} is not writable; set MEDMAMBA_EDGE_CACHE to a writable folder")
    return folder


def cached_engine(onnx_path: str | Path, precision: str = "fp32", *, plugin: str | Path | None = None,
                  progress: BuildProgress | None = None, preset: str | None = None, **options) -> Path:
    """The engine for ``onnx_path`` from the cache, built there first if this TensorRT/GPU/option set has none.

    ``options`` are ``BuildOptions`` fields (``max_batch=16``, ``workspace_mib=...``) on top of ``preset``."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    resolved = resolve_options(preset, fp16=precision == "fp16" or None, int8=precision == "int8" or None, **options)
    onnx_path = Path(onnx_path)
    inputs = _read_inputs(onnx_path, resolved, plugin)
    trt = import_tensorrt()
    key = engine_cache_key(inputs.onnx_sha256, resolved, trt.__version__, current_gpu(), inputs.plugin_sha256)
    engine = engine_cache_dir() / f"{onnx_path.stem}-{precision}-{key}.engine"
    if engine.is_file() and manifest_path(engine).is_file():
        return engine
    return _build(onnx_path, engine, resolved, inputs, progress or BuildProgress()).engine
