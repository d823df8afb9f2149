"""Bad input to quantize, evaluate and export, a runtime-only install, and output people read: each bad case
is one line naming the file, exit 1 and nothing written; tables and --help stay readable off a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from medmamba_edge.cli import app
from medmamba_edge.runtime.bundled import bundled_checkpoint, sample_image_paths
from tests.exported_models import bundled_onnx, quantizer_or_skip, quantizer_problem
from tests.test_evaluate import one_row_model

runner = CliRunner()


@pytest.fixture(scope="module")
def onnx32(tmp_path_factory):
    return bundled_onnx(tmp_path_factory)


def one_line_error(args, *fragments) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result.output


# ---- quantize: calibration data ----------------------------------------------------------------------

def _good_arrays(split="train", count=4):
    return {f"{split}_images": np.zeros((count, 32, 32), np.uint8), f"{split}_labels": np.zeros((count, 1), np.int64)}


def _truncated(path):
    np.savez(path, **_good_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _crc_corrupt(path):
    np.savez(path, **_good_arrays())
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside train_images.npy's pixels: the zip directory still reads
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make, reason", [
    (lambda p: np.savez(p, train_images=np.zeros((0, 32, 32), np.uint8), train_labels=np.zeros((0, 1), np.int64)),
     "split 'train' is empty"),
    (lambda p: np.savez(p, train_images=np.zeros(5, np.uint8)), "train_images has shape (5,)"),
    (lambda p: np.savez(p, train_images=np.array([np.zeros((3, 3)), "x", None], dtype=object)), "object arrays"),
    (lambda p: np.savez(p, train_images=np.zeros((4, 32, 32), np.int64)), "int64 pixels"),
    (_truncated, "not a readable .npz"),
    (_crc_corrupt, "Bad CRC-32"),
    (lambda p: p.write_bytes(b""), "not a readable .npz"),
    # numpy's error for any other bytes names allow_pickle: it was reported as holding object arrays
    (lambda p: p.write_text("hello world\n"), "not a readable .npz (not a zip archive"),
], ids=["empty-split", "1-d", "object-array", "int64", "truncated", "crc", "zero-bytes", "text"])
def test_quantize_bad_calibration_npz_is_one_line(onnx32, tmp_path, make, reason):
    quantizer_or_skip()  # else quantize says first that it cannot quantize here
    npz = tmp_path / "calib.npz"
    make(npz)
    output = tmp_path / "int8.onnx"
    one_line_error(["quantize", onnx32, "--calib", npz, "-o", output, "--num-samples", "4"], "calib.npz", reason)
    assert not output.exists()


def test_quantize_output_is_checked_before_calibrating(onnx32, tmp_path, monkeypatch):
    from medmamba_edge.exporters import quantize

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated before the output path was checked")

    monkeypatch.setattr(quantize, "quantize_onnx", refuse)
    npz = tmp_path / "calib.npz"
    np.savez(npz, **_good_arrays())
    one_line_error(["quantize", onnx32, "--calib", npz, "-o", "/sys/int8.onnx"], "/sys/int8.onnx: cannot write in /sys")


# ---- evaluate: labels and output paths -----------------------------------------------------------------

@pytest.mark.parametrize("labels, reason", [
    ([0, 1, -1, 0], "val_labels: label -1 is negative"),
    ([0, 1, 2, 0], "val_labels: label 2 is outside the model's 2 classes"),
    ([0.0, 1.0, 0.0, 1.0], "expected 4 integer class indices"),
])
def test_evaluate_bad_labels_are_one_line(onnx32, tmp_path, labels, reason):
    npz = tmp_path / "data.npz"
    np.savez(npz, val_images=np.zeros((4, 32, 32), np.uint8), val_labels=np.array(labels)[:, None])
    one_line_error(["evaluate", onnx32, "--data", npz], "data.npz", reason)


def _labelled_npz(folder):
    npz = folder / "data.npz"
    np.savez(npz, **_good_arrays("val"))
    return npz


@pytest.mark.parametrize("command", ["evaluate", "compare", "benchmark"])
@pytest.mark.parametrize("url, scheme", [("http://localhost:8000/medmamba", "http"), ("GRPC://h:8001/m", "grpc")])
def test_a_model_url_of_another_scheme_than_triton_is_named_as_such(tmp_path, command, url, scheme):
    """It was "http:/localhost:8000/medmamba: no such model file": the "//" folded by a Path, the scheme unsaid."""
    arguments = {"evaluate": ["--data", _labelled_npz(tmp_path)], "compare": ["m.onnx"], "benchmark": []}[command]
    one_line_error([command, url, *arguments],
                   f"error: {url}: unknown model URI scheme '{scheme}'; a served model is triton://HOST:PORT/MODEL")


@pytest.mark.parametrize("given, shown", [
    (["evaluate", "MODEL", "--data", "http://alice:s3cret@host/d.npz"], "http://alice:***@host/d.npz: evaluate needs"),
    (["benchmark", "https://host/m.onnx?token=s3cret"], "https://host/m.onnx?token=***: unknown model URI scheme"),
    (["run", "triton://alice:s3cret@host:8000/m", "IMAGE"], "triton://alice:***@host:8000/m: a server address has no"),
    (["run", "MODEL", "IMAGE", "--jsonl", "s3://b/o.jsonl?X-Amz-Signature=s3cret"], "?X-Amz-Signature=***: run needs"),
])
def test_a_password_in_a_refused_model_data_or_output_url_is_not_repeated(onnx32, tmp_path, monkeypatch, given,
                                                                          shown):
    """A stream's password was masked, but a URL refused as a model, a data set or an output was said as typed:
    'http://alice:s3cret@host/d.npz: evaluate needs a local data set …', into the logs and tickets the error goes to."""
    monkeypatch.chdir(tmp_path)
    real = {"MODEL": onnx32, "IMAGE": sample_image_paths("pneumoniamnist")[0]}
    assert "s3cret" not in one_line_error([real.get(a, a) for a in given], shown)


@pytest.mark.parametrize("command", ["quantize", "build-engine", "export-triton"])
@pytest.mark.parametrize("url, kind", [("http://host/m.onnx", "a URI (http://)"),
                                       ("triton://h:8001/medmamba", "a served model (triton://)")])
def test_a_model_url_given_to_a_command_that_reads_the_file_is_named_as_typed(tmp_path, command, url, kind):
    """The model argument was a Path: "http:/host/m.onnx: no such ONNX file", the "//" folded, the URL unnamed."""
    output = tmp_path / {"quantize": "q.onnx", "build-engine": "m.engine", "export-triton": "repo"}[command]
    calibration = ["--calib", _labelled_npz(tmp_path)] if command == "quantize" else []
    one_line_error([command, url, *calibration, "-o", output],
                   f"error: {url}: {command} needs a local model file, not {kind}")
    assert not output.exists()


@pytest.mark.parametrize("folder", ["runs:", "triton:"])
def test_a_model_in_a_folder_named_as_a_scheme_is_the_file_it_is(onnx32, tmp_path, monkeypatch, folder):
    """runs://m.onnx is runs:/m.onnx to the file system: with a folder runs: there, a file, not a URI; so is
    triton:/m.onnx to a command that reads the model's file (it was refused as a served model)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "m.onnx").write_bytes(onnx32.read_bytes())
    result = runner.invoke(app, ["export-triton", f"{folder}//m.onnx", "-o", "repo"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "medmamba" / "config.pbtxt").is_file()


@pytest.mark.parametrize("command", ["serve", "export"])
@pytest.mark.parametrize("url, kind", [("http://host/m.pth", "a URI (http://)"),
                                       ("triton://h:8001/medmamba", "a served model (triton://)")])
def test_a_model_url_given_to_serve_or_export_is_named_as_typed(tmp_path, monkeypatch, command, url, kind):
    """serve's MODEL and export's CHECKPOINT were Paths: "http:/host/m.pth: no such checkpoint file"; serve said first
    that PyTriton is missing, where the argument is wrong wherever it runs."""
    monkeypatch.chdir(tmp_path)
    one_line_error([command, url, *(["-o", "m.onnx"] if command == "export" else [])],
                   f"error: {url}: {command} needs a local model file, not {kind}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command, option", [("quantize", "--calib"), ("quantize", "--eval"), ("evaluate", "--data"),
                                             ("compare", "--data")])
@pytest.mark.parametrize("url, kind", [("http://host/data.npz", "a URI (http://)"),
                                       ("triton://h:8001/medmamba", "a served model (triton://)")])
def test_a_data_set_url_is_named_as_typed(onnx32, tmp_path, command, option, url, kind):
    """--calib, --eval and --data were Paths: "http:/host/data.npz: no such file or folder", the "//" folded."""
    if command == "quantize":
        quantizer_or_skip()  # else quantize says first that it cannot quantize here
    output = tmp_path / "int8.onnx"
    arguments = {"--calib": ["--calib", url, "-o", output],
                 "--eval": ["--calib", _labelled_npz(tmp_path), "--eval", url, "-o", output],
                 "--data": ["--data", url]}[option]
    models = [onnx32, onnx32] if command == "compare" else [onnx32]
    one_line_error([command, *models, *arguments],
                   f"error: {url}: {command} needs a local data set (file or folder), not {kind}")
    assert not output.exists()


@pytest.mark.parametrize("command, option, kind", [
    ("evaluate", "--json", "file"), ("evaluate", "--plots", "folder"), ("benchmark", "--json", "file"),
    ("benchmark", "--plot", "file"), ("quantize", "-o", "file"), ("export", "-o", "file"),
    ("build-engine", "-o", "file"), ("build-engine", "--timing-cache", "file"), ("export-triton", "-o", "folder"),
    ("run", "--jsonl", "file"), ("run", "--csv", "file"), ("run", "--save-video", "file"),
    ("demo", "--workdir", "folder"), ("build-plugin", "--build-dir", "folder")])
def test_an_output_url_is_refused_as_typed(onnx32, tmp_path, monkeypatch, command, option, kind):
    """An output option was a Path: `--json http://x/r.json` folded to http:/x/r.json, wrote folders named "http:"
    and "x" and said "wrote http:/x/r.json"."""
    monkeypatch.chdir(tmp_path)
    url = "http://x/out.png" if option == "--plot" else "http://x/out"
    given = {"evaluate": [onnx32, "--data", _labelled_npz(tmp_path)], "benchmark": [onnx32],
             "quantize": [onnx32, "--calib", _labelled_npz(tmp_path)], "export": [bundled_checkpoint()],
             "build-engine": [onnx32], "export-triton": [onnx32],
             "run": [onnx32, sample_image_paths("pneumoniamnist")[0]], "demo": [], "build-plugin": []}[command]
    if option != "-o" and command in ("quantize", "export", "build-engine", "export-triton"):
        given += ["-o", tmp_path / "m.engine"]
    one_line_error([command, *given, option, url],
                   f"error: {url}: {command} needs a local output {kind}, not a URI (http://)")
    assert not (tmp_path / "http:").exists()


@pytest.mark.parametrize("command, option", [
    ("evaluate", "--json"), ("benchmark", "--json"), ("benchmark", "--plot"), ("quantize", "-o"), ("export", "-o"),
    ("build-engine", "-o"), ("build-engine", "--timing-cache"), ("run", "--jsonl"), ("run", "--csv"),
    ("run", "--save-video")])
@pytest.mark.parametrize("ending, reason", [("/", "names a folder"), ("/.", "names a folder"),
                                            ("/..", "names a folder"), ("", "is a folder")])
def test_an_output_file_named_as_a_folder_is_refused(onnx32, tmp_path, monkeypatch, command, option, ending, reason):
    """`export CK.pth -o new.onnx/` wrote a FILE new.onnx (a Path drops the '/'), and so did every output file option
    given a folder still to be made; an existing folder was refused, and still is."""
    monkeypatch.chdir(tmp_path)
    name = {"--plot": "out.png", "--save-video": "out.mp4", "--timing-cache": "out.cache", "--csv": "out.csv",
            "--jsonl": "out.jsonl"}.get(option, "out.onnx" if option == "-o" else "out.json")
    if not ending:
        (tmp_path / name).mkdir()
    given = {"evaluate": [onnx32, "--data", _labelled_npz(tmp_path)], "benchmark": [onnx32, "--iterations", "1"],
             "quantize": [onnx32, "--calib", _labelled_npz(tmp_path)], "export": [bundled_checkpoint()],
             "build-engine": [onnx32], "run": [onnx32, sample_image_paths("pneumoniamnist")[0]]}[command]
    if option != "-o" and command == "build-engine":
        given += ["-o", tmp_path / "m.engine"]
    before = sorted(tmp_path.rglob("*"))
    one_line_error([command, *given, option, name + ending], f"error: {name}", f": {reason}, expected a file name")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("folder", ["runs:", "triton:"])
def test_data_and_outputs_in_a_folder_named_as_a_scheme_are_the_files_they_are(onnx32, tmp_path, monkeypatch, folder):
    """runs://d.npz and runs://r.json are runs:/d.npz and runs:/r.json to the file system: with a folder runs: there,
    a data set read and outputs written in it, not URIs; in a folder still to be made (runs:/new/r.json), and a
    folder given with its trailing slash (--plots runs://plots/) too, which were refused as URIs; and in a folder
    named triton:, whose outputs were refused as served models."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).mkdir()
    _labelled_npz(tmp_path / folder)
    result = runner.invoke(app, ["evaluate", str(onnx32), "--data", f"{folder}//data.npz", "--json",
                                 f"{folder}//new/r.json", "--plots", f"{folder}//plots/"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / folder / "new" / "r.json").read_text())["models"]
    assert [p.suffix for p in (tmp_path / folder / "plots").iterdir()] == [".png"]


def test_the_library_refuses_a_url_as_the_command_does(tmp_path):
    """open_dataset and check_writable, under evaluate, quantize and the rest, refuse a URI for Python callers too."""
    from medmamba_edge.runtime.datasets import DatasetError, open_dataset
    from medmamba_edge.runtime.files import OutputError, check_writable

    with pytest.raises(DatasetError, match=r"^http://h/d\.npz: medmamba-edge needs a local data set \(file or "
                                           r"folder\), not a URI \(http://\)$"):
        open_dataset("http://h/d.npz")
    with pytest.raises(OutputError, match=r"^s3://b/r\.json: evaluate needs a local output file, not a URI \(s3://\)$"):
        check_writable("s3://b/r.json", command="evaluate")


@pytest.fixture
def never_evaluate(monkeypatch):
    """Output paths are checked before any model is opened: evaluating at all fails the test."""
    from medmamba_edge import evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before the output path was checked")

    monkeypatch.setattr(evaluation, "evaluate", refuse)


@pytest.mark.parametrize("where, reason", [
    ("folder", "is a folder, expected a file name"),
    ("/sys/medmamba-edge.json", "cannot write in /sys"),  # read-only even for root
    ("file/metrics.json", "is not a folder"),
])
def test_evaluate_json_that_cannot_be_written_fails_before_evaluating(onnx32, tmp_path, never_evaluate, where, reason):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    target = where if where.startswith("/") else tmp_path / where
    one_line_error(["evaluate", onnx32, "--data", _labelled_npz(tmp_path), "--json", target], str(target), reason)
    assert not list((tmp_path / "folder").iterdir())


def test_evaluate_plots_into_a_file_fails_before_evaluating(onnx32, tmp_path, never_evaluate):
    (tmp_path / "plots").write_text("")
    one_line_error(["evaluate", onnx32, "--data", _labelled_npz(tmp_path), "--plots", tmp_path / "plots"],
                   "plots: is not a folder")


# ---- export: the output path before the export ---------------------------------------------------------

@pytest.mark.parametrize("where, reason", [
    ("folder", "is a folder, expected a file name"),
    ("/sys/medmamba-edge/model.onnx", "cannot write in /sys"),
    ("file/model.onnx", "is not a folder"),
])
def test_export_output_is_checked_before_the_checkpoint_is_even_read(tmp_path, monkeypatch, where, reason):
    from medmamba_edge.exporters import onnx_export

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output path was checked")

    monkeypatch.setattr(onnx_export, "load_checkpoint", refuse)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    target = where if where.startswith("/") else tmp_path / where
    one_line_error(["export", bundled_checkpoint(), "-o", target, "--input-size", "32"], str(target), reason)


# ---- options that cannot work together or at all: refused in one line, nothing written ------------------

def test_options_that_cannot_work_are_one_line(onnx32, tmp_path):
    checkpoint, npz = bundled_checkpoint(), _labelled_npz(tmp_path)
    empty, foreign = tmp_path / "empty.onnx", tmp_path / "foreign.onnx"
    empty.write_bytes(b"")
    identity = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "other",
                                      [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                      [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(identity), foreign)
    (tmp_path / "file").write_text("")
    cases = [
        (["export", checkpoint, "-o", tmp_path / "a.onnx", "--opset", "17"], "--opset must be ≥ 18"),
        # Past the installed onnx's newest opset: refused after the trace, as torch.onnx's failure
        (["export", checkpoint, "-o", tmp_path / "a.onnx", "--opset", "1000"],
         f"--opset must be ≤ {onnx.defs.onnx_opset_version()}, the newest the installed onnx"),
        # A file not *.json: its path became the one class name ("1 class names given but the model has 2 outputs")
        (["export", checkpoint, "-o", tmp_path / "a.onnx", "--classes", tmp_path / "file"],
         "file: class names are read from a JSON file"),
        (["export", checkpoint, "-o", tmp_path / "a.onnx", "--batch", "4", "--dynamic-batch"], "exclude each other"),
        (["evaluate", checkpoint, "--data", npz, "--input-size", "31"], "input size (31, 31) is too small"),
        (["compare", checkpoint, onnx32, "--input-size", "28"], "input size (28, 28) is too small"),
        (["compare", onnx32, onnx32, "--data", npz, "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["evaluate", onnx32, onnx32, "--data", npz, "--max-drop", "-0.5"], "--max-drop must be a finite number ≥ 0, got -0.5"),
        (["evaluate", onnx32, onnx32, "--data", npz, "--max-drop", "inf"], "--max-drop must be a finite number ≥ 0, got inf"),
        (["evaluate", onnx32, "--data", npz, "--batch", "0"], "--batch must be an integer ≥ 1, got 0"),
        (["compare", onnx32, onnx32, "--batch", "0"], "--batch must be an integer ≥ 1, got 0"),
        (["benchmark", onnx32, "--plot", tmp_path / "latency.jpg"], "latency.jpg: the plot is a PNG; name it *.png"),
        # an engine and its timing cache on one stream would be one unusable file (as run's JSONL and CSV would)
        (["build-engine", onnx32, "-o", "/dev/stdout", "--timing-cache", "/dev/stdout"], "/dev/stdout: given for two outputs"),
        # all three read "batch sizes and iterations must be ≥ 1, warm-up ≥ 0"
        (["benchmark", onnx32, "--batch", "2,0"], "--batch must be an integer ≥ 1, got 0"),
        (["benchmark", onnx32, "--warmup", "-1"], "--warmup must be an integer ≥ 0, got -1"),
        (["benchmark", onnx32, "--iterations", "0"], "--iterations must be an integer ≥ 1, got 0"),
        # serve checks its options before it needs PyTriton (absent from this venv)
        (["serve", onnx32, "--port", "65535"], "--grpc-port (default --port + 1) must be a port number (1–65535), got 65536"),
        (["serve", onnx32, "--threads", "0"], "--threads must be between 1 and"),
        (["serve", onnx32, "--name", "med mamba"], "--name 'med mamba': a model name is letters, digits"),
        (["serve", onnx32, "--name", "modèle"], "--name 'modèle': a model name is letters, digits"),  # ASCII only
        (["serve", onnx32, "--host", "::1"], "--host ::1: IPv6 is not served"),
        (["quantize", onnx32, "--calib", npz, "-o", tmp_path / "a.onnx", "--max-drop", "0.5"],
         "--max-drop applies only with --eval DATA"),
        (["export-triton", onnx32, "-o", tmp_path / "repo", "--deepstream-batch", "0"], "--deepstream-batch must be ≥ 1, got 0"),
        (["export-triton", onnx32, "-o", tmp_path / "repo", "--max-batch", "0"], "--max-batch must be ≥ 1, got 0"),
        # Past the config fields' int32 / uint64, Triton refused the whole config ("failed to read text proto").
        (["export-triton", onnx32, "-o", tmp_path / "repo", "--max-batch", "99999999999"],
         "--max-batch must be ≤ 2147483647 (the range of Triton's config field), got 99999999999"),
        (["export-triton", onnx32, "-o", tmp_path / "repo", "--max-queue-delay-us", "99999999999999999999"],
         "--max-queue-delay-us must be ≤ 18446744073709551615"),
        (["serve", onnx32, "--max-batch", "99999999999"], "--max-batch must be ≤ 2147483647"),
        # Relative, they were the server's working directory's (op_library_filename: "models/medmamba/lib...").
        (["export-triton", onnx32, "-o", tmp_path / "repo", "--server-root", "models"],
         "--server-root must be an absolute path on the server (as it sees the repository, e.g. /models), got 'models'"),
        (["export-triton", onnx32, "-o", tmp_path / "file" / "repo"], "file/repo: " + str(tmp_path / "file") + " is not a folder"),
        (["build-engine", foreign, "-o", tmp_path / "a.engine"], "foreign.onnx: no medmamba-edge metadata"),
        (["quantize", empty, "--calib", npz, "-o", tmp_path / "a.onnx"], "empty.onnx: not an ONNX model (the file is empty"),
        # A folder: export-triton called it "no such model file", quantize named its path twice.
        (["export-triton", tmp_path / "dir.onnx", "-o", tmp_path / "repo"], "dir.onnx: not a file"),
        (["quantize", tmp_path / "dir.onnx", "--calib", npz, "-o", tmp_path / "a.onnx"],
         "dir.onnx: not a readable ONNX model (IsADirectoryError: Is a directory)"),
    ]
    (tmp_path / "dir.onnx").mkdir()
    for args, reason in cases:
        if args[0] == "quantize" and (problem := quantizer_problem()):
            reason = problem  # said first, before any of its options
        one_line_error(args, reason)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "dir.onnx", "empty.onnx", "file", "foreign.onnx"]
    assert (tmp_path / "file").read_text() == ""


def test_an_opset_the_exporter_cannot_write_is_one_line(tmp_path, monkeypatch):
    # torch.onnx falls back to opset 18 where it cannot convert (and logs a traceback): refused, nothing written.
    # An onnx newer than torch.onnx's converter: past onnx's own newest, the opset is refused before the trace.
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 99)
    output = tmp_path / "a.onnx"
    one_line_error(["export", bundled_checkpoint(), "-o", output, "--input-size", "32", "--opset", "99"],
                   "--opset 99: torch.onnx", "could not convert the model to it (it wrote opset 18)")
    assert not output.exists()


def test_counts_given_to_the_library_as_fractions_or_bools_are_one_line_errors(tmp_path):
    """Checked with `< 1` they let 1.5 and True through: compare(x, x, num_samples=2.5) was a TypeError in slicing,
    iterate(source, stride=1.5) one in reading; benchmark checked only the smallest of its batch sizes."""
    from medmamba_edge.benchmarking import BenchmarkError, benchmark, speed_check
    from medmamba_edge.comparison import compare
    from medmamba_edge.exporters.onnx_export import ExportError, export_onnx
    from medmamba_edge.runtime.datasets import DatasetError
    from medmamba_edge.runtime.sources import SourceError, iterate, open_source

    model = one_row_model(tmp_path / "m.onnx")  # any model opens: the counts are refused before it runs
    cases = [
        (lambda v: compare(model, model, num_samples=v), DatasetError, "--num-samples must be >= 1"),
        (lambda v: compare(model, model, num_samples=2, seed=v), DatasetError, "--seed must be >= 0"),
        (lambda v: next(iterate(open_source(str(sample_image_paths("pneumoniamnist")[0])), stride=v)), SourceError,
         "--stride must be ≥ 1"),
        (lambda v: benchmark([model], batches=[1, v]), BenchmarkError, "--batch must be an integer ≥ 1"),
        (lambda v: benchmark([model], warmup=v), BenchmarkError, "--warmup must be an integer ≥ 0"),
        (lambda v: benchmark([model], iterations=v), BenchmarkError, "--iterations must be an integer ≥ 1"),
        (lambda v: speed_check(v), BenchmarkError, "--speed-batch must be >= 1"),
        (lambda v: export_onnx(bundled_checkpoint(), tmp_path / "x.onnx", input_size=32, batch=v), ExportError,
         "batch must be ≥ 1"),
    ]
    for call, error, message in cases:
        for value in (2.5, True, -1 if message.endswith("0") else 0):  # and the value the check was for
            with pytest.raises(error, match=re.escape(f"{message}, got {value}")):
                call(value)
    assert not (tmp_path / "x.onnx").exists()
    # numpy's integers pass, and reach the workers (JSON) and the metadata as Python's: they were TypeErrors there
    from medmamba_edge.runtime.metadata import height_width

    report = benchmark([model], batches=[np.int64(1)], warmup=np.int64(0), iterations=np.int64(1))
    assert [m.batch for m in report.measurements] == [1]
    assert height_width(np.int64(32)) == (32, 32) and all(type(side) is int for side in height_width(np.int64(32)))


# ---- a runtime-only install: no torch, no onnxscript, no matplotlib ------------------------------------

WITHOUT = textwrap.dedent("""
    import sys

    class NotInstalled:
        missing = tuple(sys.argv.pop(1).split(","))

        def find_spec(self, name, path=None, target=None):
            if any(name == module or name.startswith(module + ".") for module in self.missing):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled())
    sys.argv[0] = "medmamba-edge"
    from medmamba_edge.cli import main
    main()
