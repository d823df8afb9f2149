"""``medmamba-edge serve``: an exported model behind a real NVIDIA Triton Inference Server, through PyTriton.

PyTriton (``nvidia-pytriton``, the ``serve`` extra) ships a ``tritonserver`` binary with its Python backend;
the model itself runs here, in this process, in the torch-free runtime (ONNX Runtime with the native scan
op, or TensorRT): Triton's Python backend hands each dynamic batch over shared memory to the function
bound below. Clients get what Triton gives: KServe v2 over HTTP and gRPC, dynamic batching, health and
readiness, statistics, Prometheus metrics. The model's ``ModelMetadata`` travels in the served model's
configuration (``parameters["medmamba_edge"]``), where ``triton://`` clients read preprocessing and class
names from (runtime/backends/triton.py); preprocessing stays on the client (docs/serving.md says why).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medmamba_edge.runtime.backends import Backend, local_model_file, open_backend
from medmamba_edge.runtime.backends.triton import model_name_problem
from medmamba_edge.runtime.cpu import check_threads
from medmamba_edge.runtime.metadata import INPUT_NAME, METADATA_KEY, OUTPUT_NAME
from medmamba_edge.runtime.shared_change import SharedChange, logger_levels
from medmamba_edge.runtime.triton_defaults import (DEFAULT_HOST, DEFAULT_MAX_QUEUE_DELAY_US, DEFAULT_MODEL_NAME,
                                                   DEFAULT_PORT, max_batch_or_default, range_problem)

from .errors import MissingExtraError, UserError, clipped, first_line, install_hint, process_ending

# Endpoints that change the server rather than ask it something: loading and unloading models, mapping
# shared memory, tracing, log settings. PyTriton guards them with a token it generates; statistics stay
# open to monitoring, as in a stock Triton.
GUARDED_ENDPOINTS = ["model-repository", "shared-memory", "trace", "logging"]
# Long enough for a batch of 224×224 images on a small CPU to finish; a stop never waits longer.
EXIT_TIMEOUT_S = 10
# Error lines tritonserver logs at every start on a CPU machine, whatever then happens: never the reason.
STARTUP_NOISE = ("NVML", "DCGM", "CudaDriver", "Failed to set config modification time")


class ServeError(UserError):
    """A server that cannot start or stopped by itself."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # HTTP; gRPC and metrics default to the next two ports
    grpc_port: int | None = None
    metrics_port: int | None = None
    max_batch: int | None = None  # None: the model's default (max_batch_or_default), known once it is open
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    name: str = DEFAULT_MODEL_NAME
    threads: int | None = None

    def __post_init__(self):
        for option, value in (("--max-batch", self.max_batch), ("--max-queue-delay-us", self.max_queue_delay_us)):
            if problem := range_problem(option, value):
                raise UserError(problem)
        check_threads(self.threads)
        ports = [self.port, self.grpc_port_or_default, self.metrics_port_or_default]
        for flag, port in zip(("--port", "--grpc-port (default --port + 1)", "--metrics-port (default --port + 2)"), ports):
            if not 0 < port < 65536:
                raise UserError(f"{flag} must be a port number (1–65535), got {port}")
        if len(set(ports)) < 3:
            raise UserError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
        if problem := model_name_problem(self.name):
            raise UserError(problem)
        self.address  # resolved now, before PyTriton is even imported

    @functools.cached_property
    def address(self) -> str:
        """``host`` as the numeric IPv4 address the server listens on (listen_address), resolved once."""
        return listen_address(self.host)

    @property
    def grpc_port_or_default(self) -> int:
        return self.grpc_port if self.grpc_port is not None else self.port + 1

    @property
    def metrics_port_or_default(self) -> int:
        return self.metrics_port if self.metrics_port is not None else self.port + 2


