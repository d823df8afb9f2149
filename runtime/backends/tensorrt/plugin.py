"""Build and locate the SS2DScan libraries: the TensorRT plugin and the CUDA-only launcher.

Standard library only: this runs on a Jetson next to TensorRT, where PyTorch is usually absent.

``find_plugin_library()`` looks, in this order, at:

1. ``$MEDMAMBA_EDGE_PLUGIN``: the path of the plugin ``.so`` (set but missing is an error, not a fallback);
2. the default build directory, ``<cache>/plugins/ss2d_scan-<machine>/``, where ``<cache>`` is
   ``$MEDMAMBA_EDGE_CACHE`` or else ``$XDG_CACHE_HOME/medmamba-edge`` or else ``~/.cache/medmamba-edge``
   (``build_plugin()`` writes there by default);
3. the ``plugins`` package's directory, beside the sources (a wheel that bundles a prebuilt library).
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from medmamba_edge import plugins
from medmamba_edge.errors import UserError

from ...files import cache_root
from .compat import INSTALL_HINT

PLUGIN_ENV = "MEDMAMBA_EDGE_PLUGIN"
PLUGIN_LIBRARY = "libmedmamba_trt_plugin.so"
# The same plugin registering itself when loaded, for loaders that only dlopen (selective_scan_plugin.cpp).
AUTOLOAD_PLUGIN_LIBRARY = "libmedmamba_trt_plugin_autoload.so"
PLUGINS_DIR = Path(plugins.__file__).resolve().parent
SOURCE_DIR = PLUGINS_DIR / "selective_scan"
BUILD_LOG = "medmamba-build.log"
PLUGIN_TARGET = "medmamba_trt_plugins"  # CMake's: every plugin library libnvinfer's presence allows
# Where nvcc is looked for after $CUDACXX, $CUDA_HOME/$CUDA_PATH and PATH (JetPack and the .run/.deb
# installers all provide /usr/local/cuda).
CUDA_HOME_CANDIDATES: tuple[str, ...] = ("/usr/local/cuda",)

Progress = Callable[[str], None]


class PluginBuildError(UserError, RuntimeError):
    """The libraries could not be built; the message is one line saying why and what to do."""


class PluginNotFoundError(UserError, FileNotFoundError):
    """No built library was found; the message says how to build one or where to point."""


def default_build_dir() -> Path:
    """Build directory used when none is given; per machine type so a shared home serves x86 and Jetson. Named
    after the node: a library built for version 1's SelectiveScan node (in ``selective_scan-<machine>``) has no
    SS2DScan creator and must not be found."""
    return cache_root() / "plugins" / f"ss2d_scan-{platform.machine() or 'unknown'}"


def _search(env_var: str, filename: str) -> Path:
    override = os.environ.get(env_var)
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path
        raise PluginNotFoundError(f"${env_var} is set to {path}, which is not a file")
    candidates = [default_build_dir() / filename, PLUGINS_DIR / filename]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise PluginNotFoundError(
        f"{filename} not found (looked in {looked}): run `medmamba-edge build-plugin` or set ${env_var} to its path"
    )


def find_plugin_library() -> Path:
    """Path of the TensorRT plugin library (search order in the module docstring)."""
    return _search(PLUGIN_ENV, PLUGIN_LIBRARY)


def find_autoload_plugin_library() -> Path:
    """The self-registering variant for Triton's tensorrt backend, LD_PRELOAD and DeepStream: built beside the
    plugin library wherever libnvinfer itself is installed."""
    library = find_plugin_library().with_name(AUTOLOAD_PLUGIN_LIBRARY)
    if not library.is_file():
        raise PluginNotFoundError(f"{library} not found: it is built beside {PLUGIN_LIBRARY} where libnvinfer is "
                                  f"installed (run `medmamba-edge build-plugin` on the server or device)")
    return library


def find_nvcc() -> Path | None:
    """nvcc from $CUDACXX, $CUDA_HOME / $CUDA_PATH, PATH, then /usr/local/cuda; None when absent."""
    if os.environ.get("CUDACXX"):
        return Path(os.environ["CUDACXX"]) if Path(os.environ["CUDACXX"]).is_file() else None
    homes = [os.environ.get(var) for var in ("CUDA_HOME", "CUDA_PATH")]
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path)
    for home in CUDA_HOME_CANDIDATES:
        if (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    return None


def launcher_nvcc_command(
    nvcc: Path, arch: str, output: Path, source: Path = SOURCE_DIR / "selective_scan_kernel.cu"
) -> list[str]:
    """One nvcc call that builds the launcher (or a file that includes the kernel) for one architecture such
    as "87", without CMake: quicker, for the tests and the GPU check scripts. Only the C ABI is exported."""
    return [str(nvcc), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
            "-gencode", f"arch=compute_{arch},code=sm_{arch}", str(source), "-o", str(output)]


def pip_tensorrt_lib_dir() -> Path | None:
    """Directory of libnvinfer.so.* from the pip wheels (package ``tensorrt_libs``), without importing TensorRT."""
    try:
        spec = importlib.util.find_spec("tensorrt_libs")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if any(Path(location).glob("libnvinfer.so*")):
            return Path(location)
    return None


def tensorrt_installed() -> bool:
    """Whether any TensorRT is on this machine (the Python package, a system or pip-wheel libnvinfer), without
    importing it; TENSORRT_ROOT aside, the plugin's headers come with one of these (libnvinfer-dev, JetPack)."""
    return (importlib.util.find_spec("tensorrt") is not None or ctypes.util.find_library("nvinfer") is not None
            or pip_tensorrt_lib_dir() is not None)


