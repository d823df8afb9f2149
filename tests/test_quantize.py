"""`medmamba-edge quantize` on the official checkpoint and real PneumoniaMNIST: accuracy within one point
of fp32 in both scan forms, the Q/DQ graph's structure, the accuracy and speed gates and bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from medmamba_edge import __version__
from medmamba_edge.cli import app
from medmamba_edge.exporters.onnx_export import export_onnx
from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge import evaluation as evaluation_module
from medmamba_edge.exporters.quantize import (QUANTIZATION_KEY, WEIGHT_RANGE, QuantizeError, _producers,
                                               calibration_groups, check_quantizer, preprocessed, quantizable_nodes,
                                               quantize_onnx, top1_accuracy)
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends.onnxruntime import custom_ops
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.datasets import open_dataset
from medmamba_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata
from tests import hidden_avx512
from tests.cli_runner import cli_process
from tests.shared_data import OFFICIAL_T32, PNEUMONIAMNIST, require_shared

try:
    check_quantizer()
except QuantizeError as exc:  # onnxruntime < 1.27 (Python 3.10's newest): quantize says so, tested with it deleted
    pytest.skip(str(exc), allow_module_level=True)

CALIBRATION_IMAGES = 64


@pytest.fixture(scope="module")
def fp32_models(tmp_path_factory):
    """The official MedMamba-T exported at 32×32 with a dynamic batch, in plugin and portable form. The
    portable file is the plugin form lowered, exactly what `export --scan portable` writes, without
    tracing the model a second time."""
    folder = tmp_path_factory.mktemp("quantize")
    plugin = folder / "t32_plugin.onnx"
    result = export_onnx(require_shared(*OFFICIAL_T32), plugin, input_size=32, batch=None, scan="plugin")
    portable_model = lower_ss2d_scan(onnx.load(str(plugin)))
    write_onnx_metadata(portable_model, result.metadata.replace(scan_form="portable"))
    portable = folder / "t32_portable.onnx"
    onnx.save(portable_model, portable)
    return {"plugin": plugin, "portable": portable}


@pytest.fixture(scope="module")
def int8_models(fp32_models):
    """Q/DQ in both scan forms, and QOperator (``plugin-qoperator``) in plugin form."""
    npz = require_shared(*PNEUMONIAMNIST)
    models = {form: quantize_onnx(path, path.with_suffix(".int8.onnx"), npz, split="train",
                                  num_samples=CALIBRATION_IMAGES, seed=0)
              for form, path in fp32_models.items()}
    plugin = fp32_models["plugin"]
    models["plugin-qoperator"] = quantize_onnx(plugin, plugin.with_suffix(".qoperator.onnx"), npz, split="train",
                                               num_samples=CALIBRATION_IMAGES, seed=0, quant_format="qoperator")
    return models


@pytest.fixture(scope="module")
def val_batches(fp32_models):
    dataset = open_dataset(require_shared(*PNEUMONIAMNIST), split="val", class_names=("normal", "pneumonia"))
    metadata = read_onnx_metadata(fp32_models["plugin"])
    return preprocessed(dataset, metadata, 128, "reading", lambda *_: None).batches, dataset.labels()


@pytest.mark.parametrize("form", ["plugin", "portable", "plugin-qoperator"])
def test_int8_top1_within_half_a_point_of_fp32_on_real_val_split(form, fp32_models, int8_models, val_batches):
    batches, labels = val_batches
    fp32 = top1_accuracy(fp32_models[form.split("-")[0]], batches, labels)
    int8 = top1_accuracy(int8_models[form].path, batches, labels)
    assert fp32 > 85.0, "the official checkpoint should classify PneumoniaMNIST well"
    assert fp32 - int8 <= 0.5, f"{form}: fp32 {fp32:.2f}% → int8 {int8:.2f}% ({describe_cpu()})"


# Run with benchmarks/hide_avx512.c preloaded: what the kernels see, then fp32 and INT8 top-1 on the val split.
TOP1_ON_AVX2_PATHS = """
import json, sys
from pathlib import Path
from medmamba_edge.exporters.quantize import preprocessed, top1_accuracy
from medmamba_edge.runtime import scan_cpu
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.datasets import open_dataset
from medmamba_edge.runtime.metadata import read_onnx_metadata
npz, *models = map(Path, sys.argv[1:])
dataset = open_dataset(npz, split="val", class_names=("normal", "pneumonia"))
metadata = read_onnx_metadata(models[0])
batches = preprocessed(dataset, metadata, 128, "reading", lambda *_: None).batches
print(json.dumps({"cpu": describe_cpu(), "scan_path": scan_cpu.isa(),
                  "top1": [top1_accuracy(m, batches, dataset.labels()) for m in models]}))
