"""Post-training INT8 quantization of an exported MedMamba ONNX model, with accuracy and speed gates.

The output is explicit quantization (QuantizeLinear/DequantizeLinear) that ONNX Runtime's CPU INT8
kernels and TensorRT both accept: symmetric INT8 (zero point 0), per-channel weights, per-tensor
activations, on the inputs of Conv, MatMul and Gemm with a constant weight on the right only, which
includes each SS2D block's x_proj projection (a 1×1 Conv) and leaves out the depthwise Convs
(``quantizable_nodes`` says why), and on the outputs of the Convs: ONNX Runtime
fuses DequantizeLinear→Conv→QuantizeLinear into QLinearConv (a Conv without the output Q runs in float on
weights dequantized every run, slower than fp32) and TensorRT folds the output scale into its INT8 Conv.
MatMul/Gemm outputs stay float: ONNX Runtime fuses their Q/DQ inputs into MatMulIntegerToFloat.
Everything else stays float: the SS2DScan node and its state, the LayerNorms, the softplus. The node
reads x, the conv's SiLU output, at its float value even where the projection reads it quantized, and
x_dbl from the projection's INT8 output, dequantized. Biases stay float too: TensorRT's parser rejects
the INT32 DequantizeLinear that ONNX Runtime would otherwise put on them.

Calibration runs in ONNX Runtime on the CPU. onnxruntime.quantization's calibrators open their own
InferenceSession, which cannot load our SS2DScan op, so a plugin-form model is calibrated on
its portable lowering: the lowering keeps every tensor name outside the scans, so the ranges it yields
apply to the plugin form unchanged, and ``quantize_static`` reads them from a calibration cache.

``quant_format="qoperator"`` writes ONNX Runtime's QLinearConv/MatMulIntegerToFloat form instead, for its CPU
only (docs/quantization.md compares the two there), unreadable by TensorRT.

Weights use 7 bits of the INT8 range ([-64, 64], ONNX Runtime's ``reduce_range``) in both forms, so the
model gives the same accuracy on every x86 CPU. ONNX Runtime's INT8 kernels multiply uint8 activations
by int8 weights; with VNNI (vpdpbusd) the products are summed in int32, but without it (AVX2, and
AVX-512 before Cascade Lake) vpmaddubsw sums each pair of products in int16 and saturates: 255 · 127 · 2
overflows it, 255 · 64 · 2 does not. Full-range weights measured fine on an AVX-512 VNNI Xeon and lost
up to 13 points on an AVX2-only CPU; the 7-bit recipe loses nothing measurable on either
(docs/quantization.md). TensorRT reads the result as ordinary symmetric INT8.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from medmamba_edge import __version__
from medmamba_edge.errors import UserError, first_line, only_with, plural
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends import Backend, fixed_batches, local_model_file
from medmamba_edge.runtime.cpu import describe_cpu
from medmamba_edge.runtime.datasets import Dataset, Failure, open_dataset
from medmamba_edge.runtime.files import check_onnx_name, local_output, write_bytes_atomically
from medmamba_edge.runtime.metadata import (ModelMetadata, check_against_graph, graph_shapes, load_onnx,
                                            read_onnx_metadata, write_onnx_metadata)
from medmamba_edge.runtime.metrics import compared_text, non_finite_rows, over_budget, points_lost, tolerance_problem
from medmamba_edge.runtime.preprocess import preprocess
from medmamba_edge.runtime.shared_change import SharedChange

from .portable import lower_ss2d_scan

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# Calibrated too: a Relu's output range is what a QOperator Conv before it takes as its own (relus_after_convs).
CALIBRATED_OP_TYPES = QUANTIZED_OP_TYPES + ("Relu",)
METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
# metadata_props key beside the ModelMetadata one: how the model was quantized (JSON).
QUANTIZATION_KEY = "medmamba_edge.quantization"
# How the weights are quantized (module docstring), as the QUANTIZATION_KEY entry records it.
WEIGHT_RANGE = "int8 per channel, 7-bit range [-64, 64] (ONNX Runtime reduce_range)"
# Images per calibration run: the histogram calibrators hold every calibrated tensor of a run in memory.
CALIBRATION_BATCH = 8
# Images the sensitivity ranking compares the float model's logits and each one-layer-INT8 model's on.
SENSITIVITY_IMAGES = 32
DEFAULT_PERCENTILE = 99.99
EVAL_BATCH = 64
DEFAULT_MAX_DROP = 1.0  # points of top-1 the accuracy gate allows INT8 to lose

Progress = Callable[[str, int, int], None]  # (task, done, total)
LeftOut = Callable[[str, list[Failure]], None]  # ("calibration" | "evaluation", the images left out and why)
AlsoCalibrated = Callable[[int, int], None]  # (evaluation images that are also calibration images, evaluation images)
# (fp32 model, INT8 candidate, --min-speedup: timed more while the interval straddles it) -> both timed on this machine
SpeedCheckFn = Callable[[Path, Path, float], "SpeedCheck"]
# The speed gate decides on a SPEED_CONFIDENCE % interval of the speedup: a bootstrap of SPEED_RESAMPLES, seeded.
SPEED_CONFIDENCE = 90
SPEED_RESAMPLES = 2000


class QuantizeError(UserError):
    """Quantization could not produce a model within the accuracy or speed budget; nothing was written."""


@dataclass
class SpeedCheck:
    """fp32 and INT8 timed side by side on this machine in rounds, a few runs of each per round, the two models
    taking turns (medmamba_edge.benchmarking.speed_check)."""
    batch: int
    fp32_rounds: list[list[float]]  # milliseconds of each run, round by round (as many runs in every round)
    int8_rounds: list[list[float]]
    measured_on: str  # the CPU and instruction set: ONNX Runtime's INT8 kernels differ between them
    batch_label: str  # as benchmark labels it: "2 (1×3, 1 padded)" for batch 2 on a model of fixed batch 3

    @property
    def fp32_ms(self) -> float:
        return float(np.median(self.fp32_rounds))

    @property
    def int8_ms(self) -> float:
        return float(np.median(self.int8_rounds))

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms

    def interval(self) -> tuple[float, float]:
        """The speedup's SPEED_CONFIDENCE % interval: a bootstrap that resamples whole rounds, both models' runs of a
        round together, since a round is one stretch of a noisy machine and a slow stretch slows both; seeded, so
        the same timings give the same interval. The two medians alone, with no spread, flipped the gate between
        runs of one command (0.89× refused, then 1.21×, 1.25×, 1.01× passed)."""
        fp32, int8 = np.asarray(self.fp32_rounds), np.asarray(self.int8_rounds)
        picks = np.random.default_rng(0).integers(0, len(fp32), (SPEED_RESAMPLES, len(fp32)))
        ratios = (np.median(fp32[picks].reshape(SPEED_RESAMPLES, -1), axis=1)
                  / np.median(int8[picks].reshape(SPEED_RESAMPLES, -1), axis=1))
        tail = (100 - SPEED_CONFIDENCE) / 2
        low, high = np.percentile(ratios, [tail, 100 - tail])
        return float(low), float(high)

    def describe(self, min_speedup: float) -> str:
        """The interval, each end as it compares with ``min_speedup``, and the rounds it is of."""
        low, high = (compared_text(end, min_speedup, 3)[0] for end in self.interval())
        return f"{SPEED_CONFIDENCE}% interval {low}–{high}× over {plural(len(self.fp32_rounds), 'round')}"

    def record(self, min_speedup: float) -> dict:
        """The speed entry of the quantization metadata."""
        return {"batch": self.batch, "batch_label": self.batch_label, "fp32_ms": self.fp32_ms, "int8_ms": self.int8_ms,
                "speedup": self.speedup, "interval": list(self.interval()), "interval_percent": SPEED_CONFIDENCE,
                "within_noise": speed_verdict(self, min_speedup)[1], "rounds": len(self.fp32_rounds),
                "runs_per_round": len(self.fp32_rounds[0]), "measured_on": self.measured_on}


def speed_verdict(speed: SpeedCheck, min_speedup: float) -> tuple[bool, bool]:
    """Whether INT8 passes ``min_speedup`` on ``speed``'s timings, and whether that was within the machine's noise:
    an interval wholly at or above it passes, wholly below refuses; one that straddles it (speed_check has timed
    more rounds by then) is decided on the median, within the noise."""
    low, high = speed.interval()
    if low >= min_speedup or high < min_speedup:
        return low >= min_speedup, False
    return speed.speedup >= min_speedup, True


@dataclass
class QuantizeResult:
    path: Path
    metadata: ModelMetadata
    quantized_nodes: list[str]
    kept_float: list[str] = field(default_factory=list)  # by --exclude or --auto-fallback
    fallback_nodes: list[str] = field(default_factory=list)  # kept float by --auto-fallback alone
    calibration_images: int = 0
    float_top1: float | None = None  # percent; None without --eval
    int8_top1: float | None = None
    evaluated_on: str | None = None  # the CPU and instruction set the accuracies were measured on
    speed: SpeedCheck | None = None  # None without --min-speedup
    seconds: float = 0.0
    max_drop: float | None = None  # the accuracy gate's budget in points; None without --eval
    past_last_batch: int = 0  # usable calibration images a fixed-batch model had no whole batch for
    calibration_short: int = 0  # images short of --num-samples: the calibration set ran out of usable ones
    speed_within_noise: bool = False  # the speed gate's interval straddled --min-speedup: passed on the median


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Top-level Conv/MatMul/Gemm nodes with a constant weight: the ones with an INT8 kernel to gain.

    Depthwise Convs (one input channel per group: SS2D's 3×3 conv) are left out: ONNX Runtime does not fuse
    their Q/DQ into QLinearConv, so quantized they run in float between extra Q/DQ nodes, and they are a
    few percent of the model's multiply-adds."""
    constants = {t.name: t for t in model.graph.initializer}

    def depthwise(node: onnx.NodeProto) -> bool:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return node.op_type == "Conv" and group > 1 and constants[node.input[1]].dims[1] == 1

    return [n for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and len(n.input) > 1
            and n.input[1] in constants and not depthwise(n)]


