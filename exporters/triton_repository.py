"""``medmamba-edge export-triton``: an exported model as a Triton model repository entry, and a DeepStream
``nvinfer`` configuration beside it, for the stock servers (no Python of ours runs in them).

::

    REPO/NAME/config.pbtxt              Triton: backend, I/O names and dims, max batch, dynamic batching,
                                        ONNX Runtime's threads (--threads: parameters["intra_op_thread_count"]),
                                        the model's metadata (parameters["medmamba_edge"]) for triton:// clients
    REPO/NAME/1/model.onnx | model.plan the model, copied
    REPO/NAME/labels.txt                class names, one a line (Triton's classification extension)
    REPO/NAME/libmedmamba_ort_ops.so    plugin-form ONNX: the native SS2DScan op (model_operations)
    REPO/NAME/deepstream_nvinfer.txt    DeepStream: Gst-nvinfer [property] group (network-type=1, classifier)
    REPO/NAME/deepstream_model.onnx     DeepStream's model: the ONNX with a Softmax after the logits (ONNX only)
    REPO/NAME/deepstream_labels.txt     DeepStream's classifier label file (one line, ';'-separated)
    REPO/NAME/README.md                 how to start the server on it

Preprocessing stays with the client (``medmamba-edge run triton://…`` runs the runtime's own PIL-exact
resize and normalisation, then sends float32 NCHW), so the served model is the exported graph unchanged.
DeepStream has no client: nvinfer scales frames itself and normalises as ``net-scale-factor·(x − offsets[c])``,
which is our ``(x/255 − mean[c])/std[c]`` only when std is the same for every channel (docs/serving.md).

Standard library, numpy and onnx only; ``check_triton_config`` parses the written config with Triton's own
schema (``tritonclient.grpc.model_config_pb2``) where tritonclient is installed (the ``serve`` extra).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from medmamba_edge.errors import UserError, first_line, plural
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends import ENGINE_SUFFIXES, ONNX_SUFFIXES, local_model_file, unknown_model_type
from medmamba_edge.runtime.backends.tensorrt.plugin import AUTOLOAD_PLUGIN_LIBRARY, find_autoload_plugin_library
from medmamba_edge.runtime.backends.triton import model_name_problem
from medmamba_edge.runtime.files import (check_writable, current_umask, exchange, local_output, missing_folders,
                                         mounts, remove_empty_folders, sync_path, sync_renamed)
from medmamba_edge.runtime.metadata import (METADATA_KEY, OUTPUT_NAME, ModelMetadata, check_against_graph,
                                            remove_onnx_metadata, unwritable_class_names)
from medmamba_edge.runtime.triton_defaults import (DEFAULT_INSTANCES, DEFAULT_KIND, DEFAULT_MAX_QUEUE_DELAY_US,
                                                   DEFAULT_MODEL_NAME, DEFAULT_PORT, max_batch_or_default,
                                                   range_problem)

ORT_LIBRARY = scan_node.ORT_OPS_LIBRARY + ".so"  # Triton runs on Linux
# The onnxruntime backend's parameter for a session's intra-op threads (its README, "Model Config Options"); none, or
# 0, lets ONNX Runtime start one per physical core of the server. inter_op_thread_count is not written: it counts only
# under execution_mode 1 (parallel), and the backend's default is 0 (sequential).
INTRA_OP_THREADS = "intra_op_thread_count"
DEEPSTREAM_CONFIG, DEEPSTREAM_LABELS, TRITON_LABELS = "deepstream_nvinfer.txt", "deepstream_labels.txt", "labels.txt"
# DeepStream's copy of an ONNX model: a Softmax after the logits, whose output nvinfer reads (with_softmax).
DEEPSTREAM_MODEL, PROBABILITIES = "deepstream_model.onnx", "probabilities"
# nvinfer sets TensorRT's INT8 flag only when its int8-calib-file can be read (else: "INT8 calibration file not
# specified. Trying FP16 mode."), and TensorRT builds no Q/DQ network without that flag. A Q/DQ network carries
# its own scales ("Calibrator won't be used in explicit precision mode"), so the file only has to exist.
DEEPSTREAM_CALIBRATION = "deepstream_int8_calibration.txt"
CALIBRATION_CACHE_TEXT = "TRT-0-EntropyCalibration2\n"  # a cache's header; no entries: the Q/DQ nodes hold the scales
NETWORK_MODES = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode
# nvinfer's model-color-format by the model's channels (0 RGB, 2 GRAY; metadata holds only RGB, 1 or 3 channels)
COLOR_FORMATS = {3: 0, 1: 2}
# Gst-nvinfer's documented [property] keys (DeepStream SDK, "Gst-nvinfer: configuration file properties";
# gstnvinfer_property_parser.h): everything written below must be one of them, checked by check_deepstream_config.
DEEPSTREAM_KEYS = frozenset({
    "gpu-id", "net-scale-factor", "offsets", "model-color-format", "model-file", "proto-file", "int8-calib-file",
    "batch-size", "model-engine-file", "onnx-file", "uff-file", "tlt-encoded-model", "tlt-model-key",
    "labelfile-path", "mean-file", "network-mode", "network-type", "process-mode", "interval", "gie-unique-id",
    "operate-on-gie-id", "operate-on-class-ids", "output-blob-names", "output-tensor-meta", "infer-dims",
    "uff-input-order", "custom-lib-path", "parse-classifier-func-name", "classifier-threshold",
    "classifier-async-mode", "classifier-type", "maintain-aspect-ratio", "symmetric-padding", "scaling-filter",
    "scaling-compute-hw", "workspace-size", "enable-dla", "use-dla-core", "secondary-reinfer-interval",
    "input-object-min-width", "input-object-min-height", "input-object-max-width", "input-object-max-height",
    "num-detected-classes", "cluster-mode", "parse-bbox-func-name", "force-implicit-batch-dim", "is-classifier",
    "engine-create-func-name", "filter-out-class-ids", "layer-device-precision", "network-input-order",
    "output-io-formats", "crop-objects-to-roi-boundary", "disable-output-host-copy", "input-tensor-from-meta",
})


class TritonExportError(UserError):
    """A model that cannot be written as a Triton repository or DeepStream configuration."""


@dataclass(frozen=True)
class ServedModel:
    """What the repository says about one model: where it came from and what the server must be told."""

    source: Path
    kind: str  # "onnx" or "engine"
    metadata: ModelMetadata
    input_name: str
    output_name: str
    max_batch: int  # Triton's max_batch_size: 0 for a fixed-batch model (its dims carry the batch)
    needs_ort_ops: bool  # plugin-form ONNX: SS2DScan runs through our custom-op library
    needs_trt_plugin: bool  # SS2DScan becomes our TensorRT plugin (a plugin-form ONNX or an engine built from one)
    precision: str
    plugin_in_plan: bool = False  # an engine whose plan holds the plugin library (EngineManifest.carries_plugin)
    lean_runtime_in_plan: bool = False  # a --version-compatible engine: TensorRT runs it on the runtime its plan holds
    engine_runs_on: str | None = None  # an engine's EngineManifest.runs_on
    onnx_runtime_only_ops: tuple[str, ...] = ()  # a QOperator model's QLinear*/com.microsoft ops: not TensorRT's
    external_weights: bool = False  # an ONNX model whose weights are in files of their own

    @property
    def dims(self) -> list[int]:
        chw = [self.metadata.in_chans, *self.metadata.input_size]
        return chw if self.max_batch else [self.metadata.batch or 1, *chw]

    @property
    def output_dims(self) -> list[int]:
        return [self.metadata.num_classes] if self.max_batch else [self.metadata.batch or 1, self.metadata.num_classes]


@dataclass
class TritonExport:
    folder: Path  # REPO/NAME
    name: str
    served: ServedModel
    config_text: str
    deepstream_text: str | None  # None: refused (deepstream_refusal says why)
    deepstream_refusal: str | None = None
    schema_checked_with: str | None = None  # the tritonclient version the config was parsed with
    notes: list[str] = field(default_factory=list)
    server_command: str = ""  # how to start tritonserver on the repository (the plugin option an engine needs)


def describe_model(path: str | Path, max_batch: int | None) -> ServedModel:
    """Read an exported ONNX model or a TensorRT engine (its manifest) into what the repository needs; ``max_batch``:
    --max-batch, None for its default (_max_batch_size)."""
    path = local_model_file(path, "export-triton")
    if not path.is_file():
        raise TritonExportError(f"{path}: {'not a file' if path.exists() else 'no such model file'}")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        from onnx.external_data_helper import uses_external_data

        from medmamba_edge.runtime.metadata import (graph_inputs, graph_shapes, load_onnx, onnx_runtime_only_ops,
                                                    read_onnx_metadata)

        model = load_onnx(path, external_data=False)  # once: read twice, a replaced file could mix two versions
        metadata = read_onnx_metadata(model, path)
        retired = scan_node.retired_scan_node(model)
        if retired:
            raise TritonExportError(f"{path}: {retired}")
        inputs = graph_inputs(model)
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise TritonExportError(f"{path}: {plural(len(inputs), 'input')} and "
                                    f"{plural(len(model.graph.output), 'output')}; "
                                    f"a MedMamba export has one of each")
        check_against_graph(metadata, *graph_shapes(model), str(path))
        plugin_form = scan_node.has_scan_nodes(model)
        return ServedModel(path, "onnx", metadata, inputs[0].name, model.graph.output[0].name,
                           _max_batch_size(path, max_batch, metadata.batch, None,
                                           "export it with --dynamic-batch for Triton's dynamic batcher"),
                           plugin_form, plugin_form, metadata.precision,
                           onnx_runtime_only_ops=tuple(onnx_runtime_only_ops(model)),
                           external_weights=any(uses_external_data(t) for t in model.graph.initializer))
    if suffix in ENGINE_SUFFIXES:
        from medmamba_edge.runtime.backends.tensorrt.manifest import read_manifest

        manifest = read_manifest(path)
        (input_name, shapes), = manifest.profile.items()
        smallest, largest = shapes["min"][0], shapes["max"][0]
        metadata = manifest.metadata
        if smallest == largest:  # one batch size, whatever the ONNX allowed: served as a fixed-batch model
            metadata = metadata.replace(batch=smallest)
        elif smallest > 1:
            raise TritonExportError(
                f"{path}: its profile takes batches {smallest} to {largest}, but Triton's dynamic batcher sends "
                f"any batch from 1; rebuild it with --min-batch 1 (or one batch size, --min-batch = --max-batch)")
        return ServedModel(path, "engine", metadata, input_name, OUTPUT_NAME,
                           _max_batch_size(path, max_batch, metadata.batch if smallest == largest else None, largest,
                                           "build it with --min-batch 1 (from a --dynamic-batch export) for Triton's "
                                           "dynamic batcher"), False,
                           manifest.plugin_sha256 is not None, manifest.precision, manifest.carries_plugin,
                           manifest.build.version_compatible, engine_runs_on=manifest.runs_on)
    raise TritonExportError(str(unknown_model_type(path)))


def _max_batch_size(path: Path, max_batch: int | None, fixed: int | None, largest: int | None,
                    dynamic_hint: str) -> int:
    """Triton's max_batch_size: 0 for a model of one batch size (``fixed``), else --max-batch or its default
    (max_batch_or_default: an engine's ``largest``, the most its profile takes). A --max-batch the model cannot take
    is refused rather than dropped or capped, as --threads is for an engine: the config would not be what was asked
    (Triton's tensorrt backend refuses a max_batch_size above the profile's anyway)."""
    if fixed is not None:
        if max_batch not in (None, fixed):
            raise TritonExportError(f"{path}: --max-batch {max_batch}, but this model runs batch {fixed} only, which "
                                    f"Triton does not batch (max_batch_size 0); {dynamic_hint}, or leave "
                                    f"--max-batch out")
        return 0
    if largest is not None and max_batch is not None and max_batch > largest:
        raise TritonExportError(f"{path}: --max-batch {max_batch} is above its profile's largest batch (it takes "
                                f"batches 1 to {largest}); rebuild it with build-engine --max-batch {max_batch}, or "
                                f"leave --max-batch out to serve up to {largest}")
    return max_batch_or_default(max_batch, largest)


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (JSON's escapes are a subset it reads)."""
    import json

    return json.dumps(text, ensure_ascii=True)


def triton_config(served: ServedModel, name: str, *, max_queue_delay_us: int, instances: int, kind: str,
                  op_library: str | None, threads: int | None = None) -> str:
    """config.pbtxt for Triton's onnxruntime or tensorrt backend; ``threads``: each ONNX Runtime session's intra-op
    threads (onnxruntime only)."""
    lines = [f"name: {_pbtxt_string(name)}",
             f'backend: "{"onnxruntime" if served.kind == "onnx" else "tensorrt"}"',
             f"max_batch_size: {served.max_batch}",
             "input [", "  {", f"    name: {_pbtxt_string(served.input_name)}", "    data_type: TYPE_FP32",
             f"    dims: [ {', '.join(map(str, served.dims))} ]", "  }", "]",
             "output [", "  {", f"    name: {_pbtxt_string(served.output_name)}", "    data_type: TYPE_FP32",
             f"    dims: [ {', '.join(map(str, served.output_dims))} ]",
             f'    label_filename: "{TRITON_LABELS}"', "  }", "]"]
    if served.max_batch:
        # Requests from many clients are merged into batches of up to max_batch_size, waiting at most this long.
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}", "  }", "]"]
    if op_library:
        lines += ["model_operations {", f"  op_library_filename: {_pbtxt_string(op_library)}", "}"]
    if threads is not None:  # the backend reads every parameter as a string
        lines += ["parameters {", f'  key: "{INTRA_OP_THREADS}"', f'  value {{ string_value: "{threads}" }}', "}"]
    lines += ["parameters {", f'  key: "{METADATA_KEY}"', f"  value {{ string_value: {_pbtxt_string(served.metadata.to_json())} }}",
              "}"]
    return "\n".join(lines) + "\n"