"""


def test_int8_top1_on_avx2_code_paths_of_an_avx512_cpu(fp32_models, int8_models, tmp_path):
    """The INT8 models on ONNX Runtime's AVX2 kernels (vpmaddubsw, whose int16 sums saturate where VNNI's int32
    do not), natively on an AVX-512 CPU: benchmarks/hide_avx512.c hides AVX-512 from CPUID. On an AVX2-only CPU
    the accuracy test above runs these kernels itself."""
    library = hidden_avx512.build(tmp_path)
    models = [fp32_models["plugin"], int8_models["plugin"].path, int8_models["plugin-qoperator"].path]
    result = hidden_avx512.run_python(library, TOP1_ON_AVX2_PATHS, str(require_shared(*PNEUMONIAMNIST)),
                                      *map(str, models))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["scan_path"] == "avx2" and "AVX2 (AVX-512, AVX-VNNI and AMX hidden from CPUID)" in seen["cpu"]
    fp32, qdq, qoperator = seen["top1"]
    assert fp32 > 85.0
    assert fp32 - qdq <= 0.5 and fp32 - qoperator <= 0.5, f"{seen['cpu']}: fp32 {fp32:.2f}% → {qdq:.2f}% / {qoperator:.2f}%"


@pytest.mark.parametrize("form", ["plugin", "portable"])
def test_onnx_runtime_runs_every_quantized_matmul_of_the_qdq_model_as_an_int8_kernel(form, fp32_models, int8_models,
                                                                                   tmp_path):
    """No Q/DQ MatMul left for ONNX Runtime's CPU to run in float on weights dequantized every run: each in_proj
    half reads the LayerNorm output through a Q/DQ pair of its own, which ONNX Runtime needs to fuse it."""
    import onnxruntime as ort

    from medmamba_edge.runtime.backends.onnxruntime import custom_ops

    options = custom_ops.fused_session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8_models[form].path), options, providers=["CPUExecutionProvider"])
    optimized = {node.name: node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    quantized = set(int8_models[form].quantized_nodes)
    matmuls = [node.name for node in onnx.load(str(fp32_models[form])).graph.node
               if node.op_type == "MatMul" and node.name in quantized]
    assert len(matmuls) == 3 * 10 + 3
    assert {name: optimized.get(name) for name in matmuls} == dict.fromkeys(matmuls, "MatMulIntegerToFloat")


def test_qoperator_graph_folds_the_relus_and_keeps_matmul_outputs_float(fp32_models, int8_models):
    """QOperator form: each conv branch Relu folded into its QLinearConv's uint8 range, and each MatMul a
    MatMulIntegerToFloat, so no DequantizeLinear → Relu → QuantizeLinear or QLinearMatMul → DequantizeLinear
    is left between the INT8 layers; the scan still reads float."""
    fp32 = onnx.load(str(fp32_models["plugin"]))
    model = onnx.load(str(int8_models["plugin-qoperator"].path))
    ops = [n.op_type for n in fp32.graph.node]
    int8_ops = [n.op_type for n in model.graph.node]
    assert ops.count("Relu") == 30 and "Relu" not in int8_ops
    # Per block in_proj's two halves and out_proj, and the three patch mergings.
    assert int8_ops.count("MatMulIntegerToFloat") == ops.count("MatMul") == 3 * 10 + 3
    assert "QLinearMatMul" not in int8_ops and "MatMul" not in int8_ops
    assert int8_ops.count("QLinearConv") == ops.count("Conv") - 10  # all but the depthwise ones
    producers = _producers(model)
    for node in model.graph.node:
        if node.op_type == scan_node.OP_TYPE:
            assert producers[node.input[0]].op_type != "DequantizeLinear"
    read = {name for node in model.graph.node for name in node.input}
    assert [t.name for t in model.graph.initializer if t.name not in read] == []  # ONNX Runtime warns of each


@pytest.mark.parametrize("form", ["plugin", "portable"])
def test_qdq_graph_quantizes_every_dense_weight_per_channel_and_leaves_the_scan_float(form, fp32_models, int8_models):
    model = onnx.load(str(int8_models[form].path))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = _producers(model)
    # Every Conv/Gemm and every MatMul by a constant weight on the right but the depthwise Convs: 75 in
    # MedMamba-T, the SS2D blocks' x_proj projections (one 1×1 Conv each) and in_proj halves among them.
    fp32 = onnx.load(str(fp32_models[form]))
    expected = [n.name for n in quantizable_nodes(fp32)]
    assert len(expected) == 75 and int8_models[form].quantized_nodes == expected
    depthwise = [n for n in fp32.graph.node if n.op_type == "Conv" and n.name not in expected]
    assert len(depthwise) == 10 and all(a.i > 1 for n in depthwise for a in n.attribute if a.name == "group")
    if form == "plugin":  # x_dbl is the projection's output, reshaped to (batch, rows, L)
        fp32_producers = _producers(fp32)
        projections = {fp32_producers[fp32_producers[n.input[1]].input[0]].name
                       for n in fp32.graph.node if scan_node.is_scan_node(n)}
        assert len(projections) == 10 and projections <= set(expected)
    dense = [n for n in model.graph.node if n.name in expected]
    assert len(dense) == 75
    for node in dense:
        activation, weight = (producers.get(name) for name in node.input[:2])
        assert activation.op_type == "DequantizeLinear" and producers[activation.input[0]].op_type == "QuantizeLinear"
        assert weight.op_type == "DequantizeLinear"
        int8_weight, scale, zero_point = (initializers[name] for name in weight.input)
        out_channels = int8_weight.shape[1] if node.op_type == "MatMul" else int8_weight.shape[0]
        assert int8_weight.dtype == np.int8 and scale.shape == (out_channels,), node.name  # per channel
        # 7-bit weights: what keeps ONNX Runtime's non-VNNI INT8 kernels (AVX2) from saturating
        assert np.abs(int8_weight.astype(np.int32)).max() <= 64, node.name
        assert len(node.input) < 3 or node.input[2] in initializers, "biases stay float (TensorRT's parser)"
    # A Conv's output goes through Q/DQ (ONNX Runtime fuses DQ→Conv→Q into QLinearConv); MatMul/Gemm outputs stay
    # float (DQ→MatMul fuses into MatMulIntegerToFloat).
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    for node in dense:
        if node.op_type == "Conv":
            assert readers[node.output[0]] == ["QuantizeLinear"], node.name
        else:
            assert "QuantizeLinear" not in readers.get(node.output[0], []), node.name
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = initializers[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name  # symmetric
            assert initializers[node.input[1]].dtype == np.float32
    # The scan (an SS2DScan node, or its lowering to standard ops), its inputs and the LayerNorms
    # read float tensors that no DequantizeLinear produced.
    untouched = [n for n in model.graph.node if n.op_type in (scan_node.OP_TYPE, "LayerNormalization", "Softplus")
                 or "/lowered/" in n.name]
    assert len([n for n in untouched if n.op_type == "LayerNormalization"]) == 24
    assert any(n.op_type == scan_node.OP_TYPE for n in untouched) == (form == "plugin")
    for node in untouched:
        assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers), node.name
    metadata = read_onnx_metadata(model)
    assert metadata.precision == "int8" and metadata.scan_form == form
    assert QUANTIZATION_KEY in {p.key for p in model.metadata_props}


def _image_folder(root: Path, split: str, count: int) -> Path:
    data = np.load(require_shared(*PNEUMONIAMNIST))
    for i in range(count):
        label = ("normal", "pneumonia")[int(data[f"{split}_labels"][i, 0])]
        (root / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / label / f"{split}_{i}.png"), data[f"{split}_images"][i])
    return root


def test_gate_refuses_a_damaging_recipe_writes_nothing_and_exits_1(fp32_models, tmp_path):
    # Clipping activations at their median wrecks accuracy: the gate must catch it.
    evaluation = _image_folder(tmp_path / "val", "val", 60)
    output = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib", str(evaluation),
                                      "-o", str(output), "--num-samples", "16", "--percentile", "50",
                                      "--eval", str(evaluation), "--max-drop", "1.0"])
    assert result.exit_code == 1, result.output
    assert "over the --max-drop budget" in result.output and "nothing was written" in result.output
    assert f"({describe_cpu()})" in result.output.replace("\n", " "), "INT8 accuracy depends on the instruction set"
    assert not output.exists() and not list(tmp_path.glob(".model.int8.onnx*"))


def test_auto_fallback_keeps_the_damaged_layers_float_until_within_budget(fp32_models, tmp_path):
    # Only the patch embedding and the first in_proj's x half are quantized, clipped at the median: both hurt,
    # so the fallback has something to find, and at most two steps to take.
    evaluation = _image_folder(tmp_path / "val", "val", 60)
    result = quantize_onnx(fp32_models["plugin"], tmp_path / "model.int8.onnx", evaluation, num_samples=16,
                           percentile=50, exclude=["re:node_(?!conv2d$|linear$).*"], eval_data=evaluation,
                           max_drop=1.0, auto_fallback=True)
    assert result.fallback_nodes and set(result.fallback_nodes) <= {"node_conv2d", "node_linear"}
    assert result.float_top1 - result.int8_top1 <= 1.0 and result.path.exists()
    # The model's record says what the fallback kept float: a count of quantized nodes that left them in passed.
    recorded = json.loads({p.key: p.value for p in onnx.load(str(result.path)).metadata_props}[QUANTIZATION_KEY])
    assert recorded["quantized_nodes"] == len(result.quantized_nodes) == 2 - len(result.fallback_nodes)
    assert recorded["kept_float"] == result.kept_float and set(result.fallback_nodes) <= set(recorded["kept_float"])


LOGGING_APPLICATION = """
import logging, sys, threading
from medmamba_edge.exporters.quantize import quantize_onnx

app, sent, heard, done = logging.getLogger("app"), [0], [], threading.Event()
app.addHandler(logging.Handler())
app.handlers[0].emit = heard.append

def log_while_quantizing():
    while not done.is_set():
        sent[0] += 1
        app.warning("still here")
        print("printed", flush=True)
        done.wait(0.002)

thread = threading.Thread(target=log_while_quantizing)
thread.start()
quantize_onnx(sys.argv[1], sys.argv[2], sys.argv[3], split="val", num_samples=16)
done.set()
thread.join()
print(sent[0], len(heard), logging.getLogger().handlers, flush=True)
logging.basicConfig(level=logging.INFO, format="APP %(message)s", stream=sys.stdout)
app.info("configured")
"""


def test_quantize_leaves_an_applications_logging_as_it_was(fp32_models, tmp_path):
    """onnxruntime.quantization logs through logging.info/warning, which configure a root logger without handlers
    (basicConfig): after quantize_onnx from Python the root had a StreamHandler, and the application's own
    basicConfig(level=INFO, format=...) did nothing, its INFO records lost. And quantize set the root's level to
    ERROR while ONNX Runtime ran, so the warnings of the application's other threads were dropped meanwhile; and
    sys.stdout was swapped for a StringIO, so were their prints."""
    result = subprocess.run([sys.executable, "-c", LOGGING_APPLICATION, str(fp32_models["plugin"]),
                             str(tmp_path / "int8.onnx"), str(require_shared(*PNEUMONIAMNIST))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    *printed, counts, configured = result.stdout.splitlines()
    sent, heard, handlers = counts.split(" ", 2)
    assert int(sent) > 10 and heard == sent and handlers == "[]" and configured == "APP configured"
    # Its thread's prints all on its stdout (a sys.stdout swapped meanwhile would lose them), ONNX Runtime's chatter not.
    assert printed == ["printed"] * int(sent)


TWO_QUANTIZES_AT_ONCE = """
import logging, threading
from onnxruntime.quantization.quant_utils import write_calibration_table
from medmamba_edge.exporters.quantize import _quiet

first_in, first_out = threading.Event(), threading.Event()

def first():
    with _quiet():
        first_in.set()
        first_out.wait()

thread = threading.Thread(target=first)
thread.start()
first_in.wait()
with _quiet():
    first_out.set()
    thread.join()
    write_calibration_table({})  # ONNX Runtime's logging.info, the first quantize done
