"""The one way tests call the CLI in-process or as a child process, and read the JSONL records a run writes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from medmamba_edge.cli import app


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


ROOT = Path(__file__).resolve().parents[1]
_children: list[subprocess.Popen] = []


def cli_process(*args, **popen) -> subprocess.Popen:
    """`python -m medmamba_edge.cli ARGS` as a child process (stdout and stderr piped, text), killed and reaped when
    the test ends however it ends (conftest's reap_cli_processes): a test that failed before its child ended left a
    `run --loop` going forever."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": ROOT, **popen}
    process = subprocess.Popen([sys.executable, "-m", "medmamba_edge.cli", *map(str, args)], **popen)
    _children.append(process)
    return process


def wait_for_records(process: subprocess.Popen, folder: Path, count: int, every: float = 0.1,
                     deadline_s: float = 300) -> None:
    """Until the run's .records.*.partial.jsonl in ``folder`` holds ``count`` whole records: a signal must land mid-run
    (handlers set), which on a loaded machine can take minutes; only a hung or failed run reaches the deadline."""
    def written() -> int:
        try:
            return max((p.read_text().count("\n") for p in folder.glob(".records.*.partial.jsonl")), default=0)
        except FileNotFoundError:  # renamed at close
            return 0

    deadline = time.monotonic() + deadline_s
    while written() < count:
        assert process.poll() is None, f"the run ended before the signal: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {count} records in {deadline_s} s"
        time.sleep(every)


def reap_cli_processes() -> None:
    """Kill what cli_process started and is still running, and wait for every one of them (no zombie)."""
    while _children:
        process = _children.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()
