"""Only the optional compiled CPU scan lives here; everything else is in pyproject.toml."""

import platform

from setuptools import Extension, setup

# x86-64: one binary, the kernel picks AVX-512/AVX2/baseline at load time (target_clones), so wheels stay
# portable. aarch64 (Jetson, Graviton) has NEON in its baseline.
extra_compile_args = ["-O3", "-std=c11", "-fno-math-errno", "-pthread"]
if platform.machine() in ("x86_64", "AMD64"):
    extra_compile_args.append("-DMEDMAMBA_TARGET_CLONES")

setup(
    ext_modules=[
        Extension(
            "medmamba_edge.runtime._scan_cpu",
            sources=["runtime/csrc/selective_scan_cpu.c"],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-pthread"],
            # No compiler on the target: the package still installs; the runtime then uses the portable scan.
            optional=True,
        )
    ]
)
