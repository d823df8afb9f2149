"""`run` under bad input, signals and full disks: every file and frame gets a record, names are recorded
losslessly, output files are complete or absent, and every failure is one line naming the file.

The models are three-node ONNX graphs written here (global average pool → flatten → scale), so these
tests need neither torch nor an export; the metadata is written raw, as a damaged file would carry it."""

import csv
import errno
import json
import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from medmamba_edge.runtime import files
from medmamba_edge.runtime.files import AtomicOutput, write_bytes_atomically
from medmamba_edge.runtime.sinks import JsonlSink, Record
from tests.cli_runner import cli, cli_process, read_jsonl, wait_for_records
from tests.shared_data import require_shared
from tests.test_sources import synthetic_dicom, write_video

pydicom = pytest.importorskip("pydicom")
GOOD_META = {"input_size": [32, 32], "class_names": ["a", "b", "c"], "batch": None}


def toy_model(path, meta=None, scale=(1.0, 2.0, 3.0), input_shape=("N", 3, 32, 32), output_shape=("N", 3)):
    """x (N, 3, H, W) → mean per channel → × scale: three logits. ``output_shape`` is what the graph
    declares (a Reshape gives it that rank); ``meta`` is written as raw JSON."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Mul", ["flat", "scale"], ["scaled"])]
    target = [-1 if isinstance(d, str) else d for d in output_shape]
    nodes.append(helper.make_node("Reshape", ["scaled", "target"], ["logits"]))
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(output_shape))],
        [helper.make_tensor("scale", TensorProto.FLOAT, [3], list(scale)),
         helper.make_tensor("target", TensorProto.INT64, [len(target)], target)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "medmamba_edge", json.dumps(GOOD_META if meta is None else meta)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return toy_model(tmp_path_factory.mktemp("model") / "toy.onnx")


def run_cli_process(*args, **popen):
    return cli_process("run", *args, **popen)  # killed and reaped at the test's end if it is still running


def png_header(width, height):
    """A tiny PNG (a few dozen bytes) whose header declares width × height."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def image(seed=0, shape=(40, 40, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_a_corpus_of_broken_files_gives_one_record_each_and_the_good_ones_classified(model, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    cv2.imwrite(str(folder / "a_good.png"), image(0))
    bad_name = os.path.join(os.fsencode(folder), b"b_scan_\xff\xfe.png")  # not UTF-8: Latin-1 from an old PACS
    with open(bad_name, "wb") as handle:
        handle.write(cv2.imencode(".png", image(1))[1].tobytes())
    (folder / "c_huge.png").write_bytes(png_header(65000, 65000))
    synthetic_dicom(folder / "d_window0.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8), WindowCenter=40, WindowWidth=0)
    good_dicom = synthetic_dicom(tmp_path / "whole.dcm", np.zeros((64, 64), np.uint16))
    (folder / "e_cut.dcm").write_bytes(good_dicom.read_bytes()[:400])
    os.symlink("missing.png", folder / "f_dangling.png")
    os.symlink("g_loop.png", folder / "g_loop.png")
    os.symlink(".", folder / "h_folder_loop")
    cv2.imwrite(str(folder / "._i_hidden.png"), image(2))
    os.mkfifo(folder / "j_fifo.png")
    cv2.imwrite(str(folder / "k_last.png"), image(3))
    (folder / ".Trash-1000" / "files").mkdir(parents=True)  # deleted studies were classified
    cv2.imwrite(str(folder / ".Trash-1000" / "files" / "deleted.png"), image(4))
    out = tmp_path / "out"
    code, output = cli("run", model, folder, "--jsonl", out / "r.jsonl", "--csv", out / "r.csv")
    assert code == 0, output
    assert "Traceback" not in output
    records = read_jsonl(out / "r.jsonl")
    by_name = {os.path.basename(os.fsencode(r["source"])): r for r in records}
    assert sorted(by_name) == sorted(os.fsencode(n) for n in os.listdir(os.fsencode(folder)))  # one record each
    assert [r["seq"] for r in records] == list(range(len(records)))
    ok = sorted(name for name, r in by_name.items() if r["status"] == "ok")
    assert ok == [b"a_good.png", b"b_scan_\xff\xfe.png", b"k_last.png"]
    reasons = {name: r["reason"] for name, r in by_name.items() if r["status"] == "skipped"}
    assert "over the limit of 67,108,864 pixels" in reasons[b"c_huge.png"]
    assert "cannot be mapped to intensities" in reasons[b"d_window0.dcm"] and "Window" in reasons[b"d_window0.dcm"]
    assert "truncated DICOM file" in reasons[b"e_cut.dcm"]
    assert "dangling symbolic link (to missing.png)" in reasons[b"f_dangling.png"]
    assert "symbolic link loop" in reasons[b"g_loop.png"]
    assert "a link to a folder already listed (.), not entered again" in reasons[b"h_folder_loop"]
    assert "hidden file" in reasons[b"._i_hidden.png"]
    assert "hidden folder (the name starts with '.'), not entered" in reasons[b".Trash-1000"]
    assert "not a regular file" in reasons[b"j_fifo.png"]
    # The CSV has the same rows, valid UTF-8, the undecodable bytes spelled as in the JSONL.
    rows = list(csv.DictReader(open(out / "r.csv", encoding="utf-8")))
    assert [row["status"] for row in rows] == [r["status"] for r in records]
    assert any(row["source"].endswith("b_scan_\\udcff\\udcfe.png") for row in rows)
    assert sorted(os.listdir(out)) == ["r.csv", "r.jsonl"]


def test_the_csv_tells_a_name_s_undecodable_byte_from_a_name_spelling_its_escape(model, tmp_path):
    """A name with the byte 0xff and a name holding the text '\udcff' were the same CSV source ('\udcff.png'
    twice); a backslash that would read as an escape is doubled, so the documented rule gives every name's bytes
    back. A plain backslash (a\\b.png) is written as it is; the JSONL is unchanged (JSON escapes its own)."""
    import re

    folder = tmp_path / "names"
    folder.mkdir()
    names = [b"\xff.png", b"\\udcff.png", b"a\\b.png", b"c\\\\\xfe.png"]
    for name in names:
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(cv2.imencode(".png", image(0))[1].tobytes())
    code, output = cli("run", model, folder, "--jsonl", tmp_path / "r.jsonl", "--csv", tmp_path / "r.csv")
    assert code == 0, output
    rows = list(csv.DictReader(open(tmp_path / "r.csv", encoding="utf-8")))
    assert [row["status"] for row in rows] == ["ok"] * len(names)
    sources = [os.path.basename(row["source"]) for row in rows]
    assert sorted(sources) == sorted(["\\udcff.png", "\\\\udcff.png", "a\\b.png", "c\\\\\\\\\\udcfe.png"])

    def read_back(text):  # docs/runtime.md: \\ is a backslash, \udcXX the byte 0xXX, any other backslash itself
        return os.fsencode(re.sub(r"\\(\\|udc[89a-f][0-9a-f])",
                                  lambda m: "\\" if m[1] == "\\" else chr(int(m[1][1:], 16)), text))

    assert sorted(read_back(source) for source in sources) == sorted(names)
    assert sorted(os.path.basename(os.fsencode(r["source"])) for r in read_jsonl(tmp_path / "r.jsonl")) == sorted(names)


def test_a_glob_gives_dangling_links_and_fifos_a_record_as_a_folder_does(model, tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), image(0))
    os.symlink("missing.png", tmp_path / "b.png")
    os.mkfifo(tmp_path / "c.png")
    (tmp_path / "d.png").mkdir()  # a folder matching the pattern is no file of it
    code, output = cli("run", model, str(tmp_path / "*.png"), "--jsonl", tmp_path / "r.jsonl")
    assert code == 0, output
    records = {Path(r["source"]).name: r for r in read_jsonl(tmp_path / "r.jsonl")}
    assert sorted(records) == ["a.png", "b.png", "c.png"]
    assert records["a.png"]["status"] == "ok"
    assert "dangling symbolic link (to missing.png)" in records["b.png"]["reason"]
    assert "not a regular file" in records["c.png"]["reason"]


