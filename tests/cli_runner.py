"""The one way tests call the CLI in-process and read the JSONL records a run writes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medmamba_edge.cli import app


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