def deepstream_scaling(metadata: ModelMetadata) -> tuple[float, list[float]]:
    """(net-scale-factor, offsets) with ``scale·(x − offset[c]) = (x/255 − mean[c])/std[c]`` for 8-bit x.

    nvinfer takes one scale for all channels, so this holds only when std is the same for every channel;
    a model with per-channel std is refused (TritonExportError) rather than fed wrongly normalised frames."""
    std = metadata.std
    if any(not math.isclose(s, std[0], rel_tol=1e-6) for s in std):
        raise TritonExportError(
            f"DeepStream's nvinfer normalises with one net-scale-factor for all channels, but this model's std is "
            f"per channel ({', '.join(f'{s:g}' for s in std)}); the frames would be normalised wrongly")
    return 1.0 / (255.0 * std[0]), [255.0 * m for m in metadata.mean]


def deepstream_config(served: ServedModel, *, plugin_path: str | None, batch: int) -> str:
    """A Gst-nvinfer [property] group running DEEPSTREAM_MODEL (the model with a Softmax) as a primary classifier
    on whole frames."""
    if served.kind != "onnx":
        raise TritonExportError(
            "an engine outputs logits, and nvinfer's built-in classifier parser takes its output for probabilities "
            "(it labels a frame only with a class whose value is above 0, and reports that value as the confidence); "
            "run export-triton on the ONNX export for DeepStream, which gets a Softmax and builds its own engine")
    if served.onnx_runtime_only_ops:
        raise TritonExportError(
            f"nvinfer builds a TensorRT engine, and TensorRT does not take {', '.join(served.onnx_runtime_only_ops)} "
            f"(a `quantize --format qoperator` model, for ONNX Runtime); quantize with --format qdq for DeepStream")
    meta = served.metadata
    scale, offsets = deepstream_scaling(meta)
    color = COLOR_FORMATS[meta.in_chans]
    properties = {
        "gpu-id": 0,
        # y = net-scale-factor·(x − offsets[c]) on 8-bit pixels: our (x/255 − mean[c])/std[c].
        "net-scale-factor": repr(scale),
        "offsets": ";".join(repr(o) for o in offsets),
        "model-color-format": color,
        "infer-dims": f"{meta.in_chans};{meta.input_size[0]};{meta.input_size[1]}",
        "batch-size": batch,
        "network-mode": NETWORK_MODES[served.precision],
        "network-type": 1,  # classifier
        "process-mode": 1,  # primary: whole frames
        "gie-unique-id": 1,
        "output-blob-names": PROBABILITIES,
        "labelfile-path": DEEPSTREAM_LABELS,
        "classifier-threshold": 0.0,  # every frame gets its top label; thresholds belong to the application
        # train.py resizes to H×W whatever the aspect ratio, bilinearly (nvinfer's filter has no antialiasing).
        "maintain-aspect-ratio": 0,
        "scaling-filter": 1,
        "onnx-file": DEEPSTREAM_MODEL,
        # nvinfer builds the engine from the ONNX on first start and saves it under this name (its own naming:
        # <onnx>_b<batch>_gpu<id>_<precision>.engine), which the next start loads.
        "model-engine-file": f"{DEEPSTREAM_MODEL}_b{batch}_gpu0_{served.precision}.engine",
    }
    if served.precision == "int8":
        properties["int8-calib-file"] = DEEPSTREAM_CALIBRATION
    if plugin_path:
        properties["custom-lib-path"] = plugin_path
    header = ["# Gst-nvinfer configuration written by medmamba-edge export-triton (see docs/serving.md).",
              # quoted with escapes: a file name may hold a line break, which would end the comment
              f"# Model: {_pbtxt_string(served.source.name)}, {meta.variant}, input {meta.input_size[0]}x{meta.input_size[1]}, "
              f"classes {', '.join(meta.class_names)}.",
              "# Paths are relative to this file, as nvinfer resolves them."]
    return "\n".join(header + ["[property]"] + [f"{k}={v}" for k, v in properties.items()]) + "\n"


