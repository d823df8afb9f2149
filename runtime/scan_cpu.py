"""The compiled CPU selective scan (``runtime/csrc/selective_scan_cpu.c``), torch-free.

``selective_scan`` has the semantics of ``medmamba_edge.scan.selective_scan_ref`` and the
``SelectiveScan`` node contract (``runtime/scan_node.py``); it runs a C kernel vectorised across
channels (AVX-512 / AVX2 / NEON, picked at load time on x86-64) on ``num_threads`` pthreads.

The extension is optional (built by ``setup.py`` when a compiler is present): check ``available()``;
``unavailable_reason()`` says why it is not.
"""

from __future__ import annotations

import os

import numpy as np

try:
    from medmamba_edge.runtime import _scan_cpu as _ext

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _ext = None
    _IMPORT_ERROR = (
        f"the compiled CPU scan medmamba_edge.runtime._scan_cpu is not built ({exc}); build it with "
        "`python setup.py build_ext --inplace` or reinstall medmamba-edge with a C compiler available"
    )

THREADS_ENV = "MEDMAMBA_EDGE_SCAN_THREADS"


def available() -> bool:
    """Whether the compiled kernel can be used."""
    return _ext is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    return _IMPORT_ERROR or ""


def default_num_threads() -> int:
    """$MEDMAMBA_EDGE_SCAN_THREADS if set, else the CPUs this process may run on."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {env!r}") from None
        if value < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {env!r}")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _f32(name: str, x) -> np.ndarray:
    try:
        return np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"selective_scan: {name} cannot be converted to a float32 array: {exc}") from None


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D,
    delta_bias,
    *,
    delta_softplus: bool = True,
    num_threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """y = selective_scan(u, delta, A, B, C, D, delta_bias) with the compiled kernel.

    u, delta: (batch, channels, length); A: (channels, d_state); B, C: (batch, groups, d_state, length);
    D, delta_bias: (channels,). Inputs of another dtype or layout are converted to C-contiguous float32.
    Returns y, float32 with u's shape (``out`` if given: a writable C-contiguous float32 array of that
    shape, not sharing memory with any input). Raises ValueError on bad shapes, RuntimeError if the
    extension is not built.
    """
    if _ext is None:
        raise RuntimeError(_IMPORT_ERROR)
    names = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    arrays = [_f32(n, x) for n, x in zip(names, (u, delta, A, B, C, D, delta_bias))]
    if arrays[0].ndim != 3:
        raise ValueError(f"selective_scan: u must be (batch, channels, length), got shape {arrays[0].shape}")
    if out is None:
        out = np.empty(arrays[0].shape, dtype=np.float32)
    elif not (
        isinstance(out, np.ndarray)
        and out.dtype == np.float32
        and out.flags.c_contiguous
        and out.flags.writeable
        and out.shape == arrays[0].shape
    ):
        raise ValueError(
            f"selective_scan: out must be a writable C-contiguous float32 array of shape {arrays[0].shape}"
        )
    if out is not None and any(np.may_share_memory(out, a) for a in arrays):
        raise ValueError("selective_scan: out must not share memory with the inputs")
    if num_threads is None:
        num_threads = default_num_threads()
    num_threads = max(1, int(num_threads))
    _ext.selective_scan(*arrays, out, bool(delta_softplus), num_threads)
    return out
