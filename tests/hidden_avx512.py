"""benchmarks/hide_avx512.c for tests: a child process that sees an AVX2-only CPU on an AVX-512 one."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medmamba_edge.runtime import cpu

SOURCE = Path(__file__).resolve().parents[1] / "benchmarks" / "hide_avx512.c"
REFUSED = "no CPUID faulting"  # the library's line where the kernel or a sandbox refuses it


def build(folder: Path) -> Path:
    """The library, built into ``folder``; skips where this CPU has no AVX-512 to hide or cannot hide it."""
    flags = cpu.parse_cpuinfo(cpu.CPUINFO.read_text())[1] if cpu.CPUINFO.exists() else set()
    if platform.machine() != "x86_64" or "avx512f" not in flags:
        pytest.skip("needs an x86-64 CPU with AVX-512 to hide (an AVX2-only CPU runs these paths itself)")
    if "cpuid_fault" not in flags or shutil.which("gcc") is None:
        pytest.skip("needs CPUID faulting (cpuinfo flag cpuid_fault) and gcc to hide AVX-512 from CPUID")
    library = folder / "hide_avx512.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(SOURCE)], check=True)
    return library


def run_python(library: Path, code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -c code args`` in the checkout with the library preloaded (a plain interpreter: the library owns
    SIGSEGV, which pytest's faulthandler would take over); skips where CPUID faulting is refused at run time."""
    result = subprocess.run([sys.executable, "-c", code, *args],
                            env={**os.environ, **(env or {}), "LD_PRELOAD": str(library)},
                            capture_output=True, text=True, timeout=timeout, cwd=SOURCE.parents[1])
    if REFUSED in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[0])
    return result