def with_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its logits turned into class probabilities (output PROBABILITIES): what nvinfer's built-in
    classifier parser expects, so that every frame gets its top class and a confidence in [0, 1]. Without our
    metadata: it is DeepStream's copy, and every tool of ours reads a model's output as logits."""
    (logits,) = model.graph.output
    remove_onnx_metadata(model)
    model.doc_string = f"DeepStream's copy of a medmamba-edge export: its logits through a Softmax ({PROBABILITIES})"
    model.graph.node.append(onnx.helper.make_node("Softmax", [logits.name], [PROBABILITIES], axis=1,
                                                  name="deepstream_softmax"))
    probabilities = onnx.ValueInfoProto()
    probabilities.CopyFrom(logits)
    probabilities.name = PROBABILITIES
    model.graph.output.remove(logits)
    model.graph.output.append(probabilities)
    return model


def check_deepstream_config(text: str, source: str = DEEPSTREAM_CONFIG) -> None:
    """Refuse keys Gst-nvinfer does not document (a typo would be silently ignored by DeepStream)."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys keep their case, as GKeyFile reads them
    try:
        parser.read_string(text, source)
    except configparser.Error as exc:
        raise TritonExportError(f"{source}: not a key file Gst-nvinfer can read ({first_line(exc)})") from None
    unknown = sorted(set(parser["property"]) - DEEPSTREAM_KEYS)
    if unknown:
        raise TritonExportError(f"{source}: keys Gst-nvinfer does not document: {', '.join(unknown)}")