def matches(node: onnx.NodeProto, pattern: str) -> bool:
    """``re:REGEX`` matches the whole node name or op type as a regular expression; anything else is a glob."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.fullmatch(text) for text in (node.name, node.op_type))
    return any(fnmatch.fnmatchcase(text, pattern) for text in (node.name, node.op_type))


def excluded_nodes(candidates: Sequence[onnx.NodeProto], patterns: Sequence[str]) -> list[str]:
    excluded = []
    for pattern in patterns:
        try:
            hits = [n.name for n in candidates if matches(n, pattern)]
        except re.error as exc:
            raise QuantizeError(f"--exclude {pattern!r}: not a valid regular expression ({exc})") from None
        if not hits:
            raise QuantizeError(f"--exclude {pattern!r} matches none of the "
                                f"{plural(len(candidates), 'quantizable node')} ({'/'.join(QUANTIZED_OP_TYPES)}, "
                                f"by node name or op type)")
        excluded += [name for name in hits if name not in excluded]
    return excluded


@dataclass
class Inputs:
    """A data set's usable images as model inputs, and why the others were left out."""
    batches: list[np.ndarray]
    indices: list[int]  # the samples the batches hold, in order
    left_out: list[Failure]


def preprocessed(dataset: Dataset, metadata: ModelMetadata, batch: int, task: str, progress: Progress) -> Inputs:
    """The data set as model inputs of at most ``batch`` images each. An image that cannot be decoded or
    preprocessed is left out with its reason, as ``evaluate`` leaves it out; none usable is an error."""
    inputs = _read_inputs(dataset, metadata, batch, task, progress, range(len(dataset)), Inputs([], [], []))
    _some_usable(dataset, inputs)
    return inputs


def _read_inputs(dataset: Dataset, metadata: ModelMetadata, batch: int, task: str, progress: Progress,
                 indices: Sequence[int], inputs: Inputs) -> Inputs:
    """``preprocessed`` for the samples at ``indices`` (in that order), added to ``inputs``."""
    read = dataset if list(indices) == list(range(len(dataset))) else dataset.subset(indices)
    for chunk in read.prepared(batch, lambda image: preprocess([image], metadata)[0]):
        if chunk.items:
            inputs.batches.append(np.stack(chunk.items))
        inputs.indices += [indices[i] for i in chunk.indices]
        inputs.left_out += chunk.failures
        progress(task, chunk.end, len(read))
    return inputs


def _some_usable(dataset: Dataset, inputs: Inputs) -> None:
    if not inputs.indices:
        first = inputs.left_out[0]
        raise QuantizeError(f"{dataset.description}: none of its {plural(len(dataset), 'image')} could be used "
                            f"(first: {first.reason})")