def test_a_link_loop_or_dangling_link_given_as_the_source_is_said_as_a_folder_says_it(model, tmp_path):
    """Given as SOURCE, both were "no such file, folder, camera or stream", and a name too long a traceback."""
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink("missing.png", tmp_path / "dangling.png")
    (tmp_path / "file.png").write_bytes(b"")
    for name, message in (("loop.png", "a symbolic link loop (to loop.png)"),
                          ("dangling.png", "a dangling symbolic link (to missing.png)"),
                          ("missing.png", "no such file, folder, camera or stream"),
                          ("file.png/x.png", "no such file, folder, camera or stream"),  # a file on the way: ENOTDIR
                          ("x" * 300 + ".png", "cannot be examined (File name too long)")):
        code, output = cli("run", model, tmp_path / name)
        assert code == 1 and f"{name}: {message}" in output and "Traceback" not in output, output
        assert len(output.splitlines()) == 1


def test_a_model_failing_on_one_batch_costs_that_batch_only_and_the_exit_says_so(model, tmp_path, monkeypatch):
    from medmamba_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    real_run = OnnxRuntimeBackend.run

    def run_failing_on_bright_frames(self, batch):
        if batch.mean() > 0:  # frame 1 of the three is white, the others black
            raise MemoryError("out of device memory")
        return real_run(self, batch)

    monkeypatch.setattr(OnnxRuntimeBackend, "run", run_failing_on_bright_frames)
    for index, value in enumerate((0, 255, 0)):
        cv2.imwrite(str(tmp_path / f"{index}.png"), np.full((40, 40, 3), value, np.uint8))
    code, output = cli("run", model, str(tmp_path / "*.png"), "--jsonl", tmp_path / "r.jsonl")
    assert code == 1 and "Traceback" not in output, output
    assert "1 of 3 batches failed in the model, first: the model failed on this batch (MemoryError: out of device memory)" in output
    records = read_jsonl(tmp_path / "r.jsonl")
    assert [r["status"] for r in records] == ["ok", "skipped", "ok"]
    assert records[1]["reason"] == "the model failed on this batch (MemoryError: out of device memory)"


@pytest.mark.parametrize("answer, first, last", [
    (lambda logits: logits[:1], "the model returned 1 row for 4 inputs", "the model returned 1 row for 2 inputs"),
    (lambda logits: np.concatenate([logits, logits]), "the model returned 8 rows for 4 inputs",
     "the model returned 4 rows for 2 inputs"),
    (lambda logits: logits[:, :2], "the model returned 2 logits a row for 3 classes", None),
    (lambda logits: logits[0], "the model returned an output of shape (3,) for 4 inputs, expected (4, 3)",
     "the model returned an output of shape (3,) for 2 inputs, expected (2, 3)")])
def test_a_model_answering_in_another_shape_than_the_batch_fails_that_batch(model, tmp_path, monkeypatch, answer,
                                                                            first, last):
    """A custom backend, a server or an odd ONNX answering 1 row for 4 inputs ended the run with a StopIteration
    traceback after 2 records of 6, and no summary."""
    from medmamba_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    real_run = OnnxRuntimeBackend.run
    monkeypatch.setattr(OnnxRuntimeBackend, "run", lambda self, batch: answer(real_run(self, batch)))
    for index in range(6):
        cv2.imwrite(str(tmp_path / f"{index}.png"), image(index))
    code, output = cli("run", model, str(tmp_path / "*.png"), "--batch", 4, "--jsonl", tmp_path / "r.jsonl")
    assert code == 1 and "Traceback" not in output, output
    assert f"2 of 2 batches failed in the model, first: {first}" in output and "0 frames" in output
    records = read_jsonl(tmp_path / "r.jsonl")
    assert [r["status"] for r in records] == ["skipped"] * 6
    assert [r["reason"] for r in records] == [first] * 4 + [last or first] * 2


