"""Serving on Triton against local inference, side by side in one run, on this machine's CPU.

Exports the official MedMamba-T (../shared) at --size (plugin form, dynamic batch; cached in --workdir),
preprocesses real BUSI images once, then measures:

* local: the ONNX Runtime backend `medmamba-edge run` uses, at batch 1 and batch 8 (images/s, latency per call);
* served: `medmamba-edge serve` (PyTriton's tritonserver, from the serve venv, dynamic batching up to
  --max-batch) with 1, 4 and 16 concurrent clients, each a thread with its own `triton://` backend sending
  batch-1 requests back to back (images/s over the wall time, per-request latency p50/p99);
* local batch 8 again at the end, so a machine that slowed down during the run shows.

The goal of issue 15: at 16 clients with dynamic batching, ≥ 90 % of local batch-8 throughput. Server and
clients share the machine's cores with each other (and, served, with Triton's Python backend stub).

    python benchmarks/bench_triton.py [--size 224] [--images 96] [--threads 2] [--max-batch 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from medmamba_edge.errors import UserError, plural
from medmamba_edge.runtime.backends import open_backend
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.decode import read_image
from medmamba_edge.runtime.preprocess import preprocess

from common import at_least, int_list, thread_count  # benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OFFICIAL_T = SHARED / "models/medmamba_t_pneumoniamnist32/medmamba_t_pneumoniamnist32.pth"
SERVE_PYTHON = Path(os.environ.get("MEDMAMBA_EDGE_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))


def export(size: int, workdir: Path) -> Path:
    path = workdir / f"medmamba_t_plugin_{size}_dynamic.onnx"
    if not path.exists():
        from medmamba_edge.exporters.onnx_export import export_onnx

        export_onnx(OFFICIAL_T, path, input_size=size, batch=None, verify=False)
    return path


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_local(backend, images: np.ndarray, batch: int) -> dict:
    backend.run(images[:batch])  # warm-up
    latencies, done, started = [], 0, time.perf_counter()
    for start in range(0, max(len(images) // batch * batch, 1), batch):  # whole batches only
        chunk = images[start:start + batch]
        t = time.perf_counter()
        backend.run(chunk)
        latencies.append((time.perf_counter() - t) * 1000)
        done += len(chunk)  # what ran, not len(latencies) * batch: a short first batch would count as whole
    wall = time.perf_counter() - started
    return {"images": done, "per_s": done / wall, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def time_served(url: str, images: np.ndarray, clients: int, on_ready=lambda: None) -> dict:
    """Each client connects and sends one untimed request, then all start together; ``on_ready`` runs once they
    all have warmed up and before any timed request (what the server counts from then on is the timed work)."""
    per_client = max(1, len(images) // clients)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1, action=on_ready)

    def client(index: int) -> None:
        try:
            with open_backend(url) as remote:
                remote.run(images[index % len(images)][None])  # connect and warm up before the clock starts
                ready.wait()
                for i in range(per_client):
                    row = images[(index * per_client + i) % len(images)][None]
                    t = time.perf_counter()
                    remote.run(row)
                    with lock:
                        latencies.append((time.perf_counter() - t) * 1000)
        except threading.BrokenBarrierError:
            pass  # another client failed (its error is the one to report), or the start timed out
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            ready.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:  # a client failed, or the wait timed out (which breaks the barrier too)
        for thread in threads:
            thread.join(timeout=60)
        raise RuntimeError(errors[0] if errors else "the clients were not connected and warmed up in 120 s") from None
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=600)
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(errors[0])
    return {"images": len(latencies), "per_s": len(latencies) / wall, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99)}


def batch_counts(http: str, name: str) -> dict[int, int]:
    """Executions per batch size so far, from Triton's statistics."""
    import json

    with urllib.request.urlopen(f"{http}/v2/models/{name}/stats", timeout=10) as response:
        (stats,) = json.loads(response.read())["model_stats"]
    return {int(s["batch_size"]): int(s["compute_infer"]["count"]) for s in stats["batch_stats"]}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_server(model: Path, threads: int, max_batch: int, delay_us: int, log: Path, home: Path,
                 ready_timeout_s: float = 180):
    """`serve` in a session of its own (a Ctrl-C here does not reach it), ready; stopped if it is not (it failed,
    took longer than ``ready_timeout_s``, or this wait was interrupted)."""
    ports = free_ports(3)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(SERVE_PYTHON), "-m", "medmamba_edge.cli", "serve", str(model), "--port", str(ports[0]), "--grpc-port",
             str(ports[1]), "--metrics-port", str(ports[2]), "--threads", str(threads), "--max-batch", str(max_batch),
             "--max-queue-delay-us", str(delay_us)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HOME": str(home)})
    http = f"http://127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}: see {log}")
            try:
                with urllib.request.urlopen(f"{http}/v2/models/medmamba/ready", timeout=2) as response:
                    if response.status == 200:
                        return process, http, f"triton://127.0.0.1:{ports[0]}/medmamba"
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"serve was not ready in {ready_timeout_s:g} s: see {log}")
    except BaseException:  # KeyboardInterrupt included: the server would otherwise outlive the benchmark
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen, timeout_s: float = 60, abort_s: float = 10) -> None:
    """SIGTERM (serve lets the requests in flight finish, stops tritonserver and its stubs and cleans up after
    them); past ``timeout_s``, or on a second Ctrl-C or SIGTERM here, a second SIGTERM: serve's abort, which still
    removes its shared memory and model copies, where a SIGKILL leaves them. SIGKILL to the whole group only if
    that takes over ``abort_s`` or a third comes; what is left of the group is killed either way."""
    interrupt = None
    for wait_s in (timeout_s, abort_s):
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
        except (KeyboardInterrupt, SystemExit) as exc:
            if interrupt is not None:
                break
            interrupt = exc
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):  # stragglers of a serve that died without its clean-up
        os.killpg(process.pid, signal.SIGKILL)
    if interrupt is not None:
        raise interrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=at_least(1), default=224)
    parser.add_argument("--images", type=at_least(8), default=96,
                        help="images per measurement (at least 8: the local batch-8 rows are the reference)")
    parser.add_argument("--threads", type=int,
                        help="inference threads, local and server (default: $MEDMAMBA_EDGE_SCAN_THREADS, or the usable CPUs)")
    parser.add_argument("--max-batch", type=at_least(1), default=8)
    parser.add_argument("--max-queue-delay-us", type=at_least(0), default=2000)
    parser.add_argument("--clients", type=int_list(), default="1,4,16")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medmamba-bench-triton")
    args = parser.parse_args()
    for stop in (signal.SIGTERM, signal.SIGHUP):  # as a Ctrl-C: the server stopped, its HOME removed, then exit
        signal.signal(stop, lambda signum, frame: sys.exit(128 + signum))
    args.threads = thread_count(parser, args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not SERVE_PYTHON.exists():
        raise SystemExit(f"needs the serve venv ({SERVE_PYTHON}; `make serve-setup`)")

    try:
        model = export(args.size, args.workdir)
    except UserError as exc:  # a --size the model cannot take
        parser.error(str(exc))
    paths = sorted((SHARED / "data/busi").rglob("*.png"))[:args.images]
    with open_backend(model, threads=args.threads) as local:
        images = preprocess([read_image(p) for p in paths], local.metadata)
        rows = [("local, batch 1", 1, time_local(local, images, 1)), ("local, batch 8", 1, time_local(local, images, 8))]
    home = Path(tempfile.mkdtemp(prefix="mt-bench-"))  # PyTriton's workspace; short for its Unix sockets
    try:
        process, http, url = start_server(model, args.threads, args.max_batch, args.max_queue_delay_us,
                                          args.workdir / "serve.log", home)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    try:
        histograms = []
        for clients in args.clients:
            before = {}

            def snapshot():  # after the clients' warm-up requests, which the histogram leaves out
                before.update(batch_counts(http, "medmamba"))

            rows.append((f"served, {clients} client{'s' * (clients > 1)}", clients,
                         time_served(url, images, clients, on_ready=snapshot)))
            after = batch_counts(http, "medmamba")
            executed = {size: after[size] - before.get(size, 0) for size in sorted(after) if after[size] > before.get(size, 0)}
            histograms.append(f"{clients} client{'s' * (clients > 1)}: " + ", ".join(f"{n}× batch {size}"
                                                                                  for size, n in executed.items()))
    finally:
        try:
            stop_server(process)
        finally:
            shutil.rmtree(home, ignore_errors=True)
    with open_backend(model, threads=args.threads) as local:
        rows.append(("local, batch 8 (again, after)", 1, time_local(local, images, 8)))

    reference = statistics.mean([r[2]["per_s"] for r in rows if r[0].startswith("local, batch 8")])
    print(f"CPU: {describe_cpu()}; {plural(os.cpu_count(), 'core')}; MedMamba-T {args.size}×{args.size}, plugin "
          f"form (native SS2DScan op), {plural(args.threads, 'inference thread')}; server: max batch {args.max_batch}, "
          f"queue delay ≤ {args.max_queue_delay_us} µs; {plural(len(images), 'real BUSI image')}; "
          f"the images column counts what a row ran "
          f"(local: its whole batches; served: max(1, images // clients) batch-1 requests per client, answered)\n")
    print("| what | clients | images | images/s | p50 ms | p99 ms | × local batch 8 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for what, clients, r in rows:
        print(f"| {what} | {clients} | {r['images']} | {r['per_s']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
              f"{r['per_s'] / reference:.0%} |")
    print("\nlocal rows: latency per call (a batch-8 call carries 8 images); served rows: per batch-1 request, "
          "queueing included. Server batch sizes executed:")
    for line in histograms:
        print(f"  {line}")


if __name__ == "__main__":
    main()