""")


def without(modules: tuple[str, ...], *args, cwd) -> subprocess.CompletedProcess:
    """The command line ``args`` run where ``modules`` (and the modules in them) cannot be imported."""
    return subprocess.run([sys.executable, "-c", WITHOUT, ",".join(modules), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def runtime_only(*args, cwd) -> subprocess.CompletedProcess:
    # What `pip install .` without extras leaves out.
    return without(("torch", "onnxscript", "matplotlib"), *args, cwd=cwd)


def test_version_is_the_installed_distributions_both_ways():
    """--version and python -m medmamba_edge, for bug reports; pyproject reads the version from the package."""
    import importlib.metadata

    installed = importlib.metadata.version("medmamba-edge")
    for command in ([sys.executable, "-m", "medmamba_edge", "--version"],
                    [sys.executable, "-c", "from medmamba_edge.cli import main; main()", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout == f"medmamba-edge {installed}\n", result
    with open("/dev/full", "w") as full:  # one line, as every command's output error (it was a traceback)
        result = subprocess.run([sys.executable, "-m", "medmamba_edge", "--version"], stdout=full, stderr=subprocess.PIPE,
                                text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: stdout: cannot write"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("args", [
    ["demo", "--workdir", "demo"],
    ["export", str(bundled_checkpoint()), "-o", "model.onnx", "--input-size", "32"],
], ids=["demo", "export"])
def test_runtime_only_install_names_the_export_extra(tmp_path, args):
    result = runtime_only(*args, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.strip().count("\n") == 0 and "Traceback" not in output, output
    assert "needs PyTorch" in output and "pip install '.[export]'" in output and "medmamba-edge[export]" in output
    assert not list(tmp_path.rglob("*.onnx"))


def test_an_onnxscript_older_than_torch_is_named_in_one_line(tmp_path):
    # torch.onnx imports the onnxscript API of its own release by name; an older onnxscript lacks it.
    result = without(("onnxscript._framework_apis",), "export", bundled_checkpoint(), "-o", "model.onnx",
                     "--input-size", "32", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    assert re.search(r"^error: torch \S+'s exporter needs a newer onnxscript than \S+ \(No module named "
                     r"'onnxscript\._framework_apis[\w.]*'\): pip install --upgrade onnxscript; nothing was "
                     r"written to model\.onnx$", output.strip()), output
    assert not list(tmp_path.rglob("*.onnx"))


def test_runtime_only_install_runs_the_default_export(onnx32, tmp_path):
    """The default (plugin-form) export runs without torch: its SS2DScan nodes on the native op library."""
    samples = sample_image_paths()
    result = runtime_only("run", onnx32, samples[0].parent, "--jsonl", "r.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == len(list(samples[0].parent.glob("*.png"))) > 0
    assert all(r["status"] == "ok" for r in records), records


def test_plots_without_matplotlib_fail_before_evaluating(onnx32, tmp_path):
    npz = _labelled_npz(tmp_path)
    result = runtime_only("evaluate", onnx32, "--data", npz, "--plots", "plots", "--json", "m.json", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and output.strip().count("\n") == 0 and "Traceback" not in output, output
    assert "plots need matplotlib" in output and "pip install '.[plots]'" in output
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "plots").exists()


# ---- output people read --------------------------------------------------------------------------------

def test_tables_are_not_squeezed_to_80_columns_off_a_terminal(onnx32, tmp_path):
    long_name = tmp_path / "medmamba_t_pneumoniamnist32_plugin_dynamic_batch_fp32.onnx"
    long_name.write_bytes(onnx32.read_bytes())
    npz = tmp_path / "data.npz"
    np.savez(npz, val_images=np.full((4, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1], [0], [1]]))
    result = runner.invoke(app, ["evaluate", str(long_name), "--data", str(npz)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if long_name.name in line)
    assert "accuracy" in result.output and "specificity" in result.output  # headers whole, not "accura│cy"
    assert row.count("│") >= 9, row  # the whole row on one line

    result = runner.invoke(app, ["compare", str(long_name), str(onnx32)])
    assert result.exit_code == 0, result.output
    assert f"PASSED: {onnx32} matches {long_name} within the fp32 tolerance" in result.output


@pytest.mark.parametrize("command, expected", [
    ("export", ["Usage: medmamba-edge export [OPTIONS] CHECKPOINT", "PATH", "INTEGER", "FLOAT", "N|HxW"]),
    ("evaluate", ["MODELS...", "--data", "PATH", "INTEGER", "FLOAT"]),
    ("quantize", ["MODEL", "TEXT", "INTEGER", "FLOAT"]),
])
def test_help_shows_the_usual_metavars(command, expected):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    for metavar in expected:
        assert metavar in result.output, result.output
    for typer_label in ("<bool>", "<str>", "<int>", "<path>", "{"):
        assert typer_label not in result.output, result.output


def test_paths_and_class_names_print_as_given_never_as_rich_markup(onnx32, tmp_path):
    # Rich reads "[...]" as markup and ":name:" as an emoji: the work done, printing what was written crashed
    # on a closing tag with nothing to close, or dropped the brackets.
    checkpoint = tmp_path / "ck[" / "x].pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(bundled_checkpoint().read_bytes())
    model = tmp_path / "m[" / "b]:red_heart:.onnx"
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(model), "--input-size", "32", "--no-verify",
                                 "--classes", "[property],[/]"])
    assert result.exit_code == 0, result.output
    assert f"wrote {model} (" in result.output and "classes [property], [/])" in result.output

    npz = tmp_path / "data.npz"
    np.savez(npz, val_images=np.full((4, 32, 32), 128, np.uint8), val_labels=np.array([[0], [1], [0], [1]]))
    result = runner.invoke(app, ["evaluate", str(model), "--data", str(npz), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")[1:3]] for line in result.output.splitlines() if line.count("│") == 9]
    assert rows == [[model.name, "[property]"], [model.name, "[/]"]], result.output
    assert (tmp_path / "e.json").exists()

    jsonl, csv = tmp_path / "[red]:x:res.jsonl", tmp_path / "res[" / "x].csv"
    result = runner.invoke(app, ["run", str(model), str(sample_image_paths("pneumoniamnist")[0]), "--jsonl", str(jsonl),
                                 "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    assert f"wrote {jsonl}\n" in result.output and f"wrote {csv}\n" in result.output

    repo = tmp_path / "repo[" / "q]"
    result = runner.invoke(app, ["export-triton", str(onnx32), "-o", str(repo)])
    assert result.exit_code == 0, result.output
    assert f"wrote {repo / 'medmamba'} (" in result.output
    # Styles of our own come as rich Text, so they still apply where markup is not read.
    result = runner.invoke(app, ["compare", str(model), str(model)])
    assert result.exit_code == 0 and "│ pass " in result.output and "[green]" not in result.output, result.output


def test_serve_serves_a_model_file_in_a_folder_named_triton(onnx32, tmp_path, monkeypatch):
    """serve took triton:/m.onnx, a file in a folder named triton:, for a file (local_model_file), then opened it as
    a server's address ('not a server address'). PyTriton stands in here: what serve opened is what it would serve."""
    from medmamba_edge import serving

    monkeypatch.chdir(tmp_path)
    (tmp_path / "triton:").mkdir()
    (tmp_path / "triton:" / "m.onnx").write_bytes(onnx32.read_bytes())
    monkeypatch.setattr(serving, "_pytriton", lambda: (lambda **options: None,) * 3)
    monkeypatch.setattr(serving, "check_ports_free", lambda host, ports: None)
    monkeypatch.setattr(serving, "server_environment", lambda environ: {})
    served = []
    monkeypatch.setattr(serving, "_serve", lambda model, backend, *rest: served.append(type(backend).__name__))
    serving.serve("triton:/m.onnx", serving.ServeOptions(), notify=lambda message: None)
    assert served == ["OnnxRuntimeBackend"]


