"""The compiled CPU SS2D scan (``runtime/csrc/selective_scan_cpu.c``), torch-free.

``ss2d_scan`` has the semantics of the ``SS2DScan`` node contract (``runtime/scan_node.py``) and of
``medmamba_edge.scan.ss2d_scan_ref``; it runs a C kernel vectorised across channels on ``num_threads``
pthreads. On x86-64 the kernel is compiled for AVX-512, AVX2 and the
baseline and runs the widest path the CPU supports, or the one $MEDMAMBA_EDGE_SCAN_ISA forces (read on
every call; ``isa()`` says which); elsewhere (NEON on aarch64) there is one path, ``baseline``.

The extension is optional (built by ``setup.py`` when a compiler is present): check ``available()``;
``unavailable_reason()`` says why it is not.
"""

from __future__ import annotations

import os

import numpy as np

from . import scan_node
from .cpu import held_to_quota, usable_cpus

try:
    from . import _scan_cpu as _ext

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _ext = None
    _IMPORT_ERROR = (
        f"the compiled CPU scan medmamba_edge.runtime._scan_cpu is not built ({exc}); build it with "
        "`python setup.py build_ext --inplace` or reinstall medmamba-edge with a C compiler available"
    )

THREADS_ENV = "MEDMAMBA_EDGE_SCAN_THREADS"
ISA_ENV = "MEDMAMBA_EDGE_SCAN_ISA"
# What each path needs from the CPU (gcc's x86-64 micro-architecture levels), for error messages.
ISA_REQUIREMENTS = {
    "avx512": "AVX-512 (F, BW, CD, DQ, VL: x86-64-v4)",
    "avx2": "AVX2 and FMA (x86-64-v3)",
}


def available() -> bool:
    """Whether the compiled kernel can be used."""
    return _ext is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    return _IMPORT_ERROR or ""


def compiled_isas() -> tuple[str, ...]:
    """The paths this build of the kernel holds, widest first."""
    if _ext is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _ext.ISAS


def cpu_supports(isa_name: str) -> bool:
    """Whether this CPU can run the compiled path ``isa_name`` (ValueError if the build has no such path)."""
    if _ext is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _ext.cpu_supports(isa_name)


def isa() -> str:
    """The path ``ss2d_scan`` runs: $MEDMAMBA_EDGE_SCAN_ISA if set, else the widest this CPU supports.

    ValueError if the variable names no path of this build, RuntimeError if this CPU cannot run it.
    """
    # C's isspace (the library reads the same variable): str.strip() would also take \x1c..\x1f and \x85 away.
    forced = os.environ.get(ISA_ENV, "").strip(" \t\n\r\f\v").lower()
    if not forced:
        return next(name for name in compiled_isas() if cpu_supports(name))
    if forced not in compiled_isas():
        raise ValueError(f"{ISA_ENV}={forced!r}: this build of the CPU scan has the paths "
                         f"{', '.join(compiled_isas())}")
    if not cpu_supports(forced):
        raise RuntimeError(f"{ISA_ENV}={forced}: this CPU cannot run it, it lacks {ISA_REQUIREMENTS[forced]}")
    return forced


def default_num_threads() -> int:
    """$MEDMAMBA_EDGE_SCAN_THREADS if set, else the CPUs this process may run on, held to its CPU quota."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {env!r}") from None
        if value < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {env!r}")
        return value
    return held_to_quota(usable_cpus())


def _f32(name: str, x) -> np.ndarray:
    try:
        # ALIGNED too: a float32 view at an odd byte offset is copied, not read through float* in C.
        return np.require(x, dtype=np.float32, requirements=("C_CONTIGUOUS", "ALIGNED"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ss2d_scan: {name} cannot be converted to a float32 array: {exc}") from None


def ss2d_scan(
    x,
    x_dbl,
    dt_projs_weight,
    dt_projs_bias,
    A,
    Ds,
    *,
    delta_softplus: bool = True,
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """y = SS2DScan(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds) with the compiled kernel.

    Shapes as the node's (``runtime/scan_node.py``): x (batch, D, H, W), x_dbl (batch, 4·(R+2N), H·W),
    dt_projs_weight (4, D, R), dt_projs_bias (4, D), A (4·D, N), Ds (4·D,). Inputs of another dtype or layout
    are converted to aligned C-contiguous float32. Returns y (batch, H, W, D) float32 (``out`` if given: a writable
    aligned C-contiguous float32 array of that shape, not sharing memory with any input). Runs the path ``isa()``
    names. Raises ValueError on bad shapes, RuntimeError if the extension is not built;
    $MEDMAMBA_EDGE_SCAN_ISA errors as ``isa()``.
    """
    if _ext is None:
        raise RuntimeError(_IMPORT_ERROR)
    names = scan_node.INPUT_NAMES
    arrays = [_f32(n, a) for n, a in zip(names, (x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds))]
    if arrays[0].ndim != 4:
        raise ValueError(f"ss2d_scan: x must be (batch, channels, height, width), got shape {arrays[0].shape}")
    batch, channels, height, width = arrays[0].shape
    shape = (batch, height, width, channels)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif not (
        isinstance(out, np.ndarray)
        and out.dtype == np.float32
        and out.flags.c_contiguous
        and out.flags.aligned
        and out.flags.writeable
        and out.shape == shape
    ):
        raise ValueError(f"ss2d_scan: out must be a writable aligned C-contiguous float32 array of shape {shape}")
    elif any(np.may_share_memory(out, a) for a in arrays):
        raise ValueError("ss2d_scan: out must not share memory with the inputs")
    if num_threads is None:
        num_threads = default_num_threads()
    _ext.ss2d_scan(*arrays, out, bool(delta_softplus), max(1, int(num_threads)), isa())
    return out
