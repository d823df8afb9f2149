"""Backends behind one small interface (as Polygraphy's runners): open an exported model, read its metadata,
turn a preprocessed batch into logits, close. The run loop, evaluate, benchmark, compare and quantize all use
these. The backend is chosen from the file: ``.onnx`` → ONNX Runtime, ``.engine``/``.plan`` → TensorRT. A
PyTorch checkpoint is opened one floor up (``medmamba_edge.loaders``), where torch may be imported. Heavy
imports happen in ``open_backend`` so that importing this package stays torch- and TensorRT-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from medmamba_edge.errors import UserError, plural

from ..metadata import ModelMetadata
from ..uri import TRITON_SCHEME, model_uri_scheme, uri_refusal, without_password

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
# What train.py (.pth), timm (.pth.tar), Lightning (.ckpt) and other trainers name a torch.save file: endings of the
# name, not suffixes (Path.suffix of best.pth.tar is .tar); is_checkpoint_name is the one test of them.
TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".ckpt", ".bin")


def is_checkpoint_name(path: str | Path) -> bool:
    """Whether a file's name says it is a PyTorch checkpoint (one of TORCH_SUFFIXES ends it, in any case); a served
    model's name (triton://HOST:PORT/model.pt) does not."""
    return not is_triton_url(path) and Path(path).name.lower().endswith(TORCH_SUFFIXES)


class BackendError(UserError):
    """A model that cannot be loaded or run by its backend."""


class WrongOutputShape(BackendError):
    """A backend's answer of another shape than the batch it was given: ``reason`` says how (run's per-batch
    reason), the message names the model too."""

    def __init__(self, model, reason: str):
        super().__init__(f"{model}: {reason}")
        self.reason = reason


