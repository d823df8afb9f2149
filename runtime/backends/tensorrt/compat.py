"""The one place that knows which TensorRT generation is running and how to reach TensorRT and the GPU.

TensorRT 10.x (10.3 is JetPack 6.1/6.2) builds *weakly typed* networks: precision comes from builder
flags (FP16; INT8 for a Q/DQ network). TensorRT 11 builds only *strongly typed* networks: the FP16 and
INT8 builder flags are gone and every tensor has the type the ONNX graph gives it, so an FP16 engine
needs a float16 graph (``runtime/backends/tensorrt/float16.py``) and an INT8 engine a Q/DQ graph. TensorRT < 10.3 (8.x
on JetPack 5) has no IPluginV3, which our SS2DScan plugin is.

Device memory, streams and the GPU's name come from cuda-python (``cuda.bindings.runtime``; ``cuda.cudart``
in cuda-python < 12.6), the binding TensorRT's own Python samples use. It was preferred over Polygraphy's
ctypes wrapper because it also answers ``cudaGetDeviceProperties`` (GPU name and compute capability for
the engine manifest) with a stable, typed API; both are imported lazily, only when an engine is built or run.
Nothing here imports TensorRT or CUDA at module import time, and nothing here needs torch.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

from medmamba_edge.errors import UserError, first_line

from ... import scan_node

MIN_VERSION = (10, 3, 0)
STRONGLY_TYPED_FROM = 11
PLUGIN_OVERRIDE_FROM = (10, 15)  # OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE appeared in 10.15

# Everything the TensorRT path needs, said at once: a user told one missing part at a time installs four
# things in four rounds.
INSTALL_HINT = (
    "engines need the tensorrt Python package >= 10.3 and cuda-python (on Jetson JetPack 6.1+ ships TensorRT: "
    "sudo apt install nvidia-jetpack, and use JetPack's python3; on x86/SBSA: pip install tensorrt cuda-python, "
    "the 'tensorrt' extra), and the plugin for the default plugin-form model also TensorRT's headers and "
    "libraries (libnvinfer-dev; JetPack: nvidia-tensorrt-dev), the CUDA toolkit (nvcc) and CMake >= 3.18 "
    "for `medmamba-edge build-plugin`; without TensorRT, run the .onnx in ONNX Runtime (medmamba-edge run)"
)
CUDA_PYTHON_HINT = (
    "pip install cuda-python (a release matching the CUDA major version: 'cuda-python>=12.6,<13' on JetPack 6, "
    "'cuda-python>=13' with CUDA 13)"
)


class TensorRTUnavailableError(UserError, ImportError):
    """TensorRT (or cuda-python) is missing or too old; the message says how to get it."""


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of "10.3.0", "10.13.1.26", "11.0.0"."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not match:
        raise TensorRTUnavailableError(f"unrecognised TensorRT version {text!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


@dataclass(frozen=True)
class TensorRTGeneration:
    """What a TensorRT version needs from us; every version-dependent choice is a property here."""

    version: tuple[int, int, int]

    @property
    def strongly_typed(self) -> bool:
        return self.version[0] >= STRONGLY_TYPED_FROM

    @property
    def plugin_override_flag(self) -> bool:
        return self.version[:2] >= PLUGIN_OVERRIDE_FROM

    def builder_flags(self, *, fp16: bool, int8: bool) -> tuple[str, ...]:
        """Names of the ``trt.BuilderFlag`` members to set for a precision."""
        if self.strongly_typed:
            return ()  # types come from the graph: float16 conversion, Q/DQ
        flags = []
        if fp16:
            flags.append("FP16")
        if int8:
            # A weakly typed TensorRT 10 network runs Q/DQ layers in INT8 only with the INT8 flag; no calibrator
            # is attached (implicit calibration is deprecated in 10 and removed in 11): the scales are in the graph.
            flags.append("INT8")
        return tuple(flags)

    def converts_graph_to_fp16(self, *, fp16: bool) -> bool:
        """Whether FP16 has to be baked into the ONNX graph before parsing."""
        return fp16 and self.strongly_typed


def tensorrt_generation(version: str) -> TensorRTGeneration:
    parsed = parse_version(version)
    if parsed < MIN_VERSION:
        raise TensorRTUnavailableError(
            f"TensorRT {version} is not supported: the SS2DScan plugin needs TensorRT >= 10.3 (IPluginV3). "
            "JetPack 5 ships TensorRT 8.x: upgrade to JetPack 6.1+, or run the model with ONNX Runtime "
            "(medmamba-edge export --scan portable)"
        )
    return TensorRTGeneration(parsed)


def import_tensorrt():
    """The ``tensorrt`` module, or one clear error saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from None
    except Exception as exc:  # the PyPI stub wheels raise while trying to download the real package
        raise TensorRTUnavailableError(
            f"TensorRT failed to import ({type(exc).__name__}: {first_line(exc)}): "
            f"{INSTALL_HINT}"
        ) from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        raise TensorRTUnavailableError(f"the installed 'tensorrt' package is a stub without the library: {INSTALL_HINT}")
    tensorrt_generation(trt.__version__)
    return trt


