import os
import signal

import pytest

from medmamba_edge.runtime.signals import STOP_SIGNALS
from tests.cli_runner import reap_cli_processes

# Two cores here: keep torch from oversubscribing them when ONNX Runtime or the scan kernel also runs.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# A test run started in the background by a script (no job control: SIGINT ignored) or under nohup (SIGHUP ignored)
# would pass the ignored signal on to every CLI child, which rightly keeps it ignored, and to the in-process runs:
# the signal tests' Ctrl-C and hangups would then do nothing. Python's own Ctrl-C handler, and one that does nothing
# for the others, keep this process as it was and let the children start with the default.
for _signum in STOP_SIGNALS:
    if signal.getsignal(_signum) is signal.SIG_IGN:
        signal.signal(_signum, signal.default_int_handler if _signum == signal.SIGINT else lambda *_: None)


@pytest.fixture(scope="session", autouse=True)
def trace_each_checkpoint_once():
    """torch.onnx's tracing is most of an export's 20-40 s, and a dozen tests export the same two checkpoints at
    the same size (each form, with and without verification, through the CLI in-process). The trace is a pure
    function of the weights (sha256), input size, batch and opset, so the session keeps one per key and hands
    every export a copy; everything after it (lowering, metadata, checks, verification, writing) runs each time.
    Checkpoints without a digest (tests' random weights) are traced every time."""
    try:
        import onnx

        from medmamba_edge.exporters import onnx_export
    except ImportError:  # a runtime-only environment exports nothing
        yield
        return
    trace, traced = onnx_export.trace_to_onnx, {}

    def trace_once(checkpoint, size, batch, opset):
        if not checkpoint.sha256:
            return trace(checkpoint, size, batch, opset)
        key = (checkpoint.sha256, tuple(size), batch, opset)
        if key not in traced:
            traced[key] = trace(checkpoint, size, batch, opset)
        copy = onnx.ModelProto()
        copy.CopyFrom(traced[key])
        return copy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "trace_to_onnx", trace_once)
        yield


@pytest.fixture(autouse=True)
def reap_cli_children():
    """No child a test started with cli_process outlives it, whether the test passed or failed."""
    yield
    reap_cli_processes()


@pytest.fixture
def one_cpu_cgroup():
    """A new cgroup whose CPU quota is one CPU (100 ms each 100 ms period), as its cgroup.procs: a process joins it
    by writing its pid there. Removed after the test; the test is skipped, saying why, where this process cannot
    make one (not root, cgroups mounted read-only as in most containers, no cpu controller)."""
    from medmamba_edge.runtime import cpu

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs for a quota of one to hold the threads below")
    try:
        hierarchies = {version: point for version, point, _ in cpu._cgroup_dirs(cpu.ROOT)}
        v2 = hierarchies.get("v2")
        v2_controllers = (v2 / "cgroup.subtree_control").read_text().split() if v2 else []
    except (OSError, ValueError) as exc:
        pytest.skip(f"cannot read this process's cgroups: {exc}")
    if "cpu" in v2_controllers:
        version, point, limits = "v2", v2, {"cpu.max": "100000 100000"}
    elif "v1" in hierarchies:
        version, point, limits = "v1", hierarchies["v1"], {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}
    else:
        pytest.skip("no cgroup hierarchy here has the cpu controller for its new cgroups")
    folder = point / f"medmamba-edge-test-{os.getpid()}"
    try:
        folder.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup in {point} ({version}): {exc.strerror}")
    try:
        try:
            for name, value in limits.items():
                (folder / name).write_text(value)
        except OSError as exc:
            pytest.skip(f"cannot set a CPU quota on {folder}: {exc.strerror}")
        yield folder / "cgroup.procs"
    finally:
        folder.rmdir()