def system_library_dirs() -> set[str]:
    """Where the dynamic loader looks without being told (Debian/Ubuntu multiarch folders and the classic ones)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = {"/lib", "/usr/lib", "/lib64", "/usr/lib64"}
    if multiarch:
        dirs |= {f"/lib/{multiarch}", f"/usr/lib/{multiarch}"}
    return {os.path.realpath(d) for d in dirs}


def interpreter_library_dir() -> str | None:
    """This interpreter's own libpython folder, when the loader would otherwise pick another libpython.

    PyTriton's Python-backend stub is linked against ``libpython3.X.so.1.0`` and finds the system's (Debian's
    /usr/lib/x86_64-linux-gnu) before anything else, while it runs this interpreter's standard library. A
    Python built elsewhere (pyenv, conda, a source build) then mixes two patch releases, and loading the model
    fails inside multiprocessing with ``'_thread.RLock' object has no attribute '_recursion_count'``. With
    the interpreter's LIBDIR first on the server's LD_LIBRARY_PATH the stub loads the matching libpython."""
    libdir = sysconfig.get_config_var("LIBDIR")
    library = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    if not libdir or not (Path(libdir) / library).exists():
        return None  # a static interpreter: nothing better to offer than what the loader finds
    return None if os.path.realpath(libdir) in system_library_dirs() else libdir


def server_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with this interpreter's libpython folder first on LD_LIBRARY_PATH (see interpreter_library_dir)."""
    libdir = interpreter_library_dir()
    if libdir is None:
        return dict(environ)
    rest = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    return {**environ, "LD_LIBRARY_PATH": ":".join([libdir, *rest])}


def listen_address(host: str) -> str:
    """``--host`` as the numeric IPv4 address tritonserver listens on: it resolves no names (`localhost` had it
    listen on 255.255.255.255, reachable by no one, while PyTriton waited two minutes for it), and PyTriton's own
    client cannot reach an IPv6 one (it writes http://::1:PORT)."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as exc:
        if ":" in host:
            raise ServeError(f"--host {host}: IPv6 is not served (PyTriton reaches its server over IPv4 only); "
                             f"give an IPv4 address, e.g. 0.0.0.0 or 127.0.0.1") from None
        why = getattr(exc, "strerror", None) or exc
        raise ServeError(f"--host {host}: not an address of this machine ({why})") from None


def check_ports_free(host: str, ports: list[int]) -> None:
    """Fail now, in one line, on a port something else listens on: tritonserver would exit at once, but PyTriton
    only notices after its start-up timeout (minutes)."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ServeError(f"{host}:{port}: cannot listen there ({exc.strerror or exc})") from None


def _pytriton():
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError as exc:
        raise MissingExtraError(
            f"serving needs PyTriton ({exc}): {install_hint('serve')}; it pins numpy < 2, so give it its own "
            f"virtual environment (docs/serving.md)") from None
    return batch, DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig, TritonSecurityConfig


def bind_model(triton, backend: Backend, options: ServeOptions) -> None:
    """Bind ``backend`` as ``options.name``: float32 (C, H, W) in, (classes,) logits out, batched by Triton."""
    batch, DynamicBatcher, ModelConfig, Tensor, *_ = _pytriton()
    meta = backend.metadata

    @batch
    def infer(**inputs):
        # The bound names are the exported model's own, as a stock repository has them.
        (images,) = inputs.values()
        return {OUTPUT_NAME: backend.run(images)}

    triton.bind(
        model_name=options.name, infer_func=infer,
        inputs=[Tensor(name=INPUT_NAME, dtype=np.float32, shape=(meta.in_chans, *meta.input_size))],
        outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(meta.num_classes,))],
        config=ModelConfig(max_batch_size=options.max_batch,
                           batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)),
    )
    # PyTriton's ModelConfig has no free-form parameters; its generated Triton config (built once, before the
    # model is loaded) does. The metadata goes there so that clients read it from /v2/models/NAME/config exactly
    # as from a stock repository's config.pbtxt. nvidia-pytriton is pinned to 0.7.x for this hook.
    (model,) = [m for m in triton._model_manager.models if m.model_name == options.name]
    model._get_triton_model_config().backend_parameters[METADATA_KEY] = meta.to_json()


# PyTriton logs each step of its start and stop at INFO, between serve's own lines; its warnings stand. The level is
# the process's: an application's own for it stands after a serve, and two serves at once share the change.
_quiet_pytriton = logger_levels({"pytriton": logging.WARNING})