def check_triton_config(text: str, source: str = "config.pbtxt") -> str | None:
    """Parse ``text`` with Triton's own ModelConfig schema; the tritonclient version used, or None when
    tritonclient[grpc] is not installed (the serve extra brings it). Unknown fields and wrong types are errors."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient without its grpc extra raises RuntimeError
        return None
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonExportError(f"{source}: not a valid Triton model configuration ({first_line(exc)})") from None
    return importlib.metadata.version("tritonclient")


def _plugin_by_path(served: ServedModel) -> bool:
    """Whether the server loads the TensorRT plugin library by path (the tensorrt backend's ``plugins=``): for an
    engine that needs it, unless it is version-compatible and so carries the library inside (build-engine
    serialises it), which the backend's version-compatible mode trusts."""
    return served.kind == "engine" and served.needs_trt_plugin and not served.plugin_in_plan


def _backend_options(served: ServedModel, plugin: str | None) -> str:
    """tritonserver's option an engine needs to load: the plugin library it does not carry (``plugins=``), or, for a
    version-compatible plan, leave to run the lean runtime inside it, and the plugin in that if any: the tensorrt
    backend allows a plan's host code only under ``version-compatible=true``, and TensorRT refuses the plan without."""
    if _plugin_by_path(served):
        return f" --backend-config=tensorrt,plugins={plugin or AUTOLOAD_PLUGIN_LIBRARY}"
    if served.lean_runtime_in_plan:
        return " --backend-config=tensorrt,version-compatible=true"
    return ""


def _readme(name: str, served: ServedModel, plan: _ServingPlan, deepstream_refusal: str | None) -> str:
    backend = "onnxruntime" if served.kind == "onnx" else "tensorrt"
    lines = [f"# {name}: {served.source.name} for Triton Inference Server" +
             ("" if deepstream_refusal else " and DeepStream"), "",
             "Written by `medmamba-edge export-triton`; docs/serving.md explains every choice.", "",
             "```", plan.server_command,
             f"medmamba-edge run triton://SERVER:{DEFAULT_PORT}/{name} SOURCE   # preprocessing runs on the client", "```", "",
             f"Backend: {backend}. Input `{served.input_name}` float32 {served.dims} (normalised NCHW, as "
             f"`medmamba-edge run` prepares it), output `{served.output_name}` logits {served.output_dims}; "
             f"max_batch_size {served.max_batch}."]
    if plan.threads:
        lines += ["", plan.threads]
    if plan.op_library:
        lines += ["", f"The SS2DScan nodes run in `{plan.op_library}` (loaded through `model_operations`); it was built "
                  "for this machine's CPU architecture and needs the server's ONNX Runtime to be 1.17 or newer (the "
                  "exported model, ONNX IR version 10, needs 1.18)."]
    if served.kind == "engine":
        # A version- or hardware-compatible plan is not tied to one TensorRT or GPU, as a default one is.
        lines += ["", f"This engine runs on {served.engine_runs_on} only; `medmamba-edge build-engine` inside the "
                  "Triton container builds one for the server's TensorRT and GPU."]
    lines += ["", f"DeepStream: `{DEEPSTREAM_CONFIG}` is the `config-file-path` of an nvinfer element; it runs "
                  f"`{DEEPSTREAM_MODEL}` (this model, its logits through a Softmax) and labels with "
                  f"`{DEEPSTREAM_LABELS}`." if not deepstream_refusal else f"No DeepStream config: {deepstream_refusal}."]
    return "\n".join(lines) + "\n"


def export_triton(model: str | Path, repository: str | Path, *, name: str = DEFAULT_MODEL_NAME,
                  max_batch: int | None = None, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                  instances: int = DEFAULT_INSTANCES, kind: str = DEFAULT_KIND,
                  server_root: str | None = None, plugin: str | None = None,
                  deepstream_batch: int | None = None, threads: int | None = None) -> TritonExport:
    """Write ``repository/name`` (temporary folder, renamed into place when complete; a model folder already
    there is replaced). ``max_batch``: None for the model's default (_max_batch_size). ``server_root``: where the
    server sees ``repository`` (absolute paths in the configs point there; default: its absolute path here).
    ``plugin``: the TensorRT plugin library's path on the DeepStream device (default: a copy beside the config, when
    one is built here). ``threads``: each instance's ONNX Runtime intra-op threads (an ONNX model only; default: the
    server's ONNX Runtime's)."""
    kind = _check_options(name, kind, server_root, {"--max-batch": max_batch, "--instances": instances,
                                                    "--deepstream-batch": deepstream_batch,
                                                    "--max-queue-delay-us": max_queue_delay_us, "--threads": threads})
    served = describe_model(model, max_batch)
    _check_model(model, served, plugin, threads)
    repository = local_output(repository, "export-triton", folder=True)
    _check_output(model, repository, name)
    deepstream_text, refusal = _deepstream(model, served, deepstream_batch, _deepstream_plugin(served, plugin))
    plan = _plan_serving(served, repository, name, kind, server_root, plugin, deepstream=deepstream_text is not None,
                         instances=instances, threads=threads)
    config_text = triton_config(served, name, max_queue_delay_us=max_queue_delay_us, instances=instances,
                                kind=plan.kind, op_library=plan.op_library, threads=threads)
    checked_with = check_triton_config(config_text, f"{repository / name / 'config.pbtxt'}")
    library = _op_library_file(model) if plan.op_library else None
    whole_model = _whole_model(served)
    _write_atomically(repository, name, lambda staging: _stage(
        staging, served, name, plan, config_text, deepstream_text, refusal, library, whole_model))
    return TritonExport(repository / name, name, served, config_text, deepstream_text, refusal, checked_with,
                        plan.notes, plan.server_command)


def _check_options(name: str, kind: str, server_root: str | None, counts: dict[str, int | None]) -> str:
    """Refuse an option out of its range or form, before the model is read; Triton's instance kind."""
    for option, value in counts.items():
        if problem := range_problem(option, value):
            raise TritonExportError(problem)
    if server_root is not None and not server_root.startswith("/"):  # else the server's working directory's
        raise TritonExportError(f"--server-root must be an absolute path on the server (as it sees the repository, "
                                f"e.g. /models), got {server_root!r}")
    if kind.lower() not in ("cpu", "gpu"):  # the CLI's words; Triton's are KIND_CPU and KIND_GPU
        raise TritonExportError(f"--kind must be cpu or gpu, got {kind!r}")
    if problem := model_name_problem(name):
        raise TritonExportError(problem)
    return f"KIND_{kind.upper()}"


def _check_model(model: str | Path, served: ServedModel, plugin: str | None, threads: int | None) -> None:
    """Refuse what the model makes wrong: a relative --plugin or any --threads for an engine, class names no label
    file holds."""
    # nvinfer reads a relative custom-lib-path from its config's folder; Triton's plugins= from its working directory
    if plugin is not None and not plugin.startswith("/") and _plugin_by_path(served):
        raise TritonExportError(f"--plugin must be an absolute path on the server for an engine (Triton's tensorrt "
                                f"backend loads it by that path), got {plugin!r}")
    if threads is not None and served.kind == "engine":  # dropped in silence, the count would seem to be set
        raise TritonExportError(f"{model}: --threads sets ONNX Runtime's intra-op threads (the onnxruntime backend); "
                                f"an engine runs on the tensorrt backend, which has no such setting")
    unwritable = unwritable_class_names(served.metadata.class_names)
    if unwritable:  # a model exported before the rule: labels.txt and DeepStream's label file would be wrong
        raise TritonExportError(f"{model}: {unwritable}: re-export it with other names (--classes)")


def _check_output(model: str | Path, repository: Path, name: str) -> None:
    """Refuse a repository whose model folder holds the model, or that cannot be written."""
    # The folder itself, not where a link by that name points: a link is replaced, its target left alone.
    if Path(os.path.realpath(model)).is_relative_to(Path(os.path.realpath(repository)) / name):
        raise TritonExportError(f"{model}: lies in {repository / name}, which export-triton replaces as a whole; "
                                f"write the repository elsewhere (-o) or under another --name")
    check_writable(repository, folder=True)


@dataclass
class _ServingPlan:
    """How the server runs the model, as the configs and the README say it."""

    kind: str  # Triton's KIND_CPU or KIND_GPU
    server_command: str
    op_library: str | None  # model_operations' library on the server (plugin-form ONNX)
    plugin_source: Path | None  # the TensorRT plugin library built here, copied beside the config
    notes: list[str]
    threads: str | None  # what ONNX Runtime's threads on the server will be (an ONNX model's README says it)


def _deepstream_plugin(served: ServedModel, plugin: str | None) -> str | None:
    """nvinfer's custom-lib-path: a --plugin path as given (one on the device), else the autoload build beside the
    config. Relative, as nvinfer resolves it from the config's folder: DeepStream runs outside Triton's container
    (or on a Jetson the folder was copied to), where the server's root (/models) is no path."""
    if not served.needs_trt_plugin:
        return None
    return plugin if plugin is not None else AUTOLOAD_PLUGIN_LIBRARY


def _threads(served: ServedModel, instances: int, threads: int | None) -> str | None:
    """What the server's ONNX Runtime sessions will run on, and how to set it (None for an engine)."""
    if served.kind != "onnx":
        return None
    each = f"each of the {instances} instances" if instances > 1 else "the instance"
    if threads is not None:
        return (f"ONNX Runtime runs {each} on {threads} intra-op thread{'s' * (threads > 1)} ({INTRA_OP_THREADS}, "
                f"from --threads); a server started with "
                f"--backend-config=onnxruntime,enable-global-threadpool=1 ignores it for its own {INTRA_OP_THREADS}.")
    # The backend's default, as ONNX Runtime's: neither reads a container's CPU quota (docs/performance.md).
    return (f"ONNX Runtime's threads are left to the server: it starts one intra-op thread per physical core of the "
            f"server for {each}, and reads no CPU quota (docker --cpus, a Kubernetes CPU limit), so in a container "
            f"with one they oversubscribe it; export with --threads N (the server's cores, or its quota, divided by "
            f"the instances) to set a count.")


def _plan_serving(served: ServedModel, repository: Path, name: str, kind: str, server_root: str | None,
                  plugin: str | None, *, deepstream: bool, instances: int, threads: int | None) -> _ServingPlan:
    if served.kind == "engine" and kind == "KIND_CPU":
        kind = "KIND_GPU"  # a TensorRT engine has no CPU instance
    root = (server_root or str(repository.resolve())).rstrip("/") or "/"
    folder_on_server = f"{root}/{name}"
    op_library = f"{folder_on_server}/{ORT_LIBRARY}" if served.needs_ort_ops else None
    notes: list[str] = []

    trt_plugin_source: Path | None = None
    # Triton runs a plugin-form ONNX on our ONNX Runtime op, and a version-compatible plan carries the plugin: only
    # a DeepStream config, or a server loading it by path (plugins=), takes the TensorRT plugin library.
    if served.needs_trt_plugin and plugin is None and (_plugin_by_path(served) or deepstream):
        # The self-registering build: Triton's `plugins=`, LD_PRELOAD and nvinfer's custom-lib-path only dlopen it.
        try:
            trt_plugin_source = find_autoload_plugin_library()
        except UserError:
            beside = f", beside {DEEPSTREAM_CONFIG}" if deepstream else ""
            notes.append(f"no TensorRT plugin library is built here: build it on the device "
                         f"(medmamba-edge build-plugin) and put {AUTOLOAD_PLUGIN_LIBRARY} in the model's folder "
                         f"({folder_on_server} on the server{beside})")
        plugin = f"{folder_on_server}/{AUTOLOAD_PLUGIN_LIBRARY}"

    threads_text = _threads(served, instances, threads)
    if threads_text and threads is None and instances > 1:  # instances × cores threads even on a bare server
        notes.append(threads_text)
    server_command = f"tritonserver --model-repository={root}" + _backend_options(served, plugin)
    return _ServingPlan(kind, server_command, op_library, trt_plugin_source, notes, threads_text)


def _deepstream(model: str | Path, served: ServedModel, deepstream_batch: int | None,
                plugin_path: str | None) -> tuple[str | None, str | None]:
    """DeepStream's nvinfer config, or None and why not (a fixed-batch model asked for another batch is an error)."""
    ds_batch = deepstream_batch if deepstream_batch is not None else served.metadata.batch or served.max_batch
    if served.kind == "onnx" and served.max_batch == 0 and ds_batch != (served.metadata.batch or 1):
        raise TritonExportError(f"{model}: a fixed-batch model runs batch {served.metadata.batch}, not {ds_batch}")
    try:
        deepstream_text = deepstream_config(served, plugin_path=plugin_path, batch=ds_batch)
        check_deepstream_config(deepstream_text)
    except TritonExportError as exc:
        return None, str(exc)
    return deepstream_text, None


def _op_library_file(model: str | Path) -> Path:
    """Our ONNX Runtime op library, which a plugin-form model's folder gets a copy of."""
    from medmamba_edge.runtime.backends.onnxruntime import custom_ops

    try:  # before anything is written
        return custom_ops.library_path()
    except custom_ops.FusedScanUnavailable as exc:
        raise TritonExportError(f"{model}: {exc}") from None


def _whole_model(served: ServedModel) -> onnx.ModelProto | None:
    """An ONNX model whose weights are in files of their own, read in: Triton gets one file."""
    if not served.external_weights:
        return None
    from medmamba_edge.runtime.metadata import load_onnx

    return load_onnx(served.source)


def _stage(staging: Path, served: ServedModel, name: str, plan: _ServingPlan, config_text: str,
           deepstream_text: str | None, refusal: str | None, library: Path | None,
           whole_model: onnx.ModelProto | None) -> None:
    """Write the model folder's files into ``staging``."""
    model_file = "model.onnx" if served.kind == "onnx" else "model.plan"
    (staging / "1").mkdir()
    if whole_model is not None:
        onnx.save(whole_model, staging / "1" / model_file)
    else:
        shutil.copyfile(served.source, staging / "1" / model_file)
    (staging / "config.pbtxt").write_text(config_text)
    (staging / TRITON_LABELS).write_text("\n".join(served.metadata.class_names) + "\n")
    if library is not None:
        shutil.copyfile(library, staging / ORT_LIBRARY)
    if plan.plugin_source is not None:
        shutil.copyfile(plan.plugin_source, staging / AUTOLOAD_PLUGIN_LIBRARY)
    if deepstream_text is not None:
        onnx.save(with_softmax(onnx.load(str(staging / "1" / model_file))), staging / DEEPSTREAM_MODEL)
        (staging / DEEPSTREAM_CONFIG).write_text(deepstream_text)
        (staging / DEEPSTREAM_LABELS).write_text(";".join(served.metadata.class_names) + "\n")
        if served.precision == "int8":
            (staging / DEEPSTREAM_CALIBRATION).write_text(CALIBRATION_CACHE_TEXT)
    # A file name's undecodable bytes as \udcff escapes: UTF-8 cannot hold them.
    (staging / "README.md").write_text(_readme(name, served, plan, refusal), errors="backslashreplace")


def _write_atomically(repository: Path, name: str, stage: Callable[[Path], None]) -> None:
    """``repository/name`` as ``stage`` writes it into a temporary folder, renamed into place when complete and
    fsynced (as ``AtomicOutput`` does a file: an EIO before the rename leaves the old folder, EINVAL and the like
    are no failure); on failure the temporary folder and the folders made on the way are removed, and an OSError is
    one line."""
    # Made where the path leads (a/../b and links resolved first: mkdir made a/ on the way), and removed again if
    # the export fails.
    repository_folder = Path(os.path.realpath(repository))
    created = missing_folders(repository_folder)
    staging = None
    try:
        repository_folder.mkdir(parents=True, exist_ok=True)
        # and written there: nox/../y/repo/medmamba, nox never made, is no path the kernel can follow
        workspace = _workspace(repository_folder)
        _remove_leftovers(workspace, name, repository_folder)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(name), suffix=".partial", dir=workspace))
        stage(staging)
        # Each file and folder on the disk before the rename, and the rename after it: renamed unsynced, a power
        # cut could leave the model folder in place with empty or torn files (ext4 writes the rename first).
        mask = current_umask()
        for path in (staging, *staging.rglob("*")):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
            sync_path(path, folder=path.is_dir())
        _replace_folder(staging, repository_folder / name, workspace)
        sync_renamed(repository_folder / name, created)
    except BaseException as exc:
        if staging is not None:  # the new folder, or after the exchange what it swapped out, a link perhaps
            _remove(staging)
        remove_empty_folders(created)
        if isinstance(exc, OSError):
            raise TritonExportError(f"{repository / name}: cannot write ({exc.strerror or exc})") from None
        raise


