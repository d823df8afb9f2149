"""`medmamba-edge export-triton`: the Triton repository entry and the DeepStream nvinfer config, checked with
what a stock server would check them with where none runs here: Triton's own ModelConfig schema
(tritonclient's protobuf, in the serve venv), PyTriton's real tritonserver reading the repository up to the
backend it lacks, and Gst-nvinfer's documented keys and arithmetic."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from medmamba_edge.exporters.triton_repository import (
    DEEPSTREAM_KEYS,
    TritonExportError,
    check_deepstream_config,
    deepstream_scaling,
    export_triton,
)
from medmamba_edge.errors import UserError
from medmamba_edge.runtime.backends.onnxruntime import custom_ops
from medmamba_edge.runtime.metadata import METADATA_KEY, read_onnx_metadata, write_onnx_metadata
from medmamba_edge.runtime.preprocess import _uint8_lookup
from tests.cli_runner import cli
from tests.exported_models import bundled_onnx, official_onnx
from tests.shared_data import PNEUMONIAMNIST, require_shared
from tests.test_run_robustness import SyncLog
from tests.triton_server import require_serve_python

EXPECTED_FILES = ["1", "1/model.onnx", "README.md", "config.pbtxt", "deepstream_labels.txt", "deepstream_model.onnx",
                  "deepstream_nvinfer.txt", "labels.txt", "libmedmamba_ort_ops.so"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return official_onnx(tmp_path_factory)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def in_serve_venv(script: str) -> str:
    result = subprocess.run([str(require_serve_python()), "-c", textwrap.dedent(script)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_plugin_form_model_becomes_an_onnxruntime_entry_with_our_op_library(model, tmp_path):
    repository = tmp_path / "repo"
    code, output = cli("export-triton", model, "-o", repository, "--server-root", "/models")
    assert code == 0, output
    assert "wrote" in output and "onnxruntime backend, max batch 8, dynamic batching ≤ 2000 µs, plugin scan" in output
    assert "start: tritonserver --model-repository=/models;" in output  # where the server sees it
    folder = repository / "medmamba"
    assert files(folder) == EXPECTED_FILES and files(repository) == ["medmamba", *[f"medmamba/{f}" for f in EXPECTED_FILES]]
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert (folder / "libmedmamba_ort_ops.so").read_bytes() == custom_ops.library_path().read_bytes()
    assert (folder / "labels.txt").read_text() == "normal\npneumonia\n"
    config = (folder / "config.pbtxt").read_text()
    assert 'op_library_filename: "/models/medmamba/libmedmamba_ort_ops.so"' in config
    assert "max_batch_size: 8" in config and "max_queue_delay_microseconds: 2000" in config

    # Exported again: the folder is replaced whole, nothing half-written or hidden is left beside it.
    code, output = cli("export-triton", model, "-o", repository, "--max-batch", 4, "--max-queue-delay-us", 500)
    assert code == 0, output
    config = (folder / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config and "max_queue_delay_microseconds: 500" in config
    assert f'op_library_filename: "{repository.resolve()}/medmamba/libmedmamba_ort_ops.so"' in config
    assert sorted(p.name for p in repository.iterdir()) == ["medmamba"]


def test_the_config_is_valid_for_tritons_own_schema_and_carries_the_metadata(model, tmp_path):
    result = export_triton(model, tmp_path / "repo", name="pneumonia-t32")
    config = result.folder / "config.pbtxt"
    parsed = json.loads(in_serve_venv(f"""
        import json
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
        config = text_format.Parse(open({str(config)!r}).read(), model_config_pb2.ModelConfig())
        print(json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)))
    """))
    assert parsed["name"] == "pneumonia-t32" and parsed["backend"] == "onnxruntime" and parsed["max_batch_size"] == 8
    assert parsed["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["3", "32", "32"]}]
    assert parsed["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["2"], "label_filename": "labels.txt"}]
    assert parsed["dynamic_batching"] == {"max_queue_delay_microseconds": "2000"}
    assert parsed["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert parsed["model_operations"]["op_library_filename"] == [f"{result.folder.resolve()}/libmedmamba_ort_ops.so"]
    metadata = json.loads(parsed["parameters"]["medmamba_edge"]["string_value"])
    assert metadata == json.loads(read_onnx_metadata(model).to_json())
    # The same check refuses what Triton would: a misspelt field.
    broken = config.read_text().replace("max_batch_size", "max_batch")
    out = in_serve_venv(f"""
        from medmamba_edge.exporters.triton_repository import TritonExportError, check_triton_config
        print(check_triton_config(open({str(config)!r}).read()))
        try:
            check_triton_config({broken!r}, "broken.pbtxt")
        except TritonExportError as exc:
            print(exc)
    """).splitlines()
    assert out[0][0].isdigit()  # the tritonclient version it was checked with
    assert out[1].startswith("broken.pbtxt: not a valid Triton model configuration (") and "max_batch" in out[1]


def _parameters(config: Path) -> dict:
    """config.pbtxt's parameters as Triton's own schema reads them (the serve venv's tritonclient), after the
    project's own check passes it."""
    return json.loads(in_serve_venv(f"""
        import json
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
        from medmamba_edge.exporters.triton_repository import check_triton_config
        text = open({str(config)!r}).read()
        assert check_triton_config(text) is not None
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        print(json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)["parameters"]))
    """))


def test_threads_are_the_onnxruntime_backends_intra_op_thread_count(model, tmp_path):
    """The config had no thread count: Triton's onnxruntime backend then lets ONNX Runtime start one thread per
    physical core of the server for each instance (16 × 4 on a 16-core server with --instances 4), reading no CPU
    quota."""
    code, output = cli("export-triton", model, "-o", tmp_path / "repo", "--instances", 4, "--threads", 3)
    assert code == 0, output
    folder = tmp_path / "repo" / "medmamba"
    parameters = _parameters(folder / "config.pbtxt")
    assert parameters["intra_op_thread_count"] == {"string_value": "3"} and "inter_op_thread_count" not in parameters
    assert "ONNX Runtime runs each of the 4 instances on 3 intra-op threads" in (folder / "README.md").read_text()
    assert "--threads N" not in output

    # None given: none written, and the README says what the server does instead and how to set it; with several
    # instances the printed notes say it too.
    code, output = cli("export-triton", model, "-o", tmp_path / "repo", "--instances", 4)
    assert code == 0, output
    assert "intra_op_thread_count" not in _parameters(folder / "config.pbtxt")
    advice = ("ONNX Runtime's threads are left to the server: it starts one intra-op thread per physical core of "
              "the server for each of the 4 instances, and reads no CPU quota")
    assert advice in (folder / "README.md").read_text() and advice in " ".join(output.split())
    code, output = cli("export-triton", model, "-o", tmp_path / "repo")
    assert code == 0, output
    assert "ONNX Runtime's threads are left to the server" not in output
    assert "for the instance, and reads no CPU quota" in (folder / "README.md").read_text()


def test_threads_for_an_engine_are_refused_as_the_tensorrt_backend_has_none(model, tmp_path):
    with pytest.raises(TritonExportError, match=r"e.engine: --threads sets ONNX Runtime's intra-op threads \(the "
                                                r"onnxruntime backend\); an engine runs on the tensorrt backend"):
        export_triton(_engine(model, tmp_path / "e.engine", 1, 8), tmp_path / "repo", threads=2)
    assert not (tmp_path / "repo").exists()
    result = export_triton(_engine(model, tmp_path / "e.engine", 1, 8), tmp_path / "repo")
    readme = (result.folder / "README.md").read_text()
    assert "intra_op_thread_count" not in result.config_text and "ONNX Runtime" not in readme


def test_a_real_tritonserver_reads_the_repository_up_to_the_backend_it_lacks(model, tmp_path):
    """PyTriton's tritonserver has only the Python backend; it loads our repository, parses and accepts the
    config and the model folder, and stops where the onnxruntime backend library would be needed."""
    result = export_triton(model, tmp_path / "repo")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "repo", broken)
    config = broken / "medmamba" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 8\nmax_batches: 2"))
    logs = {}
    for name, repository in (("good", result.folder.parent), ("broken", broken)):
        logs[name] = in_serve_venv(f"""
            import pathlib, subprocess, pytriton
            server = pathlib.Path(pytriton.__file__).parent / "tritonserver"
            run = subprocess.run([str(server / "bin" / "tritonserver"), "--model-repository={repository}",
                                  "--backend-directory=" + str(server / "backends"), "--model-control-mode=explicit",
                                  "--load-model=medmamba", "--allow-http=false", "--allow-grpc=false",
                                  "--allow-metrics=false", "--exit-on-error=true"],
                                 capture_output=True, text=True, timeout=60)
            print(run.stdout + run.stderr)
        """)
    assert "loading: medmamba:1" in logs["good"]
    assert "unable to find backend library for backend 'onnxruntime'" in logs["good"]
    assert "failed to read text proto" in logs["broken"] and "loading: medmamba:1" not in logs["broken"]