def calibration_inputs(dataset: Dataset, count: int, seed: int, metadata: ModelMetadata, progress: Progress) -> Inputs:
    """``count`` usable images of ``dataset`` drawn at random (``seed``), as model inputs of CALIBRATION_BATCH images
    at most: each image that cannot be used is left out (``preprocessed``) and replaced by the next of the same random
    order, until ``count`` are usable or the set runs out. (Drawn first and left out after, 3 broken images of 15 left
    8 of --num-samples 10.)"""
    order = dataset.sample_order(count, seed)
    inputs, drawn, task = Inputs([], [], []), 0, "reading calibration images"
    while len(inputs.indices) < count and drawn < len(order):
        picked = sorted(order[drawn:drawn + count - len(inputs.indices)])  # the first draw: sample(count, seed)
        drawn += len(picked)
        _read_inputs(dataset, metadata, CALIBRATION_BATCH, task, progress, picked, inputs)
        task = "reading calibration images in place of unusable ones"
    _some_usable(dataset, inputs)
    return inputs


def input_digests(batches: Iterable[np.ndarray]) -> list[bytes]:
    """One digest per image of ``batches``: equal digests, the same model input. Compared as inputs, not as
    names, since a copy of an image under another name (or in another data set) is the same image to the model."""
    return [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for batch in batches for image in batch]


def calibration_groups(batches: list[np.ndarray], fixed: int | None) -> tuple[list[list[np.ndarray]], int]:
    """Groups of about CALIBRATION_BATCH images, each group as the model's own batches, and how many images
    they hold (padding aside). A batch-1 export calibrates as its dynamic-batch twin does (the same groups, so
    the same histograms up to the float rounding of activations at another batch). A fixed batch of B takes
    whole batches only: groups are a multiple of B, and the images past the last whole batch are left out,
    since padding would count copies of one image in every histogram (unless there are fewer images than one
    batch)."""
    images = np.concatenate(batches)
    step = fixed or 1
    if len(images) >= step:
        images = images[: len(images) // step * step]
    size = -(-CALIBRATION_BATCH // step) * step
    return [fixed_batches(images[start:start + size], fixed) for start in range(0, len(images), size)], len(images)


def _not_onnxruntime_chatter(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or f"{os.sep}onnxruntime{os.sep}" not in record.pathname


class _AsIfNoHandler(logging.Handler):
    """A root logger's stand-in handler that does what logging does with a record finding none (lastResort)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


# Set inside _quiet: a context variable, so that only the thread quantizing (its context) is quiet.
_QUIET = contextvars.ContextVar("medmamba_edge_quantize_quiet", default=False)


def _onnxruntime_print(*args, **kwargs):
    """The print of onnxruntime.quantization's modules: print, but nothing inside _quiet."""
    if not _QUIET.get():
        print(*args, **kwargs)


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization prints per-call chatter (histogram progress, tensor counts) with Python's print and
    logs through logging's module functions (logging.info, logging.warning), on the root logger; our progress bar
    says the same, and the CLI's stdout is for results. Only its own output is held back, in this thread only: its
    modules' print is one that says nothing here (not sys.stdout swapped, which would lose what an application's
    other threads print meanwhile), its records are stopped by a filter of the root logger's own (an application's
    named loggers propagate past it), and a root without handlers is lent one that acts as none: those functions
    call basicConfig on a root without any, after which an application's own basicConfig would do nothing."""
    import onnxruntime.quantization as package  # for its modules, all of which it imports

    for name, module in list(sys.modules.items()):
        if name.startswith(package.__name__) and module is not None:
            module.print = _onnxruntime_print  # a global of the module's own, found before the builtin
    token = _QUIET.set(True)
    try:
        with _quiet_root_logger():
            yield
    finally:
        _QUIET.reset(token)


def _filter_root_logger(undo: contextlib.ExitStack) -> None:
    """Sets the root logger's filter and, on a root without handlers, the lent one."""
    root = logging.getLogger()
    if not root.handlers:
        lent = _AsIfNoHandler()
        undo.callback(root.removeHandler, lent)
        root.addHandler(lent)
    undo.callback(root.removeFilter, _not_onnxruntime_chatter)
    root.addFilter(_not_onnxruntime_chatter)


# The root logger is the process's: two quantizes at once (an application's threads) share one filter and lent
# handler, or ONNX Runtime's logging.info, in the second after the first undid its own, would call basicConfig on
# the application's root.
_quiet_root_logger = SharedChange(_filter_root_logger)


# ONNX Runtime's calibration cache (calibrate once, quantize each candidate from it): onnxruntime >= 1.27, which
# needs Python >= 3.11 (Python 3.10's newest, JetPack 6's, is 1.23).
CALIBRATION_CACHE_SINCE = "1.27"


def check_quantizer() -> None:
    """Refuse, in one line, an ONNX Runtime whose quantizer cannot take a calibration cache."""
    import inspect

    import onnxruntime as ort
    from onnxruntime.quantization import calibrate, quantize_static

    if not (hasattr(calibrate, "save_tensors_data")
            and "calibration_cache_path" in inspect.signature(quantize_static).parameters):
        raise QuantizeError(
            f"quantize needs onnxruntime >= {CALIBRATION_CACHE_SINCE} (its calibration cache), on Python >= 3.11; "
            f"this is onnxruntime {ort.__version__} on Python {sys.version_info[0]}.{sys.version_info[1]}: quantize "
            f"on such a machine, and run the INT8 model on any (ONNX Runtime >= 1.18, TensorRT)")


def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def calibrate(portable: onnx.ModelProto, inputs: list[list[np.ndarray]], input_name: str, method: str,
              percentile: float, cache: Path, progress: Progress) -> None:
    """Activation ranges of the Conv/MatMul/Gemm/Relu tensors over ``inputs`` (groups of the model's batches),
    saved to ``cache`` for quantize_static. ``portable``: the model with its scans lowered (portable_form), which
    ONNX Runtime's calibrator runs without our op library."""
    import onnxruntime as ort
    from google.protobuf.message import DecodeError
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from medmamba_edge.runtime.backends.onnxruntime.custom_ops import session_options

    # The symmetric histogram keeps |x|, so percentile clips the largest magnitudes of either sign.
    options = {"symmetric": True} if method != "minmax" else {}
    if method == "percentile":
        options["percentile"] = percentile
    with tempfile.TemporaryDirectory(prefix="medmamba-calib.") as tmp:
        source = Path(tmp) / "portable.onnx"
        onnx.save(portable, source)
        try:
            calibrator = create_calibrator(source, list(CALIBRATED_OP_TYPES), str(Path(tmp) / "augmented.onnx"),
                                           _calibration_method(method), extra_options=options)
        except DecodeError:
            # The calibrator first copies the model beside it with its shapes inferred, in C++ that does not report a
            # full disk: the copy is cut short, and reading it back is what fails. The copy is the model's size
            # and more, so with less room left than that it was the disk.
            if shutil.disk_usage(tmp).free >= source.stat().st_size:
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        held = session_options()
        if held.intra_op_num_threads:
            # The calibrator opens its session with ONNX Runtime's default threads, which ignore the affinity mask:
            # on 1 of 2 CPUs a 224×224 model calibrated 1.8 times slower, 2 threads on one CPU. Reopened as
            # ours are, with its own unoptimized graph (the tensors it calibrates must stay as named).
            held.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, sess_options=held,
                                                            providers=calibrator.execution_providers)
        calibrator.infer_session = _FiniteOutputs(calibrator.infer_session)
        # One collect_data per group: the calibrators merge groups incrementally (memory stays one group deep),
        # and a histogram's bins depend on how the data was grouped, so every model groups the same images.
        for done, group in enumerate(inputs, start=1):
            with _quiet():
                calibrator.collect_data(_Feeds([{input_name: batch} for batch in group]))
            progress("calibrating", done, len(inputs))
        with _quiet():
            save_tensors_data(calibrator.compute_data(), cache)


