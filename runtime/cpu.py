"""The CPU a figure was measured on, in one line: its model and the instruction set its kernels use.

ONNX Runtime's INT8 kernels, and so INT8 speed and even accuracy, differ with the instruction set
(VNNI's vpdpbusd accumulates in int32, AVX2's vpmaddubsw saturates in int16; AMX has its own tiles), so
every speed or INT8 figure this package prints names it, e.g. "Intel Xeon Processor, AVX-512 VNNI, AMX-INT8"
or "AMD EPYC 7763 64-Core Processor, AVX2". Also the CPUs this process may use (its affinity mask and CPU quota),
and so the threads a model runs by default.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import time
from pathlib import Path

from medmamba_edge.errors import UserError

from .files import mounts
from .metadata import positive_int

CPUINFO = Path("/proc/cpuinfo")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")
ROOT = Path("/")  # where /proc/self and the cgroup mounts are read
# Set to "avx2" by benchmarks/hide_avx512.c, which hides the AVX-512 family, AVX-VNNI and AMX from CPUID (where
# the kernels look) but not from /proc/cpuinfo (where we look).
CPUID_ENV = "MEDMAMBA_EDGE_CPUID"
HIDDEN_BY_AVX2_CPUID = ("avx512", "avx_vnni", "amx")
# Arm's /proc/cpuinfo has no "model name", only the core's implementer and part numbers (what lscpu decodes): those of
# the Jetsons' and the common Arm servers' and boards' cores.
ARM_CORES = {
    ("0x41", "0xd05"): "ARM Cortex-A55",  # the little cores of RK3588 boards (Orange Pi 5, Rock 5)
    ("0x41", "0xd07"): "ARM Cortex-A57",  # Jetson Nano, TX1, TX2
    ("0x41", "0xd08"): "ARM Cortex-A72",  # Raspberry Pi 4
    ("0x41", "0xd0b"): "ARM Cortex-A76",  # Raspberry Pi 5
    ("0x41", "0xd0c"): "ARM Neoverse-N1",  # AWS Graviton2, Ampere Altra
    ("0x41", "0xd40"): "ARM Neoverse-V1",  # AWS Graviton3
    ("0x41", "0xd42"): "ARM Cortex-A78AE",  # Jetson Orin
    ("0x41", "0xd49"): "ARM Neoverse-N2",
    ("0x41", "0xd4f"): "ARM Neoverse-V2",  # NVIDIA Grace, AWS Graviton4
    ("0x4e", "0x003"): "NVIDIA Denver 2",  # Jetson TX2, beside its Cortex-A57s
    ("0x4e", "0x004"): "NVIDIA Carmel",  # Jetson Xavier
}


def instruction_set(flags: set[str]) -> str:
    """The widest SIMD level in /proc/cpuinfo ``flags`` (x86 "flags" or Arm "Features"), plus its INT8
    dot-product extensions; "" when none is known."""
    if "avx512f" in flags:
        parts = ["AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512"]
    elif "avx2" in flags:
        parts = ["AVX2 AVX-VNNI" if "avx_vnni" in flags else "AVX2"]
    elif "asimd" in flags:
        parts = ["NEON dotprod" if "asimddp" in flags else "NEON"]
    elif "sse2" in flags:
        parts = ["SSE2"]
    else:
        parts = []
    if "amx_int8" in flags:
        parts.append("AMX-INT8")
    return ", ".join(parts)


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo ``text``; on Arm, where each processor names its
    core, the model is every kind of core in turn (big.LITTLE: "ARM Cortex-A55 + ARM Cortex-A76")."""
    fields: dict[str, str] = {}
    arm_cores: dict[tuple[str, str], None] = {}  # (implementer, part) in processor order, each kind once
    implementer = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            key, value = key.strip().lower(), value.strip()
            fields.setdefault(key, value)
            if key == "cpu implementer":  # the kernel writes it before the part, in each processor's block
                implementer = value.lower()
            elif key == "cpu part":
                arm_cores[implementer, value.lower()] = None
    # a core left unnamed would make a two-kind machine read as one kind: then none is named
    names = [ARM_CORES.get(core) for core in arm_cores]
    arm_core = " + ".join(names) if names and all(names) else ""
    model = fields.get("model name") or fields.get("model") or arm_core or fields.get("hardware") or ""
    return model, set((fields.get("flags") or fields.get("features") or "").split())