def test_deepstream_config_normalises_as_the_runtime_does(model, tmp_path):
    result = export_triton(model, tmp_path / "repo")
    text = (result.folder / "deepstream_nvinfer.txt").read_text()
    properties = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert set(properties) <= DEEPSTREAM_KEYS
    assert properties["network-type"] == "1" and properties["network-mode"] == "0" and properties["batch-size"] == "8"
    assert properties["infer-dims"] == "3;32;32" and properties["model-color-format"] == "0"
    assert properties["onnx-file"] == "deepstream_model.onnx"
    assert properties["model-engine-file"] == "deepstream_model.onnx_b8_gpu0_fp32.engine"
    assert properties["output-blob-names"] == "probabilities" and properties["maintain-aspect-ratio"] == "0"
    # Beside the config, as nvinfer resolves a relative path: DeepStream does not see the server's root (/models).
    assert properties["custom-lib-path"] == "libmedmamba_trt_plugin_autoload.so"
    served = export_triton(model, tmp_path / "served", server_root="/models")
    assert "custom-lib-path=libmedmamba_trt_plugin_autoload.so\n" in (served.folder / "deepstream_nvinfer.txt").read_text()
    assert (result.folder / properties["labelfile-path"]).read_text() == "normal;pneumonia\n"
    # nvinfer's y = net-scale-factor·(x − offsets[c]) on every 8-bit value equals the runtime's lookup table.
    meta = result.served.metadata
    scale, offsets = float(properties["net-scale-factor"]), [float(o) for o in properties["offsets"].split(";")]
    x = np.arange(256, dtype=np.float64)
    nvinfer = np.stack([scale * (x - offset) for offset in offsets])
    assert np.abs(nvinfer - _uint8_lookup(meta.mean, meta.std)).max() < 1e-6
    with pytest.raises(TritonExportError, match="keys Gst-nvinfer does not document: net-scale"):
        check_deepstream_config(text.replace("net-scale-factor", "net-scale"))


