"""The one way tests call the CLI in-process or as a child process, and read the JSONL records a run writes."""

from __future__ import annotations

import json
import subprocess
import sys
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


def reap_cli_processes() -> None:
    """Kill what cli_process started and is still running, and wait for every one of them (no zombie)."""
    while _children:
        process = _children.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()
