"""``medmamba-edge evaluate``: several models (any backends) side by side on the same labelled images.

Each image is decoded once and preprocessed once per distinct preprocessing among the models (a
checkpoint and its ONNX export share one), so the models see identical inputs. An image that cannot be
decoded is left out for every model and reported, never silently dropped. Torch-free: PyTorch is only
imported by the backend of a ``.pth`` model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmamba_edge.runtime.backends import (ONNX_SUFFIXES, Backend, checked_logits, is_checkpoint_name,
                                            is_triton_url, log_softmax, softmax)
from medmamba_edge.runtime.datasets import Dataset, Failure, open_dataset
from medmamba_edge.runtime.files import local_output
from medmamba_edge.runtime.metadata import DEFAULT_INPUT_SIZE, ModelMetadata, positive_int, read_onnx_metadata
from medmamba_edge.runtime.metrics import (Metrics, classification_metrics, non_finite_rows, over_budget, points_lost,
                                           tolerance_problem)
from medmamba_edge.runtime.preprocess import preprocess

from .errors import UserError, plural
from .loaders import open_model

Progress = Callable[[int, int], None]  # (images done, images in all)


class EvaluationError(UserError):
    """Models that cannot be evaluated together, or data without usable images."""


def checkpoint_option(paths: Sequence[Path], value):
    """``value`` (an input size, class names) for each checkpoint among ``paths``, None for the exported models,
    which carry their own; unless no checkpoint is among them: then each model gets ``value`` as given, for
    ``open_model`` to refuse rather than ignore."""
    if not any(map(is_checkpoint_name, paths)):
        return [value] * len(paths)
    return [value if is_checkpoint_name(path) else None for path in paths]


def _onnx_models(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if p.suffix.lower() in ONNX_SUFFIXES and p.exists()]


def input_sizes(paths: Sequence[Path], explicit: int | tuple[int, int] | None) -> list[int | tuple[int, int] | None]:
    """The ``input_size`` to open each model with (checkpoint_option): ``explicit``, else the first ONNX model's
    (so ``evaluate model.pth model.onnx`` runs both at the export's size), else DEFAULT_INPUT_SIZE."""
    size = explicit
    if size is None and any(map(is_checkpoint_name, paths)):
        onnx_paths = _onnx_models(paths)
        size = read_onnx_metadata(onnx_paths[0]).input_size if onnx_paths else DEFAULT_INPUT_SIZE
    return checkpoint_option(paths, size)


def defaulted_checkpoint(paths: Sequence[str | Path], explicit: int | tuple[int, int] | None) -> Path | None:
    """The first checkpoint among ``paths`` that input_sizes runs at DEFAULT_INPUT_SIZE for want of a size (none
    given, no ONNX model to take it from), or None: a checkpoint does not record the size it was trained at, and
    at another one it answers with confidence and wrongly (the official T-32 at 224: top-1 74 %, not 93 %)."""
    paths = [Path(p) for p in paths]
    if explicit is not None or _onnx_models(paths):
        return None
    return next((p for p in paths if is_checkpoint_name(p)), None)


def open_models(models: Sequence[str | Path], input_size: int | tuple[int, int] | None = None, threads: int | None = None,
                classes: str | Sequence[str] | None = None) -> list[Backend]:
    """Backends for models that must agree on their classes (they are compared class by class). ``input_size``
    and ``classes`` go to the checkpoints (checkpoint_option)."""
    if not models:
        raise EvaluationError("no models given")
    paths = [Path(m) for m in models]
    # Each opened as given: a Path would fold the "//" of a URL before open_backend reads its scheme.
    backends = [open_model(model, input_size=size, threads=threads, classes=named) for model, size, named in
                zip(models, input_sizes(paths, input_size), checkpoint_option(paths, classes))]
    first = backends[0].metadata.class_names
    for backend in backends[1:]:
        if backend.metadata.class_names != first:
            hint = "; name a checkpoint's classes with --classes" if any(map(is_checkpoint_name, paths)) else ""
            raise EvaluationError(f"{backend.path}: classes {list(backend.metadata.class_names)} differ from "
                                  f"{backends[0].path}'s {list(first)}{hint}")
    return backends


# What preprocess() takes from a model's metadata: models equal in these see the same input tensors.
PREPROCESSING_FIELDS = ("input_size", "in_chans", "channel_order", "mean", "std", "resize")


def _preprocessing_key(metadata: ModelMetadata) -> tuple:
    return tuple(getattr(metadata, name) for name in PREPROCESSING_FIELDS)


@dataclass
class Outputs:
    """Logits of each model on the same images: those of ``dataset`` at ``indices`` (the decodable ones)."""
    indices: np.ndarray
    logits: list[np.ndarray]
    seconds: list[float]  # time spent in each model's run()
    failures: list[Failure]


def check_batch(batch_size) -> None:
    """Before the models load and the images are read (a checkpoint's load, minutes of DICOM)."""
    if not positive_int(batch_size):
        raise EvaluationError(f"--batch must be an integer ≥ 1, got {batch_size}")


def run_models(backends: Sequence[Backend], dataset: Dataset, batch_size: int = 32,
               progress: Progress | None = None) -> Outputs:
    groups: dict[tuple, list[int]] = {}
    for k, backend in enumerate(backends):
        groups.setdefault(_preprocessing_key(backend.metadata), []).append(k)
    group_metadata = {key: backends[members[0]].metadata for key, members in groups.items()}
    kept, failures = [], []
    logits: list[list[np.ndarray]] = [[] for _ in backends]
    seconds = [0.0] * len(backends)
    def prepare(image: np.ndarray) -> dict[tuple, np.ndarray]:
        return {key: preprocess([image], meta)[0] for key, meta in group_metadata.items()}

    for chunk in dataset.prepared(batch_size, prepare):
        kept += chunk.indices
        failures += chunk.failures
        if chunk.items:
            for key, members in groups.items():
                batch = np.stack([item[key] for item in chunk.items])
                for k in members:
                    began = time.perf_counter()
                    logits[k].append(np.asarray(checked_logits(backends[k], batch), dtype=np.float32))
                    seconds[k] += time.perf_counter() - began
        if progress:
            progress(chunk.end, len(dataset))
    if not kept:
        raise EvaluationError(f"{dataset.description}: none of its {plural(len(dataset), 'image')} could be decoded "
                              f"(first: {failures[0].reason})")
    return Outputs(np.array(kept), [np.concatenate(chunks) for chunks in logits], seconds, failures)


def check_finite(backends: Sequence[Backend], outputs: Outputs, dataset: Dataset) -> None:
    """Refuse a model that answered an image with a NaN or infinite logit: scored, the row would count as a class 0
    answer (argmax takes the first NaN), compared, as agreeing with another model's class 0; left out, the figures
    would flatter the model."""
    for backend, logits in zip(backends, outputs.logits):
        broken = non_finite_rows(logits)
        if broken.size:
            first = dataset.samples[outputs.indices[broken[0]]].source
            raise EvaluationError(f"{backend.path}: non-finite logits (NaN or infinite) for {broken.size} of "
                                  f"{plural(len(logits), 'image')} (first: {first}); its answers there cannot be "
                                  f"scored or compared (a float16 overflow? see docs/tensorrt.md)")


@dataclass
class ModelEvaluation:
    path: str
    backend: str
    precision: str
    input_size: tuple[int, int]
    metrics: Metrics
    seconds: float
    probabilities: np.ndarray  # (images evaluated, classes), for checks and further analysis; not in the JSON
    cpu: str | None  # Backend.cpu(): the CPU these figures hold for, None where they hold on any
    drop: float | None = None  # top-1 accuracy points below the first model (negative: better)

    def to_dict(self) -> dict:
        # "machine" as benchmark's JSON has it, so that one reader finds the CPU in both.
        return {"path": self.path, "backend": self.backend, "precision": self.precision,
                "machine": {"cpu": self.cpu} if self.cpu else None,
                "input_size": list(self.input_size), "seconds": self.seconds, "top1_drop_points": self.drop,
                "metrics": self.metrics.to_dict()}


@dataclass
class EvaluationReport:
    data: str
    class_names: tuple[str, ...]
    models: list[ModelEvaluation]
    labels: np.ndarray  # of the images evaluated, in order
    failures: list[Failure] = field(default_factory=list)
    max_drop: float | None = None

    @property
    def gate_failures(self) -> list[ModelEvaluation]:
        """Models whose top-1 accuracy is more than ``max_drop`` points below the first model's."""
        if self.max_drop is None:
            return []
        return [m for m in self.models[1:] if over_budget(m.drop, self.max_drop)]

    @property
    def absent_classes_note(self) -> str | None:
        return self.models[0].metrics.absent_classes_note()  # every model scored the same images

    def to_dict(self) -> dict:
        return {"data": self.data, "class_names": list(self.class_names), "evaluated": self.models[0].metrics.count,
                "classes_without_images": list(self.models[0].metrics.absent_classes),
                "macro_averages_note": self.absent_classes_note,
                "failed_to_decode": [vars(f) for f in self.failures], "max_drop": self.max_drop,
                "gate_passed": not self.gate_failures, "models": [m.to_dict() for m in self.models]}


def evaluate(models: Sequence[str | Path], data: str | Path, *, split: str | None = None, input_size: int | tuple[int, int] | None = None,
             batch_size: int = 32, max_drop: float | None = None, threads: int | None = None,
             progress: Progress | None = None, classes: str | Sequence[str] | None = None) -> EvaluationReport:
    if problem := tolerance_problem(**{"max-drop": max_drop}):
        raise EvaluationError(problem)
    check_batch(batch_size)
    backends = open_models(models, input_size, threads, classes)
    class_names = backends[0].metadata.class_names
    dataset = open_dataset(data, split=split, class_names=class_names, command="evaluate")
    if not dataset.labelled:
        raise EvaluationError(f"{dataset.description}: evaluation needs labels (an ImageFolder, a labelled .npz "
                              f"split or a path,label CSV)")
    outputs = run_models(backends, dataset, batch_size, progress)
    labels = dataset.labels()[outputs.indices]
    results = []
    check_finite(backends, outputs, dataset)
    for backend, logits, seconds in zip(backends, outputs.logits, outputs.seconds):
        # Ranked (AUC) by log-probabilities: probabilities of confident answers round to 1.0 and tie.
        metrics = classification_metrics(labels, log_softmax(logits), class_names)
        results.append(ModelEvaluation(str(backend.path), backend.describe(), backend.metadata.precision,
                                       backend.metadata.input_size, metrics, seconds, softmax(logits), backend.cpu()))
    for result in results[1:]:
        # Rounded so that equal accuracies reached by different float sums give exactly 0.
        result.drop = points_lost(100 * results[0].metrics.accuracy, 100 * result.metrics.accuracy)
    return EvaluationReport(dataset.description, class_names, results, labels, outputs.failures, max_drop)


def distinct_names(paths: Sequence[str]) -> list[str]:
    """Each model as its file name, or as much of its path as tells it from another of the same name; a served
    model as its address (two versions of one were "1" and "2")."""
    names = []
    for path in paths:
        if is_triton_url(path):
            names.append(str(path))
            continue
        parts = Path(path).parts
        for depth in range(1, len(parts) + 1):
            tail = Path(*parts[-depth:])
            if all(other == path or Path(*Path(other).parts[-depth:]) != tail for other in paths):
                break
        names.append(str(tail))
    return names


def plot_file_names(paths: Sequence[str]) -> list[str]:
    """``<model file>.confusion.png``, prefixed by the model's position where two plots would share a name: two
    files of one name, then a file named as such a prefixed one (``a/m.onnx 1-m.onnx b/m.onnx``: 1-m.onnx,
    2-1-m.onnx, 3-m.onnx). Positions differ, so prefixed names do too: once every plot that shares its name is
    prefixed, none does. The model's name is cut where the whole would pass a file system's 255 bytes (after the
    evaluation, not before it)."""
    names = [Path(p).name for p in paths]
    prefixed: set[int] = set()
    while True:
        plots = [_plot_file_name(f"{k + 1}-{name}" if k in prefixed else name) for k, name in enumerate(names)]
        sharing = {k for k, plot in enumerate(plots) if plots.count(plot) > 1} - prefixed
        if not sharing:
            return plots
        prefixed |= sharing


def _plot_file_name(name: str) -> str:
    while len(os.fsencode(f"{name}.confusion.png")) > 255:
        name = name[:-1]  # from the end: a position prefix stays
    return f"{name}.confusion.png"


def on_cpu(cpu: str | None) -> str:
    """" on <CPU>" after figures that hold for that CPU only (Backend.cpu: INT8 kernels differ with the instruction
    set), "" after figures that hold on any."""
    return f" on {cpu}" if cpu else ""


def write_confusion_plots(report: EvaluationReport, folder: Path) -> list[Path]:
    from .plots import confusion_matrix_png

    folder = local_output(folder, "evaluate", folder=True)
    paths = [m.path for m in report.models]
    return [
        confusion_matrix_png(m.metrics.confusion, report.class_names,
                             f"{shown} ({m.precision}): top-1 {100 * m.metrics.accuracy:.2f}%{on_cpu(m.cpu)}",
                             folder / name)
        for m, shown, name in zip(report.models, distinct_names(paths), plot_file_names(paths))
    ]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_tables(report: EvaluationReport) -> list:
    """Rich tables: the paper's metrics per model (macro averages, in %), then per class, and a line on the classes
    with no images where there are any. Their text is plain (file and class names), for a console that reads no
    markup (cli's ``out``); styles are rich Text."""
    from rich.table import Table
    from rich.text import Text

    names = distinct_names([m.path for m in report.models])
    evaluated = report.models[0].metrics.count
    summary = Table(title=report.data + (f"; {len(report.failures)} left out (unusable), {evaluated} evaluated"
                                         if report.failures else ""),
                    caption="macro averages over classes, %; Δ top-1: accuracy points vs the first model\n"
                            + "\n".join(f"{name}: {m.backend}{on_cpu(m.cpu)}" for name, m in zip(names, report.models)))
    for column in ("model", "dtype", "accuracy", "precision", "sensitivity", "specificity", "F1", "AUC", "Δ top-1"):
        summary.add_column(column, justify="left" if column in ("model", "dtype") else "right",
                           overflow="fold")  # fold, not truncate: file names tell the models apart
    for name, m in zip(names, report.models):
        metrics = m.metrics
        drop = "" if m.drop is None else f"{0.0 - m.drop:+.2f}"  # 0.0 - 0.0 prints +0.00, not -0.00
        if m in report.gate_failures:
            drop = Text(drop, style="bold red")
        summary.add_row(name, m.precision, _percent(metrics.accuracy), _percent(metrics.precision),
                        _percent(metrics.sensitivity), _percent(metrics.specificity), _percent(metrics.f1),
                        _percent(metrics.auc), drop)
    per_class = Table(title="per class (one-vs-rest, %)")
    for column in ("model", "class", "support", "precision", "sensitivity", "specificity", "F1", "AUC"):
        per_class.add_column(column, justify="left" if column in ("model", "class") else "right", overflow="fold")
    for name, m in zip(names, report.models):
        for c in m.metrics.per_class:
            per_class.add_row(name, c.name, str(c.support), _percent(c.precision), _percent(c.sensitivity),
                              _percent(c.specificity), _percent(c.f1), _percent(c.auc))
    note = report.absent_classes_note
    return [summary, per_class] + ([Text.assemble(("warning: ", "yellow"), note)] if note else [])