def test_deepstream_reads_probabilities_from_the_served_model_plus_a_softmax(model, tmp_path):
    """nvinfer's built-in classifier parser labels a frame only with a class whose output is above 0 and reports
    that output as the confidence: it takes probabilities, and the served model outputs logits."""
    from medmamba_edge.runtime.bundled import sample_image_paths
    from medmamba_edge.runtime.decode import read_single_image
    from medmamba_edge.runtime.preprocess import preprocess

    folder = export_triton(model, tmp_path / "repo").folder
    served, deepstream = onnx.load(str(folder / "1" / "model.onnx")), onnx.load(str(folder / "deepstream_model.onnx"))
    assert [o.name for o in deepstream.graph.output] == ["probabilities"]
    # Not a model for our tools, which read every output as logits: without our metadata they refuse it.
    assert METADATA_KEY in {e.key for e in served.metadata_props}
    assert METADATA_KEY not in {e.key for e in deepstream.metadata_props}
    with pytest.raises(UserError, match="deepstream_model.onnx"):
        export_triton(folder / "deepstream_model.onnx", tmp_path / "again")
    meta = read_onnx_metadata(served)
    batch = preprocess([read_single_image(p) for p in sample_image_paths()], meta)
    logits = custom_ops.make_session(served).run(None, {"input": batch})[0]
    probabilities = custom_ops.make_session(deepstream).run(None, {"input": batch})[0]
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.abs(probabilities - expected).max() < 1e-6 and (probabilities.argmax(1) == logits.argmax(1)).all()


def quantized_bundled(tmp_path_factory, tmp_path, quant_format):
    from medmamba_edge.exporters.quantize import quantize_onnx
    from tests.exported_models import quantizer_or_skip

    quantizer_or_skip()
    return quantize_onnx(bundled_onnx(tmp_path_factory), tmp_path / "q.onnx", require_shared(*PNEUMONIAMNIST),
                         num_samples=8, quant_format=quant_format).path


def test_a_qoperator_model_gets_no_deepstream_config_since_tensorrt_cannot_parse_it(tmp_path_factory, tmp_path):
    result = export_triton(quantized_bundled(tmp_path_factory, tmp_path, "qoperator"), tmp_path / "repo")
    assert result.deepstream_text is None and "TensorRT does not take" in result.deepstream_refusal
    assert "QLinearConv" in result.deepstream_refusal and "--format qdq" in result.deepstream_refusal
    assert not (result.folder / "deepstream_model.onnx").exists() and (result.folder / "config.pbtxt").exists()
    assert "No DeepStream config: nvinfer builds a TensorRT engine" in (result.folder / "README.md").read_text()


def test_the_tensorrt_plugin_is_asked_for_only_where_something_loads_it(model, tmp_path_factory, tmp_path):
    """Triton runs a plugin-form ONNX on our ONNX Runtime op, so there only its DeepStream config takes the TensorRT
    plugin: a qoperator model, which gets none, was told to put the plugin 'beside deepstream_nvinfer.txt' all the
    same, and so was an engine (Triton's plugins=), which never gets a DeepStream config."""
    qoperator = quantized_bundled(tmp_path_factory, tmp_path, "qoperator")
    result = export_triton(qoperator, tmp_path / "repo")
    assert not any("TensorRT plugin" in note for note in result.notes)
    result = export_triton(_engine(model, tmp_path / "e.engine", 1, 8), tmp_path / "repo2")
    assert not any("deepstream_nvinfer.txt" in note for note in result.notes)
    with _plugin_built_here(tmp_path):  # copied where it is loaded, and only there
        copied = {path: (export_triton(path, tmp_path / "repo3").folder / "libmedmamba_trt_plugin_autoload.so").exists()
                  for path in (qoperator, model, tmp_path / "e.engine")}
    assert copied == {qoperator: False, model: True, tmp_path / "e.engine": True}


@contextlib.contextmanager
def _plugin_built_here(tmp_path: Path):
    """As on a machine where build-plugin has run: find_autoload_plugin_library finds a library."""
    from medmamba_edge.exporters import triton_repository

    library = tmp_path / "built" / "libmedmamba_trt_plugin_autoload.so"
    library.parent.mkdir(exist_ok=True)
    library.write_bytes(b"\x7fELF a plugin library")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_repository, "find_autoload_plugin_library", lambda: library)
        yield library


def test_a_qdq_model_gets_the_calibration_file_that_makes_nvinfer_build_int8(tmp_path_factory, tmp_path):
    # Without one nvinfer falls back to FP16 (TensorRT then refuses the Q/DQ network), and saves no engine under
    # the _int8 name the config gives, so the next start would not find it.
    folder = export_triton(quantized_bundled(tmp_path_factory, tmp_path, "qdq"), tmp_path / "repo").folder
    properties = dict(line.split("=", 1) for line in (folder / "deepstream_nvinfer.txt").read_text().splitlines()
                      if "=" in line and not line.startswith("#"))
    assert properties["network-mode"] == "1" and properties["model-engine-file"].endswith("_int8.engine")
    assert (folder / properties["int8-calib-file"]).read_text().startswith("TRT-")