print(logging.getLogger().handlers, logging.getLogger().filters)
"""


def test_two_quantizes_at_once_leave_the_applications_root_logger_as_it_was(tmp_path):
    """The quieting's filter and lent handler are on the process's root logger: two quantize_onnx calls at once, an
    application's threads, each set up and took off their own, so the first to finish took the second's, and ONNX
    Runtime's logging.info in the second then called basicConfig: a StreamHandler on the application's root."""
    result = subprocess.run([sys.executable, "-c", TWO_QUANTIZES_AT_ONCE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[] []\n" and result.stderr == ""


INTERRUPTED_AS_IT_QUIETS = """
import logging
from medmamba_edge.exporters.quantize import _quiet, _quiet_root_logger

class InterruptedAfterRelease:
    # A Ctrl-C's KeyboardInterrupt lands after a call: here after the lock's release, the root filter on.
    def __init__(self, lock):
        self.lock, self.armed = lock, True
    def __enter__(self):
        return self.lock.__enter__()
    def __exit__(self, *exc):
        self.lock.__exit__(*exc)
        if self.armed and logging.getLogger().filters:
            self.armed = False
            raise KeyboardInterrupt

root = logging.getLogger()
_quiet_root_logger._lock = InterruptedAfterRelease(_quiet_root_logger._lock)
try:
    with _quiet():
        print("inside")
except KeyboardInterrupt:
    print(root.handlers, root.filters)
with _quiet():  # a later quantize, set up and undone as usual
    pass
print(root.handlers, root.filters)
"""


def test_a_ctrl_c_as_quantize_quiets_the_root_logger_leaves_it_as_it_was(tmp_path):
    """A KeyboardInterrupt landing right after the quieting was set up (the lock's release, before the try that
    undoes it) left its filter and lent handler on the application's root for good, counted as a quantize still
    inside, so that no later one took them off."""
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_AS_IT_QUIETS], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[] []\n[] []\n" and result.stderr == ""


INTERRUPTED_INSIDE_THE_QUIETING = """
import _thread
import logging
from medmamba_edge.exporters.quantize import _quiet

root = logging.getLogger()
add_filter = root.addFilter

def add_filter_then_ctrl_c(f):
    # A Ctrl-C pending as the filter goes on lands at the next call's end: inside the quieting's making.
    add_filter(f)
    _thread.interrupt_main()

root.addFilter = add_filter_then_ctrl_c
try:
    with _quiet():
        print("inside")
except KeyboardInterrupt:
    print(root.handlers, root.filters)
root.addFilter = add_filter
with _quiet():  # a later quantize, set up and undone as usual
    pass
print(root.handlers, root.filters)
"""


def test_a_ctrl_c_inside_the_quietings_making_leaves_the_root_logger_as_it_was(tmp_path):
    """A KeyboardInterrupt landing inside the quieting's making, after the handler was lent and the filter set,
    left both on the application's root: the making had not yet returned what undoes them. The lent handler then
    stayed for good, a later quantize finding a handler there and lending none of its own to take off."""
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_INSIDE_THE_QUIETING], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[] []\n[] []\n" and result.stderr == ""


INTERRUPTED_AS_THE_QUIETING_ENDS = """
import _thread, inspect, logging, sys, threading, time
from medmamba_edge.exporters.quantize import _quiet, _quiet_root_logger

root, main = logging.getLogger(), threading.main_thread().ident
code = type(_quiet_root_logger).__call__.__wrapped__.__code__
lines, first = inspect.getsourcelines(code)
leaving = first + max(i for i, line in enumerate(lines) if line.strip() == "with self._lock:")

def waiting_for_the_lock():
    frame = sys._current_frames().get(main)
    return frame is not None and frame.f_code is code and frame.f_lineno == leaving

def another_quantize_holding_the_lock(held):
    with _quiet_root_logger._lock:  # as it makes or undoes its own
        held.set()
        while not waiting_for_the_lock():
            time.sleep(0.01)
        _thread.interrupt_main()  # a Ctrl-C, pending as the main thread gets the lock

try:
    with _quiet():
        held = threading.Event()
        other = threading.Thread(target=another_quantize_holding_the_lock, args=(held,))
        other.start()
        held.wait()
except KeyboardInterrupt:
    print(root.handlers, root.filters)
other.join()
with _quiet():  # a later quantize, set up and undone as usual
    pass