STALE_STAGING_S = 3600.0


def _workspace(repository: Path) -> Path:
    """Where a model folder is built, and the one it replaces left until removed (swapped out, or moved aside): on
    the repository's mount (so that the renames are atomic) and outside the repository where possible. Triton
    takes every folder of a repository for a model, hidden ones too: a folder an export killed mid-way (SIGKILL,
    out of memory, power) left there stops a server from starting ("directory name must equal model name"). Its
    parent, unless the repository is a mount of its own (a volume in a container, a bind mount: rename() does not
    cross one) or the parent is not ours to use; then the repository itself."""
    parent = repository.resolve().parent
    if _is_mount_point(repository) or not os.access(parent, os.R_OK | os.W_OK | os.X_OK):
        return repository
    return parent


def _is_mount_point(path: Path) -> bool:
    """os.path.ismount, and the bind mounts it misses (same device as the parent): the mount table lists those."""
    if os.path.ismount(path):
        return True
    try:
        table = mounts()
    except OSError:  # not Linux: os.path.ismount's answer
        return False
    return str(path.resolve()) in {point for _, point, _, _ in table}


def _staging_owner(name: str) -> str:
    """How this host's temporary folders for ``name`` begin: the host says whose they are where machines or
    containers share the storage (a process id means something on its own host only)."""
    return f".{name}.{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:64]}"