def test_a_model_inside_the_folder_it_would_replace_is_refused(model, tmp_path):
    """export-triton replaces REPO/NAME as a whole: a model kept there (and its neighbours) went with it."""
    inside = tmp_path / "repo" / "medmamba" / "kept.onnx"
    inside.parent.mkdir(parents=True)
    shutil.copyfile(model, inside)
    (inside.parent / "NOTES.md").write_text("mine")
    with pytest.raises(TritonExportError, match="kept.onnx: lies in .*medmamba, which export-triton replaces"):
        export_triton(inside, tmp_path / "repo")
    assert inside.exists() and (inside.parent / "NOTES.md").read_text() == "mine"
    export_triton(inside, tmp_path / "repo", name="other")  # another --name leaves it alone
    # A link by that name is replaced as a link: the folder it points to, and the model there, stay.
    keep = tmp_path / "keep"
    keep.mkdir()
    shutil.copyfile(model, keep / "m.onnx")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "medmamba").symlink_to(keep)
    export_triton(keep / "m.onnx", tmp_path / "linked")
    assert sorted(p.name for p in keep.iterdir()) == ["m.onnx"]
    assert not (tmp_path / "linked" / "medmamba").is_symlink() and (tmp_path / "linked" / "medmamba" / "config.pbtxt").exists()
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "medmamba").symlink_to(tmp_path / "gone")
    assert (export_triton(model, tmp_path / "dangling").folder / "config.pbtxt").exists()


def test_an_export_killed_mid_way_leaves_nothing_a_server_would_take_for_a_model(tmp_path_factory, tmp_path):
    """Triton takes every folder of a repository for a model, hidden ones too: a half-built one left there by a
    SIGKILL (out of memory, a container's stop timeout) stopped a stock tritonserver from starting."""
    import signal
    import sys

    model, repository = bundled_onnx(tmp_path_factory), tmp_path / "repo"
    killed_before_the_rename = f"""
import os, signal
from medmamba_edge.exporters import triton_repository
triton_repository._replace_folder = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
triton_repository.export_triton({str(model)!r}, {str(repository)!r})
"""
    assert subprocess.run([sys.executable, "-c", killed_before_the_rename]).returncode == -signal.SIGKILL
    assert list(repository.iterdir()) == []
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # Another host's (sharing the storage) may be an export running there: kept, whatever its process id.
    _, name, host, *rest = leftover.name.split(".")  # .medmamba.HOST.PID.XXXXXXXX.partial
    elsewhere = tmp_path / ".".join(["", name, "otherhost", *rest])
    elsewhere.mkdir()
    export_triton(model, repository)  # the next export of that name removes what the killed one left
    assert [p.name for p in repository.iterdir()] == ["medmamba"] and not leftover.exists() and elsewhere.exists()


def require_exchange(folder: Path) -> None:
    """Skip where ``folder``'s system cannot swap two names in one step (not Linux, a libc without renameat2, a file
    system or seccomp profile that refuses RENAME_EXCHANGE): export-triton then renames twice, tested below."""
    from medmamba_edge.runtime.files import exchange

    first, second = folder / ".exchange-a", folder / ".exchange-b"
    first.mkdir()
    second.mkdir()
    try:
        swapped = exchange(first, second)
    finally:
        first.rmdir()
        second.rmdir()
    if not swapped:
        pytest.skip(f"renameat2's RENAME_EXCHANGE is not available in {folder} here")


def test_an_existing_model_folder_is_swapped_for_the_new_one_in_one_step(model, tmp_path, monkeypatch):
    """The old folder was renamed aside, then the new one in: a power cut or SIGKILL between the two renames left
    no model folder in REPO. Now renameat2's RENAME_EXCHANGE swaps them, with no rename at all."""
    require_exchange(tmp_path)
    repository = tmp_path / "repo"
    old = export_triton(model, repository).folder
    (old / "stale.txt").write_text("the old folder's")
    old_inode = old.stat().st_ino

    def rename(*args):
        raise AssertionError(f"renamed {args}: two renames leave a moment with no model folder")

    monkeypatch.setattr(os, "rename", rename)
    folder = export_triton(model, repository).folder
    assert folder.stat().st_ino != old_inode and files(folder) == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # the swapped-out folder is removed


@pytest.mark.parametrize("renameat2", ["EINVAL", "ENOSYS", "EPERM", "none"])
def test_where_the_system_cannot_exchange_the_old_folder_is_moved_aside(model, tmp_path, monkeypatch, renameat2):
    """A file system without RENAME_EXCHANGE (EINVAL), a kernel before 3.15 (ENOSYS), a container's seccomp profile
    without renameat2 (EPERM), a libc without renameat2: the two renames, as before."""
    import ctypes
    import errno

    from medmamba_edge.runtime import files as runtime_files

    def cannot(*args):
        ctypes.set_errno(getattr(errno, renameat2))
        return -1

    repository = tmp_path / "repo"
    (export_triton(model, repository).folder / "stale.txt").write_text("the old folder's")
    monkeypatch.setattr(runtime_files, "_renameat2", lambda: None if renameat2 == "none" else cannot)
    assert files(export_triton(model, repository).folder) == EXPECTED_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