def test_non_finite_logits_get_no_label_and_the_jsonl_stays_json(tmp_path):
    nan_model = toy_model(tmp_path / "nan.onnx", scale=(1.0, float("nan"), 1.0))
    cv2.imwrite(str(tmp_path / "x.png"), image())
    code, output = cli("run", nan_model, tmp_path / "x.png", "--jsonl", tmp_path / "r.jsonl")
    assert code == 1 and "no frame could be classified" in output
    # Strict JSON: Python's json would accept the NaN/Infinity tokens other parsers reject.
    (record,) = [json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in the JSONL"))
                 for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert record["status"] == "skipped" and record["labels"] == [] and "non-finite model output" in record["reason"]


@pytest.mark.parametrize("meta, message", [
    ({**GOOD_META, "input_size": [64, 64]}, "input_size is 64×64 but the graph takes 32×32"),
    ({**GOOD_META, "class_names": ["a", "b"]}, "2 class names but the graph outputs 3 classes"),
    ({**GOOD_META, "class_names": ["a", "b", "a"]}, "class names must differ; 'a' is given more than once"),
    ({**GOOD_META, "class_names": []}, "class names must be a non-empty list"),
    ({**GOOD_META, "input_size": [0, 32]}, "input_size must be two positive integers"),
    ({**GOOD_META, "input_size": [-32, 32]}, "input_size must be two positive integers"),
    ({**GOOD_META, "input_size": 32}, "input_size must be two positive integers"),
    ({**GOOD_META, "batch": -1}, "batch must be a positive integer"),
    ({**GOOD_META, "batch": "4"}, "batch must be a positive integer"),
    ({**GOOD_META, "in_chans": 1, "mean": [0.5], "std": [0.5]}, "in_chans is 1 but the graph takes 3 channels"),
    # Accepted, then ignored: preprocessing feeds RGB whatever the field said (and compare passed such a pair).
    ({**GOOD_META, "channel_order": "BGR"}, "channel_order must be RGB, got 'BGR'"),
    # Accepted, then every frame skipped for it, as if the images were at fault.
    ({**GOOD_META, "resize": "bicubic"}, "resize must be bilinear, got 'bicubic'"),
    ({**GOOD_META, "in_chans": 2, "mean": [0.5] * 2, "std": [0.5] * 2}, "in_chans must be 1 or 3, got 2"),
    ({**GOOD_META, "in_chans": 3.0}, "in_chans must be 1 or 3, got 3.0"),
    ({**GOOD_META, "schema_version": "1"}, "metadata schema_version must be an integer, got '1'"),  # a traceback
    ({**GOOD_META, "schema_version": None}, "metadata schema_version must be an integer, got None"),
    ({**GOOD_META, "mean": 0.5}, "incomplete or mistyped metadata"),
    # A zero std divides every pixel by zero: no test gave one, so a check made < 0 passed.
    ({**GOOD_META, "std": [0.5, 0.0, 0.5]}, "std must be positive, got (0.5, 0.0, 0.5)"),
    # One schema past this tool's: read as if it were this one's (no test gave a newer schema).
    ({**GOOD_META, "schema_version": 2}, "metadata schema 2 is newer than this medmamba-edge understands (1)"),
])
def test_metadata_that_does_not_fit_is_one_line(tmp_path, meta, message):
    path = toy_model(tmp_path / "m.onnx", meta)
    cv2.imwrite(str(tmp_path / "x.png"), image())
    code, output = cli("run", path, tmp_path / "x.png")
    assert code == 1 and message in output and str(path) in output and "Traceback" not in output
    assert len(output.splitlines()) == 1


def test_dynamic_batch_metadata_on_a_fixed_batch_graph_is_one_line(tmp_path):
    """A graph of batch 2 whose metadata says dynamic: no test had one, so the check skipping dynamic metadata passed,
    and every batch of another size would fail in the model instead."""
    path = toy_model(tmp_path / "m.onnx", GOOD_META, input_shape=(2, 3, 32, 32), output_shape=(2, 3))
    cv2.imwrite(str(tmp_path / "x.png"), image())
    code, output = cli("run", path, tmp_path / "x.png")
    assert code == 1 and "batch is dynamic but the graph's batch is 2" in output and str(path) in output, output
    assert len(output.splitlines()) == 1


@pytest.mark.parametrize("value, reason", [("1" + "0" * 5000, "Exceeds the limit (4300 digits)"),
                                           ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded")])
def test_metadata_json_past_the_parsers_limits_is_one_line(tmp_path, value, reason):
    """json.loads refuses an integer of over 4,300 digits with a plain ValueError and arrays nested past its limit
    with a RecursionError, not the JSONDecodeError from_json caught: `run` ended in a traceback."""
    path = toy_model(tmp_path / "m.onnx", {**GOOD_META, "schema_version": 0})
    model = onnx.load(str(path))
    model.metadata_props[0].value = model.metadata_props[0].value.replace('"schema_version": 0',
                                                                          f'"schema_version": {value}')
    onnx.save(model, str(path))
    cv2.imwrite(str(tmp_path / "x.png"), image())
    code, output = cli("run", path, tmp_path / "x.png")
    assert code == 1 and "Traceback" not in output and len(output.splitlines()) == 1
    assert output.startswith(f"error: {path}: metadata is not valid JSON ({reason}")


@pytest.mark.parametrize("shape, rank", [(("N",), 1), (("N", 3, 1), 3)])
def test_an_output_of_the_wrong_rank_is_one_line(tmp_path, shape, rank):
    path = toy_model(tmp_path / "m.onnx", output_shape=shape)
    cv2.imwrite(str(tmp_path / "x.png"), image())
    code, output = cli("run", path, tmp_path / "x.png")
    assert code == 1 and f"the graph's output has rank {rank}, expected 2" in output and "Traceback" not in output


def test_a_video_without_a_decodable_frame_is_a_record_and_exit_1(model, tmp_path):
    empty = write_video(tmp_path / "empty.avi", count=0)
    code, output = cli("run", model, empty, "--jsonl", tmp_path / "r.jsonl")
    assert code == 1 and "the video opens but no frame decodes" in output
    (record,) = read_jsonl(tmp_path / "r.jsonl")
    assert record["status"] == "skipped" and "no frame decodes" in record["reason"]


def test_a_fifo_source_is_refused_at_once_and_file_uris_are_percent_decoded(model, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    process = run_cli_process(model, tmp_path / "pipe.png")  # a process, so that a hang is a failure, not a stuck suite
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and "pipe.png: not a regular file" in stderr and "Traceback" not in stderr
    cv2.imwrite(str(tmp_path / "chest x-ray.png"), image())
    code, output = cli("run", model, f"file://{tmp_path}/chest%20x-ray.png", "--jsonl", tmp_path / "r.jsonl")
    assert code == 0, output
    assert read_jsonl(tmp_path / "r.jsonl")[0]["source"].endswith("chest x-ray.png")


def test_special_files_are_written_in_place_as_a_stream(model, tmp_path):
    # The devices are reached through a link in tmp_path or through /proc: if this ever regresses to
    # write-then-rename, the rename replaces the link or fails in /proc, never a device node in /dev (a test
    # run as root once replaced /dev/full with a regular file that way).
    cv2.imwrite(str(tmp_path / "x.png"), image())
    (tmp_path / "full.jsonl").symlink_to("/dev/full")
    code, output = cli("run", model, tmp_path / "x.png", "--jsonl", tmp_path / "full.jsonl")
    assert code == 1 and "full.jsonl: cannot write (No space left on device)" in output and "Traceback" not in output
    assert (tmp_path / "full.jsonl").is_symlink() and (tmp_path / "full.jsonl").is_char_device()
    # A FIFO: a reader on the other end gets the records as they come.
    fifo = tmp_path / "records.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    code, output = cli("run", model, tmp_path / "x.png", "--jsonl", fifo)
    reader.join(timeout=30)
    assert code == 0, output
    assert json.loads(received[0])["status"] == "ok" and fifo.is_fifo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # The process's stdout, by its /proc name: the records arrive on stdout. /dev/stdout is the same link.
    process = run_cli_process(model, tmp_path / "x.png", "--console", "none", "--jsonl", "/proc/self/fd/1")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[0])["source"] == str(tmp_path / "x.png")
    for stream in ("/dev/stdout", "/dev/stderr", "/dev/fd/1"):
        output = AtomicOutput(stream)
        output.discard()  # no temporary file: nothing to remove, also if this ever regresses
        assert output.in_place and output.write_path == Path(stream)


def test_two_outputs_to_one_path_do_not_share_a_temporary_file(tmp_path):
    target = tmp_path / "r.jsonl"
    first, second = JsonlSink(target), JsonlSink(target)
    for seq in range(5):
        first.write(Record(seq, "first", 0, 0.0, "ok"), None, 0.0)
        second.write(Record(seq, "second", 0, 0.0, "ok"), None, 0.0)
    first.close()
    assert [r["source"] for r in read_jsonl(target)] == ["first"] * 5
    second.close()  # the last rename wins, whole
    assert [r["source"] for r in read_jsonl(target)] == ["second"] * 5
    assert os.listdir(tmp_path) == ["r.jsonl"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_bytes_atomically(tmp_path / "a.json", b"{}")
        sink = JsonlSink(tmp_path / "b.jsonl")
        sink.close()
    finally:
        os.umask(previous)
    for name in ("a.json", "b.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_two_writes_committing_at_once_leave_the_applications_umask(tmp_path, monkeypatch):
    """Two outputs committed at once on two threads read the umask for their modes: read by setting it and setting
    it back, the second read the first's 0o022 while it was set and put that back last. Driven in that order."""
    umask, reads = os.umask, {}
    first_set, first_done = threading.Event(), threading.Event()

    def interleaved(mask):
        before = umask(mask)
        if threading.current_thread().name == "first" and not first_set.is_set():
            first_set.set()
            assert second_set.wait(30)
        elif threading.current_thread().name == "second" and not second_set.is_set():
            second_set.set()
            assert first_done.wait(30)
        return before

    second_set = threading.Event()
    monkeypatch.setattr(os, "umask", interleaved)

    def commit(name):
        write_bytes_atomically(tmp_path / f"{name}.json", b"{}")
        reads[name] = (tmp_path / f"{name}.json").stat().st_mode & 0o777
        if name == "first":
            first_done.set()

    previous = umask(0o077)
    try:
        first = threading.Thread(target=commit, args=("first",), name="first")
        second = threading.Thread(target=commit, args=("second",), name="second")
        first.start()
        first_set.wait(1)  # reached only where the umask is read by setting it
        second.start()
        first.join(30)
        first_done.set()
        second.join(30)
        after = umask(0o077)
    finally:
        umask(previous)
    assert (reads, after) == ({"first": 0o600, "second": 0o600}, 0o077)


def test_a_failed_write_keeps_only_complete_records(tmp_path, monkeypatch):
    output = AtomicOutput(tmp_path / "r.jsonl")
    output.write(b'{"seq": 0}\n')
    real = output.handle

    class FullDisk:
        """Writes 4 bytes of the next record, then the disk is full."""
        def __init__(self):
            self.calls = 0

        def write(self, data):
            self.calls += 1
            if self.calls == 1:
                return real.write(data[:4])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(real, name)

    output.handle = FullDisk()
    with pytest.raises(files.OutputError, match=r"r.jsonl: cannot write \(No space left on device\); the output ends "
                                                r"after the last complete record \(11 bytes\)"):
        output.write(b'{"seq": 1}\n')
    output.handle = real
    output.commit()
    assert (tmp_path / "r.jsonl").read_bytes() == b'{"seq": 0}\n'


def test_disk_full_mid_run_is_one_error_with_the_complete_lines_kept(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        cv2.imwrite(str(folder / f"{i:02d}.png"), image(i))
    jsonl = tmp_path / "r.jsonl"

    def small_files():  # the kernel's file-size limit: writes past 3000 bytes fail with EFBIG, part-way
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    process = run_cli_process(model, folder, "--console", "none", "--jsonl", jsonl, preexec_fn=small_files)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback" not in stderr and stderr.count("error:") == 1
    assert "r.jsonl: cannot write (File too large); the output ends after the last complete record" in stderr
    text = jsonl.read_text()
    assert text.endswith("\n") and 0 < len(text) <= 3000
    assert [r["seq"] for r in read_jsonl(jsonl)] == list(range(text.count("\n")))
    assert "frames" in stdout and "FPS" in stdout  # the summary is still printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "r.jsonl"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_like_ctrl_c(model, tmp_path, signum):
    video = write_video(tmp_path / "loop.avi", count=10)
    jsonl = tmp_path / "records.jsonl"
    # Default dispositions in the child: under nohup (CI started so) SIGHUP arrives ignored, and the run rightly
    # keeps it ignored (the test below).
    process = run_cli_process(model, video, "--loop", "--console", "none", "--jsonl", jsonl,
                              preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    wait_for_records(process, tmp_path, 10)  # ~2 kB of records
    process.send_signal(signum)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"still running 60 s after {signal.Signals(signum).name}; stderr: {stderr[-2000:]}")
    assert process.returncode == 0, stderr
    records = read_jsonl(jsonl)
    assert len(records) >= 5 and [r["seq"] for r in records] == list(range(len(records)))
    assert f"stopping on {signal.Signals(signum).name}" in stderr and "FPS" in stdout
    assert f"; stopped by {signal.Signals(signum).name} before the source ended" in stdout  # not a finished run's
    assert not list(tmp_path.glob(".records.*"))


@pytest.mark.parametrize("signals", [1, 2], ids=["stop", "stop-then-abort"])
def test_a_stop_signal_while_the_first_file_decodes_exits_0_with_its_record(model, tmp_path, signals):
    """An 8000×8000 PNG decodes for seconds. A stop then once left the capture thread inside OpenCV when the
    process exited (SIGABRT, 'terminate called without an active exception'), the file without a record, or,
    nothing classified yet, exit 1 'no frame could be classified'; a signal before the loop began, a .partial file
    and exit 130. A second signal, the abort, landed in the wait for that thread and ended in the same SIGABRT
    (exit 134); it exits 130 with the outputs closed."""
    folder = tmp_path / "big"
    folder.mkdir()
    pixels = np.zeros((8000, 8000, 3), np.uint8)
    pixels[::7], pixels[:, ::5] = 255, 128
    cv2.imwrite(str(folder / "big.png"), pixels)
    jsonl = tmp_path / "r.jsonl"
    process = run_cli_process(model, folder, "--console", "none", "--jsonl", jsonl)
    while "source:" not in process.stderr.readline():  # printed once the outputs are open
        assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGINT)
    if signals == 2:
        time.sleep(0.5)  # the run waits for the file being decoded
        process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == (0 if signals == 1 else 130), stderr
    assert "terminate called" not in stderr and "error:" not in stderr
    if signals == 1:
        [record] = read_jsonl(jsonl)
        assert record["source"].endswith("big.png") and record["status"] in ("ok", "skipped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "r.jsonl"]


def test_an_abort_while_the_run_waits_for_the_capture_thread_closes_the_outputs_and_says_so(model):
    """The second stop signal lands in Capture.stop()'s wait for a thread still decoding (inside OpenCV): the
    KeyboardInterrupt then ended the process through Python's exit, which aborts (SIGABRT, exit 134) when that
    thread comes back during it. run() marks the interrupt (a plain KeyboardInterrupt: uncaught, it still exits 130;
    a subclass exits 1), the outputs closed, and the command line
    ends with os._exit(130) on it (test_a_stop_signal_while_the_first_file_decodes); a library caller's own
    handler still runs (run() once called os._exit itself). Whether the thread comes back in time is a race, so
    here it sleeps."""
    from medmamba_edge.runtime.backends import open_backend
    from medmamba_edge.runtime.loop import RunOptions, capture_still_running, run
    from medmamba_edge.runtime.sources import Frame, Source

    decoded = threading.Event()

    class DecodingForLong(Source):
        live, description = False, "one huge file"

        def frames(self, stride=1):
            decoded.wait(30)  # as an 8000×8000 PNG inside OpenCV: no stop request reaches it
            yield Frame("huge.png", 0, time.time(), image())

    class Closing:
        closed = False

        def write(self, record, image, fps):
            pass

        def close(self):
            Closing.closed = True

    for delay in (0.3, 0.8):  # a stop, then the abort while the run waits for the capture thread
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        run(open_backend(model), DecodingForLong(), [Closing()], RunOptions(), notify=lambda message: None)
        outcome = "returned"
    except KeyboardInterrupt as interrupt:
        outcome = "marked" if capture_still_running(interrupt) else "unmarked: Python's exit, the thread in OpenCV"
    finally:
        decoded.set()
    assert outcome == "marked" and Closing.closed


def test_an_abort_while_one_output_closes_still_puts_the_others_in_place(tmp_path):
    """Ctrl-C twice on `run STREAM --save-video o.mp4 --jsonl o.jsonl`: the second signal, landing while the video was
    read back, left o.jsonl as .o.XXXX.partial.jsonl (exit 130), its records out of sight, 1 run in 4 on this VM."""
    from medmamba_edge.runtime.sinks import Outputs

    class VideoReadBack:
        def write(self, record, image, fps):
            pass

        def close(self):
            raise KeyboardInterrupt  # the second signal, arriving here

    records = JsonlSink(tmp_path / "o.jsonl")
    outputs = Outputs([VideoReadBack(), records])
    outputs.write(Record(0, "http://cam/stream", 0, time.time(), "ok", ["a"], [1.0]), None, 0.0)
    with pytest.raises(KeyboardInterrupt):
        outputs.close()
    assert [r["source"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["http://cam/stream"]
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


@pytest.mark.parametrize("first", [(200, 9000), (1, 1)], ids=["9000-wide", "1x1"])
def test_save_video_takes_any_image_size(model, tmp_path, first):
    """The mp4v encoder refuses a side over 8191 (or of 1 pixel): a valid first image made the video stop the whole
    run, with OpenCV's own error lines, the later files unread."""
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "00.png"), image(0, (*first, 3)))
    for i in range(1, 4):
        cv2.imwrite(str(folder / f"{i:02d}.png"), image(i, (64, 64, 3)))
    video, jsonl = tmp_path / "v.mp4", tmp_path / "r.jsonl"
    process = run_cli_process(model, folder, "--console", "none", "--save-video", video, "--jsonl", jsonl)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and stderr.count("\n") == 1 and "source:" in stderr, stderr  # no OpenCV lines
    assert [r["status"] for r in read_jsonl(jsonl)] == ["ok"] * 4
    assert int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT)) == 4


def test_a_stop_signal_arriving_inside_notify_does_not_reenter_it():
    """A stop signal lands between two bytecodes of the main thread, possibly inside notify itself (`serve` once
    died when SIGTERM arrived while rich's console was importing its emoji table for the "serving" line)."""
    from medmamba_edge.runtime.loop import stop_on_signals

    printing, messages = threading.Lock(), []

    def notify(message):  # a printer that, like a console mid-print, cannot be entered twice
        if not printing.acquire(timeout=5):
            raise RuntimeError("notify re-entered")
        try:
            messages.append(message)
            if message == "serving":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler runs here, inside notify
        finally:
            printing.release()

    with stop_on_signals(notify) as stopping:
        notify("serving")
        assert stopping.is_set()
    assert messages == ["serving", "stopping on SIGTERM: finishing the current batch and closing outputs (again to abort)"]


def test_an_ignored_sighup_stays_ignored_as_under_nohup(model, tmp_path):
    video = write_video(tmp_path / "clip.avi", count=10)
    jsonl = tmp_path / "records.jsonl"
    process = run_cli_process(model, video, "--max-frames", 3000, "--loop", "--console", "none", "--jsonl", jsonl,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_records(process, tmp_path, 1, every=0.01)
    assert process.poll() is None  # the hangup arrives mid-run
    process.send_signal(signal.SIGHUP)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopping" not in stderr and len(read_jsonl(jsonl)) == 3000


def test_latency_says_what_it_measures(model, tmp_path):
    cv2.imwrite(str(tmp_path / "x.png"), image())
    code, output = cli("run", model, tmp_path / "x.png")
    assert code == 0, output
    assert "ms capture→result)" in output and "capture→result latency p50/p95/p99" in output


def test_an_output_refused_at_the_start_leaves_no_file_or_folder_behind(model, tmp_path):
    """The folders an output created for itself (new/sub/ of --jsonl new/sub/r.jsonl) stayed; an empty folder
    that was there before is the user's and stays."""
    cv2.imwrite(str(tmp_path / "x.png"), image())
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "old").mkdir()
    code, output = cli("run", model, tmp_path / "x.png", "--save-video", tmp_path / "old" / "v.mp4", "--jsonl",
                       tmp_path / "new" / "sub" / "r.jsonl", "--csv", tmp_path / "folder.csv")
    assert code == 1 and "folder.csv: is a folder, expected a file name" in output and "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.csv", "old", "x.png"]
    assert not list((tmp_path / "old").iterdir())


def test_an_output_under_a_file_says_which_part_is_not_a_folder(model, tmp_path):
    """mkdir's FileExistsError read "cannot write there (File exists)" though nothing had the output's name."""
    cv2.imwrite(str(tmp_path / "x.png"), image())
    (tmp_path / "afile").write_text("x")
    for option in ("--jsonl", "--csv", "--save-video"):
        target = tmp_path / "afile" / "sub" / ("r.mp4" if option == "--save-video" else "r.out")
        code, output = cli("run", model, tmp_path / "x.png", option, target)
        assert code == 1 and f"{target}: {tmp_path / 'afile'} is not a folder" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "x.png"]
    (tmp_path / "loop").symlink_to("loop")  # a link in a loop is no folder either (it read "File exists" too)
    code, output = cli("run", model, tmp_path / "x.png", "--jsonl", tmp_path / "loop" / "r.jsonl")
    assert code == 1 and f"{tmp_path / 'loop'} is not a folder" in output, output


def test_a_folders_images_are_resolved_once_whatever_the_number_of_outputs(tmp_path, monkeypatch):
    """Checking that no output replaces an input resolved every image's path once for each output: --jsonl, --csv and
    --save-video over 20 000 images took 1.3 s of the run's start where once takes 0.4 s."""
    from medmamba_edge.runtime.sinks import open_outputs
    from medmamba_edge.runtime.sources import open_source

    scan = require_shared("data", "busi", "benign", "benign (1).png")
    folder = tmp_path / "scans"
    folder.mkdir()
    for k in range(40):
        os.link(scan, folder / f"{k:02d}.png")
    images = open_source(str(folder)).inputs
    resolved, realpath = [], os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda path, **kw: resolved.append(str(path)) or realpath(path, **kw))
    sinks = open_outputs("none", False, tmp_path / "r.avi", 5.0, False, tmp_path / "r.jsonl", tmp_path / "r.csv",
                         reads=images)
    for sink in sinks[1:]:
        sink.discard()
    assert len(images) == 40 and sorted(resolved.count(str(path)) for path in images) == [1] * 40


def test_an_output_onto_an_input_or_another_output_is_refused_before_anything_is_written(model, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    cv2.imwrite(str(folder / "x.png"), image())
    video = write_video(tmp_path / "clip.avi", count=3)
    before = {p: p.read_bytes() for p in (model, folder / "x.png", video)}
    for source, args, message in [
        (folder, ["--jsonl", folder / "x.png"], "x.png: --jsonl would overwrite a file this run reads"),
        (folder, ["--csv", model], "toy.onnx: --csv would overwrite a file this run reads"),
        (video, ["--save-video", video], "clip.avi: --save-video would overwrite a file this run reads"),
        (folder, ["--jsonl", tmp_path / "r.out", "--csv", tmp_path / "r.out"], "r.out: given to both --jsonl and --csv"),
        (folder, ["--threads", "0"], "--threads must be between 1 and"),
        (folder, ["--threads", "100000"], "--threads must be between 1 and"),
    ]:
        code, output = cli("run", model, source, *args)
        assert code == 1 and message in output and len(output.splitlines()) == 1, output
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.avi", "scans"]
    assert [p.name for p in folder.iterdir()] == ["x.png"]
    # Nor one stream named twice: its JSONL and CSV lines came out interleaved, neither format, and 'wrote
    # /dev/stdout' twice. Two descriptors the user joined (2>&1) are two outputs, written in place.
    for second in ("/dev/stdout", "/dev/fd/1"):
        process = run_cli_process(model, folder / "x.png", "--jsonl", "/dev/stdout", "--csv", second)
        stdout, stderr = process.communicate(timeout=120)
        assert (process.returncode, stdout, stderr) == (1, "", f"error: {second}: given to both --jsonl and --csv\n")
    # /dev/null discards whatever reaches it, as often as it is named
    process = run_cli_process(model, folder / "x.png", "--jsonl", "/dev/null", "--csv", "/dev/null")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "\n1 frame (0 abstained)" in stdout, stderr
    process = run_cli_process(model, folder / "x.png", "--console", "none", "--jsonl", "/dev/stdout", "--csv",
                              "/dev/stderr", stderr=subprocess.STDOUT)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0, stdout
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in records] == ["ok"] and "\nseq,source," in "\n" + stdout
    # but not a file and a stream redirected onto it: the stream's part was lost in the file's rename, and which
    # was refused depended on the options' order
    with open(tmp_path / "r.txt", "w") as redirected:
        process = run_cli_process(model, folder / "x.png", "--jsonl", tmp_path / "r.txt", "--csv", "/dev/stdout",
                                  stdout=redirected)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and "given to both --jsonl and --csv" in stderr, stderr


def test_records_piped_through_stdout_are_json_lines_only(model, tmp_path):
    """docs/runtime.md pipes `--jsonl /dev/stdout` to another program: the summary and 'wrote' lines followed
    the records on stdout, and broke every JSON reader of the pipe."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(folder / name), image())
    escape = tmp_path / "r\x1b[2Jx.csv"  # on stderr as on every stderr line: the name's ESC as an escape
    process = run_cli_process(model, folder, "--jsonl", "/dev/stdout", "--csv", escape)  # --console auto: quiet
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert [json.loads(line)["status"] for line in stdout.splitlines()] == ["ok", "ok"]
    assert "2 frames" in stderr and "wrote /dev/stdout" in stderr
    assert "r\\u001b[2Jx.csv" in stderr and "\x1b" not in stderr
    # `--jsonl F > F`: F is renamed into place at the end, so the summary must be routed before.
    with open(tmp_path / "same.jsonl", "w") as same:
        process = run_cli_process(model, folder, "--jsonl", tmp_path / "same.jsonl", stdout=same)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "2 frames" in stderr, stderr
    assert [json.loads(line)["status"] for line in (tmp_path / "same.jsonl").read_text().splitlines()] == ["ok", "ok"]
    # A file output keeps its summary on stdout, as before.
    process = run_cli_process(model, folder, "--console", "none", "--jsonl", tmp_path / "r.jsonl")
    stdout, _ = process.communicate(timeout=120)
    assert "2 frames" in stdout and f"wrote {tmp_path / 'r.jsonl'}" in stdout


def test_stdout_redirected_to_a_file_takes_records_and_console_lines_without_overwriting(model, tmp_path):
    """/dev/stdout reopened got an offset of its own where the shell's `>` made stdout a regular file: the console's
    lines overwrote records (run), the tables the JSON report (evaluate)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), image(i))
    with open(tmp_path / "out.txt", "w") as out:
        process = run_cli_process(model, folder, "--console", "frame", "--jsonl", "/dev/stdout", stdout=out)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines if line.startswith("{")] == [0, 1, 2, 3]
    assert sum(line.startswith(str(folder)) for line in lines) == 4  # the console's line per frame, each kept


