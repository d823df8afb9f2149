"""Official MedMamba checkpoint → ONNX, in plugin form (one ``SS2DScan`` node per SS2D block, for our
TensorRT plugin and the fused ONNX Runtime op) or portable form (standard ONNX ops only), verified
against PyTorch on real images before anything is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError

from medmamba_edge.errors import MissingExtraError, UserError, first_line, install_hint

# A runtime-only install has neither; torch.onnx's exporter needs onnxscript only once it runs, deep inside.
try:
    import torch
except ImportError as exc:
    raise MissingExtraError(f"exporting a checkpoint needs PyTorch ({exc}): {install_hint('export')}") from None
try:
    import onnxscript.optimizer
except ImportError:
    raise MissingExtraError(f"exporting a checkpoint needs onnxscript: {install_hint('export')}") from None

from medmamba_edge import __version__
from medmamba_edge.checkpoint import LoadedCheckpoint, class_names_files, load_checkpoint, resolve_class_names
from medmamba_edge.runtime import scan_node
from medmamba_edge.runtime.backends import local_model_file, run_in_fixed_batches
from medmamba_edge.runtime.bundled import sample_image_paths
from medmamba_edge.runtime.decode import read_image
from medmamba_edge.runtime.files import check_onnx_name, check_writable, overwrites_input, write_bytes_atomically
from medmamba_edge.runtime.metadata import (DEFAULT_INPUT_SIZE, INPUT_NAME, OUTPUT_NAME, SCAN_FORMS, ModelMetadata,
                                            height_width, positive_int, write_onnx_metadata)
from medmamba_edge.runtime.metrics import TIERS, compared_text, logits_outside, non_finite_rows, tolerance_problem
from medmamba_edge.runtime.preprocess import preprocess
from medmamba_edge.runtime.shared_change import ignored_warnings, logger_levels

from .portable import lower_ss2d_scan

# torch.onnx's exporter writes opset 18 and converts from there; down to 17 fails on MedMamba (ONNX's converter
# needs constant axes inputs, and the exporter's are not folded yet when it converts).
DEFAULT_OPSET = MIN_OPSET = 18
# Verification passes what `compare` passes between two fp32 models: |ONNX Runtime − PyTorch| ≤ atol + rtol·|PyTorch|.
DEFAULT_ATOL, DEFAULT_RTOL = TIERS["fp32"].logits_atol, TIERS["fp32"].logits_rtol
# Elements a folded constant may have: every MedMamba-B weight fits (the largest, a 512×512×3×3 conv, 2.4 M).
FOLD_LIMIT = 1 << 24


class ExportError(UserError):
    """Export could not produce a correct model; nothing was written."""


@dataclass
class ExportResult:
    path: Path
    metadata: ModelMetadata
    max_abs_diff: float | None  # None when verification was skipped
    verified_images: int
    verified_form: str | None  # what ONNX Runtime ran (logits_beside_pytorch)
    seconds: float


def _strip_exporter_annotations(model: onnx.ModelProto) -> None:
    """Drop torch's per-node stack traces and FX names: they leak local paths and bloat the file."""
    for value in list(model.graph.input) + list(model.graph.output):
        del value.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _hidden_scan_functions(model: onnx.ModelProto) -> list[str]:
    """Model-local functions that TensorRT 9.0–10.6 would prefer over our plugin."""
    return [f.name for f in model.functions if f.name == scan_node.OP_TYPE]


# The exporter logs a line per absent torchvision op and warns on internals the user cannot act on; a conversion
# to the requested opset that fails is logged with its traceback, which export_onnx says in one line. The levels
# are the process's: two exports at once (an application's threads) share one change.
_quiet_exporter = logger_levels({"torch.onnx": logging.ERROR, "onnxscript.version_converter": logging.CRITICAL})