EXPORTED_KINDS = "expected an .onnx (medmamba-edge export) or an .engine/.plan (medmamba-edge build-engine)"
ALL_KINDS = ("expected an .onnx (medmamba-edge export), an .engine/.plan (medmamba-edge build-engine) or a PyTorch "
             "checkpoint (.pth, .pth.tar, .pt, .ckpt, .bin)")


@pytest.mark.parametrize("command, expected", [
    (["serve"], EXPORTED_KINDS), (["export-triton", "-o", "repo"], EXPORTED_KINDS),
    (["run", "{image}"], ALL_KINDS), (["compare", "model.xyz"], ALL_KINDS)])
def test_a_model_of_unknown_type_is_told_what_its_command_takes(tmp_path, monkeypatch, command, expected):
    """serve said 'expected .onnx, .engine/.plan or a checkpoint', run's words, of a command that refuses checkpoints;
    PyTriton stands in, as serve reads the model before it starts a server."""
    from medmamba_edge import serving

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(serving, "_pytriton", lambda: (lambda **options: None,) * 3)
    monkeypatch.setattr(serving, "check_ports_free", lambda host, ports: None)
    (tmp_path / "model.xyz").write_bytes(b"a model of no type medmamba-edge knows")
    name, *rest = command
    image = sample_image_paths("pneumoniamnist")[0]
    output = one_line_error([name, "model.xyz", *[a.format(image=image) for a in rest]])
    assert output.startswith("error: ") and output.rstrip().endswith(f"model.xyz: unknown model type .xyz; {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.xyz"]


