"""runtime/cpu.py: the CPU line every speed and INT8 figure carries, from /proc/cpuinfo as each kind of
machine writes it."""

import os

import pytest

from medmamba_edge.runtime import cpu

EPYC_AVX2 = """processor	: 0
vendor_id	: AuthenticAMD
model		: 1
model name	: AMD EPYC 7763 64-Core Processor
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 sha_ni
"""
XEON_VNNI = """processor	: 0
model		: 143
model name	: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags		: sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni amx_tile amx_int8
"""
SKYLAKE_X = "model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\nflags\t\t: sse2 avx2 fma avx512f avx512bw\n"
ORIN = "processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes crc32 atomics asimddp\nCPU part\t: 0xd42\n"


def arm_cpuinfo(features: str, *cores: tuple[str, str]) -> str:
    """An Arm /proc/cpuinfo text as the kernel writes it, one processor per (implementer, part)."""
    return "\n".join(f"processor\t: {k}\nBogoMIPS\t: 62.50\nFeatures\t: {features}\nCPU implementer\t: {implementer}\n"
                     f"CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: {part}\nCPU revision\t: 1\n"
                     for k, (implementer, part) in enumerate(cores))


# A Jetson AGX Orin's (JetPack 6): no model name, the core in implementer and part; each processor alike
ORIN_FULL = arm_cpuinfo("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                        "asimddp uscat ilrcpc flagm paca pacg", *[("0x41", "0xd42")] * 2)

# big.LITTLE: an RK3588 board's four Cortex-A55s then four Cortex-A76s; a Jetson TX2's Cortex-A57 at processor 0,
# its two Denver 2 cores next, then three more Cortex-A57s
RK3588 = arm_cpuinfo("fp asimd aes crc32 atomics asimddp", *[("0x41", "0xd05")] * 4, *[("0x41", "0xd0b")] * 4)
TX2 = arm_cpuinfo("fp asimd evtstrm aes pmull sha1 sha2 crc32", ("0x41", "0xd07"), *[("0x4e", "0x003")] * 2,
                  *[("0x41", "0xd07")] * 3)


@pytest.mark.parametrize("text, expected", [
    (EPYC_AVX2, "AMD EPYC 7763 64-Core Processor, AVX2"),
    (XEON_VNNI, "Intel Xeon Platinum 8481C CPU @ 2.70GHz, AVX-512 VNNI, AMX-INT8"),
    (SKYLAKE_X, "Intel Xeon Gold 6148 CPU @ 2.40GHz, AVX-512"),  # AVX-512 without VNNI: vpmaddubsw saturates
    (ORIN_FULL, "ARM Cortex-A78AE, NEON dotprod"),  # was "aarch64, NEON dotprod", as every Arm machine's
    (RK3588, "ARM Cortex-A55 + ARM Cortex-A76, NEON dotprod"),  # the first processor's core alone was looked up
    (TX2, "ARM Cortex-A57 + NVIDIA Denver 2, NEON"),  # was "ARM Cortex-A57, NEON": a third of its cores unnamed
], ids=["epyc-avx2", "xeon-vnni-amx", "skylake-avx512", "jetson-orin", "rk3588-big-little", "jetson-tx2"])
def test_names_the_model_and_the_instruction_set(text, expected, tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    cpu.describe_cpu.cache_clear()
    try:
        assert cpu.describe_cpu() == expected
    finally:
        cpu.describe_cpu.cache_clear()


def test_arm_without_a_model_name_falls_back_to_platform(tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(ORIN)
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(cpu.platform, "processor", lambda: "")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    cpu.describe_cpu.cache_clear()
    try:
        assert cpu.describe_cpu() == "aarch64, NEON dotprod"
        # a known core (Cortex-A76) beside one not in the table (Cortex-A510): naming the known alone said the
        # machine was all that
        (tmp_path / "cpuinfo").write_text(arm_cpuinfo("fp asimd asimddp", ("0x41", "0xd0b"), ("0x41", "0xd46")))
        cpu.describe_cpu.cache_clear()
        assert cpu.describe_cpu() == "aarch64, NEON dotprod"
        monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "absent")  # not Linux
        cpu.describe_cpu.cache_clear()
        assert cpu.describe_cpu() == "aarch64"
    finally:
        cpu.describe_cpu.cache_clear()


def test_names_the_instruction_set_left_when_avx512_is_hidden_from_cpuid(tmp_path, monkeypatch):
    """benchmarks/hide_avx512.c leaves /proc/cpuinfo as it is and says so in the environment: tables then name
    what the kernels saw."""
    (tmp_path / "cpuinfo").write_text(XEON_VNNI.replace("avx2 fma", "avx2 avx_vnni fma"))
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setenv(cpu.CPUID_ENV, "avx2")
    cpu.describe_cpu.cache_clear()
    try:
        assert cpu.describe_cpu() == ("Intel Xeon Platinum 8481C CPU @ 2.70GHz, AVX2 "
                                      "(AVX-512, AVX-VNNI and AMX hidden from CPUID)")
    finally:
        cpu.describe_cpu.cache_clear()


def write_topology(root, cores: list[list[int]]):
    """A /sys/devices/system/cpu tree in which each list of ``cores`` is one physical core's CPUs."""
    for siblings in cores:
        for cpu_id in siblings:
            folder = root / f"cpu{cpu_id}" / "topology"
            folder.mkdir(parents=True)
            (folder / "thread_siblings_list").write_text(",".join(map(str, siblings)) + "\n")
    return root


def test_default_threads_are_one_per_physical_core_among_the_usable_cpus(tmp_path):
    usable = sorted(os.sched_getaffinity(0))
    # The usable CPUs paired into cores as hyper-threading pairs them (a last one alone), then each on its own.
    paired = write_topology(tmp_path / "smt", [usable[i:i + 2] for i in range(0, len(usable), 2)])
    assert cpu.default_threads(paired) == (len(usable) + 1) // 2
    assert cpu.default_threads(write_topology(tmp_path / "one", [[c] for c in usable])) == len(usable)
    # A core whose other CPU is outside the mask still counts once; a CPU list in sysfs's ranges reads as its CPUs.
    ranged = write_topology(tmp_path / "ranged", [[c, 1000 + c] for c in usable])
    (ranged / f"cpu{usable[0]}" / "topology" / "thread_siblings_list").write_text(f"{usable[0]},1000-1001\n")
    assert cpu.default_threads(ranged) == len(usable)
    assert cpu.default_threads(tmp_path / "no-sysfs") == len(usable)  # hidden topology: one per usable CPU