def normalize_cuda_arch(cuda_arch: str | int | Iterable[str | int]) -> str:
    """CMAKE_CUDA_ARCHITECTURES value from "87", "8.7", "sm_87", 87, "87;90", "87,90", ["87", 90] or "native"."""
    items = [cuda_arch] if isinstance(cuda_arch, (str, int)) else list(cuda_arch)
    archs: list[str] = []
    for item in items:
        for part in re.split(r"[;,\s]+", str(item).strip()):
            if not part:
                continue
            if part in ("native", "all", "all-major"):
                archs.append(part)
                continue
            match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d?)([af]?)(-real|-virtual)?", part)
            if not match:
                raise PluginBuildError(f"unrecognised CUDA architecture {part!r}: use e.g. 87, 8.7, sm_87 or native")
            archs.append(match.group(1) + match.group(2) + match.group(3) + (match.group(4) or ""))
    if not archs:
        raise PluginBuildError("empty CUDA architecture list")
    return ";".join(archs)


def _run(command: list[str], log, progress: Progress | None) -> int:
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        if progress is not None:
            progress(line.rstrip("\n"))
    log.flush()  # _failure() reads the log back while it is still open
    return process.wait()


def _failure(stage: str, log_path: Path) -> PluginBuildError:
    text = log_path.read_text(errors="replace")
    # CMakeLists.txt prefixes the errors it diagnoses itself; those are the whole story.
    # CMake wraps and indents message() text, so the paragraph is re-joined into one line.
    ours = re.search(r"MEDMAMBA_ERROR: (.+?)(?:\n\s*\n|\Z)", text, re.S)
    if ours:
        return PluginBuildError(" ".join(ours.group(1).split()))
    # A compiler's own fatal line ("nvcc fatal : Unsupported gpu architecture 'compute_101'") says why; the
    # first "error" line around it is often only CMake's or make's report that a step failed.
    lines = text.splitlines()
    first_error = next((" ".join(line.split()) for pattern in (r"\bfatal\b", r"\berror\b") for line in lines
                        if re.search(pattern, line, re.I)), "")
    # CMake's own diagnostics put the reason in the indented paragraph under their "CMake Error ...:" header.
    cmake = re.search(r"^(CMake Error[^\n]*:)\n((?:[ \t]+\S[^\n]*\n?)+)", text, re.M)
    if cmake and first_error == " ".join(cmake.group(1).split()):
        first_error = " ".join(f"{cmake.group(1)} {cmake.group(2)}".split())
    detail = f": {first_error}" if first_error else ""
    return PluginBuildError(f"{stage} failed{detail} (full log: {log_path})")


def _forget_other_compiler(build: Path, nvcc: Path) -> None:
    """Drop the CMake cache of a build directory configured with another nvcc.

    CMake cannot switch compilers in place: it wipes the cache mid-configure and then fails on the lost
    variables. Only CMake's own files go; nothing else in the directory is touched.
    """
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return
    match = re.search(r"^CMAKE_CUDA_COMPILER:\w+=(.*)$", cache.read_text(errors="replace"), re.M)
    if match and match.group(1).strip() != str(nvcc):
        cache.unlink()
        shutil.rmtree(build / "CMakeFiles", ignore_errors=True)