def serve(model: str | Path, options: ServeOptions, notify=print, stop: threading.Event | None = None) -> None:
    """Serve ``model`` until ``stop`` is set or, called on the main thread, a SIGINT, SIGTERM or SIGHUP comes (a
    second one aborts, as KeyboardInterrupt); ServeError if the server fails. A blocking command's call: on the
    main thread it takes those signals over for as long as it runs, a signal the process ignores (SIGHUP under
    nohup) excepted, and gives the caller's handlers back when it returns, since a stop must stop tritonserver and
    its stubs and free their shared memory, which the default handlers' exit would leave behind. Off the main
    thread no handler can be set: ``stop`` is then the only way to end it."""
    from medmamba_edge.runtime.loop import stop_on_signals

    # Before PyTriton: a URL is refused as typed, wherever it runs. Absolute: open_backend would read a file
    # triton:/m.onnx (in a folder named "triton:") as a server's address.
    model = local_model_file(model, "serve").absolute()
    # From the start: a stop while PyTriton and ONNX Runtime import or the model loads (a `systemctl stop` right
    # after the start) is a clean stop too, where the default handler's KeyboardInterrupt exited 130, or 1 when it
    # interrupted an extension module's initialisation.
    with stop_on_signals(lambda message: notify(
            f"{message.split(':')[0]}: letting the requests in flight finish (again to abort)"), stop) as stopping:
        *_, Triton, TritonConfig, TritonSecurityConfig = _pytriton()
        ports = [options.port, options.grpc_port_or_default, options.metrics_port_or_default]
        host = options.address
        check_ports_free(host, ports)
        with open_backend(model, threads=options.threads) as backend, _quiet_pytriton():
            if stopping.is_set():  # before anything was served: nothing to finish
                return
            # The backend runs what Triton batches: a --max-batch above an engine's profile runs in chunks of its
            # largest batch, as a fixed-batch model's run in its batch, so it is taken (export-triton's refuses it).
            largest = backend.batch_range[1] if backend.batch_range else None
            options = replace(options, max_batch=max_batch_or_default(options.max_batch, largest))
            config = TritonConfig(http_address=host, http_port=options.port, grpc_address=host,
                                  grpc_port=options.grpc_port_or_default, metrics_address=host,
                                  metrics_port=options.metrics_port_or_default, exit_timeout_secs=EXIT_TIMEOUT_S,
                                  allow_gpu_metrics=False)
            triton = Triton(config=config,
                            security_config=TritonSecurityConfig(restricted_endpoints=list(GUARDED_ENDPOINTS)))
            with _server_library_path():
                _serve(model, backend, options, triton, stopping, notify)


def _lend_server_library_path(undo: contextlib.ExitStack) -> None:
    """This process's LD_LIBRARY_PATH as server_environment makes it (PyTriton starts tritonserver with this
    process's environment, plus its own libraries after ours), put back as it was afterwards: an application's own
    child processes after a serve must not find this interpreter's libraries first. Left alone if something else
    changed it meanwhile."""
    before = os.environ.get("LD_LIBRARY_PATH")
    served = server_environment(dict(os.environ)).get("LD_LIBRARY_PATH")

    def put_back() -> None:
        if os.environ.get("LD_LIBRARY_PATH") == served:
            if before is None:
                os.environ.pop("LD_LIBRARY_PATH", None)
            else:
                os.environ["LD_LIBRARY_PATH"] = before
    undo.callback(put_back)
    if served is not None:
        os.environ["LD_LIBRARY_PATH"] = served


# The environment is the process's: two serves at once (an application's threads) share the path, or the first to
# return would take it from the other before that one's tritonserver started.
_server_library_path = SharedChange(_lend_server_library_path)