@pytest.mark.parametrize("there", ["folder", "link"])
def test_an_export_killed_right_after_the_exchange_leaves_the_new_folder(model, tmp_path, there):
    """What the exchange swapped out sits under the staging name until removed: a kill then leaves the new model
    folder in REPO and the old one (or the link that was there) for the next export to remove."""
    import signal
    import sys

    require_exchange(tmp_path)
    repository, keep = tmp_path / "repo", tmp_path / "keep"
    repository.mkdir()
    if there == "folder":
        export_triton(model, repository)
    else:
        keep.mkdir()
        (keep / "mine.txt").write_text("mine")
        (repository / "medmamba").symlink_to(keep)
    killed_after_the_exchange = f"""
import os, signal
from medmamba_edge.exporters import triton_repository
triton_repository._remove = lambda path: os.kill(os.getpid(), signal.SIGKILL)
triton_repository.export_triton({str(model)!r}, {str(repository)!r})
"""
    assert subprocess.run([sys.executable, "-c", killed_after_the_exchange]).returncode == -signal.SIGKILL
    folder = repository / "medmamba"
    assert not folder.is_symlink() and files(folder) == EXPECTED_FILES
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert leftover.is_symlink() == (there == "link")
    export_triton(model, repository)
    assert not os.path.lexists(leftover) and [p.name for p in repository.iterdir()] == ["medmamba"]
    assert there == "folder" or (keep / "mine.txt").read_text() == "mine"  # the link went, not what it led to


def test_inside_a_mounted_repository_any_hosts_leftovers_go_once_over_an_hour_old(model, tmp_path, monkeypatch):
    """A repository that is a mount of its own is the workspace: another container's leftovers there, whose host
    name went with it, are removed by age. An exchange leaves a link (here dangling) under the staging name, whose
    age is its own (lstat): stat() followed it, and the dangling one stayed for ever."""
    from medmamba_edge.exporters import triton_repository

    repository = tmp_path / "repo"
    repository.mkdir()
    monkeypatch.setattr(triton_repository, "_workspace", lambda repository: repository)
    hour_old = time.time() - triton_repository.STALE_STAGING_S - 60
    old_link, old_folder, running = (repository / f".medmamba.otherhost.{i}.abcd1234.partial" for i in (1, 2, 3))
    old_link.symlink_to(tmp_path / "gone")
    old_folder.mkdir()
    running.mkdir()
    for path in (old_link, old_folder):
        os.utime(path, (hour_old, hour_old), follow_symlinks=False)
    export_triton(model, repository)
    assert sorted(p.name for p in repository.iterdir()) == sorted(["medmamba", running.name])


def test_an_export_that_fails_removes_the_folders_it_created(model, tmp_path, monkeypatch):
    """A full disk while the model folder was written: the staging folder went, the repository's new folders
    (-o a/b/repo) stayed behind empty."""
    import errno

    from medmamba_edge.exporters import triton_repository

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(triton_repository.shutil, "copyfile", disk_full)
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="medmamba: cannot write [(]No space left on device[)]"):
        export_triton(model, tmp_path / "kept" / "a" / "b" / "repo")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not list((tmp_path / "kept").iterdir())
    # nox/../y/repo: made where it leads (y/repo), not nox/ on the way, which was left behind
    with pytest.raises(UserError, match="No space left on device"):
        export_triton(model, tmp_path / "nox" / ".." / "y" / "repo")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_the_model_folder_is_on_the_disk_before_its_rename_and_the_rename_after(model, tmp_path, monkeypatch):
    """The folder was renamed into place unsynced: after a power cut the repository could hold model.onnx or
    config.pbtxt empty or torn (ext4 writes the rename before delayed-allocation data), or lose the rename."""
    log = SyncLog(monkeypatch)
    repository = tmp_path / "new" / "repo"  # folders made for it: their entries must be on the disk too
    folder = export_triton(model, repository).folder
    assert log.paths("rename") == [str(folder)]
    renamed = log.events.index(("rename", str(folder)))
    staging = Path(log.events[0][1])
    assert staging.name.endswith(".partial") and staging.parent == tmp_path / "new"
    written = {str(Path(path).relative_to(staging)): size for kind, path, size in log.events[:renamed]}
    assert written == {str(p.relative_to(folder)): p.stat().st_size for p in (folder, *folder.rglob("*"))}
    assert log.events[renamed + 1:] == [("fsync", str(path), path.stat().st_size)
                                        for path in (repository, tmp_path / "new", tmp_path)]