class NonFiniteActivations(Exception):
    """The calibrated model gave NaN or infinite values in ``tensor``."""

    def __init__(self, tensor: str):
        super().__init__(tensor)
        self.tensor = tensor


class _FiniteOutputs:
    """The calibrator's session, raising NonFiniteActivations on an output that is not a number: a model with a NaN
    weight ended calibration in a traceback of onnxruntime's collectors ('autodetected range of [nan, nan] is not
    finite' from the histogram's, 'scale issue' from quantize_static after minmax's)."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, output_names, feeds, *args, **kwargs):
        outputs = self._session.run(output_names, feeds, *args, **kwargs)
        names = output_names or [o.name for o in self._session.get_outputs()]
        for name, value in zip(names, outputs):
            if not np.isfinite(value).all():
                raise NonFiniteActivations(name)
        return outputs


class _Feeds:
    """A CalibrationDataReader yielding the given feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantize_with_cache(model: onnx.ModelProto, cache: Path, method: str, nodes: Sequence[str],
                        quant_format: str) -> onnx.ModelProto:
    """Quantize ``nodes`` of ``model`` with the ranges in ``cache``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if quant_format == "qdq":
        # The TensorRT-ready recipe (ORT's CPU runs it too): symmetric S8S8, Q/DQ on inputs and Conv outputs,
        # float bias (module docstring).
        formats = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8)
        options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                   "OpTypesToExcludeOutputQuantization": [t for t in QUANTIZED_OP_TYPES if t != "Conv"]}
    else:
        # QLinearConv/QLinearMatMul for ORT's CPU: MLAS' VNNI kernels take unsigned activations
        # (vpdpbusd multiplies u8 by s8), so activations are asymmetric uint8 there.
        formats = dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8)
        options = {"WeightSymmetric": True}
    op_types = list(QUANTIZED_OP_TYPES)
    if quant_format == "qoperator":
        op_types.append("Relu")
        nodes = list(nodes) + relus_after_convs(model, nodes)
    with tempfile.TemporaryDirectory(prefix="medmamba-quant.") as tmp, _quiet():
        output = Path(tmp) / "int8.onnx"
        quantize_static(model, output, None, op_types_to_quantize=op_types, per_channel=True,
                        weight_type=QuantType.QInt8, reduce_range=True, nodes_to_quantize=list(nodes),
                        calibrate_method=_calibration_method(method), calibration_cache_path=cache,
                        extra_options=options, **formats)
        int8 = _float_for_float_consumers(onnx.load(str(output)), set(nodes))
    return _matmuls_to_float(int8) if quant_format == "qoperator" else _pair_per_quantized_reader(int8, set(nodes))


def relus_after_convs(model: onnx.ModelProto, convs: Sequence[str]) -> list[str]:
    """The Relus that alone read a quantized Conv's output (the conv branch's three per block).

    Quantized with their Conv in QOperator form, ORT's quantizer gives the Conv's uint8 output the Relu's
    calibrated range, zero point at 0, and drops the Relu: QLinearConv feeds the next QLinearConv directly, where a
    float Relu left DequantizeLinear → Relu → QuantizeLinear between them. (Symmetric Q/DQ cannot: its zero
    point sits mid-range, so a Relu stays a Relu.)"""
    quantized = set(convs)
    producers, readers = _producers(model), _readers(model)
    return [node.name for node in model.graph.node if node.op_type == "Relu" and len(readers[node.input[0]]) == 1
            and node.input[0] in producers and producers[node.input[0]].op_type == "Conv"
            and producers[node.input[0]].name in quantized]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Each tensor a node writes, and that node."""
    return {out: node for node in model.graph.node for out in node.output}


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Each tensor a node reads, and the nodes that read it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _matmuls_to_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """A QLinearMatMul read only by one DequantizeLinear becomes MatMulIntegerToFloat (ONNX Runtime's contrib op, the
    one its Q/DQ fusion makes of the same layer): the product leaves in float instead of being rounded to uint8 and
    dequantized again. Every MatMul of MedMamba feeds float ops (LayerNorm, Split, Add): at batch 8 the QOperator
    model went from 194 to 177 ms with it (side by side), MedMamba-T 224 on two threads of an AVX-512 VNNI Xeon."""
    readers = _readers(model)
    nodes = []
    absorbed = set()  # outputs of the DequantizeLinear nodes folded into a MatMulIntegerToFloat
    for node in model.graph.node:
        reader = readers.get(node.output[0], []) if node.op_type == "QLinearMatMul" else []
        if len(reader) == 1 and reader[0].op_type == "DequantizeLinear":
            a, a_scale, a_zero, b, b_scale, b_zero = node.input[:6]
            node = onnx.helper.make_node("MatMulIntegerToFloat", [a, b, a_scale, b_scale, a_zero, b_zero],
                                         [reader[0].output[0]], name=node.name, domain="com.microsoft")
            absorbed.add(reader[0].output[0])
        nodes.append(node)
    if absorbed:
        del model.graph.node[:]
        model.graph.node.extend(n for n in nodes if n.op_type != "DequantizeLinear" or n.output[0] not in absorbed)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        # the products' uint8 scales and zero points, read by nothing now (ONNX Runtime would warn of each)
        read = {name for node in model.graph.node for name in node.input}
        kept = [t for t in model.graph.initializer if t.name in read]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def _activation_pair(dequantize: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto],
                     initializers) -> onnx.NodeProto | None:
    """The QuantizeLinear behind ``dequantize`` when the two are the Q/DQ pair of a computed tensor (not of a weight)."""
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    quantize = producers.get(dequantize.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] in initializers:
        return None
    return quantize