class ServerWatch:
    """What serve watches of a running server: its processes, the Python backend's stubs among them (which run our
    model), the shared memory they map and the model copies they run, each noted from one read of /proc while
    their server lives (once it dies they are re-parented and no longer found)."""

    def __init__(self, triton, host: str, port: int, name: str):
        self.triton, self.host, self.port, self.name = triton, host, port, name
        self.spawned: set[tuple[int, int]] = set()
        self.stubs: set[tuple[int, int]] = set()
        self.segments: set[Path] = set()
        self.model_copies: set[Path] = set()

    def note(self) -> dict[int, tuple[int, int]]:
        """Note the server's processes, shared memory and model copies as they are now; the process table read."""
        table = _process_table()
        found = server_processes(self.triton, table)
        self.stubs.update(p for p in found - self.stubs if _command_name(p[0]) == PYTHON_BACKEND_STUB[:15])
        self.spawned.update(found)
        self.segments.update(shared_memory_of(self.spawned, table))
        self.model_copies.update(model_copies_of(self.spawned, table))
        return table

    def failure(self, table: dict[int, tuple[int, int]]) -> str | None:
        """Why the server no longer serves the model, though tritonserver runs: its Python backend's process
        ended (Triton then answers every request with an error, and reports itself ready), or the model was
        unloaded (through the model-repository API, with the token any local user can read from /proc). Asked
        once the model is ready, when the stub runs: a server seen without one had it end before it was noted."""
        if not self.triton.is_alive():
            return f"the Triton server {_exit_reason(self.triton)}{_server_hint(self.triton)}"
        ended = sorted(pid for pid, start in self.stubs if table.get(pid, (0, None))[1] != start)
        if ended:
            return (f"the server's process running the model ({PYTHON_BACKEND_STUB}, pid {ended[0]}) ended; every "
                    f"request would fail")
        if self.spawned and not self.stubs:  # the server's processes were found, none of them the stub
            return (f"the server's process running the model ({PYTHON_BACKEND_STUB}) is not running (it ended as "
                    f"the model became ready); every request would fail")
        if model_ready(self.host, self.port, self.name) is False:
            return f"the server no longer has {self.name} ready (unloaded through its model-repository API?)"
        return None


def _serve(model, backend: Backend, options: ServeOptions, triton, stopping, notify) -> None:
    """Run ``triton`` serving ``backend`` until ``stopping`` is set or the server fails; clean up after it."""
    host = options.address
    watch = ServerWatch(triton, host, options.port, options.name)
    try:
        bind_model(triton, backend, options)
        try:
            triton.run()
        except Exception as exc:  # PyTriton's own errors, tritonclient's, timeouts: all say "did not start"
            raise ServeError(f"{model}: Triton did not start on {host} ports {options.port}, "
                             f"{options.grpc_port_or_default}, {options.metrics_port_or_default} "
                             f"({type(exc).__name__}: {first_line(exc).split(': Traceback')[0]}){_server_hint(triton)}") from None
        # Now, before serving is announced: its processes are known before a client (or anything else) can end
        # them, and a stub that ended since the model became ready is not taken for one still to come.
        problem = watch.failure(watch.note())
        if problem:
            raise ServeError(f"{model}: {problem}")
        notify(f"serving {model} as {options.name} ({backend.describe()}; max batch {options.max_batch}, "
               f"queue delay ≤ {options.max_queue_delay_us} µs)")
        notify(f"HTTP http://{host}:{options.port}/v2/models/{options.name}, gRPC {host}:"
               f"{options.grpc_port_or_default}, metrics http://{host}:{options.metrics_port_or_default}/metrics; "
               f"clients: medmamba-edge run triton://{host}:{options.port}/{options.name} SOURCE")
        while not stopping.wait(0.5):
            problem = watch.failure(watch.note())
            if problem:
                raise ServeError(f"{model}: {problem}")
    finally:
        watch.note()
        triton.stop()
        # A server that gives up stopping (its exit timeout) leaves its Python backend's stubs running, and a
        # crash on the way out (which that forced exit sometimes is) unlinks none of their shared memory: RAM
        # lost for good. What this process made, its resource tracker removes when it exits.
        watch.note()
        stop_leftovers(watch.spawned)
        table = _process_table()
        remove_shared_memory(watch.segments - shared_memory_of({(os.getpid(), table[os.getpid()][1])}, table))
        for copy in watch.model_copies:  # what a clean stop removes; a stop that gave up waiting left it
            shutil.rmtree(copy, ignore_errors=True)
    if stopping.is_set() and _exit_code(triton):
        notify(f"the Triton server {_exit_reason(triton)} while stopping; its processes and shared memory are "
               f"cleaned up")


PYTHON_BACKEND_STUB = "triton_python_backend_stub"


def _command_name(pid: int) -> str:
    """A process's executable name as the kernel keeps it (its first 15 characters), '' if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def model_ready(host: str, port: int, name: str) -> bool | None:
    """Whether the server says ``name`` is ready (KServe v2 readiness), None when it does not answer in time (a
    busy server is not a failed one)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1" if host == "0.0.0.0" else host, port, timeout=2)
    try:
        connection.request("GET", f"/v2/models/{name}/ready")
        return connection.getresponse().status == 200
    except OSError:
        return None
    finally:
        connection.close()