@functools.cache
def describe_cpu() -> str:
    """"<model>, <instruction set>" for this machine, from /proc/cpuinfo (Linux) or ``platform`` elsewhere."""
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        model, flags = "", set()
    model = re.sub(r"\s+", " ", re.sub(r"\((R|TM|tm)\)", "", model)).strip()
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    if os.environ.get(CPUID_ENV) == "avx2":
        flags = {f for f in flags if not f.startswith(HIDDEN_BY_AVX2_CPUID)}
        return f"{model}, {instruction_set(flags)} (AVX-512, AVX-VNNI and AMX hidden from CPUID)"
    isa = instruction_set(flags)
    return f"{model}, {isa}" if isa else model


def _affinity() -> set[int]:
    """The CPUs this process may run on: its affinity mask (a container's or taskset's share)."""
    try:
        return set(os.sched_getaffinity(0)) or {0}
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """How many CPUs this process may run on, at least 1."""
    return len(_affinity())


def _cgroup_dirs(root: Path) -> list[tuple[str, Path, Path]]:
    """("v2" or "v1", mount point, this process's cgroup folder) for the unified hierarchy and the v1 one with the
    cpu controller, where mounted."""
    paths = {}  # "v2" or "v1" -> this process's cgroup path in that hierarchy
    for line in (root / "proc/self/cgroup").read_text().splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue
        if hierarchy == "0" and not controllers:
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    found = {}  # "v2" or "v1" -> (mount point, this process's cgroup folder, whether the mount shows it)
    for mount_root, mount_point, fs_type, options in mounts(root):
        version = "v2" if fs_type == "cgroup2" else "v1" if fs_type == "cgroup" and "cpu" in options else None
        if version in paths:
            point = root / mount_point.lstrip("/")
            # The mount shows the hierarchy from mount_root down (a container without a cgroup namespace mounts
            # its own cgroup); a path outside it is above what this mount shows: then the mount's top is the nearest.
            relative = os.path.relpath(paths[version], mount_root)
            shown = relative.split(os.sep)[0] != ".."
            # A later mount hides an earlier one at its point (the host's /sys/fs/cgroup bound over the container's
            # own, as systemd in Docker is run): the last that shows the process's cgroup counts.
            if shown or not found.get(version, (None, None, False))[2]:
                found[version] = point, point / relative if shown else point, shown
    return [(version, point, folder) for version, (point, folder, _) in found.items()]


