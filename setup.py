"""Only the optional compiled parts live here; everything else is in pyproject.toml.

Both are built from runtime/csrc with nothing but a C compiler, and both are optional: without a compiler the
package still installs, and the runtime says what is missing (and falls back or points to --scan portable).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

# x86-64 (gcc >= 11, clang >= 14): one binary holds AVX-512, AVX2 and baseline code and picks per CPU, so wheels stay
# portable. aarch64 (Jetson, Graviton) has NEON in its baseline.
# -fno-wrapv undoes the -fwrapv Python's own CFLAGS bring (sysconfig): with int indices defined to wrap, gcc no longer
# sees n * 16 + l as an affine index and left scan_tile's lane loop scalar (the scan 6x slower with softplus off).
extra_compile_args = ["-O3", "-std=c11", "-fno-math-errno", "-fno-wrapv", "-pthread", "-fvisibility=hidden"]
# The scan kernel both binaries compile (selective_scan_kernel.h says why it is separate).
KERNEL = "runtime/csrc/selective_scan_kernel.c"
HEADERS = ["runtime/csrc/selective_scan_kernel.h", "runtime/csrc/ort_abi.h"]
# Defined for the second try of a build that failed: the kernel then leaves out its AVX-512 and AVX2 paths, which a
# compiler may refuse while building the baseline (zig cc given -target or -mcpu passes every CPU feature explicitly,
# and those override the kernel's target() attributes).
BASELINE_ONLY = "MM_SCAN_BASELINE_ONLY"
# ONNX Runtime's custom-op library: a plain shared library that ONNX Runtime dlopens and calls RegisterCustomOps
# in, not a Python module, so its name has no Python ABI tag and any host (Python, C++, Triton) loads one file.
ORT_OPS = "medmamba_edge.runtime.libmedmamba_ort_ops"
# As runtime/backends/onnxruntime/custom_ops.py looks for it.
LIBRARY_SUFFIX = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")


RUN_PATH_OPTIONS = ("-rpath", "--rpath", "-R")  # ld's, each followed by its folder


def without_run_paths(args):
    """A link command less its run-time search paths, however spelled: -Wl,-rpath,X, -Wl,-rpath=X, -Wl,-rpath -Wl,X,
    -Wl,-R,X, -Wl,a,-rpath,X,b and -Xlinker -rpath -Xlinker X. Dropping only the argument that starts -Wl,-rpath
    left a split pair's folder behind, which ld then read as an input file and the library was not built."""
    kept, folder_next = [], False
    arguments = iter(args)
    for arg in arguments:
        if arg == "-Xlinker":
            tokens, wrap = [next(arguments, "")], lambda tokens: [part for t in tokens for part in ("-Xlinker", t)]
        elif arg.startswith("-Wl,"):
            tokens, wrap = arg[len("-Wl,"):].split(","), lambda tokens: ["-Wl," + ",".join(tokens)] if tokens else []
        else:
            kept.append(arg)
            continue
        linker_kept = []
        for token in tokens:
            if folder_next:
                folder_next = False
            elif token in RUN_PATH_OPTIONS:
                folder_next = True
            elif not token.startswith((*(option + "=" for option in RUN_PATH_OPTIONS[:2]), "-R")):  # -R/x too
                linker_kept.append(token)
        kept += wrap(linker_kept)
    return kept


class BuildExt(build_ext):
    def get_ext_filename(self, fullname):
        # asked with the full dotted name and with the last part alone (distutils' get_ext_fullpath)
        if fullname.rpartition(".")[2] == ORT_OPS.rpartition(".")[2]:
            return os.path.join(*fullname.split(".")) + LIBRARY_SUFFIX
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        # A DLL's exports are listed to its linker, and build_ext would list a Python module's PyInit_ function, which
        # this library has not (MinGW's link names it in a .def file); RegisterCustomOps is marked dllexport instead.
        return [] if ext.name == ORT_OPS else super().get_export_symbols(ext)

    def get_libraries(self, ext):
        # build_ext links a Python module on Windows against pythonXY when the compiler is not MSVC (MinGW's): the
        # library would then need that Python's DLL, and a C++ host or Triton, which has none, could not load it.
        return ext.libraries if ext.name == ORT_OPS else super().get_libraries(ext)

    def build_extension(self, ext):
        if self.compiler.compiler_type == "msvc":
            # MSVC has no pthreads and no GCC attributes: a screen of errors, twice, said nothing of that.
            self.warn(f"{ext.name} needs a GCC-compatible C compiler (gcc, clang, MinGW-w64); MSVC cannot build it, "
                      "so it is left out")
            raise CompileError("MSVC")
        try:
            self.build_without_run_paths(ext)
        except CompileError as error:
            self.warn(f"building {ext.name} failed ({error}); trying once more without the scan's AVX-512 and AVX2 "
                      "paths, which not every compiler builds: if it succeeds, this build's scan has the baseline "
                      "path alone")
            ext.define_macros = [*ext.define_macros, (BASELINE_ONLY, None)]
            self.build_without_run_paths(ext)

    def build_without_run_paths(self, ext):
        if ext.name != ORT_OPS:
            return super().build_extension(ext)
        # Python's own link flags (pyenv's) and a user's LDFLAGS may carry run-time search paths: a library copied
        # into Triton model repositories and C++ deployments should not name this machine's folders (it needs
        # nothing but libc).
        linker = self.compiler.linker_so
        self.compiler.linker_so = without_run_paths(linker)
        try:
            super().build_extension(ext)
        finally:
            self.compiler.linker_so = linker


def optional_extension(name, sources, link=()):
    # optional: a build failure is a warning, and the runtime reports the part as not built
    return Extension(name, sources=sources + [KERNEL], depends=HEADERS, extra_compile_args=extra_compile_args,
                     extra_link_args=["-pthread", *link], optional=True)


setup(
    ext_modules=[
        optional_extension("medmamba_edge.runtime._scan_cpu", ["runtime/csrc/selective_scan_cpu.c"]),
        # Never unloaded: ONNX Runtime dlcloses it with the last session, and each load made its op domain anew (the
        # last one's is ONNX Runtime's to keep, but only the library could release it: ~1 KB per model reload).
        optional_extension(ORT_OPS, ["runtime/csrc/ort_custom_ops.c"],
                           link=["-Wl,-z,nodelete"] if sys.platform.startswith("linux") else []),
    ],
    cmdclass={"build_ext": BuildExt},
)