@pytest.mark.parametrize("command", ["export", "quantize", "build-engine", "export-triton", "serve"])
def test_a_file_argument_taken_as_typed_is_still_shown_as_a_path(command):
    """The file arguments became str (a Path folded a URL's '//'), and --help called them TEXT."""
    result = runner.invoke(app, [command, "--help"], terminal_width=120)
    assert result.exit_code == 0 and re.search(r"\*\s+(checkpoint|model)\s+PATH\s", result.output), result.output


@pytest.mark.parametrize("output", ["", ".", "/"])
def test_build_engine_into_a_folder_is_one_line(onnx32, output):
    """-o . (or / or "") has no name to put the manifest beside: a ValueError traceback from Path.with_name."""
    result = runner.invoke(app, ["build-engine", str(onnx32), "-o", output])
    assert result.exit_code == 1 and result.output.strip().endswith(": is a folder, expected a file name"), result.output
    assert len(result.output.strip().splitlines()) == 1 and isinstance(result.exception, SystemExit)


def test_a_file_argument_is_not_refused_for_being_unreadable(onnx32, tmp_path, monkeypatch):
    """typer's path type checks by default that an existing path can be read: an output file or folder open to
    writing only (mode 222, 333) was refused at parsing ('Path ... is not readable') where it is replaced whole.
    os.access is asked here as a user without root's bypass would get it answered."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode == os.R_OK else real_access(path, mode, **kw))
    _labelled_npz(tmp_path)
    (tmp_path / "r.json").write_text("{}")
    result = runner.invoke(app, ["evaluate", str(onnx32), "--data", str(tmp_path / "data.npz"), "--json",
                                 str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["models"]