def trace_to_onnx(checkpoint: LoadedCheckpoint, size: tuple[int, int], batch: int | None, opset: int) -> onnx.ModelProto:
    """The plugin-form graph, straight from torch.export; ``batch=None`` makes the batch dimension dynamic."""
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced with 2.
    example = torch.zeros(batch or 2, checkpoint.config.in_chans, *size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if batch is None else None
    with _quiet_exporter(), ignored_warnings(), torch.no_grad():
        program = torch.onnx.export(
            checkpoint.model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    # The exporter folds constants of up to 8192 elements only; the rest (the x_proj weights reshaped for their
    # 1×1 Conv, A = -exp(A_logs) from stage 2 on) would stay subgraphs that quantizers skip as non-constant.
    onnxscript.optimizer.fold_constants(program.model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    model = program.model_proto
    _strip_exporter_annotations(model)
    model.producer_name, model.producer_version = "medmamba-edge", __version__
    return model


def logits_beside_pytorch(checkpoint: LoadedCheckpoint, model: onnx.ModelProto, images: np.ndarray,
                          batch: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """ONNX Runtime's and PyTorch's logits over ``images`` (fed to a fixed-batch graph as the runtime does), and
    what ran: the model as it will be written, or, for a plugin-form model where the native op library is not
    built, its portable lowering (the same maths in standard ops)."""
    from medmamba_edge.runtime.backends.onnxruntime import custom_ops

    ran = "plugin form, native SS2DScan op" if scan_node.has_scan_nodes(model) else "portable form"
    try:
        session = custom_ops.make_session(model)
    except custom_ops.FusedScanUnavailable:
        model, ran = lower_ss2d_scan(model), "its portable lowering: the native op library is not built"
        session = custom_ops.make_session(model)
    ort_logits = run_in_fixed_batches(lambda chunk: session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0], images, batch)
    with torch.no_grad():
        torch_logits = checkpoint.model(torch.from_numpy(images)).numpy()
    return ort_logits, torch_logits, ran


PROTOBUF_LIMIT = 1 << 31


def _over_2_gb(checkpoint: Path, output: Path, why: str = "") -> ExportError:
    return ExportError(f"{checkpoint}: the exported model is over 2 GB{why}, more than one ONNX file holds "
                       f"(protobuf's limit; medmamba-edge does not write external weights); nothing was written "
                       f"to {output}")


def _check_weights_fit(checkpoint: LoadedCheckpoint, output: Path) -> None:
    """Refuse a model whose weights alone pass protobuf's 2 GB before its trace: the graph holds every weight in
    fp32 (the model as loaded), so nothing smaller can come of it, and tracing one that size takes about 4 times
    its memory (MedMamba-B at 4× its widths: 10.9 GB, 37 s) before _serialized would find out."""
    weights = checkpoint.model.state_dict().values()
    size = sum(t.numel() * t.element_size() for t in weights)
    if size >= PROTOBUF_LIMIT:
        count = sum(t.numel() for t in weights)
        raise _over_2_gb(checkpoint.path, output, f" (its {count / 1e6:.0f} M weights alone are {size / 2**30:.2f} "
                                                  f"GiB as fp32)")


def _serialized(model: onnx.ModelProto, checkpoint: Path, output: Path) -> bytes:
    """The model's bytes; ExportError for a model over protobuf's 2 GB, whichever backend protobuf runs on: its C
    ones refuse to serialize it (upb: EncodeError, cpp: ValueError), its pure-Python one writes what nothing reads."""
    try:
        serialized = model.SerializeToString()
    except (EncodeError, ValueError):
        serialized = None
    if serialized is None or len(serialized) >= PROTOBUF_LIMIT:
        raise _over_2_gb(checkpoint, output)
    return serialized


def export_onnx(
    checkpoint: str | Path | LoadedCheckpoint,
    output: str | Path,
    *,
    input_size: int | tuple[int, int] = DEFAULT_INPUT_SIZE,
    batch: int | None = 1,
    opset: int = DEFAULT_OPSET,
    classes: str | list[str] | None = None,
    scan: str = "plugin",
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    status: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export, verify against PyTorch, and write ``output`` (only if verification passed)."""
    started = time.perf_counter()
    if scan not in SCAN_FORMS:
        raise ExportError(f"--scan must be 'plugin' or 'portable', got {scan!r}")
    if batch is not None and not positive_int(batch):
        raise ExportError(f"batch must be ≥ 1, got {batch}")
    batch = None if batch is None else int(batch)  # numpy's too: the metadata is JSON
    if opset < MIN_OPSET:
        raise ExportError(f"--opset must be ≥ {MIN_OPSET} (torch.onnx cannot convert MedMamba below it), got {opset}")
    if opset > onnx.defs.onnx_opset_version():  # found before the trace, not as torch.onnx's fallback after it
        raise ExportError(f"--opset must be ≤ {onnx.defs.onnx_opset_version()}, the newest the installed onnx "
                          f"{onnx.__version__} knows, got {opset}")
    if problem := tolerance_problem(atol=atol, rtol=rtol):
        raise ExportError(problem)
    check_writable(output, command="export")
    source = checkpoint.path if isinstance(checkpoint, LoadedCheckpoint) else local_model_file(checkpoint, "export")
    if overwrites_input(output, [source, *class_names_files(source, classes)]):
        raise ExportError(f"{output}: the output would overwrite a file this export reads (the checkpoint or its "
                          f"class names)")
    check_onnx_name(output, "an export")
    if not isinstance(checkpoint, LoadedCheckpoint):
        status(f"loading {checkpoint}")
        checkpoint = load_checkpoint(checkpoint, classes)
    elif classes is not None:  # given names label a loaded checkpoint too, as they label one loaded here
        names = resolve_class_names(checkpoint.path, checkpoint.config.num_classes, classes)
        checkpoint = replace(checkpoint, class_names=names)
    size = height_width(input_size)
    metadata = checkpoint.metadata(size, scan_form=scan, batch=batch)
    output = Path(output)
    _check_weights_fit(checkpoint, output)

    status(f"tracing {checkpoint.config.variant} at {size[0]}×{size[1]}")
    try:
        plugin_form = trace_to_onnx(checkpoint, size, batch, opset)
    except (MemoryError, RuntimeError) as exc:  # torch's allocator: "can't allocate memory" at an absurd size
        raise ExportError(f"{checkpoint.path}: cannot trace at {size[0]}×{size[1]} ({first_line(exc)}); nothing "
                          f"was written to {output}") from None
    except ModuleNotFoundError as exc:
        # torch.onnx imports, by name, the onnxscript API of its own release (torch 2.13: _framework_apis.torch_2_11),
        # which an onnxscript older than that torch lacks.
        if (exc.name or "").partition(".")[0] not in ("onnxscript", "onnx_ir"):
            raise
        raise ExportError(f"torch {torch.__version__}'s exporter needs a newer onnxscript than {onnxscript.__version__} "
                          f"({first_line(exc)}): pip install --upgrade onnxscript; nothing was written to {output}") from None
    written = next((o.version for o in plugin_form.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"--opset {opset}: torch.onnx {torch.__version__} could not convert the model to it "
                          f"(it wrote opset {written}); nothing was written to {output}")
    hidden = _hidden_scan_functions(plugin_form)
    if hidden:
        raise ExportError(f"{checkpoint.path}: the exported graph carries a local function {hidden[0]} that would hide the TensorRT plugin")
    if scan == "portable":  # the lowering reads shapes by shape inference, which serializes the model first
        _serialized(plugin_form, checkpoint.path, output)
    model = plugin_form if scan == "plugin" else lower_ss2d_scan(plugin_form)
    write_onnx_metadata(model, metadata)
    serialized = _serialized(model, checkpoint.path, output)  # once: checked and written as it is
    try:
        onnx.checker.check_model(serialized, full_check=scan == "portable")
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{checkpoint.path}: exported graph is invalid: {first_line(exc)}") from None

    max_abs_diff, verified, verified_form = None, 0, None
    if verify:
        status("verifying ONNX Runtime against PyTorch on the bundled sample images")
        # The bundled real sample images, preprocessed exactly as deployment will preprocess them.
        try:
            images = preprocess([read_image(p) for p in sample_image_paths()], metadata)
            ort_logits, torch_logits, verified_form = logits_beside_pytorch(checkpoint, model, images, batch)
        except MemoryError as exc:  # numpy's, at a size the trace still took (18000×18000: 33 GB of images)
            raise ExportError(f"{checkpoint.path}: cannot verify at {size[0]}×{size[1]} (out of memory: "
                              f"{first_line(exc)}); nothing was written to {output} (--no-verify skips it)") from None
        # Before any difference: infinite logits on both sides are "close" (a model answering inf was written as
        # verified, its largest difference nan), and NaN ones read as a mismatch of ONNX Runtime against PyTorch.
        for side, logits in (("PyTorch", torch_logits), ("ONNX Runtime", ort_logits)):
            if (broken := non_finite_rows(logits)).size:
                raise ExportError(f"{checkpoint.path}: {side} gives non-finite logits (NaN or infinite) for "
                                  f"{broken.size} of {len(images)} sample images; nothing was written to {output}")
        max_abs_diff, verified = float(np.abs(ort_logits - torch_logits).max()), len(images)
        outside = logits_outside(ort_logits, torch_logits, atol, rtol)
        if outside:
            # A logit outside is over atol, and so must read its largest difference: 6.914e-06 against an atol of
            # 6.91e-06 read "up to 6.91e-06, 1 of 18 beyond 6.91e-06", as within.
            largest, shown_atol = compared_text(max_abs_diff, atol, 3)
            raise ExportError(
                f"{checkpoint.path}: ONNX Runtime logits differ from PyTorch by up to {largest}, {outside} "
                f"of {ort_logits.size} beyond {shown_atol} + {rtol:g}·|PyTorch|; nothing was written to {output}"
            )
    # Whole models in memory: MedMamba-B is ~160 MB; one over protobuf's 2 GB was refused before the checker.
    write_bytes_atomically(output, serialized)
    return ExportResult(output, metadata, max_abs_diff, verified, verified_form, time.perf_counter() - started)