def _process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, start time in clock ticks) of every running process (zombies left out), from /proc
    (Triton runs on Linux only)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # gone since the listing
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, …, starttime (20th)
            if fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def server_processes(triton, table: dict[int, tuple[int, int]]) -> set[tuple[int, int]]:
    """(pid, start time) of tritonserver and the processes below it (its Python backend's stub and the stub's
    workers); the start time tells a reused pid from the one seen. Not this process's other children:
    multiprocessing's resource tracker must outlive us to unlink our shared memory."""
    try:
        pid = triton._triton_server._tritonserver_running_cmd.pid
    except AttributeError:  # not started, or PyTriton's internals moved
        return set()
    if pid not in table:
        return set()
    found, parents = {(pid, table[pid][1])}, [pid]
    while parents:
        parent = parents.pop()
        children = {(child, start) for child, (ppid, start) in table.items() if ppid == parent} - found
        found |= children
        parents += [child for child, _ in children]
    return found


def stop_leftovers(processes: set[tuple[int, int]], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, the ``processes`` still running: the Python backend's stub and
    its workers outlive a tritonserver that crashed, was killed, or gave up waiting for a client's open
    connection on stopping, and would run on, re-parented, for good."""
    def running() -> list[int]:
        table = _process_table()
        return [pid for pid, start in processes if pid in table and table[pid][1] == start]

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        for pid in running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)


def shared_memory_of(processes: set[tuple[int, int]], table: dict[int, tuple[int, int]]) -> set[Path]:
    """The /dev/shm files the processes (as ``table``, a _process_table, last saw them) have mapped and not
    unlinked (Triton's Python backend and PyTriton pass tensors through them)."""
    found = set()
    for pid, start in processes:
        if table.get(pid, (0, None))[1] != start:  # gone, or its pid reused by another program: not ours to read
            continue
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # gone, or never ours to read
            continue
        for line in maps.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/") and not fields[5].endswith(" (deleted)"):
                found.add(Path(fields[5]))
    return found


def model_copies_of(processes: set[tuple[int, int]], table: dict[int, tuple[int, int]]) -> set[Path]:
    """The /tmp/folderXXXXXX copies of the model that Triton's Python backend runs its stubs from (a stub's
    first argument, ``…/1/model.py``); the backend removes them on a clean stop only."""
    found = set()
    for pid, start in processes:
        if table.get(pid, (0, None))[1] != start:  # gone, or its pid reused: not ours to read
            continue
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for argument in arguments:
            copy = re.fullmatch(rb"(/tmp/folder\w+)/.+", argument)
            if copy:
                found.add(Path(os.fsdecode(copy.group(1))))
    return found


def remove_shared_memory(segments: set[Path]) -> None:
    """Unlink what is left of ``segments`` once the processes that used them are gone (a mapping still open
    elsewhere keeps its memory until it is unmapped; only the name goes)."""
    for segment in segments:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            segment.unlink()


def _exit_code(triton) -> int | None:
    """The server process's exit status as sh reports it: negative for a signal (its RunningCommand.exit_code
    would raise that as an exception); None if unknown or PyTriton's internals moved."""
    try:
        return triton._triton_server._tritonserver_running_cmd.process.exit_code
    except AttributeError:
        return None


def _exit_reason(triton) -> str:
    """How the server process ended, in words (minus the signal number when a signal ended it)."""
    code = _exit_code(triton)
    return "stopped" if code is None else process_ending(code)


def _server_hint(triton) -> str:
    """What the server log says went wrong, in one line: the innermost Python exception of a model that failed to
    load (Triton prints the backend's traceback with escaped line breaks), else its last error line."""
    server = getattr(triton, "_triton_server", None)
    log = getattr(server, "_tritonserver_logs", "") or ""
    exceptions = [m for m in re.findall(r"\b([A-Z]\w*(?:Error|Exception): [^\"\\]+)", log)
                  if not m.startswith("TritonModelException")]
    errors = [line.split('"', 1)[-1].split("\\n")[0].rstrip('"') for line in log.splitlines()
              if line.startswith("E") and not any(noise in line for noise in STARTUP_NOISE)]
    said = (exceptions or errors or [""])[-1].strip()
    return f"; the server said: {clipped(said)}" if said else ""


__all__ = ["ServeError", "ServeOptions", "interpreter_library_dir", "serve", "server_environment"]