def test_output_names_up_to_the_file_systems_limit_are_written_and_a_longer_one_is_one_line(model, tmp_path):
    # The temporary file beside each output is named after it: a name near the limit must not make that one too long.
    cv2.imwrite(str(tmp_path / "x.png"), image())
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    jsonl = tmp_path / ("r" * (limit - len(".jsonl")) + ".jsonl")
    csv_path = tmp_path / ("notes." + "n" * (limit - len("notes.")))  # a "suffix" no container has, as long as it gets
    video = tmp_path / ("é" * ((limit - len(".avi")) // 2) + ".avi")  # two bytes a character; the suffix picks the codec
    code, output = cli("run", model, tmp_path / "x.png", "--jsonl", jsonl, "--csv", csv_path, "--save-video", video)
    assert code == 0, output
    assert [r["status"] for r in read_jsonl(jsonl)] == ["ok"] and csv_path.read_text().startswith("seq,source,")
    assert cv2.VideoCapture(str(video)).read()[0]
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "x.png", jsonl, csv_path, video])
    too_long = tmp_path / ("r" * (limit + 1 - len(".jsonl")) + ".jsonl")
    code, output = cli("run", model, tmp_path / "x.png", "--jsonl", too_long)
    assert code == 1 and output == f"error: {too_long}: cannot write there (File name too long)\n", output
    for check in (files.check_writable, lambda path: files.check_writable(path, folder=True)):
        with pytest.raises(files.OutputError, match=r"cannot write there \(File name too long\)"):
            check(too_long)


