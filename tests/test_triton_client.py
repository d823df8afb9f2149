"""The triton:// client (runtime/backends/triton.py) when the server is not there, goes silent, or is killed
in the middle of a run: one-line errors, bounded waits, a record for every frame and a non-zero exit."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medmamba_edge.runtime.backends import BackendError, open_backend
from medmamba_edge.runtime.backends import is_triton_url
from medmamba_edge.runtime.backends.triton import ServerModel, parse_url
from tests.exported_models import official_onnx
from tests.shared_data import require_shared
from tests.triton_server import ROOT, free_ports, require_serve_python, running_server

FRAMES = 240
RUN_DEADLINE_S = 120


@pytest.mark.parametrize("spec, expected", [
    ("triton://gpu-box:8000/medmamba", ServerModel("gpu-box", 8000, "medmamba")),
    ("triton:/127.0.0.1:9000/m", ServerModel("127.0.0.1", 9000, "m")),  # as a Path-typed option folds it
    ("TRITON://[::1]:8000/m/3?timeout=2.5", ServerModel("::1", 8000, "m", "3", 2.5)),
    ("triton://host/m", ServerModel("host", 8000, "m")),
    ("triton://host:8000/med%20mamba", ServerModel("host", 8000, "med mamba")),  # once quoted twice: med%2520mamba
])
def test_server_addresses_parse(spec, expected):
    assert is_triton_url(spec) and parse_url(spec) == expected
    assert parse_url(expected.url).url == expected.url  # the address without its client options
    assert parse_url(expected.url) == ServerModel(expected.host, expected.port, expected.model, expected.version)


@pytest.mark.parametrize("spec, message", [
    ("triton://host:8000", "not a server address"),
    ("triton://host:8000/m/latest", "the model version must be a number"),
    ("triton://host:8000/m?timeout=0", "timeout must be a positive number"),
    ("triton://host:8000/m?retries=3", "unknown option retries"),
    ("triton://host:99999/m", "not a server address"),
    ("triton://host:8000/m#frag", "a server address has no #fragment part"),
    ("triton://me@host:8000/m", "a server address has no user@ part"),
])
def test_bad_server_addresses_are_one_line(spec, message):
    with pytest.raises(BackendError, match=message):
        parse_url(spec)


def test_options_for_local_backends_are_refused_for_a_server():
    with pytest.raises(BackendError, match="threads cannot be set for a served model"):
        open_backend("triton://127.0.0.1:1/m", threads=2)


def test_no_server_is_one_line_at_once():
    (port,) = free_ports(1)
    started = time.monotonic()
    with pytest.raises(BackendError, match=rf"triton://127\.0\.0\.1:{port}/m: server unreachable \(connection refused"):
        open_backend(f"triton://127.0.0.1:{port}/m")
    assert time.monotonic() - started < 5


def test_a_server_that_never_answers_costs_the_timeout_not_a_hang():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"server unreachable \(no answer within 1 s\)"):
            open_backend(f"triton://127.0.0.1:{port}/m?timeout=1")
        assert time.monotonic() - started < 5
        result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "run", f"triton://127.0.0.1:{port}/m?timeout=1",
                                 str(ROOT / "medmamba_edge" / "assets" / "samples")], capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: triton://127.0.0.1:{port}/m: server unreachable "
                                                      f"(no answer within 1 s)")


def test_a_server_killed_mid_run_ends_the_run_with_every_frame_accounted_for(tmp_path_factory, tmp_path):
    require_serve_python()
    model = official_onnx(tmp_path_factory)
    busi = require_shared("data", "busi")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, path in enumerate(sorted(busi.glob("*/*.png"))[:FRAMES]):
        (folder / f"{i:04d}.png").symlink_to(path)
    records = tmp_path / "records.jsonl"
    with running_server(model, tmp_path_factory.mktemp("serve-killed")) as server:
        client = subprocess.Popen([sys.executable, "-m", "medmamba_edge.cli", "run", server.url, str(folder),
                                   "--jsonl", str(records), "--console", "frame"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        try:
            seen = 0
            for line in client.stdout:  # a line per frame: kill the server once some are classified
                seen += "capture→result" in line
                if seen >= 10:
                    break
            assert seen >= 10, "the run ended before the server was killed"
            server.kill()
            _, errors = client.communicate(timeout=RUN_DEADLINE_S)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    assert client.returncode == 1
    written = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["seq"] for r in written] == list(range(FRAMES))
    assert [Path(r["source"]).name for r in written] == sorted(p.name for p in folder.iterdir())
    statuses = [r["status"] for r in written]
    classified = statuses.index("skipped")
    assert classified >= 10 and set(statuses[:classified]) <= {"ok", "abstain"}
    assert set(statuses[classified:]) == {"skipped"}
    assert all(f"{server.url}: server unreachable" in r["reason"] for r in written[classified:])
    (error,) = [line for line in errors.splitlines() if line.startswith("error:")]
    assert "batches failed in the model" in error and "server unreachable" in error
