"""`medmamba-edge serve` on a real Triton server (PyTriton's tritonserver, 127.0.0.1), with this venv as its
client: answers equal local inference on real images, concurrent clients are all answered and batched,
HTTP and gRPC, health, readiness, statistics and metrics as Triton gives them, and a clean stop on SIGTERM.
The official PneumoniaMNIST checkpoint, exported once per session (plugin form, native scan op, 32×32)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medmamba_edge.runtime.backends import BackendError, open_backend
from medmamba_edge.runtime.decode import read_image
from medmamba_edge.runtime.preprocess import preprocess
from tests.cli_runner import cli, read_jsonl
from tests.exported_models import official_onnx
from tests.shared_data import require_shared
from tests.triton_server import (ROOT, _cmdline, _group_members, free_ports, http_get, require_serve_python, running_server,
                                 started_server)

CLIENTS, REQUESTS_PER_CLIENT = 16, 4
CONCURRENCY_DEADLINE_S = 120


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    require_serve_python()
    return official_onnx(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 real BUSI ultrasound images (8 per class), linked into one folder."""
    busi = require_shared("data", "busi")
    folder = tmp_path_factory.mktemp("busi24")
    for label in ("benign", "malignant", "normal"):
        for path in sorted((busi / label).glob("*.png"))[:8]:
            (folder / f"{label}_{path.name.replace(' ', '_')}").symlink_to(path)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    # A queue delay long enough that concurrent requests meet in the batcher even on a busy CI machine.
    with running_server(model, tmp_path_factory.mktemp("serve"), "--max-batch", "8",
                        "--max-queue-delay-us", "20000") as server:
        yield server


def test_run_against_the_server_equals_local_inference_on_real_images(server, model, images, tmp_path):
    folder = images[0].parent
    code, output = cli("run", server.url, folder, "--batch", 4, "--top-k", 2, "--jsonl", tmp_path / "served.jsonl",
                       "--console", "none")
    assert code == 0, output
    assert "on triton" in output and "python backend, max batch 8, plugin scan" in output
    code, output = cli("run", model, folder, "--batch", 4, "--top-k", 2, "--jsonl", tmp_path / "local.jsonl",
                       "--console", "none")
    assert code == 0, output
    served, local = read_jsonl(tmp_path / "served.jsonl"), read_jsonl(tmp_path / "local.jsonl")
    assert len(served) == len(local) == len(images)
    assert [r["status"] for r in served] == ["ok"] * len(images)
    assert [(r["source"], r["labels"]) for r in served] == [(r["source"], r["labels"]) for r in local]
    assert np.allclose([r["probabilities"] for r in served], [r["probabilities"] for r in local], atol=1e-6)


