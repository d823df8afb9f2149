"""benchmarks/*.py: bad arguments are refused in one line before any work, and the pieces that decide what a
table counts (bench_triton's clients, bench_run_loop's video) do what the table says."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.shared_data import require_shared

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(("script", "args", "option"), [
    ("bench_cpu_latency.py", ["--batches", "0"], "--batches"),
    ("bench_cpu_latency.py", ["--threads", "0"], "--threads"),
    ("bench_cpu_latency.py", ["--checkpoint", "/nonexistent.pth"], "/nonexistent.pth"),
    ("bench_quantize_cpu.py", ["--forms", "plugin,portabel"], "--forms"),
    ("bench_parity_official.py", ["--variants", "foo"], "--variants"),
    ("bench_preprocess_parity.py", ["--images", "-3"], "--images"),
    ("bench_scan_cpu.py", ["--ref-stage", "7"], "--ref-stage"),
    ("bench_scan_libraries.py", ["lib.so", "--profiles", "0"], "--profiles"),
    ("bench_run_loop.py", ["--sizes"], "--sizes"),
    ("bench_triton.py", ["--clients", "0"], "--clients"),
])
def test_bad_arguments_are_a_one_line_usage_error(script, args, option, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and option in last, result.stderr


def test_frames_0_is_refused_before_a_video_is_made(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_run_loop.py"), "--frames", "0", "--workdir",
                             str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--frames" in result.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("model", "says"), [("model.txt", "not an ONNX model"), ("missing.onnx", "No such file"),
                                            ("folder.onnx", "a folder, not an ONNX model"),
                                            ("n" * 300 + ".onnx", "File name too long")])
def test_a_wrong_model_is_refused_before_any_work(tmp_path, model, says):
    """The suffix was only checked when the model was opened, after the exports and the video; a name too long
    was a traceback."""
    (tmp_path / "model.txt").write_text("not a model")
    (tmp_path / "folder.onnx").mkdir()
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_run_loop.py"), "--model", str(tmp_path / model),
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bench_run_loop.py: error: argument --model: ") and model in last and says in last, last
    assert not (tmp_path / "work").exists()


@pytest.fixture
def bench(monkeypatch):
    """A benchmark script as a module (its ``from common import ...`` needs benchmarks/ on the path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_an_interrupted_video_is_not_left_for_the_next_run(bench, tmp_path):
    run_loop = bench("bench_run_loop")
    busi = sorted(require_shared("data", "busi").rglob("*.png"))[:2]
    video = tmp_path / "busi_3.avi"
    with pytest.raises(Exception, match="missing.png"):
        run_loop.make_video(video, [*busi, tmp_path / "missing.png"])
    assert list(tmp_path.iterdir()) == []
    assert run_loop.make_video(video, busi) == video and video.stat().st_size > 0
    assert list(tmp_path.iterdir()) == [video]


class FakeServer:
    """``open_backend`` for triton:// URLs: records warm-up and timed requests, and on_ready, in order."""

    def __init__(self, fail_warm_up: int | None = None):
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.fail_warm_up = fail_warm_up
        self.opened = 0

    def __call__(self, url):
        server = self

        class Remote:
            def __enter__(self):
                with server.lock:
                    self.index, self.calls = server.opened, 0
                    server.opened += 1
                return self

            def __exit__(self, *exc):
                return False

            def run(self, batch):
                if len(batch) == 0:  # as the triton client fails on an empty batch
                    raise ValueError("need at least one array to concatenate")
                if self.calls == 0 and self.index == server.fail_warm_up:
                    raise ConnectionError("connection refused by the fake server")
                with server.lock:
                    server.events.append("warm-up" if self.calls == 0 else "timed")
                self.calls += 1
                return np.zeros((len(batch), 2), np.float32)

        return Remote()


@pytest.mark.parametrize("clients", [3, 4, 16])  # 16: more clients than images, as the default --clients has at --images 8
def test_served_counts_start_after_every_warm_up(bench, monkeypatch, clients):
    """The row counts the timed requests answered: 6 for 3 clients on 8 images (2 each), 16 for 16 (1 each)."""
    triton = bench("bench_triton")
    server = FakeServer()
    monkeypatch.setattr(triton, "open_backend", server)
    result = triton.time_served("triton://fake/medmamba", np.zeros((8, 3, 4, 4), np.float32), clients,
                                on_ready=lambda: server.events.append("ready"))
    assert server.events[:clients + 1].count("warm-up") == clients and server.events[clients] == "ready"
    assert set(server.events[clients + 1:]) == {"timed"}
    assert result["images"] == server.events.count("timed") == max(8 // clients * clients, clients)


def test_a_client_failing_before_the_clock_reports_its_own_error(bench, monkeypatch):
    triton = bench("bench_triton")
    monkeypatch.setattr(triton, "open_backend", FakeServer(fail_warm_up=1))
    with pytest.raises(RuntimeError, match="ConnectionError: connection refused by the fake server"):
        triton.time_served("triton://fake/medmamba", np.zeros((8, 3, 4, 4), np.float32), 3)


def test_local_rows_count_the_images_run(bench):
    triton = bench("bench_triton")

    class Local:
        def run(self, batch):
            return np.zeros((len(batch), 2), np.float32)

    assert triton.time_local(Local(), np.zeros((20, 3, 4, 4), np.float32), 8)["images"] == 16
    assert triton.time_local(Local(), np.zeros((5, 3, 4, 4), np.float32), 8)["images"] == 5


def test_a_server_that_never_gets_ready_is_stopped_with_its_whole_group(bench, monkeypatch, tmp_path):
    """serve runs in a session of its own, out of a Ctrl-C's reach: a benchmark whose wait for it failed (serve not
    ready in time, or the wait interrupted) exited and left serve, tritonserver and its stub running for good. A
    stand-in serve here: a shell that starts a child and never answers."""
    import time

    triton = bench("bench_triton")
    fake = tmp_path / "serve-python"
    fake.write_text('#!/bin/sh\nsleep 60 &\necho $! > "$FAKE_SERVE_CHILD"\nwait\n')
    fake.chmod(0o755)
    monkeypatch.setattr(triton, "SERVE_PYTHON", fake)
    monkeypatch.setenv("FAKE_SERVE_CHILD", str(tmp_path / "child.pid"))
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(triton.subprocess, "Popen", popen)
    with pytest.raises(RuntimeError, match=r"serve was not ready in 1 s: see "):
        triton.start_server(tmp_path / "m.onnx", 1, 8, 2000, tmp_path / "serve.log", tmp_path, ready_timeout_s=1)
    (process,) = started
    assert process.returncode is not None
    child = int((tmp_path / "child.pid").read_text())

    def running(pid: int) -> bool:  # a zombie (killed, not yet reaped by whoever adopted it) is not running
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)


@pytest.mark.parametrize("stopped_by", ["timeout", "second Ctrl-C"])
def test_a_slow_server_stop_is_serves_abort_before_a_kill(bench, tmp_path, stopped_by):
    """A server slow to stop, or a second Ctrl-C, was SIGKILLed: serve's own clean-up (its shared memory, the model
    copies) never ran. Now serve gets a second SIGTERM, its abort, which still cleans up. A stand-in serve: a shell
    that takes the first SIGTERM as the start of a slow stop and the second as the abort."""
    triton = bench("bench_triton")
    cleaned = tmp_path / "cleaned"
    script = f'trap \'if [ -n "$t" ]; then touch "{cleaned}"; exit 0; fi; t=1\' TERM; while :; do sleep 0.05; done'
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.3)  # the trap set
    if stopped_by == "second Ctrl-C":
        real_wait, waits = process.wait, []

        def wait(timeout=None):
            waits.append(timeout)
            if len(waits) == 1:
                time.sleep(0.3)  # the user's second Ctrl-C, after the first SIGTERM reached serve
                raise KeyboardInterrupt
            return real_wait(timeout)

        process.wait = wait
        with pytest.raises(KeyboardInterrupt):
            triton.stop_server(process, timeout_s=60, abort_s=10)
    else:
        triton.stop_server(process, timeout_s=0.5, abort_s=10)
    assert cleaned.exists() and process.returncode == 0