def _float_for_float_consumers(model: onnx.ModelProto, quantized: set[str]) -> onnx.ModelProto:
    """Give the nodes left in float their float inputs back.

    ONNX Runtime's Q/DQ quantizer puts a tensor read by a quantized node through QuantizeLinear/DequantizeLinear
    for every reader. x feeds both the x_proj projection (quantized) and the scan (float): the scan would read
    x rounded to INT8 for nothing."""
    producers = _producers(model)
    initializers = {init.name for init in model.graph.initializer}

    def original(name: str) -> str | None:
        quantize = _activation_pair(producers.get(name), producers, initializers)
        if quantize is None:
            return None
        source = producers.get(quantize.input[0])
        if source is not None and source.name in quantized:  # a quantized output: its readers read it so
            return None
        return quantize.input[0]

    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            source = original(name)
            if source is not None:
                node.input[i] = source
    return model


def _pair_per_quantized_reader(model: onnx.ModelProto, quantized: set[str]) -> onnx.ModelProto:
    """Give each quantized reader of a Q/DQ-quantized tensor a QuantizeLinear/DequantizeLinear pair of its own, with
    its own copies of the scale and zero point.

    ONNX Runtime's CPU runs a Q/DQ MatMul as MatMulIntegerToFloat only once it has turned its int8 activation pair
    into uint8, which it does for a QuantizeLinear with one reader; identical pairs it merges back into one first,
    so the copies keep them apart. Both halves of each in_proj read one LayerNorm output: sharing a pair, they ran
    as float MatMuls on weights dequantized every run, and the model took 31.7 ms instead of 27.0 (MedMamba-T 224,
    batch 1, two threads of an AVX-512 Xeon, side by side). TensorRT reads either form."""
    producers, readers = _producers(model), _readers(model)
    initializers = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        quantize = _activation_pair(node, producers, initializers)
        if quantize is None:
            continue
        for copy, reader in enumerate([r for r in readers[node.output[0]] if r.name in quantized][1:], 1):
            params = []
            for name in node.input[1:]:
                param = onnx.TensorProto()
                param.CopyFrom(initializers[name])
                param.name = f"{name}/reader{copy}"
                model.graph.initializer.append(param)
                params.append(param.name)
            quantized_copy, dequantized_copy = f"{quantize.output[0]}/reader{copy}", f"{node.output[0]}/reader{copy}"
            for original, inputs, output in ((quantize, [quantize.input[0], *params], quantized_copy),
                                             (node, [quantized_copy, *params], dequantized_copy)):
                pair_node = onnx.helper.make_node(original.op_type, inputs, [output],
                                                  name=f"{original.name}/reader{copy}")
                pair_node.attribute.extend(original.attribute)
                nodes.append(pair_node)
            reader.input[list(reader.input).index(node.output[0])] = dequantized_copy
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def rank_by_sensitivity(float_model: onnx.ModelProto, quantized_alone: Callable[[str], onnx.ModelProto],
                        nodes: Sequence[str], inputs: Sequence[np.ndarray], input_name: str,
                        progress: Progress) -> list[str]:
    """``nodes`` ordered by what each costs quantized alone, largest first: the relative L2 error of the logits
    of ``quantized_alone(node)`` (that node INT8, every other float) against the float model's over ``inputs``.

    One model per node, each from the cached ranges. Ranked inside the all-INT8 model instead (a node's output
    error minus its input's, two passes), the noise from upstream hid what late layers cost: a final linear that
    alone cost MedMamba-T 0.95 points of top-1 ranked last of 40, and the fallback kept 39 layers float in vain.
    """
    from medmamba_edge.runtime.backends.onnxruntime import custom_ops

    def logits(model: onnx.ModelProto) -> list[np.ndarray]:
        session = custom_ops.make_session(model)
        return [session.run(None, {input_name: batch})[0] for batch in inputs]

    reference = logits(float_model)
    signal = sum(float(np.square(r).sum()) for r in reference)
    error = {}
    for done, name in enumerate(nodes, start=1):
        noise = sum(float(np.square(q - r).sum()) for q, r in zip(logits(quantized_alone(name)), reference))
        error[name] = np.sqrt(noise / max(signal, 1e-30))
        progress("ranking layers by what each costs alone", done, len(nodes))
    return sorted(nodes, key=error.__getitem__, reverse=True)


def check_loads(int8: onnx.ModelProto, model_path: Path, output: Path) -> None:
    """Refuse an INT8 model ONNX Runtime cannot load. Its graph optimizer, which runs only when a session is made,
    refuses some Q/DQ graphs its own quantizer wrote (1.32 at opset ≥ 21: "QuantizeLinear output_dtype INT8 does not
    match y_zero_point type UINT8" after propagating Q/DQ through Transpose), and such a file was written, exit 0.
    For a flow that runs the model in no session of its own here: the accuracy gate's session is the check
    (open_candidate)."""
    from medmamba_edge.runtime.backends.onnxruntime import custom_ops, onnxruntime_errors

    try:
        try:
            custom_ops.make_session(int8, threads=1)
        except custom_ops.FusedScanUnavailable:  # no op library here: the same Q/DQ graph around a portable scan
            custom_ops.make_session(lower_ss2d_scan(int8), threads=1)
    except onnxruntime_errors() as exc:
        raise _does_not_load(int8, model_path, output, exc) from None


def open_candidate(candidate: Path, int8: onnx.ModelProto, model_path: Path, output: Path):
    """The INT8 candidate ``int8``, saved at ``candidate``, opened for the accuracy gate; the one session that is
    also its load check, refused as check_loads refuses it (a second session only to check that it loads took
    0.2-0.4 s)."""
    from medmamba_edge.runtime.backends import open_backend
    from medmamba_edge.runtime.backends.onnxruntime import NotLoaded

    try:
        return open_backend(candidate)
    except NotLoaded as exc:  # read from a temporary file, which ONNX Runtime names
        raise _does_not_load(int8, model_path, output, _without_temporary_path(exc.error)) from None


