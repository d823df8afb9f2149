"""`medmamba-edge benchmark` on the bundled tiny model: markdown table, JSON and PNG."""

import json

from typer.testing import CliRunner

from medmamba_edge.benchmarking import timed
from medmamba_edge.cli import app
from medmamba_edge.runtime.cpu import describe_cpu
from tests.exported_models import bundled_onnx

runner = CliRunner()


def test_benchmark_writes_table_json_and_plot(tmp_path_factory, tmp_path):
    model = bundled_onnx(tmp_path_factory)
    result = runner.invoke(app, ["benchmark", str(model), "--batch", "1,2", "--warmup", "1", "--iterations", "3",
                                 "--threads", "1", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    assert "| model | backend | precision | input | batch | p50 ms | p90 ms | p99 ms |" in result.output
    assert "| bundled32.onnx | ONNX Runtime" in result.output and "onnxruntime" in result.output
    assert result.output.startswith(f"{describe_cpu()}, "), "the table is headed by the CPU and its instruction set"
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["machine"]["cpu"] == describe_cpu() and report["machine"]["threads"] == 1
    rows = report["measurements"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert len(row["latencies_ms"]) == 3 and 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 50  # a Python process with ONNX Runtime
        assert row["precision"] == "fp32" and row["input_size"] == [32, 32]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["benchmark", str(tmp_path / "none.onnx")])
    assert result.exit_code == 1 and "no such model file" in result.output
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    result = runner.invoke(app, ["benchmark", str(tmp_path / "broken.onnx"), "--iterations", "1"])
    assert result.exit_code == 1 and "broken.onnx" in result.output and "Traceback" not in result.output
    assert len(result.output.splitlines()) == 1, result.output
    result = runner.invoke(app, ["benchmark", str(tmp_path / "broken.onnx"), "--batch", "1,x"])
    assert result.exit_code == 1 and "--batch must be comma-separated integers" in result.output


def test_timed_counts_warmup_apart():
    calls = []
    samples = timed(lambda: calls.append(1), warmup=2, iterations=3)
    assert len(calls) == 5 and len(samples) == 3 and min(samples) >= 0