def configure_command(cmake: str, build: Path, nvcc: Path, arch: str | None, target: str, root) -> list[str]:
    """The CMake configure line. Options are cached in the build directory, and one directory serves both targets
    and every run (the default one is shared by the machines of a home): each is set explicitly, or cleared
    (-U) where the CMakeLists' default applies, or an earlier --cuda-arch 87 would stay the "every GPU" build."""
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}" if arch is not None else "-UCMAKE_CUDA_ARCHITECTURES")
    configure.append(f"-DMEDMAMBA_REQUIRE_TENSORRT={'ON' if target == PLUGIN_TARGET else 'OFF'}")
    if target == PLUGIN_TARGET:
        configure.append(f"-DTENSORRT_ROOT={Path(root).expanduser()}" if root else "-UTENSORRT_ROOT")
        pip_libs = pip_tensorrt_lib_dir()
        configure.append(f"-DTENSORRT_LIB_DIR={pip_libs}" if pip_libs is not None else "-UTENSORRT_LIB_DIR")
    return configure


def _cmake_build(
    target: str,
    library: str,
    *,
    build_dir: str | os.PathLike | None,
    cuda_arch,
    tensorrt_root: str | os.PathLike | None,
    jobs: int | None,
    progress: Progress | None,
) -> Path:
    arch = normalize_cuda_arch(cuda_arch) if cuda_arch is not None else None  # first: a typo costs no search
    root = tensorrt_root if tensorrt_root is not None else os.environ.get("TENSORRT_ROOT")
    if target == PLUGIN_TARGET and not root and not tensorrt_installed():
        raise PluginBuildError(f"TensorRT is not installed (no tensorrt package, no libnvinfer, TENSORRT_ROOT "
                               f"unset): {INSTALL_HINT}")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PluginBuildError("cmake not found on PATH: install CMake >= 3.18 (apt install cmake, or pip install cmake)")
    nvcc = find_nvcc()
    if nvcc is None:
        raise PluginBuildError(
            "nvcc not found: install the CUDA toolkit (JetPack includes it under /usr/local/cuda) "
            "or set CUDACXX / CUDA_HOME"
        )
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise PluginBuildError(f"plugin sources missing: {SOURCE_DIR / 'CMakeLists.txt'} (broken installation?)")
    build = Path(build_dir).expanduser() if build_dir is not None else default_build_dir()
    try:
        build.mkdir(parents=True, exist_ok=True)
        (build / BUILD_LOG).touch()
    except OSError as exc:  # a file of that name, a read-only or missing parent
        raise PluginBuildError(f"{build}: cannot use it as the build folder ({exc.strerror or exc})") from None
    _forget_other_compiler(build, nvcc)

    configure = configure_command(cmake, build, nvcc, arch, target, root)
    compile_ = [cmake, "--build", str(build), "--target", target, "--parallel", str(jobs or os.cpu_count() or 1)]

    log_path = build / BUILD_LOG
    with log_path.open("w") as log:
        if _run(configure, log, progress) != 0:
            error = _failure("CMake configure", log_path)
            if target == PLUGIN_TARGET and pip_tensorrt_lib_dir() is not None and "headers" in str(error):
                error = PluginBuildError(
                    f"{error}; the pip TensorRT wheels ship no headers: point TENSORRT_ROOT at the include/ "
                    "of the matching TensorRT tarball or of github.com/NVIDIA/TensorRT checked out at that version"
                )
            raise error
        if _run(compile_, log, progress) != 0:
            raise _failure(f"building {target}", log_path)
    output = build / library
    if not output.is_file():
        raise PluginBuildError(f"the build reported success but {output} is missing (full log: {log_path})")
    return output


def build_plugin(
    build_dir: str | os.PathLike | None = None,
    cuda_arch: str | int | Iterable[str | int] | None = None,
    tensorrt_root: str | os.PathLike | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Configure and build the TensorRT plugin with CMake; return the path of libmedmamba_trt_plugin.so (and, where
    libnvinfer is installed, libmedmamba_trt_plugin_autoload.so beside it).

    ``build_dir`` defaults to ``default_build_dir()``, where ``find_plugin_library()`` looks. ``cuda_arch``
    (e.g. "87", "8.7", "87;90", "native") defaults to every supported GPU generation; a single one builds
    much faster. ``tensorrt_root`` (else $TENSORRT_ROOT, else the system/JetPack locations) must hold the
    TensorRT >= 10.3 headers. ``progress`` receives every output line of CMake and the compiler.
    Raises PluginBuildError with a one-line reason (the full log stays in the build directory).
    """
    return _cmake_build(
        PLUGIN_TARGET,
        PLUGIN_LIBRARY,
        build_dir=build_dir,
        cuda_arch=cuda_arch,
        tensorrt_root=tensorrt_root,
        jobs=jobs,
        progress=progress,
    )