def _does_not_load(int8: onnx.ModelProto, model_path: Path, output: Path, error: Exception | str) -> QuantizeError:
    import onnxruntime as ort

    opset = next((o.version for o in int8.opset_import if o.domain in ("", "ai.onnx")), 0)
    hint = f"; export it again with --opset 20 and quantize that (this one is opset {opset})" if opset > 20 else ""
    return QuantizeError(f"{model_path}: its INT8 model does not load in ONNX Runtime {ort.__version__} "
                         f"({first_line(error)}){hint}; nothing was written to {output}")


def top1_accuracy(model: Path | Backend, inputs: Sequence[np.ndarray], labels: np.ndarray,
                  progress: Progress = lambda task, done, total: None, name: str | None = None) -> float:
    """Top-1 accuracy (percent) of a model over preprocessed batches: a model file, through its backend, or a
    backend open on one; ``progress`` names the model ``name``, or its file name.

    Deliberately minimal (the accuracy gate needs nothing more); the full metrics live with `evaluate`.
    """
    from medmamba_edge.runtime.backends import checked_logits, open_backend

    backend = open_backend(model) if isinstance(model, (str, Path)) else model
    logits = []
    for done, batch in enumerate(inputs, start=1):
        logits.append(checked_logits(backend, batch))
        progress(f"evaluating {name or Path(backend.path).name}", done, len(inputs))
    logits = np.concatenate(logits)
    correct = logits.argmax(axis=1) == labels
    correct[non_finite_rows(logits)] = False  # no answer is no right answer, whatever class argmax picks
    return 100.0 * float(correct.mean())


def _check_options(method: str, percentile: float | None, quant_format: str, max_drop: float | None, eval_data,
                   eval_split: str | None, auto_fallback: bool, min_speedup: float | None,
                   speed_check: SpeedCheckFn | None) -> None:
    if method not in METHODS:
        raise QuantizeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if quant_format not in FORMATS:
        raise QuantizeError(f"--format must be one of {', '.join(FORMATS)}, got {quant_format!r}")
    if percentile is not None and not 0 < percentile <= 100:
        raise QuantizeError(f"--percentile must be in (0, 100], got {percentile}")
    if problem := tolerance_problem(**{"max-drop": max_drop}):
        raise QuantizeError(problem)
    for problem in (only_with("--eval DATA", eval_data is None, max_drop=max_drop, auto_fallback=auto_fallback,
                              eval_split=eval_split),
                    only_with("--method percentile", method != "percentile", percentile=percentile)):
        if problem:
            raise QuantizeError(problem)
    if min_speedup is not None and not (math.isfinite(min_speedup) and min_speedup > 0):  # inf: refused after it all
        raise QuantizeError(f"--min-speedup must be a finite number > 0, got {min_speedup}")
    if min_speedup is not None and speed_check is None:
        raise ValueError("min_speedup needs speed_check, the function that times the two models")


def quantize_onnx(
    model_path: str | Path,
    output: str | Path,
    calib: str | Path,
    *,
    split: str | None = None,
    num_samples: int = 256,
    seed: int = 0,
    method: str = "percentile",
    percentile: float | None = None,
    exclude: Sequence[str] = (),
    quant_format: str = "qdq",
    eval_data: str | Path | None = None,
    eval_split: str | None = None,
    max_drop: float | None = None,
    auto_fallback: bool = False,
    min_speedup: float | None = None,
    speed_check: SpeedCheckFn | None = None,
    progress: Progress = lambda task, done, total: None,
    left_out: LeftOut = lambda stage, failures: None,
    also_calibrated: AlsoCalibrated = lambda overlapping, evaluated: None,
) -> QuantizeResult:
    """Calibrate, quantize, check accuracy (with ``eval_data``: at most ``max_drop`` points of top-1 lost,
    DEFAULT_MAX_DROP if None) and speed (with ``min_speedup``: the fp32 / INT8 ratio of the medians ``speed_check``
    measures, and its interval: speed_verdict), and write ``output`` only if both passed. ``left_out`` hears of the
    images each stage left out as soon as it has read them, so that they are named even when a gate refuses; the
    model records only how many (file names in medical data sets often carry patient identifiers).
    ``also_calibrated`` hears, before the calibration, how many evaluation images are also calibration images (when
    any are), and the model records it: on those the accuracy gate reads optimistic, INT8's activation ranges having been fitted to them."""

    from medmamba_edge.runtime.backends.onnxruntime import onnxruntime_errors

    started = time.perf_counter()
    check_quantizer()
    _check_options(method, percentile, quant_format, max_drop, eval_data, eval_split, auto_fallback, min_speedup,
                   speed_check)
    if eval_data is not None and max_drop is None:
        max_drop = DEFAULT_MAX_DROP
    # None: not given (an option that applies only with another is refused above when given without it)
    percentile = DEFAULT_PERCENTILE if percentile is None else percentile
    model_path, output = local_model_file(model_path, "quantize"), local_output(output, "quantize")
    check_onnx_name(output, "the INT8 model")
    model, metadata, source_props = _fp32_model(model_path)
    input_name = model.graph.input[0].name

    # Everything that can refuse without the images, before minutes of calibration.
    nodes, excluded = _nodes_to_quantize(model, model_path, exclude)
    portable = portable_form(model, model_path)
    if eval_data is not None or min_speedup is not None:
        _check_gates_can_run(model_path, metadata)
    images = _read_images(calib, split, num_samples, seed, metadata, eval_data, eval_split, progress, left_out,
                          also_calibrated)

    with tempfile.TemporaryDirectory(prefix="medmamba-quantize.") as tmp:
        cache, candidate = Path(tmp) / "ranges.json", Path(tmp) / "candidate.onnx"
        try:
            calibrate(portable, images.groups, input_name, method, percentile, cache, progress)
        except onnxruntime_errors() as exc:  # a graph another tool edited: ONNX Runtime's own shape checks
            raise QuantizeError(f"{model_path}: ONNX Runtime cannot calibrate it ({_without_temporary_path(exc)}); "
                                f"nothing was written to {output}") from None
        except NonFiniteActivations as exc:
            raise QuantizeError(f"{model_path}: its activations are not numbers (NaN or infinite) on the calibration "
                                f"images, in {exc.tensor!r} and maybe others: are its weights damaged? nothing was "
                                f"written to {output}") from None
        del portable  # a second copy of the weights, which the gates below would hold for minutes

        def quantized(kept_float: Sequence[str]) -> onnx.ModelProto:
            int8 = quantize_with_cache(model, cache, method, [n for n in nodes if n not in kept_float], quant_format)
            del int8.metadata_props[:]
            int8.metadata_props.extend(source_props)
            int8.producer_name, int8.producer_version = model.producer_name, model.producer_version  # not onnx.quantize
            write_onnx_metadata(int8, metadata.replace(precision="int8"))
            return int8

        int8, fallback = quantized([]), []
        if eval_data is not None or min_speedup is not None:  # the gates run the candidate from this file
            onnx.save(int8, candidate)
        if eval_data is None:  # else the accuracy gate's session checks it; the speed check's are other processes'
            check_loads(int8, model_path, output)
        float_top1 = int8_top1 = None
        if eval_data is not None:
            int8, fallback, float_top1, int8_top1 = _accuracy_gate(
                model, model_path, output, candidate, int8, quantized, nodes, input_name, images, max_drop,
                auto_fallback, progress, left_out)
        speed, within_noise = None, False
        if min_speedup is not None:
            speed, within_noise = _speed_gate(speed_check, model_path, candidate, min_speedup, output)

    evaluated_on = describe_cpu() if eval_data is not None else None
    details = {"format": quant_format, "weights": WEIGHT_RANGE, "method": method,
               "percentile": percentile if method == "percentile" else None,
               "calibration": images.calib_set.description, "calibration_images": images.count,
               "num_samples": num_samples, "seed": seed, "quantized_nodes": len(nodes) - len(fallback),
               "kept_float": excluded + fallback, "fp32_top1": float_top1, "int8_top1": int8_top1,
               "evaluated_on": evaluated_on, "evaluation_also_calibration": images.overlapping,
               # What the accuracies were measured on: the set, and its images that were used.
               "evaluation": images.eval_set.description if eval_data is not None else None,
               "evaluation_images": len(images.labels) if eval_data is not None else None,
               "tool_version": __version__, "left_out": images.left_out_counts,
               "speed": None if speed is None else speed.record(min_speedup)}
    entry = int8.metadata_props.add()
    entry.key, entry.value = QUANTIZATION_KEY, json.dumps(details, sort_keys=True)
    write_bytes_atomically(output, int8.SerializeToString())
    return QuantizeResult(output, metadata.replace(precision="int8"), [n for n in nodes if n not in fallback],
                          excluded + fallback, fallback, images.count, float_top1, int8_top1, evaluated_on,
                          speed, time.perf_counter() - started, max_drop, images.past_last_batch, images.short,
                          within_noise)