def _staging_prefix(name: str) -> str:
    return f"{_staging_owner(name)}.{os.getpid()}."


def _remove_leftovers(workspace: Path, name: str, repository: Path) -> None:
    """Remove what exports of ``name`` killed mid-way left in ``workspace``: this host's where their process is gone
    (folders carry the host and process id); inside the repository, where Triton would take them for models, any
    host's over an hour old (another container's export, its host name gone with it; a running one is younger)."""
    own = re.compile(rf"{re.escape(_staging_owner(name))}\.(\d+)\.[^.]+\.(?:partial|old)")
    anyone = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9-]*\.\d+\.[^.]+\.(?:partial|old)")
    try:
        entries = list(workspace.iterdir())  # a link or file too: what an exchange swapped out of REPO/NAME
    except OSError:  # not listable: nothing of ours to find there
        return
    for entry in entries:
        match = own.fullmatch(entry.name)
        try:
            gone = (not _process_exists(int(match.group(1))) if match else
                    workspace == repository and anyone.fullmatch(entry.name) is not None
                    and time.time() - entry.lstat().st_mtime > STALE_STAGING_S)
        except OSError:  # removed meanwhile
            continue
        if gone:
            _remove(entry)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _replace_folder(new: Path, target: Path, workspace: Path) -> None:
    """Move ``new`` to ``target``; whatever is there (a folder, a link, a dangling one) is swapped with it in one
    step (``exchange``: a power cut or kill at any point leaves a model folder, the old or the new), and then sits
    under ``new``'s staging name, which _remove_leftovers knows, until removed. Where the system cannot exchange, it
    is moved aside (into ``workspace``) first, leaving no model folder until the second rename."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if exchange(new, target):
        _remove(new)
        return
    old = Path(tempfile.mkdtemp(prefix=_staging_prefix(target.name), suffix=".old", dir=workspace))
    os.rename(target, old / target.name)
    os.rename(new, target)
    _remove(old)


def _remove(path: Path) -> None:
    """Remove a folder, or the link or file an exchange left under a staging name (rmtree refuses a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


__all__ = ["DEEPSTREAM_KEYS", "TritonExport", "TritonExportError", "check_deepstream_config", "check_triton_config",
           "deepstream_scaling", "export_triton"]