def test_a_failing_fsync_keeps_the_old_model_folder(model, tmp_path, monkeypatch):
    """EIO (a failing eMMC or SD card): the new folder may not be on the disk, so it does not replace the old one."""
    import errno

    folder = export_triton(model, tmp_path / "repo", max_batch=4).folder
    SyncLog(monkeypatch, failure=errno.EIO)
    with pytest.raises(UserError, match=r"^\S*repo/medmamba: cannot write \(Input/output error\)$"):
        export_triton(model, tmp_path / "repo")
    assert "max_batch_size: 4" in (folder / "config.pbtxt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # the staging folder removed


def test_a_repository_path_through_a_folder_not_there_and_back_is_written_where_it_leads(model, tmp_path):
    """nox/../y/repo: made as y/repo (nox not made on the way), and written there too: the model folder's rename
    into nox/../y/repo/medmamba failed (no such file), nox never having been made."""
    export_triton(model, tmp_path / "nox" / ".." / "y" / "repo")
    assert (tmp_path / "y" / "repo" / "medmamba" / "config.pbtxt").is_file() and not (tmp_path / "nox").exists()


def test_a_repository_path_through_a_link_loop_is_no_folder_and_one_through_a_dangling_link_is_made_there(
        model, tmp_path):
    """A loop raised RuntimeError (Path.resolve) as a traceback; a dangling link read "cannot write (File
    exists)", where run writes through one."""
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(UserError, match="loop is not a folder"):
        export_triton(model, tmp_path / "loop" / "repo")
    (tmp_path / "dangling").symlink_to("elsewhere")
    export_triton(model, tmp_path / "dangling" / "repo")
    assert (tmp_path / "elsewhere" / "repo" / "medmamba" / "config.pbtxt").is_file()


def test_a_repository_that_is_a_mount_of_its_own_is_its_own_staging_place(tmp_path_factory, tmp_path):
    """rename() does not cross mounts, a bind mount of the same file system included (EXDEV)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "repo").mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "real"), str(tmp_path / "repo")],
                      capture_output=True).returncode != 0:
        pytest.skip("bind mounts need root (CAP_SYS_ADMIN) here")
    try:
        # Staged inside the repository there, where another container's leftover (its host name gone with it)
        # stopped a server for good: removed once over an hour old; a younger one may be an export running there.
        old = tmp_path / "repo" / ".medmamba.container-a.7.x1y2z3.partial"
        young = tmp_path / "repo" / ".medmamba.container-b.8.a1b2c3.partial"
        old.mkdir(), young.mkdir()
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        export_triton(bundled_onnx(tmp_path_factory), tmp_path / "repo")
        assert sorted(p.name for p in (tmp_path / "real").iterdir()) == [young.name, "medmamba"]
    finally:
        subprocess.run(["umount", str(tmp_path / "repo")], check=True)


def test_a_model_file_name_with_a_line_break_stays_in_the_deepstream_comment(model, tmp_path):
    odd = tmp_path / "a\ngpu-id=7\nb.onnx"
    shutil.copyfile(model, odd)
    result = export_triton(odd, tmp_path / "repo")
    check_deepstream_config(result.deepstream_text)
    assert '# Model: "a\\ngpu-id=7\\nb.onnx"' in result.deepstream_text
    assert [line for line in result.deepstream_text.splitlines() if line.startswith("gpu-id")] == ["gpu-id=0"]
    with pytest.raises(TritonExportError, match="not a key file Gst-nvinfer can read"):
        check_deepstream_config("gpu-id=0\n")


def test_a_model_exported_with_names_no_label_file_can_hold_still_runs_but_gets_no_repository(model, tmp_path):
    from medmamba_edge.runtime.backends import open_backend

    odd = _rewritten(model, tmp_path / os.fsdecode(b"old \xff.onnx"), class_names=("normal; no finding", "pneumonia"))
    with open_backend(odd) as backend:  # exported before names were checked: it runs as it did
        assert backend.metadata.class_names == ("normal; no finding", "pneumonia")
    with pytest.raises(TritonExportError, match=r"class names must not contain ';', .*re-export it with other names"):
        export_triton(odd, tmp_path / "repo")
    export_triton(_rewritten(model, tmp_path / os.fsdecode(b"\xff.onnx")), tmp_path / "repo")  # an odd file name is fine
    assert "\\udcff" in (tmp_path / "repo" / "medmamba" / "README.md").read_text()


def _rewritten(model: Path, path: Path, batch: int | None = None, **changes) -> Path:
    """The model with its metadata changed (and, for a fixed batch, its graph's batch dimension fixed too)."""
    proto = onnx.load(str(model))
    meta = read_onnx_metadata(proto)
    if batch is not None:
        changes["batch"] = batch
        for value in (proto.graph.input[0], proto.graph.output[0]):
            value.type.tensor_type.shape.dim[0].dim_value = batch
    write_onnx_metadata(proto, meta.replace(**changes))
    onnx.save(proto, str(path))
    return path


def test_per_channel_std_gets_no_deepstream_config_and_says_why(model, tmp_path):
    odd = _rewritten(model, tmp_path / "odd_std.onnx", std=(0.229, 0.224, 0.225), mean=(0.485, 0.456, 0.406))
    with pytest.raises(TritonExportError, match=r"std is per channel \(0\.229, 0\.224, 0\.225\)"):
        deepstream_scaling(read_onnx_metadata(odd))
    code, output = cli("export-triton", odd, "-o", tmp_path / "repo")
    assert code == 0, output
    assert "no DeepStream config: DeepStream's nvinfer normalises with one net-scale-factor" in output
    assert not (tmp_path / "repo" / "medmamba" / "deepstream_nvinfer.txt").exists()
    assert (tmp_path / "repo" / "medmamba" / "config.pbtxt").exists()


def test_a_fixed_batch_model_is_served_without_triton_batching(model, tmp_path):
    fixed = _rewritten(model, tmp_path / "b1.onnx", batch=1)
    result = export_triton(fixed, tmp_path / "repo")
    config = result.config_text
    assert "max_batch_size: 0" in config and "dims: [ 1, 3, 32, 32 ]" in config and "dims: [ 1, 2 ]" in config
    assert "dynamic_batching" not in config
    assert "batch-size=1" in result.deepstream_text


def _engine(model: Path, path: Path, smallest: int, largest: int, version_compatible: bool = False,
            hardware_compat: bool = False, plugin: bool = True) -> Path:
    """An engine file as the repository writer sees it: opaque bytes and build-engine's manifest (``plugin``: built
    from a plugin-form export, else from a portable one)."""
    from medmamba_edge.runtime.backends.tensorrt.manifest import BuildOptions, EngineManifest, write_manifest

    path.write_bytes(b"a plan is opaque to the repository writer")
    write_manifest(path, EngineManifest(
        tensorrt_version="10.3.0", gpu_name="NVIDIA Jetson AGX Orin", compute_capability="8.7", precision="fp16",
        profile={"input": {"min": [smallest, 3, 32, 32], "opt": [smallest, 3, 32, 32], "max": [largest, 3, 32, 32]}},
        onnx_path=str(model), onnx_sha256="0" * 64, plugin_sha256="1" * 64 if plugin else None,
        build=BuildOptions(fp16=True, min_batch=smallest, max_batch=largest, version_compatible=version_compatible,
                           hardware_compat=hardware_compat),
        metadata=read_onnx_metadata(model).replace(precision="fp16")))
    return path


@pytest.mark.parametrize("options, runs_on", [
    ({}, "TensorRT 10.3.0, on the GPU it was built on, NVIDIA Jetson AGX Orin (compute capability 8.7)"),
    ({"version_compatible": True}, "TensorRT 10.3.0 and later versions (its plan carries TensorRT's lean runtime), on "
                                   "the GPU it was built on, NVIDIA Jetson AGX Orin (compute capability 8.7)"),
    ({"hardware_compat": True}, "TensorRT 10.3.0, on an Ampere or newer GPU")])
def test_the_readme_says_where_the_engine_runs(model, tmp_path, options, runs_on):
    """It said 'An engine runs only on the TensorRT version and GPU it was built for' of every engine, a
    version-compatible plan (later TensorRT versions too) and a hardware-compatible one (any Ampere or newer GPU)
    among them."""
    result = export_triton(_engine(model, tmp_path / "e.engine", 1, 8, **options), tmp_path / "repo",
                           plugin="/opt/medmamba/libmedmamba_trt_plugin_autoload.so")
    assert f"This engine runs on {runs_on} only;" in (result.folder / "README.md").read_text()


def test_an_engine_becomes_a_tensorrt_entry_on_the_gpu(model, tmp_path):
    engine = _engine(model, tmp_path / "t32.engine", 1, 16)
    result = export_triton(engine, tmp_path / "repo", plugin="/opt/medmamba/libmedmamba_trt_plugin_autoload.so")
    config = result.config_text
    assert 'backend: "tensorrt"' in config and "kind: KIND_GPU" in config and "max_batch_size: 16" in config
    assert "model_operations" not in config
    assert (result.folder / "1" / "model.plan").read_bytes() == engine.read_bytes()
    # An engine outputs logits, which nvinfer's built-in parser would take for probabilities.
    assert result.deepstream_text is None and "run export-triton on the ONNX export for DeepStream" in result.deepstream_refusal
    assert not (result.folder / "deepstream_nvinfer.txt").exists() and not (result.folder / "deepstream_model.onnx").exists()
    # Not version-compatible: the plan does not carry the plugin, so the server must load it by path; the
    # README and the command line printed say so alike.
    command = "--backend-config=tensorrt,plugins=/opt/medmamba/libmedmamba_trt_plugin_autoload.so"
    assert command in result.server_command and result.server_command in (result.folder / "README.md").read_text()
    code, output = cli("export-triton", engine, "-o", tmp_path / "repo2", "--plugin", "/opt/p.so",
                       "--deepstream-batch", "2")  # no DeepStream config for an engine: its batch is not checked
    assert code == 0, output
    assert "start: tritonserver --model-repository=" in output and "plugins=/opt/p.so" in output


def test_an_engine_is_served_up_to_its_profile_unless_max_batch_says_less(model, tmp_path):
    """--max-batch defaulted to 8 for engines too: one built with build-engine --max-batch 32 (docs/tensorrt.md's
    desktop example) was served at max_batch_size 8 unless --max-batch 32 was given again; one above the profile was
    quietly held to it."""
    engine = _engine(model, tmp_path / "t32.engine", 1, 32)
    code, output = cli("export-triton", engine, "-o", tmp_path / "repo", "--plugin", "/opt/p.so")
    assert code == 0, output
    assert "tensorrt backend, max batch 32," in output
    assert "max_batch_size: 32" in (tmp_path / "repo" / "medmamba" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in export_triton(engine, tmp_path / "repo", max_batch=4, plugin="/opt/p.so").config_text
    code, output = cli("export-triton", engine, "-o", tmp_path / "repo2", "--plugin", "/opt/p.so", "--max-batch", 64)
    assert code == 1 and output.strip() == (
        f"error: {engine}: --max-batch 64 is above its profile's largest batch (it takes batches 1 to 32); rebuild "
        f"it with build-engine --max-batch 64, or leave --max-batch out to serve up to 32")
    assert not (tmp_path / "repo2").exists()


def test_max_batch_for_a_fixed_batch_model_is_refused_not_dropped(model, tmp_path):
    """Triton does not batch a fixed-batch model (max_batch_size 0): --max-batch 8 on the default batch-1 export was
    dropped in silence, the config saying nothing of it."""
    fixed = _rewritten(model, tmp_path / "b1.onnx", batch=1)
    code, output = cli("export-triton", fixed, "-o", tmp_path / "repo", "--max-batch", 8)
    assert code == 1 and output.strip() == (
        f"error: {fixed}: --max-batch 8, but this model runs batch 1 only, which Triton does not batch "
        f"(max_batch_size 0); export it with --dynamic-batch for Triton's dynamic batcher, or leave --max-batch out")
    assert not (tmp_path / "repo").exists()
    assert "max_batch_size: 0" in export_triton(fixed, tmp_path / "repo", max_batch=1).config_text  # what it takes
    with pytest.raises(TritonExportError, match=r"--max-batch 8, but this model runs batch 4 only, .* build it with "
                                                r"--min-batch 1 \(from a --dynamic-batch export\)"):
        export_triton(_engine(model, tmp_path / "e.engine", 4, 4), tmp_path / "repo", max_batch=8)


@pytest.mark.parametrize("batch", [1, 4])
def test_an_engine_of_one_batch_size_from_a_dynamic_onnx_is_served_at_that_batch(model, tmp_path, batch):
    """build-engine --min-batch B --max-batch B on a dynamic-batch export: once refused, as 'batch None, not 0'."""
    result = export_triton(_engine(model, tmp_path / "e.engine", batch, batch), tmp_path / "repo")
    assert "max_batch_size: 0" in result.config_text and f"dims: [ {batch}, 3, 32, 32 ]" in result.config_text
    assert f"dims: [ {batch}, 2 ]" in result.config_text and "dynamic_batching" not in result.config_text


def test_an_engine_that_cannot_take_batch_1_is_refused_for_the_dynamic_batcher(model, tmp_path):
    with pytest.raises(TritonExportError, match=r"profile takes batches 2 to 8, but Triton's dynamic batcher sends "
                                                r"any batch from 1; rebuild it with --min-batch 1"):
        export_triton(_engine(model, tmp_path / "e.engine", 2, 8), tmp_path / "repo")


def test_a_version_compatible_engine_is_served_with_the_plugin_it_carries(model, tmp_path):
    result = export_triton(_engine(model, tmp_path / "e.engine", 1, 8, version_compatible=True), tmp_path / "repo")
    readme = (result.folder / "README.md").read_text()
    assert "--backend-config=tensorrt,version-compatible=true" in readme and "plugins=" not in readme
    # Nothing loads the library by path, so nothing asks for it (it was: 'put libmedmamba_trt_plugin_autoload.so in
    # the model's folder'), nor is one built here copied in.
    assert not any("TensorRT plugin" in note for note in result.notes)
    with _plugin_built_here(tmp_path):
        result = export_triton(_engine(model, tmp_path / "e.engine", 1, 8, version_compatible=True), tmp_path / "repo")
    assert not (result.folder / "libmedmamba_trt_plugin_autoload.so").exists()


def test_a_version_compatible_engine_without_the_plugin_is_served_with_its_lean_runtime_allowed(model, tmp_path):
    """Its plan carries TensorRT's lean runtime, which Triton's tensorrt backend runs only with version-compatible=true
    (it then allows the engine host code); the README gave that option only to a plan carrying the plugin too."""
    result = export_triton(_engine(model, tmp_path / "e.engine", 1, 8, version_compatible=True, plugin=False),
                           tmp_path / "repo")
    assert result.server_command.endswith(" --backend-config=tensorrt,version-compatible=true")
    assert result.server_command in (result.folder / "README.md").read_text()
    plain = export_triton(_engine(model, tmp_path / "p.engine", 1, 8, plugin=False), tmp_path / "repo2")
    assert "--backend-config" not in plain.server_command


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "missing.onnx: no such model file"),
    (["{model}", "--name", "../up"], "--name '../up': a model name is letters"),
    (["{model}", "--kind", "tpu"], "--kind must be cpu or gpu"),
    (["{model}", "--threads", "0"], "--threads must be ≥ 1, got 0"),
    (["{model}", "--threads", "8193"], "--threads must be ≤ 8192 (the most CPUs a Linux server can have), got 8193"),
])
def test_bad_requests_are_one_line(model, tmp_path, args, message):
    code, output = cli("export-triton", *[a.format(model=model) for a in args], "-o", tmp_path / "repo")
    assert code == 1
    (line,) = output.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_a_model_with_external_weights_is_written_as_one_file(tmp_path_factory, tmp_path):
    """Only the .onnx was copied: the DeepStream step raised a ValidationError traceback, and Triton would have
    lacked the weights."""
    source = tmp_path / "ext" / "m.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(bundled_onnx(tmp_path_factory))), source, save_as_external_data=True,
                    location="m.onnx.data", size_threshold=1024)
    result = export_triton(source, tmp_path / "repo")
    written = onnx.load(str(result.folder / "1" / "model.onnx"), load_external_data=False)
    assert written.graph.initializer and not any(t.data_location == onnx.TensorProto.EXTERNAL
                                                 for t in written.graph.initializer)
    assert "model.onnx.data" not in files(result.folder) and result.deepstream_text is not None


def test_no_op_library_is_one_line_naming_the_model_and_writes_nothing(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(custom_ops, "LIBRARY_NAME", "libmedmamba_ort_ops_absent.so")
    model = bundled_onnx(tmp_path_factory)
    with pytest.raises(TritonExportError, match=rf"^{model}: a plugin-form model .* which is not built"):
        export_triton(model, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()  # an empty repository folder was left