def test_a_folder_to_make_whose_name_is_too_long_is_refused_first_and_leaves_nothing(model, tmp_path):
    """check_writable never looked at the folders still to be made (an export ran to its end, then failed), and the
    refused output left the folders made before the one too long."""
    cv2.imwrite(str(tmp_path / "x.png"), image())
    deep = tmp_path / "new" / ("z" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    for path, folder in ((deep / "m.onnx", False), (deep / "repository", True)):
        with pytest.raises(files.OutputError, match=r"cannot write there \(File name too long\)"):
            files.check_writable(path, folder=folder)
    code, output = cli("run", model, tmp_path / "x.png", "--jsonl", deep / "r.jsonl")
    assert code == 1 and "File name too long" in output and output.count("\n") == 1, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    made = files.missing_folders(deep)  # what a write that got past the check would make, and fail at
    with pytest.raises(OSError):
        deep.mkdir(parents=True)
    files.remove_empty_folders(made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_only_outputs_written_whole_are_reported_as_written(model, tmp_path):
    cv2.imwrite(str(tmp_path / "x.png"), image())
    (tmp_path / "full.jsonl").symlink_to("/dev/full")
    code, output = cli("run", model, tmp_path / "x.png", "--jsonl", tmp_path / "full.jsonl", "--csv", tmp_path / "r.csv")
    assert code == 1 and "full.jsonl: cannot write (No space left on device)" in output, output
    assert f"wrote {tmp_path / 'r.csv'}\n" in output and "wrote " + str(tmp_path / "full.jsonl") not in output
    # Not one frame for the video: no file, and no word of one.
    (tmp_path / "broken.png").write_bytes(png_header(40, 40)[:30])
    code, output = cli("run", model, tmp_path / "broken.png", "--save-video", tmp_path / "v.mp4")
    assert code == 1 and "wrote" not in output and not (tmp_path / "v.mp4").exists(), output


def test_file_names_reach_the_console_with_control_characters_escaped(model, tmp_path):
    # OSC (retitle the terminal), BEL, CSI 2J (clear the screen) and the one-byte C1 CSI.
    name = "\x1b]0;pwned\x07\x1b[2Jx\x9b1m.png"
    cv2.imwrite(str(tmp_path / "x.png"), image())
    (tmp_path / "x.png").rename(tmp_path / name)
    code, output = cli("run", model, tmp_path, "--console", "frame")
    assert code == 0, output
    assert f"{tmp_path}/\\u001b]0;pwned\\u0007\\u001b[2Jx\\u009b1m.png: " in output, output
    assert not any(c in output for c in "\x1b\x07\x9b"), output
    code, output = cli("run", model, tmp_path / f"missing{name}")  # and in a stderr line, an error's
    assert code == 1 and "missing\\u001b]0;pwned\\u0007\\u001b[2Jx\\u009b1m.png: no image or DICOM file matches" in output, output
    assert not any(c in output for c in "\x1b\x07\x9b"), output


def _folder_of_images(folder, count=30, shape=(40, 40, 3)):
    folder.mkdir()
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:02d}.png"), image(i, shape))
    return folder


def test_a_console_that_cannot_be_written_ends_the_run_with_its_files_complete(model, tmp_path):
    """`run ... | head -1`: the reader goes, stdout's next write fails (EPIPE); the run stops as for a full disk,
    and the JSONL is complete under its name. Once, the error escaped as a traceback and the JSONL stayed hidden."""
    jsonl = tmp_path / "r.jsonl"
    process = run_cli_process(model, _folder_of_images(tmp_path / "images"), "--console", "frame", "--jsonl", jsonl)
    assert process.stdout.readline().strip()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stdout: cannot write (Broken pipe)" in errors[0], stderr
    # The summary and the file's own line, once thrown away with the dead stdout, come on stderr.
    assert f"wrote {jsonl}" in stderr and " frames (" in stderr, stderr
    records = read_jsonl(jsonl)
    assert records and [r["seq"] for r in records] == list(range(len(records)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "r.jsonl"]


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_a_video_the_disk_cannot_hold_is_an_error_not_a_success(model, tmp_path, suffix):
    """OpenCV's VideoWriter drops frames it cannot write with a WARN line each (a flood on a full disk), and before
    OpenCV 5 no other word: the container, read back, tells. What an AVI holds is kept, as a cut JSONL is; an MP4 cut
    short does not play (its index comes last), and replaced the last run's good video. Where write() says a frame
    failed (OpenCV 5), the run stops there, as for a JSONL on a full disk, instead of running to the end."""
    video = tmp_path / f"v{suffix}"
    earlier = b"an earlier run's video"
    video.write_bytes(earlier)

    def small_files():  # writes past 20 kB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))

    # Frames of 200 × 200 noise: FFmpeg reports those it cannot write (with small ones only its buffer's flush fails)
    images = _folder_of_images(tmp_path / "images", shape=(200, 200, 3))
    process = run_cli_process(model, images, "--console", "none", "--save-video", video, preexec_fn=small_files)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    source_line, error = stderr.splitlines()  # no OpenCV WARN line per failed frame
    assert "source:" in source_line and error.startswith("error:") and "wrote" not in stdout, stderr
    classified = int(stdout.split(" frames")[0])
    assert classified < 30 if int(cv2.__version__.split(".")[0]) >= 5 else classified == 30  # stopped at the failure
    if suffix == ".avi":
        assert f"v.avi: cannot write the video (disk full?): the file holds less than its {classified} frames" in error
        assert cv2.VideoCapture(str(video)).read()[0]
    else:
        assert "v.mp4: cannot write the video (disk full?): what was written does not play, so v.mp4 was left as it " \
               "was" in error
        assert video.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", video.name]


def test_run_summary_latency_percentiles_are_within_half_a_percent_in_bounded_memory():
    from medmamba_edge.runtime.sinks import LatencyHistogram

    values = np.random.default_rng(0).lognormal(3, 1.5, 200_000)
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(float(value))
    exact = np.percentile(values, [50, 95, 99], method="nearest")
    assert np.allclose(histogram.percentiles([50, 95, 99]), exact, rtol=0.005)
    assert len(histogram.counts) < 2000  # a few thousand counters however long the run
    one = LatencyHistogram()
    one.add(0.0)
    assert one.percentiles([50]) == [pytest.approx(0.001, rel=0.01)]  # the floor: a microsecond


def test_the_video_read_back_passes_whole_files_of_every_container_and_fails_a_cut_one(tmp_path):
    from medmamba_edge.runtime.sinks import VideoSink, _holds_frames

    frames = [image(i, (48, 64, 3)) for i in range(200)]
    # 712 fps: where Matroska lists 199 of 200 frames (its count is duration x rate)
    for suffix, fps in ((".avi", 5.0), (".mp4", 29.97), (".mov", 7.3), (".mkv", 712.0), (".mkv", 649.0)):
        path = tmp_path / f"v{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*VideoSink.FOURCC[suffix]), fps, (64, 48))
        for frame in frames:
            writer.write(frame)
        writer.release()
        assert _holds_frames(path, 200), (suffix, fps)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        assert not _holds_frames(cut, 200), (suffix, fps)


def test_a_closed_stdout_is_a_place_to_write_nothing(model, tmp_path):
    """`run ... >&-`: Python's sys.stdout is None; the records still go to their file, the exit is 0."""
    jsonl = tmp_path / "r.jsonl"
    process = run_cli_process(model, _folder_of_images(tmp_path / "images", count=3), "--jsonl", jsonl,
                              stdout=None, preexec_fn=lambda: os.close(1))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert [r["status"] for r in read_jsonl(jsonl)] == ["ok"] * 3
    # Records sent to that stdout go nowhere, as its other lines (written through fd 1 they met a closed or
    # reused descriptor: an AttributeError in the sink, exit 1).
    process = run_cli_process(model, tmp_path / "images", "--jsonl", "/dev/stdout", stdout=None,
                              preexec_fn=lambda: os.close(1))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr and "error" not in stderr, stderr


def test_an_output_bind_mounted_over_a_file_is_written_into_it(tmp_path):
    """`docker run -v host.jsonl:/out/r.jsonl`: the target is a mount point, which no rename replaces (EBUSY); the
    records went nowhere but a hidden .partial file, reported by a raw OSError after the whole run."""
    host, target = tmp_path / "host.jsonl", tmp_path / "r.jsonl"
    host.write_bytes(b"old\n")
    target.write_bytes(b"")
    mount = subprocess.run(["mount", "--bind", str(host), str(target)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount a file here ({mount.stderr.strip() or 'mount failed'})")
    try:
        output = AtomicOutput(target)
        output.write(b'{"seq": 0}\n')
        output.commit()
        assert output.complete and target.read_bytes() == b'{"seq": 0}\n'
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert host.read_bytes() == b'{"seq": 0}\n' and [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_a_bind_mounted_target_on_a_full_disk_keeps_its_old_content(tmp_path):
    """The content is written over a mount point's in place: with too little room, the old content stays whole (it
    was truncated first, and the target ended in a torn record) and the new one is where the error says."""
    disk, target = tmp_path / "disk", tmp_path / "r.jsonl"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        old = b"".join(b'{"old": %d}\n' % i for i in range(800))  # 8.8 kB of the 16 kB
        (disk / "host.jsonl").write_bytes(old)
        target.write_bytes(b"")
        subprocess.run(["mount", "--bind", str(disk / "host.jsonl"), str(target)], check=True)
        try:
            output = AtomicOutput(target)  # the temporary file beside the target: on tmp_path, not the small disk
            output.write(b"".join(b'{"seq": %d}\n' % i for i in range(3000)))  # 40 kB
            with pytest.raises(files.OutputError, match=r"r\.jsonl: cannot put the output in place \(No space left"):
                output.commit()
            assert target.read_bytes() == old and output.write_path.stat().st_size > 40000
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_output_that_cannot_be_put_in_place_names_where_it_is_kept(tmp_path):
    target = tmp_path / "r.jsonl"
    output = AtomicOutput(target)
    output.write(b'{"seq": 0}\n')
    target.mkdir()  # made after the output opened: os.replace cannot put a file over a folder
    with pytest.raises(files.OutputError, match=r"r\.jsonl: cannot put the output in place \(.*\); it is kept as .*partial"):
        output.commit()
    assert output.write_path.read_bytes() == b'{"seq": 0}\n'


class SyncLog:
    """os.fsync, os.replace and os.rename, recorded in order: ("fsync", the descriptor's path, its size) and
    ("rename", the target); ``failure`` (an errno) makes fsync fail with it after recording the call."""

    def __init__(self, monkeypatch, failure=None):
        self.events, self.failure, real_fsync, real_replace, real_rename = [], failure, os.fsync, os.replace, os.rename

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
            if self.failure is not None:
                raise OSError(self.failure, os.strerror(self.failure))
            real_fsync(fd)

        def renamer(real):
            def rename(source, target):
                real(source, target)
                self.events.append(("rename", str(target)))
            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))

    def paths(self, kind="fsync"):
        return [event[1] for event in self.events if event[0] == kind]


def test_a_commit_fsyncs_the_file_before_its_rename_and_the_folders_after(tmp_path, monkeypatch):
    """Renamed unsynced, a power cut could leave an empty or torn file under the target name (ext4 writes the rename
    before delayed-allocation data), and the rename itself could be lost with the folder's entry."""
    log = SyncLog(monkeypatch)
    target = tmp_path / "new" / "m.onnx"  # a folder made for it: its entry in tmp_path must be on the disk too
    write_bytes_atomically(target, b"model" * 1000)
    partial = next(event[1] for event in log.events if event[0] == "fsync")
    assert ".m." in partial and partial.endswith(".partial.onnx")
    assert log.events == [("fsync", partial, 5000), ("rename", str(target)),
                          ("fsync", str(tmp_path / "new"), os.stat(tmp_path / "new").st_size),
                          ("fsync", str(tmp_path), os.stat(tmp_path).st_size)]
    assert target.read_bytes() == b"model" * 1000


def test_records_are_fsynced_once_an_interval_while_written_and_at_close(tmp_path, monkeypatch):
    """A night's records stayed in the page cache until the kernel wrote them back (30 s and more with delayed
    allocation, on an SD card longer): a power cut lost them. Now at most SYNC_INTERVAL_S of them are lost."""
    now = [1000.0]
    monkeypatch.setattr(files, "monotonic", lambda: now[0])
    log = SyncLog(monkeypatch)
    sink = JsonlSink(tmp_path / "r.jsonl")
    sizes = []
    for seq in range(12):  # one record every 0.3 s
        sink.write(Record(seq, "scan.png", 0, 0.0, "ok", ["a"], [1.0]), None, 0.0)
        sizes.append(sink.output.written)
        now[0] += 0.3 * files.SYNC_INTERVAL_S
    synced = [event[2] for event in log.events if event[0] == "fsync"]
    # the first record at once, then the first record 1 s or more after the last fsync: records 0, 4 and 8
    assert synced == [sizes[0], sizes[4], sizes[8]]
    sink.close()
    partial = log.paths()[0]
    assert log.events[3:] == [("fsync", partial, sizes[-1]), ("rename", str(tmp_path / "r.jsonl")),
                              ("fsync", str(tmp_path), os.stat(tmp_path).st_size)]
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 12


def test_only_outputs_on_a_disk_are_fsynced_and_streams_never_fail_for_it(tmp_path, monkeypatch):
    """A FIFO, a pipe or /dev/null cannot be fsynced (EINVAL) and holds nothing a power cut could lose; a descriptor
    that is a regular file (/dev/stdout redirected to one: `run --jsonl /dev/stdout > r.jsonl`) is on the disk."""
    log = SyncLog(monkeypatch)
    fifo = tmp_path / "records.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader there: the writer's open does not wait
    redirected = tmp_path / "redirected.jsonl"
    with open(redirected, "wb") as file:
        for stream in (fifo, Path("/dev/null"), Path(f"/dev/fd/{file.fileno()}")):
            sink = JsonlSink(stream)
            sink.write(Record(0, "scan.png", 0, 0.0, "ok", ["a"], [1.0]), None, 0.0)
            sink.close()
            assert sink.output.complete
    assert json.loads(os.read(reader, 4096))["source"] == "scan.png"
    os.close(reader)
    # the redirected file twice: its first record, and at close; nothing renamed, so no folder
    assert log.paths() == [str(redirected)] * 2 and log.paths("rename") == []
    assert read_jsonl(redirected)[0]["seq"] == 0


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF])
def test_a_file_system_that_cannot_fsync_is_written_as_before(tmp_path, monkeypatch, refusal):
    """EINVAL, EOPNOTSUPP or EBADF (some FUSE and network mounts; a folder's descriptor on some) is no failing disk:
    the output is written as it was before fsync was asked for."""
    log = SyncLog(monkeypatch, failure=refusal)
    sink = JsonlSink(tmp_path / "r.jsonl")
    sink.write(Record(0, "scan.png", 0, 0.0, "ok", ["a"], [1.0]), None, 0.0)
    sink.close()
    write_bytes_atomically(tmp_path / "m.json", b"{}")
    assert sink.output.complete and read_jsonl(tmp_path / "r.jsonl")[0]["seq"] == 0
    assert (tmp_path / "m.json").read_bytes() == b"{}" and sorted(os.listdir(tmp_path)) == ["m.json", "r.jsonl"]
    assert len(log.paths()) == 5  # tried each time: the record, and each commit's file and folder


def test_outputs_are_written_where_os_has_no_folder_descriptors_pathconf_or_fallocate(model, tmp_path, monkeypatch):
    """Windows' os has no O_DIRECTORY and no pathconf, macOS' no posix_fallocate: every output (a new folder's, and one
    written into a busy target) ended in an AttributeError there."""
    for name in ("O_DIRECTORY", "pathconf", "posix_fallocate"):
        monkeypatch.delattr(os, name)
    data = model.read_bytes()
    target = tmp_path / "new" / "m.onnx"
    files.check_writable(target)
    write_bytes_atomically(target, data)
    assert target.read_bytes() == data and os.listdir(tmp_path / "new") == ["m.onnx"]
    real_replace = os.replace

    def busy(source, destination):  # a file bind-mounted into a container
        if Path(destination) == target:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", busy)
    write_bytes_atomically(target, data[:100])
    assert target.read_bytes() == data[:100] and os.listdir(tmp_path / "new") == ["m.onnx"]


def test_a_failing_fsync_at_the_end_keeps_the_old_output(tmp_path, monkeypatch):
    """EIO from fsync (a failing eMMC or SD card): the new content may not be on the disk, so it does not replace the
    target's old content, and the error says where it is."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    SyncLog(monkeypatch, failure=errno.EIO)
    with pytest.raises(files.OutputError, match=r"^\S*m\.onnx: cannot put the output in place \(Input/output error\); "
                                                r"it is kept as \S*\.m\.\w+\.partial\.onnx$"):
        write_bytes_atomically(target, b"new")
    assert target.read_bytes() == b"old"


def test_an_output_written_through_its_path_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    """--save-video's file is written by OpenCV through its temporary path, not through the output's handle: it was
    renamed into place unsynced, so a power cut could leave the video under its name empty or torn."""
    log = SyncLog(monkeypatch)
    output = AtomicOutput(tmp_path / "run.mp4")
    output.write_path.write_bytes(b"frames" * 100)  # as cv2.VideoWriter writes it
    output.commit()
    partial = str(output.write_path)
    assert log.events == [("fsync", partial, 600), ("rename", str(tmp_path / "run.mp4")),
                          ("fsync", str(tmp_path), os.stat(tmp_path).st_size)]


def test_a_failing_fsync_mid_run_is_one_line_naming_the_file(model, tmp_path, monkeypatch):
    """EIO from a records file's fsync ends the run as a full disk does, in one line naming the file."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), image(i))
    real_fsync = os.fsync

    def fails_once(fd):  # as the kernel reports a lost write-back: to the next fsync of the file, once
        monkeypatch.setattr(os, "fsync", real_fsync)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fails_once)
    code, output = cli("run", model, folder, "--console", "none", "--jsonl", tmp_path / "r.jsonl")
    assert code == 1 and "Traceback" not in output and output.count("error:") == 1, output
    assert "r.jsonl: cannot write (Input/output error)" in output
    assert [r["seq"] for r in read_jsonl(tmp_path / "r.jsonl")] == [0]  # the run stopped at its first record


