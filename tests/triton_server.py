"""A real `medmamba-edge serve` (PyTriton's tritonserver) on 127.0.0.1 for the Triton tests.

The serve extra pins numpy < 2, so the server runs from its own venv (`make serve-setup` creates .venv-serve;
$MEDMAMBA_EDGE_SERVE_PYTHON points elsewhere); the tests in this venv are its clients. Every server is started
in its own process group and that group is always killed at the end, so no tritonserver outlives a test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("MEDMAMBA_EDGE_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
START_TIMEOUT_S = 90  # tritonserver, the Python backend stub and the model's first load, on 2 busy cores


@cache
def _serve_python_problem() -> str | None:
    if not SERVE_PYTHON.exists():
        return f"needs the serve venv ({SERVE_PYTHON} is absent; `make serve-setup` creates it)"
    probe = subprocess.run([str(SERVE_PYTHON), "-c", "import pytriton, medmamba_edge.serving"], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
    if probe.returncode:
        return f"the serve venv {SERVE_PYTHON} cannot import pytriton and medmamba_edge: {probe.stderr.strip()[-300:]}"
    return None


def require_serve_python() -> Path:
    problem = _serve_python_problem()
    if problem:
        pytest.skip(problem)
    return SERVE_PYTHON


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    def __init__(self, process: subprocess.Popen, log: Path, ports: list[int], name: str):
        self.process, self.log, self.name = process, log, name
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.url = f"triton://127.0.0.1:{self.http_port}/{name}"
        self.http = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the model is ready over HTTP and `serve` has said it serves it: Triton reports the model ready
        before `serve` has noted the server's processes (what it watches), and a test that killed the Python
        backend's stub in between waited for an end that never came."""
        announced = re.compile(rf"^serving .* as {re.escape(self.name)} \(", re.M)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode} before it was ready:\n{self.log_tail()}")
            try:
                if (http_get(f"{self.http}/v2/models/{self.name}/ready", timeout=2)[0] == 200
                        and announced.search(self.log.read_text(errors="replace"))):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"serve was not ready within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole group (serve, tritonserver, the Python backend stub); at once, as a crash would."""
        # Shared memory the group holds (PyTriton's tensor store, Triton's Python backend regions) is unlinked by
        # the processes themselves on a clean stop; after a SIGKILL nobody does, so the test does it.
        members = _group_members(self.process.pid)
        segments = _shared_memory_of(members)
        # Triton's Python backend copies the model to /tmp/folderXXXXXX (the stub's first argument) and removes it
        # on a clean stop only. (Its empty /tmp/python_env_XXXXXX is named nowhere we can read: left.)
        copies = {Path(*Path(arg).parts[:3]) for pid in members for arg in _cmdline(pid)
                  if re.fullmatch(r"/tmp/folder\w+/.*", arg)}
        if self.process.poll() is None or _group_alive(self.process.pid):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
        for segment in segments:
            segment.unlink(missing_ok=True)
        for copy in copies:
            shutil.rmtree(copy, ignore_errors=True)


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # stat's 5th field, the process group, 3rd after the command's ")"
            members.append(int(stat.parent.name))
    return members


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def _shared_memory_of(pids: list[int]) -> set[Path]:
    """The /dev/shm files these processes have mapped or open."""
    found = set()
    for pid in pids:
        try:
            found.update(Path(line.split(maxsplit=5)[5].strip()) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                         if "/dev/shm/" in line and len(line.split(maxsplit=5)) == 6)
            found.update(Path(os.readlink(fd)) for fd in Path(f"/proc/{pid}/fd").iterdir()
                         if os.readlink(fd).startswith("/dev/shm/"))
        except OSError:  # a process that ended meanwhile
            continue
    return {p for p in found if not p.name.endswith(" (deleted)")}  # "(deleted)": already unlinked


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def started_server(model: Path, workdir: Path, *options: str, name: str = "medmamba"):
    """`medmamba-edge serve MODEL` on free 127.0.0.1 ports, just started; killed (group-wide) on the way out."""
    python = require_serve_python()
    ports = free_ports(3)
    log = workdir / f"serve-{ports[0]}.log"
    # PyTriton keeps its workspace, and the Unix sockets it talks to the backend stub through, under
    # ~/.cache/pytriton: a killed server leaves it behind, so HOME is a folder of the test's own. A short one:
    # a socket path over 107 bytes cannot be bound (pytest's tmp paths are longer).
    home = Path(tempfile.mkdtemp(prefix="mt-serve-"))
    command = [str(python), "-m", "medmamba_edge.cli", "serve", str(model), "--host", "127.0.0.1",
               "--port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--name", name, "--threads", "1", *options]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "HOME": str(home)})
    server = Server(process, log, ports, name)
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def running_server(model: Path, workdir: Path, *options: str, name: str = "medmamba"):
    """`medmamba-edge serve MODEL` on free 127.0.0.1 ports, ready; killed (group-wide) on the way out."""
    with started_server(model, workdir, *options, name=name) as server:
        server.wait_ready()
        yield server