print(root.handlers, root.filters)
"""


def test_a_ctrl_c_as_the_quieting_is_undone_is_undone_by_the_next_quantize(tmp_path):
    """A KeyboardInterrupt pending as the last quantize out got the lock (another's quieting held it) landed as its
    undoing began, before any step: the quieting left on with no quantize inside. The next quantize made its own
    over it, taking the lent handler for the application's and leaving it there for good; it now finishes the
    undoing first."""
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_AS_THE_QUIETING_ENDS], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[] []" and result.stderr == "", result.stdout


def test_a_drop_equal_to_the_budget_passes_as_evaluate_passes_it(bundled32, tmp_path, monkeypatch):
    """984 and 979 right of 1000: 98.4 − 97.9 is 0.5000000000000142 in floats, and --max-drop 0.5 refused it (evaluate,
    which rounds, passed the same two models), and --auto-fallback kept three layers float for nothing."""
    import medmamba_edge.exporters.quantize as quantize

    evaluation = _image_folder(tmp_path / "val", "val", 8)
    # 27 images more wrong of 524: 5.152671755725191 points, which the rounding took up past that exact budget
    for (before, after, total), budget in (((984, 979, 1000), 0.5), ((497, 470, 524), 100 * 27 / 524)):
        scores = iter([100 * (before / total), 100 * (after / total)])
        monkeypatch.setattr(quantize, "top1_accuracy", lambda *args, **kwargs: next(scores))
        result = quantize_onnx(bundled32, tmp_path / "q.int8.onnx", evaluation, num_samples=4, eval_data=evaluation,
                               max_drop=budget, auto_fallback=True)
        assert result.fallback_nodes == [] and result.path.exists()


def test_a_drop_just_over_the_budget_never_reads_as_equal_to_it(bundled32, monkeypatch):
    """96 of 524 val images more wrong, 18.3206 points: the refusal read "18.32 points below ... over the --max-drop
    budget of 18.32" (4 digits). Now the drop is printed to as many digits as tell it from the budget, and as images."""
    import medmamba_edge.exporters.quantize as quantize

    npz = require_shared(*PNEUMONIAMNIST)  # its val split: 524 images
    for budget in (18.32, 18.3206, 100 * 96 / 524 - 2e-9):
        scores = iter([100.0, 100 * 428 / 524])
        monkeypatch.setattr(quantize, "top1_accuracy", lambda *args, **kwargs: next(scores))
        with pytest.raises(QuantizeError, match=r"\(96 of 524 images\) below fp32") as refused:
            quantize_onnx(bundled32, bundled32.with_name("drop.int8.onnx"), npz, num_samples=4, eval_data=npz,
                          max_drop=budget)
        drop, shown = re.search(r"is ([\d.]+) points .* budget of ([\d.]+);", str(refused.value)).groups()
        assert float(drop) > float(shown) and float(shown) == pytest.approx(budget, abs=1e-4), str(refused.value)
        assert not bundled32.with_name("drop.int8.onnx").exists()
    # Images counted to the nearest: 64 of 524 more wrong come back from the percentages as 63.99999999999999.
    scores = iter([100 * 400 / 524, 100 * 336 / 524])
    monkeypatch.setattr(quantize, "top1_accuracy", lambda *args, **kwargs: next(scores))
    with pytest.raises(QuantizeError, match=r"\(64 of 524 images\) below fp32"):
        quantize_onnx(bundled32, bundled32.with_name("drop.int8.onnx"), npz, num_samples=4, eval_data=npz, max_drop=1)


def test_a_drop_within_the_budget_never_reads_as_over_it(bundled32, tmp_path, monkeypatch):
    """2 of 120 images more wrong, 1.6667 points, passed --max-drop 1.667 and printed "drop 1.67 points, budget
    1.667" (.2f): over the budget it had passed."""
    import medmamba_edge.exporters.quantize as quantize

    scores = iter([100 * 116 / 120, 100 * 114 / 120])
    monkeypatch.setattr(quantize, "top1_accuracy", lambda *args, **kwargs: next(scores))
    evaluation = _image_folder(tmp_path / "val", "val", 4)
    result = CliRunner().invoke(app, ["quantize", str(bundled32), "--calib", str(evaluation), "--num-samples", "4",
                                      "--eval", str(evaluation), "--max-drop", "1.667", "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 0, result.output
    drop, budget = re.search(r"\(drop ([\d.]+) points, budget ([\d.]+)\)", result.output).groups()
    assert float(drop) < float(budget) == 1.667, result.output


def test_a_drop_passed_as_equal_to_the_budget_never_reads_as_over_it(bundled32, tmp_path, monkeypatch):
    """27 of 524 images more wrong, 5.152671755725191 points, rounded up to 5.152671756: passed as equal to that
    exact --max-drop (over_budget), and printed "drop 5.153 points, budget 5.15267"."""
    import medmamba_edge.exporters.quantize as quantize

    scores = iter([100 * 497 / 524, 100 * 470 / 524])
    monkeypatch.setattr(quantize, "top1_accuracy", lambda *args, **kwargs: next(scores))
    evaluation = _image_folder(tmp_path / "val", "val", 4)
    result = CliRunner().invoke(app, ["quantize", str(bundled32), "--calib", str(evaluation), "--num-samples", "4",
                                      "--eval", str(evaluation), "--max-drop", repr(100 * 27 / 524),
                                      "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 0, result.output
    drop, budget = re.search(r"\(drop ([\d.]+) points, budget ([\d.]+)\)", result.output).groups()
    assert float(drop) <= float(budget), result.output


def test_an_evaluation_set_without_a_usable_image_is_refused_before_calibrating(bundled32, tmp_path, monkeypatch):
    """Its images were read only after the calibration: 47 s at 224×224 with 64 images, minutes with 256."""
    import medmamba_edge.exporters.quantize as quantize
    from medmamba_edge.exporters.quantize import QuantizeError

    monkeypatch.setattr(quantize, "calibrate", lambda *args, **kwargs: pytest.fail("calibrated first"))
    (tmp_path / "bad" / "normal").mkdir(parents=True)
    (tmp_path / "bad" / "normal" / "scan.png").write_text("not a png")
    with pytest.raises(QuantizeError, match=r"none of its 1 image could be used \(first: .*scan\.png: not a decodable"):
        quantize_onnx(bundled32, tmp_path / "q.int8.onnx", _image_folder(tmp_path / "cal", "val", 4), num_samples=4,
                      eval_data=tmp_path / "bad")


def test_gates_without_the_op_library_refuse_before_calibrating(bundled32, tmp_path, monkeypatch):
    """Installed without a C compiler, a plugin-form model's gates failed only after the calibration (minutes at
    224×224); the portable lowering quantizes it, but the gates run the model as it is."""
    import medmamba_edge.exporters.quantize as quantize
    from medmamba_edge.exporters.quantize import QuantizeError

    monkeypatch.setattr(custom_ops, "LIBRARY_NAME", "libmedmamba_ort_ops_absent.so")
    monkeypatch.setattr(quantize, "calibrate", lambda *args, **kwargs: pytest.fail("calibrated first"))
    evaluation = _image_folder(tmp_path / "val", "val", 8)
    for gate in (dict(eval_data=evaluation), dict(min_speedup=1.0, speed_check=lambda *args: None)):
        with pytest.raises(QuantizeError, match=r"tiny\.onnx: the accuracy and speed gates run it, and a plugin-form "
                                                r"model .* libmedmamba_ort_ops_absent\.so, which is not built"):
            quantize_onnx(bundled32, tmp_path / "q.int8.onnx", evaluation, num_samples=4, **gate)


def test_auto_fallback_finds_the_late_layer_that_alone_costs_the_budget(tmp_path):
    """Ranked inside the all-INT8 model (output error minus input error), the final linear that alone cost 0.95
    points ranked last: the fallback kept 39 of 40 layers float and failed. Ranked by what each costs alone, it
    passes with a few."""
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    npz = require_shared(*PNEUMONIAMNIST)
    model = tmp_path / "b3.onnx"
    export_onnx(bundled_checkpoint(), model, input_size=32, batch=3, verify=False)
    result = quantize_onnx(model, tmp_path / "b3.int8.onnx", npz, num_samples=32, percentile=90, eval_data=npz,
                           max_drop=0.5, auto_fallback=True)
    assert result.float_top1 - result.int8_top1 <= 0.5 and result.path.exists()
    assert 0 < len(result.fallback_nodes) <= 20, result.fallback_nodes


def test_a_batch_1_export_calibrates_as_its_dynamic_batch_twin(tmp_path):
    # The histogram calibrators' bins depend on how the data is grouped into runs; grouped by the model's
    # batch, a batch-1 export got other ranges (47 of 96 scales, by up to 25 %) and another INT8 model.
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    scales = {}
    for batch in (1, None):
        fp32 = tmp_path / f"b{batch}.onnx"
        export_onnx(bundled_checkpoint(), fp32, input_size=32, batch=batch, verify=False)
        int8 = quantize_onnx(fp32, tmp_path / f"b{batch}.int8.onnx", require_shared(*PNEUMONIAMNIST), split="train",
                             num_samples=20).path  # 20: the last group of 8 is short
        # By value: the two traces name some tensors differently
        scales[batch] = sorted(float(v) for t in onnx.load(int8).graph.initializer if t.name.endswith("_scale")
                               for v in numpy_helper.to_array(t).ravel())
    # Equal up to float rounding: the activations themselves may differ in the last bits between batch sizes.
    assert len(scales[1]) > 100 and np.allclose(scales[1], scales[None], rtol=1e-5, atol=0)


def test_calibration_runs_no_more_threads_than_the_cpus_this_process_may_use(bundled32):
    """onnxruntime's calibrator opened its session with ONNX Runtime's default threads, which ignore the affinity
    mask: on 1 of 2 CPUs it calibrated on 2 threads, a 224×224 model 1.8 times slower (9.3 s against 5.2)."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and 2 CPUs to restrict the process to one")
    script = """
import os, sys
from pathlib import Path
import numpy as np, onnx
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import onnxruntime.quantization.calibrate  # importing onnxruntime starts threads of its own
from medmamba_edge.exporters.portable import lower_ss2d_scan
from medmamba_edge.exporters.quantize import calibrate
model = lower_ss2d_scan(onnx.load(sys.argv[1]))
before = len(os.listdir("/proc/self/task"))
started = []
calibrate(model, [[np.zeros((2, 3, 32, 32), np.float32)]], model.graph.input[0].name, "minmax", 99.9,
          Path(sys.argv[2]), lambda *_: started.append(len(os.listdir("/proc/self/task")) - before))
print(started[0])
"""
    result = subprocess.run([sys.executable, "-c", script, str(bundled32), str(bundled32.with_suffix(".cache"))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 0, "the calibrator's session started a pool thread for a second CPU"


@pytest.mark.parametrize("count, fixed, sizes, used", [
    (20, None, [[8], [8], [4]], 20),
    (20, 1, [[1] * 8, [1] * 8, [1] * 4], 20),  # the dynamic twin's groups, one image per run
    (20, 3, [[3, 3, 3], [3, 3, 3]], 18),  # 2 images past the last whole batch: left out, not padded
    (20, 8, [[8], [8]], 16),
    (2, 3, [[3]], 2),  # fewer than one batch: padding is the only way to run them
])
def test_calibration_groups_take_whole_fixed_batches_without_counting_copies(count, fixed, sizes, used):
    images = np.arange(count, dtype=np.float32).reshape(count, 1, 1, 1)
    groups, counted = calibration_groups([images[:7], images[7:]], fixed)
    assert [[len(b) for b in group] for group in groups] == sizes and counted == used
    seen = np.concatenate([b for group in groups for b in group]).ravel()
    assert len(set(seen.tolist())) == used and (count < (fixed or 1) or len(seen) == used)


@pytest.fixture(scope="module")
def bundled32_batch3(tmp_path_factory):
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    path = tmp_path_factory.mktemp("batch3") / "b3.onnx"
    export_onnx(bundled_checkpoint(), path, input_size=32, batch=3, verify=False)
    return path


def test_a_fixed_batch_export_says_how_many_images_its_whole_batches_left_out(bundled32_batch3, tmp_path):
    fp32 = bundled32_batch3
    output = tmp_path / "b3.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32), "--calib", str(require_shared(*PNEUMONIAMNIST)),
                                      "-o", str(output), "--num-samples", "20"])
    assert result.exit_code == 0, result.output
    assert "calibrated on 18 images" in result.output
    assert "left out 2 usable calibration images past the model's last whole batch of 3" in result.output
    recorded = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])
    assert recorded["calibration_images"] == 18
    assert recorded["left_out"] == {"calibration": 0, "calibration_past_last_whole_batch": 2}


def test_unusable_images_are_left_out_by_name_as_evaluate_leaves_them(fp32_models, tmp_path):
    """Once the first broken file stopped `quantize --eval` with an error, where `evaluate` leaves it out."""
    folder = _image_folder(tmp_path / "val", "val", 40)
    (folder / "normal" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (folder / "pneumonia" / "empty.png").write_bytes(b"")
    output = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib", str(folder), "-o",
                                      str(output), "--num-samples", "64", "--eval", str(folder)])
    assert result.exit_code == 0, result.output
    assert "calibrated on 40 images" in result.output
    for stage in ("calibration", "evaluation"):
        assert f"2 images could not be used, left out of {stage}" in result.output
    assert result.output.count("torn.png") == 2 and result.output.count("empty.png") == 2
    recorded = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])
    # How many, not which: file names in medical data sets often carry patient identifiers.
    assert recorded["left_out"] == {"calibration": 2, "evaluation": 2} and "torn.png" not in json.dumps(recorded)
    assert recorded["calibration_images"] == 40
    # The labels stay in step with the images kept: evaluate, leaving out the same two, measures the same top-1.
    report = evaluation_module.evaluate([fp32_models["plugin"]], folder)
    assert len(report.failures) == 2
    assert recorded["fp32_top1"] == pytest.approx(100 * report.models[0].metrics.accuracy)


def test_unusable_calibration_images_are_replaced_from_the_same_random_draw(bundled32, tmp_path):
    """--num-samples was drawn before the broken images were left out: 12 good PNGs and 3 broken calibrated on 8
    of --num-samples 10. Now the next images of the seed's random order take their place, until the set runs out."""
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"good{i}.png"), rng.integers(0, 256, (28, 28), dtype=np.uint8))
    for i in range(3):
        (folder / f"broken{i}.png").write_bytes(b"not a png")
    drawn = [Path(s.source).name for s in open_dataset(folder).sample(5, seed=0).samples]
    assert any(name.startswith("broken") for name in drawn), drawn  # else this test tests nothing
    for num_samples, used in ((1, 1), (5, 5), (8, 6)):
        output = tmp_path / f"q{num_samples}.int8.onnx"
        result = CliRunner().invoke(app, ["quantize", str(bundled32), "--calib", str(folder), "-o", str(output),
                                          "--num-samples", str(num_samples)])
        assert result.exit_code == 0, result.output
        assert (f"calibrated on {used} images)" if used > 1 else "calibrated on 1 image)") in result.output
        ran_out = "the calibration set ran out of usable images: 6 of the 8 --num-samples asked for"
        assert (ran_out in result.output.replace("\n", " ")) == (num_samples == 8), result.output
        recorded = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])
        assert recorded["calibration_images"] == used and recorded["num_samples"] == num_samples


def test_a_refusing_gate_still_names_the_images_it_left_out(fp32_models, tmp_path):
    folder = _image_folder(tmp_path / "val", "val", 24)
    (folder / "normal" / "torn.png").write_bytes(b"not a png")
    output = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib", str(folder), "-o",
                                      str(output), "--num-samples", "16", "--percentile", "50", "--eval", str(folder)])
    assert result.exit_code == 1 and not output.exists()
    assert "left out of evaluation" in result.output and "torn.png: not a decodable image" in result.output
    assert "(ImageFolder, 25 images), 1 of them left out (" in result.output.replace("\n", " ")


