"""`medmamba-edge benchmark` on the bundled tiny model: markdown table, JSON and PNG."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from medmamba_edge import benchmarking
from medmamba_edge.benchmarking import timed
from medmamba_edge.cli import app
from medmamba_edge.runtime.cpu import describe_cpu
from tests.exported_models import bundled_onnx

runner = CliRunner()


def test_benchmark_writes_table_json_and_plot(tmp_path_factory, tmp_path):
    model = bundled_onnx(tmp_path_factory)
    result = runner.invoke(app, ["benchmark", str(model), "--batch", "1,2", "--warmup", "1", "--iterations", "3",
                                 "--threads", "1", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    assert "| model | backend | precision | input | batch | p50 ms | p90 ms | p99 ms |" in result.output
    assert "| bundled32.onnx | ONNX Runtime" in result.output and "onnxruntime" in result.output
    assert result.output.startswith(f"{describe_cpu()}, "), "the table is headed by the CPU and its instruction set"
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["machine"]["cpu"] == describe_cpu() and report["machine"]["threads"] == 1
    assert report["machine"]["cpu_scan_path"] in ("avx512", "avx2", "baseline")
    rows = report["measurements"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert len(row["latencies_ms"]) == 3 and 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 50  # a Python process with ONNX Runtime
        assert row["precision"] == "fp32" and row["input_size"] == [32, 32]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_onto_stdout_gets_stdout_to_itself(tmp_path_factory):
    """`--json /dev/stdout | reader`: the table and 'wrote' lines followed the JSON on stdout."""
    result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "benchmark", str(bundled_onnx(tmp_path_factory)),
                             "--batch", "1", "--warmup", "0", "--iterations", "1", "--json", "/dev/stdout"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [m["batch"] for m in json.loads(result.stdout)["measurements"]] == [1]
    assert "wrote /dev/stdout" in result.stderr


def test_a_report_moved_to_stderr_names_the_models_as_given(tmp_path_factory, tmp_path):
    """With --json /dev/stdout the table went to stderr's console, which reads rich markup: x[red]y.onnx read
    'xy.onnx' there (and in evaluate's tables), a model file that does not exist."""
    model = tmp_path / "x[red]y.onnx"
    model.symlink_to(bundled_onnx(tmp_path_factory))
    result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "benchmark", str(model), "--batch", "1",
                             "--warmup", "0", "--iterations", "1", "--json", "/dev/stdout"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| x[red]y.onnx | ONNX Runtime" in result.stderr, result.stderr


def test_a_forced_scan_path_is_in_the_header_and_the_json(tmp_path_factory, tmp_path, monkeypatch):
    """MEDMAMBA_EDGE_SCAN_ISA=baseline made the same model 9x slower with nothing in the report saying why."""
    monkeypatch.setenv("MEDMAMBA_EDGE_SCAN_ISA", "baseline")
    result = runner.invoke(app, ["benchmark", str(bundled_onnx(tmp_path_factory)), "--batch", "1", "--warmup", "0",
                                 "--iterations", "1", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "scan path: baseline (forced by MEDMAMBA_EDGE_SCAN_ISA)" in result.output.splitlines()[0]
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["cpu_scan_path"] == \
        "baseline (forced by MEDMAMBA_EDGE_SCAN_ISA)"


def test_benchmark_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["benchmark", str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "no such model file" in result.output
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    result = runner.invoke(app, ["benchmark", str(tmp_path / "broken.onnx"), "--iterations", "1"])
    assert result.exit_code == 1 and "broken.onnx" in result.output and "Traceback" not in result.output
    assert len(result.output.splitlines()) == 1, result.output
    result = runner.invoke(app, ["benchmark", str(tmp_path / "broken.onnx"), "--batch", "1,x"])
    assert result.exit_code == 1 and "--batch must be comma-separated integers" in result.output


def test_outputs_that_would_replace_a_model_or_each_other_are_refused_before_timing(tmp_path_factory, tmp_path):
    """`--json model.onnx` once replaced the 58 MB model with a 1 KB report, and said 'wrote model.onnx'."""
    model = tmp_path / "victim.onnx"
    model.write_bytes(bundled_onnx(tmp_path_factory).read_bytes())
    before = model.read_bytes()
    for args, message in ((["--json", str(model)], "victim.onnx: the output would overwrite a file this command reads"),
                          (["--plot", str(model)], "victim.onnx: the output would overwrite a file this command reads"),
                          (["--json", str(tmp_path / "same"), "--plot", str(tmp_path / "same")], "same: given for two outputs")):
        result = runner.invoke(app, ["benchmark", str(model), "--iterations", "1", *args])
        assert result.exit_code == 1 and message in result.output and len(result.output.splitlines()) == 1
    assert model.read_bytes() == before and not (tmp_path / "same").exists()


def test_rows_say_how_a_fixed_batch_model_ran_and_tell_same_named_files_apart():
    from medmamba_edge.benchmarking import BenchmarkReport, Measurement

    def row(model, batch, fixed):
        return Measurement(model, "ONNX Runtime", "fp32", (32, 32), batch, fixed, [1.0])

    rows = [row("a/model.onnx", 1, None), row("b/model.onnx", 1, 4), row("b/model.onnx", 6, 4),
            row("b/model.onnx", 8, 4), row("c.onnx", 4, 4)]
    assert [r.batch_label() for r in rows] == ["1", "1 (1×4, 3 padded)", "6 (2×4, 2 padded)", "8 (2×4)", "4"]
    report = BenchmarkReport(machine={}, warmup=0, iterations=1, measurements=rows)
    assert report.model_names() == {"a/model.onnx": "a/model.onnx", "b/model.onnx": "b/model.onnx", "c.onnx": "c.onnx"}
    # Two versions of a served model by their addresses (their last parts were "1" and "2").
    served = BenchmarkReport(machine={}, warmup=0, iterations=1,
                             measurements=[row("triton://h:8000/m/1", 1, None), row("triton://h:8000/m/2", 1, None)])
    assert list(served.model_names().values()) == ["triton://h:8000/m/1", "triton://h:8000/m/2"]


def test_onnx_runtime_runs_no_more_threads_than_the_cpus_this_process_may_use(tmp_path_factory):
    """ONNX Runtime's default counts the machine's cores, not the affinity mask: on 1 of 2 CPUs (taskset, a
    container's cpuset) the official T-32 ran 2 intra-op threads, 16 ms a batch-1 run where 1 thread took 9, under
    benchmark's header 'threads: backend default (1)'."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and 2 CPUs to restrict the process to one")
    script = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from medmamba_edge.loaders import open_model
before = len(os.listdir("/proc/self/task"))
backend = open_model(sys.argv[1], threads=None if sys.argv[2] == "default" else int(sys.argv[2]))
print(len(os.listdir("/proc/self/task")) - before)
"""
    model = str(bundled_onnx(tmp_path_factory))

    def threads_started(threads: str) -> int:
        result = subprocess.run([sys.executable, "-c", script, model, threads], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    assert threads_started("default") == threads_started("1")


QUOTA_SCRIPT = """
import os, sys
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
import numpy as np
from medmamba_edge.loaders import open_model
threads = None if sys.argv[3] == "default" else int(sys.argv[3])
session = open_model(sys.argv[2], threads=threads)  # held: a session's pool ends with it
session.run(np.zeros((1, 3, 32, 32), np.float32))
started = len(os.listdir("/proc/self/task"))
import torch
from medmamba_edge.benchmarking import machine_info
from medmamba_edge.runtime.bundled import bundled_checkpoint
checkpoint, seen = open_model(bundled_checkpoint(), input_size=32, threads=threads), []
checkpoint.checkpoint.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
checkpoint.run(np.zeros((1, 3, 32, 32), np.float32))
print(started, *seen, machine_info(threads)["threads"], sep="|")
"""


def test_a_cpu_quota_holds_the_backends_default_threads(tmp_path_factory, one_cpu_cgroup):
    """ONNX Runtime's and torch's defaults count the machine's cores, neither reads the CPU quota (ONNX Runtime
    1.32, torch 2.13): under docker --cpus=2 on a 64-core host ONNX Runtime ran 64 threads, each working in bursts
    and waiting for the next period. The real cgroup of one CPU here: as many threads as --threads 1."""
    model = str(bundled_onnx(tmp_path_factory))

    def under_quota(threads: str) -> list[str]:
        result = subprocess.run([sys.executable, "-c", QUOTA_SCRIPT, str(one_cpu_cgroup), model, threads],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split("|")

    default, one = under_quota("default"), under_quota("1")
    assert default[:2] == one[:2] and one[1:] == ["1", "1"]  # the process's threads with ONNX Runtime's; torch's
    assert default[2] == f"backend default (1, CPU quota 1 of {len(os.sched_getaffinity(0))} CPUs)"


def test_the_backends_defaults_follow_the_cpu_quota_read(monkeypatch):
    """The same where no cgroup can be made (a CI runner's container): the quota as runtime/cpu.py reads it."""
    import numpy as np
    import torch

    from medmamba_edge.benchmarking import machine_info
    from medmamba_edge.loaders import open_model
    from medmamba_edge.runtime import cpu
    from medmamba_edge.runtime.backends.onnxruntime.custom_ops import session_options
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    usable = len(os.sched_getaffinity(0))
    if usable < 2:
        pytest.skip("needs 2 CPUs for a quota of one to hold the threads below")
    monkeypatch.setattr(cpu, "cpu_quota", lambda: 1.0)
    assert session_options().intra_op_num_threads == 1
    assert machine_info(None)["threads"] == f"backend default (1, CPU quota 1 of {usable} CPUs)"
    checkpoint, seen = open_model(bundled_checkpoint(), input_size=32), []
    checkpoint.checkpoint.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    checkpoint.run(np.zeros((1, 3, 32, 32), np.float32))
    assert seen == [1]
    monkeypatch.setattr(cpu, "cpu_quota", lambda: float(usable))  # a quota of every CPU holds nothing
    assert machine_info(None)["threads"] == f"backend default ({cpu.default_threads()})"


def test_a_turn_ends_once_its_threads_have_stopped_spinning(tmp_path_factory):
    """ONNX Runtime's idle pool threads spin on after a run: a worker that answered at once went on burning a CPU
    (the official T-32 at 2 threads: 60 to 90 ms) while the next model's turn was timed on it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs for a pool thread that spins")
    from medmamba_edge.benchmarking import _loaded

    def cpu_ticks(pid: int) -> int:  # user and system time, in clock ticks
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])

    spent = 0
    with _loaded([str(bundled_onnx(tmp_path_factory))], [None], [1], 1, 2) as (worker,):
        for _ in range(5):
            worker.request({"batch": 1, "iterations": 3})
            before = cpu_ticks(worker.process.pid)
            time.sleep(0.1)
            spent += cpu_ticks(worker.process.pid) - before
    assert spent <= 1, f"{spent} clock ticks of CPU in 5 waits of 0.1 s after a turn"


def test_a_closed_worker_leaves_no_pipe_open(tmp_path_factory):
    """A worker's close killed its process but left its stdin and stdout pipes to the garbage collector: each
    benchmark, and each quantize --min-speedup, held two files open past its end and ended in 'ResourceWarning:
    unclosed file <_io.TextIOWrapper name=13 encoding='UTF-8'>' (python -X dev)."""
    from medmamba_edge.benchmarking import _loaded

    with _loaded([str(bundled_onnx(tmp_path_factory))], [None], [1], 0, 1) as (worker,):
        pipes = (worker.process.stdin, worker.process.stdout)
    assert all(pipe.closed for pipe in pipes)


def test_a_worker_dead_between_two_requests_is_said_as_such_and_closed(tmp_path_factory):
    """A worker killed while the others had their turn (the OOM killer) fails the next request's write, whose line then
    stays in its stdin's buffer: closing the pipe flushed it again, and that BrokenPipeError from the worker's close
    took the place of 'the benchmark worker was killed by SIGKILL'."""
    from medmamba_edge.benchmarking import BenchmarkError, _loaded

    with pytest.raises(BenchmarkError, match="the benchmark worker was killed by SIGKILL"):
        with _loaded([str(bundled_onnx(tmp_path_factory))], [None], [1], 0, 1) as (worker,):
            pipes = (worker.process.stdin, worker.process.stdout)
            worker.process.kill()
            worker.process.wait()
            worker.request({"batch": 1, "iterations": 1})
    assert all(pipe.closed for pipe in pipes) and worker.log.closed


def test_benchmark_runs_where_there_is_no_resource_module_and_reads_macos_peaks_in_bytes(monkeypatch):
    """`import resource` at the top ended benchmark and quantize --min-speedup in an ImportError on Windows, which has
    none; macOS gives ru_maxrss in bytes, not Linux's KiB, and its peaks were 1024 times too large."""
    hidden = "import sys; sys.modules['resource'] = None; import medmamba_edge.benchmarking"  # as on Windows
    done = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    linux = benchmarking.peak_rss_mb()
    assert linux > 50  # MiB: a Python process with numpy, ONNX Runtime and OpenCV
    monkeypatch.setattr(sys, "platform", "darwin")
    assert abs(benchmarking.peak_rss_mb() * 1024 - linux) < 16  # the same ru_maxrss, read as bytes


def test_timed_counts_warmup_apart():
    calls = []
    samples = timed(lambda: calls.append(1), warmup=2, iterations=3)
    assert len(calls) == 5 and len(samples) == 3 and min(samples) >= 0


def test_a_batch_size_asked_twice_is_one_row_and_the_header_counts_the_rounds_run(tmp_path_factory, tmp_path):
    model = bundled_onnx(tmp_path_factory)
    result = runner.invoke(app, ["benchmark", str(model), "--batch", "1,1", "--warmup", "0", "--iterations", "2",
                                 "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "2 timed runs per row after 0 warm-up runs, interleaved in 2 rounds" in result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["rounds"] == 2 and [len(r["latencies_ms"]) for r in report["measurements"]] == [2]


def _model_that_never_finishes(path: Path) -> Path:
    """(N, 3, 32, 32) → three logits, times a Loop of 10^15 steps: ONNX Runtime runs it in native code for good."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "true", "zero"], ["count"], body=body),
         helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Mul", ["flat", "count"], ["logits"])],
        "never", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("steps", TensorProto.INT64, [], [10 ** 15]),
         helper.make_tensor("true", TensorProto.BOOL, [], [True]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "medmamba_edge", json.dumps({"input_size": [32, 32], "class_names": ["a", "b", "c"],
                                                          "batch": None})
    onnx.save(model, str(path))
    return path


def _workers_of(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"medmamba_edge.benchmarking" in stat.read_bytes() and f"\0{parent}\0".encode() in stat.read_bytes():
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (one that ended but whose new parent has not collected it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_worker_stuck_in_native_code_ends_with_its_parent(tmp_path):
    model = _model_that_never_finishes(tmp_path / "never.onnx")
    parent = subprocess.Popen([sys.executable, "-m", "medmamba_edge.cli", "benchmark", str(model), "--batch", "1",
                               "--iterations", "1", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _workers_of(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        (worker,) = _workers_of(parent.pid)
        time.sleep(3)  # loaded and warming up: inside the Loop, deaf to everything but a signal
        parent.send_signal(signal.SIGTERM)  # no finally runs: the kernel has to end the worker
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker), "the worker outlived its parent"
    finally:
        parent.kill()
        for pid in _workers_of(parent.pid):
            os.kill(pid, signal.SIGKILL)