def import_cudart():
    """cuda-python's runtime API module."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise TensorRTUnavailableError(f"cuda-python is not installed: {CUDA_PYTHON_HINT}") from None
    return cudart


class CudaError(UserError, RuntimeError):
    """A CUDA runtime call failed."""


def cuda_check(cudart, result):
    """Unpack a cuda-python call's (error, *values) tuple, raising CudaError on failure."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        _, name = cudart.cudaGetErrorName(error)
        _, text = cudart.cudaGetErrorString(error)
        raise CudaError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}: "
                        f"{text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    # Every Jetson Orin module reports "Orin", 8.7: the SM count (16 or 14 AGX, 8 NX and Nano 8GB, 4 Nano 4GB) tells
    # their GPUs apart, and an engine is tuned for the exact GPU it was built on; Orin NX and Orin Nano 8GB share
    # theirs (check_manifest checks a DLA engine's core). None: not recorded (manifests written before it was).
    multiprocessors: int | None = None

    def __str__(self) -> str:
        sms = f", {self.multiprocessors} SMs" if self.multiprocessors else ""
        return f"{self.name} (compute capability {self.compute_capability}{sms})"


def current_gpu(cudart=None) -> GpuInfo:
    """Name, compute capability and SM count of the current CUDA device."""
    cudart = cudart or import_cudart()
    device = cuda_check(cudart, cudart.cudaGetDevice())
    props = cuda_check(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip(), f"{props.major}.{props.minor}", int(props.multiProcessorCount))


class _Logger:
    """The process's one TensorRT logger (TensorRT uses the first logger it is given for every later builder
    and runtime): errors are kept for the exception that follows a failed call, warnings go to ``forward``."""

    def __init__(self, trt):
        class Logger(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)

            def log(inner, severity, message):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(message)
                elif severity == trt.ILogger.Severity.WARNING and self.forward is not None:
                    self.forward(message)

        self.errors: list[str] = []
        self.forward = None
        self.trt_logger = Logger()

    def take_errors(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors

    def failure(self) -> str:
        """': <the last error TensorRT logged>', to end the message of a call that failed ('' if it logged none)."""
        errors = self.take_errors()
        return f": {errors[-1]}" if errors else ""


_LOGGER: _Logger | None = None
_LOADED_PLUGINS: dict[str, object] = {}


def tensorrt_logger(trt) -> _Logger:
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = _Logger(trt)
    return _LOGGER


class PluginLoadError(UserError):
    """TensorRT could not load the plugin library."""


def built_for_tensorrt_major(path) -> int | None:
    """The TensorRT major version whose headers built the plugin library at ``path`` (None: a build that does
    not say, or a library that cannot be opened here, which TensorRT's own load then reports)."""
    try:
        return int(ctypes.CDLL(str(path)).medmambaTensorRTMajor())
    except (OSError, AttributeError):
        return None


def load_plugin_library(trt, path) -> None:
    """Register the plugin's creators with TensorRT (once per process and library, whatever the path it is
    reached by: TensorRT refuses to register a creator twice)."""
    key = os.path.realpath(path)
    if key in _LOADED_PLUGINS:
        return
    built_for = built_for_tensorrt_major(key)
    running = int(trt.__version__.split(".")[0])
    if built_for is not None and built_for != running:
        # Its calls to TensorRT's logger would land on other virtual functions (selective_scan_plugin.cpp).
        raise PluginLoadError(f"{path}: built with TensorRT {built_for} headers, and this is TensorRT {trt.__version__}; "
                              f"rebuild it with `medmamba-edge build-plugin`")
    registry = trt.get_plugin_registry()
    if registry.get_creator(scan_node.OP_TYPE, scan_node.PLUGIN_VERSION, scan_node.PLUGIN_NAMESPACE) is not None:
        # Registered by another copy (the autoload build, LD_PRELOADed): loading this one too would fail.
        _LOADED_PLUGINS[key] = None
        return
    handle = registry.load_library(key)
    if handle is None:
        raise PluginLoadError(f"TensorRT could not load the plugin library {key}{tensorrt_logger(trt).failure()}; "
                              "rebuild it for this TensorRT and GPU with `medmamba-edge build-plugin`")
    _LOADED_PLUGINS[key] = handle