def test_a_video_path_opencv_cannot_take_is_one_line_not_a_crash(model, tmp_path, monkeypatch):
    """OpenCV takes UTF-8 paths: a video named with other bytes, read as the source or written by --save-video,
    ended the process in a segmentation fault (exit 139). The error says which part has them; a working folder
    with them is no obstacle (OpenCV is given the path from there)."""
    cv2.imwrite(str(tmp_path / "x.png"), image())
    odd = tmp_path / os.fsdecode(b"r\xff")
    odd.mkdir()
    write_video(tmp_path / "clip.avi", count=3)
    (tmp_path / "clip.avi").rename(odd / "clip.avi")
    (tmp_path / "link.mp4").symlink_to(odd / "v.mp4")  # written beside its target
    for video in (odd / "v.mp4", tmp_path / "link.mp4"):
        code, output = cli("run", model, tmp_path / "x.png", "--save-video", video)
        assert code == 1 and output.count("\n") == 1 and "OpenCV writes videos under UTF-8 names only" in output, output
    code, output = cli("run", model, odd / "clip.avi")
    assert code == 1 and output.count("\n") == 1 and "OpenCV opens videos under UTF-8 names only" in output, output
    code, output = cli("run", model, "rtsp://127.0.0.1:9/" + os.fsdecode(b"\xff"))
    assert code == 1 and output.count("\n") == 1 and "OpenCV opens videos under UTF-8 names only" in output, output
    assert sorted(p.name for p in odd.iterdir()) == ["clip.avi"]
    code, output = cli("run", model, tmp_path / "x.png", "--save-video", tmp_path / os.fsdecode(b"\xffv.mp4"))
    assert code == 1 and output.rstrip().endswith("this name has other bytes"), output
    monkeypatch.chdir(odd)
    code, output = cli("run", model, "clip.avi", "--save-video", "out.avi", "--console", "none")
    assert code == 0 and cv2.VideoCapture("out.avi").read()[0], output  # from here: its absolute path crashes OpenCV