def test_the_serve_venv_runs_models_locally_as_this_one_does(model, images, tmp_path):
    # Its older OpenCV (opencv-python-headless < 4.12) once lacked an API the decoder used: every image skipped.
    folder = tmp_path / "with_a_broken_png"
    folder.mkdir()
    for image in images[:3]:
        (folder / image.name).symlink_to(image)
    (folder / "z_broken.png").write_bytes(images[0].read_bytes()[:300])
    records = {}
    for python in (require_serve_python(), Path(sys.executable)):
        jsonl = tmp_path / f"{python.parent.parent.name}.jsonl"
        result = subprocess.run([str(python), "-m", "medmamba_edge.cli", "run", str(model), str(folder), "--console",
                                 "none", "--jsonl", str(jsonl)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        records[python] = [(r["status"], r["labels"]) for r in read_jsonl(jsonl)]
    serve_venv, this_venv = records.values()
    assert serve_venv == this_venv and [status for status, _ in serve_venv] == ["ok"] * 3 + ["skipped"]


def test_the_backend_gives_the_local_logits_and_the_metadata_of_the_file(server, model, images):
    local, remote = open_backend(model), open_backend(server.url)
    with local, remote:
        assert remote.metadata == local.metadata
        batch = preprocess([read_image(p) for p in images[:11]], local.metadata)  # 11 > max batch: two requests
        assert np.abs(remote.run(batch) - local.run(batch)).max() < 1e-5


def test_concurrent_clients_are_all_answered_in_batches_larger_than_one(server, model, images):
    with open_backend(model) as local:
        batch = preprocess([read_image(p) for p in images[:CLIENTS]], local.metadata)
        expected = local.run(batch)
    before = _model_stats(server)
    answers: dict[tuple[int, int], np.ndarray] = {}
    errors: list[str] = []
    start = threading.Barrier(CLIENTS)

    def client(index: int) -> None:
        try:
            with open_backend(server.url) as remote:  # one connection per client, as separate carts have
                start.wait(timeout=30)
                for request in range(REQUESTS_PER_CLIENT):
                    answers[index, request] = remote.run(batch[index:index + 1])[0]
        except Exception as exc:  # reported below with the others
            errors.append(f"client {index}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, CONCURRENCY_DEADLINE_S - (time.monotonic() - started)))
    assert not any(t.is_alive() for t in threads), f"clients still waiting after {CONCURRENCY_DEADLINE_S} s"
    assert not errors, errors
    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    for (index, _), logits in answers.items():
        assert np.abs(logits - expected[index]).max() < 1e-5
    after = _model_stats(server)
    assert after["inference_count"] - before["inference_count"] == CLIENTS * REQUESTS_PER_CLIENT
    executions = after["execution_count"] - before["execution_count"]
    assert executions < CLIENTS * REQUESTS_PER_CLIENT, "every request ran alone: no dynamic batching"
    assert max(int(s["batch_size"]) for s in after["batch_stats"]) > 1


def _model_stats(server) -> dict:
    status, body = http_get(f"{server.http}/v2/models/{server.name}/stats")
    assert status == 200, body
    (stats,) = json.loads(body)["model_stats"]
    return stats


def test_benchmark_times_a_served_model_as_its_clients_see_it(server):
    from medmamba_edge.benchmarking import benchmark

    report = benchmark([server.url], batches=[1], warmup=0, iterations=2)  # "no such model file", one slash, before
    (measurement,) = report.measurements
    assert measurement.model == server.url and measurement.backend.startswith("triton 2.")
    assert measurement.batch == 1 and len(measurement.latencies_ms) == 2
    # Its worker is only a client: its 55 MB were shown as the model's peak RSS beside a local model's 214.
    assert measurement.peak_rss_mb is None and report.markdown().split("\n")[-3].endswith("| served |")


def test_a_served_models_address_is_kept_whole_by_every_command(server, tmp_path):
    """A Path-typed argument folded triton:// into triton:/ (benchmark's JSON recorded that)."""
    from typer.testing import CliRunner

    from medmamba_edge.cli import app

    result = CliRunner().invoke(app, ["benchmark", server.url, "--batch", "1", "--warmup", "0", "--iterations", "1",
                                      "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["measurements"][0]["model"] == server.url
    result = CliRunner().invoke(app, ["evaluate", server.url + "x", "--data", str(tmp_path / "absent")])
    assert result.exit_code == 1 and f"{server.url}x" in result.output, result.output


def test_health_readiness_metadata_and_metrics_are_tritons(server):
    assert http_get(f"{server.http}/v2/health/live")[0] == 200
    assert http_get(f"{server.http}/v2/health/ready")[0] == 200
    status, body = http_get(f"{server.http}/v2/models/{server.name}")
    assert status == 200
    served = json.loads(body)
    assert served["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert served["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
    status, metrics = http_get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert status == 200
    assert re.search(rf'nv_inference_request_success\{{model="{server.name}",version="1"\}} \d+', metrics.decode())
    # Loading and unloading models is guarded (PyTriton's token): a client cannot unload the served model.
    unload = urllib.request.Request(f"{server.http}/v2/repository/models/{server.name}/unload", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unload, timeout=10)
    assert refused.value.code in (401, 403)
    assert http_get(f"{server.http}/v2/models/{server.name}/ready")[0] == 200


def test_grpc_answers_as_http_does(server, model, images):
    """KServe v2 over gRPC, with tritonclient from the serve venv (this venv's protobuf is too new for it)."""
    with open_backend(model) as local:
        batch = preprocess([read_image(p) for p in images[:3]], local.metadata)
        expected = local.run(batch)
    np.save(Path(server.log).with_suffix(".npy"), batch)
    script = textwrap.dedent(f"""
        import numpy as np, tritonclient.grpc as g
        client = g.InferenceServerClient("127.0.0.1:{server.grpc_port}")
        x = np.load({str(Path(server.log).with_suffix(".npy"))!r})
        i = g.InferInput("input", list(x.shape), "FP32"); i.set_data_from_numpy(x)
        print(client.infer({server.name!r}, [i]).as_numpy("logits").tolist())
    """)
    result = subprocess.run([str(require_serve_python()), "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert np.abs(np.array(json.loads(result.stdout)) - expected).max() < 1e-5


def test_a_model_the_server_does_not_have_is_one_line(server):
    with pytest.raises(BackendError, match=r"triton://127\.0\.0\.1:\d+/nosuchmodel: cannot read the model's "
                                           r"configuration \(HTTP 4\d\d: .*nosuchmodel"):
        open_backend(f"triton://127.0.0.1:{server.http_port}/nosuchmodel")


def test_the_grpc_port_given_for_the_http_one_is_said_to_be_another_server(server):
    # It was "server unreachable (broken HTTP answer (BadStatusLine))": gRPC answers HTTP/1.1 with HTTP/2 frames.
    with pytest.raises(BackendError, match=r"the server's answer is no HTTP/1\.1 \(gRPC answers HTTP/2, on the port "
                                           r"after Triton's HTTP one\); is this a Triton \(KServe v2\) HTTP port\?"):
        open_backend(f"triton://127.0.0.1:{server.grpc_port}/{server.name}")


def test_sigterm_stops_the_server_cleanly(model, tmp_path):
    with running_server(model, tmp_path) as server:
        os.kill(server.process.pid, signal.SIGTERM)
        code = server.process.wait(timeout=30)
        log = server.log.read_text(errors="replace")
        assert code == 0, server.log_tail()
        assert "stopping on SIGTERM: letting the requests in flight finish" in log
        # The whole group goes: tritonserver and the Python backend stubs, which leave once they see their
        # server gone (not always by the time the leader has been reaped).
        assert group_gone_within(server.process.pid, 10), f"still running in its group: {group_members(server.process.pid)}"
        assert not list(Path("/dev/shm").glob(f"*pytrtion{server.process.pid}-*"))


def test_sigterm_while_serve_starts_is_a_clean_stop(model, tmp_path):
    """`systemctl stop` right after the start: the signal came while ONNX Runtime imported (exit 130, or 1 with an
    ImportError where it interrupted the extension's initialisation)."""
    with started_server(model, tmp_path) as server:
        maps = Path(f"/proc/{server.process.pid}/maps")
        deadline = time.monotonic() + 60
        while "onnxruntime" not in maps.read_text() and time.monotonic() < deadline:  # serve() loads the model
            time.sleep(0.01)
        os.kill(server.process.pid, signal.SIGTERM)
        code = server.process.wait(timeout=60)
        log = server.log.read_text(errors="replace")
        assert code == 0 and "Traceback" not in log, log
        assert group_gone_within(server.process.pid, 10), f"still running in its group: {group_members(server.process.pid)}"


SERVING_THREAD = """
import logging, os, sys, threading, time
from medmamba_edge.serving import ServeOptions, serve

model, http, grpc, metrics = sys.argv[1], *map(int, sys.argv[2:])
stop, said, errors = threading.Event(), [], []

def serving():
    try:
        serve(model, ServeOptions(host="127.0.0.1", port=http, grpc_port=grpc, metrics_port=metrics, threads=1),
              notify=said.append, stop=stop)
    except BaseException as exc:
        errors.append(repr(exc))

import cv2  # noqa: F401 (its import sets LD_LIBRARY_PATH: serve's is looked at after it)
library_path = os.environ.get("LD_LIBRARY_PATH")
logging.getLogger("pytriton").setLevel(logging.INFO)  # the application's, to see PyTriton's records
thread = threading.Thread(target=serving)
thread.start()
deadline = time.monotonic() + 90
while thread.is_alive() and not said and time.monotonic() < deadline:
    time.sleep(0.1)
stop.set()
thread.join(60)
print(logging.getLogger("pytriton").level, os.environ.get("LD_LIBRARY_PATH") == library_path, thread.is_alive(),
      errors, said[:1], flush=True)
"""


def test_an_application_stops_serve_on_its_own_thread_with_its_event(model, tmp_path):
    """serve() said it served until a stop signal, but off the main thread it can set no handler and took no other
    stop: an application serving from a thread of its own could not end it short of killing the process. And serve
    set the pytriton logger to WARNING for good: the application's own level for it was gone after serve returned."""
    python = require_serve_python()
    home = Path(tempfile.mkdtemp(prefix="mt-serve-"))  # PyTriton's sockets: a short path (see started_server)
    try:
        result = subprocess.run([str(python), "-c", SERVING_THREAD, str(model), *map(str, free_ports(3))], cwd=ROOT,
                                capture_output=True, text=True, timeout=240, start_new_session=True,
                                env={**os.environ, "HOME": str(home)})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    level, library_path_kept, alive, errors, said = result.stdout.splitlines()[-1].split(" ", 4)  # after its log
    assert alive == "False" and errors == "[]" and said.startswith("['serving "), result.stdout[-3000:]
    assert level == "20"  # logging.INFO, as the application set it
    assert library_path_kept == "True"  # this interpreter's libraries first on it for the server only


def test_a_killed_tritonserver_is_named_and_leaves_no_process_behind(model, tmp_path):
    with running_server(model, tmp_path) as server:
        (tritonserver,) = [int(m.split()[0]) for m in group_members(server.process.pid) if " tritonserver " in m]
        os.kill(tritonserver, signal.SIGKILL)
        code = server.process.wait(timeout=60)
        errors = [line for line in server.log.read_text(errors="replace").splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and "the Triton server was killed by SIGKILL" in errors[0], server.log_tail()
        # Its Python backend stub, re-parented when its server died, would otherwise run on for good.
        assert group_gone_within(server.process.pid, 10), f"still running in its group: {group_members(server.process.pid)}"


def test_a_killed_python_backend_is_named_and_ends_serve(model, tmp_path):
    """Killed, Triton's Python-backend stub left a server that answered every request with an error and called
    itself ready, while `serve` ran on in silence."""
    with running_server(model, tmp_path) as server:
        (stub,) = [int(m.split()[0]) for m in group_members(server.process.pid) if " triton_python_b " in m]  # comm: 15
        os.kill(stub, signal.SIGKILL)
        code = server.process.wait(timeout=60)
        errors = [line for line in server.log.read_text(errors="replace").splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, server.log_tail()
        assert f"the server's process running the model (triton_python_backend_stub, pid {stub}) ended" in errors[0]
        assert group_gone_within(server.process.pid, 10), f"still running in its group: {group_members(server.process.pid)}"


def test_a_model_unloaded_through_the_repository_api_ends_serve(model, tmp_path):
    """The token that guards the model-repository API is on tritonserver's command line, which any local user can
    read from /proc: an unload left `serve` running, serving nothing."""
    with running_server(model, tmp_path) as server:
        (tritonserver,) = [int(m.split()[0]) for m in group_members(server.process.pid) if " tritonserver " in m]
        arguments = Path(f"/proc/{tritonserver}/cmdline").read_bytes().decode()
        (token,) = set(re.findall(r"triton-access-token=([^\0,;\s]+)", arguments))
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v2/repository/models/medmamba/unload",
                                         method="POST", headers={"triton-access-token": token})
        assert urllib.request.urlopen(request, timeout=30).status == 200
        # Its stop (PyTriton's, after the unload) took over 60 s once in a full suite run on 2 busy cores; the whole
        # test takes 40 s alone.
        code = server.process.wait(timeout=120)
        errors = [line for line in server.log.read_text(errors="replace").splitlines() if line.startswith("error:")]
        assert code == 1 and errors == [f"error: {model}: the server no longer has medmamba ready (unloaded through "
                                        f"its model-repository API?)"], server.log_tail()


def test_ctrl_c_while_a_client_sends_leaves_no_process_behind(model, images, tmp_path):
    # A client's open connection holds Triton's stop until its exit timeout, after which tritonserver exits
    # without stopping its Python backend: the stub outlived it, re-parented, for good.
    with running_server(model, tmp_path) as server:
        client = open_backend(server.url)
        batch = preprocess([read_image(images[0])], client.metadata)
        answered, stop = [], threading.Event()

        def send() -> None:
            while not stop.is_set():
                try:
                    answered.append(client.run(batch))
                except BackendError:
                    stop.wait(0.1)  # the server is stopping: asked again until the test ends

        sender = threading.Thread(target=send)
        sender.start()
        try:
            deadline = time.monotonic() + 60
            while not answered and time.monotonic() < deadline:
                time.sleep(0.05)
            assert answered, server.log_tail()
            os.killpg(server.process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the group
            code = server.process.wait(timeout=60)
        finally:
            stop.set()
            sender.join(timeout=30)
            client.close()
        assert code == 0, server.log_tail()
        assert group_gone_within(server.process.pid, 10), f"still running in its group: {group_members(server.process.pid)}"


def test_a_stop_a_client_holds_up_leaves_no_model_copy_behind(model, tmp_path):
    """A kept-alive connection holds Triton's stop until its exit timeout; the server then exits without its
    Python backend removing the model copy it ran from (/tmp/folderXXXXXX): one more left on every such stop."""
    import http.client

    with running_server(model, tmp_path) as server:
        copies = {Path(*Path(arg).parts[:3]) for pid in _group_members(server.process.pid) for arg in _cmdline(pid)
                  if re.fullmatch(r"/tmp/folder\w+/.*", arg)}
        assert copies and all(c.is_dir() for c in copies)
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        connection.request("GET", "/v2/health/live")
        connection.getresponse().read()  # answered, and the connection stays open
        try:
            os.kill(server.process.pid, signal.SIGTERM)
            server.process.wait(timeout=90)
        finally:
            connection.close()
        assert not [c for c in copies if c.exists()], server.log_tail()


def group_gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def group_members(pgid: int) -> list[str]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                members.append(f"{stat.parent.name} {(stat.parent / 'comm').read_text().strip()} ({fields[0]})")
        except (OSError, IndexError, ValueError):
            continue
    return members


def test_a_port_in_use_is_one_line(model, tmp_path):
    python = require_serve_python()
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc, metrics = free_ports(2)
        result = subprocess.run([str(python), "-m", "medmamba_edge.cli", "serve", str(model), "--port", str(port),
                                 "--grpc-port", str(grpc), "--metrics-port", str(metrics)], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, start_new_session=True)
    assert result.returncode == 1
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert line == f"error: 127.0.0.1:{port}: cannot listen there (Address already in use)"


def test_the_server_loads_this_interpreters_libpython_and_would_fail_without_it(tmp_path):
    """PyTriton's backend stub links libpython3.X.so.1.0 and finds Debian's first; a pyenv or conda Python then
    fails to load any model. serve puts the interpreter's LIBDIR first; here the same PyTriton without that."""
    python = require_serve_python()
    probe = json.loads(subprocess.run([str(python), "-c", textwrap.dedent("""
        import json, sysconfig
        from medmamba_edge.serving import interpreter_library_dir, server_environment
        print(json.dumps([interpreter_library_dir(), sysconfig.get_config_var("LIBDIR"),
                          server_environment({"LD_LIBRARY_PATH": "/opt/other"})["LD_LIBRARY_PATH"]]))
    """)], capture_output=True, text=True, check=True).stdout)
    libdir, interpreter_libdir, path = probe
    if libdir is None:
        assert path == "/opt/other"
        pytest.skip(f"this interpreter's libpython is the system's ({interpreter_libdir}): nothing to put first")
    assert path == f"{libdir}:/opt/other" and libdir == interpreter_libdir
    workspace = Path(tempfile.mkdtemp(prefix="mt-plain-"))  # short: PyTriton binds Unix sockets in it
    script = textwrap.dedent(f"""
        import numpy as np, os
        from pytriton.decorators import batch
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
        @batch
        def identity(x):
            return {{"y": x}}
        triton = Triton(config=TritonConfig(http_address="127.0.0.1", http_port={free_ports(1)[0]}, allow_grpc=False,
                                            allow_metrics=False), workspace={str(workspace / "w")!r})
        triton.bind("identity", identity, inputs=[Tensor(name="x", dtype=np.float32, shape=(1,))],
                    outputs=[Tensor(name="y", dtype=np.float32, shape=(1,))], config=ModelConfig(max_batch_size=1))
        try:
            triton.run()
            print("loaded")
        except Exception as exc:
            print("failed:", exc)
        finally:
            triton.stop()
    """)
    try:
        result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=150,
                                env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}, start_new_session=True)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    assert "failed:" in result.stdout and "_recursion_count" in result.stdout + result.stderr, result.stdout[-2000:]


def test_two_serves_at_once_keep_the_servers_library_path_until_the_last_returns(monkeypatch):
    """An application's two serves on two threads, the first returning before the second starts its tritonserver:
    the path the second's server needs is still there, and the application's own is back after both."""
    from medmamba_edge import serving

    monkeypatch.setattr(serving, "interpreter_library_dir", lambda: "/opt/ours")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/app")
    first, second = serving._server_library_path(), serving._server_library_path()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    served = os.environ["LD_LIBRARY_PATH"]
    second.__exit__(None, None, None)
    assert (served, os.environ["LD_LIBRARY_PATH"]) == ("/opt/ours:/opt/app", "/opt/app")


def test_shared_memory_a_dead_server_left_is_found_and_removed(tmp_path):
    """What a crashed tritonserver and its Python backend had mapped in /dev/shm, they never unlink."""
    from medmamba_edge.serving import remove_shared_memory, shared_memory_of

    name = Path("/dev/shm") / f"medmamba-test-{os.getpid()}"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import mmap, sys, time
        with open({str(name)!r}, "w+b") as f:
            f.truncate(4096)
            memory = mmap.mmap(f.fileno(), 4096)
        print("mapped", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        from medmamba_edge.serving import _process_table

        table = _process_table()
        segments = shared_memory_of({(holder.pid, table[holder.pid][1])}, table)
        assert name in segments and all(str(s).startswith("/dev/shm/") for s in segments)
        assert name not in shared_memory_of({(os.getpid(), table[os.getpid()][1])}, table)  # only what they map
        assert shared_memory_of({(holder.pid, table[holder.pid][1] + 1)}, table) == set()  # a pid reused by another program
    finally:
        holder.kill()
        holder.wait()
    assert name.exists()  # a killed process unlinks nothing
    remove_shared_memory(segments)
    assert not name.exists()
    remove_shared_memory({name})  # already gone: no error


def test_a_python_backend_stub_gone_before_serve_first_looks_is_a_failure(tmp_path):
    """A stub that ended between Triton's readiness and serve's first look at the server's processes was never
    noted: serve ran on, announcing a model every request to which failed. Here a fake server (a shell, as
    tritonserver) with a fake stub (sleep, under the stub's name), looked at by one watch before the stub is
    killed and by another only after."""
    from types import SimpleNamespace

    from medmamba_edge.serving import ServerWatch, _process_table

    stub = tmp_path / "triton_python_backend_stub"
    shutil.copy("/bin/sleep", stub)
    server = subprocess.Popen(["sh", "-c", f'"{stub}" 60 & echo $!; wait; sleep 60'], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        stub_pid = int(server.stdout.readline())
        deadline = time.monotonic() + 10
        while Path(f"/proc/{stub_pid}/comm").read_text().strip() != stub.name[:15] and time.monotonic() < deadline:
            time.sleep(0.01)  # the shell's child, until it execs the stub
        triton = SimpleNamespace(_triton_server=SimpleNamespace(_tritonserver_running_cmd=SimpleNamespace(pid=server.pid)),
                                 is_alive=lambda: True)
        (port,) = free_ports(1)  # no HTTP there: readiness unknown, which is no failure
        early = ServerWatch(triton, "127.0.0.1", port, "medmamba")
        assert early.failure(early.note()) is None and {pid for pid, _ in early.stubs} == {stub_pid}
        os.kill(stub_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while stub_pid in _process_table() and time.monotonic() < deadline:  # until the shell has reaped it
            time.sleep(0.05)
        late = ServerWatch(triton, "127.0.0.1", port, "medmamba")
        assert late.failure(late.note()) == ("the server's process running the model (triton_python_backend_stub) is "
                                             "not running (it ended as the model became ready); every request would fail")
        assert early.failure(early.note()) == (f"the server's process running the model (triton_python_backend_stub, "
                                               f"pid {stub_pid}) ended; every request would fail")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