class Backend(Protocol):
    """What every backend offers. Backends subclass it for ``with``: the model is closed on leaving the block."""

    metadata: ModelMetadata
    path: Path
    batch_range: tuple[int, int] | None = None  # the smallest and largest batch an engine's profile takes; None: any

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a preprocessed float32 (N, C, H, W) batch. An empty one (N = 0: a caller batching
        however many frames arrived) gives (0, classes) here, for every backend, without running the model: not
        every model or server takes a batch of 0, and the batching under ``_run`` has no last image to pad with."""
        if len(batch) == 0:
            return np.empty((0, self.metadata.num_classes), np.float32)
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """What each backend implements: ``run`` for N ≥ 1."""

    def describe(self) -> str:
        """One line: framework, device/providers, precision."""

    def cpu(self) -> str | None:
        """This machine's CPU (runtime/cpu.describe_cpu) where it computes the outputs with kernels chosen by its
        instruction set, so that a figure from them holds for that CPU only (ONNX Runtime's INT8 kernels); None
        where a GPU or a server computes them."""
        return None

    def close(self) -> None:
        """Free the session or engine and its (device) memory now rather than at garbage collection; idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax), in float64, that keeps ranking confident answers: the top class's probability rounds to 1.0
    once it leads by ~17 (float32) or ~37 (float64), and a ranking of such probabilities (AUC) is all ties; its
    log, -log1p(the others' share), stays distinct while exp(-lead) is a float64 (a lead of up to ~745)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    others = np.exp(shifted)
    others[np.arange(len(shifted)), shifted.argmax(axis=1)] = 0.0  # the top one's exp(0) = 1 is the 1 of log1p
    return shifted - np.log1p(others.sum(axis=1, keepdims=True))


def wrong_shape(logits: np.ndarray, inputs: int, classes: int) -> str | None:
    """What is wrong with a backend's answer to ``inputs`` frames, or None. Checked on every batch, not once at
    opening: a custom backend, a server or a model with data-dependent shapes may answer one batch wrongly."""
    if logits.ndim != 2:
        return (f"the model returned an output of shape {logits.shape} for {plural(inputs, 'input')}, expected "
                f"({inputs}, {classes})")
    if len(logits) != inputs:
        return f"the model returned {plural(len(logits), 'row')} for {plural(inputs, 'input')}"
    if logits.shape[1] != classes:
        return f"the model returned {plural(logits.shape[1], 'logit')} a row for {plural(classes, 'class', 'classes')}"
    return None


def checked_logits(backend: Backend, batch: np.ndarray) -> np.ndarray:
    """``backend.run(batch)``, as an array of one row of logits per image, or WrongOutputShape: what every command
    runs a model through (run, evaluate, compare, quantize's gate), so that a model answering 1 row for 8 images is
    named in words rather than a traceback further on."""
    logits = np.asarray(backend.run(batch))
    reason = wrong_shape(logits, len(batch), backend.metadata.num_classes)
    if reason:
        raise WrongOutputShape(getattr(backend, "path", "the model"), reason)
    return logits


def fixed_batches(batch: np.ndarray, fixed: int | None) -> list[np.ndarray]:
    """``batch`` as whole batches of ``fixed`` images (one batch if None), the last padded with copies of its
    last image: what a fixed-batch model takes."""
    step = fixed or max(len(batch), 1)
    chunks = [batch[start:start + step] for start in range(0, len(batch), step)]
    if chunks and len(chunks[-1]) < step:
        chunks[-1] = np.concatenate([chunks[-1], np.repeat(chunks[-1][-1:], step - len(chunks[-1]), axis=0)])
    return chunks


def run_in_fixed_batches(run_fixed, batch: np.ndarray, fixed: int | None) -> np.ndarray:
    """Feed a fixed-batch model whole batches, padding the last one with copies of its last image."""
    return np.concatenate([run_fixed(chunk) for chunk in fixed_batches(batch, fixed)])[: len(batch)]


def is_triton_url(spec) -> bool:
    """Whether a model argument names a server (runtime/backends/triton.py) rather than a file. A URI of another
    scheme names neither: it is refused here, where every command first looks at its models, in words rather
    than as a missing file."""
    scheme = model_uri_scheme(spec)
    if scheme not in (None, TRITON_SCHEME):
        raise BackendError(f"{without_password(spec)}: unknown model URI scheme {scheme!r}; a served model is "
                           f"{TRITON_SCHEME}://HOST:PORT/MODEL")
    return scheme == TRITON_SCHEME


def local_model_file(spec: str | Path, command: str) -> Path:
    """``spec`` as a path, for a command that reads the model's file itself (quantize, build-engine, export-triton,
    export's checkpoint, serve); a URI is refused as typed, where it read as a missing file named with its "//"
    folded by a Path ("http:/host/m.onnx: no such ONNX file")."""
    if problem := uri_refusal(spec, command, "a local model file"):
        raise BackendError(problem)
    return Path(spec)


def refuse_options(path: str | Path, kind: str, **given) -> None:
    """An option that does not apply to this kind of model is an error: silently ignoring it would run something
    other than what was asked for (an input size given with an .onnx, which carries its own)."""
    wrong = [name for name, value in given.items() if value is not None]
    if wrong:
        raise BackendError(f"{path}: {', '.join(wrong)} cannot be set for {kind}")


def unknown_model_type(path: str | Path, *, checkpoints: bool = False) -> BackendError:
    """The error for a file of no model type a command takes, naming only those it does: the exported kinds, and
    PyTorch checkpoints where ``checkpoints`` (commands that open models through medmamba_edge.loaders: run,
    evaluate, benchmark, compare). serve and export-triton take no checkpoint, and said they did."""
    suffix = Path(path).suffix.lower() or "(no suffix)"
    kinds = ["an .onnx (medmamba-edge export)", "an .engine/.plan (medmamba-edge build-engine)"]
    if checkpoints:
        kinds.append(f"a PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)})")
    return BackendError(f"{path}: unknown model type {suffix}; expected {', '.join(kinds[:-1])} or {kinds[-1]}")


def open_backend(path: str | Path, *, threads: int | None = None, providers: list[str] | str | None = None,
                 plugin: str | Path | None = None, checkpoints: bool = False) -> Backend:
    """The backend for an exported model: ``threads`` and ``providers`` apply to ONNX Runtime, ``plugin`` (the
    SS2DScan plugin library) to TensorRT; giving one to the other kind is refused. ``triton://HOST:PORT/MODEL``
    is a model on a server (runtime/backends/triton.py), not a file. ``checkpoints``: the caller opens PyTorch
    checkpoints itself (loaders.open_model), so a file of an unknown type is told they are taken too."""
    if is_triton_url(path):
        refuse_options(path, "a served model (the server runs it)", threads=threads, providers=providers, plugin=plugin)
        from .triton import TritonBackend

        return TritonBackend(str(path))
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        refuse_options(path, "an ONNX model (ONNX Runtime)", plugin=plugin)
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, threads=threads, providers=providers)
    if suffix in ENGINE_SUFFIXES:
        refuse_options(path, "a TensorRT engine", threads=threads, providers=providers)
        from .tensorrt.runner import TensorRTBackend

        return TensorRTBackend(path, plugin=plugin)
    if is_checkpoint_name(path):
        raise BackendError(f"{path}: a PyTorch checkpoint is opened with torch (medmamba_edge.loaders.open_model), "
                           f"not by the torch-free runtime; export it first (medmamba-edge export)")
    raise unknown_model_type(path, checkpoints=checkpoints)