def test_gate_passes_with_the_default_recipe_and_records_accuracy(fp32_models, tmp_path):
    evaluation = _image_folder(tmp_path / "val", "val", 60)
    output = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib",
                                      str(require_shared(*PNEUMONIAMNIST)), "-o", str(output),
                                      "--num-samples", "32", "--eval", str(evaluation)])
    assert result.exit_code == 0, result.output
    assert "top-1: fp32" in result.output and f"on {describe_cpu()}" in result.output.replace("\n", " ")
    recorded = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])
    assert recorded["evaluated_on"] == describe_cpu() and recorded["weights"] == WEIGHT_RANGE


def _broken_image_folder(tmp: Path) -> Path:
    (tmp / "broken").mkdir()
    (tmp / "broken" / "a.png").write_bytes(b"not a png")
    return tmp / "broken"


@pytest.mark.parametrize("make_calib, message", [
    (lambda tmp: tmp / "missing", "no such file or folder"),
    (_broken_image_folder, "not a decodable image"),
    (lambda tmp: tmp / "nope.npz", "no split"),
])
def test_bad_calibration_data_is_a_one_line_error(fp32_models, tmp_path, make_calib, message):
    np.savez(tmp_path / "nope.npz", test_images=np.zeros((2, 28, 28), np.uint8))
    output = tmp_path / "out.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib", str(make_calib(tmp_path)),
                                      "-o", str(output)])
    assert result.exit_code == 1
    assert message in result.output and result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not output.exists()


def test_speed_gate_refuses_an_int8_model_below_the_asked_speedup_and_writes_nothing(fp32_models, tmp_path):
    # No INT8 kernel is 1000x faster than fp32: the gate must time both and refuse.
    output = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib",
                                      str(require_shared(*PNEUMONIAMNIST)), "-o", str(output), "--num-samples", "16",
                                      "--min-speedup", "1000"])
    message = result.output.replace("\n", " ")
    assert result.exit_code == 1, result.output
    assert "below --min-speedup 1000; nothing was written" in message and "× over 10 rounds)" in message
    assert f"on {describe_cpu()}" in message, "INT8 speed depends on the instruction set"
    assert not output.exists() and not list(tmp_path.glob(".model.int8.onnx*"))


def test_speed_gate_records_both_medians_and_the_cpu_when_it_passes(fp32_models, tmp_path):
    output = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib",
                                      str(require_shared(*PNEUMONIAMNIST)), "-o", str(output), "--num-samples", "16",
                                      "--min-speedup", "0.01", "--speed-batch", "2"])
    assert result.exit_code == 0, result.output
    assert "speed at batch 2: fp32" in result.output
    speed = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])["speed"]
    assert speed["batch"] == 2 and speed["measured_on"] == describe_cpu()
    assert speed["fp32_ms"] > 0 and speed["int8_ms"] > 0
    assert speed["speedup"] == pytest.approx(speed["fp32_ms"] / speed["int8_ms"])
    assert 0.01 <= speed["interval"][0] <= speed["interval"][1] and speed["interval_percent"] == 90
    assert speed["rounds"] == 10 and speed["runs_per_round"] == 3 and speed["within_noise"] is False
    assert f"{speed['speedup']:.3g}× (90% interval " in result.output.replace("\n", " ")


def _speed(fp32_ms, int8_ms, jitter=0.02, runs=3):
    """A SpeedCheck of synthetic timings: per round, both models' typical milliseconds, each run off by ±jitter."""
    from medmamba_edge.exporters.quantize import SpeedCheck

    noise = 1 + jitter * np.random.default_rng(1).uniform(-1, 1, (2, len(fp32_ms), runs))
    return SpeedCheck(1, (np.asarray(fp32_ms, float)[:, None] * noise[0]).tolist(),
                      (np.asarray(int8_ms, float)[:, None] * noise[1]).tolist(), "test CPU", "1")


def test_the_speed_verdict_keeps_refuses_or_decides_within_the_noise_on_the_interval_of_the_rounds():
    """Four runs of one command compared the two medians alone to --min-speedup 1.0: one refused (0.89×), three
    passed (1.21×, 1.25×, 1.01×). The verdict now reads an interval of the speedup over the rounds."""
    from medmamba_edge.exporters.quantize import speed_verdict

    steady = _speed([10.0] * 10, [8.0] * 10)  # 1.25×
    low, high = steady.interval()
    assert low < 1.25 < high and high - low < 0.05 and steady.interval() == (low, high)  # seeded
    assert speed_verdict(steady, 1.0) == (True, False) and speed_verdict(steady, 1.5) == (False, False)
    # Load that comes and goes between rounds slows both models of a round alike: paired by round, the ratio holds.
    load = np.array([1, 2, 1.2, 3, 1, 1.5, 2.5, 1, 1.1, 2])
    swinging = _speed(10.0 * load, 8.0 * load)
    assert swinging.interval()[1] - swinging.interval()[0] < 0.1 and speed_verdict(swinging, 1.2) == (True, False)
    # Rounds at 0.89× and at 1.25×: the interval straddles 1.0, so the median decides, within the noise.
    mixed = [1 / 0.89, 1 / 1.25]
    for ratios, passes in ((mixed * 5 + [1 / 1.25] * 2, True), (mixed * 5 + [1 / 0.89] * 2, False)):
        check = _speed([10.0] * 12, 10.0 * np.array(ratios), jitter=0.0)
        low, high = check.interval()
        assert low < 1.0 <= high and speed_verdict(check, 1.0) == (passes, True), (low, high)
        assert check.record(1.0)["within_noise"] is True and check.record(1.0)["interval"] == [low, high]
    assert "90% interval 0.89–1.25× over 12 rounds" in check.describe(1.0)


