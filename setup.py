"""Only the optional compiled CPU scan lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

# x86-64 (gcc >= 12): one binary holds AVX-512, AVX2 and baseline code and picks per CPU, so wheels stay
# portable. aarch64 (Jetson, Graviton) has NEON in its baseline.
extra_compile_args = ["-O3", "-std=c11", "-fno-math-errno", "-pthread"]

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
