"""``medmamba-edge benchmark``: latency, throughput and peak memory of models side by side.

Each model runs in its own worker process (``python -m medmamba_edge.benchmarking``), for two reasons:
its peak resident memory is its own (``ru_maxrss`` of that process), and ONNX Runtime sessions of
different models cannot slow each other by spinning their worker threads in one process (see
../shared/docs/BASELINES.md). The workers are started together and driven in turns: every round, each
model in turn runs a share of its timed iterations while the others wait, so all models sample the same
stretches of a noisy machine and their ratios hold. Each turn starts with one untimed run, so a model
is not charged for waking its threads or refilling caches the previous model evicted, and ends once its
threads have stopped spinning (SETTLED_S), so the next model is not timed beside them.

Inputs are the bundled sample images, preprocessed per model and repeated to fill the batch. Torch-free
here; a ``.pth`` worker imports PyTorch.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medmamba_edge.runtime.backends import is_triton_url
from medmamba_edge.runtime.cpu import (check_threads, cpu_quota, describe_cpu, describe_default_threads,
                                       usable_cpus)
from medmamba_edge.runtime.metadata import int_at_least, positive_int

from .errors import UserError, plural, process_ending
from .evaluation import distinct_names, input_sizes

if TYPE_CHECKING:
    from medmamba_edge.exporters.quantize import SpeedCheckFn

DEFAULT_BATCHES = (1, 8)
ROUNDS = 5  # turns per model and batch; more spreads each model over more of the run
# A worker answers once its session's idle threads have stopped spinning: ONNX Runtime's pool spins on after a run
# (the official T-32 at 2 threads: 4 to 10 ms of CPU in every 10 ms for 60 to 90 ms), on the CPUs the next model's
# turn is timed on. docs/performance.md found 50 and 300 ms enough alike.
SETTLED_S = 0.1
# quantize --min-speedup: after a warm-up, SPEED_CHECK_ROUNDS rounds of SPEED_CHECK_RUNS timed runs of each model in
# turn, and as many rounds again while the speedup's interval straddles --min-speedup, up to SPEED_CHECK_MAX_ROUNDS:
# the median of 30 runs each, compared alone, refused once (0.89×) and passed three times (1.01× to 1.25×) in four
# runs of one command on a noisy 2-core VM.
SPEED_CHECK_ROUNDS = 10
SPEED_CHECK_RUNS = 3
SPEED_CHECK_MAX_ROUNDS = 3 * SPEED_CHECK_ROUNDS
SPEED_CHECK_WARMUP = 3
Progress = Callable[[int, int], None]


class BenchmarkError(UserError):
    """A model that could not be benchmarked, or bad settings."""


def timed(fn: Callable[[], object], warmup: int, iterations: int) -> list[float]:
    """Milliseconds of each of ``iterations`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _installed(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def cpu_scan_path() -> str:
    """The compiled scan's code path the plugin-form models run on this CPU, and whether it was forced: the
    same model is several times slower on the baseline path than on the AVX-512 one."""
    from medmamba_edge.runtime import scan_cpu

    if not scan_cpu.available():
        return "not built"
    forced = os.environ.get(scan_cpu.ISA_ENV, "").strip(" \t\n\r\f\v")
    return scan_cpu.isa() + (f" (forced by {scan_cpu.ISA_ENV})" if forced else "")


def machine_info(threads: int | None) -> dict:
    versions = {name: _installed(name) for name in ("medmamba-edge", "numpy", "onnxruntime", "torch", "tensorrt")}
    return {"cpu": describe_cpu(), "cpu_scan_path": cpu_scan_path(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "cpu_quota": cpu_quota(),
            "threads": threads if threads else f"backend default ({describe_default_threads()})",
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "versions": {k: v for k, v in versions.items() if v}}


@dataclass
class Measurement:
    model: str
    backend: str
    precision: str
    input_size: tuple[int, int]
    batch: int
    fixed_batch: int | None  # the model's own batch size: another batch runs as whole ones, the last padded
    latencies_ms: list[float]
    peak_rss_mb: float | None = 0.0  # of the model's worker process, over all its batches; None: a served model's

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    def batch_label(self) -> str:
        return batch_label(self.batch, self.fixed_batch)

    @property
    def throughput(self) -> float:
        """Images per second over the timed runs."""
        return self.batch * 1000 * len(self.latencies_ms) / sum(self.latencies_ms)

    def to_dict(self) -> dict:
        return {**asdict(self), "p50_ms": self.percentile(50), "p90_ms": self.percentile(90),
                "p99_ms": self.percentile(99), "images_per_s": self.throughput}


def batch_label(batch: int, fixed_batch: int | None) -> str:
    """The batch, and for a fixed-batch model of another size how it ran: "6 (2×4, 2 padded)"."""
    if not fixed_batch or batch == fixed_batch:
        return str(batch)
    runs = -(-batch // fixed_batch)
    padded = runs * fixed_batch - batch
    return f"{batch} ({runs}×{fixed_batch}" + (f", {padded} padded)" if padded else ")")


def rounds_of(iterations: int) -> int:
    """The turns a row's timed runs are split into, the models taking turns: ROUNDS, or one per run if fewer."""
    return min(ROUNDS, iterations)


@dataclass
class BenchmarkReport:
    machine: dict
    warmup: int
    iterations: int
    measurements: list[Measurement]

    @property
    def rounds(self) -> int:
        return rounds_of(self.iterations)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "warmup": self.warmup, "iterations": self.iterations, "rounds": self.rounds,
                "measurements": [m.to_dict() for m in self.measurements]}

    def model_names(self) -> dict[str, str]:
        """Each model as its file name, or as much of its path as tells it from another of the same name."""
        paths = list(dict.fromkeys(r.model for r in self.measurements))
        return dict(zip(paths, distinct_names(paths)))

    def markdown(self) -> str:
        m = self.machine
        versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        lines = [f"{m['cpu']}, {m['usable_cpus']} of {plural(m['logical_cpus'], 'CPU')} usable, "
                 f"threads: {m['threads']}, scan path: {m['cpu_scan_path']}; "
                 f"{m['os']}, Python {m['python']}, {versions}",
                 f"{plural(self.iterations, 'timed run')} per row after {plural(self.warmup, 'warm-up run')}, "
                 f"interleaved in {plural(self.rounds, 'round')}",
                 "",
                 "| model | backend | precision | input | batch | p50 ms | p90 ms | p99 ms | images/s | × first | peak RSS MB |",
                 "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        first, names = {}, self.model_names()
        for r in self.measurements:
            first.setdefault(r.batch, r.throughput)
            lines.append(f"| {names[r.model]} | {r.backend} | {r.precision} | {r.input_size[0]}×{r.input_size[1]} | "
                         f"{r.batch_label()} | {r.percentile(50):.2f} | {r.percentile(90):.2f} | {r.percentile(99):.2f} | "
                         f"{r.throughput:.1f} | {r.throughput / first[r.batch]:.2f} | "
                         f"{'served' if r.peak_rss_mb is None else f'{r.peak_rss_mb:.0f}'} |")
        lines += ["", "× first: throughput relative to the first model at the same batch; "
                      "peak RSS: the model's own process, whole run (a served model's is the server's)."]
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        from .plots import latency_bars_png

        rows, names = self.measurements, self.model_names()
        return latency_bars_png([f"{names[r.model]} ({r.precision}), batch {r.batch_label()}" for r in rows],
                                [r.percentile(50) for r in rows], [r.percentile(90) for r in rows],
                                [r.percentile(99) for r in rows],
                                f"{self.machine['cpu']}, threads: {self.machine['threads']}", path)


class _Worker:
    """One model in its own process, answering JSON-line requests on its stdin."""

    def __init__(self, model: str):
        self.model = model
        self.log = tempfile.TemporaryFile(mode="w+")  # its stderr: read back only if it fails
        self.process = subprocess.Popen([sys.executable, "-m", "medmamba_edge.benchmarking", str(os.getpid())],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready: dict = {}

    def load(self, spec: dict) -> None:
        self.ready = self.request(spec)  # answered once the model is loaded and warm

    def request(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.process.wait()
            self.log.seek(0)
            said = [t for t in self.log.read().strip().splitlines() if t.strip()][-1:]
            raise BenchmarkError(f"{self.model}: the benchmark worker {process_ending(code)}"
                                 + (f" ({said[0]})" if said else ""))
        reply = json.loads(line)
        if "error" in reply:
            raise BenchmarkError(reply["error"])
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        # Popen's exit closes our ends of the pipes as well as waiting: left to the garbage collector, they stayed
        # open past the benchmark (a ResourceWarning each). A worker that died between two requests left the second
        # in stdin's buffer, whose flush on closing fails as its write did (request has said why).
        with contextlib.suppress(BrokenPipeError), self.process:
            pass
        self.log.close()


@contextlib.contextmanager
def _loaded(specs: Sequence[str], sizes: Sequence, batches: Sequence[int], warmup: int,
            threads: int | None) -> Iterator[list[_Worker]]:
    """A worker per model, each loaded and warmed up at ``batches``; all killed on the way out."""
    workers: list[_Worker] = []
    try:
        # One at a time, so that no model loads or warms up while another does. Each is a worker here before it
        # loads: one that hangs there is killed on the way out too.
        for spec, size in zip(specs, sizes):
            workers.append(_Worker(spec))
            workers[-1].load({"path": spec, "input_size": size, "threads": threads, "batches": list(batches),
                              "warmup": warmup})
        yield workers
    finally:
        for worker in workers:
            worker.close()


def benchmark(models: Sequence[str | Path], *, batches: Sequence[int] = DEFAULT_BATCHES, input_size: int | tuple[int, int] | None = None,
              warmup: int = 3, iterations: int = 20, threads: int | None = None,
              progress: Progress | None = None) -> BenchmarkReport:
    paths = [Path(p) for p in models]
    if not paths:
        raise BenchmarkError("no models given")
    if not batches:
        raise BenchmarkError("--batch: no batch size given")
    # Every batch size, not their min(): 1.5 in (1, 1.5) passed, as did True for --iterations.
    for option, value, least in ((*(("--batch", b, 1) for b in batches), ("--warmup", warmup, 0),
                                  ("--iterations", iterations, 1))):
        if not int_at_least(value, least):
            raise BenchmarkError(f"{option} must be an integer ≥ {least}, got {value}")
    # numpy's integers pass the check, and JSON (how the workers are told) takes Python's alone
    batches, warmup, iterations = [int(b) for b in batches], int(warmup), int(iterations)
    check_threads(threads)  # here, before any worker starts, as each worker's open_model would
    threads = None if threads is None else int(threads)  # numpy's too: the workers are told in JSON
    # A served model is timed as its clients see it; its address kept as given (a Path folds the URL's "//").
    specs = [str(given) if is_triton_url(given) else str(path) for path, given in zip(paths, models)]
    for path, spec in zip(paths, specs):
        if not is_triton_url(spec) and not path.exists():
            raise BenchmarkError(f"{spec}: no such model file")
    batches = list(dict.fromkeys(batches))  # a size asked twice is one row
    with _loaded(specs, input_sizes(paths, input_size), batches, warmup, threads) as workers:
        latencies = {(w, b): [] for w in range(len(workers)) for b in batches}
        shares = [len(part) for part in np.array_split(np.arange(iterations), rounds_of(iterations))]
        done, total = 0, len(shares) * len(latencies)
        for share in shares:
            for batch in batches:
                for w, worker in enumerate(workers):
                    latencies[w, batch] += worker.request({"batch": batch, "iterations": share})["ms"]
                    done += 1
                    if progress:
                        progress(done, total)
        peaks = [worker.request({"quit": True})["peak_rss_mb"] for worker in workers]
        # A served model's worker is its client: its memory is not the model's.
        peaks = [None if is_triton_url(spec) else peak for spec, peak in zip(specs, peaks)]
    measurements = [
        Measurement(specs[w], worker.ready["backend"], worker.ready["precision"], tuple(worker.ready["input_size"]),
                    batch, worker.ready["fixed_batch"], latencies[w, batch], peaks[w])
        for batch in batches for w, worker in enumerate(workers)
    ]
    return BenchmarkReport(machine_info(threads), warmup, iterations, measurements)


def speed_check(batch: int | None, progress: Progress | None = None) -> SpeedCheckFn:
    """quantize's speed gate: a function timing an fp32 model and its INT8 candidate at ``batch`` in worker processes
    taking turns, as ``benchmark`` does, in rounds (SPEED_CHECK_ROUNDS, more while the speedup's interval straddles
    the --min-speedup it is given); None: the model's own batch, 1 if dynamic (a model of fixed batch 3 timed "at
    batch 1" ran one padded batch of 3). A bad batch is refused here, before calibration starts."""
    if batch is not None and not positive_int(batch):
        raise BenchmarkError(f"--speed-batch must be >= 1, got {batch}")
    from medmamba_edge.exporters.quantize import SpeedCheck, speed_verdict
    from medmamba_edge.runtime.metadata import read_onnx_metadata

    def measure(fp32: Path, int8: Path, min_speedup: float) -> SpeedCheck:
        size = batch or read_onnx_metadata(fp32).batch or 1
        paths = [fp32, int8]
        rounds: tuple[list, list] = ([], [])  # fp32's and INT8's, each round's runs in milliseconds
        with _loaded(list(map(str, paths)), input_sizes(paths, None), [size], SPEED_CHECK_WARMUP, None) as workers:
            label = batch_label(size, workers[0].ready["fixed_batch"])
            target = SPEED_CHECK_ROUNDS
            while True:
                while len(rounds[0]) < target:
                    for runs, worker in zip(rounds, workers):
                        runs.append(worker.request({"batch": size, "iterations": SPEED_CHECK_RUNS})["ms"])
                    if progress:
                        progress(len(rounds[0]), target)
                check = SpeedCheck(size, *rounds, describe_cpu(), label)
                _, within_noise = speed_verdict(check, min_speedup)
                if not within_noise or target >= SPEED_CHECK_MAX_ROUNDS:
                    return check
                target += SPEED_CHECK_ROUNDS

    return measure


def _die_with(parent: int) -> None:
    """Have Linux SIGKILL this worker when ``parent`` ends, however it ends (SIGTERM and SIGKILL run no finally
    there): a worker busy in native code would otherwise run on, re-parented."""
    if not sys.platform.startswith("linux"):  # Windows' CDLL(None) raises TypeError; elsewhere there is no prctl
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # a libc without prctl: the parent's finally is all there is
        return
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


class _MemoryCounters(ctypes.Structure):
    """Windows' PROCESS_MEMORY_COUNTERS (psapi.h)."""
    _fields_ = [("cb", ctypes.c_uint32), ("PageFaultCount", ctypes.c_uint32),
                *((name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                    "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage"))]


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB: getrusage's ru_maxrss, in KiB on Linux but bytes on macOS; Windows
    has no resource module, and its peak working set is the same measure."""
    if sys.platform == "win32":
        counters = _MemoryCounters(cb=ctypes.sizeof(_MemoryCounters))
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p  # a HANDLE, not the default int
        kernel32.K32GetProcessMemoryInfo.argtypes = [ctypes.c_void_p, ctypes.POINTER(_MemoryCounters), ctypes.c_uint32]
        if not kernel32.K32GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            raise ctypes.WinError(ctypes.get_last_error())
        return counters.PeakWorkingSetSize / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _serve() -> None:
    """The worker: load one model, warm it up, then time runs on request until told to quit."""
    _die_with(int(sys.argv[1]))
    # Replies go through a private copy of stdout; anything else printed (by a backend, even from C)
    # lands on stderr and cannot corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    from medmamba_edge.runtime.bundled import sample_image_paths
    from medmamba_edge.runtime.decode import read_image
    from medmamba_edge.runtime.metadata import height_width
    from medmamba_edge.runtime.preprocess import preprocess

    from .loaders import open_model

    try:
        spec = json.loads(sys.stdin.readline())
        size = spec["input_size"]
        backend = open_model(spec["path"], input_size=None if size is None else height_width(size),  # from JSON: a list
                             threads=spec["threads"])
        images = preprocess([read_image(p) for p in sample_image_paths()], backend.metadata)
        inputs = {b: np.ascontiguousarray(images[np.arange(b) % len(images)]) for b in spec["batches"]}
        for batch in inputs.values():
            timed(lambda: backend.run(batch), spec["warmup"], 0)
        time.sleep(SETTLED_S)
    except UserError as exc:
        reply({"error": str(exc)})
        return
    meta = backend.metadata
    reply({"backend": backend.describe(), "precision": meta.precision, "input_size": list(meta.input_size),
           "fixed_batch": meta.batch})
    for line in sys.stdin:
        request = json.loads(line)
        if "quit" in request:
            reply({"peak_rss_mb": peak_rss_mb()})
            return
        batch = inputs[request["batch"]]
        latencies = timed(lambda: backend.run(batch), 1, request["iterations"])
        time.sleep(SETTLED_S)
        reply({"ms": latencies})


if __name__ == "__main__":
    _serve()