def _quota_here(version: str, folder: Path) -> float | None:
    """The CPUs one cgroup's own limit allows (quota / period), or None: no limit, or none readable."""
    try:
        if version == "v2":  # cpu.max: "max 100000" (none) or "200000 100000"
            quota, period = (folder / "cpu.max").read_text().split()
        else:  # cpu.cfs_quota_us: -1 for none
            quota, period = (folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text()
        quota, period = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


QUOTA_REREAD_S = 1.0
_QUOTA_READS: dict[Path, tuple[float, float | None]] = {}  # root -> (time.monotonic() of the read, its quota)


def cpu_quota(root: Path = ROOT) -> float | None:
    """How many CPUs' time the process's cgroup may use (``docker --cpus``, a Kubernetes CPU limit), or None where
    it has no quota. A limit on any cgroup above it holds too, so the smallest along the path up to the mount's top
    counts; both hierarchies are read where both are mounted (a hybrid host). Anything unreadable or odd reads as no
    quota: the count it would hold is only a default. Read again once QUOTA_REREAD_S have passed, not on each call:
    the walk through mountinfo (0.15 ms on a VM of 20 mounts, more on a host of many) tripled the time of a
    MedMamba-T scan at 32x32 that took its default threads, and a quota may still change under a running process
    (a Kubernetes pod resized in place)."""
    now = time.monotonic()
    read_at, quota = _QUOTA_READS.get(root, (-math.inf, None))
    if now - read_at >= QUOTA_REREAD_S:
        quota = _read_cpu_quota(root)
        _QUOTA_READS[root] = now, quota
    return quota


def _read_cpu_quota(root: Path) -> float | None:
    try:
        cgroups = _cgroup_dirs(root)
    except (OSError, ValueError):
        return None
    quotas = []
    for version, mount_point, folder in cgroups:
        while True:
            quotas.append(_quota_here(version, folder))
            if folder == mount_point or mount_point not in folder.parents:
                break
            folder = folder.parent
    return min((q for q in quotas if q is not None), default=None)


def held_to_quota(count: int) -> int:
    """``count`` threads, fewer where the CPU quota allows fewer CPUs' time: a thread beyond the quota (rounded up)
    only waits for the next period, each thread's work in bursts (ONNX Runtime's one thread per core of a 64-core
    host, at --cpus=2)."""
    return _held(count, cpu_quota())


def _held(count: int, quota: float | None) -> int:
    return count if quota is None else max(1, min(count, math.ceil(quota)))


def _physical_cores(topology: Path) -> int:
    """The physical cores among the CPUs this process may use: a CPU that shares its core with another (SMT,
    hyper-threading) adds none. ``topology``: /sys/devices/system/cpu, whose cpuN/topology/thread_siblings_list
    names each CPU's core mates."""
    cpus = _affinity()
    cores = set()
    for cpu in cpus:
        try:
            siblings = _cpu_list((topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
        except (OSError, ValueError):  # no sysfs (a container may hide it; macOS): one thread per usable CPU
            return len(cpus)
        cores.add(min(siblings & cpus, default=cpu))
    return max(1, len(cores))


def default_threads(topology: Path = CPU_TOPOLOGY) -> int:
    """The threads ONNX Runtime and PyTorch start by default, one per physical core, counted here among the CPUs
    this process may use and held to its CPU quota."""
    return held_to_quota(_physical_cores(topology))


def describe_default_threads() -> str:
    """default_threads() and, where the CPU quota held it, what held it: "2, CPU quota 2 of 16 CPUs"."""
    # The quota read once: read again for the text, it could have gone meanwhile (QUOTA_REREAD_S), a TypeError
    cores, quota = _physical_cores(CPU_TOPOLOGY), cpu_quota()
    threads = _held(cores, quota)
    return f"{threads}, CPU quota {quota:g} of {usable_cpus()} CPUs" if threads < cores else str(threads)


def confined_threads() -> int | None:
    """The threads to give a backend (ONNX Runtime, PyTorch) that has its own default, or None to leave it that:
    where an affinity mask or a CPU quota leaves this process less than the machine, default_threads, since those
    defaults count the machine's cores and read no quota, and start threads that only wait."""
    machine = os.cpu_count() or 1
    quota = cpu_quota()
    confined = usable_cpus() < machine or (quota is not None and quota < machine)
    return default_threads() if confined else None


def _cpu_list(text: str) -> set[int]:
    """The CPUs of a sysfs CPU list such as "0-3,8,10-11"."""
    cpus = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def check_threads(threads: int | None) -> None:
    """A --threads value: more threads than CPUs only contend (--threads 100000 would start that many, with
    gigabytes of stacks)."""
    if threads is not None and not (positive_int(threads) and threads <= usable_cpus()):
        raise UserError(f"--threads must be between 1 and {usable_cpus()} (the CPUs this process may use), got {threads}")