def test_the_speed_check_times_more_rounds_only_while_the_interval_straddles_the_asked_speedup(monkeypatch):
    """Up to three times the rounds; a clear verdict stops at the first ten."""
    import contextlib

    from medmamba_edge import benchmarking

    class Worker:
        def __init__(self, ms):
            self.ms, self.ready = iter(ms), {"fixed_batch": None}

        def request(self, message):
            return {"ms": [next(self.ms)] * message["iterations"]}

    for int8_ms, rounds in (([8.0] * 99, 10), (([8.0, 12.0] * 50), 30)):
        monkeypatch.setattr(benchmarking, "_loaded", lambda *args: contextlib.nullcontext(
            [Worker([10.0] * 99), Worker(int8_ms)]))
        check = benchmarking.speed_check(1)(Path("fp32.onnx"), Path("int8.onnx"), 1.0)
        assert len(check.fp32_rounds) == len(check.int8_rounds) == rounds
        assert check.batch_label == "1" and check.measured_on == describe_cpu()


def test_the_speed_gate_times_a_fixed_batch_model_at_its_batch_and_labels_another_as_benchmark_does(
        bundled32_batch3, tmp_path):
    """Exported with --batch 3, it was timed "at batch 1" and recorded so, though each run was a padded batch of 3
    (benchmark labels that "1 (1×3, 2 padded)")."""
    calib = str(require_shared(*PNEUMONIAMNIST))
    for option, label in (([], "3"), (["--speed-batch", "2"], "2 (1×3, 1 padded)")):
        output = tmp_path / "b3.int8.onnx"
        result = CliRunner().invoke(app, ["quantize", str(bundled32_batch3), "--calib", calib, "-o", str(output),
                                          "--num-samples", "6", "--min-speedup", "0.01", *option])
        assert result.exit_code == 0, result.output
        assert f"speed at batch {label}: fp32" in result.output
        speed = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])["speed"]
        assert speed["batch"] == int(label[0]) and speed["batch_label"] == label


@pytest.mark.parametrize("option, message", [(["--min-speedup", "0"], "--min-speedup must be a finite number > 0"),
                                             (["--min-speedup", "inf"], "--min-speedup must be a finite number > 0"),
                                             (["--min-speedup", "1", "--speed-batch", "0"], "--speed-batch must be >= 1")])
def test_bad_speed_gate_options_are_one_line_errors(fp32_models, tmp_path, option, message):
    output = tmp_path / "out.onnx"
    result = CliRunner().invoke(app, ["quantize", str(fp32_models["plugin"]), "--calib", str(tmp_path), "-o",
                                      str(output), *option])
    assert result.exit_code == 1 and message in result.output and result.output.strip().count("\n") == 0
    assert not output.exists()