def _fp32_model(model_path: Path) -> tuple[onnx.ModelProto, ModelMetadata,
                                          Sequence[onnx.StringStringEntryProto]]:
    """The fp32 export to quantize, its metadata, and its metadata entries (a model holding them only), which are
    taken off the model: ONNX Runtime's quantizer rewrites metadata entries as text (another tool's entry in
    non-UTF-8 bytes raised UnicodeDecodeError), adds one of its own and names itself the producer, so it gets no
    entries, and the INT8 model the source's, byte for byte, and its producer."""
    model = load_onnx(model_path)  # with its weights, wherever they are stored: it is what gets quantized
    metadata = read_onnx_metadata(model, model_path)
    # Calibration would end in ONNX Runtime's traceback on a node it cannot load, after reading the images.
    if retired := scan_node.retired_scan_node(model):
        raise QuantizeError(f"{model_path}: {retired}")
    if metadata.precision != "fp32":
        raise QuantizeError(f"{model_path}: is already {metadata.precision}; quantize the fp32 export")
    check_against_graph(metadata, *graph_shapes(model), str(model_path))
    source_props = onnx.ModelProto(metadata_props=model.metadata_props).metadata_props
    del model.metadata_props[:]
    return model, metadata, source_props


def portable_form(model: onnx.ModelProto, model_path: Path) -> onnx.ModelProto:
    """The model with its SS2DScan nodes lowered to standard ops, for the calibrator; QuantizeError for a node whose
    input shapes the lowering cannot tell (an edited graph), which ended in a traceback after the images were read."""
    try:
        return lower_ss2d_scan(model)
    except ValueError as exc:
        raise QuantizeError(f"{model_path}: {exc}") from None


def _without_temporary_path(error: Exception) -> str:
    """ONNX Runtime's first line less the temporary file it names ("Load model from /tmp/... failed:")."""
    return re.sub(r"Load model from .*? failed:", "", first_line(error))


