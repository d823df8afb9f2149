"""runtime/cpu.py: the CPU line every speed and INT8 figure carries, from /proc/cpuinfo as each kind of
machine writes it."""

import os
import subprocess
import sys

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


# /proc/self/mountinfo lines as the kernel writes them: a cgroup v2 host's, a v1 host's (cpu and cpuacct mounted
# together, as Docker's hosts and Ubuntu 20.04 have it; its cpuset beside it) and a hybrid one's (v1 controllers,
# v2 at /sys/fs/cgroup/unified without the cpu controller).
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = ("25 24 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n"
             "33 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup "
             "rw,cpu,cpuacct\n"
             "34 25 0:30 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpuset\n")
HYBRID_MOUNTS = (V1_MOUNTS + "41 25 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - "
                 "cgroup2 cgroup2 rw\n")


def cgroup_tree(root, cgroups: str, mounts: str, files: dict[str, str]):
    """A fake / with /proc/self/cgroup, /proc/self/mountinfo and each of ``files`` (path under root: content)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroups)
    (root / "proc/self/mountinfo").write_text(mounts)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def test_cpu_quota_of_a_cgroup_v2_is_the_smallest_cpu_max_up_to_the_root(tmp_path):
    # a container with its own cgroup namespace: its cgroup is the mount's top, limited there
    docker = cgroup_tree(tmp_path / "docker", "0::/\n", V2_MOUNTS, {"sys/fs/cgroup/cpu.max": "200000 100000\n"})
    assert cpu.cpu_quota(docker) == 2.0
    # a Kubernetes pod's limit on the pod, none on its container, the host's root without cpu.max
    nested = {"sys/fs/cgroup/kubepods.slice/cpu.max": "max 100000\n",
              "sys/fs/cgroup/kubepods.slice/pod1/cpu.max": "150000 100000\n",
              "sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max": "max 100000\n"}
    pod = cgroup_tree(tmp_path / "pod", "0::/kubepods.slice/pod1/ctr\n", V2_MOUNTS, nested)
    assert cpu.cpu_quota(pod) == 1.5
    # a smaller limit below a larger one, with a period other than 100 ms
    nested["sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max"] = "25000 50000\n"
    assert cpu.cpu_quota(cgroup_tree(tmp_path / "ctr", "0::/kubepods.slice/pod1/ctr\n", V2_MOUNTS, nested)) == 0.5
    unlimited = cgroup_tree(tmp_path / "none", "0::/user.slice\n", V2_MOUNTS,
                            {"sys/fs/cgroup/user.slice/cpu.max": "max 100000\n"})
    assert cpu.cpu_quota(unlimited) is None


def test_cpu_quota_of_a_cgroup_v1_is_its_cfs_quota_over_its_period(tmp_path):
    cgroups = "12:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    limited = {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
               "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
               "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
               "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert cpu.cpu_quota(cgroup_tree(tmp_path / "v1", cgroups, V1_MOUNTS, limited)) == 1.0
    # the parent limits, its child (-1) does not
    parent = {**limited, "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1\n",
              "sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_quota_us": "300000\n",
              "sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n"}
    assert cpu.cpu_quota(cgroup_tree(tmp_path / "parent", cgroups, V1_MOUNTS, parent)) == 3.0
    # a container without a cgroup namespace has its own cgroup mounted as the top: /proc/self/cgroup names the
    # host's path, the mount's root says which part of it the mount shows
    own = V1_MOUNTS.replace(" / /sys/fs/cgroup/cpu,cpuacct", " /docker/abc /sys/fs/cgroup/cpu,cpuacct")
    mounted = {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
               "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert cpu.cpu_quota(cgroup_tree(tmp_path / "own", cgroups, own, mounted)) == 0.5
    # a hybrid host: the quota is v1's, its v2 hierarchy has no cpu.max
    hybrid = cgroup_tree(tmp_path / "hybrid", cgroups + "0::/docker/abc\n", HYBRID_MOUNTS, limited)
    assert cpu.cpu_quota(hybrid) == 1.0


def test_an_unreadable_or_odd_cgroup_reads_as_no_quota(tmp_path):
    assert cpu.cpu_quota(tmp_path / "nothing") is None  # no /proc (macOS, Windows)
    assert cpu.cpu_quota(cgroup_tree(tmp_path / "unmounted", "0::/\n", "", {})) is None
    for k, text in enumerate(["", "max\n", "garbage 100000\n", "200000 0\n", "0 100000\n", "1 2 3\n", "\xff\xfe"]):
        tree = cgroup_tree(tmp_path / f"odd{k}", "0::/a\n", V2_MOUNTS, {"sys/fs/cgroup/a/cpu.max": text})
        assert cpu.cpu_quota(tree) is None, text
    missing_period = cgroup_tree(tmp_path / "period", "4:cpu,cpuacct:/\n", V1_MOUNTS,
                                 {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "100000\n"})
    assert cpu.cpu_quota(missing_period) is None
    limit = {"sys/fs/cgroup/cpu.max": "100000 100000\n"}
    assert cpu.cpu_quota(cgroup_tree(tmp_path / "no-path", "0::\n", V2_MOUNTS, limit)) is None
    garbled = cgroup_tree(tmp_path / "garbled", "no colons here\n0::/\n", "short line\n" + V2_MOUNTS, limit)
    assert cpu.cpu_quota(garbled) == 1.0  # the readable lines still count


def test_default_threads_are_held_to_the_cpu_quota_rounded_up(tmp_path, monkeypatch):
    usable = sorted(os.sched_getaffinity(0))
    topology = write_topology(tmp_path / "one", [[c] for c in usable])
    for quota, expected in [(None, len(usable)), (0.5, 1), (1.0, 1), (1.5, min(2, len(usable))), (1000.0, len(usable))]:
        monkeypatch.setattr(cpu, "cpu_quota", lambda: quota)
        assert cpu.default_threads(topology) == expected, quota


def test_a_process_under_a_quota_of_one_cpu_defaults_to_one_thread(one_cpu_cgroup):
    """A container's quota (docker --cpus=1) on a host of more CPUs: the real cgroup, as the kernel enforces it."""
    script = """
import os, sys
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
from medmamba_edge.runtime import cpu, scan_cpu
print(cpu.cpu_quota(), cpu.default_threads(), scan_cpu.default_num_threads(), cpu.describe_default_threads(), sep="|")
"""
    result = subprocess.run([sys.executable, "-c", script, str(one_cpu_cgroup)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    usable = len(os.sched_getaffinity(0))
    assert result.stdout.strip().split("|") == ["1.0", "1", "1", f"1, CPU quota 1 of {usable} CPUs"]


def test_the_cpu_quota_is_read_again_after_a_second_not_on_each_call(tmp_path, monkeypatch):
    """The scan's default took the quota on each call, a walk through mountinfo that tripled a MedMamba-T scan at
    32x32 (0.11 ms to 0.32 ms here); a quota may still change under a running process (a pod resized in place)."""
    from medmamba_edge.runtime import scan_cpu
    from tests.ss2d_reference import make_ss2d_inputs

    monkeypatch.setattr(cpu, "_QUOTA_READS", {}, raising=False)  # what an earlier test read
    walks = []
    monkeypatch.setattr(cpu, "_cgroup_dirs", lambda root, walk=cpu._cgroup_dirs: walks.append(root) or walk(root))
    arrays = make_ss2d_inputs(1, 96, 8, 8, 6, 16)
    for _ in range(20):
        scan_cpu.ss2d_scan(*arrays)
    assert len(walks) == 1
    tree = cgroup_tree(tmp_path, "0::/\n", V2_MOUNTS, {"sys/fs/cgroup/cpu.max": "100000 100000\n"})
    assert cpu.cpu_quota(tree) == 1.0
    (tree / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")  # resized: no limit now
    assert cpu.cpu_quota(tree) == 1.0
    now = cpu.time.monotonic()
    monkeypatch.setattr(cpu.time, "monotonic", lambda: now + cpu.QUOTA_REREAD_S)
    assert cpu.cpu_quota(tree) is None


def test_cpu_quota_reads_mountinfo_paths_with_their_escapes(tmp_path):
    """mountinfo writes a space in a mount point or a mount's root as \\040, /proc/self/cgroup writes it as it is: a
    cgroup2 mounted at "/run/my cgroups", a container's cgroup "/ci job" mounted as the top, the process in a
    cgroup of its own below it."""
    mounts = V2_MOUNTS.replace(" / /sys/fs/cgroup ", " / /run/my\\040cgroups ")
    spaced = cgroup_tree(tmp_path / "point", "0::/ci job\n", mounts, {"run/my cgroups/ci job/cpu.max": "50000 100000\n"})
    assert cpu.cpu_quota(spaced) == 0.5
    own = V2_MOUNTS.replace(" / /sys/fs/cgroup ", " /ci\\040job /sys/fs/cgroup ")
    assert cpu.cpu_quota(cgroup_tree(tmp_path / "root", "0::/ci job/worker\n", own,
                                     {"sys/fs/cgroup/worker/cpu.max": "50000 100000\n"})) == 0.5


def test_cpu_quota_reads_the_cgroup_mount_mounted_last(tmp_path):
    """A container run with -v /sys/fs/cgroup:/sys/fs/cgroup (systemd in Docker, cgroup v1) has the host's hierarchy
    mounted over its own: the host's (root /) hides Docker's (root /docker/abc) at the same mount point."""
    hidden = V1_MOUNTS.replace(" / /sys/fs/cgroup/cpu,cpuacct", " /docker/abc /sys/fs/cgroup/cpu,cpuacct")
    host = "50 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    limited = {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
               "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
               "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
               "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}
    assert cpu.cpu_quota(cgroup_tree(tmp_path, "4:cpu,cpuacct:/docker/abc\n", hidden + host, limited)) == 0.5


def test_the_default_threads_text_reads_the_quota_once(monkeypatch):
    """describe_default_threads read the quota twice, for the count and for the text: a quota gone between the two
    (read again after QUOTA_REREAD_S) made the text '{None:g}', a TypeError in benchmark's header."""
    readings = iter([1.0, None])
    monkeypatch.setattr(cpu, "cpu_quota", lambda: next(readings))
    monkeypatch.setattr(cpu, "_physical_cores", lambda topology: 2)
    assert cpu.describe_default_threads() == f"1, CPU quota 1 of {cpu.usable_cpus()} CPUs"