def test_requests_that_would_silently_go_wrong_are_one_line_errors(fp32_models, tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(fp32_models["plugin"], model)
    np.savez(tmp_path / "calib.npz", train_images=np.full((4, 28, 28), 128, np.uint8),
             train_labels=np.zeros((4, 1), np.int64), val_images=np.full((4, 28, 28), 128, np.uint8),
             val_labels=np.zeros((4, 1), np.int64))
    np.savez(tmp_path / "f255.npz", train_images=np.full((4, 28, 28), 128, np.float32))
    calib = ["--calib", str(tmp_path / "calib.npz")]
    cases = [
        # NaN passed "max_drop < 0" and then every gate comparison
        ([*calib, "--eval", str(tmp_path / "calib.npz"), "--max-drop", "nan"], "--max-drop must be a finite number ≥ 0, got nan"),
        ([*calib, "--num-samples", "2", "--seed", "-1"], "--seed must be >= 0, got -1"),
        ([*calib, "-o", str(model)], "m.onnx: the output would overwrite a file this command reads"),
        (["--calib", str(tmp_path / "f255.npz")], "has float32 pixels from 128 to 128; expected 0..1"),
        # Checked before calibrating (minutes at 224×224), not after.
        ([*calib, "--eval", str(tmp_path / "absent")], "absent: no such file or folder"),
        ([*calib, "--exclude", "*"], "--exclude leaves none of the"),
        ([*calib, "-o", str(tmp_path / "q.pth")], "q.pth: the INT8 model is ONNX; name it *.onnx"),
        ([*calib], "the metadata does not fit the model graph: input_size is 64×64 but the graph takes 32×32"),
        # Options that mean something only with another were silently ignored without it.
        ([*calib, "--speed-batch", "-5"], "--speed-batch applies only with --min-speedup"),
        ([*calib, "--max-drop", "0"], "--max-drop applies only with --eval DATA"),  # 0 is given, not absent
        ([*calib, "--eval-split", "bogus"], "--eval-split applies only with --eval"),
        # A split for a folder is refused naming the option given, where it said --split of --eval-split's.
        ([*calib, "--eval", str(tmp_path), "--eval-split", "val"], "--eval-split val applies to a MedMNIST .npz"),
        ([*calib, "--method", "minmax", "--percentile", "50"], "--percentile applies only with --method percentile"),
    ]
    mismatched = onnx.load(str(model))
    write_onnx_metadata(mismatched, read_onnx_metadata(mismatched).replace(input_size=(64, 64)))
    onnx.save(mismatched, tmp_path / "m64.onnx")
    before = model.read_bytes()
    for args, message in cases:
        output = tmp_path / "out.onnx"
        source = tmp_path / "m64.onnx" if "64×64" in message else model
        result = CliRunner().invoke(app, ["quantize", str(source), "-o", str(output), *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0 and not output.exists()
    assert model.read_bytes() == before


@pytest.fixture(scope="module")
def bundled32(tmp_path_factory):
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    path = tmp_path_factory.mktemp("bundled") / "tiny.onnx"
    export_onnx(bundled_checkpoint(), path, input_size=32, batch=None, verify=False)
    return path


@pytest.fixture(scope="module")
def bundled_opset21(tmp_path_factory):
    from medmamba_edge.runtime.bundled import bundled_checkpoint

    path = tmp_path_factory.mktemp("opset21") / "tiny21.onnx"
    export_onnx(bundled_checkpoint(), path, input_size=32, batch=None, opset=21, verify=False)
    return path


def test_an_int8_model_onnx_runtime_cannot_load_is_never_written(bundled_opset21, tmp_path):
    """ONNX Runtime 1.32 refuses the Q/DQ graph its quantizer writes at opset 21 (a Q/DQ propagation bug in its
    optimizer); that file was written, exit 0. Whatever a later version does, no unloadable file is written."""
    from medmamba_edge.runtime.backends import open_backend
    from medmamba_edge.runtime.bundled import sample_image_paths

    output = tmp_path / "q.int8.onnx"
    calib = str(sample_image_paths("pneumoniamnist")[0].parent)
    result = CliRunner().invoke(app, ["quantize", str(bundled_opset21), "--calib", calib, "-o", str(output)])
    if result.exit_code == 0:
        assert open_backend(output).metadata.precision == "int8"
    else:
        assert "tiny21.onnx: its INT8 model does not load in ONNX Runtime" in result.output, result.output
        assert "export it again with --opset 20" in result.output and result.output.strip().count("\n") == 0
        assert not output.exists()


@pytest.mark.parametrize("gates", [["--eval", "{folder}", "--max-drop", "100"],
                                   ["--eval", "{folder}", "--max-drop", "100", "--auto-fallback"],
                                   ["--min-speedup", "0.01"]], ids=["eval", "eval-fallback", "speed"])
def test_an_int8_model_that_does_not_load_is_refused_in_the_same_words_with_the_gates(bundled_opset21, tmp_path,
                                                                                       gates):
    """With --eval the accuracy gate's session of the candidate is its load check (check_loads made another one
    first): the refusal reads as without the gates, before fp32 is evaluated."""
    from medmamba_edge.runtime.backends import open_backend

    folder = _image_folder(tmp_path / "val", "val", 4)
    output = tmp_path / "q.int8.onnx"
    plain = CliRunner().invoke(app, ["quantize", str(bundled_opset21), "--calib", str(folder), "-o", str(output),
                                     "--num-samples", "4"])
    if plain.exit_code == 0:  # a later ONNX Runtime loads it: nothing to compare
        assert open_backend(output).metadata.precision == "int8"
        pytest.skip("this ONNX Runtime loads the opset-21 INT8 model")
    refused = plain.output.strip().splitlines()[-1]
    assert "its INT8 model does not load in ONNX Runtime" in refused, plain.output
    evaluated = []
    with pytest.MonkeyPatch.context() as patch:
        import medmamba_edge.exporters.quantize as quantize

        patch.setattr(quantize, "top1_accuracy", lambda *args, **kwargs: evaluated.append(args) or 100.0)
        result = CliRunner().invoke(app, ["quantize", str(bundled_opset21), "--calib", str(folder), "-o", str(output),
                                          "--num-samples", "4", *[a.format(folder=folder) for a in gates]])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == refused, result.output
    assert evaluated == [] and not output.exists()


def test_the_accuracy_gate_loads_the_int8_candidate_once(bundled32, tmp_path, monkeypatch):
    """check_loads made an ONNX Runtime session of the candidate only to see it load, then the gate made its own
    (0.2-0.4 s more per quantize). Without a gate check_loads is the one load, and still made."""
    made = []
    real = custom_ops.make_session

    def counting(model, *args, **kwargs):
        made.append("candidate" if isinstance(model, onnx.ModelProto) or "candidate" in str(model) else "fp32")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(custom_ops, "make_session", counting)
    folder = _image_folder(tmp_path / "val", "val", 4)
    quantize_onnx(bundled32, tmp_path / "gated.int8.onnx", folder, num_samples=4, eval_data=folder, max_drop=100)
    assert sorted(made) == ["candidate", "fp32"], made
    made.clear()
    quantize_onnx(bundled32, tmp_path / "plain.int8.onnx", folder, num_samples=4)
    assert made == ["candidate"], made


def test_the_overlap_count_and_the_sensitivity_ranking_read_the_calibration_batches_in_order(bundled32, tmp_path,
                                                                                              monkeypatch):
    """The calibration groups were flattened twice (once for the overlap count, once for --auto-fallback's
    ranking); flattened once now, both still read the model's batches in calibration order."""
    import medmamba_edge.exporters.quantize as quantize

    folder = _image_folder(tmp_path / "val", "val", 40)
    ranked_on, overlap = [], []
    scores = iter([100.0, 0.0] + [100.0] * 99)  # the first candidate over the budget, the next one within it
    monkeypatch.setattr(quantize, "top1_accuracy", lambda *args, **kwargs: next(scores))
    monkeypatch.setattr(quantize, "rank_by_sensitivity",
                        lambda model, alone, nodes, inputs, name, progress: ranked_on.extend(inputs) or list(nodes))
    result = quantize_onnx(bundled32, tmp_path / "q.int8.onnx", folder, num_samples=40, eval_data=folder,
                           auto_fallback=True, also_calibrated=lambda overlapping, evaluated: overlap.append(overlapping))
    assert len(result.fallback_nodes) == 1 and overlap == [40]
    metadata = read_onnx_metadata(bundled32)
    read = quantize.calibration_inputs(open_dataset(folder), 40, 0, metadata, lambda *args: None)
    groups, images = calibration_groups(read.batches, metadata.batch)
    assert images == 40 and [len(b) for b in ranked_on] == [8] * 4  # SENSITIVITY_IMAGES of the first groups
    np.testing.assert_array_equal(np.concatenate(ranked_on), np.concatenate([b for g in groups for b in g])[:32])


def test_evaluation_images_also_calibrated_on_are_counted_in_a_warning_and_the_record(bundled32, tmp_path):
    """The same folder given to --calib and --eval passed the accuracy gate without a word, on images whose
    activation ranges INT8 was fitted to. Counted by the model input (preprocessed pixels), not by name: a copy
    of a calibration image under another name is the same image to the gate."""
    folder = _image_folder(tmp_path / "val", "val", 16)
    copies = tmp_path / "copies"
    shutil.copytree(folder, copies)
    for image in copies.rglob("*.png"):
        image.rename(image.with_name(f"copy of {image.name}"))
    npz = str(require_shared(*PNEUMONIAMNIST))
    for calib, evaluation, also_calibrated in ((folder, folder, 8), (folder, copies, 8), (npz, folder, 0)):
        output = tmp_path / "q.int8.onnx"
        result = CliRunner().invoke(app, ["quantize", str(bundled32), "--calib", str(calib), "-o", str(output),
                                          "--num-samples", "8", "--eval", str(evaluation), "--max-drop", "100"])
        assert result.exit_code == 0, result.output
        warned = re.findall(r"warning: \d+ of the \d+ evaluation images are also calibration images",
                            result.output.replace("\n", " "))
        assert warned == ([f"warning: {also_calibrated} of the 16 evaluation images are also calibration images"]
                          if also_calibrated else []), result.output
        recorded = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])
        assert recorded["evaluation_also_calibration"] == also_calibrated


def test_the_record_names_the_evaluation_set_and_the_bar_names_the_int8_candidate(bundled32, tmp_path):
    """The entry held fp32/INT8 top-1 but not what they were measured on, and the bar read "evaluating
    candidate.onnx", a temporary file's name."""
    folder = _image_folder(tmp_path / "val", "val", 8)
    (folder / "normal" / "torn.png").write_bytes(b"not a png")
    tasks = set()
    output = tmp_path / "named.int8.onnx"
    quantize_onnx(bundled32, output, folder, num_samples=4, eval_data=folder, max_drop=100,
                  progress=lambda task, done, total: tasks.add(task))
    assert {"evaluating tiny.onnx", "evaluating the INT8 candidate for named.int8.onnx"} <= tasks
    assert not [task for task in tasks if "candidate.onnx" in task], tasks
    recorded = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])
    assert recorded["evaluation"] == open_dataset(folder).description == f"{folder} (ImageFolder, 9 images)"
    assert recorded["evaluation_images"] == 8 and recorded["left_out"]["evaluation"] == 1


def test_the_record_holds_each_models_top1_as_evaluate_measures_it(bundled32, tmp_path):
    """fp32's and INT8's top-1 swapped in the record passed every test, each gate test's two models scoring the same.
    Activations clipped at their median cost the tiny model one of 8 X-rays, and the record must say which scored
    which, as evaluate measures each model on the same images."""
    folder = _image_folder(tmp_path / "val", "val", 8)
    output = tmp_path / "clipped.int8.onnx"
    quantize_onnx(bundled32, output, folder, num_samples=4, percentile=50, eval_data=folder, max_drop=100)
    recorded = json.loads({p.key: p.value for p in onnx.load(str(output)).metadata_props}[QUANTIZATION_KEY])
    fp32, int8 = (100 * m.metrics.accuracy for m in evaluation_module.evaluate([bundled32, output], folder).models)
    assert fp32 != int8  # else a swap goes unnoticed here too
    assert (recorded["fp32_top1"], recorded["int8_top1"]) == (pytest.approx(fp32), pytest.approx(int8))


def test_a_model_with_external_weights_quantizes(bundled32, tmp_path):
    """Its weights were not loaded (only what the metadata check needs), and calibration died on a traceback."""
    from medmamba_edge.runtime.bundled import sample_image_paths

    folder = tmp_path / "ext"
    folder.mkdir()
    model = onnx.load(str(bundled32))
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    quantize_onnx(folder / "m.onnx", tmp_path / "q.int8.onnx", sample_image_paths("pneumoniamnist")[0].parent,
                  num_samples=4)
    assert onnx.load(str(tmp_path / "q.int8.onnx")).graph.initializer