def _nodes_to_quantize(model: onnx.ModelProto, model_path: Path, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """The names of the nodes to quantize, and of those --exclude keeps float."""
    candidates = quantizable_nodes(model)
    excluded = excluded_nodes(candidates, exclude)
    nodes = [n.name for n in candidates if n.name not in excluded]
    if not candidates:  # its metadata says fp32, its weights say otherwise
        raise QuantizeError(f"{model_path}: no Conv, MatMul or Gemm with a float weight: is it quantized already?")
    if not nodes:  # also: quantize_static would read an empty list as "every node"
        raise QuantizeError(f"--exclude leaves none of the {len(candidates)} quantizable nodes of {model_path}; "
                            f"nothing to quantize")
    return nodes, excluded


def _check_gates_can_run(model_path: Path, metadata: ModelMetadata) -> None:
    """The gates run the model as it is: a plugin-form model needs the op library here (without it they failed
    after the calibration)."""
    if metadata.scan_form == "plugin":
        from medmamba_edge.runtime.backends.onnxruntime import custom_ops

        try:
            custom_ops.fused_session_options()
        except custom_ops.FusedScanUnavailable as exc:
            raise QuantizeError(f"{model_path}: the accuracy and speed gates run it, and {exc}") from None


@dataclass
class _Images:
    """What quantize_onnx reads before calibrating."""
    calib_set: Dataset
    groups: list[list[np.ndarray]]  # calibration_groups: each group as the model's batches
    batches: list[np.ndarray]  # the groups' batches in order, flattened once: the overlap count and the ranking
    count: int  # calibration images in the groups, padding aside
    short: int  # the images --num-samples did not get because the set ran out of usable ones
    past_last_batch: int  # usable calibration images a fixed-batch model had no whole batch for
    left_out_counts: dict[str, int]  # the QUANTIZATION_KEY record's "left_out"
    eval_set: Dataset | None = None  # with --eval:
    eval_read: Inputs | None = None
    labels: np.ndarray | None = None  # those of eval_read's images
    overlapping: int | None = None  # evaluation images that are also calibration images


def _read_images(calib, split: str | None, num_samples: int, seed: int, metadata: ModelMetadata, eval_data,
                 eval_split: str | None, progress: Progress, left_out: LeftOut,
                 also_calibrated: AlsoCalibrated) -> _Images:
    """The calibration images as calibration_groups, and the evaluation images with their labels, all read before
    the calibration: a set with no usable image was refused after it. ``left_out`` hears of the calibration's
    left-out images, ``also_calibrated`` of the overlap."""
    if eval_data is not None:
        eval_set = open_dataset(eval_data, split=eval_split, class_names=metadata.class_names, command="quantize",
                                split_option="--eval-split")
        labels = eval_set.labels()  # an unlabelled set is refused now
    calib_set = open_dataset(calib, split=split, default_split="train", command="quantize")
    calib_read = calibration_inputs(calib_set, num_samples, seed, metadata, progress)
    short = min(num_samples, len(calib_set)) - len(calib_read.indices)
    if eval_data is not None:
        eval_read = preprocessed(eval_set, metadata, EVAL_BATCH, "reading evaluation images", progress)
        labels = labels[eval_read.indices]
    groups, count = calibration_groups(calib_read.batches, metadata.batch)
    del calib_read.batches[:]  # the groups hold the images now
    images = _Images(calib_set, groups, [batch for group in groups for batch in group], count, short,
                     len(calib_read.indices) - count, {"calibration": len(calib_read.left_out)})
    left_out("calibration", calib_read.left_out)
    if images.past_last_batch:
        images.left_out_counts["calibration_past_last_whole_batch"] = images.past_last_batch
    if eval_data is not None:
        images.eval_set, images.eval_read, images.labels = eval_set, eval_read, labels
        calibrated_on = set(input_digests(images.batches))
        images.overlapping = sum(digest in calibrated_on for digest in input_digests(eval_read.batches))
        if images.overlapping:
            also_calibrated(images.overlapping, len(labels))
    return images


def _accuracy_gate(model: onnx.ModelProto, model_path: Path, output: Path, candidate: Path, int8: onnx.ModelProto,
                   quantized: Callable[[Sequence[str]], onnx.ModelProto], nodes: list[str], input_name: str,
                   images: _Images, max_drop: float, auto_fallback: bool, progress: Progress,
                   left_out: LeftOut) -> tuple[onnx.ModelProto, list[str], float, float]:
    """fp32 and the INT8 candidate (``int8``, saved at ``candidate``) evaluated; with ``auto_fallback``, the most
    sensitive layers kept float one at a time until within ``max_drop``. The model that passed, the layers kept
    float, fp32's and its top-1; QuantizeError if none passed."""
    eval_read, labels = images.eval_read, images.labels
    left_out("evaluation", eval_read.left_out)
    images.left_out_counts["evaluation"] = len(eval_read.left_out)
    measured_on = images.eval_set.description + (f", {len(eval_read.left_out)} of them left out"
                                                 if eval_read.left_out else "")
    with open_candidate(candidate, int8, model_path, output) as int8_backend:  # before fp32's minutes
        float_top1 = top1_accuracy(model_path, eval_read.batches, labels, progress)
        # The candidate's file is a temporary "candidate.onnx"; the bar names what it will be written as.
        int8_top1 = top1_accuracy(int8_backend, eval_read.batches, labels, progress,
                                  f"the INT8 candidate for {output.name}")
    fallback: list[str] = []
    if over_budget(points_lost(float_top1, int8_top1), max_drop) and auto_fallback:
        few = images.batches[: max(1, SENSITIVITY_IMAGES // len(images.batches[0]))]
        ranking = rank_by_sensitivity(model, lambda name: quantized([n for n in nodes if n != name]),
                                      nodes, few, input_name, progress)
        while over_budget(points_lost(float_top1, int8_top1), max_drop) and len(fallback) < len(nodes) - 1:
            fallback.append(ranking[len(fallback)])
            progress("keeping sensitive layers in float", len(fallback), len(nodes))
            int8 = quantized(fallback)
            onnx.save(int8, candidate)
            with open_candidate(candidate, int8, model_path, output) as int8_backend:
                int8_top1 = top1_accuracy(int8_backend, eval_read.batches, labels)
    if over_budget(points_lost(float_top1, int8_top1), max_drop):
        tried = f" even with {plural(len(fallback), 'layer')} kept in float" if fallback else ""
        drop, budget = compared_text(points_lost(float_top1, int8_top1), max_drop, 4)
        wrong = round((float_top1 - int8_top1) * len(labels) / 100)
        raise QuantizeError(
            f"INT8 top-1 {int8_top1:.2f}% is {drop} points ({wrong} of {plural(len(labels), 'image')}) below fp32 "
            f"{float_top1:.2f}% on {measured_on} ({describe_cpu()}){tried}, over the --max-drop budget of "
            f"{budget}; nothing was written to {output}" + ("" if auto_fallback else " (try --auto-fallback or --exclude)"))
    return int8, fallback, float_top1, int8_top1


def _speed_gate(speed_check: SpeedCheckFn, model_path: Path, candidate: Path, min_speedup: float,
                output: Path) -> tuple[SpeedCheck, bool]:
    """fp32 and the INT8 candidate timed on this machine, and whether the verdict was within its noise;
    QuantizeError below ``min_speedup``."""
    speed = speed_check(model_path, candidate, min_speedup)
    passed, within_noise = speed_verdict(speed, min_speedup)
    if not passed:
        speedup, asked = compared_text(speed.speedup, min_speedup, 3)
        noise = " on the median, the interval straddling it: within this machine's noise" if within_noise else ""
        raise QuantizeError(
            f"INT8 runs at {speedup}× fp32 ({speed.int8_ms:.2f} vs {speed.fp32_ms:.2f} ms median at batch "
            f"{speed.batch_label}, {speed.describe(min_speedup)}) on {speed.measured_on}, below --min-speedup "
            f"{asked}{noise}; nothing was written to {output} (on this CPU keep the fp32 model, or --exclude "
            f"the layers that do not pay)")
    return speed, within_noise