def test_another_tools_metadata_entry_in_non_utf8_bytes_is_kept_byte_for_byte(bundled32, tmp_path):
    """proto2 strings may hold any bytes (a Latin-1 site name): ONNX Runtime's calibrator rewrote every entry as text
    and raised UnicodeDecodeError. Now the INT8 model carries the source's entries as they were, and not the
    quantizer's own ("onnx.infer"), and the source's producer."""
    from medmamba_edge.runtime.bundled import sample_image_paths

    value = "Universit\xe9 Hospital".encode("latin-1")
    entry = b"\x0a\x04site\x12" + bytes([len(value)]) + value
    source = tmp_path / "latin.onnx"
    source.write_bytes(bundled32.read_bytes() + b"\x72" + bytes([len(entry)]) + entry)
    quantize_onnx(source, tmp_path / "q.int8.onnx", sample_image_paths("pneumoniamnist")[0].parent, num_samples=4)
    int8 = onnx.load(str(tmp_path / "q.int8.onnx"))
    props = {p.key: p.value for p in int8.metadata_props}
    assert sorted(props) == ["medmamba_edge", QUANTIZATION_KEY, "site"] and props["site"] == value
    source = onnx.load(str(bundled32))
    assert (int8.producer_name, int8.producer_version) == (source.producer_name, source.producer_version) \
        == ("medmamba-edge", __version__)  # not the quantizer's "onnx.quantize"
    assert read_onnx_metadata(tmp_path / "q.int8.onnx").precision == "int8"


def test_an_onnx_runtime_without_the_calibration_cache_is_one_line(bundled32, tmp_path, monkeypatch):
    """Python 3.10's newest onnxruntime (1.23, JetPack 6's Python) has no calibration cache: quantize died on an
    ImportError traceback there."""
    from onnxruntime.quantization import calibrate

    monkeypatch.delattr(calibrate, "save_tensors_data")
    result = CliRunner().invoke(app, ["quantize", str(bundled32), "--calib", str(tmp_path), "-o",
                                      str(tmp_path / "q.int8.onnx")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert "quantize needs onnxruntime >= 1.27 (its calibration cache), on Python >= 3.11" in result.output


def test_a_full_temporary_folder_is_a_one_line_error(bundled32, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", full)
    from medmamba_edge.runtime.bundled import sample_image_paths

    calib = str(sample_image_paths("pneumoniamnist")[0].parent)
    output = tmp_path / "q.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(bundled32), "--calib", calib, "-o", str(output)])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
    assert "no space left on the device; temporary files go to" in result.output and not output.exists()


def test_a_temporary_folder_too_small_for_the_calibrators_copy_is_a_one_line_error(bundled32, tmp_path, monkeypatch):
    """Room for the lowered model but not for the shape-inferred copy ONNX Runtime's calibrator writes beside it
    (C++, which does not report a full disk): quantize ended in protobuf's DecodeError traceback ("Wire format was
    corrupt") with $TMPDIR on a small file system."""
    import tempfile

    disk = tmp_path / "disk"
    disk.mkdir()
    size = len(lower_ss2d_scan(onnx.load(str(bundled32))).SerializeToString())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(disk))
        from medmamba_edge.runtime.bundled import sample_image_paths

        calib = str(sample_image_paths("pneumoniamnist")[0].parent)
        output = tmp_path / "q.int8.onnx"
        result = CliRunner().invoke(app, ["quantize", str(bundled32), "--calib", calib, "-o", str(output)])
        assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
        assert f"no space left on the device; temporary files go to {disk}" in result.output, result.output
        assert not output.exists() and not any(disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_sigterm_mid_calibration_leaves_no_temporary_files(fp32_models, tmp_path):
    """SIGTERM (systemd, docker) skipped the cleanups Ctrl-C runs: 111 MB of calibration models stayed in /tmp."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    output = tmp_path / "out.int8.onnx"
    # Killed and reaped at the test's end if still running (a calibration that never started).
    process = cli_process("quantize", fp32_models["portable"], "--calib", require_shared(*PNEUMONIAMNIST),
                          "--num-samples", "2048", "-o", output, env={**os.environ, "TMPDIR": str(temp)})
    deadline = time.monotonic() + 120
    while not any(temp.glob("medmamba-calib.*/*.onnx")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(temp.glob("medmamba-calib.*/*.onnx")), "calibration never started"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert not list(temp.glob("medmamba-*")) and not output.exists()  # (a library leaves its .ses id file there)


def test_an_int8_graph_onnx_runtime_refuses_is_named_after_the_users_model_not_the_candidate_file(bundled32, tmp_path,
                                                                                                monkeypatch):
    """The accuracy gate opens the candidate from its temporary file, which ONNX Runtime's refusal named ('Load
    model from /tmp/medmamba-quantize.../candidate.onnx failed:'); without the gate it was read from bytes."""
    import medmamba_edge.exporters.quantize as quantize

    real = quantize.quantize_with_cache

    def broken(*args, **kwargs):  # a graph no ONNX Runtime loads: a node reading a tensor nothing makes
        model = real(*args, **kwargs)
        model.graph.node[5].input[0] = "no_such_tensor"
        return model

    monkeypatch.setattr(quantize, "quantize_with_cache", broken)
    folder = _image_folder(tmp_path / "val", "val", 4)
    messages = []
    for gate in ({}, dict(eval_data=folder, max_drop=100)):
        with pytest.raises(quantize.QuantizeError) as refused:
            quantize_onnx(bundled32, tmp_path / "q.int8.onnx", folder, num_samples=4, **gate)
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and "no_such_tensor" in messages[0] and "candidate" not in messages[0], messages
    assert not (tmp_path / "q.int8.onnx").exists()


def _with_first_scan_input_through(model: onnx.ModelProto, index: int, op: str, *constants) -> onnx.ModelProto:
    """The model with its first SS2DScan node's input ``index`` passed through ``op`` (Reshape, Slice) with int64
    constant inputs: an edit of another tool that leaves the node an input of another shape."""
    from onnx import helper

    node = next(n for n in model.graph.node if scan_node.is_scan_node(n))
    names = [f"edit_{i}" for i in range(len(constants))]
    model.graph.initializer.extend(numpy_helper.from_array(np.array(c, np.int64), name)
                                   for name, c in zip(names, constants))
    model.graph.node.insert(list(model.graph.node).index(node),
                            helper.make_node(op, [node.input[index], *names], ["edited"]))
    node.input[index] = "edited"
    return model


@pytest.mark.parametrize("index, op, constants, message", [
    (0, "Reshape", ([0, 0, -1],), r"lowering SS2DScan node '[^']+' needs the static shape of its input x .*"
                                  r"shape inference gave \(\?, \d+, \d+\)$"),
    (1, "Slice", ([0], [-1], [2]), r"ONNX Runtime cannot calibrate it \(.*Reshape node.*\); "
                                   r"nothing was written to .*q\.onnx$"),
], ids=["x-rank-3", "x_dbl-one-position-short"])
def test_a_scan_node_with_inputs_of_another_shape_is_refused_in_one_line(bundled32, tmp_path, index, op, constants,
                                                                       message):
    """Such a node ended quantize in a traceback: the lowering's ValueError, or ONNX Runtime's Fail from the
    calibrator's session naming its temporary file, after the images were read."""
    edited = tmp_path / "edited.onnx"
    onnx.save(_with_first_scan_input_through(onnx.load(str(bundled32)), index, op, *constants), str(edited))
    calib = _image_folder(tmp_path / "calib", "val", 2)
    result = CliRunner().invoke(app, ["quantize", str(edited), "--calib", str(calib), "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert re.search(f"^error: {re.escape(str(edited))}: {message}", result.output.strip()), result.output
    assert "/medmamba-calib." not in result.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("method", ["percentile", "minmax"])
def test_a_model_whose_activations_are_not_numbers_is_refused_in_one_line(bundled32, tmp_path, method):
    """A NaN weight (the first scan's A) ended calibration in onnxruntime's traceback: 'autodetected range of
    [nan, nan] is not finite' from the histogram collector, 'scale issue' after minmax's."""
    model = onnx.load(str(bundled32))
    node = next(n for n in model.graph.node if scan_node.is_scan_node(n))
    a = next(t for t in model.graph.initializer if t.name == node.input[4])
    a.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(a).shape, np.nan, np.float32), a.name))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    calib = _image_folder(tmp_path / "calib", "val", 2)
    result = CliRunner().invoke(app, ["quantize", str(damaged), "--calib", str(calib), "--method", method,
                                      "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert (f"error: {damaged}: its activations are not numbers (NaN or infinite) on the calibration images, in "
            in result.output), result.output
    assert not (tmp_path / "q.onnx").exists()
